//! The network lock of `--tcp-established`: cr's `cr_netlock` tc classifier (cr-ebpf/src/
//! netlock.rs) on clsact ingress and egress of the interfaces the connections use (`lo`, and the
//! one holding the local address), dropping every packet of the connections listed in its map.
//!
//! Each dump has its own instance: map and program pinned under `/sys/fs/bpf/cr/netlock-TAG/`,
//! and the tc filters recorded (interface, direction, priority, handle) in `netlock.json` in
//! the image directory. The filters hold the program, the program holds the map: the lock
//! outlives `cr dump`. Restore checks the pins are there, rebuilds, then [`release`]s: filters
//! detached by handle (never by name: other dumps' locks stay), pins removed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcAttachType};
use aya::programs::SchedClassifier;
use serde::{Deserialize, Serialize};

use crate::kernel::sys::sock::show_addr;

const PROG: &str = "cr_netlock";
const MAP: &str = "CR_NETLOCK";
const PIN_ROOT: &str = "/sys/fs/bpf/cr";
/// The lock's record in the image directory.
pub const RECORD: &str = "netlock.json";

/// Same layout as `FlowKey` in cr-ebpf/src/netlock.rs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    family: u32,
}

// SAFETY: repr(C), plain bytes and integers, no padding (16+16+2+2+4).
unsafe impl aya::Pod for FlowKey {}

/// One tc filter of the lock.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Filter {
    pub ifname: String,
    pub ingress: bool,
    pub priority: u16,
    pub handle: u32,
}

/// What restore needs to find and remove a lock.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Record {
    pub pin_dir: String,
    pub filters: Vec<Filter>,
    /// When the first connection became locked (CLOCK_REALTIME, ns since the epoch; 0 in a
    /// record without it): [`release`] logs how long the connections stayed locked, the
    /// downtime the lock itself cost (cr-bench's tcp section reads that line).
    #[serde(default)]
    pub locked_at_ns: u64,
}

/// Wall-clock time in ns since the epoch: dump and restore are different processes, possibly
/// on different machines, so a monotonic clock would not do.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A lock being built by a dump.
pub struct NetLock {
    rec: Record,
    map: BpfHashMap<MapData, FlowKey, u8>,
    prog: SchedClassifier,
    /// Keeps the loaded object's other parts alive while the dump runs.
    _obj: crate::bpf::BpfObject,
    record_path: PathBuf,
    /// Local addresses whose interfaces carry the lock already.
    addrs_done: Vec<Vec<u8>>,
}

/// One connection the lock drops the packets of: family (AF_INET or AF_INET6), the local and
/// the remote address (4 or 16 bytes) and port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub family: u32,
    pub src_addr: Vec<u8>,
    pub src_port: u32,
    pub dst_addr: Vec<u8>,
    pub dst_port: u32,
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {}",
            show_addr(self.family, &self.src_addr, self.src_port),
            show_addr(self.family, &self.dst_addr, self.dst_port)
        )
    }
}

fn keys(s: &Flow) -> Result<[FlowKey; 2]> {
    let fam = if s.family == libc::AF_INET as u32 {
        4
    } else {
        6
    };
    let pad = |a: &[u8]| -> Result<[u8; 16]> {
        let mut out = [0u8; 16];
        if a.len() > 16 {
            bail!("address of {} bytes", a.len());
        }
        out[..a.len()].copy_from_slice(a);
        Ok(out)
    };
    let (l, r) = (pad(&s.src_addr)?, pad(&s.dst_addr)?);
    let lp = (s.src_port as u16).to_be_bytes();
    let rp = (s.dst_port as u16).to_be_bytes();
    Ok([
        FlowKey {
            src: l,
            dst: r,
            sport: lp,
            dport: rp,
            family: fam,
        },
        FlowKey {
            src: r,
            dst: l,
            sport: rp,
            dport: lp,
            family: fam,
        },
    ])
}

/// The interfaces that carry a connection from local address `addr`: `lo` always (loopback
/// traffic, and cheap), and the interface holding the address.
fn interfaces(family: u32, addr: &[u8]) -> Vec<String> {
    let mut out = vec!["lo".to_string()];
    let ip: Option<IpAddr> = match addr.len() {
        4 => <[u8; 4]>::try_from(addr).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(addr).ok().map(IpAddr::from),
        _ => None,
    };
    let _ = family;
    let Some(ip) = ip else { return out };
    if ip.is_loopback() {
        return out;
    }
    for (name, a) in crate::kernel::sys::sock::if_addresses() {
        if a == ip && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

impl NetLock {
    /// Loads and pins a fresh lock; `record_dir` is the image directory.
    pub fn create(tag: &str, record_dir: &Path) -> Result<NetLock> {
        let pin_dir = PathBuf::from(PIN_ROOT).join(format!("netlock-{tag}"));
        // Another cr releasing the last lock may remove the parent directory between
        // create_dir_all's two mkdirs: try again then.
        let mut made = std::fs::create_dir_all(&pin_dir);
        for _ in 0..3 {
            match &made {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    made = std::fs::create_dir_all(&pin_dir)
                }
                _ => break,
            }
        }
        made.with_context(|| {
            format!(
                "create {} (is bpffs mounted at /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        // Only the classifier and its map are used: the tracker's large maps at their
        // smallest, so loading costs little.
        let mut obj = crate::bpf::BpfObject::load_sized(Some(1))?;
        let raw = obj.ebpf_mut().take_map(MAP).ok_or_else(|| {
            anyhow!("the eBPF object has no map {MAP} (stale build? run cargo xtask build)")
        })?;
        let _ = std::fs::remove_file(pin_dir.join("map"));
        match &raw {
            aya::maps::Map::HashMap(d) => d
                .pin(pin_dir.join("map"))
                .with_context(|| format!("pin the lock map in {}", pin_dir.display()))?,
            _ => bail!("{MAP} is not a hash map"),
        }
        let map: BpfHashMap<MapData, FlowKey, u8> =
            BpfHashMap::try_from(raw).context("open the lock map")?;
        let prog: &mut SchedClassifier = obj
            .ebpf_mut()
            .program_mut(PROG)
            .ok_or_else(|| {
                anyhow!(
                    "the eBPF object has no program {PROG} (stale build? run cargo xtask build)"
                )
            })?
            .try_into()
            .context("cr_netlock is not a classifier")?;
        prog.load()
            .context("load the network-lock classifier (verifier)")?;
        let _ = std::fs::remove_file(pin_dir.join("prog"));
        prog.pin(pin_dir.join("prog"))
            .with_context(|| format!("pin the lock program in {}", pin_dir.display()))?;
        let prog = SchedClassifier::from_pin(pin_dir.join("prog"))
            .context("reopen the pinned lock program")?;
        let lock = NetLock {
            rec: Record {
                pin_dir: pin_dir.display().to_string(),
                filters: Vec::new(),
                locked_at_ns: 0,
            },
            map,
            prog,
            _obj: obj,
            record_path: record_dir.join(RECORD),
            addrs_done: Vec::new(),
        };
        lock.save()?;
        log::info!("network lock pinned in {}", pin_dir.display());
        Ok(lock)
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.rec)?;
        std::fs::write(&self.record_path, text)
            .with_context(|| format!("write {}", self.record_path.display()))
    }

    fn attach(&mut self, ifname: &str) -> Result<()> {
        if self.rec.filters.iter().any(|f| f.ifname == ifname) {
            return Ok(());
        }
        let c = std::ffi::CString::new(ifname).context("interface name")?;
        if let Err(e) = tc::qdisc_add_clsact(c.as_c_str()) {
            log::debug!("clsact on {ifname}: {e} (already there?)");
        }
        for (ty, ingress) in [(TcAttachType::Ingress, true), (TcAttachType::Egress, false)] {
            let id = self
                .prog
                .attach(
                    c.as_c_str(),
                    TcAttach::Netlink {
                        parent: ty.into(),
                        options: NlOptions::default(),
                    },
                )
                .with_context(|| {
                    format!(
                        "attach the network lock to {ifname} {}",
                        if ingress { "ingress" } else { "egress" }
                    )
                })?;
            let link = self.prog.take_link(id).context("take the tc link")?;
            let f = Filter {
                ifname: ifname.to_string(),
                ingress,
                priority: link.priority()?,
                handle: link.handle()?.into(),
            };
            // The filter stays attached after cr exits; `release` removes it by handle.
            std::mem::forget(link);
            self.rec.filters.push(f);
            self.save()?;
        }
        Ok(())
    }

    /// Locks one connection: its packets are dropped from now on, both ways.
    pub fn add(&mut self, s: &Flow) -> Result<()> {
        for k in keys(s)? {
            self.map
                .insert(&k, &1, 0)
                .context("add a connection to the lock map")?;
        }
        // Interfaces are found once per local address (a getifaddrs netlink dump each time
        // would cost more than the rest of locking a connection).
        if !self.addrs_done.contains(&s.src_addr) {
            for ifname in interfaces(s.family, &s.src_addr) {
                self.attach(&ifname)?;
            }
            self.addrs_done.push(s.src_addr.clone());
        }
        // Map entry and filters in place: from here the first connection drops its packets.
        if self.rec.locked_at_ns == 0 {
            self.rec.locked_at_ns = now_ns();
            self.save()?;
        }
        Ok(())
    }

    pub fn record(&self) -> &Record {
        &self.rec
    }

    /// The image directory holding the lock's record.
    pub fn record_dir(&self) -> &Path {
        self.record_path.parent().unwrap_or(Path::new("."))
    }
}

/// Reads the lock record of an image directory, if the dump took a lock.
pub fn read_record(images_dir: &Path) -> Result<Option<Record>> {
    let p = images_dir.join(RECORD);
    match std::fs::read_to_string(&p) {
        Ok(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("parse {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
    }
}

/// Fails unless every connection of `socks` is still in the pinned lock map.
pub fn check_locked(rec: &Record, socks: &[Flow]) -> Result<()> {
    let path = Path::new(&rec.pin_dir).join("map");
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "the network lock ({}) is gone: the connections were not kept locked since the dump",
            path.display()
        )
    })?;
    let map: BpfHashMap<MapData, FlowKey, u8> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(data)).context("open the lock map")?;
    for s in socks {
        for k in keys(s)? {
            if map.get(&k, 0).is_err() {
                bail!("TCP connection {s} is no longer locked");
            }
        }
    }
    Ok(())
}

/// Removes a lock: its filters (by handle), its pins and its record.
pub fn release(rec: &Record, images_dir: Option<&Path>) {
    for f in &rec.filters {
        let ty = if f.ingress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let r = std::ffi::CString::new(f.ifname.as_str())
            .map_err(anyhow::Error::from)
            .and_then(|c| {
                SchedClassifierLink::attached(
                    c.as_c_str(),
                    ty.into(),
                    f.priority,
                    f.handle.into(),
                    None,
                )
                .map_err(anyhow::Error::from)
            })
            .and_then(|l| aya::programs::Link::detach(l).map_err(anyhow::Error::from));
        if let Err(e) = r {
            log::warn!(
                "removing the network lock's filter on {} ({}): {e:#}",
                f.ifname,
                if f.ingress { "ingress" } else { "egress" }
            );
        }
    }
    // Every filter gone: the connections pass packets again.
    let unlocked_at = now_ns();
    let dir = Path::new(&rec.pin_dir);
    for n in ["map", "prog"] {
        let _ = std::fs::remove_file(dir.join(n));
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        log::warn!("removing {}: {e}", dir.display());
    }
    // The last lock also takes cr's pin directory with it (another dump's lock keeps it:
    // remove_dir fails on a non-empty directory, which is fine).
    let _ = std::fs::remove_dir(PIN_ROOT);
    if let Some(d) = images_dir {
        let _ = std::fs::remove_file(d.join(RECORD));
    }
    if rec.locked_at_ns > 0 && unlocked_at >= rec.locked_at_ns {
        let ms = (unlocked_at - rec.locked_at_ns) as f64 / 1e6;
        log::info!(
            "network lock {} removed: the connections were locked for {ms:.3} ms",
            rec.pin_dir
        );
    } else {
        log::info!("network lock {} removed", rec.pin_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_both_directions() {
        let s = Flow {
            family: libc::AF_INET as u32,
            src_addr: vec![10, 0, 0, 1],
            src_port: 5000,
            dst_addr: vec![10, 0, 0, 2],
            dst_port: 80,
        };
        let [a, b] = keys(&s).unwrap();
        assert_eq!(&a.src[..4], &[10, 0, 0, 1]);
        assert_eq!(a.sport, [0x13, 0x88]);
        assert_eq!(b.src, a.dst);
        assert_eq!(b.dport, a.sport);
        assert_eq!(a.family, 4);
        assert_eq!(std::mem::size_of::<FlowKey>(), 40);
    }

    #[test]
    fn record_without_lock_time_parses() {
        let t = r#"{"pin_dir": "/sys/fs/bpf/cr/netlock-1-2", "filters": [{"ifname": "lo", "ingress": true, "priority": 1, "handle": 2}]}"#;
        let r: Record = serde_json::from_str(t).unwrap();
        assert_eq!(r.locked_at_ns, 0);
        assert_eq!(r.filters[0].ifname, "lo");
    }
}
