//! Loading cr's eBPF object (embedded in the `cr` binary) and attaching its programs.
//!
//! [`BpfObject`] owns the loaded object: its maps, the programs' links (dropping it detaches
//! everything) and the pump that forwards aya-log records from the eBPF side to cr's logger.
//! It knows nothing of what the programs do; [`crate::bpf::dirty::Tracker`] and later
//! trackers (VMA changes, TCP, locks) take the maps and attach the programs they need.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Map, MapData};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::tracefs::{self, FaultLayout};
use crate::kernel::sys::mounts;

/// The eBPF object `cargo xtask build-ebpf` produced, embedded by build.rs (empty when cr was
/// built without it). 8-byte aligned, as aya's ELF parser requires.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cr-ebpf.o"));

/// Names of the fault tracker's globals in the object (see cr-ebpf/src/fault.rs).
const GLOBAL_FAULT_ADDR_OFF: &str = "FAULT_ADDR_OFF";
const GLOBAL_FAULT_ERR_OFF: &str = "FAULT_ERR_OFF";
const GLOBAL_FORK_CHILD_PID_OFF: &str = "FORK_CHILD_PID_OFF";

/// The embedded eBPF object, or a clear error if this cr was built without one.
pub fn embedded_object() -> Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        return Err(anyhow!(
            "this cr was built without its eBPF object; build with cargo xtask build"
        ));
    }
    Ok(EBPF_OBJECT)
}

/// A loaded instance of cr's eBPF object.
pub struct BpfObject {
    // Field order is drop order: stop the log pump (final flush) before the programs go.
    log: Option<LogPump>,
    ebpf: Ebpf,
    /// The page-fault record layout, or why it cannot be used; checked when the fault
    /// programs are attached, so that loading for other programs (tc, …) does not depend on it.
    fault_layout: std::result::Result<FaultLayout, String>,
}

impl BpfObject {
    /// Loads the embedded object: creates its maps and patches its globals. Programs are loaded
    /// into the kernel only when attached. Mounts tracefs if it is missing (tracepoint attach
    /// and the layout check need it).
    pub fn load() -> Result<BpfObject> {
        Self::load_sized(None)
    }

    /// [`BpfObject::load`] with CR_DIRTY sized to `dirty_max_entries` instead of its default, and
    /// CR_DIRTY_RING to match ([`dirty_ring_bytes`]; aya's map_max_entries)
    /// (tests use a tiny map to prove that a full map makes the harvest fall back).
    pub fn load_sized(dirty_max_entries: Option<u32>) -> Result<BpfObject> {
        let data = embedded_object()?;
        raise_memlock_limit();
        if let Err(e) = mounts::ensure_tracefs() {
            log::warn!("tracefs is not mounted and cannot be: {e:#}");
        }
        let fault_layout = tracefs::read_fault_layout().map_err(|e| format!("{e:#}"));
        let fork_off = match tracefs::read_format("sched", "sched_process_fork")
            .and_then(|t| tracefs::fork_child_pid_offset(&t))
        {
            Ok(off) => Some(off),
            Err(e) => {
                log::debug!("sched_process_fork layout: {e:#} (new threads of targets will not be recognized by task id)");
                None
            }
        };
        let mut loader = EbpfLoader::new();
        tracefs::patch_sock_layout(&mut loader);
        if let Ok(l) = &fault_layout {
            log::debug!(
                "page-fault tracepoint layout: address at {}, error_code at {}",
                l.address,
                l.error_code
            );
            loader.override_global(GLOBAL_FAULT_ADDR_OFF, &l.address, true);
            loader.override_global(GLOBAL_FAULT_ERR_OFF, &l.error_code, true);
        }
        // eBPF-side log statements below cr's level are skipped in the kernel.
        let level = log::max_level() as u8;
        loader.override_global(aya_log::LEVEL, &level, false);
        if let Some(off) = &fork_off {
            loader.override_global(GLOBAL_FORK_CHILD_PID_OFF, off, true);
        }
        if let Some(n) = dirty_max_entries {
            loader.map_max_entries(cr_common::names::DIRTY, n);
            loader.map_max_entries(cr_common::names::DIRTY_RING, dirty_ring_bytes(n));
        }
        let mut ebpf = loader
            .load(data)
            .context("load cr's eBPF object (maps and relocations)")?;
        let log = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => match LogPump::start(logger) {
                Ok(p) => Some(p),
                Err(e) => {
                    log::debug!("eBPF log records will not be shown: {e:#}");
                    None
                }
            },
            Err(e) => {
                log::debug!("eBPF log records will not be shown: {e}");
                None
            }
        };
        Ok(BpfObject {
            log,
            ebpf,
            fault_layout,
        })
    }

    /// The page-fault layout this object was patched with, or why there is none.
    pub fn fault_layout(&self) -> Result<FaultLayout> {
        self.fault_layout.clone().map_err(|e| anyhow!(e))
    }

    /// Loads program `prog` and attaches it to tracepoint `category:name`. The link lives as
    /// long as this object.
    pub fn attach_tracepoint(&mut self, prog: &str, category: &str, name: &str) -> Result<()> {
        let p = self.ebpf.program_mut(prog).ok_or_else(|| {
            anyhow!("the eBPF object has no program {prog} (stale build? run cargo xtask build)")
        })?;
        let tp: &mut TracePoint = p
            .try_into()
            .with_context(|| format!("program {prog} is not a tracepoint program"))?;
        tp.load()
            .with_context(|| format!("load eBPF program {prog} into the kernel (verifier)"))?;
        tp.attach(category, name)
            .with_context(|| format!("attach {prog} to tracepoint {category}:{name}"))?;
        log::debug!("attached {prog} to {category}:{name}");
        Ok(())
    }

    /// Checks the page-fault layout, then attaches the write-fault programs to
    /// exceptions:page_fault_user and exceptions:page_fault_kernel.
    pub fn attach_fault_tracepoints(&mut self) -> Result<()> {
        self.fault_layout().context("cannot track write faults")?;
        use cr_common::names::{PROG_FAULT_KERNEL, PROG_FAULT_USER};
        self.attach_tracepoint(PROG_FAULT_USER, "exceptions", "page_fault_user")?;
        self.attach_tracepoint(PROG_FAULT_KERNEL, "exceptions", "page_fault_kernel")?;
        Ok(())
    }

    /// Checks every syscall tracepoint cr-ebpf reads against tracefs (argument i at
    /// SYSCALL_ARG0_OFFSET + 8*i, 8 bytes), then attaches the syscall programs
    /// (cr_common::names::SYSCALL_PROGS) and the exec program.
    pub fn attach_syscall_tracepoints(&mut self) -> Result<()> {
        use cr_common::names::{PROG_EXEC, SYSCALL_PROGS};
        for (prog, syscall) in SYSCALL_PROGS {
            let event = format!("sys_enter_{syscall}");
            let text = tracefs::read_format("syscalls", &event)?;
            tracefs::check_syscall_args(&event, &text)
                .with_context(|| format!("cannot watch {syscall}(2) of tracked processes"))?;
            self.attach_tracepoint(prog, "syscalls", &event)?;
        }
        self.attach_tracepoint(PROG_EXEC, "sched", "sched_process_exec")?;
        self.attach_tracepoint(cr_common::names::PROG_FORK, "sched", "sched_process_fork")
    }

    /// Takes map `name` out of the object, typed (e.g. `aya::maps::HashMap<_, K, V>`).
    pub fn take_map<T>(&mut self, name: &str) -> Result<T>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let map = self.ebpf.take_map(name).ok_or_else(|| {
            anyhow!("the eBPF object has no map {name} (or it was taken already)")
        })?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// The underlying aya object, for programs this module has no helper for.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Forwards the eBPF log records waiting in the ring buffer now. The pump thread does this
    /// on its own as records arrive; call it at harvest points so the log is in order with what
    /// the harvest reports.
    pub fn flush_log(&self) {
        if let Some(p) = &self.log {
            p.flush();
        }
    }
}

/// Map fds received from the tracker, in the order it sent them, each opened and then checked
/// to be the map it claims to be (name for messages, type when taken).
pub(crate) struct Received {
    maps: std::vec::IntoIter<(&'static str, Map)>,
}

impl Received {
    /// Opens `fds`, named by `names` (same order and count).
    pub(crate) fn open(fds: Vec<OwnedFd>, names: &[&'static str]) -> Result<Received> {
        if fds.len() != names.len() {
            bail!(
                "the tracker sent {} map fds, expected {} ({})",
                fds.len(),
                names.len(),
                names.join(", ")
            );
        }
        let mut maps = Vec::with_capacity(fds.len());
        for (fd, &name) in fds.into_iter().zip(names) {
            let data =
                MapData::from_fd(fd).with_context(|| format!("map {name} from the tracker"))?;
            let map = Map::from_map_data(data)
                .with_context(|| format!("map {name} from the tracker has an unknown type"))?;
            maps.push((name, map));
        }
        Ok(Received {
            maps: maps.into_iter(),
        })
    }

    /// The next map, typed (e.g. `HashMap<MapData, K, V>`).
    #[allow(clippy::should_implement_trait)]
    pub(crate) fn next<T: TryFrom<Map, Error = aya::maps::MapError>>(&mut self) -> Result<T> {
        let (name, map) = self.maps.next().context("a map is missing")?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }
}

/// CR_DIRTY_RING's size for a dirty map of `entries`: room for two faults per page (a page
/// untouched since the arming faults twice on its first write), 24 bytes a record with the
/// ring's header, a power of two from 4 KiB to 64 MiB.
pub fn dirty_ring_bytes(entries: u32) -> u32 {
    (u64::from(entries) * 2 * 24)
        .next_power_of_two()
        .clamp(4096, 64 << 20) as u32
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it (< 5.11). Newer
/// kernels charge the memory cgroup, and without CAP_SYS_RESOURCE the call fails: that is
/// expected, not an error.
fn raise_memlock_limit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        log::debug!("setrlimit(RLIMIT_MEMLOCK) failed ({e}); fine on kernels that charge BPF memory to the cgroup");
    }
}

type Logger = EbpfLogger<&'static dyn log::Log>;

/// A thread that waits on aya-log's ring buffer and forwards its records to the `log` crate
/// (which cr's logger prints). Dropping it stops the thread after a final flush.
struct LogPump {
    logger: Arc<Mutex<Logger>>,
    /// Closing this (on drop) wakes the thread with POLLHUP on its end.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl LogPump {
    fn start(logger: Logger) -> Result<LogPump> {
        let ring = logger
            .as_fd()
            .try_clone_to_owned()
            .context("dup the aya-log ring buffer fd")?;
        let (stop_r, stop_w) = nix::unistd::pipe().context("pipe for the eBPF log pump")?;
        let logger = Arc::new(Mutex::new(logger));
        let l = logger.clone();
        let thread = std::thread::Builder::new()
            .name("cr-ebpf-log".into())
            .spawn(move || loop {
                let mut fds = [
                    PollFd::new(ring.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop_r.as_fd(), PollFlags::POLLIN),
                ];
                let stopped = match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => fds[1].revents().is_some_and(|r| !r.is_empty()),
                    Err(nix::errno::Errno::EINTR) => false,
                    Err(_) => true,
                };
                l.lock().unwrap_or_else(|e| e.into_inner()).flush();
                if stopped {
                    return;
                }
            })
            .context("start the eBPF log pump thread")?;
        Ok(LogPump {
            logger,
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }

    fn flush(&self) {
        self.logger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
