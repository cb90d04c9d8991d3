//! Every map of the tracking programs in one place, whether this process loaded them (the
//! tracker process, [`TrackMaps::load`]) or received their fds from it
//! ([`TrackMaps::from_fds`]): the write-fault [`Tracker`] (targets, dirty pages, counters), the
//! syscall programs' per-target counters (CR_TRACK), their VMA event ring (CR_VMA_EVENTS) and the
//! `/proc/PID/mem` writers (CR_MEM_WRITERS).

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, IterableMap, MapData, RingBuf};
use cr_common::{
    names, stat, DirtyEvent, MemWriterKey, TrackState, VmaEvent, TARGET_F_RING,
    TARGET_F_TRACK_WRITES,
};
use serde::{Deserialize, Serialize};

use super::dirty::Tracker;
use super::loader::{BpfObject, Received};
use super::locks::LockMaps;
use super::sockets::SockMaps;

/// Map fds are handed over in this order.
const FD_ORDER: [&str; 8] = [
    names::TARGETS,
    names::DIRTY,
    names::STATS,
    names::TRACK,
    names::VMA_EVENTS,
    names::MEM_WRITERS,
    names::TIDS,
    names::DIRTY_RING,
];

/// How many map fds the tracker hands over: the core maps (FD_ORDER), then the socket
/// table's, then the lock table's.
pub const MAP_FDS: usize = FD_ORDER.len() + SockMaps::FDS + LockMaps::FDS;

/// Counters of one target at one moment: the syscall programs' CR_TRACK entry and the global
/// loss counters of CR_STATS. Compared between checkpoints (see [`Counters::moved`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub vma_events: u64,
    pub gup_events: u64,
    pub sticky_events: u64,
    pub exec_events: u64,
    pub last_unsafe_nr: u64,
    pub dirty_lost: u64,
    pub vma_lost: u64,
    pub mem_writers_lost: u64,
    pub track_missing: u64,
    /// Write faults recorded (user and kernel mode), all targets: what a checkpoint will
    /// have to copy, at most.
    #[serde(default)]
    pub write_faults: u64,
}

impl Counters {
    /// What moved from `then` to `self`, as short reasons (empty: nothing).
    pub fn moved(&self, then: &Counters) -> Vec<String> {
        let mut why = Vec::new();
        let mut d = |now: u64, was: u64, what: &str| {
            if now != was {
                why.push(format!("{} {what}", now.wrapping_sub(was)));
            }
        };
        d(
            self.dirty_lost,
            then.dirty_lost,
            "write faults lost (dirty map full)",
        );
        d(
            self.gup_events,
            then.gup_events,
            "remote-write syscalls (process_vm_writev, ptrace POKE, AIO)",
        );
        d(
            self.sticky_events,
            then.sticky_events,
            "O_DIRECT/io_uring/AIO setups",
        );
        d(self.exec_events, then.exec_events, "execs");
        d(self.vma_lost, then.vma_lost, "VMA events lost (ring full)");
        d(
            self.mem_writers_lost,
            then.mem_writers_lost,
            "mem-file openers lost (map full)",
        );
        d(
            self.track_missing,
            then.track_missing,
            "events of an unregistered target",
        );
        why
    }
}

/// All maps of a loaded tracking object.
pub struct TrackMaps {
    pub tracker: Tracker,
    track: HashMap<MapData, u32, TrackState>,
    vma_events: RingBuf<MapData>,
    mem_writers: HashMap<MapData, MemWriterKey, u64>,
    tids: HashMap<MapData, u32, u32>,
    dirty_ring: RingBuf<MapData>,
    /// The TCP socket table (cr-ebpf/src/sock.rs).
    pub sockets: SockMaps,
    /// The file-lock table (cr-ebpf/src/locks.rs).
    pub locks: LockMaps,
}

impl TrackMaps {
    /// Loads cr's eBPF object and attaches the write-fault, syscall and exec programs (the
    /// tracker process does this once). `dirty_max_entries` overrides CR_DIRTY's size.
    pub fn load(dirty_max_entries: Option<u32>) -> Result<TrackMaps> {
        let mut obj = BpfObject::load_sized(dirty_max_entries)?;
        let targets = obj.take_map(names::TARGETS)?;
        let dirty = obj.take_map(names::DIRTY)?;
        let stats = obj.take_map(names::STATS)?;
        let track = obj.take_map(names::TRACK)?;
        let vma_events = obj.take_map(names::VMA_EVENTS)?;
        let mem_writers = obj.take_map(names::MEM_WRITERS)?;
        let tids = obj.take_map(names::TIDS)?;
        let dirty_ring = obj.take_map(names::DIRTY_RING)?;
        let mut sockets = SockMaps::take(&mut obj)?;
        let mut locks = LockMaps::take(&mut obj)?;
        obj.attach_fault_tracepoints()?;
        obj.attach_syscall_tracepoints()?;
        sockets.attach(&mut obj)?;
        locks.attach(&mut obj)?;
        Ok(TrackMaps {
            tracker: Tracker::from_maps(targets, dirty, stats, Some(obj)),
            track,
            vma_events,
            mem_writers,
            tids,
            dirty_ring,
            sockets,
            locks,
        })
    }

    /// Duplicates of the map fds, in the order [`TrackMaps::from_fds`] expects.
    pub fn fds(&self) -> Result<Vec<OwnedFd>> {
        let (targets, dirty, stats) = self.tracker.maps();
        let fds = [
            targets.map().fd().as_fd(),
            dirty.map().fd().as_fd(),
            stats.map().fd().as_fd(),
            self.track.map().fd().as_fd(),
            self.vma_events.as_fd(),
            self.mem_writers.map().fd().as_fd(),
            self.tids.map().fd().as_fd(),
            self.dirty_ring.as_fd(),
        ];
        let mut out = fds
            .iter()
            .zip(FD_ORDER)
            .map(|(fd, name)| {
                fd.try_clone_to_owned()
                    .with_context(|| format!("dup the fd of map {name}"))
            })
            .collect::<Result<Vec<_>>>()?;
        out.extend(self.sockets.fds()?);
        out.extend(self.locks.fds()?);
        Ok(out)
    }

    /// The maps of an object loaded by another process, from the fds it sent (in
    /// [`TrackMaps::fds`] order). Each is checked to be the map it claims to be.
    pub fn from_fds(mut fds: Vec<OwnedFd>) -> Result<TrackMaps> {
        if fds.len() != MAP_FDS {
            bail!("the tracker sent {} map fds, expected {MAP_FDS}", fds.len(),);
        }
        let lock_fds = fds.split_off(FD_ORDER.len() + SockMaps::FDS);
        let sock_fds = fds.split_off(FD_ORDER.len());
        let mut it = Received::open(fds, &FD_ORDER)?;
        let targets = it.next()?;
        let dirty = it.next()?;
        let stats = it.next()?;
        let track = it.next()?;
        let vma_events = it.next()?;
        let mem_writers = it.next()?;
        let tids = it.next()?;
        let dirty_ring = it.next()?;
        Ok(TrackMaps {
            tracker: Tracker::from_maps(targets, dirty, stats, None),
            track,
            vma_events,
            mem_writers,
            tids,
            dirty_ring,
            sockets: SockMaps::from_fds(sock_fds)?,
            locks: LockMaps::from_fds(lock_fds)?,
        })
    }

    /// Starts tracking process `tgid`: write faults and syscalls. Its current threads are
    /// recorded by task id (new ones by the fork program), so that a syscall naming any of
    /// them (process_vm_writev, ptrace, /proc/TID/mem) is recognized.
    pub fn add_target(&mut self, tgid: u32) -> Result<()> {
        self.track
            .insert(&tgid, &TrackState::default(), 0)
            .with_context(|| format!("add process {tgid} to CR_TRACK"))?;
        self.tracker
            .add_target(tgid, TARGET_F_TRACK_WRITES | TARGET_F_RING)?;
        for tid in crate::kernel::proc::task::threads(tgid as i32).unwrap_or_default() {
            if tid as u32 != tgid {
                self.tids
                    .insert(&(tid as u32), &tgid, 0)
                    .with_context(|| format!("add thread {tid} of process {tgid} to CR_TIDS"))?;
            }
        }
        Ok(())
    }

    /// Stops tracking process `tgid` (it left the tree): write faults first, then its
    /// counters (an event in between counts as one of an unregistered target, which only
    /// makes the next harvest exact).
    pub fn remove_target(&mut self, tgid: u32) -> Result<()> {
        self.tracker.remove_target(tgid)?;
        match self.track.remove(&tgid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("remove process {tgid} from CR_TRACK")),
        }
    }

    /// The counters of `tgid` now.
    pub fn counters(&self, tgid: u32) -> Result<Counters> {
        let t = self
            .track
            .get(&tgid, 0)
            .with_context(|| format!("read the CR_TRACK entry of process {tgid}"))?;
        let s = self.tracker.stats()?;
        Ok(Counters {
            vma_events: t.vma_events,
            gup_events: t.gup_events,
            sticky_events: t.sticky_events,
            exec_events: t.exec_events,
            last_unsafe_nr: t.last_unsafe_nr,
            dirty_lost: s.dirty_lost,
            vma_lost: self.stat(stat::VMA_LOST)?,
            mem_writers_lost: self.stat(stat::MEM_WRITERS_LOST)?,
            track_missing: self.stat(stat::TRACK_MISSING)?,
            write_faults: s.write_faults.wrapping_add(s.kernel_write_faults),
        })
    }

    fn stat(&self, i: u32) -> Result<u64> {
        let (_, _, stats) = self.tracker.maps();
        let v = stats
            .get(&i, 0)
            .with_context(|| format!("read counter {i} of CR_STATS"))?;
        Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// Takes every queued VMA event (of every target of this object).
    pub fn drain_vma_events(&mut self) -> Vec<VmaEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.vma_events.next() {
            if item.len() >= std::mem::size_of::<VmaEvent>() {
                // SAFETY: the record was written by cr-ebpf as a VmaEvent (repr(C), integers
                // only); read_unaligned copes with the ring's 8-byte alignment either way.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const VmaEvent) });
            }
        }
        out
    }

    /// Takes every queued write fault: (tgid, page) pairs, in fault order, duplicates
    /// included. A read of the ring's memory, no syscall per record.
    pub fn drain_dirty(&mut self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        while let Some(item) = self.dirty_ring.next() {
            if item.len() >= std::mem::size_of::<DirtyEvent>() {
                // SAFETY: the record was written by cr-ebpf as a DirtyEvent (repr(C), integers
                // only); read_unaligned copes with any alignment.
                let e = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DirtyEvent) };
                out.push((e.tgid, e.page));
            }
        }
        out
    }

    /// Every recorded `/proc/PID/mem` opener (for writing), with its open count.
    pub fn mem_writers(&self) -> Result<Vec<(MemWriterKey, u64)>> {
        let mut out = Vec::new();
        for kv in self.mem_writers.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(e).context("read CR_MEM_WRITERS"),
            }
        }
        Ok(out)
    }

    /// Forgets a recorded opener.
    pub fn remove_mem_writer(&mut self, k: &MemWriterKey) -> Result<()> {
        match self.mem_writers.remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e).context("remove an entry of CR_MEM_WRITERS"),
        }
    }
}
