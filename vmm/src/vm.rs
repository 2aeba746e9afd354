//! Building a lab VM on KVM and running it: one thread per vCPU, a
//! controller that watches the lab device's signals, the ready deadline and
//! stop requests, and kicks the vCPUs out of `KVM_RUN` when the VM ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::Killable;

use balloon::HostMapping;
use vmm_hooks::{BootPlan, BootReport, GuestRange, PrefaultMode};

use crate::VmmError;
use crate::boot::{self, Applied, Profiler};
use crate::devices::{BalloonConfig, Devices};
use crate::guest::{self, GuestSetup, ProgramHeader};
use crate::labdev::{self, LabWrite};
use crate::layout::{self, gdt};
use crate::sys;
use crate::workload::{Workload, WorkloadPlan};

/// What to run.
#[derive(Clone, Debug)]
pub struct LabVmConfig {
    /// Number of vCPUs (1 to [`crate::MAX_VCPUS`]).
    pub vcpus: u32,
    /// Guest RAM in MiB ([`crate::MIN_RAM_MIB`] to [`crate::MAX_RAM_MIB`]).
    pub ram_mib: u64,
    /// What the guest does.
    pub workload: Workload,
    /// How long the guest may take to signal ready, from the start request.
    pub ready_deadline: Duration,
    /// For workloads that run until stopped: how long to run after ready
    /// (`None`: until a stop request).
    pub run_for: Option<Duration>,
    /// Value mixed into what the guest writes into each touched page.
    pub stamp: u64,
    /// A virtio-balloon device at [`crate::BALLOON_MMIO_BASE`] (`None`: no balloon).
    pub balloon: Option<BalloonConfig>,
    /// A plan to apply instead of the one the observer returns (e.g. read
    /// from a file); the observer is still told about the boot.
    pub plan: Option<BootPlan>,
    /// Pre-warmed instance: apply the plan before the start request, so
    /// time to ready counts from after it.
    pub prewarm: bool,
}

impl LabVmConfig {
    /// A configuration with the defaults: 1 vCPU, 30 s ready deadline.
    pub fn new(ram_mib: u64, workload: Workload) -> Self {
        LabVmConfig {
            vcpus: 1,
            ram_mib,
            workload,
            ready_deadline: Duration::from_secs(30),
            run_for: None,
            stamp: 0x5EED_0000_0000_0000,
            balloon: None,
            plan: None,
            prewarm: false,
        }
    }

    fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "{} vCPUs requested; labvm supports 1 to {}",
                self.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if self.ram_mib < layout::MIN_RAM_MIB || self.ram_mib > layout::MAX_RAM_MIB {
            return Err(VmmError::Config(format!(
                "{} MiB of RAM requested; labvm supports {} to {} MiB",
                self.ram_mib,
                layout::MIN_RAM_MIB,
                layout::MAX_RAM_MIB
            )));
        }
        if !self.ram_mib.is_multiple_of(2) {
            return Err(VmmError::Config(format!(
                "{} MiB of RAM is not a multiple of 2 MiB",
                self.ram_mib
            )));
        }
        if matches!(self.workload, Workload::Balloon { .. }) && self.balloon.is_none() {
            return Err(VmmError::Config(
                "the balloon workload needs a balloon device (--balloon)".into(),
            ));
        }
        Ok(())
    }
}

/// Why a VM that ran without error ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The guest wrote this exit status.
    Exited(u64),
    /// The host stopped it (run time over, or a stop request).
    Stopped,
}

/// What a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// The workload's name.
    pub workload: String,
    /// How the VM ended.
    pub stop: StopReason,
    /// Start request to the guest's ready signal.
    #[serde(with = "duration_ms")]
    pub time_to_ready: Option<Duration>,
    /// Start request to the end of the run.
    #[serde(with = "duration_ms_req")]
    pub wall: Duration,
    /// Kernel thread id of each vCPU thread.
    pub vcpu_tids: Vec<i32>,
    /// Last progress value (pages touched) each vCPU reported.
    pub progress: Vec<u64>,
    /// Strings the guest logged.
    pub log: Vec<String>,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// The long-running workload's counter at the end (read from guest memory).
    pub counter: Option<u64>,
    /// What the bootstrap did (measured at ready), with its profile and
    /// pre-fault outcome.
    pub boot: Option<BootReport>,
}

mod duration_ms {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64() * 1e3),
            None => s.serialize_none(),
        }
    }
}

mod duration_ms_req {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}

/// Callbacks from a run, made on the controller thread.
pub trait RunObserver {
    /// The vCPU threads exist (ids given) and wait to start; guest memory is
    /// loaded. Returns the plan to apply before the guest runs (pinning
    /// threads, if any, happens here too).
    fn before_boot(&mut self, _vm: &LabVm, _vcpu_tids: &[i32]) -> BootPlan {
        BootPlan::empty()
    }
    /// The guest signalled ready, `elapsed` after the start request; `report`
    /// says what the bootstrap did.
    fn ready(&mut self, _elapsed: Duration, _report: &BootReport) {}
    /// Called about every 100 ms while the VM runs; return true to stop it.
    fn should_stop(&mut self) -> bool {
        false
    }
    /// How long [`before_boot`](Self::before_boot) waited for the
    /// companion to admit the VM (it deferred it); the ready deadline and
    /// time to ready count from after that wait.
    fn admission_wait(&self) -> Duration {
        Duration::ZERO
    }
    /// Called after `should_stop`, with a handle that pauses and resumes
    /// the vCPUs and reads their state (live migration); return true to
    /// stop the VM.
    fn tick(&mut self, _vm: &LabVm, _vcpus: &VcpuControl<'_>) -> bool {
        false
    }
    /// The companion asked to live-migrate this VM: the order, once (a
    /// [`crate::MigrationSource`] made with
    /// [`on_request`](crate::MigrationSource::on_request) asks on every tick).
    fn take_migration_order(&mut self) -> Option<crate::migrate::MigrationOrder> {
        None
    }
    /// A live migration of this VM reached `phase` (to `to`; with its
    /// outcome once it ended).
    fn migration_phase(
        &mut self,
        _phase: vmm_hooks::MigratePhase,
        _to: &str,
        _outcome: Option<vmm_hooks::MigrateOutcome>,
    ) {
    }
}

/// One vCPU's architectural state, as migration moves it.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// Format version of this record.
    pub version: u32,
    /// General-purpose registers.
    pub regs: kvm_bindings::kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_bindings::kvm_sregs,
    /// The guest's time-stamp counter (IA32_TSC), so TSC-paced guest code
    /// carries on where it was.
    pub tsc: u64,
}

/// The lab device's state, as migration moves it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct LabDeviceState {
    /// Format version of this record.
    pub version: u32,
    /// Whether each vCPU is parked on the lab device.
    pub parked: Vec<bool>,
    /// Last progress value of each vCPU.
    pub progress: Vec<u64>,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Strings the guest logged.
    pub log: Vec<String>,
}

/// Version of [`VcpuState`] and [`LabDeviceState`] written here.
pub const STATE_VERSION: u32 = 1;

const MSR_IA32_TSC: u32 = 0x10;

impl VcpuState {
    fn read(vcpu: &VcpuFd) -> Result<Self, VmmError> {
        let kvm = |op| move |source| VmmError::Kvm { op, source };
        let regs = vcpu.get_regs().map_err(kvm("get regs"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("get TSC"))?;
        let tsc = match msrs.as_slice().first() {
            Some(e) if n == 1 => e.data,
            _ => return Err(VmmError::Config("KVM did not return IA32_TSC".into())),
        };
        Ok(VcpuState {
            version: STATE_VERSION,
            regs,
            sregs,
            tsc,
        })
    }

    fn write(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        let kvm = |op| move |source| VmmError::Kvm { op, source };
        if self.version != STATE_VERSION {
            return Err(VmmError::Config(format!(
                "vCPU state version {} (this labvm reads {STATE_VERSION})",
                self.version
            )));
        }
        vcpu.set_sregs(&self.sregs).map_err(kvm("set sregs"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("set regs"))?;
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: self.tsc,
            ..Default::default()
        }])
        .map_err(|e| VmmError::Config(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("set TSC"))?;
        if n != 1 {
            return Err(VmmError::Config("KVM did not accept IA32_TSC".into()));
        }
        Ok(())
    }
}

/// Pauses and resumes a running VM's vCPUs from the controller (given to
/// [`RunObserver::tick`]).
#[derive(Debug)]
pub struct VcpuControl<'a> {
    shared: &'a Shared,
    threads: &'a [JoinHandle<()>],
}

impl VcpuControl<'_> {
    /// True once the guest signalled ready.
    pub fn ready(&self) -> bool {
        lock(&self.shared.state).ready_at.is_some()
    }

    /// Heartbeats received so far.
    pub fn heartbeats(&self) -> u64 {
        lock(&self.shared.state).heartbeats
    }

    /// Stops every vCPU outside `KVM_RUN` and returns their states, in
    /// vCPU order. The vCPUs stay paused until [`resume`](Self::resume).
    pub fn pause(&self, timeout: Duration) -> Result<Vec<VcpuState>, VmmError> {
        let n = self.threads.len();
        self.shared.pause.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        let deadline = Instant::now() + timeout;
        let mut kicked: Option<Instant> = None;
        let mut st = lock(&self.shared.state);
        loop {
            if st.snapshots.iter().filter(|s| s.is_some()).count() == n {
                let mut out = Vec::with_capacity(n);
                for (i, s) in st.snapshots.iter().enumerate() {
                    match s {
                        Some(Ok(v)) => out.push(v.clone()),
                        Some(Err(e)) => {
                            return Err(VmmError::Config(format!("reading vCPU {i}'s state: {e}")));
                        }
                        None => {}
                    }
                }
                return Ok(out);
            }
            if st.outcome.is_some() || st.finished > 0 {
                return Err(VmmError::Config("the VM ended while pausing".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmmError::Config(format!(
                    "vCPUs did not pause within {timeout:?}"
                )));
            }
            // Kick at once, then again every millisecond: a kick can land
            // between a thread's flag check and KVM_RUN.
            if kicked.is_none_or(|k| now.duration_since(k) >= Duration::from_millis(1)) {
                for t in self.threads.iter().filter(|t| !t.is_finished()) {
                    if let Err(e) = t.kill(sys::kick_signal()) {
                        tracing::debug!("kicking a vCPU thread: {e}");
                    }
                }
                kicked = Some(now);
            }
            // Each vCPU notifies once it saved its state.
            st = self
                .shared
                .cv
                .wait_timeout(st, Duration::from_micros(250))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut st = lock(&self.shared.state);
        self.shared.pause.store(false, Ordering::SeqCst);
        st.snapshots.iter_mut().for_each(|s| *s = None);
        drop(st);
        self.shared.cv.notify_all();
    }

    /// The lab device's state (consistent while the vCPUs are paused).
    pub fn device_state(&self) -> LabDeviceState {
        let st = lock(&self.shared.state);
        LabDeviceState {
            version: STATE_VERSION,
            parked: st.parked.clone(),
            progress: st.progress.clone(),
            heartbeats: st.heartbeats,
            log: st.log.clone(),
        }
    }
}

/// A lab VM that has been created and loaded but not started.
#[derive(Debug)]
pub struct LabVm {
    config: LabVmConfig,
    _kvm: Kvm,
    vm: VmFd,
    mem: Arc<GuestMemoryMmap>,
    vcpus: Vec<VcpuFd>,
    plan: WorkloadPlan,
    started: Instant,
    devices: Arc<Devices>,
    host: u64,
    /// Set on a migration destination: the guest is past ready and its
    /// lab device continues from here.
    resumed: Option<LabDeviceState>,
    /// Threads created ahead of [`run`](Self::run) to become the vCPU
    /// threads (see [`prespawn_vcpu_threads`](Self::prespawn_vcpu_threads)).
    prespawned: Vec<Prespawned>,
}

/// A thread waiting for the vCPU loop it is to run.
#[derive(Debug)]
struct Prespawned {
    handle: JoinHandle<()>,
    job: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
    /// Its kernel thread id, known before it runs the loop.
    tid: i32,
}

/// Memory slot of guest RAM.
const RAM_SLOT: u32 = 0;

impl LabVm {
    /// Creates the VM, its memory and vCPUs and loads the lab guest.
    /// `started` is the start request: time to ready counts from it.
    pub fn create(config: LabVmConfig, started: Instant) -> Result<Self, VmmError> {
        Self::build(config, started, true)
    }

    /// Creates a VM to receive a migrating guest: memory stays zeroed and
    /// registers unset until the migration fills them in (see
    /// [`restore`](Self::restore)).
    pub fn create_incoming(config: LabVmConfig) -> Result<Self, VmmError> {
        Self::build(config, Instant::now(), false)
    }

    /// Loads migrated vCPU and lab-device state into a VM from
    /// [`create_incoming`](Self::create_incoming); it then runs from there.
    pub fn restore(&mut self, vcpus: &[VcpuState], device: LabDeviceState) -> Result<(), VmmError> {
        let n = self.vcpus.len();
        if vcpus.len() != n || device.parked.len() != n || device.progress.len() != n {
            return Err(VmmError::Config(format!(
                "migrated state for {} vCPUs ({} in the device state) does not fit this VM's {n}",
                vcpus.len(),
                device.parked.len()
            )));
        }
        if device.version != STATE_VERSION {
            return Err(VmmError::Config(format!(
                "device state version {} (this labvm reads {STATE_VERSION})",
                device.version
            )));
        }
        for (vcpu, state) in self.vcpus.iter().zip(vcpus) {
            state.write(vcpu)?;
        }
        self.resumed = Some(device);
        Ok(())
    }

    /// Replaces the balloon of a VM from
    /// [`create_incoming`](Self::create_incoming) with one rebuilt from a
    /// saved state (before it runs).
    pub(crate) fn restore_balloon(
        &mut self,
        state: &balloon::BalloonState,
        grace_ms: u64,
    ) -> Result<(), VmmError> {
        let devices = Arc::get_mut(&mut self.devices)
            .ok_or_else(|| VmmError::Config("the VM's devices are in use".into()))?;
        devices.restore_balloon(state, &self.mem, grace_ms)
    }

    /// Creates the vCPU threads now, idle until [`run`](Self::run) hands
    /// them their vCPU: a migration destination does this while memory
    /// arrives, so that starting the guest after the commit wakes sleeping
    /// threads instead of waiting for new ones to be scheduled (which
    /// takes milliseconds on a busy host). A VM dropped unrun ends them.
    pub(crate) fn prespawn_vcpu_threads(&mut self) -> Result<(), VmmError> {
        for i in self.prespawned.len()..self.vcpus.len() {
            let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
            let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel::<i32>(1);
            let handle = std::thread::Builder::new()
                .name(format!("labvm-vcpu{i}"))
                .spawn(move || {
                    if tid_tx.send(sys::gettid()).is_ok()
                        && let Ok(job) = rx.recv()
                    {
                        job();
                    }
                })
                .map_err(VmmError::Thread)?;
            let tid = tid_rx.recv().map_err(|_| {
                VmmError::Thread(std::io::Error::other("a new vCPU thread ended at once"))
            })?;
            self.prespawned.push(Prespawned {
                handle,
                job: tx,
                tid,
            });
        }
        Ok(())
    }

    pub(crate) fn guest_memory_arc(&self) -> Arc<GuestMemoryMmap> {
        Arc::clone(&self.mem)
    }

    /// Which guest pages may hold data (see [`sys::populated_pages`]).
    pub(crate) fn populated_pages(&self) -> std::io::Result<Vec<u64>> {
        sys::populated_pages(self.host, (self.config.ram_mib << 20) / layout::PAGE_SIZE)
    }

    /// Turns KVM dirty logging of guest RAM on or off.
    pub(crate) fn set_dirty_logging(&self, on: bool) -> Result<(), VmmError> {
        boot::set_dirty_logging(&self.vm, RAM_SLOT, self.host, self.config.ram_mib << 20, on)
    }

    /// Reads and clears the dirty bitmap of guest RAM (one bit per 4 KiB page).
    pub(crate) fn take_dirty_log(&self) -> Result<Vec<u64>, VmmError> {
        let ram = usize::try_from(self.config.ram_mib << 20).unwrap_or(usize::MAX);
        self.vm
            .get_dirty_log(RAM_SLOT, ram)
            .map_err(|source| VmmError::Kvm {
                op: "get dirty log",
                source,
            })
    }

    fn build(config: LabVmConfig, started: Instant, load: bool) -> Result<Self, VmmError> {
        config.validate()?;
        let ram = config.ram_mib << 20;
        let plan = WorkloadPlan::new(&config.workload, ram, config.vcpus)?;
        let kvm = Kvm::new().map_err(VmmError::KvmUnavailable)?;
        let vm = kvm.create_vm().map_err(|source| VmmError::Kvm {
            op: "create VM",
            source,
        })?;
        let ram_usize = usize::try_from(ram)
            .map_err(|_| VmmError::Config("RAM size does not fit this host".into()))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_usize)])
            .map_err(|e| VmmError::GuestMemory(format!("cannot map {ram} bytes: {e}")))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmmError::GuestMemory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live anonymous mapping of `ram`
        // bytes owned by `mem`; `mem` lives in the returned LabVm beside `vm`
        // and is dropped after it (field order), so the mapping outlives the slot.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| VmmError::Kvm {
            op: "set user memory region",
            source,
        })?;

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(|source| VmmError::Kvm {
                    op: "create vCPU",
                    source,
                })?;
            vcpus.push(vcpu);
        }
        let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or_else(|e| {
            tracing::warn!("KVM_GET_TSC_KHZ failed ({e}); assuming 2 GHz for guest pacing");
            2_000_000
        });
        if load {
            let header = GuestSetup {
                ram,
                vcpus: config.vcpus,
                tsc_khz,
                stamp: config.stamp,
                workload: &config.workload,
                plan: &plan,
            }
            .write(&mem)?;
            for (i, vcpu) in vcpus.iter().enumerate() {
                setup_vcpu(vcpu, i as u64, header)?;
            }
        }
        let mem = Arc::new(mem);
        let devices = Arc::new(Devices::new(config.balloon.as_ref(), &mem)?);
        let pre_fault_cap = vm.check_extension_raw(sys::KVM_CAP_PRE_FAULT_MEMORY.into());
        tracing::debug!(
            supported = pre_fault_cap > 0,
            "KVM_PRE_FAULT_MEMORY capability"
        );
        Ok(LabVm {
            config,
            _kvm: kvm,
            vm,
            mem,
            vcpus,
            plan,
            started,
            devices,
            host: host as u64,
            resumed: None,
            prespawned: Vec::new(),
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The balloon device, when the VM has one. The handle is shared: use
    /// it from any thread while the VM runs (set the target, read
    /// statistics and counters, take its state).
    pub fn balloon(&self) -> Option<balloon::BalloonHandle> {
        self.devices.balloon().cloned()
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// How long to run after ready (`None`: until stopped); for VMs whose
    /// configuration came from elsewhere (a state file, a migration).
    pub fn set_run_for(&mut self, run_for: Option<Duration>) {
        self.config.run_for = run_for;
    }

    /// The configuration.
    pub fn config(&self) -> &LabVmConfig {
        &self.config
    }

    /// First byte of the workload area (what traces' offsets are relative to).
    pub fn workload_area_start(&self) -> u64 {
        self.plan.area_start
    }

    /// The host mapping of guest RAM.
    pub fn mapping(&self) -> HostMapping {
        // SAFETY: `host` is the start of the mapping of all guest RAM owned
        // by `self.mem`; every user of the returned value (prefetch threads)
        // is stopped before `run` returns, and `self` outlives `run`.
        unsafe { HostMapping::new(self.host as *mut u8, self.config.ram_mib << 20) }
    }

    /// Every page the workload's touch lists write, in list order per vCPU.
    pub fn touched_pages(&self) -> Vec<u64> {
        self.plan.touched_pages().collect()
    }

    /// Runs the guest until it exits, faults, misses its deadline or is
    /// stopped. A VM runs once; guest memory stays readable afterwards.
    pub fn run(&mut self, observer: &mut dyn RunObserver) -> Result<RunReport, VmmError> {
        if self.vcpus.is_empty() {
            return Err(VmmError::Config("this VM has already run".into()));
        }
        tracing::trace!("run starts");
        sys::install_kick_handler()
            .map_err(|e| VmmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        let n = self.vcpus.len();
        let resumed = self.resumed.take();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            state: Mutex::new(RunState {
                go: false,
                tids: vec![0; n],
                parked: resumed
                    .as_ref()
                    .map_or_else(|| vec![false; n], |d| d.parked.clone()),
                progress: resumed
                    .as_ref()
                    .map_or_else(|| vec![0; n], |d| d.progress.clone()),
                heartbeats: resumed.as_ref().map_or(0, |d| d.heartbeats),
                log: resumed.as_ref().map(|d| d.log.clone()).unwrap_or_default(),
                snapshots: vec![None; n],
                ..RunState::default()
            }),
            cv: Condvar::new(),
        });
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(n);
        let mut prespawned = std::mem::take(&mut self.prespawned).into_iter();
        for (i, vcpu) in self.vcpus.drain(..).enumerate() {
            let thread_shared = Arc::clone(&shared);
            let mem = Arc::clone(&self.mem);
            let devices = Arc::clone(&self.devices);
            let job = move || vcpu_thread(i, vcpu, &thread_shared, &mem, &devices);
            let spawned = match prespawned.next() {
                Some(p) => match p.job.send(Box::new(job)) {
                    Ok(()) => {
                        // Known already: the controller need not wait for
                        // this thread to be scheduled to say it.
                        lock(&shared.state).tids[i] = p.tid;
                        Ok(p.handle)
                    }
                    Err(std::sync::mpsc::SendError(job)) => std::thread::Builder::new()
                        .name(format!("labvm-vcpu{i}"))
                        .spawn(job),
                },
                None => std::thread::Builder::new()
                    .name(format!("labvm-vcpu{i}"))
                    .spawn(job),
            };
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_all(&shared, threads);
                    return Err(VmmError::Thread(e));
                }
            }
        }
        tracing::trace!("vCPU threads handed their vCPUs");
        // Wait for every thread to report its id, then let the observer act.
        let tids = {
            let mut st = lock(&shared.state);
            while st.tids.contains(&0) {
                st = shared
                    .cv
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            st.tids.clone()
        };
        for (i, tid) in tids.iter().enumerate() {
            tracing::info!(vcpu = i, tid, "vCPU thread started");
        }
        let offered = observer.before_boot(self, &tids);
        if offered.refuses_boot() {
            // The companion found no room for this VM on this host and its
            // policy is to refuse: the guest never runs.
            let shortfall = offered
                .allocation
                .as_ref()
                .map(vmm_hooks::Allocation::shortfall_text)
                .unwrap_or_default();
            stop_all(&shared, threads);
            return Err(VmmError::NotAdmitted { shortfall });
        }
        self.started += observer.admission_wait();
        let plan = self.config.plan.clone().unwrap_or(offered);
        self.devices.apply_plan(&plan);
        let mut bootstrap = self.prepare_boot(&plan);
        // A migrated guest booted elsewhere: nothing to measure at ready,
        // and the observer hears of it at once (the source waits for it).
        bootstrap.resumed = resumed.is_some();
        if self.config.prewarm {
            // The instance is warm: the start request arrives now.
            self.started = Instant::now();
        }
        {
            let mut st = lock(&shared.state);
            st.go = true;
            if resumed.is_some() {
                // A migrated guest signalled ready on its source host.
                st.ready_at = Some(Instant::now());
            }
            if let Some(ranges) = bootstrap.kvm_pre_fault.take() {
                st.pre_fault = ranges;
            }
        }
        shared.cv.notify_all();

        let result = self.control(&shared, &threads, observer, &mut bootstrap);
        stop_all(&shared, threads);
        if bootstrap.report.is_none() {
            // Ended before ready: stop prefetching and logging all the same.
            self.finish_boot(&mut bootstrap, 0.0, &[]);
        }
        let st = lock(&shared.state);
        let end = Instant::now();
        let (stop, ready_at) = match result {
            Ok(stop) => (stop, st.ready_at),
            Err(e) => return Err(e),
        };
        let counter = match self.config.workload {
            Workload::Dirty { .. } => {
                guest::read_u64(&self.mem, guest::counter_addr(&self.plan)).ok()
            }
            _ => None,
        };
        Ok(RunReport {
            workload: self.config.workload.name(),
            stop,
            time_to_ready: ready_at.map(|t| t.saturating_duration_since(self.started)),
            wall: end.saturating_duration_since(self.started),
            vcpu_tids: tids,
            progress: st.progress.clone(),
            log: st.log.clone(),
            heartbeats: st.heartbeats,
            counter,
            boot: bootstrap.report.take().filter(|_| ready_at.is_some()),
        })
    }

    /// Starts profiling and applies the pre-fault part of `plan`.
    fn prepare_boot(&self, plan: &BootPlan) -> Bootstrap {
        let ram = self.config.ram_mib << 20;
        let profiler = plan.profile.and_then(|req| {
            let p = Profiler::new(req, ram).and_then(|p| {
                boot::set_dirty_logging(&self.vm, RAM_SLOT, self.host, ram, true).map(|()| p)
            });
            match p {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!("not profiling this boot: {}", vmm_hooks::error_chain(&e));
                    None
                }
            }
        });
        let applied = plan
            .prefault
            .as_ref()
            .map_or(Applied::Nothing, |p| boot::apply(self.mapping(), p));
        let kvm_pre_fault = match (&plan.prefault, &applied) {
            (Some(p), Applied::Done(r))
                if r.rolled_back.is_none()
                    && self
                        .vm
                        .check_extension_raw(sys::KVM_CAP_PRE_FAULT_MEMORY.into())
                        > 0 =>
            {
                Some(if p.mode == PrefaultMode::Full {
                    vec![GuestRange { start: 0, len: ram }]
                } else {
                    p.ranges.clone()
                })
            }
            _ => None,
        };
        Bootstrap {
            profiler,
            applied: Some(applied),
            report: None,
            kvm_pre_fault,
            resumed: false,
        }
    }

    /// At ready: closes the profile, stops prefetching, measures the boot.
    fn finish_boot(&self, b: &mut Bootstrap, elapsed_ms: f64, tids: &[i32]) -> BootReport {
        let ram = self.config.ram_mib << 20;
        let profile = b.profiler.take().map(|mut p| {
            if let Err(e) = p.poll(&self.vm, RAM_SLOT, elapsed_ms) {
                tracing::warn!("last dirty-log read failed: {}", vmm_hooks::error_chain(&e));
            }
            if let Err(e) = boot::set_dirty_logging(&self.vm, RAM_SLOT, self.host, ram, false) {
                tracing::warn!("cannot stop dirty logging: {}", vmm_hooks::error_chain(&e));
            }
            p.finish()
        });
        let applied = b.applied.take().unwrap_or(Applied::Nothing);
        let plan_applied = applied.applied();
        let mut report = BootReport::new(elapsed_ms);
        report.vcpu_cpu_ms = tids.iter().filter_map(|&t| sys::thread_cpu_ms(t)).sum();
        if let Some((minor, major)) = sys::process_faults() {
            report.minor_faults = minor;
            report.major_faults = major;
        }
        report.prefault = applied.finish();
        report.rss_kib = sys::process_rss_bytes().unwrap_or(0) / 1024;
        report.guest_resident_kib = balloon::resident_bytes(&self.mapping()).unwrap_or(0) / 1024;
        report.plan_applied = plan_applied
            && report
                .prefault
                .as_ref()
                .is_some_and(|r| r.rolled_back.is_none());
        report.profile = profile;
        b.report = Some(report.clone());
        report
    }

    /// Watches the run until it ends; returns why.
    fn control(
        &self,
        shared: &Shared,
        threads: &[JoinHandle<()>],
        observer: &mut dyn RunObserver,
        bootstrap: &mut Bootstrap,
    ) -> Result<StopReason, VmmError> {
        let deadline = self.started + self.config.ready_deadline;
        let mut told_ready = false;
        loop {
            if let Some(p) = bootstrap.profiler.as_mut()
                && p.due(Instant::now())
            {
                let at = self.started.elapsed().as_secs_f64() * 1e3;
                if let Err(e) = p.poll(&self.vm, RAM_SLOT, at) {
                    tracing::warn!(
                        "dirty-log read failed; profile dropped: {}",
                        vmm_hooks::error_chain(&e)
                    );
                    bootstrap.profiler = None;
                }
            }
            let mut st = lock(&shared.state);
            // Ready is handled before the outcome: a guest may signal ready
            // and exit before this thread wakes, and its boot still counts.
            if let Some(at) = st.ready_at.filter(|_| !told_ready) {
                told_ready = true;
                let tids = st.tids.clone();
                drop(st);
                let elapsed = at.saturating_duration_since(self.started);
                if bootstrap.resumed {
                    observer.ready(elapsed, &BootReport::new(0.0));
                    continue;
                }
                let report = self.finish_boot(bootstrap, elapsed.as_secs_f64() * 1e3, &tids);
                observer.ready(elapsed, &report);
                continue;
            }
            if let Some(outcome) = st.outcome.take() {
                return outcome;
            }
            let now = Instant::now();
            match st.ready_at {
                None if now >= deadline => {
                    return Err(VmmError::ReadyDeadline {
                        deadline_ms: self.config.ready_deadline.as_millis(),
                    });
                }
                Some(at) => {
                    if let Some(run_for) = self.config.run_for
                        && now >= at + run_for
                    {
                        return Ok(StopReason::Stopped);
                    }
                }
                None => {}
            }
            if st.parked.iter().all(|&p| p) {
                return Err(VmmError::AllParked);
            }
            let ready_at = st.ready_at;
            let tick = bootstrap
                .profiler
                .as_ref()
                .map_or(Duration::from_millis(100), Profiler::interval);
            let wait = match ready_at {
                None => deadline.saturating_duration_since(now),
                Some(_) => tick,
            }
            .min(tick);
            drop(
                shared
                    .cv
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0),
            );
            self.devices.tick();
            if observer.should_stop() {
                return Ok(StopReason::Stopped);
            }
            if observer.tick(self, &VcpuControl { shared, threads }) {
                return Ok(StopReason::Stopped);
            }
        }
    }
}

/// The bootstrap's moving parts between before-boot and ready.
#[derive(Debug)]
struct Bootstrap {
    profiler: Option<Profiler>,
    applied: Option<Applied>,
    report: Option<BootReport>,
    /// Ranges for KVM_PRE_FAULT_MEMORY, where KVM supports it.
    kvm_pre_fault: Option<Vec<GuestRange>>,
    /// The guest arrived by migration (past its boot).
    resumed: bool,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// Migration asks the vCPUs to pause (see [`VcpuControl`]).
    pause: AtomicBool,
    state: Mutex<RunState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct RunState {
    go: bool,
    tids: Vec<i32>,
    ready_at: Option<Instant>,
    outcome: Option<Result<StopReason, VmmError>>,
    parked: Vec<bool>,
    progress: Vec<u64>,
    log: Vec<String>,
    heartbeats: u64,
    finished: usize,
    /// Ranges vCPU 0 pre-faults with KVM_PRE_FAULT_MEMORY before it runs.
    pre_fault: Vec<GuestRange>,
    /// Each paused vCPU's state (or why it could not be read).
    snapshots: Vec<Option<Result<VcpuState, String>>>,
}

impl RunState {
    fn end(&mut self, outcome: Result<StopReason, VmmError>) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }
}

fn lock(m: &Mutex<RunState>) -> MutexGuard<'_, RunState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stops every vCPU thread: sets the flag, wakes parked threads and kicks
/// running ones out of KVM_RUN until all have returned.
fn stop_all(shared: &Shared, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::SeqCst);
    shared.cv.notify_all();
    // A kick can land between the flag check and KVM_RUN; keep kicking.
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            if let Err(e) = t.kill(sys::kick_signal()) {
                tracing::debug!("kicking a vCPU thread: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

/// What one `KVM_RUN` asked of the host, with nothing borrowed from the vCPU.
enum Exit {
    Lab(LabWrite),
    Again,
    Shutdown,
    Unexpected(String),
    Failed(kvm_ioctls::Error),
}

fn vcpu_thread(
    index: usize,
    mut vcpu: VcpuFd,
    shared: &Shared,
    mem: &GuestMemoryMmap,
    devices: &Devices,
) {
    let id = u32::try_from(index).unwrap_or(u32::MAX);
    {
        let mut st = lock(&shared.state);
        st.tids[index] = sys::gettid();
        shared.cv.notify_all();
        while !st.go && !shared.stop.load(Ordering::SeqCst) {
            st = shared
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
    let pre_fault = std::mem::take(&mut lock(&shared.state).pre_fault);
    if !pre_fault.is_empty() {
        let t = Instant::now();
        match pre_fault
            .iter()
            .try_for_each(|r| sys::kvm_pre_fault(&vcpu, r.start, r.len))
        {
            Ok(()) => tracing::info!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                "KVM_PRE_FAULT_MEMORY done after populate"
            ),
            Err(e) => tracing::warn!("KVM_PRE_FAULT_MEMORY failed ({e}); the guest faults lazily"),
        }
    }
    let mut unknown_logged = 0u32;
    if lock(&shared.state).parked[index] {
        // Parked on the source host before migrating: stays parked.
        park(index, &vcpu, shared, lock(&shared.state));
        lock(&shared.state).finished += 1;
        return;
    }
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.pause.load(Ordering::SeqCst) {
            hold_paused(index, &mut vcpu, shared);
            continue;
        }
        let exit = match vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => match labdev::decode(addr, data) {
                Some(w) => Exit::Lab(w),
                None if devices.mmio_write(addr, data) => Exit::Again,
                None => {
                    if unknown_logged < 10 {
                        unknown_logged += 1;
                        tracing::warn!(vcpu = id, addr, "write to unmapped MMIO address ignored");
                    }
                    Exit::Again
                }
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !devices.mmio_read(addr, data) {
                    data.fill(0);
                }
                Exit::Again
            }
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::Intr) => Exit::Again,
            Ok(other) => Exit::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Again,
            Err(e) => Exit::Failed(e),
        };
        match exit {
            Exit::Again => {}
            Exit::Lab(w) => {
                if handle_lab_write(id, index, w, &vcpu, shared, mem) {
                    break;
                }
            }
            Exit::Shutdown => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                lock(&shared.state).end(Err(VmmError::Shutdown { vcpu: id, rip }));
                shared.cv.notify_all();
                break;
            }
            Exit::Unexpected(exit) => {
                lock(&shared.state).end(Err(VmmError::UnexpectedExit { vcpu: id, exit }));
                shared.cv.notify_all();
                break;
            }
            Exit::Failed(source) => {
                lock(&shared.state).end(Err(VmmError::Kvm {
                    op: "run vCPU",
                    source,
                }));
                shared.cv.notify_all();
                break;
            }
        }
    }
    lock(&shared.state).finished += 1;
}

/// Acts on one lab-device write; returns true when this vCPU must stop.
fn handle_lab_write(
    id: u32,
    index: usize,
    w: LabWrite,
    vcpu: &VcpuFd,
    shared: &Shared,
    mem: &GuestMemoryMmap,
) -> bool {
    let mut st = lock(&shared.state);
    match w {
        LabWrite::Ready => {
            if st.ready_at.is_none() {
                st.ready_at = Some(Instant::now());
            }
        }
        LabWrite::Progress(v) => st.progress[index] = v,
        LabWrite::Heartbeat(_) => st.heartbeats += 1,
        LabWrite::Exit(status) => st.end(Ok(StopReason::Exited(status))),
        LabWrite::Log(gpa) => {
            if st.log.len() < 64 {
                match labdev::read_guest_string(mem, gpa) {
                    Some(s) => {
                        tracing::info!(vcpu = id, "guest: {s}");
                        st.log.push(s);
                    }
                    None => tracing::warn!(vcpu = id, gpa, "guest log string outside RAM"),
                }
            }
        }
        LabWrite::Unknown(off) => {
            tracing::debug!(vcpu = id, off, "write to unknown lab device register");
        }
        LabWrite::Park => {
            st.parked[index] = true;
            shared.cv.notify_all();
            park(index, vcpu, shared, st);
            return true;
        }
        LabWrite::Fault(vector) => {
            drop(st);
            let err = fault_error(id, vector, vcpu, mem);
            lock(&shared.state).end(Err(err));
            shared.cv.notify_all();
            return true;
        }
    }
    shared.cv.notify_all();
    false
}

/// Waits parked until the VM stops, answering pause requests with this
/// vCPU's state.
fn park(index: usize, vcpu: &VcpuFd, shared: &Shared, mut st: MutexGuard<'_, RunState>) {
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.pause.load(Ordering::SeqCst) && st.snapshots[index].is_none() {
            st.snapshots[index] = Some(VcpuState::read(vcpu).map_err(|e| e.to_string()));
            shared.cv.notify_all();
        }
        st = shared
            .cv
            .wait_timeout(st, Duration::from_millis(50))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

/// Outside KVM_RUN: completes any pending MMIO, records this vCPU's state
/// and waits until the pause ends or the VM stops.
fn hold_paused(index: usize, vcpu: &mut VcpuFd, shared: &Shared) {
    // KVM_RUN with immediate_exit finishes a pending MMIO exit and returns
    // at once (EINTR), so the registers read next are consistent.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    let snap = VcpuState::read(vcpu).map_err(|e| e.to_string());
    let mut st = lock(&shared.state);
    st.snapshots[index] = Some(snap);
    shared.cv.notify_all();
    while shared.pause.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
        st = shared
            .cv
            .wait(st)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

/// Builds the error for a guest exception from the frame its stub left on
/// the CPL0 stack: [vector, error code, rip, cs, rflags, rsp, ss].
fn fault_error(id: u32, vector: u64, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> VmmError {
    let rsp = vcpu.get_regs().map(|r| r.rsp).unwrap_or(0);
    let word = |i: u64| guest::read_u64(mem, rsp.wrapping_add(i * 8)).unwrap_or(0);
    let cr2 = vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
    let vector = vector.min(255);
    VmmError::GuestFault {
        vcpu: id,
        vector,
        name: labdev::exception_name(vector),
        rip: word(2),
        error_code: word(1),
        cr2,
    }
}

/// Puts a vCPU in 64-bit long mode at CPL3 at the guest's entry point.
fn setup_vcpu(vcpu: &VcpuFd, index: u64, header: ProgramHeader) -> Result<(), VmmError> {
    let kvm = |op| move |source| VmmError::Kvm { op, source };
    let mut sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    crate::cpu::flat_long_mode_segments(&mut sregs, 3, gdt::USER_CS, gdt::USER_DS);
    sregs.tr = kvm_segment {
        base: layout::TSS_BASE + index * layout::TSS_STRIDE,
        limit: 0x67,
        selector: gdt::TSS,
        type_: 0xB,
        present: 1,
        dpl: 0,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 256 * 16 - 1;
    // PE | MP | ET | NE | WP | PG
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = layout::PML4;
    // PAE | OSFXSR | OSXMMEXCPT
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    // LME | LMA
    sregs.efer = 0x500;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    let mut regs = vcpu.get_regs().map_err(kvm("get regs"))?;
    regs.rip = header.entry;
    regs.rsp = layout::USTACK_BASE + (index + 1) * layout::USTACK_SIZE - 16;
    regs.rdi = index;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
    Ok(())
}
