//! The tracker's TCP socket table: maps of cr-ebpf/src/sock.rs, taken from a loaded object
//! (the tracker) or rebuilt from the fds it hands out (a dump).
//!
//! The tracker attaches the programs when it loads (so every state change from then on is
//! seen), then seeds the table once, at the first `Get` (the dump that started it asks at
//! once), with the sockets the targets' trees already had ([`SockMaps::seed_once`], given a
//! sock_diag scan by the tracker), inserted with BPF_NOEXIST so that an entry an event made
//! meanwhile wins, then a second scan drops seeded entries whose socket closed in between.
//! The processes of each tree go into CR_SOCK_PROCS so that their connects and listens count
//! (the fork program adds later children). A table that cannot be attached or seeded is
//! "unavailable" and says so (the STATUS slot of CR_SOCK_STATS): dumps then scan; memory
//! tracking does not depend on it.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use cr_common::sock::{
    names, sock_stat, status, tcp_state, ListenKey, SockInfo, SockKey, SOCK_F_CHILD, SOCK_F_SEEDED,
};
use cr_common::TargetInfo;

use super::loader::BpfObject;
use super::tracefs;

const BPF_NOEXIST: u64 = 1;

/// The table's counters and status, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// `cr_common::sock::status::*`.
    pub status: u64,
    pub events: u64,
    pub applied: u64,
    pub lost: u64,
    pub desync: u64,
    pub untrackable: u64,
    pub children: u64,
    pub read_errors: u64,
}

impl TableStats {
    /// Why the table cannot be trusted to hold every socket of the targets (None: it can).
    pub fn unusable(&self) -> Option<String> {
        let mut why = Vec::new();
        match self.status {
            status::READY => {}
            status::ATTACHED => why.push(
                "the tracker's socket table was never seeded with the sockets its target had"
                    .to_string(),
            ),
            _ => why.push(
                "the tracker's socket table is unavailable (its programs are not attached)"
                    .to_string(),
            ),
        }
        if self.lost != 0 {
            why.push(format!(
                "the tracker's socket table lost {} entries (a map was full)",
                self.lost
            ));
        }
        if self.untrackable != 0 {
            why.push(format!(
                "{} listener(s) without a bound port cannot be followed",
                self.untrackable
            ));
        }
        if self.read_errors != 0 {
            why.push(format!(
                "{} tracepoint records could not be read",
                self.read_errors
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

struct Inner {
    socks: HashMap<MapData, SockKey, SockInfo>,
    listeners: HashMap<MapData, ListenKey, u32>,
    stats: PerCpuArray<MapData, u64>,
    /// Only in the tracker (the process that loaded the programs).
    own: Option<Own>,
}

struct Own {
    procs: HashMap<MapData, u32, u32>,
    /// CR_TARGETS of the same object, found through the programs' map ids once attached.
    targets: Option<HashMap<MapData, u32, TargetInfo>>,
    seeded: bool,
}

/// The socket table's maps.
pub struct SockMaps {
    inner: Mutex<Inner>,
}

impl SockMaps {
    /// How many map fds [`SockMaps::fds`] hands over: CR_SOCKS, CR_SOCK_LISTENERS,
    /// CR_SOCK_STATS.
    pub const FDS: usize = 3;

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the maps out of a freshly loaded object (before its programs are attached).
    pub fn take(obj: &mut BpfObject) -> Result<SockMaps> {
        let inner = Inner {
            socks: obj.take_map(names::SOCKS)?,
            listeners: obj.take_map(names::LISTENERS)?,
            stats: obj.take_map(names::SOCK_STATS)?,
            own: Some(Own {
                procs: obj.take_map(names::SOCK_PROCS)?,
                targets: None,
                seeded: false,
            }),
        };
        Ok(SockMaps {
            inner: Mutex::new(inner),
        })
    }

    /// Attaches the programs. A failure leaves the table unavailable (dumps scan) but is no
    /// error: memory tracking does not need it.
    pub fn attach(&mut self, obj: &mut BpfObject) -> Result<()> {
        match self.try_attach(obj) {
            Ok(()) => {
                set_status(&mut self.lock().stats, status::ATTACHED)?;
                log::debug!("TCP socket table attached");
            }
            Err(e) => log::warn!(
                "the TCP socket table is unavailable (dumps will scan sockets instead): {e:#}"
            ),
        }
        Ok(())
    }

    fn try_attach(&mut self, obj: &mut BpfObject) -> Result<()> {
        tracefs::sock_layout().context("the layout of sock:inet_sock_set_state")?;
        obj.attach_tracepoint(names::PROG_SOCK_STATE, "sock", "inet_sock_set_state")?;
        obj.attach_tracepoint(names::PROG_SOCK_FORK, "sched", "sched_process_fork")?;
        obj.attach_tracepoint(names::PROG_SOCK_EXIT, "sched", "sched_process_exit")?;
        let targets = find_targets_map(obj)?;
        if let Some(own) = self.lock().own.as_mut() {
            own.targets = Some(targets);
        }
        Ok(())
    }

    /// In the tracker, the first call seeds the table with the sockets `scan` finds in the
    /// targets' trees (see the module doc); later calls, and dumps, do nothing. A table that
    /// cannot be seeded stays unusable (dumps scan): logged, not an error.
    pub fn seed_once(&self, scan: Scan) {
        let mut g = self.lock();
        if let Err(e) = seed_once(&mut g, scan) {
            log::warn!(
                "the TCP socket table could not be seeded (dumps will scan sockets instead): {e:#}"
            );
        }
    }

    /// Duplicates of the map fds, in the order [`SockMaps::from_fds`] expects.
    pub fn fds(&self) -> Result<Vec<OwnedFd>> {
        let g = self.lock();
        [
            (g.socks.map().fd().as_fd(), names::SOCKS),
            (g.listeners.map().fd().as_fd(), names::LISTENERS),
            (g.stats.map().fd().as_fd(), names::SOCK_STATS),
        ]
        .into_iter()
        .map(|(fd, name)| {
            fd.try_clone_to_owned()
                .with_context(|| format!("dup the fd of map {name}"))
        })
        .collect()
    }

    /// The maps from `FDS` fds sent by the tracker.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<SockMaps> {
        let mut it = super::loader::Received::open(
            fds,
            &[names::SOCKS, names::LISTENERS, names::SOCK_STATS],
        )?;
        let inner = Inner {
            socks: it.next()?,
            listeners: it.next()?,
            stats: it.next()?,
            own: None,
        };
        Ok(SockMaps {
            inner: Mutex::new(inner),
        })
    }

    /// The counters and the status.
    pub fn stats(&self) -> Result<TableStats> {
        let g = self.lock();
        let slot = |i: u32| -> Result<u64> {
            let v = g
                .stats
                .get(&i, 0)
                .with_context(|| format!("read counter {i} of {}", names::SOCK_STATS))?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(TableStats {
            status: slot(sock_stat::STATUS)?,
            events: slot(sock_stat::EVENTS)?,
            applied: slot(sock_stat::APPLIED)?,
            lost: slot(sock_stat::LOST)?,
            desync: slot(sock_stat::DESYNC)?,
            untrackable: slot(sock_stat::UNTRACKABLE)?,
            children: slot(sock_stat::CHILDREN)?,
            read_errors: slot(sock_stat::READ_ERRORS)?,
        })
    }

    /// Every entry of the table (all targets of the tracker).
    pub fn entries(&self) -> Result<Vec<(SockKey, SockInfo)>> {
        let g = self.lock();
        let mut out = Vec::new();
        for kv in g.socks.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                // Removed between the key walk and the lookup: the socket closed.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).with_context(|| format!("read {}", names::SOCKS)),
            }
        }
        Ok(out)
    }

    /// The listeners the programs attribute connections with: (key, target).
    pub fn listeners(&self) -> Result<Vec<(ListenKey, u32)>> {
        let g = self.lock();
        let mut out = Vec::new();
        for kv in g.listeners.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).with_context(|| format!("read {}", names::LISTENERS)),
            }
        }
        Ok(out)
    }
}

/// Writes the STATUS slot (CPU 0's value; the others stay 0, so the sum is the status).
fn set_status(stats: &mut PerCpuArray<MapData, u64>, value: u64) -> Result<()> {
    let n = aya::util::nr_cpus()
        .map_err(|(what, e)| anyhow!("{what}: {e}"))?
        .get() as usize;
    let mut v = vec![0u64; n];
    v[0] = value;
    let values = PerCpuValues::try_from(v).context("per-CPU values")?;
    stats
        .set(sock_stat::STATUS, values, 0)
        .with_context(|| format!("write the status of {}", names::SOCK_STATS))
}

/// CR_TARGETS of the object `obj` loaded: the map of that name among those the socket
/// program uses (it was taken out of the object before this table's turn).
fn find_targets_map(obj: &mut BpfObject) -> Result<HashMap<MapData, u32, TargetInfo>> {
    let prog = obj
        .ebpf_mut()
        .program(names::PROG_SOCK_STATE)
        .with_context(|| format!("the eBPF object has no program {}", names::PROG_SOCK_STATE))?;
    let info = prog.info().context("read the socket program's info")?;
    let ids = info
        .map_ids()
        .context("read the socket program's map ids")?
        .unwrap_or_default();
    for id in ids {
        let Ok(data) = MapData::from_id(id) else {
            continue;
        };
        let named = data
            .info()
            .ok()
            .and_then(|i| i.name_as_str().map(|n| n == cr_common::names::TARGETS))
            .unwrap_or(false);
        if named {
            let map = Map::from_map_data(data).context("CR_TARGETS has an unknown type")?;
            return HashMap::try_from(map).context("CR_TARGETS has an unexpected type");
        }
    }
    bail!(
        "the socket program does not use a map named {}",
        cr_common::names::TARGETS
    )
}

/// A socket a scan found, to seed the table with.
#[derive(Clone, Copy, Debug)]
pub struct Seed {
    pub key: SockKey,
    /// A process of the tree holding it.
    pub pid: u32,
    pub state: u32,
    /// Spawned by a listener of the tree.
    pub from_listener: bool,
}

/// What finds the sockets of a tree (`crate::tcp::inventory::seeds`: a sock_diag scan).
pub type Scan<'a> = &'a dyn Fn(&[i32]) -> Result<Vec<Seed>>;

/// Seeds the table with the targets' existing sockets, once (tracker side only).
fn seed_once(g: &mut Inner, scan: Scan) -> Result<()> {
    let Inner {
        socks,
        listeners,
        stats,
        own,
    } = g;
    let Some(own) = own.as_mut() else {
        return Ok(());
    };
    if own.seeded {
        return Ok(());
    }
    own.seeded = true;
    let Some(targets_map) = own.targets.as_ref() else {
        // Not attached: nothing to seed, the status says unavailable.
        return Ok(());
    };
    let targets: Vec<u32> = targets_map.keys().filter_map(|k| k.ok()).collect();
    let mut seeded: BTreeSet<SockKey> = BTreeSet::new();
    let mut per_target = Vec::new();
    for &t in &targets {
        let pids = crate::kernel::proc::task::descendants(t as i32);
        for &p in &pids {
            if p as u32 != t {
                own.procs.insert(&(p as u32), &t, 0).with_context(|| {
                    format!(
                        "add process {p} of the tree of {t} to {}",
                        names::SOCK_PROCS
                    )
                })?;
            }
        }
        let mut n = 0;
        for s in &scan(&pids)? {
            let key = s.key;
            let info = SockInfo {
                skaddr: 0,
                tgid: t,
                pid: s.pid,
                state: s.state,
                flags: SOCK_F_SEEDED | if s.from_listener { SOCK_F_CHILD } else { 0 },
            };
            match socks.insert(&key, &info, BPF_NOEXIST) {
                Ok(()) => {
                    seeded.insert(key);
                    n += 1;
                }
                Err(e) if exists(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("seed {}", names::SOCKS)),
            }
            if s.state == tcp_state::LISTEN {
                let lk = ListenKey {
                    addr: key.laddr,
                    port: key.lport,
                    family: key.family,
                    _pad: 0,
                };
                match listeners.insert(&lk, &t, BPF_NOEXIST) {
                    Ok(()) => {}
                    Err(e) if exists(&e) => {}
                    Err(e) => return Err(e).with_context(|| format!("seed {}", names::LISTENERS)),
                }
            }
        }
        per_target.push((t, pids, n));
    }
    // A socket that closed between the scan and its insertion was seeded after its last
    // event: the second scan finds it gone.
    for (t, pids, n) in &per_target {
        let live: BTreeSet<SockKey> = scan(pids)?.iter().map(|s| s.key).collect();
        for key in seeded.iter().filter(|k| !live.contains(k)) {
            if let Ok(v) = socks.get(key, 0) {
                if v.tgid == *t && v.skaddr == 0 && v.flags & SOCK_F_SEEDED != 0 {
                    let _ = socks.remove(key);
                }
            }
        }
        log::info!(
            "TCP socket table seeded with {n} socket(s) of the tree of PID {t} ({} processes)",
            pids.len()
        );
    }
    set_status(stats, status::READY)
}

fn exists(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST))
}
