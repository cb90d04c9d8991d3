//! Incremental dumps: `cr pre-dump`, `--track-mem`, `--prev-images-dir` (DESIGN §2, §5).
//!
//! A [`Session`] is the memory part of a dump when tracking is involved, for every process of
//! the tree: before the freeze ([`Session::prepare`]) it finds or starts the root's tracker and
//! checks the parent image; frozen, it harvests each process, plans every page as copied,
//! `in_parent` or absent, copies and re-arms ([`Session::memory`], once per process), and
//! hands the tracker the new state of the whole tree ([`Session::end_freeze`]); after the
//! commit it tells the tracker its new base image.
//!
//! Each process has its own userfaultfd (one per mm), armed by the first dump that sees it and
//! held by the tracker with the others; a process first seen (forked since the last checkpoint,
//! or a recycled PID) is copied whole once and tracked from then on, one that exited is dropped.
//!
//! `in_parent` is right because the tracker's state names the image of the last checkpoint
//! (path and inventory CRC) and write-protection was re-armed at that checkpoint's freeze: a page
//! present now and not written since was present then. Without a tracker the session is "plain"
//! and the dump is a full one.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::dump as memory;
use super::pages::{self, PendingPages, PlanItem, WarmBuffers};
use crate::bpf::maps::TrackMaps;
use crate::image::dir::{self as imgdir, ImageDir, ImageWriter};
use crate::image::pages::PageWriter;
use crate::image::{pb, vma};
use crate::kernel::interrupt;
use crate::kernel::proc::maps::{Vma, VmaName};
use crate::kernel::ptrace::{self, Remote, Tracee};
use crate::kernel::sys::pagemap::{PageRegion, PagemapScanner, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN};
use crate::kernel::sys::uffd::Userfaultfd;
use crate::mem::arm;
use crate::mem::harvest::{self, Drained, Epoch, EpochFacts, PageFate};
use crate::ranges::RangeSet;
use crate::tracker::client::{self, ProcTrack, TrackerConn, TrackerState};
use crate::tunables::Harvest;

const PAGE: u64 = 4096;

/// Scattered ranges past which an eBPF harvest covering most of the memory becomes one exact
/// scan instead.
const MANY_RANGES: usize = 256;

/// The tracker and what it handed over.
struct Tracked {
    conn: TrackerConn,
    maps: TrackMaps,
    /// The userfaultfds the tracker holds, by PID (one per process of its state).
    uffds: HashMap<i32, Userfaultfd>,
    state: TrackerState,
}

/// The parent image a dump builds on.
struct Parent {
    /// As given (relative to the images dir, as CRIU has it).
    rel: String,
    crc: u32,
    /// Its checkpoint id (0: an image from before ids).
    id: u64,
    img: ImageDir,
    /// Every page the parent chain holds, per process (read when first asked; None: the
    /// parent has no page map of that process).
    pages: HashMap<i32, Option<RangeSet>>,
}

impl Parent {
    /// The pages the parent chain holds for process `pid`, if the parent has its page map.
    fn pages_of(&mut self, pid: i32) -> Option<&RangeSet> {
        let img = &self.img;
        self.pages
            .entry(pid)
            .or_insert_with(|| {
                let pm = img.page_map(pid).ok()?;
                Some(RangeSet::from_ranges(
                    pm.runs
                        .iter()
                        .map(|r| (r.vaddr, r.vaddr + u64::from(r.nr_pages) * PAGE))
                        .collect(),
                ))
            })
            .as_ref()
    }
}

/// What [`Session::memory`] produced for one process.
pub struct MemoryDump {
    pub vmas: Vec<pb::Vma>,
    pub pages: PendingPages,
    pub stats: pb::DumpStats,
}

/// How tracked VMAs are read at this checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    /// Scan (and re-arm) only where the eBPF records point.
    Ebpf(RangeSet),
    /// Scan (and re-arm) every tracked VMA; unchanged pages are `in_parent`. `zaps_known`: the
    /// programs saw every syscall of the epoch that can unmap pages (the VMA events are
    /// complete), so unpopulated pages can only be inside their ranges.
    Exact { zaps_known: bool },
    /// No usable parent: copy everything, re-arm.
    FullRearm,
    /// A dump that must not consume the tracking state (no tracking options given): copy
    /// everything, change nothing.
    FullPeek,
}

/// What the command line asks of memory tracking.
pub struct Tracking<'a> {
    /// `-D`: this image's directory (it exists).
    pub images_dir: &'a Path,
    /// `--track-mem`.
    pub track_mem: bool,
    /// `-R`.
    pub leave_running: bool,
    /// `--prev-images-dir`, relative to `images_dir`.
    pub prev_images_dir: Option<&'a Path>,
}

/// One process armed (or re-armed) by this dump: its new tracking, and its userfaultfd when
/// this dump created it (otherwise the tracker's stays).
struct Armed {
    track: ProcTrack,
    fresh: Option<Userfaultfd>,
}

pub struct Session {
    /// The root of the tree.
    pid: i32,
    pre_dump: bool,
    /// Consume the dirty set (this dump is a checkpoint of the tracking chain).
    harvest: bool,
    /// Re-arm and keep the tracker for later dumps.
    keep_tracking: bool,
    tracked: Option<Tracked>,
    parent: Option<Parent>,
    /// Why this dump is not incremental (when it harvests without a parent).
    full_reason: String,
    /// Canonical path of this image.
    image: String,
    /// smaps read before the freeze, with the VMA and exec counters read just before it, per
    /// tracked process.
    pre_smaps: HashMap<i32, (u64, u64, Vec<Vma>)>,
    /// The counters at the seize, per process the programs follow.
    epochs: HashMap<i32, Epoch>,
    /// The live processes of the frozen tree.
    live: Vec<i32>,
    /// The tracker was told its base image is gone (once per dump, before the first harvest).
    invalidated: bool,
    /// The tree's eBPF records, taken at the first harvest of this dump.
    drained: Option<Drained>,
    /// The processes armed by this dump, in tree order (handed over by `end_freeze`).
    next: Vec<Armed>,
    /// The tracker state handed over at the end of the freeze.
    put: bool,
}

impl Session {
    /// The connection to the target's tracker and the maps it handed over, when one runs for
    /// it: the dump's socket inventory and lock survey read the tracker's tables through them
    /// (one connection, one `Get` per dump).
    pub fn tracker(&self) -> Option<(&TrackerConn, &TrackMaps)> {
        self.tracked.as_ref().map(|t| (&t.conn, &t.maps))
    }

    /// Before the freeze. `pid` passed `tree::target::check_root`.
    pub fn prepare(
        o: &Tracking,
        pre_dump: bool,
        pid: i32,
        warm: &mut WarmBuffers,
    ) -> Result<Session> {
        let want = pre_dump || o.track_mem;
        let keep_wanted = want && (pre_dump || o.leave_running);
        let image = canonical(o.images_dir)?;
        let start_time = crate::kernel::proc::stat::read_stat(pid)?.starttime;
        let mut conn = TrackerConn::connect(pid)?;
        let mut snap = None;
        if let Some(c) = &conn {
            let s = c.get()?;
            if s.state.pid != pid || s.state.start_time != start_time {
                log::warn!(
                    "the tracker on {} is for another process (PID reused): stopping it",
                    client::socket_name(pid)
                );
                let _ = c.stop();
                conn = None;
            } else {
                snap = Some(s);
            }
        }
        if conn.is_none() && keep_wanted {
            let c = client::spawn(pid, crate::tunables::get().dirty_max_entries)?;
            snap = Some(c.get()?);
            conn = Some(c);
        }
        if let Some(c) = &conn {
            c.register()?;
        }
        let tracked = match (conn, snap) {
            (Some(conn), Some(s)) => {
                let client::Snapshot {
                    state,
                    map_fds,
                    uffds,
                } = s;
                let uffds = state
                    .procs
                    .iter()
                    .map(|p| p.pid)
                    .zip(uffds.into_iter().map(Userfaultfd::from_fd))
                    .collect();
                Some(Tracked {
                    maps: TrackMaps::from_fds(map_fds)?,
                    uffds,
                    state,
                    conn,
                })
            }
            _ => None,
        };
        let harvest = tracked.is_some() && (want || o.prev_images_dir.is_some());
        let keep_tracking = harvest && (pre_dump || o.leave_running);
        let mut full_reason = String::new();
        let parent = match (o.prev_images_dir, &tracked) {
            (None, _) => {
                full_reason = "no --prev-images-dir".into();
                None
            }
            (Some(rel), None) => {
                full_reason = format!(
                    "no tracker runs for PID {pid}, so nothing says what changed since {}",
                    rel.display()
                );
                None
            }
            (Some(rel), Some(t)) => match check_parent(o.images_dir, rel, pid, &t.state) {
                Ok(p) => Some(p),
                Err(e) => {
                    full_reason = format!("{e:#}");
                    None
                }
            },
        };
        if o.prev_images_dir.is_some() && parent.is_none() {
            log::warn!("PID {pid}: full dump: {full_reason}");
        }
        let mut pre_smaps = HashMap::new();
        if let Some(t) = &tracked {
            let c = t.maps.counters(pid as u32)?;
            if parent.is_some() {
                // Have page buffers ready for what the epoch's write faults say will be copied
                // (a fresh buffer's first touch zeroes its pages: better now than frozen).
                let faults = c
                    .write_faults
                    .saturating_sub(t.state.procs.first().map_or(0, |p| p.baseline.write_faults));
                warm.warm(pages::budget(faults.saturating_mul(PAGE) + (8 << 20)));
            }
            pre_smaps.insert(
                pid,
                (
                    c.vma_events,
                    c.exec_events,
                    crate::kernel::proc::maps::read_smaps(pid)?,
                ),
            );
            // The other tracked processes' too (a process that went meanwhile is read frozen).
            for p in t.state.procs.iter().filter(|p| p.pid != pid) {
                let same = crate::kernel::proc::stat::read_stat(p.pid)
                    .is_ok_and(|s| s.starttime == p.start_time);
                if !same {
                    continue;
                }
                if let (Ok(c), Ok(smaps)) = (
                    t.maps.counters(p.pid as u32),
                    crate::kernel::proc::maps::read_smaps(p.pid),
                ) {
                    pre_smaps.insert(p.pid, (c.vma_events, c.exec_events, smaps));
                }
            }
        }
        Ok(Session {
            pid,
            pre_dump,
            harvest,
            keep_tracking,
            tracked,
            parent,
            full_reason,
            image,
            pre_smaps,
            epochs: HashMap::new(),
            live: Vec::new(),
            invalidated: false,
            drained: None,
            next: Vec::new(),
            put: false,
        })
    }

    /// Right after the seize; `live`: the tree's processes that are not zombies.
    pub fn frozen(&mut self, live: &[i32]) -> Result<()> {
        self.live = live.to_vec();
        if let Some(t) = &self.tracked {
            self.epochs
                .insert(self.pid, Epoch::at_seize(&t.maps, self.pid)?);
            // Processes the programs do not follow yet (first seen) have no counters.
            for &p in live.iter().filter(|&&p| p != self.pid) {
                if let Ok(e) = Epoch::at_seize(&t.maps, p) {
                    self.epochs.insert(p, e);
                }
            }
        }
        Ok(())
    }

    /// The VMA list (smaps) of process `pid`, frozen. With a tracker, the smaps read before the
    /// freeze is reused when no VMA-changing syscall happened since and /proc/PID/maps still
    /// shows the same layout: reading smaps walks every page table (docs/benchmarks.md).
    pub fn vmas(&self, pid: i32) -> Result<Vec<Vma>> {
        if let (Some((vma_events, execs, pre)), Some(ep)) =
            (self.pre_smaps.get(&pid), self.epochs.get(&pid))
        {
            if ep.at_seize.vma_events == *vma_events && ep.at_seize.exec_events == *execs {
                let now = crate::kernel::proc::maps::read_maps(pid)?;
                if same_layout(&now, pre) {
                    log::debug!(
                        "PID {pid}: VMA list unchanged since the smaps read before the freeze"
                    );
                    return Ok(pre.clone());
                }
            }
        }
        crate::kernel::proc::maps::read_smaps(pid)
    }

    /// Everything about the memory of process `pid` of the tree that needs it frozen: the VMA
    /// entries, the page plan and its copy, and (when tracking goes on) the arming. `t` is one
    /// of its threads, `ip` a `syscall` instruction in it (found from the vDSO when None and
    /// needed), `skip` VMAs whose pages another process of the tree saves (shared memory).
    #[allow(clippy::too_many_arguments)]
    pub fn memory(
        &mut self,
        pid: i32,
        t: &mut Tracee,
        ip: Option<u64>,
        vmas: &[Vma],
        w: &ImageWriter,
        warm: &mut WarmBuffers,
        skip: &[(u64, u64)],
    ) -> Result<MemoryDump> {
        let t_mem = Instant::now();
        let root = pid == self.pid;
        let Some(tr) = self.tracked.as_mut() else {
            return plain_memory(pid, vmas, w, t_mem, warm, skip, "memory is not tracked");
        };
        if self.keep_tracking && self.next.len() >= client::MAX_TRACKED_PROCS {
            log::info!(
                "PID {pid}: harvest full (a tracker holds at most {} processes): copied whole, not tracked",
                client::MAX_TRACKED_PROCS
            );
            return plain_memory(
                pid,
                vmas,
                w,
                t_mem,
                warm,
                skip,
                "a tracker holds at most so many processes",
            );
        }
        let start_time = crate::kernel::proc::stat::read_stat(pid)?.starttime;
        let epoch = self.epochs.get(&pid).copied();
        if root && epoch.is_none() {
            bail!("internal: the session was not told the target is frozen");
        }
        // The last checkpoint's tracking of this very process (not a recycled PID).
        let known = tr
            .state
            .proc(pid, start_time)
            .filter(|_| epoch.is_some())
            .cloned();
        let mut entries = Vec::with_capacity(vmas.len());
        let mut wanted: Vec<&Vma> = Vec::new();
        for v in vmas {
            let e = memory::vma_entry(v)?;
            if e.kind == vma::KIND_UNSUPPORTED {
                crate::refuse!(
                    None,
                    "mapping {:#x}-{:#x} ({}) of PID {pid} is not supported",
                    v.start,
                    v.end,
                    e.name
                );
            }
            if memory::wants_pages(v, e.kind) && !skip.contains(&(v.start, v.end)) {
                wanted.push(v);
            }
            entries.push(e);
        }
        let t_h = Instant::now();
        let mut facts = EpochFacts::default();
        if self.harvest {
            if !self.invalidated {
                // From here until the new state is put, the tracker has no base image: a dump
                // that dies now cannot leave a state a later dump would trust.
                let t_inv = Instant::now();
                tr.conn.invalidate()?;
                self.invalidated = true;
                log::debug!(
                    "PID {pid}: tracker state invalidated in {:?}",
                    t_inv.elapsed()
                );
            }
            if self.drained.is_none() {
                self.drained = Some(Drained::take(&mut tr.maps, &tr.state, &self.live)?);
            }
            let drained = self.drained.as_ref().expect("taken above");
            if let (Some(k), Some(ep)) = (&known, &epoch) {
                facts = harvest::read_epoch(&mut tr.maps, pid, k, drained, ep)?;
            }
        }
        let armed = tr.state.armed && known.is_some() && tr.uffds.contains_key(&pid) && !facts.exec;
        let tracked_before = known.as_ref().map(|k| &k.tracked);
        let (mut tracked_vmas, mut new_vmas, mut other_vmas) = (Vec::new(), Vec::new(), Vec::new());
        for v in wanted {
            if !arm::trackable(v) {
                other_vmas.push(v);
            } else if armed && tracked_before.is_some_and(|r| r.covers(v.start, v.end)) {
                tracked_vmas.push(v);
            } else {
                new_vmas.push(v);
            }
        }
        let tracked_set = RangeSet::from_sorted(tracked_vmas.iter().map(|v| (v.start, v.end)));
        let empty = RangeSet::new();
        let (parent_pages, why_full) = match (&mut self.parent, &known) {
            (None, _) => (None, self.full_reason.clone()),
            (Some(_), None) => (
                None,
                format!(
                    "PID {pid} first seen (not tracked at the parent checkpoint): copied whole once, tracked from now on"
                ),
            ),
            (Some(p), Some(_)) => match p.pages_of(pid) {
                Some(pp) => (Some(pp), String::new()),
                None => (None, format!("the parent image has no page map of PID {pid}")),
            },
        };
        let (mode, reason) = choose_mode(
            self.harvest,
            parent_pages.is_some(),
            &why_full,
            &facts,
            &tracked_set,
            &tracked_vmas,
        );
        log::info!(
            "PID {pid}: harvest {} ({reason}): {} eBPF dirty pages, {} VMA events, {} tracked / {} new / {} other VMAs",
            mode_name(&mode),
            facts.dirty.len(),
            facts.vma_events,
            tracked_vmas.len(),
            new_vmas.len(),
            other_vmas.len()
        );
        let has_parent = parent_pages.is_some();
        let parent_pages = parent_pages.unwrap_or(&empty);
        let rearm = mode != Mode::FullPeek;
        let swap = harvest::swap_active();
        let mut scanner =
            PagemapScanner::open(pid).with_context(|| format!("open the pagemap of PID {pid}"))?;
        let mut plan: Vec<PlanItem> = Vec::new();
        let mut scanned = 0u64;
        let mut regions: Vec<PageRegion> = Vec::new();

        // With a parent, tracked VMAs are asked only for their written pages (the kernel's fast
        // path), and where pages may have been unmapped, what held data before the re-arm.
        let fast = matches!(mode, Mode::Ebpf(_) | Mode::Exact { .. });
        let zapped = match mode {
            Mode::Exact { zaps_known: false } => tracked_set.clone(),
            _ => zap_ranges(&facts, &tracked_vmas),
        };
        let (mut written, mut before) = (Vec::new(), Vec::new());

        // Tracked VMAs: scan where needed; elsewhere (eBPF mode) the parent has the pages.
        let mut still_tracked = Vec::new();
        for v in tracked_vmas {
            let scan = match &mode {
                Mode::Ebpf(r) => r.clip(v.start, v.end),
                _ => RangeSet::from_ranges(vec![(v.start, v.end)]),
            };
            regions.clear();
            let mut registered = true;
            let zap_here = zapped.intersect(&scan);
            if fast {
                before.clear();
                written.clear();
                for &(s, e) in zap_here.ranges() {
                    scanner
                        .scan_into(s, e, &harvest::harvest_query(false), &mut before)
                        .with_context(|| format!("PAGEMAP_SCAN of {s:#x}-{e:#x} of PID {pid}"))?;
                }
            }
            for &(s, e) in scan.ranges() {
                let found = if fast {
                    harvest::scan_written(&mut scanner, s, e, &mut written)?
                } else {
                    harvest::scan_range(&mut scanner, s, e, rearm, &mut regions)?
                };
                if found.is_none() {
                    registered = false;
                    break;
                }
                scanned += (e - s) / PAGE;
            }
            if !registered {
                log::info!(
                    "PID {pid}: {:#x}-{:#x} is no longer write-protected: copied whole",
                    v.start,
                    v.end
                );
                new_vmas.push(v);
                continue;
            }
            still_tracked.push((v.start, v.end));
            let in_parent = if has_parent {
                parent_pages.clip(v.start, v.end)
            } else {
                RangeSet::new()
            };
            if fast {
                // Written pages are copied (or absent: unmapped, zero); every other page is as
                // the parent has it.
                let refined = harvest::refine_written(&written, &zap_here, &before);
                classify(
                    &scanner,
                    &refined,
                    &RangeSet::new(),
                    v.read,
                    swap,
                    &mut plan,
                )?;
                let changed = RangeSet::from_sorted(written.iter().map(|r| (r.start, r.end)));
                for &(s, e) in in_parent.subtract(&changed).ranges() {
                    plan.push(PlanItem::Parent { start: s, end: e });
                }
                continue;
            }
            classify(&scanner, &regions, &in_parent, v.read, swap, &mut plan)?;
            if let Mode::Ebpf(_) = mode {
                for &(s, e) in in_parent.subtract(&scan).ranges() {
                    plan.push(PlanItem::Parent { start: s, end: e });
                }
            }
        }

        // New VMAs (never write-protected, or no longer): all their data.
        new_vmas.sort_by_key(|v| v.start);
        for v in &new_vmas {
            regions.clear();
            harvest::scan_range(&mut scanner, v.start, v.end, false, &mut regions)?;
            scanned += v.len() / PAGE;
            classify(
                &scanner,
                &regions,
                &RangeSet::new(),
                v.read,
                swap,
                &mut plan,
            )?;
        }
        // Memory cr does not track (shared, file-backed, droppable): all its data, as a full
        // dump takes it.
        for v in &other_vmas {
            let found = scanner
                .scan(v.start, v.end, &memory::resident_query(v))
                .with_context(|| {
                    format!("PAGEMAP_SCAN of {:#x}-{:#x} of PID {pid}", v.start, v.end)
                })?;
            scanned += v.len() / PAGE;
            plan.extend(found.iter().map(|r| PlanItem::Data {
                start: r.start,
                end: r.end,
                readable: v.read,
            }));
        }
        let plan = merge_plan(plan)?;
        let (data_pages, parent_pages_n) = plan.iter().fold((0u64, 0u64), |(d, p), i| match *i {
            PlanItem::Data { start, end, .. } => (d + (end - start) / PAGE, p),
            PlanItem::Parent { start, end } => (d, p + (end - start) / PAGE),
        });
        let harvest_us = t_h.elapsed().as_micros() as u64;
        interrupt::check()?;

        let t_copy = Instant::now();
        let writer = PageWriter::create(w, pid, data_pages)?;
        let t_writer = t_copy.elapsed();
        let pending = pages::copy_plan(pid, &plan, writer, pages::budget(data_pages * PAGE), warm)?;
        let memdump_us = t_mem.elapsed().as_micros() as u64;
        log::debug!(
            "PID {pid}: page file started in {t_writer:?}, {} plan items read in {:?}",
            plan.len(),
            t_copy.elapsed() - t_writer
        );

        // Arm or re-arm for the next checkpoint (the tracker gets the tree's state at the end
        // of the freeze, `end_freeze`).
        let tr = self.tracked.as_mut().expect("checked above");
        if self.keep_tracking {
            let t_arm = Instant::now();
            let mut fresh = None;
            if !armed {
                let ip = match ip {
                    Some(ip) => ip,
                    None => syscall_ip(pid, vmas)?,
                };
                log::debug!("PID {pid}: remote calls begin (arming)");
                let mut remote = Remote::parked(t, ip)?;
                let u = arm::take_userfaultfd(&mut remote, pid);
                remote.finish()?;
                log::debug!("PID {pid}: remote calls end (arming)");
                fresh = Some(u?);
                if !root {
                    // From now on the programs record its write faults and syscalls (the
                    // root was added by the tracker); its counters start again here.
                    tr.maps
                        .add_target(pid as u32)
                        .with_context(|| format!("track PID {pid}"))?;
                }
            }
            let uffd = fresh
                .as_ref()
                .or(tr.uffds.get(&pid))
                .context("internal: armed without a userfaultfd")?;
            let fresh_ranges: Vec<(u64, u64)> = new_vmas.iter().map(|v| (v.start, v.end)).collect();
            let registered = arm::register(uffd, pid, &fresh_ranges);
            arm::protect(uffd, &registered)?;
            let tracked_now = RangeSet::from_ranges(still_tracked).union(&registered);
            self.next.push(Armed {
                track: ProcTrack {
                    pid,
                    start_time,
                    tracked: tracked_now,
                    baseline: Default::default(),
                    sticky: facts.sticky_next,
                },
                fresh,
            });
            log::debug!("PID {pid}: re-armed in {:?}", t_arm.elapsed());
        }
        let stats = pb::DumpStats {
            memdump_us,
            pages_scanned: scanned,
            pages_written: data_pages,
            pages_in_parent: parent_pages_n,
            harvest: mode_name(&mode).into(),
            harvest_reason: reason,
            harvest_us,
            ebpf_dirty_pages: facts.dirty.len() as u64,
            vma_events: facts.vma_events,
            new_vmas: new_vmas.len() as u64,
            tracker_pid: tr.state.daemon_pid,
            vmas: entries.len() as u64,
            ..Default::default()
        };
        log::info!(
            "PID {pid}: {} pages copied, {} in the parent, {scanned} scanned; harvest {:.2} ms, memory {:.2} ms",
            data_pages,
            parent_pages_n,
            harvest_us as f64 / 1e3,
            memdump_us as f64 / 1e3
        );
        Ok(MemoryDump {
            vmas: entries,
            pages: pending,
            stats,
        })
    }

    /// At the end of the freeze, after [`Session::memory`] ran for every process: the tracker
    /// gets the state of the whole tree and one userfaultfd per armed process; processes that
    /// exited (or were not armed) are dropped from the programs' targets.
    pub fn end_freeze(&mut self) -> Result<()> {
        if !self.keep_tracking || self.next.is_empty() {
            return Ok(());
        }
        let t_put = Instant::now();
        let tr = self.tracked.as_mut().expect("armed with a tracker");
        // What cr did while the tree was frozen is not the tree's doing: start the next epoch
        // here, except for remote writes by others, which only the next checkpoint can account
        // for. (The dirty set was taken at the first harvest; nothing the tree did since, it is
        // frozen, and cr's own reads fault in cr's context. A first arming drops what was
        // recorded before it.)
        let _ = tr.maps.drain_vma_events();
        if !tr.state.armed {
            let _ = tr.maps.drain_dirty();
        }
        let mut procs = Vec::with_capacity(self.next.len());
        let mut uffds: Vec<(i32, Userfaultfd)> = Vec::with_capacity(self.next.len());
        for a in self.next.drain(..) {
            let mut p = a.track;
            let mut baseline = tr.maps.counters(p.pid as u32)?;
            if let Some(ep) = self.epochs.get(&p.pid) {
                baseline.gup_events = ep.at_seize.gup_events;
                baseline.last_unsafe_nr = ep.at_seize.last_unsafe_nr;
            }
            p.baseline = baseline;
            let u = match a.fresh {
                Some(u) => u,
                None => tr
                    .uffds
                    .remove(&p.pid)
                    .with_context(|| format!("internal: no userfaultfd for PID {}", p.pid))?,
            };
            uffds.push((p.pid, u));
            procs.push(p);
        }
        // Targets of the programs that are no longer tracked (exited, or not armed): their
        // PIDs may come back as other processes.
        let keep: Vec<u32> = procs.iter().map(|p| p.pid as u32).collect();
        for t in tr.maps.tracker.targets() {
            if t != self.pid as u32 && !keep.contains(&t) {
                log::info!("PID {t}: no longer in the tree: not tracked any more");
                tr.maps.remove_target(t)?;
            }
        }
        let state = TrackerState {
            armed: true,
            last_image: Some(self.image.clone()),
            last_image_crc: None,
            procs,
            harvests: tr.state.harvests + 1,
            ..tr.state.clone()
        };
        let raw: Vec<RawFd> = uffds.iter().map(|(_, u)| u.as_fd().as_raw_fd()).collect();
        tr.conn.put(&state, &raw)?;
        log::debug!(
            "handed the tracker the state of {} processes in {:?}",
            state.procs.len(),
            t_put.elapsed()
        );
        tr.uffds = uffds.into_iter().collect();
        tr.state = state;
        self.put = true;
        Ok(())
    }

    /// Sets the parent link and the pre-dump flag.
    pub fn fill_inventory(&self, inv: &mut pb::Inventory) {
        if let Some(p) = &self.parent {
            inv.parent_path = p.rel.clone();
            inv.parent_inventory_crc = p.crc;
            inv.parent_checkpoint_id = p.id;
        }
        if self.pre_dump {
            inv.flags |= imgdir::DUMP_F_PRE_DUMP;
        }
    }

    /// After the commit: the tracker learns the inventory CRC of its new base image. A failure
    /// only costs the next dump its parent (it will be full), so it is a warning.
    pub fn committed(&self, images_dir: &Path) {
        if !self.put {
            return;
        }
        let Some(t) = &self.tracked else { return };
        let r = t
            .conn
            .settle()
            .and_then(|_| ImageDir::open(images_dir))
            .and_then(|img| t.conn.commit(&self.image, img.inventory_crc()));
        if let Err(e) = r {
            log::warn!("the tracker could not record this image as its base ({e:#}): the next dump will be full");
        }
    }

    /// The target was killed (a final dump): the tracker has nothing left to do.
    pub fn target_gone(&self) {
        if let Some(t) = &self.tracked {
            if let Err(e) = t.conn.stop() {
                log::debug!("stopping the tracker: {e:#} (it may have seen the target exit first)");
            }
        }
    }
}

/// The dump without tracking: [`memory::plan`] and [`pages::copy`], as always (`skip`: VMAs
/// whose pages another process of the tree saves). `why`: the statistics' reason.
fn plain_memory(
    pid: i32,
    vmas: &[Vma],
    w: &ImageWriter,
    t_mem: Instant,
    warm: &mut WarmBuffers,
    skip: &[(u64, u64)],
    why: &str,
) -> Result<MemoryDump> {
    let (entries, runs, scanned) = memory::plan(pid, vmas)?;
    let runs = memory::without(runs, skip);
    interrupt::check()?;
    let total_pages: u64 = runs.iter().map(|r| (r.end - r.start) / PAGE).sum();
    let writer = PageWriter::create(w, pid, total_pages)?;
    let pending = pages::copy(pid, &runs, writer, pages::budget(total_pages * PAGE), warm)?;
    let memdump_us = t_mem.elapsed().as_micros() as u64;
    log::info!(
        "PID {pid}: {} VMAs, {total_pages} pages copied of {scanned} scanned in {:.1} ms",
        entries.len(),
        memdump_us as f64 / 1e3
    );
    let stats = pb::DumpStats {
        memdump_us,
        pages_scanned: scanned,
        pages_written: total_pages,
        harvest: "full".into(),
        harvest_reason: why.into(),
        vmas: entries.len() as u64,
        ..Default::default()
    };
    Ok(MemoryDump {
        vmas: entries,
        pages: pending,
        stats,
    })
}

/// Adds the memory statistics of process `pid` (not the root) to the dump's (the root's, in
/// place first). A harvest other than the root's is named in the reason.
pub fn add_stats(total: &mut pb::DumpStats, p: &pb::DumpStats, pid: i32) {
    total.memdump_us += p.memdump_us;
    total.harvest_us += p.harvest_us;
    total.pages_scanned += p.pages_scanned;
    total.pages_written += p.pages_written;
    total.pages_in_parent += p.pages_in_parent;
    total.ebpf_dirty_pages += p.ebpf_dirty_pages;
    total.vma_events += p.vma_events;
    total.new_vmas += p.new_vmas;
    total.vmas += p.vmas;
    if p.harvest != total.harvest {
        total.harvest_reason = format!(
            "{}; PID {pid}: {} ({})",
            total.harvest_reason, p.harvest, p.harvest_reason
        );
    }
}

fn mode_name(m: &Mode) -> &'static str {
    match m {
        Mode::Ebpf(_) => "ebpf",
        Mode::Exact { .. } => "pagemap-scan",
        Mode::FullRearm | Mode::FullPeek => "full",
    }
}

/// Which harvest, and why.
fn choose_mode(
    harvest: bool,
    has_parent: bool,
    full_reason: &str,
    f: &EpochFacts,
    tracked: &RangeSet,
    tracked_vmas: &[&Vma],
) -> (Mode, String) {
    if !harvest {
        return (
            Mode::FullPeek,
            "a dump without --track-mem leaves the tracking state alone".into(),
        );
    }
    if !has_parent {
        return (Mode::FullRearm, full_reason.to_string());
    }
    if f.exec {
        return (
            Mode::FullRearm,
            "the target exec'd: its memory is new".into(),
        );
    }
    let forced = crate::tunables::get().harvest;
    if forced == Harvest::Scan {
        return (
            Mode::Exact { zaps_known: false },
            "forced by CR_HARVEST=scan".into(),
        );
    }
    if !f.unsafe_why.is_empty() {
        return (Mode::Exact { zaps_known: false }, f.unsafe_why.join("; "));
    }
    if f.all_vmas {
        return (
            Mode::Exact { zaps_known: false },
            "mlockall: any page may have been populated".into(),
        );
    }
    let ranges = harvest::blocks_of(&f.dirty)
        .union(&zap_ranges(f, tracked_vmas))
        .intersect(tracked);
    // Scanning the blocks never costs more page-table walking than scanning everything, but
    // each block is an ioctl: past many scattered blocks covering most of the memory, one
    // walk of all is cheaper.
    let (cover, total) = (ranges.len_bytes(), tracked.len_bytes().max(1));
    if forced != Harvest::Ebpf && ranges.ranges().len() > MANY_RANGES && cover * 2 > total {
        return (
            Mode::Exact { zaps_known: true },
            format!(
                "the eBPF dirty set falls in {} blocks covering {}% of the tracked memory: one scan of all is cheaper",
                ranges.ranges().len(),
                cover * 100 / total
            ),
        );
    }
    let why = if forced == Harvest::Ebpf {
        "forced by CR_HARVEST=ebpf".to_string()
    } else {
        "nothing escaped the eBPF records".to_string()
    };
    (Mode::Ebpf(ranges), why)
}

/// Where the epoch's syscalls may have changed the layout or unmapped pages: the ranges of its
/// VMA events, and the heap if brk moved.
fn zap_ranges(f: &EpochFacts, tracked_vmas: &[&Vma]) -> RangeSet {
    let mut r = f.vma_ranges.clone();
    if f.brk {
        r = r.union(&RangeSet::from_ranges(
            tracked_vmas
                .iter()
                .filter(|v| v.name == VmaName::Heap)
                .map(|v| (v.start, v.end))
                .collect(),
        ));
    }
    r
}

/// Turns the regions of one scanned VMA into plan items.
fn classify(
    scanner: &PagemapScanner,
    regions: &[PageRegion],
    in_parent: &RangeSet,
    readable: bool,
    swap: bool,
    plan: &mut Vec<PlanItem>,
) -> Result<()> {
    for w in regions.windows(2) {
        if w[1].start < w[0].end {
            bail!(
                "internal: PAGEMAP_SCAN regions overlap: {:x?} then {:x?}",
                w[0],
                w[1]
            );
        }
    }
    for r in regions {
        let whole = RangeSet::from_ranges(vec![(r.start, r.end)]);
        let inside = in_parent.clip(r.start, r.end);
        let outside = whole.subtract(&inside);
        for (set, par) in [(&inside, true), (&outside, false)] {
            for &(s, e) in set.ranges() {
                match harvest::fate(r.categories, par) {
                    PageFate::Copy => plan.push(PlanItem::Data {
                        start: s,
                        end: e,
                        readable,
                    }),
                    PageFate::Parent => plan.push(PlanItem::Parent { start: s, end: e }),
                    PageFate::Absent => {
                        // Unwritten "swapped" pages not in the parent are uffd-wp markers
                        // (untouched pages), unless a swap device holds real ones.
                        if swap
                            && r.categories & PAGE_IS_SWAPPED != 0
                            && r.categories & PAGE_IS_WRITTEN == 0
                            && !par
                        {
                            for &(a, b) in harvest::real_swapped(scanner, s, e)?.ranges() {
                                plan.push(PlanItem::Data {
                                    start: a,
                                    end: b,
                                    readable,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Sorts the plan, merges neighbours of the same kind, and refuses overlaps.
fn merge_plan(mut plan: Vec<PlanItem>) -> Result<Vec<PlanItem>> {
    let key = |i: &PlanItem| match *i {
        PlanItem::Data { start, .. } | PlanItem::Parent { start, .. } => start,
    };
    plan.sort_by_key(key);
    let mut out: Vec<PlanItem> = Vec::with_capacity(plan.len());
    for item in plan {
        let merged = match (out.last_mut(), item) {
            (
                Some(PlanItem::Data { end, readable, .. }),
                PlanItem::Data {
                    start,
                    end: e2,
                    readable: r2,
                },
            ) if *end == start && *readable == r2 => {
                *end = e2;
                true
            }
            (Some(PlanItem::Parent { end, .. }), PlanItem::Parent { start, end: e2 })
                if *end == start =>
            {
                *end = e2;
                true
            }
            _ => false,
        };
        if merged {
            continue;
        }
        if let Some(last) = out.last() {
            let last_end = match *last {
                PlanItem::Data { end, .. } | PlanItem::Parent { end, .. } => end,
            };
            if key(&item) < last_end {
                bail!("internal: page plan overlaps: {item:x?} after {last:x?}");
            }
        }
        out.push(item);
    }
    Ok(out)
}

/// The parent `rel` (relative to `images_dir`) if the tracker's last checkpoint is exactly it.
fn check_parent(images_dir: &Path, rel: &Path, pid: i32, state: &TrackerState) -> Result<Parent> {
    let path = images_dir.join(rel);
    let img = ImageDir::open(&path).with_context(|| format!("parent image {}", rel.display()))?;
    let canon = canonical(&path)?;
    if !state.armed {
        bail!("the tracker of PID {pid} has not armed write-protection yet");
    }
    match &state.last_image {
        None => bail!("the tracker of PID {pid} has no complete checkpoint to build on (a dump after the last one failed)"),
        Some(last) if *last != canon => bail!("the last checkpoint of PID {pid} is {last}, not {canon}"),
        Some(_) => {}
    }
    if state.last_image_crc != Some(img.inventory_crc()) {
        bail!("{canon} was not committed by the checkpoint the tracker remembers (its inventory differs)");
    }
    if img.inventory().root_pid != pid {
        bail!(
            "{canon} is an image of PID {}, not {pid}",
            img.inventory().root_pid
        );
    }
    img.page_map(pid)
        .with_context(|| format!("the page map of PID {pid} in {canon}"))?;
    Ok(Parent {
        rel: rel.to_string_lossy().into_owned(),
        crc: img.inventory_crc(),
        id: img.inventory().checkpoint_id,
        img,
        pages: HashMap::new(),
    })
}

fn canonical(p: &Path) -> Result<String> {
    Ok(std::fs::canonicalize(p)
        .with_context(|| format!("resolve {}", p.display()))?
        .to_string_lossy()
        .into_owned())
}

/// Whether two VMA lists describe the same layout (boundaries, protection, what is mapped).
fn same_layout(a: &[Vma], b: &[Vma]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.start == y.start
                && x.end == y.end
                && (x.read, x.write, x.exec, x.shared) == (y.read, y.write, y.exec, y.shared)
                && x.offset == y.offset
                && x.inode == y.inode
                && x.path == y.path
                && x.name == y.name
        })
}

/// The `syscall` instruction of the target's vDSO.
fn syscall_ip(pid: i32, vmas: &[Vma]) -> Result<u64> {
    let vdso = vmas
        .iter()
        .find(|v| v.name == VmaName::Vdso)
        .with_context(|| {
            format!("PID {pid} has no vDSO: cr needs its syscall instruction for remote calls")
        })?;
    ptrace::locate_syscall(pid, vdso.start, vdso.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_merges_and_refuses_overlaps() {
        let p = merge_plan(vec![
            PlanItem::Parent {
                start: 0x3000,
                end: 0x5000,
            },
            PlanItem::Data {
                start: 0x1000,
                end: 0x2000,
                readable: true,
            },
            PlanItem::Data {
                start: 0x2000,
                end: 0x3000,
                readable: true,
            },
            PlanItem::Parent {
                start: 0x5000,
                end: 0x6000,
            },
            PlanItem::Data {
                start: 0x6000,
                end: 0x7000,
                readable: false,
            },
        ])
        .unwrap();
        assert_eq!(
            p,
            vec![
                PlanItem::Data {
                    start: 0x1000,
                    end: 0x3000,
                    readable: true
                },
                PlanItem::Parent {
                    start: 0x3000,
                    end: 0x6000
                },
                PlanItem::Data {
                    start: 0x6000,
                    end: 0x7000,
                    readable: false
                },
            ]
        );
        assert!(merge_plan(vec![
            PlanItem::Parent {
                start: 0,
                end: 0x2000
            },
            PlanItem::Data {
                start: 0x1000,
                end: 0x3000,
                readable: true
            }
        ])
        .is_err());
    }

    #[test]
    fn mode_choice() {
        let tracked = RangeSet::from_ranges(vec![(0, 1 << 30)]);
        let f = EpochFacts {
            dirty: vec![1, 2, 3],
            ..Default::default()
        };
        let (m, _) = choose_mode(true, true, "", &f, &tracked, &[]);
        assert_eq!(m, Mode::Ebpf(RangeSet::from_ranges(vec![(0, 2 << 20)])));
        let (m, why) = choose_mode(true, false, "no --prev-images-dir", &f, &tracked, &[]);
        assert_eq!((m, why.as_str()), (Mode::FullRearm, "no --prev-images-dir"));
        let lost = EpochFacts {
            unsafe_why: vec!["3 write faults lost".into()],
            ..Default::default()
        };
        let (m, why) = choose_mode(true, true, "", &lost, &tracked, &[]);
        assert_eq!(m, Mode::Exact { zaps_known: false });
        assert!(why.contains("lost"));
        // Many scattered dirty blocks over most of the memory: one exact scan. (4 GiB; two
        // blocks of every three: 683 ranges, 2/3 of it.)
        let big = RangeSet::from_ranges(vec![(0, 4 << 30)]);
        let many = EpochFacts {
            dirty: (0..(1u64 << 20))
                .step_by(512)
                .filter(|p| (p / 512) % 3 != 2)
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            choose_mode(true, true, "", &many, &big, &[]).0,
            Mode::Exact { zaps_known: true }
        );
        // Few blocks, even covering most of a small memory: the eBPF harvest.
        assert!(matches!(
            choose_mode(true, true, "", &many, &tracked, &[]).0,
            Mode::Ebpf(_)
        ));
        assert_eq!(
            choose_mode(false, true, "", &f, &tracked, &[]).0,
            Mode::FullPeek
        );
    }
}
