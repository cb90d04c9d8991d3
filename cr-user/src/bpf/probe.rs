//! The probes of `cr check` that need cr's eBPF object or bpffs (the others are
//! [`crate::kernel::probe::features`]): each really uses its feature and leaves nothing behind.

use anyhow::{anyhow, bail, Context, Result};

use crate::kernel::probe::child::TIMEOUT;
use crate::kernel::sys::mman::AnonMap as Mapping;
use crate::kernel::sys::mounts;
use crate::kernel::sys::sock;

/// Loads cr-ebpf, attaches the page-fault tracepoints, tracks this process, writes one fresh
/// page and reads another: the write must be recorded, the read not.
pub fn tracepoints() -> Result<String> {
    use cr_common::{TARGET_F_LOG, TARGET_F_TRACK_WRITES};
    let mut t = crate::bpf::Tracker::start()?;
    let me = std::process::id();
    let m = Mapping::new(2)?;
    let flags = TARGET_F_TRACK_WRITES
        | if log::log_enabled!(log::Level::Debug) {
            TARGET_F_LOG
        } else {
            0
        };
    t.add_target(me, flags)?;
    m.write(0, 1);
    let _ = m.read(1);
    t.remove_target(me)?;
    let pages = t.dirty_pages(me)?;
    let stats = t.stats()?;
    t.flush_log();
    let (w, r) = (
        m.page_addr(0) >> cr_common::PAGE_SHIFT,
        m.page_addr(1) >> cr_common::PAGE_SHIFT,
    );
    if !pages.contains(&w) {
        bail!(
            "the write fault on page {w:#x} was not recorded (recorded {} pages, stats {stats:?})",
            pages.len()
        );
    }
    if pages.contains(&r) {
        bail!("a read fault on page {r:#x} was recorded as a write");
    }
    if stats.read_faults == 0 {
        bail!("no read fault was counted (stats {stats:?})");
    }
    Ok(format!(
        "saw the write to {:#x}; stats {stats:?}",
        m.page_addr(0)
    ))
}

/// Map and program of cr-ebpf/src/probe.rs.
const PROBE_TC_PROG: &str = cr_common::names::PROG_PROBE_TC;
const PROBE_TC_MAP: &str = cr_common::names::PROBE_TC;

/// tc BPF: in a private network namespace (so nothing on the host is touched and everything
/// vanishes with the thread), add a clsact qdisc to `lo`, attach cr's probe classifier at
/// ingress, send a datagram over loopback and see the program count it. Where no network
/// namespace can be made, attach through TCX on the host's `lo` instead (a link: gone when
/// dropped, no qdisc left behind).
pub fn tc_bpf() -> Result<String> {
    let h = std::thread::Builder::new()
        .name("cr-check-tc".into())
        .spawn(|| -> Result<String> {
            match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                Ok(()) => {
                    set_lo_up()?;
                    tc_roundtrip(true).map(|n| format!("clsact + classifier on lo (private netns) saw {n} packet(s)"))
                }
                Err(e) => {
                    log::debug!("no private network namespace for the tc probe ({e}); using TCX on the host's lo");
                    tc_roundtrip(false).map(|n| format!("TCX classifier on the host's lo saw {n} packet(s)"))
                }
            }
        })
        .context("start the tc probe thread")?;
    h.join()
        .map_err(|_| anyhow!("the tc probe thread panicked"))?
}

/// Brings `lo` up in the current thread's network namespace.
fn set_lo_up() -> Result<()> {
    sock::set_link_up("lo")
}

/// Loads the probe classifier, attaches it at lo ingress (netlink/clsact or TCX), sends one
/// datagram to itself over loopback and returns the program's packet count (must be > 0).
fn tc_roundtrip(netlink: bool) -> Result<u64> {
    use aya::maps::{Array, MapData};
    use aya::programs::tc::{self, NlOptions, TcAttach, TcAttachType};
    use aya::programs::{LinkOrder, SchedClassifier};

    let mut obj = crate::bpf::BpfObject::load()?;
    let count: Array<MapData, u64> = obj.take_map(PROBE_TC_MAP)?;
    let prog: &mut SchedClassifier = obj
        .ebpf_mut()
        .program_mut(PROBE_TC_PROG)
        .ok_or_else(|| anyhow!("the eBPF object has no program {PROBE_TC_PROG} (stale build? run cargo xtask build)"))?
        .try_into()
        .context("cr_probe_tc is not a classifier")?;
    prog.load()
        .context("load the tc probe classifier (verifier)")?;
    if netlink {
        tc::qdisc_add_clsact(c"lo").context("add a clsact qdisc to lo")?;
        prog.attach(
            c"lo",
            TcAttach::Netlink {
                parent: TcAttachType::Ingress.into(),
                options: NlOptions::default(),
            },
        )
        .context("attach the classifier at lo ingress (netlink)")?;
    } else {
        prog.attach(
            c"lo",
            TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: LinkOrder::default(),
            },
        )
        .context("attach the classifier at lo ingress (TCX)")?;
    }
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a loopback UDP socket")?;
    rx.set_read_timeout(Some(TIMEOUT))
        .context("set a receive timeout")?;
    let to = rx.local_addr().context("UDP socket address")?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a loopback UDP socket")?;
    tx.send_to(b"cr check", to)
        .context("send a datagram over loopback")?;
    let mut buf = [0u8; 16];
    // Once received, it has passed lo's ingress hook.
    rx.recv_from(&mut buf)
        .context("receive the datagram sent over loopback")?;
    let n = count
        .get(&0, 0)
        .context("read the probe classifier's counter")?;
    if n == 0 {
        bail!("the datagram crossed lo but the classifier did not run");
    }
    Ok(n)
}

/// Removes a pin and the directory holding it, whatever happened.
struct PinDir {
    dir: std::path::PathBuf,
    mounted: bool,
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("probe"));
        if self.mounted {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// bpffs: create a directory, pin a map there, reopen it from the pin and read what was
/// written through the first handle, then remove both. If /sys/fs/bpf is not a bpffs, the
/// same is done on a bpffs mounted for the purpose on a temporary directory (cr mounts
/// /sys/fs/bpf when it needs it).
pub fn bpffs() -> Result<String> {
    use aya::maps::{Array, Map, MapData};
    let at_sys = mounts::is_mounted(mounts::BPFFS, "bpf")?;
    let guard = if at_sys {
        let dir =
            std::path::Path::new(mounts::BPFFS).join(format!("cr-check-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        PinDir {
            dir,
            mounted: false,
        }
    } else {
        if !mounts::kernel_has_fs("bpf")? {
            bail!("this kernel has no bpf filesystem");
        }
        let dir = std::env::temp_dir().join(format!("cr-check-bpffs-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let mut g = PinDir {
            dir,
            mounted: false,
        };
        mounts::mount_fs("bpf", &g.dir)?;
        g.mounted = true;
        g
    };
    let pin = guard.dir.join("probe");
    let mut a: Array<MapData, u64> = Array::create(1, 0).context("create a BPF array map")?;
    a.set(0, &0xC0FFEE, 0).context("write the BPF array map")?;
    a.pin(&pin)
        .with_context(|| format!("pin a map at {}", pin.display()))?;
    let back =
        MapData::from_pin(&pin).with_context(|| format!("open the pin {}", pin.display()))?;
    let back: Array<MapData, u64> =
        Array::try_from(Map::Array(back)).context("the pinned map's type")?;
    if back.get(&0, 0).context("read the pinned map")? != 0xC0FFEE {
        bail!("the map reopened from its pin does not hold what was written");
    }
    std::fs::remove_file(&pin).with_context(|| format!("remove the pin {}", pin.display()))?;
    Ok(if at_sys {
        format!("pinned and removed a map under {}", mounts::BPFFS)
    } else {
        "bpffs works (not mounted at /sys/fs/bpf; cr mounts it when needed)".into()
    })
}
