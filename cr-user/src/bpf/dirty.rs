//! The write-fault tracker: which pages each tracked process wrote, as cr-ebpf's
//! exceptions:page_fault_user / page_fault_kernel programs record them in CR_DIRTY, keyed by
//! (tgid, page).
//!
//! A page shows up only if the write faulted (the first write to a fresh page, or the first after
//! a re-arm of the write-protection); writes without a fault in the target (process_vm_writev,
//! O_DIRECT, io_uring, …) are the syscall programs' to see. The set is exact only while
//! [`Tracker::lost`] is false: a write the programs could not record bumps a shared counter, and
//! the harvest is then the exact scan.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, IterableMap, MapData, PerCpuArray};
use cr_common::{names, stat, PageInfo, PageKey, TargetInfo};

use super::loader::BpfObject;

/// Counters of the write-fault programs, summed over CPUs, since this tracker was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// User-mode write faults recorded.
    pub write_faults: u64,
    /// Write faults that could not be recorded: the dirty set is incomplete.
    pub dirty_lost: u64,
    /// Read faults of targets (seen, deliberately not recorded).
    pub read_faults: u64,
    /// Kernel-mode write faults recorded (copy_to_user on the target's behalf, e.g. read()).
    pub kernel_write_faults: u64,
}

/// One dirty page of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyPage {
    /// Page number (address >> PAGE_SHIFT).
    pub page: u64,
    /// Write faults seen on it since it entered the set (hotness).
    pub writes: u64,
    /// Target epoch of the last write seen.
    pub epoch: u64,
}

impl DirtyPage {
    /// One entry of CR_DIRTY as the callers see it: every way of reading the map (walk, take,
    /// batch take) returns the same thing.
    fn of_entry(k: &PageKey, v: &PageInfo) -> DirtyPage {
        DirtyPage {
            page: k.page,
            writes: v.writes,
            epoch: v.epoch,
        }
    }
}

/// The maps of a [`Tracker`]: targets, dirty pages, counters.
pub type TrackerMaps<'a> = (
    &'a HashMap<MapData, u32, TargetInfo>,
    &'a HashMap<MapData, PageKey, PageInfo>,
    &'a PerCpuArray<MapData, u64>,
);

/// The loaded and attached write-fault tracker. Dropping it detaches the programs and frees
/// the maps.
pub struct Tracker {
    targets: HashMap<MapData, u32, TargetInfo>,
    dirty: HashMap<MapData, PageKey, PageInfo>,
    stats: PerCpuArray<MapData, u64>,
    // The programs hold their own references to the maps, so drop order does not matter.
    // None for a tracker built from map fds received from the process that loaded them.
    obj: Option<BpfObject>,
}

impl Tracker {
    /// Loads cr's eBPF object and attaches the write-fault programs. Nothing is recorded until
    /// a target is added.
    pub fn start() -> Result<Tracker> {
        let mut obj = BpfObject::load()?;
        let targets = obj.take_map(names::TARGETS)?;
        let dirty = obj.take_map(names::DIRTY)?;
        let stats = obj.take_map(names::STATS)?;
        obj.attach_fault_tracepoints()?;
        Ok(Tracker {
            targets,
            dirty,
            stats,
            obj: Some(obj),
        })
    }

    /// A tracker over maps of an object loaded elsewhere: by [`super::maps::TrackMaps`] (which
    /// attaches more programs to the same object) or from fds handed over by the tracker
    /// process. The programs run as long as their loader keeps them attached.
    pub fn from_maps(
        targets: HashMap<MapData, u32, TargetInfo>,
        dirty: HashMap<MapData, PageKey, PageInfo>,
        stats: PerCpuArray<MapData, u64>,
        obj: Option<BpfObject>,
    ) -> Tracker {
        Tracker {
            targets,
            dirty,
            stats,
            obj,
        }
    }

    /// The maps (targets, dirty pages, counters), e.g. to hand their fds to another process.
    pub fn maps(&self) -> TrackerMaps<'_> {
        (&self.targets, &self.dirty, &self.stats)
    }

    /// Starts recording process `tgid` (all its threads) with `flags` (cr_common::TARGET_F_*;
    /// TARGET_F_TRACK_WRITES to record). Re-adding keeps the epoch and replaces the flags.
    pub fn add_target(&mut self, tgid: u32, flags: u64) -> Result<()> {
        let epoch = self.targets.get(&tgid, 0).map(|t| t.epoch).unwrap_or(0);
        self.targets
            .insert(&tgid, &TargetInfo { epoch, flags }, 0)
            .with_context(|| {
                format!(
                    "add process {tgid} to the tracked set (at most {} targets)",
                    cr_common::TARGETS_MAX_ENTRIES
                )
            })
    }

    /// The processes recorded now (keys of CR_TARGETS).
    pub fn targets(&self) -> Vec<u32> {
        self.targets.keys().filter_map(|k| k.ok()).collect()
    }

    /// Stops recording `tgid`. Its dirty pages stay until [`Tracker::clear`].
    pub fn remove_target(&mut self, tgid: u32) -> Result<()> {
        match self.targets.remove(&tgid) {
            Err(e) if !is_not_found(&e) => {
                Err(e).with_context(|| format!("remove process {tgid} from the tracked set"))
            }
            _ => Ok(()),
        }
    }

    /// The current epoch of `tgid`.
    pub fn epoch(&self, tgid: u32) -> Result<u64> {
        Ok(self
            .targets
            .get(&tgid, 0)
            .with_context(|| format!("process {tgid} is not tracked"))?
            .epoch)
    }

    /// Starts a new epoch for `tgid` and returns it: pages written from now on carry it, so a
    /// harvest can tell them from pages it already took.
    pub fn bump_epoch(&mut self, tgid: u32) -> Result<u64> {
        let mut t = self
            .targets
            .get(&tgid, 0)
            .with_context(|| format!("process {tgid} is not tracked"))?;
        t.epoch += 1;
        self.targets
            .insert(&tgid, &t, 0)
            .with_context(|| format!("set the epoch of process {tgid}"))?;
        Ok(t.epoch)
    }

    /// The dirty pages of `tgid` with their write counts, sorted by page. Walks the whole map
    /// (all targets): O(entries).
    pub fn dirty(&self, tgid: u32) -> Result<Vec<DirtyPage>> {
        let mut out = Vec::new();
        for kv in self.dirty.iter() {
            let (k, v) = match kv {
                Ok(kv) => kv,
                // Removed between get_next_key and lookup (a concurrent clear): skip it.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e).context("read the dirty-page map"),
            };
            if k.tgid == tgid {
                out.push(DirtyPage::of_entry(&k, &v));
            }
        }
        out.sort_unstable_by_key(|p| p.page);
        Ok(out)
    }

    /// The dirty page numbers of `tgid`, sorted.
    pub fn dirty_pages(&self, tgid: u32) -> Result<Vec<u64>> {
        Ok(self.dirty(tgid)?.into_iter().map(|p| p.page).collect())
    }

    /// Takes the dirty set of `tgid`: each entry is read and deleted in one step
    /// (BPF_MAP_LOOKUP_AND_DELETE_ELEM), so a write racing with the harvest either is in the
    /// result or re-creates its entry for the next harvest; it is never lost.
    pub fn take_dirty(&mut self, tgid: u32) -> Result<Vec<DirtyPage>> {
        let keys = self.keys_of(tgid)?;
        let fd = self.dirty.map().fd().as_fd();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = lookup_and_delete::<PageKey, PageInfo>(fd.as_raw_fd(), &k, "CR_DIRTY")?
            {
                out.push(DirtyPage::of_entry(&k, &v));
            }
        }
        out.sort_unstable_by_key(|p| p.page);
        Ok(out)
    }

    /// Takes the whole dirty set (every target of this tracker) with
    /// BPF_MAP_LOOKUP_AND_DELETE_BATCH: a few syscalls instead of two per page, which is what
    /// keeps an eBPF harvest O(dirty) while the target is frozen. Like [`Tracker::take_dirty`],
    /// each entry is read and deleted atomically. Returns (tgid, page) pairs, unsorted.
    pub fn take_all_dirty(&mut self) -> Result<Vec<(u32, DirtyPage)>> {
        let fd = self.dirty.map().fd().as_fd().as_raw_fd();
        const BATCH: usize = 8192;
        let mut keys = vec![PageKey::default(); BATCH];
        let mut values = vec![PageInfo::default(); BATCH];
        let mut out = Vec::new();
        let mut token: Option<u64> = None;
        loop {
            let (n, next, done) = lookup_and_delete_batch(fd, token, &mut keys, &mut values)?;
            for (k, v) in keys[..n].iter().zip(&values[..n]) {
                out.push((k.tgid, DirtyPage::of_entry(k, v)));
            }
            if done {
                return Ok(out);
            }
            token = Some(next);
        }
    }

    /// Forgets the dirty pages of `tgid`. Returns how many were removed.
    pub fn clear(&mut self, tgid: u32) -> Result<usize> {
        let keys = self.keys_of(tgid)?;
        let mut n = 0;
        for k in keys {
            match self.dirty.remove(&k) {
                Ok(()) => n += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).context("remove an entry of the dirty-page map"),
            }
        }
        Ok(n)
    }

    fn keys_of(&self, tgid: u32) -> Result<Vec<PageKey>> {
        let mut keys = Vec::new();
        for k in self.dirty.keys() {
            let k = k.context("list the dirty-page map")?;
            if k.tgid == tgid {
                keys.push(k);
            }
        }
        Ok(keys)
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let get = |i: u32| -> Result<u64> {
            let v = self
                .stats
                .get(&i, 0)
                .with_context(|| format!("read counter {i} of CR_STATS"))?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(Stats {
            write_faults: get(stat::WRITE_FAULTS)?,
            dirty_lost: get(stat::DIRTY_LOST)?,
            read_faults: get(stat::READ_FAULTS)?,
            kernel_write_faults: get(stat::KERNEL_WRITE_FAULTS)?,
        })
    }

    /// True once a write fault could not be recorded: the dirty sets of this tracker are then
    /// incomplete and the caller must harvest with the exact PAGEMAP_SCAN instead (see the
    /// module docs). The counter is cumulative; it never goes back to zero on its own.
    pub fn lost(&self) -> Result<bool> {
        Ok(self.stats()?.dirty_lost > 0)
    }

    /// Forwards pending eBPF log records (`-v4` with TARGET_F_LOG) to cr's log now.
    pub fn flush_log(&self) {
        if let Some(o) = &self.obj {
            o.flush_log();
        }
    }

    /// The loaded object (None when built from received map fds), e.g. to attach further
    /// programs that share it.
    pub fn object_mut(&mut self) -> Option<&mut BpfObject> {
        self.obj.as_mut()
    }
}

/// The key was not in the map (aya reports it as KeyNotFound or as ENOENT from the syscall).
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)` for a hash map: the value of `key`, removed, or None
/// if the key is absent. (aya 0.16 does not expose it.)
fn lookup_and_delete<K, V: Default>(map_fd: i32, key: &K, map: &str) -> Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = V::default();
    let attr = ElemAttr {
        map_fd: map_fd as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    // SAFETY: the attr is the map-element member of union bpf_attr (map_fd, key, value, flags;
    // the kernel zero-extends a shorter attr); key and value point to live objects of the
    // map's key and value types (checked by aya when the map was typed).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        bail!("BPF_MAP_LOOKUP_AND_DELETE_ELEM on {map}: {e}");
    }
    Ok(Some(value))
}

/// One `bpf(BPF_MAP_LOOKUP_AND_DELETE_BATCH)` call on a hash map: fills `keys`/`values` from the
/// bucket after `token` (None: from the start). Returns (entries returned, next token, done).
/// (aya 0.16 does not expose batch operations.)
fn lookup_and_delete_batch<K, V>(
    map_fd: i32,
    token: Option<u64>,
    keys: &mut [K],
    values: &mut [V],
) -> Result<(usize, u64, bool)> {
    const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let in_tok = token.unwrap_or(0);
    let mut out_tok: u64 = 0;
    let cap = keys.len().min(values.len());
    let mut attr = BatchAttr {
        in_batch: if token.is_some() {
            &in_tok as *const u64 as u64
        } else {
            0
        },
        out_batch: &mut out_tok as *mut u64 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: cap as u32,
        map_fd: map_fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the attr is the `batch` member of union bpf_attr; keys/values point to `cap`
    // writable elements of the map's key and value types (checked by aya when the map was
    // typed); the batch tokens point to live u64s (the hash map's token is a u32 bucket index,
    // which fits).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let n = (attr.count as usize).min(cap);
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            // The end of the map: `count` entries were still returned.
            return Ok((n, out_tok, true));
        }
        bail!("BPF_MAP_LOOKUP_AND_DELETE_BATCH on CR_DIRTY: {e}");
    }
    Ok((n, out_tok, false))
}
