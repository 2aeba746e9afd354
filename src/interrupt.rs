//! The interruption coordinator: when a VM of higher priority needs
//! resources the host does not have, decide whether to shrink other VMs
//! (balloon), which interruptible VMs of lower priority to interrupt, or to
//! delay; remember what each interrupted VM will need when it restarts and
//! grant exactly that, at once, when it does.
//!
//! Two layers, both pure (no I/O, time injected as milliseconds):
//!
//! * [`decide`]: one decision over plain inputs ([`HostView`], [`VmView`],
//!   [`Request`]). It is what the resource pool will feed once it exists.
//! * [`Coordinator`]: the daemon's ledger of VMs, orders and restart
//!   reservations, driven by the hooks events (`before-boot`, `balloon`,
//!   `interrupted`, `stopped`); it calls [`decide`] and says what to answer.
//!
//! # The decision
//!
//! Resources are memory (MiB) and vCPUs. `used` is what the listed VMs hold
//! plus what the host holds for others (`held`: restart reservations and
//! admissions in progress that the requester may not take).
//!
//! 1. If `used + demand` fits the capacity: **admit**.
//! 2. **Shrink first**: if shrinking VMs by their balloons (at most each
//!    one's `shrinkable_mib`, lowest priority first) covers the memory
//!    short, admit with those shrinks and interrupt nothing.
//! 3. Otherwise choose a set `S` of **candidates** (interruptible VMs of
//!    strictly lower priority than the requester) such that
//!    * after `S` releases its allocation and the VMs not in `S` shrink by
//!      at most their shrinkable memory, the demand fits (*now*), and
//!    * `S`'s predicted post-restart demand fits beside what stays, once
//!      the requester is gone (*later*):
//!      `held + Σ_{not S} allocated + Σ_S restart ≤ capacity`;
//!
//!    and among those sets the one that touches the lowest priorities,
//!    then the least predicted disruption: sets are compared by the total
//!    disruption they cause at each priority level, from the highest level
//!    down (touching a level at all is worse than not touching it), then by
//!    size, then by VM ids. With up to [`EXACT_LIMIT`] candidates every set
//!    is tried; beyond that a greedy choice (by priority, then disruption
//!    per MiB freed) is pruned until no member can be left out.
//!    The shrinks then applied are only what `S` leaves short.
//! 4. No set works: **delay**, with the memory and vCPUs still missing and
//!    whether the demand itself or the restart of the victims does not fit.
//!
//! # The state machine (per VM, in [`Coordinator`])
//!
//! ```text
//!            before-boot, fits (maybe after shrinking others)
//!  (new) ───────────────────────────────────────────────► Running
//!    │ before-boot, needs interruptions                      │  ▲
//!    ├──────────► Waiting ── victims gone, re-ask fits ──────┘  │
//!    │ (defer)    (its demand held; orders out)                 │
//!    │ before-boot, cannot free enough                          │
//!    └──────────► (defer, nothing changes; the VMM asks again)  │
//!                                                                │
//!  Running ── chosen as victim ──► Interrupting ── interrupted/stopped ──► Interrupted
//!             (next balloon event     (still holds its                   (allocation released;
//!              answers `interrupt`)    allocation)                        restart reservation held)
//!                                                                          │
//!  Interrupted ── before-boot {restart} fits its reservation ──────────────┘──► Running
//!                 (granted at once; else treated as any request: shrink,
//!                  interrupt lower priorities, or defer)
//!  Running ── stopped ──► (gone)
//! ```
//!
//! A `Waiting` requester that does not ask again within
//! [`CoordinatorConfig::waiting_expiry_ms`] is forgotten (its VMM gave up).
//! A restart reservation is held against requests of the same or lower
//! priority than the interrupted VM; a request of higher priority could
//! interrupt it anyway, so the reservation does not count against it.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most candidates for which every subset is tried.
pub const EXACT_LIMIT: usize = 16;

/// Memory and vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
}

impl Resources {
    /// `memory_mib` MiB and `vcpus` vCPUs.
    pub fn new(memory_mib: u64, vcpus: u64) -> Self {
        Resources { memory_mib, vcpus }
    }

    /// Component-wise sum (saturating).
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            vcpus: self.vcpus.saturating_add(o.vcpus),
        }
    }

    /// Component-wise difference, floored at zero.
    pub fn minus(self, o: Resources) -> Resources {
        Resources {
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            vcpus: self.vcpus.saturating_sub(o.vcpus),
        }
    }

    /// True when every component is within `cap`.
    pub fn fits(self, cap: Resources) -> bool {
        self.memory_mib <= cap.memory_mib && self.vcpus <= cap.vcpus
    }

    /// True when both components are zero.
    pub fn is_zero(self) -> bool {
        self.memory_mib == 0 && self.vcpus == 0
    }
}

/// The host as the coordinator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// What the host may hand out to VMs.
    pub capacity: Resources,
    /// Held for others and not takeable by this request (restart
    /// reservations, admissions in progress).
    pub held: Resources,
}

/// One VM on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    /// Its id.
    pub id: String,
    /// Priority; higher wins.
    pub priority: i32,
    /// Whether it may be interrupted (and can be told to).
    pub interruptible: bool,
    /// What it holds now.
    pub allocated: Resources,
    /// Memory its balloon could take from it now without hurting it, MiB.
    pub shrinkable_mib: u64,
    /// What it is predicted to need when restarted after an interruption.
    pub restart_demand: Resources,
    /// Predicted cost of interrupting it (e.g. MiB of state to save and
    /// restore); lower is better.
    pub disruption: u64,
}

/// A VM that needs resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Its id.
    pub id: String,
    /// Its priority.
    pub priority: i32,
    /// What it needs.
    pub demand: Resources,
}

/// Take `by_mib` MiB from a VM with its balloon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shrink {
    /// The VM.
    pub id: String,
    /// How much, in MiB.
    pub by_mib: u64,
}

/// Interrupt a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interruption {
    /// The VM.
    pub id: String,
    /// What the interruption releases (its allocation).
    pub frees: Resources,
    /// What to reserve for its restart.
    pub restart: Resources,
}

/// Why a request must wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DelayReason {
    /// Even interrupting every candidate and shrinking every other VM
    /// would not free enough.
    NotEnough,
    /// Enough could be freed, but the interrupted VMs could then not
    /// restart beside what stays.
    RestartWouldNotFit,
}

/// The coordinator's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum Decision {
    /// It fits now, after these shrinks (none when it simply fits).
    Admit {
        /// Balloon shrinks to apply first.
        shrink: Vec<Shrink>,
    },
    /// It fits once these VMs are interrupted, after these shrinks.
    Interrupt {
        /// Balloon shrinks to apply (before the interruptions).
        shrink: Vec<Shrink>,
        /// The VMs to interrupt.
        interrupt: Vec<Interruption>,
    },
    /// It does not fit; nothing is changed.
    Delay {
        /// What is still missing (for `RestartWouldNotFit`: the least by
        /// which a victims' restart would overflow the capacity).
        missing: Resources,
        /// Why.
        reason: DelayReason,
    },
}

/// How [`decide_with`] searches the candidate sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Every subset up to [`EXACT_LIMIT`] candidates, greedy beyond (what
    /// [`decide`] does).
    Auto,
    /// Always greedy (by priority, then disruption per MiB freed; pruned).
    Greedy,
}

/// One decision: see the module documentation.
pub fn decide(host: &HostView, vms: &[VmView], req: &Request) -> Decision {
    decide_with(host, vms, req, Search::Auto)
}

/// One decision with the given search.
pub fn decide_with(host: &HostView, vms: &[VmView], req: &Request, search: Search) -> Decision {
    let used = vms.iter().fold(host.held, |acc, v| acc.plus(v.allocated));
    let short = used.plus(req.demand).minus(host.capacity);
    if short.is_zero() {
        return Decision::Admit { shrink: Vec::new() };
    }
    let all: Vec<usize> = (0..vms.len()).collect();
    if short.vcpus == 0 && shrinkable(vms, &all) >= short.memory_mib {
        return Decision::Admit {
            shrink: shrink_plan(vms, &all, short.memory_mib),
        };
    }
    let cands: Vec<usize> = (0..vms.len())
        .filter(|&i| vms[i].interruptible && vms[i].priority < req.priority)
        .collect();
    let ctx = Ctx {
        host,
        vms,
        req,
        used,
    };
    let mut best: Option<(Vec<usize>, Key, u32)> = None;
    let mut restart_overflow: Option<Resources> = None;
    if search == Search::Auto && cands.len() <= EXACT_LIMIT {
        // Every subset, as a bit mask over the candidates. Sets that leave
        // the demand short are dropped by an O(|set|) check without
        // allocation, and supersets of the best set so far are skipped
        // (they can only be worse).
        let total_shrink = shrinkable(vms, &all);
        for mask in 1u32..(1u32 << cands.len()) {
            if best.as_ref().is_some_and(|(_, _, b)| mask & b == *b) {
                continue;
            }
            let (mut freed, mut restart, mut shrink) =
                (Resources::default(), Resources::default(), 0u64);
            let mut bits = mask;
            while bits != 0 {
                let v = &vms[cands[bits.trailing_zeros() as usize]];
                freed = freed.plus(v.allocated);
                restart = restart.plus(v.restart_demand);
                shrink = shrink.saturating_add(v.shrinkable_mib.min(v.allocated.memory_mib));
                bits &= bits - 1;
            }
            let short = used.minus(freed).plus(req.demand).minus(host.capacity);
            if short.vcpus > 0 || short.memory_mib > total_shrink.saturating_sub(shrink) {
                continue;
            }
            let later = used.minus(freed).plus(restart);
            if !later.fits(host.capacity) {
                let o = later.minus(host.capacity);
                if restart_overflow
                    .is_none_or(|r| (o.memory_mib, o.vcpus) < (r.memory_mib, r.vcpus))
                {
                    restart_overflow = Some(o);
                }
                continue;
            }
            // The key's first element (highest priority touched, its
            // disruption) is cheap: skip sets already worse on it.
            let (mut top, mut at_top) = (i32::MIN, 0u64);
            let mut bits = mask;
            while bits != 0 {
                let v = &vms[cands[bits.trailing_zeros() as usize]];
                match v.priority.cmp(&top) {
                    Ordering::Greater => (top, at_top) = (v.priority, v.disruption),
                    Ordering::Equal => at_top = at_top.saturating_add(v.disruption),
                    Ordering::Less => {}
                }
                bits &= bits - 1;
            }
            if best
                .as_ref()
                .and_then(|(_, k, _)| k.levels.first())
                .is_some_and(|&first| (top, at_top) > first)
            {
                continue;
            }
            let set: Vec<usize> = (0..cands.len())
                .filter(|b| mask & (1 << b) != 0)
                .map(|b| cands[b])
                .collect();
            let key = ctx.key(&set);
            if best
                .as_ref()
                .is_none_or(|(_, b, _)| key.cmp(b) == Ordering::Less)
            {
                best = Some((set, key, mask));
            }
        }
    } else if let Some(set) = ctx.greedy(&cands) {
        match ctx.check(&set) {
            Check::Fits => {
                let key = ctx.key(&set);
                best = Some((set, key, 0));
            }
            Check::RestartOverflow(o) => restart_overflow = Some(o),
            Check::Short => {}
        }
    } else {
        // Greedy's order found no set: say why from the largest one (all
        // candidates), and use it, pruned, when it does work.
        match ctx.check(&cands) {
            Check::Fits => {
                let set = ctx.prune(cands.clone());
                let key = ctx.key(&set);
                best = Some((set, key, 0));
            }
            Check::RestartOverflow(o) => restart_overflow = Some(o),
            Check::Short => {}
        }
    }
    match best {
        Some((set, _, _)) => {
            let freed = set
                .iter()
                .fold(Resources::default(), |a, &i| a.plus(vms[i].allocated));
            let left = used.minus(freed).plus(req.demand).minus(host.capacity);
            let rest: Vec<usize> = (0..vms.len()).filter(|i| !set.contains(i)).collect();
            Decision::Interrupt {
                shrink: shrink_plan(vms, &rest, left.memory_mib),
                interrupt: set
                    .iter()
                    .map(|&i| Interruption {
                        id: vms[i].id.clone(),
                        frees: vms[i].allocated,
                        restart: vms[i].restart_demand,
                    })
                    .collect(),
            }
        }
        None => match restart_overflow {
            Some(missing) => Decision::Delay {
                missing,
                reason: DelayReason::RestartWouldNotFit,
            },
            None => {
                let freed = cands
                    .iter()
                    .fold(Resources::default(), |a, &i| a.plus(vms[i].allocated));
                let rest: Vec<usize> = (0..vms.len()).filter(|i| !cands.contains(i)).collect();
                let mut missing = used.minus(freed).plus(req.demand).minus(host.capacity);
                missing.memory_mib = missing.memory_mib.saturating_sub(shrinkable(vms, &rest));
                Decision::Delay {
                    missing,
                    reason: DelayReason::NotEnough,
                }
            }
        },
    }
}

fn shrinkable(vms: &[VmView], among: &[usize]) -> u64 {
    among
        .iter()
        .map(|&i| vms[i].shrinkable_mib.min(vms[i].allocated.memory_mib))
        .fold(0u64, u64::saturating_add)
}

/// Shrinks covering `need` MiB from `among`: lowest priority first, then
/// the most shrinkable, then by id.
fn shrink_plan(vms: &[VmView], among: &[usize], need: u64) -> Vec<Shrink> {
    let mut order: Vec<usize> = among
        .iter()
        .copied()
        .filter(|&i| vms[i].shrinkable_mib.min(vms[i].allocated.memory_mib) > 0)
        .collect();
    order.sort_by(|&a, &b| {
        (
            vms[a].priority,
            std::cmp::Reverse(vms[a].shrinkable_mib),
            &vms[a].id,
        )
            .cmp(&(
                vms[b].priority,
                std::cmp::Reverse(vms[b].shrinkable_mib),
                &vms[b].id,
            ))
    });
    let mut left = need;
    let mut out = Vec::new();
    for i in order {
        if left == 0 {
            break;
        }
        let by = vms[i]
            .shrinkable_mib
            .min(vms[i].allocated.memory_mib)
            .min(left);
        left -= by;
        out.push(Shrink {
            id: vms[i].id.clone(),
            by_mib: by,
        });
    }
    out
}

/// How a set compares: disruption per priority level from the highest
/// level down, then size, then ids.
#[derive(Debug, PartialEq, Eq)]
struct Key {
    levels: Vec<(i32, u64)>,
    ids: Vec<String>,
}

impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        for (a, b) in self.levels.iter().zip(&o.levels) {
            // At the first difference: touching a higher level is worse;
            // at the same level, more disruption is worse.
            match a.0.cmp(&b.0).then(a.1.cmp(&b.1)) {
                Ordering::Equal => {}
                other => return other,
            }
        }
        self.levels
            .len()
            .cmp(&o.levels.len())
            .then(self.ids.len().cmp(&o.ids.len()))
            .then_with(|| self.ids.cmp(&o.ids))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

enum Check {
    Fits,
    Short,
    RestartOverflow(Resources),
}

struct Ctx<'a> {
    host: &'a HostView,
    vms: &'a [VmView],
    req: &'a Request,
    used: Resources,
}

impl Ctx<'_> {
    fn check(&self, set: &[usize]) -> Check {
        let vms = self.vms;
        let freed = set
            .iter()
            .fold(Resources::default(), |a, &i| a.plus(vms[i].allocated));
        let rest: Vec<usize> = (0..vms.len()).filter(|i| !set.contains(i)).collect();
        let short = self
            .used
            .minus(freed)
            .plus(self.req.demand)
            .minus(self.host.capacity);
        if short.vcpus > 0 || short.memory_mib > shrinkable(vms, &rest) {
            return Check::Short;
        }
        let restart = set
            .iter()
            .fold(Resources::default(), |a, &i| a.plus(vms[i].restart_demand));
        let later = self.used.minus(freed).plus(restart);
        if later.fits(self.host.capacity) {
            Check::Fits
        } else {
            Check::RestartOverflow(later.minus(self.host.capacity))
        }
    }

    fn key(&self, set: &[usize]) -> Key {
        let mut levels: BTreeMap<std::cmp::Reverse<i32>, u64> = BTreeMap::new();
        for &i in set {
            let d = levels
                .entry(std::cmp::Reverse(self.vms[i].priority))
                .or_default();
            *d = d.saturating_add(self.vms[i].disruption);
        }
        let mut ids: Vec<String> = set.iter().map(|&i| self.vms[i].id.clone()).collect();
        ids.sort();
        Key {
            levels: levels.into_iter().map(|(p, d)| (p.0, d)).collect(),
            ids,
        }
    }

    /// Adds candidates by priority, then disruption per MiB freed, until
    /// the set works; then leaves out members (highest priority and
    /// disruption first) while it still works.
    fn greedy(&self, cands: &[usize]) -> Option<Vec<usize>> {
        let vms = self.vms;
        let mut order = cands.to_vec();
        order.sort_by(|&a, &b| {
            let ra = u128::from(vms[a].disruption) * u128::from(vms[b].allocated.memory_mib.max(1));
            let rb = u128::from(vms[b].disruption) * u128::from(vms[a].allocated.memory_mib.max(1));
            vms[a]
                .priority
                .cmp(&vms[b].priority)
                .then(ra.cmp(&rb))
                .then_with(|| vms[a].id.cmp(&vms[b].id))
        });
        let mut set = Vec::new();
        for i in order {
            set.push(i);
            if matches!(self.check(&set), Check::Fits) {
                break;
            }
        }
        if !matches!(self.check(&set), Check::Fits) {
            return None;
        }
        Some(self.prune(set))
    }

    /// Drops victims (highest priority and disruption first) while the
    /// rest still fits: no victim of the result can be spared.
    fn prune(&self, mut set: Vec<usize>) -> Vec<usize> {
        let vms = self.vms;
        let mut drop_order = set.clone();
        drop_order.sort_by(|&a, &b| {
            (vms[b].priority, vms[b].disruption).cmp(&(vms[a].priority, vms[a].disruption))
        });
        for i in drop_order {
            let without: Vec<usize> = set.iter().copied().filter(|&j| j != i).collect();
            if !without.is_empty() && matches!(self.check(&without), Check::Fits) {
                set = without;
            }
        }
        set
    }
}

// ---------------------------------------------------------------------------
// The daemon's ledger.

/// How the daemon's coordinator runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// What the host may hand out to VMs.
    pub capacity: Resources,
    /// Memory a VM keeps free beyond what its balloon may take, MiB
    /// (shrinkable = guest's free memory − this).
    pub shrink_headroom_mib: u64,
    /// When a deferred VMM should ask again, ms.
    pub retry_after_ms: u64,
    /// A waiting requester that has not asked again for this long is
    /// forgotten, ms.
    pub waiting_expiry_ms: u64,
}

impl CoordinatorConfig {
    /// Defaults for a capacity: 16 MiB headroom, retry after 250 ms,
    /// forget waiting requesters after 10 s.
    pub fn new(capacity: Resources) -> Self {
        CoordinatorConfig {
            capacity,
            shrink_headroom_mib: 16,
            retry_after_ms: 250,
            waiting_expiry_ms: 10_000,
        }
    }
}

/// Where a VM is in the coordinator's state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum VmState {
    /// Admitted and running.
    Running,
    /// Told to interrupt (on its next balloon event); still holds its
    /// allocation.
    Interrupting {
        /// The request it makes room for.
        for_vm: String,
        /// Whether the order went out.
        sent: bool,
    },
    /// Interrupted; its restart reservation is held.
    Interrupted,
}

/// One VM the coordinator tracks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TrackedVm {
    /// Priority.
    pub priority: i32,
    /// Interruptible, and its VMM understands `interrupt`.
    pub interruptible: bool,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// The balloon's size as last reported, MiB.
    pub balloon_mib: u64,
    /// Whether it sends balloon events (the channel for shrinks and
    /// interrupts).
    pub polled: bool,
    /// Memory its balloon may take now, MiB.
    pub shrinkable_mib: u64,
    /// A balloon target to send on its next balloon event.
    pub shrink_to_mib: Option<u64>,
    /// Where it is.
    pub state: VmState,
    /// Reserved for its restart (set when it is chosen as a victim).
    pub restart: Option<Resources>,
}

impl TrackedVm {
    fn allocated(&self) -> Resources {
        Resources::new(self.memory_mib.saturating_sub(self.balloon_mib), self.vcpus)
    }
}

/// A requester waiting for its victims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Waiting {
    priority: i32,
    demand: Resources,
    victims: Vec<String>,
    last_ask_ms: u64,
}

/// What the daemon answers a `before-boot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Boot now with this reservation (for a restart: the pre-calculated
    /// one); shrinks were ordered if any.
    Boot {
        /// What is reserved for it.
        reserved: Resources,
        /// Whether this is the restart of an interrupted VM that got its
        /// pre-calculated reservation.
        restart: bool,
        /// The decision that admitted it.
        decision: Decision,
    },
    /// Ask again later.
    Defer {
        /// Why, for the VMM's log.
        reason: String,
        /// Memory still missing (0 while waiting for ordered interruptions).
        missing_mib: u64,
        /// The decision, when one was made now.
        decision: Option<Decision>,
    },
}

/// A `before-boot` as the coordinator needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootAsk<'a> {
    /// The VM.
    pub vm: &'a str,
    /// Its priority.
    pub priority: i32,
    /// Interruptible and told-able (its VMM announced the feature).
    pub interruptible: bool,
    /// A restart of an interrupted VM.
    pub restart: bool,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
}

/// The daemon's ledger: see the module documentation.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    vms: BTreeMap<String, TrackedVm>,
    waiting: BTreeMap<String, Waiting>,
}

impl Coordinator {
    /// An empty ledger.
    pub fn new(config: CoordinatorConfig) -> Self {
        Coordinator {
            config,
            vms: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// The VMs tracked, by id.
    pub fn vms(&self) -> &BTreeMap<String, TrackedVm> {
        &self.vms
    }

    /// Held against a request of priority `p` from `vm`: restart
    /// reservations of interrupted VMs of priority ≥ `p`, and the demand of
    /// other waiting requesters of priority ≥ `p`.
    fn held_for(&self, vm: &str, p: i32) -> Resources {
        let restarts = self
            .vms
            .iter()
            .filter(|(id, v)| {
                id.as_str() != vm && v.state == VmState::Interrupted && v.priority >= p
            })
            .filter_map(|(_, v)| v.restart)
            .fold(Resources::default(), Resources::plus);
        self.waiting
            .iter()
            .filter(|(id, w)| id.as_str() != vm && w.priority >= p)
            .fold(restarts, |a, (_, w)| a.plus(w.demand))
    }

    fn views(&self, except: &str) -> Vec<VmView> {
        self.vms
            .iter()
            .filter(|(id, v)| id.as_str() != except && v.state != VmState::Interrupted)
            .map(|(id, v)| {
                let chosen = matches!(v.state, VmState::Interrupting { .. });
                VmView {
                    id: id.clone(),
                    priority: v.priority,
                    // Already chosen for another request: not again.
                    interruptible: v.interruptible && v.polled && !chosen,
                    allocated: v.allocated(),
                    shrinkable_mib: if chosen || v.shrink_to_mib.is_some() {
                        0
                    } else {
                        v.shrinkable_mib
                    },
                    restart_demand: v.allocated(),
                    disruption: v.allocated().memory_mib,
                }
            })
            .collect()
    }

    /// Handles a `before-boot` at `now_ms`.
    pub fn before_boot(&mut self, ask: &BootAsk<'_>, now_ms: u64) -> Admitted {
        let expiry = self.config.waiting_expiry_ms;
        self.waiting
            .retain(|_, w| now_ms.saturating_sub(w.last_ask_ms) <= expiry);
        if let Some(w) = self.waiting.get_mut(ask.vm) {
            w.last_ask_ms = now_ms;
            let left: Vec<&String> = w
                .victims
                .iter()
                .filter(|v| {
                    self.vms
                        .get(v.as_str())
                        .is_some_and(|t| matches!(t.state, VmState::Interrupting { .. }))
                })
                .collect();
            if !left.is_empty() {
                return Admitted::Defer {
                    reason: format!("waiting for {} interruption(s) to finish", left.len()),
                    missing_mib: 0,
                    decision: None,
                };
            }
            self.waiting.remove(ask.vm);
        }
        let previous = self.vms.get(ask.vm).cloned();
        let reserved_restart = previous
            .as_ref()
            .filter(|v| ask.restart && v.state == VmState::Interrupted)
            .and_then(|v| v.restart);
        let demand = reserved_restart.unwrap_or(Resources::new(ask.memory_mib, ask.vcpus));
        let host = HostView {
            capacity: self.config.capacity,
            held: self.held_for(ask.vm, ask.priority),
        };
        let req = Request {
            id: ask.vm.to_string(),
            priority: ask.priority,
            demand,
        };
        let decision = decide(&host, &self.views(ask.vm), &req);
        match &decision {
            Decision::Admit { shrink } => {
                self.order_shrinks(shrink);
                // A restart keeps the balloon it was saved with: what it
                // holds is what was reserved.
                let balloon_mib = match reserved_restart {
                    Some(r) => ask.memory_mib.saturating_sub(r.memory_mib),
                    None => 0,
                };
                self.vms.insert(
                    ask.vm.to_string(),
                    TrackedVm {
                        priority: ask.priority,
                        interruptible: ask.interruptible,
                        memory_mib: ask.memory_mib,
                        vcpus: ask.vcpus,
                        balloon_mib,
                        polled: false,
                        shrinkable_mib: 0,
                        shrink_to_mib: None,
                        state: VmState::Running,
                        restart: None,
                    },
                );
                Admitted::Boot {
                    reserved: demand,
                    restart: reserved_restart.is_some(),
                    decision,
                }
            }
            Decision::Interrupt { shrink, interrupt } => {
                self.order_shrinks(shrink);
                for i in interrupt {
                    if let Some(v) = self.vms.get_mut(&i.id) {
                        v.state = VmState::Interrupting {
                            for_vm: ask.vm.to_string(),
                            sent: false,
                        };
                        v.restart = Some(i.restart);
                    }
                }
                self.waiting.insert(
                    ask.vm.to_string(),
                    Waiting {
                        priority: ask.priority,
                        demand,
                        victims: interrupt.iter().map(|i| i.id.clone()).collect(),
                        last_ask_ms: now_ms,
                    },
                );
                Admitted::Defer {
                    reason: format!(
                        "interrupting {} to make room",
                        interrupt
                            .iter()
                            .map(|i| i.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    missing_mib: 0,
                    decision: Some(decision.clone()),
                }
            }
            Decision::Delay { missing, reason } => Admitted::Defer {
                reason: match reason {
                    DelayReason::NotEnough => format!(
                        "the host cannot free enough: {} MiB and {} vCPUs missing",
                        missing.memory_mib, missing.vcpus
                    ),
                    DelayReason::RestartWouldNotFit => format!(
                        "interrupting would leave the victims unable to restart ({} MiB over)",
                        missing.memory_mib
                    ),
                },
                missing_mib: missing.memory_mib,
                decision: Some(decision.clone()),
            },
        }
    }

    fn order_shrinks(&mut self, shrink: &[Shrink]) {
        for s in shrink {
            if let Some(v) = self.vms.get_mut(&s.id) {
                v.shrink_to_mib = Some(v.balloon_mib.saturating_add(s.by_mib).min(v.memory_mib));
                v.shrinkable_mib = v.shrinkable_mib.saturating_sub(s.by_mib);
            }
        }
    }

    /// Handles a `balloon` status event: updates the VM's allocation and
    /// what it could give; returns the order for it, if one is due.
    pub fn balloon(
        &mut self,
        vm: &str,
        status: &vmm_hooks::BalloonStatus,
    ) -> Option<vmm_hooks::HookReply> {
        let headroom = self.config.shrink_headroom_mib;
        let v = self.vms.get_mut(vm)?;
        v.polled = true;
        v.memory_mib = status.memory_mib;
        v.balloon_mib = status.actual_mib;
        let free_mib = status.guest_stat("free-memory").unwrap_or(0) >> 20;
        v.shrinkable_mib = if status.driver_ok && !status.unresponsive {
            free_mib
                .saturating_sub(headroom)
                .min(status.memory_mib.saturating_sub(status.target_mib))
        } else {
            0
        };
        let interrupting_for = match &v.state {
            VmState::Interrupting { for_vm, .. } => Some(for_vm.clone()),
            _ => None,
        };
        if let Some(for_vm) = interrupting_for {
            // Shrinks go out before interruptions; until the VM is gone,
            // every poll repeats the order (a VM that failed to save runs on
            // and may try again).
            if self.vms.values().any(|o| o.shrink_to_mib.is_some()) {
                return None;
            }
            if let Some(VmState::Interrupting { sent, .. }) =
                self.vms.get_mut(vm).map(|v| &mut v.state)
            {
                *sent = true;
            }
            return Some(vmm_hooks::HookReply::Interrupt {
                reason: format!("making room for {for_vm}"),
            });
        }
        let v = self.vms.get_mut(vm)?;
        if let Some(t) = v.shrink_to_mib {
            if status.target_mib >= t {
                v.shrink_to_mib = None;
                return None;
            }
            v.shrink_to_mib = None;
            return Some(vmm_hooks::HookReply::BalloonTarget {
                target_mib: t,
                prefault_mib: 0,
            });
        }
        None
    }

    /// Handles `interrupted`: the VM released its allocation; its restart
    /// reservation is held (its last allocation when none was set).
    pub fn interrupted(&mut self, vm: &str) {
        if let Some(v) = self.vms.get_mut(vm) {
            if v.restart.is_none() {
                v.restart = Some(v.allocated());
            }
            v.state = VmState::Interrupted;
        }
    }

    /// Handles `stopped`: a VM that was being interrupted (or was) keeps its
    /// restart reservation; any other VM is forgotten.
    pub fn stopped(&mut self, vm: &str) {
        self.waiting.remove(vm);
        match self.vms.get(vm).map(|v| &v.state) {
            Some(VmState::Interrupting { .. }) => self.interrupted(vm),
            Some(VmState::Interrupted) | None => {}
            Some(VmState::Running) => {
                self.vms.remove(vm);
            }
        }
    }

    /// Admits a VM whose VMM cannot be deferred (it did not announce
    /// [`vmm_hooks::proto::FEATURE_INTERRUPT`]): it runs whatever the
    /// capacity; interruptions already ordered for it still happen.
    pub fn admit_unconditionally(&mut self, ask: &BootAsk<'_>) {
        self.waiting.remove(ask.vm);
        self.vms.insert(
            ask.vm.to_string(),
            TrackedVm {
                priority: ask.priority,
                interruptible: false,
                memory_mib: ask.memory_mib,
                vcpus: ask.vcpus,
                balloon_mib: 0,
                polled: false,
                shrinkable_mib: 0,
                shrink_to_mib: None,
                state: VmState::Running,
                restart: None,
            },
        );
    }
}

/// The daemon's adapter: adjusts the server's `reply` to `event` (from a
/// VMM that announced the interrupt feature when `peer_can_interrupt`),
/// counting what it does in `metrics`.
pub fn answer(
    coordinator: &std::sync::Mutex<Coordinator>,
    metrics: &crate::Metrics,
    event: &vmm_hooks::Event,
    peer_can_interrupt: bool,
    reply: vmm_hooks::HookReply,
    now_ms: u64,
) -> vmm_hooks::HookReply {
    use crate::Metrics;
    use vmm_hooks::{EventKind, HookReply};
    let vm = event.vm.vm_id.as_str();
    let mut c = coordinator
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match &event.kind {
        EventKind::BeforeBoot {
            vcpu_tids,
            ram,
            admission,
        } => {
            let ask = BootAsk {
                vm,
                priority: admission.priority,
                interruptible: admission.interruptible && peer_can_interrupt,
                restart: admission.restart,
                memory_mib: ram.len >> 20,
                vcpus: vcpu_tids.len() as u64,
            };
            match c.before_boot(&ask, now_ms) {
                Admitted::Boot {
                    reserved,
                    restart,
                    decision,
                } => {
                    let kind = match (&decision, restart) {
                        (_, true) => "restart-reserved",
                        (Decision::Admit { shrink }, false) if !shrink.is_empty() => {
                            "admit-after-shrink"
                        }
                        _ => "admit",
                    };
                    Metrics::inc(&metrics.interrupt_actions, kind);
                    tracing::info!(
                        vm,
                        priority = ask.priority,
                        reserved_mib = reserved.memory_mib,
                        restart,
                        "admitted: {}",
                        serde_json::to_string(&decision).unwrap_or_default()
                    );
                    reply
                }
                Admitted::Defer {
                    reason,
                    missing_mib,
                    decision,
                } => {
                    let kind = match &decision {
                        Some(Decision::Interrupt { .. }) => "interrupt-ordered",
                        _ => "defer",
                    };
                    Metrics::inc(&metrics.interrupt_actions, kind);
                    if let Some(d) = &decision {
                        tracing::info!(
                            vm,
                            priority = ask.priority,
                            "{reason}: {}",
                            serde_json::to_string(d).unwrap_or_default()
                        );
                    }
                    if peer_can_interrupt {
                        HookReply::Defer {
                            reason,
                            retry_after_ms: c.config.retry_after_ms,
                            missing_mib,
                        }
                    } else {
                        tracing::warn!(
                            vm,
                            "the host is over capacity for this VM ({reason}), but its VMM cannot be deferred; admitted"
                        );
                        c.admit_unconditionally(&ask);
                        reply
                    }
                }
            }
        }
        EventKind::Balloon(status) => match c.balloon(vm, status) {
            Some(order) => {
                let kind = match order {
                    HookReply::Interrupt { .. } => "interrupt-sent",
                    _ => "shrink-sent",
                };
                Metrics::inc(&metrics.interrupt_actions, kind);
                tracing::info!(vm, "coordinator order: {order:?}");
                order
            }
            None => reply,
        },
        EventKind::Interrupted { reason } => {
            Metrics::inc(&metrics.interrupt_actions, "interrupted");
            tracing::info!(
                vm,
                reason,
                "VM interrupted; its restart reservation is held"
            );
            c.interrupted(vm);
            reply
        }
        EventKind::Stopped { .. } => {
            c.stopped(vm);
            reply
        }
        _ => reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vm(id: &str, priority: i32, interruptible: bool, mem: u64, shrinkable: u64) -> VmView {
        VmView {
            id: id.into(),
            priority,
            interruptible,
            allocated: Resources::new(mem, 1),
            shrinkable_mib: shrinkable,
            restart_demand: Resources::new(mem, 1),
            disruption: mem,
        }
    }

    fn host(mem: u64) -> HostView {
        HostView {
            capacity: Resources::new(mem, 64),
            held: Resources::default(),
        }
    }

    fn req(priority: i32, mem: u64) -> Request {
        Request {
            id: "new".into(),
            priority,
            demand: Resources::new(mem, 1),
        }
    }

    #[test]
    fn fitting_request_is_admitted_without_shrinking() {
        let d = decide(&host(300), &[vm("a", 0, true, 100, 50)], &req(1, 100));
        assert_eq!(d, Decision::Admit { shrink: vec![] });
    }

    #[test]
    fn shrink_alone_is_preferred_to_an_interruption() {
        let vms = [vm("a", 0, true, 100, 30), vm("b", 0, false, 100, 30)];
        let d = decide(&host(250), &vms, &req(5, 90));
        let Decision::Admit { shrink } = d else {
            panic!("{d:?}")
        };
        assert_eq!(shrink.iter().map(|s| s.by_mib).sum::<u64>(), 40);
    }

    #[test]
    fn three_vms_capacity_for_two_interrupts_the_low_priority_one() {
        // The end-to-end scenario: low (interruptible) and mid (not) run;
        // high arrives; mid can give 16 MiB.
        let vms = [vm("low", 0, true, 96, 0), vm("mid", 1, false, 96, 16)];
        let d = decide(&host(224), &vms, &req(10, 96));
        let Decision::Interrupt { shrink, interrupt } = d else {
            panic!("{d:?}")
        };
        assert_eq!(interrupt.len(), 1);
        assert_eq!(interrupt[0].id, "low");
        assert_eq!(interrupt[0].restart, Resources::new(96, 1));
        assert!(shrink.is_empty(), "{shrink:?}");
    }

    #[test]
    fn equal_priority_prefers_least_disruption_and_lower_priority_first() {
        let vms = [
            vm("big", 0, true, 200, 0),
            vm("small", 0, true, 100, 0),
            vm("higher", 3, true, 100, 0),
        ];
        let d = decide(&host(400), &vms, &req(5, 90));
        let Decision::Interrupt { interrupt, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            interrupt.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["small"]
        );
    }

    #[test]
    fn not_enough_is_a_delay_with_the_missing_amount() {
        let vms = [vm("a", 0, true, 100, 0), vm("b", 9, true, 100, 10)];
        let d = decide(&host(200), &vms, &req(5, 150));
        assert_eq!(
            d,
            Decision::Delay {
                missing: Resources::new(40, 0),
                reason: DelayReason::NotEnough
            }
        );
    }

    #[test]
    fn victims_that_could_not_restart_later_are_not_interrupted() {
        // Interrupting `a` frees enough now, but its restart (200 MiB,
        // more than it holds) would not fit beside `b` later.
        let mut a = vm("a", 0, true, 100, 0);
        a.restart_demand = Resources::new(200, 1);
        let vms = [a, vm("b", 5, false, 100, 0)];
        let d = decide(&host(250), &vms, &req(9, 100));
        assert_eq!(
            d,
            Decision::Delay {
                missing: Resources::new(50, 0),
                reason: DelayReason::RestartWouldNotFit
            }
        );
    }

    fn status(memory: u64, target: u64, actual: u64, free_mib: u64) -> vmm_hooks::BalloonStatus {
        let mut s = vmm_hooks::BalloonStatus::new(memory);
        s.target_mib = target;
        s.actual_mib = actual;
        s.driver_ok = true;
        s.guest_stats = vec![("free-memory".into(), free_mib << 20)];
        s
    }

    fn ask(vm: &str, priority: i32, interruptible: bool, restart: bool) -> BootAsk<'_> {
        BootAsk {
            vm,
            priority,
            interruptible,
            restart,
            memory_mib: 96,
            vcpus: 1,
        }
    }

    #[test]
    fn coordinator_walks_the_state_machine() {
        use vmm_hooks::HookReply;
        let mut c = Coordinator::new(CoordinatorConfig::new(Resources::new(224, 8)));
        assert!(matches!(
            c.before_boot(&ask("low", 0, true, false), 0),
            Admitted::Boot { restart: false, .. }
        ));
        assert!(matches!(
            c.before_boot(&ask("mid", 1, false, false), 0),
            Admitted::Boot { .. }
        ));
        assert_eq!(c.balloon("low", &status(96, 0, 0, 10)), None);
        assert_eq!(c.balloon("mid", &status(96, 0, 0, 40)), None);
        // high does not fit: mid shrinks 24 MiB (40 - 16), low is interrupted.
        let a = c.before_boot(&ask("high", 9, false, false), 100);
        let Admitted::Defer {
            decision: Some(Decision::Interrupt { .. }),
            ..
        } = a
        else {
            panic!("{a:?}")
        };
        // Asking again before the victim is gone: still waiting.
        assert!(matches!(
            c.before_boot(&ask("high", 9, false, false), 200),
            Admitted::Defer { decision: None, .. }
        ));
        assert!(matches!(
            c.balloon("low", &status(96, 0, 0, 10)),
            Some(HookReply::Interrupt { .. })
        ));
        // A fourth VM of low priority cannot take the room meanwhile.
        assert!(matches!(
            c.before_boot(&ask("other", 0, false, false), 250),
            Admitted::Defer { .. }
        ));
        c.interrupted("low");
        c.stopped("low");
        let a = c.before_boot(&ask("high", 9, false, false), 300);
        assert!(matches!(a, Admitted::Boot { restart: false, .. }), "{a:?}");
        // low's restart waits while high runs, then gets its reservation.
        assert!(matches!(
            c.before_boot(&ask("low", 0, true, true), 400),
            Admitted::Defer { .. }
        ));
        c.stopped("high");
        let a = c.before_boot(&ask("low", 0, true, true), 500);
        assert_eq!(
            a,
            Admitted::Boot {
                reserved: Resources::new(96, 1),
                restart: true,
                decision: Decision::Admit { shrink: vec![] }
            }
        );
        assert_eq!(c.vms()["low"].state, VmState::Running);
    }

    #[test]
    fn shrink_order_reaches_the_vm_once() {
        use vmm_hooks::HookReply;
        let mut c = Coordinator::new(CoordinatorConfig::new(Resources::new(200, 8)));
        c.before_boot(&ask("a", 0, false, false), 0);
        c.balloon("a", &status(96, 0, 0, 60));
        // 96 + 96 > 200 by -8: fits. Third asks 40 MiB more than free.
        let mut b = ask("b", 1, false, false);
        b.memory_mib = 130;
        let r = c.before_boot(&b, 0);
        assert!(matches!(r, Admitted::Boot { .. }), "{r:?}");
        assert_eq!(
            c.balloon("a", &status(96, 0, 0, 60)),
            Some(HookReply::BalloonTarget {
                target_mib: 26,
                prefault_mib: 0
            })
        );
        assert_eq!(c.balloon("a", &status(96, 26, 26, 34)), None);
    }

    #[test]
    fn waiting_requester_that_never_returns_is_forgotten() {
        let mut c = Coordinator::new(CoordinatorConfig::new(Resources::new(200, 8)));
        c.before_boot(&ask("low", 0, true, false), 0);
        c.balloon("low", &status(96, 0, 0, 0));
        c.before_boot(&ask("low2", 0, true, false), 0);
        c.balloon("low2", &status(96, 0, 0, 0));
        let a = c.before_boot(&ask("high", 9, false, false), 0);
        assert!(matches!(
            a,
            Admitted::Defer {
                decision: Some(_),
                ..
            }
        ));
        // high never asks again; the victim is gone; after the expiry a
        // low-priority VM may use the room.
        c.interrupted("low");
        let a = c.before_boot(&ask("late", 0, false, false), 20_000);
        assert!(
            matches!(a, Admitted::Defer { .. }),
            "restart reservation of low holds: {a:?}"
        );
        let a = c.before_boot(&ask("late", 1, false, false), 20_000);
        assert!(matches!(a, Admitted::Boot { .. }), "{a:?}");
    }

    /// One step of a random event sequence against the coordinator.
    #[derive(Clone, Debug)]
    enum Step {
        Boot {
            vm: usize,
            priority: i32,
            interruptible: bool,
            restart: bool,
            mem: u64,
        },
        Poll {
            vm: usize,
            free_mib: u64,
        },
        Interrupted {
            vm: usize,
        },
        Stopped {
            vm: usize,
        },
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                0usize..5,
                -1i32..3,
                any::<bool>(),
                any::<bool>(),
                16u64..160
            )
                .prop_map(|(vm, priority, interruptible, restart, mem)| Step::Boot {
                    vm,
                    priority,
                    interruptible,
                    restart,
                    mem: mem & !1
                }),
            (0usize..5, 0u64..64).prop_map(|(vm, free_mib)| Step::Poll { vm, free_mib }),
            (0usize..5).prop_map(|vm| Step::Interrupted { vm }),
            (0usize..5).prop_map(|vm| Step::Stopped { vm }),
        ]
    }

    // ---- properties ----------------------------------------------------

    fn arb_vm(i: usize) -> impl Strategy<Value = VmView> {
        (
            -2i32..4,
            any::<bool>(),
            1u64..200,
            0u64..60,
            1u64..4,
            0u64..250,
            0u64..100,
        )
            .prop_map(move |(p, intr, mem, shrink, vcpus, restart, disr)| VmView {
                id: format!("vm{i:02}"),
                priority: p,
                interruptible: intr,
                allocated: Resources::new(mem, vcpus),
                shrinkable_mib: shrink.min(mem),
                restart_demand: Resources::new(restart, vcpus),
                disruption: disr,
            })
    }

    fn arb_case(max: usize) -> impl Strategy<Value = (HostView, Vec<VmView>, Request)> {
        (0..=max)
            .prop_flat_map(|n| (0..n).map(arb_vm).collect::<Vec<_>>())
            .prop_flat_map(|vms| {
                (
                    Just(vms),
                    100u64..900,
                    4u64..24,
                    0u64..100,
                    -1i32..5,
                    1u64..400,
                    1u64..4,
                )
            })
            .prop_map(|(vms, cap, cpus, held, p, mem, vc)| {
                (
                    HostView {
                        capacity: Resources::new(cap, cpus),
                        held: Resources::new(held, 0),
                    },
                    vms,
                    Request {
                        id: "req".into(),
                        priority: p,
                        demand: Resources::new(mem, vc),
                    },
                )
            })
    }

    fn used(h: &HostView, vms: &[VmView]) -> Resources {
        vms.iter().fold(h.held, |a, v| a.plus(v.allocated))
    }

    /// Checks a decision's own promises; returns the interrupted ids.
    fn check_promises(h: &HostView, vms: &[VmView], r: &Request, d: &Decision) -> Vec<String> {
        let by_id = |id: &str| vms.iter().find(|v| v.id == id).unwrap();
        let (shrink, interrupt): (&[Shrink], &[Interruption]) = match d {
            Decision::Admit { shrink } => (shrink, &[]),
            Decision::Interrupt { shrink, interrupt } => (shrink, interrupt),
            Decision::Delay { missing, .. } => {
                assert!(!missing.is_zero(), "a delay names what is missing");
                return Vec::new();
            }
        };
        let victims: Vec<String> = interrupt.iter().map(|i| i.id.clone()).collect();
        for i in interrupt {
            let v = by_id(&i.id);
            assert!(v.interruptible, "non-interruptible {} interrupted", v.id);
            assert!(v.priority < r.priority, "{} not of lower priority", v.id);
            assert_eq!(i.frees, v.allocated);
            assert_eq!(i.restart, v.restart_demand, "restart plan reserved");
        }
        let mut shrunk = 0u64;
        for s in shrink {
            let v = by_id(&s.id);
            assert!(!victims.contains(&s.id), "a victim is not shrunk");
            assert!(s.by_mib > 0 && s.by_mib <= v.shrinkable_mib.min(v.allocated.memory_mib));
            shrunk += s.by_mib;
        }
        let freed = interrupt
            .iter()
            .fold(Resources::default(), |a, i| a.plus(i.frees));
        let mut now = used(h, vms).minus(freed).plus(r.demand);
        now.memory_mib -= shrunk.min(now.memory_mib);
        assert!(
            now.fits(h.capacity),
            "does not fit after the decision: {d:?}"
        );
        let restart = interrupt
            .iter()
            .fold(Resources::default(), |a, i| a.plus(i.restart));
        assert!(
            interrupt.is_empty() || used(h, vms).minus(freed).plus(restart).fits(h.capacity),
            "victims' restart does not fit later"
        );
        victims
    }

    /// Independent brute force: every subset of candidates, recursively.
    fn subsets(c: &[usize]) -> Vec<Vec<usize>> {
        match c.split_first() {
            None => vec![vec![]],
            Some((&x, rest)) => {
                let mut out = subsets(rest);
                let with: Vec<Vec<usize>> = out
                    .iter()
                    .map(|s| {
                        let mut s = s.clone();
                        s.push(x);
                        s
                    })
                    .collect();
                out.extend(with);
                out
            }
        }
    }

    fn works(h: &HostView, vms: &[VmView], r: &Request, set: &[usize]) -> bool {
        let freed = set
            .iter()
            .fold(Resources::default(), |a, &i| a.plus(vms[i].allocated));
        let shrink: u64 = (0..vms.len())
            .filter(|i| !set.contains(i))
            .map(|i| vms[i].shrinkable_mib.min(vms[i].allocated.memory_mib))
            .sum();
        let mut now = used(h, vms).minus(freed).plus(r.demand);
        now.memory_mib = now.memory_mib.saturating_sub(shrink);
        let restart = set
            .iter()
            .fold(Resources::default(), |a, &i| a.plus(vms[i].restart_demand));
        now.fits(h.capacity) && used(h, vms).minus(freed).plus(restart).fits(h.capacity)
    }

    /// Highest priority touched, then disruption at that level, and so on.
    fn brute_cost(vms: &[VmView], set: &[usize]) -> Vec<(i32, u64)> {
        let mut levels: BTreeMap<std::cmp::Reverse<i32>, u64> = BTreeMap::new();
        for &i in set {
            *levels
                .entry(std::cmp::Reverse(vms[i].priority))
                .or_default() += vms[i].disruption;
        }
        levels.into_iter().map(|(p, d)| (p.0, d)).collect()
    }

    fn cost_le(a: &[(i32, u64)], b: &[(i32, u64)]) -> bool {
        for (x, y) in a.iter().zip(b) {
            if x != y {
                return x < y;
            }
        }
        a.len() <= b.len()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decisions_keep_their_promises((h, vms, r) in arb_case(9)) {
            let d = decide(&h, &vms, &r);
            check_promises(&h, &vms, &r, &d);
        }

        #[test]
        fn shrink_is_applied_before_any_interruption((h, vms, r) in arb_case(9)) {
            let d = decide(&h, &vms, &r);
            let short = used(&h, &vms).plus(r.demand).minus(h.capacity);
            let all_shrink: u64 = vms.iter().map(|v| v.shrinkable_mib.min(v.allocated.memory_mib)).sum();
            if short.vcpus == 0 && short.memory_mib <= all_shrink {
                prop_assert!(matches!(d, Decision::Admit { .. }), "{d:?}");
            }
            if let Decision::Interrupt { interrupt, .. } = &d {
                // Minimal: no victim can be spared (the others shrink instead).
                let idx: Vec<usize> = interrupt
                    .iter()
                    .map(|i| vms.iter().position(|v| v.id == i.id).unwrap())
                    .collect();
                for (k, victim) in interrupt.iter().enumerate() {
                    let fewer: Vec<usize> = idx.iter().enumerate().filter(|&(j, _)| j != k).map(|(_, &i)| i).collect();
                    prop_assert!(fewer.is_empty() || !works(&h, &vms, &r, &fewer),
                        "victim {} could be spared", victim.id);
                }
            }
        }

        #[test]
        fn choice_is_optimal_and_delay_only_when_nothing_works((h, vms, r) in arb_case(9)) {
            let d = decide(&h, &vms, &r);
            let short = used(&h, &vms).plus(r.demand).minus(h.capacity);
            let all_shrink: u64 = vms.iter().map(|v| v.shrinkable_mib.min(v.allocated.memory_mib)).sum();
            if short.vcpus == 0 && short.memory_mib <= all_shrink {
                return Ok(());
            }
            let cands: Vec<usize> = (0..vms.len())
                .filter(|&i| vms[i].interruptible && vms[i].priority < r.priority)
                .collect();
            let working: Vec<Vec<usize>> = subsets(&cands)
                .into_iter()
                .filter(|s| !s.is_empty() && works(&h, &vms, &r, s))
                .collect();
            match &d {
                Decision::Delay { .. } => prop_assert!(working.is_empty(), "delayed but {working:?} works"),
                Decision::Interrupt { interrupt, .. } => {
                    let chosen: Vec<usize> = interrupt
                        .iter()
                        .map(|i| vms.iter().position(|v| v.id == i.id).unwrap())
                        .collect();
                    let c = brute_cost(&vms, &chosen);
                    for s in &working {
                        prop_assert!(cost_le(&c, &brute_cost(&vms, s)),
                            "chose {chosen:?} ({c:?}) over {s:?} ({:?})", brute_cost(&vms, s));
                    }
                }
                Decision::Admit { .. } => prop_assert!(false, "admitted while short: {d:?}"),
            }
        }

        // Random event sequences: the ledger never panics; an interrupt
        // order only reaches an interruptible VM whose VMM can be told,
        // chosen for a requester of higher priority; a restart that boots
        // gets exactly the reservation held for it.
        #[test]
        fn coordinator_orders_only_lower_priority_interruptible_vms(
            steps in proptest::collection::vec(arb_step(), 1..60)
        ) {
            use vmm_hooks::HookReply;
            let mut c = Coordinator::new(CoordinatorConfig::new(Resources::new(256, 64)));
            // Victim → (requester, its priority when it chose the victim).
            let mut ordered_by: BTreeMap<String, (String, i32)> = BTreeMap::new();
            for (t, step) in steps.into_iter().enumerate() {
                let now = t as u64 * 100;
                match step {
                    Step::Boot { vm, priority, interruptible, restart, mem } => {
                        let id = format!("vm{vm}");
                        let held = c.vms().get(&id).filter(|v| v.state == VmState::Interrupted).and_then(|v| v.restart);
                        let ask = BootAsk { vm: &id, priority, interruptible, restart, memory_mib: mem, vcpus: 1 };
                        let a = c.before_boot(&ask, now);
                        if let Admitted::Defer { decision: Some(Decision::Interrupt { interrupt, .. }), .. } = &a {
                            for i in interrupt {
                                ordered_by.insert(i.id.clone(), (id.clone(), priority));
                            }
                        }
                        if let Admitted::Boot { reserved, restart: r, .. } = a {
                            prop_assert_eq!(r, restart && held.is_some());
                            if r {
                                prop_assert_eq!(Some(reserved), held);
                            }
                            prop_assert_eq!(&c.vms()[&id].state, &VmState::Running);
                        }
                    }
                    Step::Poll { vm, free_mib } => {
                        let id = format!("vm{vm}");
                        let memory = c.vms().get(&id).map_or(64, |v| v.memory_mib);
                        let before = c.vms().get(&id).cloned();
                        let order = c.balloon(&id, &status(memory, 0, 0, free_mib));
                        if let Some(HookReply::Interrupt { reason }) = order {
                            let v = before.unwrap();
                            prop_assert!(v.interruptible);
                            let VmState::Interrupting { for_vm, .. } = &v.state else {
                                panic!("interrupt sent to a VM in state {:?}", v.state);
                            };
                            let (requester, p) = &ordered_by[&id];
                            prop_assert_eq!(requester, for_vm);
                            prop_assert!(reason.contains(for_vm.as_str()));
                            prop_assert!(*p > v.priority);
                        }
                    }
                    Step::Interrupted { vm } => c.interrupted(&format!("vm{vm}")),
                    Step::Stopped { vm } => c.stopped(&format!("vm{vm}")),
                }
            }
        }

        #[test]
        fn greedy_choice_beyond_the_exact_limit_works_and_is_minimal((h, vms, r) in arb_case(24)) {
            let d = decide(&h, &vms, &r);
            let victims = check_promises(&h, &vms, &r, &d);
            if !victims.is_empty() {
                let idx: Vec<usize> = victims
                    .iter()
                    .map(|id| vms.iter().position(|v| &v.id == id).unwrap())
                    .collect();
                for k in 0..idx.len() {
                    let fewer: Vec<usize> = idx.iter().enumerate().filter(|&(j, _)| j != k).map(|(_, &i)| i).collect();
                    prop_assert!(fewer.is_empty() || !works(&h, &vms, &r, &fewer));
                }
            }
        }
    }
}
