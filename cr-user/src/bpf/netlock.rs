//! The network lock of `--tcp-established`: cr's `cr_netlock` tc classifier (cr-ebpf/src/
//! netlock.rs) on the TCX ingress and egress hooks of the interfaces the connections use
//! (`lo`, and the one holding the local address), dropping every packet of the connections
//! listed in its map.
//!
//! While a dump runs, the lock is held by cr's own fds (the TCX links, the program, the map):
//! if cr dies, the kernel removes it, and the connections run on. Only a dump whose image is
//! complete and that kills the tree makes it outlive cr: [`NetLock::pin`] pins the map and the
//! links under `/sys/fs/bpf/cr/netlock-TAG/`, and the image records them ([`Record`]). Restore
//! checks the pins are there, rebuilds, then [`release`]s (`cr network-unlock` too): the link
//! pins removed (the kernel detaches them), then the map's. No clsact qdisc, no tc filter.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{TcAttach, TcAttachType};
use aya::programs::SchedClassifier;
use serde::{Deserialize, Serialize};

use crate::kernel::sys::sock::show_addr;

const PROG: &str = "cr_netlock";
const MAP: &str = "CR_NETLOCK";
const PIN_ROOT: &str = "/sys/fs/bpf/cr";

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

/// One TCX link of the lock: an interface and a direction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LinkRec {
    pub ifname: String,
    pub ingress: bool,
}

impl LinkRec {
    /// The link's pin, in the lock's pin directory.
    fn pin_name(&self) -> String {
        format!(
            "link-{}-{}",
            self.ifname,
            if self.ingress { "ingress" } else { "egress" }
        )
    }
}

/// What restore needs to find and remove a pinned lock (the image keeps it, framed).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Record {
    pub pin_dir: String,
    pub links: Vec<LinkRec>,
    /// When the first connection became locked (CLOCK_REALTIME, ns since the epoch): [`release`]
    /// logs how long the connections stayed locked, the downtime the lock itself cost
    /// (cr-bench's tcp section reads that line).
    pub locked_at_ns: u64,
}

impl Record {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    pub fn from_bytes(b: &[u8]) -> Result<Record> {
        serde_json::from_slice(b).context("parse the network lock record")
    }
}

/// Wall-clock time in ns since the epoch: dump and restore are different processes, possibly
/// on different machines, so a monotonic clock would not do.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A lock being built by a dump: everything held by cr's fds until [`NetLock::pin`].
pub struct NetLock {
    rec: Record,
    map: Map,
    /// The loaded object: its classifier is what the links run.
    obj: crate::bpf::BpfObject,
    links: Vec<FdLink>,
    /// The links once pinned (the pins hold them from then on).
    pinned: Vec<PinnedLink>,
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
    /// Loads a fresh lock (nothing attached, nothing pinned); `tag` names its pin directory.
    pub fn create(tag: &str) -> Result<NetLock> {
        let pin_dir = PathBuf::from(PIN_ROOT).join(format!("netlock-{tag}"));
        // Only the classifier and its map are used: the tracker's large maps at their
        // smallest, so loading costs little.
        let mut obj = crate::bpf::BpfObject::load_sized(Some(1))?;
        let map = obj.ebpf_mut().take_map(MAP).ok_or_else(|| {
            anyhow!("the eBPF object has no map {MAP} (stale build? run cargo xtask build)")
        })?;
        if !matches!(map, Map::HashMap(_)) {
            bail!("{MAP} is not a hash map");
        }
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
        Ok(NetLock {
            rec: Record {
                pin_dir: pin_dir.display().to_string(),
                links: Vec::new(),
                locked_at_ns: 0,
            },
            map,
            obj,
            links: Vec::new(),
            pinned: Vec::new(),
            addrs_done: Vec::new(),
        })
    }

    fn attach(&mut self, ifname: &str) -> Result<()> {
        if self.rec.links.iter().any(|l| l.ifname == ifname) {
            return Ok(());
        }
        let prog: &mut SchedClassifier = self
            .obj
            .ebpf_mut()
            .program_mut(PROG)
            .context("internal: the network-lock program vanished")?
            .try_into()
            .context("cr_netlock is not a classifier")?;
        let c = std::ffi::CString::new(ifname).context("interface name")?;
        for (ty, ingress) in [(TcAttachType::Ingress, true), (TcAttachType::Egress, false)] {
            let dir = if ingress { "ingress" } else { "egress" };
            let id = prog
                .attach(
                    c.as_c_str(),
                    TcAttach::Tcx {
                        attach_type: ty,
                        order: LinkOrder::default(),
                    },
                )
                .with_context(|| format!("attach the network lock to {ifname} {dir} (TCX)"))?;
            let link = prog.take_link(id).context("take the TCX link")?;
            let fd = FdLink::try_from(link)
                .map_err(|e| anyhow!("the TCX link of {ifname} {dir}: {e}"))?;
            self.links.push(fd);
            self.rec.links.push(LinkRec {
                ifname: ifname.to_string(),
                ingress,
            });
        }
        Ok(())
    }

    /// Locks one connection: its packets are dropped from now on, both ways.
    pub fn add(&mut self, s: &Flow) -> Result<()> {
        {
            let mut map: BpfHashMap<&mut MapData, FlowKey, u8> =
                BpfHashMap::try_from(&mut self.map).context("open the lock map")?;
            for k in keys(s)? {
                map.insert(&k, &1, 0)
                    .context("add a connection to the lock map")?;
            }
        }
        // Interfaces are found once per local address (a getifaddrs netlink dump each time
        // would cost more than the rest of locking a connection).
        if !self.addrs_done.contains(&s.src_addr) {
            for ifname in interfaces(s.family, &s.src_addr) {
                self.attach(&ifname)?;
            }
            self.addrs_done.push(s.src_addr.clone());
        }
        // Map entry and links in place: from here the first connection drops its packets.
        if self.rec.locked_at_ns == 0 {
            self.rec.locked_at_ns = now_ns();
        }
        Ok(())
    }

    /// Whether any connection is locked.
    pub fn is_used(&self) -> bool {
        self.rec.locked_at_ns != 0
    }

    pub fn record(&self) -> &Record {
        &self.rec
    }

    /// Makes the lock outlive cr (a complete image refers to it): the map and every link
    /// pinned in the record's directory.
    pub fn pin(&mut self) -> Result<()> {
        let dir = PathBuf::from(&self.rec.pin_dir);
        // Another cr releasing the last lock may remove the parent directory between
        // create_dir_all's two mkdirs: try again then.
        let mut made = std::fs::create_dir_all(&dir);
        for _ in 0..3 {
            match &made {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    made = std::fs::create_dir_all(&dir)
                }
                _ => break,
            }
        }
        made.with_context(|| {
            format!(
                "create {} (is bpffs mounted at /sys/fs/bpf?)",
                dir.display()
            )
        })?;
        match &self.map {
            Map::HashMap(d) => d
                .pin(dir.join("map"))
                .with_context(|| format!("pin the lock map in {}", dir.display()))?,
            _ => bail!("{MAP} is not a hash map"),
        }
        for (l, fd) in self.rec.links.iter().zip(std::mem::take(&mut self.links)) {
            let p = fd.pin(dir.join(l.pin_name())).with_context(|| {
                format!("pin the lock's link {} in {}", l.pin_name(), dir.display())
            })?;
            self.pinned.push(p);
        }
        log::info!("network lock pinned in {}", dir.display());
        Ok(())
    }
}

/// Logs how long the connections of `rec` were locked, now that they are not.
pub fn log_unlocked(rec: &Record) {
    let unlocked_at = now_ns();
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

/// Fails unless the pinned lock is still in place: every link pin, and every connection of
/// `socks` in the pinned map.
pub fn check_locked(rec: &Record, socks: &[Flow]) -> Result<()> {
    let dir = Path::new(&rec.pin_dir);
    for l in &rec.links {
        let p = dir.join(l.pin_name());
        PinnedLink::from_pin(&p).with_context(|| {
            format!(
                "the network lock ({}) is gone: the connections were not kept locked since the dump",
                p.display()
            )
        })?;
    }
    let path = dir.join("map");
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "the network lock ({}) is gone: the connections were not kept locked since the dump",
            path.display()
        )
    })?;
    let map: BpfHashMap<MapData, FlowKey, u8> =
        BpfHashMap::try_from(Map::HashMap(data)).context("open the lock map")?;
    for s in socks {
        for k in keys(s)? {
            if map.get(&k, 0).is_err() {
                bail!("TCP connection {s} is no longer locked");
            }
        }
    }
    Ok(())
}

/// How many of cr's network-lock programs are attached to the TCX hooks of `ifname` (in the
/// caller's network namespace), ingress and egress: what a lock leaves behind, for tests and
/// for `cr network-unlock`'s report.
pub fn attached_on(ifname: &str) -> Result<usize> {
    let c = std::ffi::CString::new(ifname).context("interface name")?;
    let mut n = 0;
    for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, progs) = SchedClassifier::query_tcx(c.as_c_str(), ty)
            .with_context(|| format!("query the TCX programs of {ifname}"))?;
        n += progs
            .iter()
            .filter(|p| p.name_as_str().is_some_and(|s| PROG.starts_with(s)))
            .count();
    }
    Ok(n)
}

/// Removes a pinned lock: its link pins (the kernel detaches the links: the connections pass
/// packets again), then its map's pin and directory. A pin already gone is fine.
pub fn release(rec: &Record) {
    let dir = Path::new(&rec.pin_dir);
    if !dir.starts_with(PIN_ROOT) {
        log::warn!(
            "not removing the network lock {}: it is not under {PIN_ROOT}",
            dir.display()
        );
        return;
    }
    for l in &rec.links {
        let p = dir.join(l.pin_name());
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("removing the network lock's link {}: {e}", p.display()),
        }
    }
    log_unlocked(rec);
    let _ = std::fs::remove_file(dir.join("map"));
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("removing {}: {e}", dir.display()),
    }
    // The last lock also takes cr's pin directory with it (another dump's lock keeps it:
    // remove_dir fails on a non-empty directory, which is fine).
    let _ = std::fs::remove_dir(PIN_ROOT);
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
    fn record_round_trips() {
        let r = Record {
            pin_dir: "/sys/fs/bpf/cr/netlock-1-2".into(),
            links: vec![LinkRec {
                ifname: "lo".into(),
                ingress: true,
            }],
            locked_at_ns: 7,
        };
        let back = Record::from_bytes(&r.to_bytes().unwrap()).unwrap();
        assert_eq!(back.links, r.links);
        assert_eq!(back.locked_at_ns, 7);
        assert_eq!(r.links[0].pin_name(), "link-lo-ingress");
    }
}
