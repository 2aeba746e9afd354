//! The learned forecaster: features -> network -> calibrated quantiles, and
//! its model file format.
//!
//! # Model file format (version 1)
//!
//! ```text
//! offset  size  content
//! 0       8     magic "PRSCQNT\0"
//! 8       4     format version, u32 little endian
//! 12      8     metadata length L, u64 little endian
//! 20      L     metadata, JSON (ModelMeta: feature spec, net shape,
//!               calibration, split, payload checksum)
//! 20+L    ...   weights, burnpack (burn's record format)
//! ```
//!
//! A file with another magic or format version, a different feature spec,
//! or a payload whose FNV-1a checksum does not match is rejected with
//! [`ModelsError::ModelFile`].

use std::path::Path;

use burn::module::Module;
use burn::prelude::*;
use burn::store::ModuleRecord;
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::features::{FEATURE_VERSION, N_FEATURES, feature_names, features, from_z};
use crate::forecast::{Forecaster, History, Horizon, OnlineCalibrator, Quantiles};
use crate::nn::{NetSpec, QuantileMlp, tensor2};
use crate::offload::{Chooser, Offload, Target};
use crate::task::GAP_SLOTS;
use crate::trace::{SplitSpec, fnv1a};

const MAGIC: &[u8; 8] = b"PRSCQNT\0";
/// Model file format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Per level post-processing of the network's quantile `q` with scale `s`:
/// `q' = factor * s * (q / s)^shrink`. `shrink < 1` pulls wide forecasts
/// towards the series' level; `factor` then restores coverage `p` on the
/// calibration split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Multiplicative factor per level.
    pub factor: [f64; 3],
    /// Exponent per level.
    pub shrink: [f64; 3],
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            factor: [1.0; 3],
            shrink: [1.0; 3],
        }
    }
}

impl Calibration {
    /// Apply to raw quantiles with scale `s`.
    pub fn apply(&self, q: Quantiles, s: f64) -> Quantiles {
        let mut out = [0.0; 3];
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.factor[k] * shrink(q.0[k], s, self.shrink[k]);
        }
        Quantiles(out).sanitized()
    }
}

/// `s * (q / s)^beta` (0 for q <= 0).
pub(crate) fn shrink(q: f64, s: f64, beta: f64) -> f64 {
    if q <= 0.0 || s <= 0.0 {
        0.0
    } else if beta == 1.0 {
        q
    } else {
        s * (q / s).powf(beta)
    }
}

/// Metadata stored in a model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Feature definition version.
    pub feature_version: u32,
    /// Feature names, in input order.
    pub feature_names: Vec<String>,
    /// Network shape.
    pub net: NetSpec,
    /// Calibration of regular forecasts (learned on the calibration split
    /// of the training files).
    pub calibration: Calibration,
    /// The same for forecasts made across a gap (post-restart).
    pub calibration_restart: Calibration,
    /// The split used in training.
    pub split: SplitSpec,
    /// Dataset names (file names without extension) trained on.
    pub trained_on: Vec<String>,
    /// FNV-1a 64 of the weights payload.
    pub payload_fnv1a: u64,
}

/// The learned quantile forecaster.
#[derive(Debug)]
pub struct LearnedForecaster {
    net: QuantileMlp,
    device: Device,
    /// A copy of the weights on the GPU and the rule for when to use it.
    gpu: Option<GpuCopy>,
    /// Metadata (calibration, split, provenance).
    pub meta: ModelMeta,
    /// Step of the per-series online calibration in
    /// [`Forecaster::forecast_sequence`]; 0 disables it.
    pub online_gamma: f64,
}

/// The weights on the GPU, and when to use them.
#[derive(Debug)]
struct GpuCopy {
    net: QuantileMlp,
    device: Device,
    chooser: Chooser,
}

/// Default step of the per-series online calibration.
pub const ONLINE_GAMMA: f64 = 0.005;

impl LearnedForecaster {
    /// An untrained network (random weights, no calibration): for
    /// benchmarks and tests of the plumbing, not for forecasts.
    pub fn untrained(hidden: usize) -> Self {
        let device = Device::flex();
        let net_spec = NetSpec {
            inputs: N_FEATURES,
            hidden,
        };
        LearnedForecaster {
            net: QuantileMlp::new(net_spec, &device),
            device,
            meta: ModelMeta {
                feature_version: FEATURE_VERSION,
                feature_names: feature_names(),
                net: net_spec,
                calibration: Calibration::default(),
                calibration_restart: Calibration::default(),
                split: SplitSpec::default(),
                trained_on: Vec::new(),
                payload_fnv1a: 0,
            },
            online_gamma: ONLINE_GAMMA,
            gpu: None,
        }
    }

    pub(crate) fn from_parts(net: QuantileMlp, device: Device, meta: ModelMeta) -> Self {
        LearnedForecaster {
            net,
            device,
            gpu: None,
            meta,
            online_gamma: ONLINE_GAMMA,
        }
    }

    /// Run batch inference on the GPU where `offload` says so (by batch
    /// size, against its measured crossover), on the CPU otherwise. The
    /// weights are copied to the GPU once, here.
    #[must_use]
    pub fn with_offload(mut self, offload: &Offload) -> Self {
        self.gpu = offload.gpu().map(|g| GpuCopy {
            net: self.net.clone().to_device(g.device()),
            device: g.device().clone(),
            chooser: offload.chooser(),
        });
        self
    }

    /// The network on its home device (the CPU unless loaded elsewhere).
    pub(crate) fn home_net(&self) -> &QuantileMlp {
        &self.net
    }

    /// Rows per inference batch: large when a GPU may take them.
    fn batch_rows(&self) -> usize {
        if self.gpu.is_some() { 65_536 } else { 4096 }
    }

    /// Raw (uncalibrated) quantiles for feature rows, with scales.
    pub(crate) fn predict_raw(&self, x: Vec<f32>, scales: &[f64]) -> Vec<Quantiles> {
        let rows = scales.len();
        if rows == 0 {
            return Vec::new();
        }
        let out = match &self.gpu {
            Some(g) if g.chooser.inference(rows) == Target::Gpu => {
                g.net.forward(tensor2(x, rows, N_FEATURES, &g.device))
            }
            _ => self.net.forward(tensor2(x, rows, N_FEATURES, &self.device)),
        };
        let v: Vec<f32> = out.into_data().try_into_vec().unwrap_or_default();
        v.chunks(3)
            .zip(scales)
            .map(|(z, &s)| {
                Quantiles([
                    from_z(f64::from(z[0]), s),
                    from_z(f64::from(z[1]), s),
                    from_z(f64::from(z[2]), s),
                ])
            })
            .collect()
    }

    fn calibrate(&self, q: Quantiles, s: f64, restart: bool) -> Quantiles {
        if restart {
            self.meta.calibration_restart.apply(q, s)
        } else {
            self.meta.calibration.apply(q, s)
        }
    }

    /// What a served forecast records as its maker:
    /// `model:<first 8 hex digits of the weights' checksum>@v<format version>`
    /// (the checksum is known once the model was saved or loaded).
    pub fn id(&self) -> String {
        format!(
            "model:{:08x}@v{FORMAT_VERSION}",
            self.meta.payload_fnv1a >> 32
        )
    }

    /// Save to `path` (see the module docs for the format).
    pub fn save(&self, path: &Path) -> Result<()> {
        let payload = self
            .net
            .clone()
            .into_record()
            .into_bytes()
            .map_err(|e| ModelsError::Weights(format!("{e:?}")))?;
        let payload: &[u8] = &payload;
        let mut meta = self.meta.clone();
        meta.payload_fnv1a = fnv1a(payload, 0);
        let meta_json = serde_json::to_vec(&meta)?;
        let mut out = Vec::with_capacity(20 + meta_json.len() + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(meta_json.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta_json);
        out.extend_from_slice(payload);
        std::fs::write(path, out).map_err(|e| ModelsError::io(path, e))
    }

    /// Load from `path` onto the CPU (flex) device.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelsError::io(path, e))?;
        Self::from_bytes(&bytes, path, Device::flex())
    }

    /// Decode a model file's bytes; `path` is used in messages only.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: Device) -> Result<Self> {
        let bad = |reason: String| ModelsError::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < 20 || &bytes[..8] != MAGIC {
            return Err(bad(
                "no Prescient model header (wrong magic); was it written by `prescient train`?"
                    .into(),
            ));
        }
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&bytes[8..12]);
        let version = u32::from_le_bytes(v4);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}; retrain with this build's `prescient train`"
            )));
        }
        let mut v8 = [0u8; 8];
        v8.copy_from_slice(&bytes[12..20]);
        let meta_len = usize::try_from(u64::from_le_bytes(v8))
            .map_err(|_| bad("metadata length out of range".into()))?;
        let meta_end = 20usize
            .checked_add(meta_len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| bad("truncated metadata".into()))?;
        let meta: ModelMeta = serde_json::from_slice(&bytes[20..meta_end])
            .map_err(|e| bad(format!("metadata is not valid: {e}")))?;
        if meta.feature_version != FEATURE_VERSION || meta.feature_names != feature_names() {
            return Err(bad(format!(
                "feature spec version {} with {} features does not match this build's version {FEATURE_VERSION} with {N_FEATURES}",
                meta.feature_version,
                meta.feature_names.len()
            )));
        }
        if meta.net.inputs != N_FEATURES || meta.net.hidden == 0 || meta.net.hidden > 4096 {
            return Err(bad(format!("network shape {:?} is not usable", meta.net)));
        }
        let payload = &bytes[meta_end..];
        let sum = fnv1a(payload, 0);
        if sum != meta.payload_fnv1a {
            return Err(bad(format!(
                "weights checksum {sum:016x} does not match the header's {:016x}: the file is corrupted",
                meta.payload_fnv1a
            )));
        }
        let record =
            ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(payload.to_vec()))
                .map_err(|e| bad(format!("weights are not a burnpack record: {e:?}")))?;
        let net = QuantileMlp::new(meta.net, &device)
            .try_load_record(record)
            .map_err(|e| bad(format!("weights do not fit the network: {e:?}")))?;
        Ok(LearnedForecaster {
            net,
            device,
            gpu: None,
            meta,
            online_gamma: ONLINE_GAMMA,
        })
    }
}

impl Forecaster for LearnedForecaster {
    fn name(&self) -> &str {
        "model"
    }

    fn forecast(&self, h: &History<'_>, horizon: Horizon) -> Quantiles {
        self.forecast_batch(std::slice::from_ref(h), horizon)
            .pop()
            .unwrap_or(Quantiles([0.0; 3]))
    }

    /// Batch forecasts, then an [`OnlineCalibrator`] per series (when
    /// `online_gamma > 0`): decision `i` uses the outcomes of the earlier
    /// decisions whose target hour ended by its decision time.
    fn forecast_sequence(
        &self,
        hs: &[History<'_>],
        horizon: Horizon,
        outcomes: &[&[f64]],
    ) -> Vec<Quantiles> {
        let base = self.forecast_batch(hs, horizon);
        if self.online_gamma <= 0.0 {
            return base;
        }
        let mut cal = OnlineCalibrator::new(self.online_gamma);
        let mut pending: std::collections::VecDeque<(i64, Quantiles, &[f64])> =
            std::collections::VecDeque::new();
        let mut out = Vec::with_capacity(base.len());
        for ((h, q), ys) in hs.iter().zip(base).zip(outcomes) {
            while let Some(&(ready, fq, fy)) = pending.front() {
                if ready > h.last_slot() {
                    break;
                }
                for &y in fy {
                    cal.update(&fq, y);
                }
                pending.pop_front();
            }
            let adj = cal.adjust(q);
            out.push(adj);
            pending.push_back((h.decision_slot + 12, adj, ys));
        }
        out
    }

    /// The model is trained for the next hour (and, with cut histories, for
    /// the hour after a restart); a next-interval forecast is the same
    /// distribution, which is conservative for one slot.
    fn forecast_batch(&self, hs: &[History<'_>], _horizon: Horizon) -> Vec<Quantiles> {
        let mut out = Vec::with_capacity(hs.len());
        for chunk in hs.chunks(self.batch_rows()) {
            let mut x = vec![0.0f32; chunk.len() * N_FEATURES];
            let mut scales = vec![0.0f64; chunk.len()];
            let fill = |hs: &[History<'_>], x: &mut [f32], sc: &mut [f64]| {
                for ((h, row), s) in hs.iter().zip(x.chunks_mut(N_FEATURES)).zip(sc) {
                    *s = features(h, row);
                }
            };
            if chunk.len() >= 256 {
                // Two threads: the feature work dominates a large batch.
                let half = chunk.len() / 2;
                let (xa, xb) = x.split_at_mut(half * N_FEATURES);
                let (sa, sb) = scales.split_at_mut(half);
                std::thread::scope(|s| {
                    s.spawn(|| fill(&chunk[..half], xa, sa));
                    fill(&chunk[half..], xb, sb);
                });
            } else {
                fill(chunk, &mut x, &mut scales);
            }
            out.extend(
                self.predict_raw(x, &scales)
                    .into_iter()
                    .zip(chunk)
                    .zip(&scales)
                    .map(|((q, h), &s)| {
                        self.calibrate(q, s, h.decision_slot - h.last_slot() >= GAP_SLOTS)
                    }),
            );
        }
        out
    }
}
