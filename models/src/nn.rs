//! The burn network: an MLP from features to three monotone quantiles in
//! the `z = ln(1 + y / s)` space, trained with pinball loss.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{relu, softplus};

use crate::forecast::LEVELS;

/// Shape of the network (stored in model files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    /// Inputs (number of features).
    pub inputs: usize,
    /// Width of both hidden layers.
    pub hidden: usize,
}

/// Two hidden ReLU layers; the head gives `z50` and two non-negative
/// increments, so `z50 <= z90 <= z99` by construction.
#[derive(Module, Debug)]
pub struct QuantileMlp {
    l1: Linear,
    l2: Linear,
    head: Linear,
}

impl QuantileMlp {
    /// A freshly initialised network on `device`.
    pub fn new(spec: NetSpec, device: &Device) -> Self {
        QuantileMlp {
            l1: LinearConfig::new(spec.inputs, spec.hidden).init(device),
            l2: LinearConfig::new(spec.hidden, spec.hidden).init(device),
            head: LinearConfig::new(spec.hidden, 3).init(device),
        }
    }

    /// `[batch, inputs]` -> `[batch, 3]` quantiles in z space.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = relu(self.l1.forward(x));
        let h = relu(self.l2.forward(h));
        let o = self.head.forward(h);
        let base = o.clone().narrow(1, 0, 1);
        let inc = softplus(o.narrow(1, 1, 2), 1.0);
        let d1 = inc.clone().narrow(1, 0, 1);
        let d2 = inc.narrow(1, 1, 1);
        let q90 = base.clone() + d1;
        let q99 = q90.clone() + d2;
        Tensor::cat(vec![base, q90, q99], 1)
    }
}

/// Weighted, masked pinball loss averaged over levels.
///
/// `q`: `[b, 3]`; `y`, `mask`: `[b, t]`; `w`: `[b, 1]`.
pub fn pinball_loss(q: Tensor<2>, y: Tensor<2>, mask: Tensor<2>, w: Tensor<2>) -> Tensor<1> {
    let wm = mask * w;
    let denom = wm.clone().sum().add_scalar(1e-9);
    let mut total: Option<Tensor<1>> = None;
    for (k, &p) in LEVELS.iter().enumerate() {
        let qk = q.clone().narrow(1, k, 1);
        let diff = y.clone() - qk;
        let loss = diff
            .clone()
            .mul_scalar(p)
            .max_pair(diff.mul_scalar(p - 1.0));
        let l = (loss * wm.clone()).sum();
        total = Some(match total {
            None => l,
            Some(t) => t + l,
        });
    }
    let total = total.unwrap_or_else(|| Tensor::zeros([1], &q.device()));
    total / denom.mul_scalar(LEVELS.len() as f64)
}

/// A 2-D tensor from row-major data.
pub fn tensor2(data: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(data, [rows, cols]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinball_loss_matches_hand_computation() {
        let device = Device::flex();
        // One sample, quantiles (1, 2, 3); targets 0 and 4, both present.
        let q = tensor2(vec![1.0, 2.0, 3.0], 1, 3, &device);
        let y = tensor2(vec![0.0, 4.0], 1, 2, &device);
        let m = tensor2(vec![1.0, 1.0], 1, 2, &device);
        let w = tensor2(vec![1.0], 1, 1, &device);
        let l: f32 = pinball_loss(q, y, m, w).into_scalar();
        // p50: (0.5*1 + 0.5*3)/2 = 1; p90: (0.1*2 + 0.9*2)/2 = 1;
        // p99: (0.01*3 + 0.99*1)/2 = 0.51; mean = 2.51/3.
        assert!((f64::from(l) - 2.51 / 3.0).abs() < 1e-5, "{l}");
        // A masked-out target does not count.
        let q = tensor2(vec![1.0, 2.0, 3.0], 1, 3, &device);
        let y = tensor2(vec![0.0, 100.0], 1, 2, &device);
        let m = tensor2(vec![1.0, 0.0], 1, 2, &device);
        let w = tensor2(vec![1.0], 1, 1, &device);
        let l: f32 = pinball_loss(q, y, m, w).into_scalar();
        // p50: 0.5*1; p90: 0.1*2; p99: 0.01*3 -> 0.73/3.
        assert!((f64::from(l) - 0.73 / 3.0).abs() < 1e-5, "{l}");
    }

    #[test]
    fn forward_quantiles_are_monotone() {
        let device = Device::flex();
        let net = QuantileMlp::new(
            NetSpec {
                inputs: 4,
                hidden: 8,
            },
            &device,
        );
        let x = tensor2(
            (0..40).map(|i| i as f32 / 7.0 - 2.0).collect(),
            10,
            4,
            &device,
        );
        let out: Vec<f32> = net.forward(x).into_data().try_into_vec().unwrap();
        for r in out.chunks(3) {
            assert!(r[0] <= r[1] && r[1] <= r[2], "{r:?}");
        }
    }
}
