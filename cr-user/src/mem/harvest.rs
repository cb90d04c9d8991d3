//! Harvesting at a checkpoint: what the target wrote since the last one (DESIGN §5).
//!
//! Two ways, one truth: PAGEMAP_SCAN reports a page PAGE_IS_WRITTEN once a write lifted its
//! userfaultfd-wp protection, and re-protects it in the same walk. Scanning every tracked VMA
//! that way is the exact harvest, O(mapped). The eBPF harvest scans only the 2 MiB blocks around
//! the pages whose write faults cr-ebpf recorded, plus the ranges of VMA-changing syscalls:
//! O(dirty). When something could have escaped the fault programs (a remote write, a lasting
//! source such as O_DIRECT, a lost record), the harvest is the exact one. The epoch is everything
//! between the end of the last checkpoint's freeze and this seize ([`Epoch::at_seize`]).

use std::collections::HashSet;

use anyhow::{Context, Result};
use cr_common::{vma_ev, PAGE_SHIFT};

use crate::bpf::maps::{Counters, TrackMaps};
use crate::kernel::sys::pagemap::{
    PageRegion, PagemapEntry, PagemapScanner, ScanQuery, PAGE_IS_FILE, PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN,
};
use crate::ranges::RangeSet;
use crate::tracker::client::{ProcTrack, TrackerState};

/// Size of the block one dirty page widens to (a PMD: a THP).
pub const BLOCK: u64 = 2 << 20;

/// The moment of the seize.
#[derive(Clone, Copy, Debug)]
pub struct Epoch {
    /// CLOCK_MONOTONIC at the seize, in ns (the clock of bpf_ktime_get_ns).
    pub seize_ns: u64,
    /// The counters right after the seize.
    pub at_seize: Counters,
}

impl Epoch {
    /// Call right after the target is frozen.
    pub fn at_seize(maps: &TrackMaps, pid: i32) -> Result<Epoch> {
        Ok(Epoch {
            seize_ns: crate::kernel::sys::time::monotonic_ns(),
            at_seize: maps.counters(pid as u32)?,
        })
    }
}

/// What the programs saw in one epoch.
#[derive(Debug, Default)]
pub struct EpochFacts {
    /// Pages (numbers) whose write faults were recorded.
    pub dirty: Vec<u64>,
    /// Ranges of the target's VMA-changing syscalls.
    pub vma_ranges: RangeSet,
    /// brk moved (the heap's end changed).
    pub brk: bool,
    /// An event with no usable range (mlockall): everything may have changed.
    pub all_vmas: bool,
    /// The target exec'd: its address space is new.
    pub exec: bool,
    /// Why the eBPF set cannot be trusted this time (empty: it can).
    pub unsafe_why: Vec<String>,
    /// A lasting source (fd, mem-file writer) is present: the next harvest is exact too.
    pub sticky_next: bool,
    /// VMA events of the epoch (for the statistics).
    pub vma_events: u64,
}

/// The tree's records, taken once per dump at its first harvest (the ring and the mem-writer
/// map hold every target's): the VMA events, the dirty pages by process, and the mem-file
/// writers that were not cr.
#[derive(Debug, Default)]
pub struct Drained {
    vma_events: Vec<cr_common::VmaEvent>,
    dirty: std::collections::HashMap<u32, Vec<u64>>,
    /// (target: 0 for any mem file, why, the opener still holds it).
    writers: Vec<(u32, String, bool)>,
}

impl Drained {
    /// Consumes the records of every target; `live`: the tree's processes (mem-writer records
    /// of other targets are left alone).
    pub fn take(maps: &mut TrackMaps, state: &TrackerState, live: &[i32]) -> Result<Drained> {
        let t0 = std::time::Instant::now();
        let mut d = Drained::default();
        // Mem-file writers: cr's own (its remote calls write through /proc/PID/mem) are
        // dropped; a stranger's makes this epoch unsafe, and the next one too while it lives.
        let me = std::process::id();
        for (k, count) in maps.mem_writers()? {
            if k.target != 0 && !live.contains(&(k.target as i32)) {
                continue;
            }
            let own = k.opener == me || state.dumpers.contains(&(k.opener as i32));
            if !own {
                let why = format!(
                    "PID {} opened {} for writing ({count} times)",
                    k.opener,
                    if k.target == 0 {
                        "a mem file".to_string()
                    } else {
                        format!("/proc/{}/mem", k.target)
                    }
                );
                // While it still holds such a file open, it can write at any time.
                let holds = holds_mem_file(k.opener as i32, k.target);
                d.writers.push((k.target, why, holds));
                if holds {
                    continue;
                }
            }
            maps.remove_mem_writer(&k)?;
        }
        d.vma_events = maps.drain_vma_events();
        for (t, p) in maps.drain_dirty() {
            d.dirty.entry(t).or_default().push(p);
        }
        log::debug!(
            "the tree's eBPF records taken in {:?}: {} VMA events, dirty pages of {} processes",
            t0.elapsed(),
            d.vma_events.len(),
            d.dirty.len()
        );
        Ok(d)
    }
}

/// The epoch of process `pid` (tracked at the last checkpoint as `proc`): its dirty set and
/// VMA events out of `drained`, its counters against its baseline, the mem-file writers, and
/// its lasting sources of fault-less writes. Its epoch in the programs is bumped.
pub fn read_epoch(
    maps: &mut TrackMaps,
    pid: i32,
    proc: &ProcTrack,
    drained: &Drained,
    epoch: &Epoch,
) -> Result<EpochFacts> {
    let t0 = std::time::Instant::now();
    let mut f = EpochFacts::default();
    let now = &epoch.at_seize;
    let base = &proc.baseline;
    f.exec = now.exec_events != base.exec_events;
    let mut moved = now.moved(base);
    moved.retain(|m| !m.ends_with(" execs"));
    if now.gup_events != base.gup_events || now.sticky_events != base.sticky_events {
        moved.push(format!("last such syscall: nr {}", now.last_unsafe_nr));
    }
    f.unsafe_why.extend(moved);
    f.sticky_next = now.sticky_events != base.sticky_events;
    if proc.sticky {
        f.unsafe_why
            .push("the last checkpoint saw a lasting source of fault-less writes".into());
    }
    f.vma_events = now.vma_events.wrapping_sub(base.vma_events);
    for (target, why, holds) in &drained.writers {
        if *target == pid as u32 || *target == 0 {
            f.unsafe_why.push(why.clone());
            f.sticky_next |= holds;
        }
    }
    for why in lasting_sources(pid) {
        f.unsafe_why.push(why);
        f.sticky_next = true;
    }
    let t_fds = t0.elapsed();
    for ev in &drained.vma_events {
        if ev.tgid != pid as u32 || ev.ts_ns >= epoch.seize_ns {
            continue; // another target, or cr's own remote calls during the freeze
        }
        match ev.kind {
            vma_ev::RANGE => {
                f.vma_ranges = f
                    .vma_ranges
                    .union(&RangeSet::from_ranges(vec![(ev.start, ev.end)]))
            }
            vma_ev::BRK => f.brk = true,
            _ => f.all_vmas = true,
        }
    }
    f.dirty = drained
        .dirty
        .get(&(pid as u32))
        .cloned()
        .unwrap_or_default();
    f.dirty.sort_unstable();
    f.dirty.dedup();
    // Writes from now on are the next epoch's (for looks at CR_DIRTY: `peek`, hotness).
    maps.tracker.bump_epoch(pid as u32)?;
    log::debug!(
        "PID {pid}: epoch read in {:?} (counters, writers and fds {:?})",
        t0.elapsed(),
        t_fds
    );
    Ok(f)
}

/// Ways the target's memory can be written without faults that stay open: fds with O_DIRECT,
/// io_uring and AIO contexts, KVM and device fds, an open `/proc/PID/mem`. One reason per kind.
pub fn lasting_sources(pid: i32) -> Vec<String> {
    let mut why = HashSet::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return vec![];
    };
    for e in rd.flatten() {
        let link = std::fs::read_link(e.path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if link == "anon_inode:[io_uring]" {
            why.insert("an io_uring fd".to_string());
        } else if link.starts_with("anon_inode:kvm")
            || link == "/dev/kvm"
            || link.starts_with("/dev/vfio")
            || link.starts_with("/dev/infiniband")
        {
            why.insert(format!("a device fd ({link})"));
        } else if link.starts_with("/proc/") && link.ends_with("/mem") {
            why.insert(format!("an open {link}"));
        }
        let name = e.file_name();
        if let Ok(info) =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", name.to_string_lossy()))
        {
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .unwrap_or(0);
            if flags & libc::O_DIRECT as u32 != 0 {
                why.insert("an O_DIRECT fd".to_string());
            }
        }
    }
    let mut v: Vec<String> = why.into_iter().collect();
    v.sort();
    v
}

/// Whether process `opener` has an fd open on `/proc/<target>/mem` (target 0: any mem file).
/// (A child it forked the fd into is not looked for.)
fn holds_mem_file(opener: i32, target: u32) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{opener}/fd")) else {
        return false; // gone
    };
    rd.flatten().any(|e| {
        let l = std::fs::read_link(e.path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        l.ends_with("/mem") && (target == 0 || l == format!("/proc/{target}/mem"))
    })
}

/// The 2 MiB blocks around `pages` (page numbers), as a range set.
pub fn blocks_of(pages: &[u64]) -> RangeSet {
    RangeSet::from_sorted(pages.iter().map(|p| {
        let a = (p << PAGE_SHIFT) & !(BLOCK - 1);
        (a, a + BLOCK)
    }))
}

/// The query of every harvest scan: populated pages (present or swapped), reporting whether
/// each was written; with `rearm`, what matches is write-protected again in the same walk and
/// a VMA not registered for async write-protection fails the scan (EPERM).
pub fn harvest_query(rearm: bool) -> ScanQuery {
    ScanQuery {
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT
            | PAGE_IS_SWAPPED
            | PAGE_IS_WRITTEN
            | PAGE_IS_FILE
            | PAGE_IS_PFNZERO,
        wp_matching: rearm,
        check_wpasync: rearm,
        ..Default::default()
    }
}

/// Scans `[start, end)` with [`harvest_query`]. Ok(None) if the range is not registered for
/// write-protection (the caller treats the VMA as new).
pub fn scan_range(
    s: &mut PagemapScanner,
    start: u64,
    end: u64,
    rearm: bool,
    out: &mut Vec<PageRegion>,
) -> Result<Option<()>> {
    scan_with(s, start, end, &harvest_query(rearm), out)
}

/// Scans `[start, end)` for the pages written since the last checkpoint and re-arms them
/// ([`ScanQuery::written`]: the kernel's fast path). Ok(None) if the range is not registered.
/// Unpopulated pages without a marker come out as written: only a syscall that zaps pages
/// (watched by the programs: its range is in the epoch's VMA ranges) leaves those, and
/// [`refine_written`] sorts them out there.
pub fn scan_written(
    s: &mut PagemapScanner,
    start: u64,
    end: u64,
    out: &mut Vec<PageRegion>,
) -> Result<Option<()>> {
    scan_with(s, start, end, &ScanQuery::written(true), out)
}

/// The written `regions` of a fast scan ([`scan_written`]) with unpopulated pages sorted out:
/// outside `zapped` (where nothing can have unmapped a page) they are data as reported; inside,
/// only what `before` (a [`harvest_query`] scan of `zapped` taken before the re-arm, which turns
/// none ptes into markers) shows holding data is, with its categories.
pub fn refine_written(
    regions: &[PageRegion],
    zapped: &RangeSet,
    before: &[PageRegion],
) -> Vec<PageRegion> {
    let written = RangeSet::from_sorted(regions.iter().map(|r| (r.start, r.end)));
    let hit = written.intersect(zapped);
    let mut out: Vec<PageRegion> = written
        .subtract(&hit)
        .ranges()
        .iter()
        .map(|&(start, end)| PageRegion {
            start,
            end,
            categories: PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
        })
        .collect();
    if !hit.is_empty() {
        for r in before {
            for &(start, end) in hit.clip(r.start, r.end).ranges() {
                out.push(PageRegion {
                    start,
                    end,
                    categories: r.categories | PAGE_IS_WRITTEN,
                });
            }
        }
    }
    out.sort_by_key(|r| r.start);
    out
}

fn scan_with(
    s: &mut PagemapScanner,
    start: u64,
    end: u64,
    q: &ScanQuery,
    out: &mut Vec<PageRegion>,
) -> Result<Option<()>> {
    let rearm = q.wp_matching;
    match s.scan_into(start, end, q, out) {
        Ok(()) => Ok(Some(())),
        Err(e) => {
            let eperm = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.raw_os_error())
                    == Some(libc::EPERM)
            });
            if rearm && eperm {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// Whether a swap device is active: if not, every "swapped" page PAGEMAP_SCAN reports in a
/// write-protected VMA is a uffd-wp pte marker (an untouched page), not data.
pub fn swap_active() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .map(|t| t.lines().count() > 1)
        .unwrap_or(true)
}

/// `SWP_PTE_MARKER` as /proc/PID/pagemap shows it: swap type 31 in the low 5 bits of the
/// frame (MAX_SWAPFILES_SHIFT is 5 on every architecture; the marker type is the last one).
const SWP_TYPE_PTE_MARKER: u64 = 31;

/// The pages of `[start, end)` (all reported swapped) that hold data: real swap entries, not
/// uffd-wp markers. Reads the raw pagemap entries (the frame field needs CAP_SYS_ADMIN, which
/// cr has; without it nothing is a marker and the pages are kept).
pub fn real_swapped(s: &PagemapScanner, start: u64, end: u64) -> Result<RangeSet> {
    let n = ((end - start) >> PAGE_SHIFT) as usize;
    let entries = s
        .read_entries(start, n)
        .with_context(|| format!("raw pagemap of {start:#x}-{end:#x}"))?;
    Ok(RangeSet::from_sorted(
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !is_marker(**e))
            .map(|(i, _)| {
                let a = start + ((i as u64) << PAGE_SHIFT);
                (a, a + (1 << PAGE_SHIFT))
            }),
    ))
}

fn is_marker(e: PagemapEntry) -> bool {
    e.swapped() && e.uffd_wp() && (e.0 & 0x1f) == SWP_TYPE_PTE_MARKER
}

/// How a scanned page is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageFate {
    /// Copied into this image.
    Copy,
    /// Unchanged since the parent, which has it.
    Parent,
    /// No data (a zero page, a file page, an untouched page).
    Absent,
}

/// What a region of a harvest scan means for the dump, given the parent's pages. A page that
/// is unwritten but not in the parent is copied (it cannot happen if the tracking is right; it
/// costs a page, never correctness) unless it is a swapped-looking marker.
pub fn fate(categories: u64, in_parent: bool) -> PageFate {
    if categories & (PAGE_IS_PFNZERO | PAGE_IS_FILE) != 0 {
        PageFate::Absent
    } else if categories & PAGE_IS_WRITTEN != 0 {
        PageFate::Copy
    } else if in_parent {
        PageFate::Parent
    } else if categories & PAGE_IS_PRESENT != 0 {
        PageFate::Copy
    } else {
        // Swapped-looking and unwritten: a marker (the caller checks real swap entries).
        PageFate::Absent
    }
}

/// Page numbers of the WRITTEN pages of `regions` (for comparing harvests in tests and logs).
pub fn written_pages(regions: &[PageRegion]) -> Vec<u64> {
    let mut v = Vec::new();
    for r in regions {
        if r.categories & PAGE_IS_WRITTEN != 0
            && r.categories & (PAGE_IS_PFNZERO | PAGE_IS_FILE) == 0
        {
            v.extend((r.start >> PAGE_SHIFT)..(r.end >> PAGE_SHIFT));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_widen_and_merge() {
        let b = blocks_of(&[0x200, 0x201, 0x3ff, 0x400, 0x1000]);
        // 0x200 pages = 2 MiB: pages 0x200..0x400 are one block, 0x400 the next (merged).
        assert_eq!(
            b.ranges(),
            &[(0x20_0000, 0x60_0000), (0x100_0000, 0x120_0000)]
        );
    }

    #[test]
    fn fates() {
        assert_eq!(
            fate(PAGE_IS_PRESENT | PAGE_IS_WRITTEN, true),
            PageFate::Copy
        );
        assert_eq!(fate(PAGE_IS_PRESENT, true), PageFate::Parent);
        assert_eq!(fate(PAGE_IS_SWAPPED, true), PageFate::Parent);
        assert_eq!(fate(PAGE_IS_PRESENT, false), PageFate::Copy);
        assert_eq!(fate(PAGE_IS_SWAPPED, false), PageFate::Absent);
        assert_eq!(
            fate(PAGE_IS_PRESENT | PAGE_IS_WRITTEN | PAGE_IS_PFNZERO, false),
            PageFate::Absent
        );
        assert_eq!(
            fate(PAGE_IS_SWAPPED | PAGE_IS_WRITTEN, false),
            PageFate::Copy
        );
    }

    #[test]
    fn refined_written_pages() {
        let w = |start, end| PageRegion {
            start,
            end,
            categories: PAGE_IS_WRITTEN,
        };
        // Written 0x1000-0x5000 and 0x8000-0x9000; a zap range 0x3000-0x9000 where, before the
        // re-arm, only 0x4000-0x5000 held a page (0x3000 was unmapped by MADV_DONTNEED, 0x8000
        // is the zero page).
        let regions = [w(0x1000, 0x5000), w(0x8000, 0x9000)];
        let zapped = RangeSet::from_ranges(vec![(0x3000, 0x9000)]);
        let before = [
            PageRegion {
                start: 0x4000,
                end: 0x5000,
                categories: PAGE_IS_PRESENT,
            },
            PageRegion {
                start: 0x8000,
                end: 0x9000,
                categories: PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
            },
        ];
        let r = refine_written(&regions, &zapped, &before);
        let fates: Vec<_> = r
            .iter()
            .map(|r| (r.start, r.end, fate(r.categories, false)))
            .collect();
        assert_eq!(
            fates,
            vec![
                (0x1000, 0x3000, PageFate::Copy),
                (0x4000, 0x5000, PageFate::Copy),
                (0x8000, 0x9000, PageFate::Absent),
            ]
        );
        // Nothing zapped: as reported.
        let r = refine_written(&regions, &RangeSet::new(), &[]);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|r| fate(r.categories, true) == PageFate::Copy));
    }

    #[test]
    fn markers_are_told_from_swap_entries() {
        // As read on this kernel: a uffd-wp marker is SWAP | UFFD_WP with frame 0x3f.
        assert!(is_marker(PagemapEntry(0x4200_0000_0000_003f)));
        // A real swap entry (type 0, some offset) with the wp bit.
        assert!(!is_marker(PagemapEntry(0x4200_0000_0001_2340)));
        // A present page.
        assert!(!is_marker(PagemapEntry(0x8300_0000_0014_eb28)));
    }
}

/// A look at a target's tracking without consuming anything (tests, diagnostics).
#[derive(Debug)]
pub struct Peek {
    /// Pages the eBPF write-fault set holds for the target, sorted.
    pub ebpf: Vec<u64>,
    /// Pages PAGEMAP_SCAN reports written (and populated) in the given ranges, sorted.
    pub written: Vec<u64>,
    /// Why the next harvest could not trust the eBPF set (empty: it could). VMA events are
    /// not included (peeking the ring would consume it): see `vma_events`.
    pub unsafe_why: Vec<String>,
    /// VMA-changing syscalls since the last checkpoint.
    pub vma_events: u64,
    pub state: TrackerState,
}

/// Reads the tracker of `pid` and the written bits of `ranges` (which must be tracked VMAs),
/// changing nothing.
pub fn peek(pid: i32, ranges: &[(u64, u64)]) -> Result<Peek> {
    let conn = crate::tracker::client::TrackerConn::connect(pid)?
        .with_context(|| format!("PID {pid} has no tracker"))?;
    let snap = conn.get()?;
    let maps = TrackMaps::from_fds(snap.map_fds)?;
    let state = snap.state;
    // The hash keeps pages of earlier epochs too; this epoch's carry its number.
    let epoch = maps.tracker.epoch(pid as u32)?;
    let ebpf = maps
        .tracker
        .dirty(pid as u32)?
        .into_iter()
        .filter(|p| p.epoch == epoch)
        .map(|p| p.page)
        .collect();
    let mut scanner = PagemapScanner::open(pid)?;
    let mut regions = Vec::new();
    for &(s, e) in ranges {
        scanner.scan_into(s, e, &harvest_query(false), &mut regions)?;
    }
    let mut written = written_pages(&regions);
    written.sort_unstable();
    let now = maps.counters(pid as u32)?;
    let root = state.procs.iter().find(|p| p.pid == pid);
    let baseline = root.map(|p| p.baseline).unwrap_or_default();
    let mut unsafe_why = now.moved(&baseline);
    if root.is_some_and(|p| p.sticky) {
        unsafe_why.push("sticky".into());
    }
    for (k, n) in maps.mem_writers()? {
        let ours = k.target == pid as u32 || k.target == 0;
        if ours && !state.dumpers.contains(&(k.opener as i32)) {
            unsafe_why.push(format!(
                "PID {} opened a mem file for writing ({n} times)",
                k.opener
            ));
        }
    }
    unsafe_why.extend(lasting_sources(pid));
    Ok(Peek {
        ebpf,
        written,
        unsafe_why,
        vma_events: now.vma_events.wrapping_sub(baseline.vma_events),
        state,
    })
}
