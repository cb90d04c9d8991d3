//! `cr dump`: freeze → collect → write → commit → kill (or let run with -R).
//!
//! The target is the tree under `-t PID`: every thread of every process is seized first
//! ([`tree::seize`]), then each process is collected in tree order ([`dump_process`]): one core
//! image per thread, one mm/pagemap/fds image per process, one files.img and pstree.img for
//! the tree. The tree is held with ptrace from seize to the end. On any error after seizing, every
//! change is undone on the way out (registers put back by `Remote`, scratch memory unmapped,
//! the task detached by `Tracee`'s drop), so a failed dump leaves the target running as before,
//! and the image directory has no inventory (never mistaken for a complete image).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::DumpOpts;
use crate::files::dedup::FileDedup;
use crate::files::dump as files;
use crate::image::dir::{self as imgdir, ImageWriter};
use crate::image::file::Kind;
use crate::image::pb;
use crate::image::wire;
use crate::kernel::interrupt;
use crate::kernel::proc;
use crate::kernel::proc::maps::VmaName;
use crate::kernel::ptrace::{self, Remote};
use crate::locks::dump as locks;
use crate::logging::TaskScope;
use crate::mem::dump as memory;
use crate::mem::shmem::ShmemOwners;
use crate::mem::{incremental, pages};
use crate::task::dump as task;
use crate::tree::{dump as tree, target};

/// The opening steps of `cr dump` and `cr pre-dump`, before the freeze: the root checked, the
/// image directory created, the memory session prepared (the tracker found or started).
pub(super) struct Opened {
    pub target: target::Target,
    pub writer: ImageWriter,
    pub inc: incremental::Session,
    /// The page copy's buffers, warmed before the freeze.
    pub warm: pages::WarmBuffers,
}

/// `remote`: the connection of a `cr migrate` the image goes through (otherwise
/// `--page-server` says whether to make one).
pub(super) fn open(
    o: &DumpOpts,
    pre_dump: bool,
    remote: Option<Arc<wire::Sender>>,
) -> Result<Opened> {
    interrupt::install();
    let target = target::check_root(o.pid)?;
    let pid = target.pid;
    let mut writer = ImageWriter::create(&o.images_dir)?;
    if let Some(r) = remote {
        writer.send_to(r);
    } else if o.page_server {
        // Connected before anything touches the target: no server, no freeze.
        let (Some(host), Some(port)) = (&o.address, o.port) else {
            crate::bad_input!("--page-server needs --address and --port");
        };
        let content = if o.whole_image {
            wire::Content::Image
        } else {
            wire::Content::Pages
        };
        writer.send_to(Arc::new(wire::Sender::connect(host, port, content)?));
    }
    log::info!(
        "{} PID {pid} ({}) into {}",
        if pre_dump { "pre-dumping" } else { "dumping" },
        target.stat.comm,
        o.images_dir.display()
    );
    let mut warm = pages::WarmBuffers::default();
    let inc = incremental::Session::prepare(&tracking(o), pre_dump, pid, &mut warm)?;
    interrupt::check()?;
    Ok(Opened {
        target,
        writer,
        inc,
        warm,
    })
}

/// The inventory of an image of `pid` (the rest of its fields: `ImageWriter::commit` and the
/// memory session).
pub(super) fn inventory(pid: i32, flags: u64, stats: pb::DumpStats) -> pb::Inventory {
    pb::Inventory {
        kernel_release: proc::task::kernel_release().unwrap_or_default(),
        root_pid: pid,
        flags,
        stats: Some(stats),
        cr_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ..Default::default()
    }
}

pub fn run(o: &DumpOpts) -> Result<()> {
    dump(o, None, false).map(|_| ())
}

/// A committed dump whose tree is still frozen (its connections locked): `cr migrate` kills it
/// once the destination runs it, or lets it go.
pub(super) struct Held {
    pid: i32,
    /// Before the tree: dropped first, so connections leave repair mode before it runs on.
    net: crate::tcp::DumpNet,
    tree: tree::Tree,
    inc: incremental::Session,
    t_frozen: Instant,
}

impl Held {
    /// Kills the tree (as a dump does after its commit); returns how long it was frozen.
    pub fn kill(self) -> Result<std::time::Duration> {
        let Held {
            pid,
            net,
            tree,
            inc,
            t_frozen,
        } = self;
        let frozen = t_frozen.elapsed();
        tree.kill()?;
        net.target_killed();
        inc.target_gone();
        log::info!(
            "PID {pid} killed after its move (frozen {:.1} ms)",
            frozen.as_secs_f64() * 1e3
        );
        Ok(frozen)
    }

    /// Lets the tree run on as before: connections out of repair mode and unlocked first,
    /// then every task detached; the tracker stops (its write-protection goes with it).
    pub fn release(self) {
        let Held {
            pid,
            net,
            tree,
            inc,
            ..
        } = self;
        drop(net);
        if let Err(e) = tree.detach() {
            log::warn!("letting PID {pid} go: {e:#}");
        }
        inc.target_gone();
        log::info!("PID {pid} runs on");
    }
}

/// `cr dump` through the connection of a migration, the tree left frozen after the commit.
pub(super) fn run_held(o: &DumpOpts, remote: Arc<wire::Sender>) -> Result<Held> {
    dump(o, Some(remote), true)?.context("internal: the dump did not hold the tree")
}

fn dump(o: &DumpOpts, remote: Option<Arc<wire::Sender>>, hold: bool) -> Result<Option<Held>> {
    let t_start = Instant::now();
    let Opened {
        target,
        writer,
        mut inc,
        mut warm,
    } = open(o, false, remote)?;
    let pid = target.pid;

    let prepared = crate::tcp::PreparedLock::new(o.tcp_established, pid)?;
    // The page copy's buffers are touched now, not while the tree is frozen (fresh memory is
    // slow to fault in, very much so on a ballooned VM).
    // As many as the root's resident memory needs, up to the 16 MiB the copy turns over.
    warm.warm((target.stat.rss.max(0) as u64 * 4096).clamp(4 << 20, 16 << 20));
    let t_seize = Instant::now();
    let mut tree = tree::seize(pid).with_context(|| format!("freezing the tree of PID {pid}"))?;
    // Declared after the tree: on error, connections leave repair mode before it runs on.
    let mut net = crate::tcp::DumpNet::begin(o.tcp_established, pid, prepared);
    let t_frozen = Instant::now();
    let freezing_us = (t_frozen - t_seize).as_micros() as u64;
    log::info!("PID {pid} frozen");
    // On error, dropping the tree detaches every task; each Remote (already dropped) restored
    // its registers.
    let live: Vec<i32> = tree
        .procs
        .iter()
        .filter(|p| !p.zombie)
        .map(|p| p.pid)
        .collect();
    let collected = tree::check(&tree, o.shell_job)
        .and_then(|_| inc.frozen(&live))
        .and_then(|_| {
            net.survey(
                &live,
                pid,
                &crate::tcp::inventory::TableSource::of(inc.tracker().map(|(_, m)| m), pid),
            )
        })
        .and_then(|_| {
            let mut cx = DumpCtx {
                o,
                w: &writer,
                inc: &mut inc,
                net: &mut net,
                warm: &mut warm,
                next_id: 1,
                dedup: FileDedup::default(),
                live: live.clone(),
                unix: Default::default(),
                shmem: ShmemOwners::default(),
                out: Collected::new(tree.pstree()),
            };
            dump_frozen(&mut cx, &mut tree, &live)?;
            Ok(cx.out)
        })?;
    // With -R the tree needs nothing more from us: everything is read. Let it run while the
    // page writer finishes.
    let mut frozen_us = 0;
    let tree = if o.leave_running {
        net.resume();
        tree.detach()?;
        frozen_us = t_frozen.elapsed().as_micros() as u64;
        log::info!(
            "PID {pid} runs on (frozen {:.1} ms); finishing the image",
            frozen_us as f64 / 1e3
        );
        None
    } else {
        Some(tree)
    };
    let result = write_images(&writer, collected).and_then(|mut stats| {
        interrupt::check()?;
        stats.frozen_us = if frozen_us != 0 {
            frozen_us
        } else {
            t_frozen.elapsed().as_micros() as u64
        };
        stats.freezing_us = freezing_us;
        stats.total_us = t_start.elapsed().as_micros() as u64;
        let mut flags = 0;
        if o.tcp_established {
            flags |= imgdir::DUMP_F_TCP;
        }
        if o.shell_job {
            flags |= imgdir::DUMP_F_SHELL_JOB;
        }
        if o.file_locks {
            flags |= imgdir::DUMP_F_FILE_LOCKS;
        }
        let mut inventory = inventory(pid, flags, stats);
        inc.fill_inventory(&mut inventory);
        net.write_record(&writer)?;
        // Commit before the tree goes away: a dump that cannot be committed must not kill it.
        let inventory = writer.commit(inventory)?;
        inc.committed(&o.images_dir);
        Ok(inventory)
    });
    let Some(tree) = tree else {
        let inventory = result?;
        log::info!(
            "dump of PID {pid} complete in {:.1} ms",
            t_start.elapsed().as_secs_f64() * 1e3
        );
        display_stats(o, &inventory);
        return Ok(None);
    };
    // The network lock outlives cr from here (the complete image names it); a cr killed
    // between this and the kill below leaves the tree running with its connections locked
    // and in repair mode: `cr network-unlock -D DIR` and a restore of the image are the way on.
    let inventory = match result.and_then(|inv| net.pin_lock().map(|_| inv)) {
        Ok(inv) => inv,
        Err(e) => {
            // Connections out of repair mode and unlocked before the tree runs on.
            drop(net);
            drop(tree);
            return Err(e);
        }
    };
    if hold {
        return Ok(Some(Held {
            pid,
            net,
            tree,
            inc,
            t_frozen,
        }));
    }
    let frozen = t_frozen.elapsed();
    tree.kill()?;
    net.target_killed();
    inc.target_gone();
    log::info!(
        "dump of PID {pid} complete; the tree was killed (frozen {:.1} ms)",
        frozen.as_secs_f64() * 1e3
    );
    display_stats(o, &inventory);
    Ok(None)
}

/// `--display-stats`: the image's timings and page counts on stdout, as CRIU prints them at
/// the end of a dump (the same table as `cr show DIR stats`).
pub(super) fn display_stats(o: &DumpOpts, inventory: &pb::Inventory) {
    if o.display_stats {
        print!("{}", crate::image::show::stats::display(inventory));
    }
}

/// What the command line asks of memory tracking.
pub fn tracking(o: &DumpOpts) -> incremental::Tracking<'_> {
    incremental::Tracking {
        images_dir: &o.images_dir,
        track_mem: o.track_mem,
        leave_running: o.leave_running,
        prev_images_dir: o.prev_images_dir.as_deref(),
    }
}

/// What was collected for one process while the tree was frozen; pages may still be on their
/// way to disk.
struct ProcDump {
    pid: i32,
    cores: Vec<pb::Core>,
    mm: pb::Mm,
    fds: pb::Fds,
    pages: pages::PendingPages,
}

/// What was collected for the tree.
struct Collected {
    procs: Vec<ProcDump>,
    files: Vec<pb::FileEntry>,
    contents: Vec<(String, Vec<u8>)>,
    pstree: pb::PsTree,
    stats: pb::DumpStats,
    /// locks.img (--file-locks).
    locks: Option<pb::Locks>,
}

impl Collected {
    fn new(pstree: pb::PsTree) -> Collected {
        Collected {
            procs: Vec::new(),
            files: Vec::new(),
            contents: Vec::new(),
            pstree,
            stats: pb::DumpStats::default(),
            locks: None,
        }
    }
}

/// What the steps of one dump share while the tree is frozen: owned by [`run`] (the session,
/// the network state and the page buffers are lent), handed to each step.
struct DumpCtx<'a> {
    o: &'a DumpOpts,
    w: &'a ImageWriter,
    /// The memory session (tracker, parent image) of the root.
    inc: &'a mut incremental::Session,
    /// Connections in repair mode and the network lock.
    net: &'a mut crate::tcp::DumpNet,
    warm: &'a mut pages::WarmBuffers,
    /// File ids are tree-wide: the next one, and the descriptions seen in earlier processes.
    next_id: u32,
    dedup: FileDedup,
    /// The tree's live processes.
    live: Vec<i32>,
    /// The tree's UNIX sockets (sock_diag, queues read, waiting connections accepted), made
    /// at the first and held until the dump ends.
    unix: std::cell::OnceCell<crate::files::unix::View>,
    /// Shared anonymous memory: the VMA of the tree that owns each object.
    shmem: ShmemOwners,
    out: Collected,
}

/// Everything that needs the tree frozen: the state of each process, and a copy of its memory.
/// `live`: the tree's processes that are not zombies.
fn dump_frozen(cx: &mut DumpCtx, tree: &mut tree::Tree, live: &[i32]) -> Result<()> {
    let o = cx.o;
    let root = tree.root().pid;
    // File locks first: a refused tree has not seen a single remote syscall.
    let held = locks::survey_tree(
        cx.inc.tracker().map(|(c, _)| c),
        root,
        tree.root().stat.starttime,
        live,
    )?;
    held.check(o.file_locks)?;
    for p in tree.procs.iter_mut() {
        if p.zombie {
            log::info!(
                "PID {} is a zombie (exit status {:#x})",
                p.pid,
                p.stat.exit_code
            );
            continue;
        }
        let d =
            dump_process(cx, p, p.pid == root).with_context(|| format!("dumping PID {}", p.pid))?;
        cx.out.procs.push(d);
    }
    // Still frozen: the tracker gets the tree's new state (every process armed above).
    cx.inc.end_freeze()?;
    if o.file_locks {
        let fds = cx
            .out
            .procs
            .iter()
            .flat_map(|p| p.fds.fds.iter().map(move |f| ((p.pid, f.fd), f.file_id)))
            .collect();
        cx.out.locks = Some(held.image(&fds)?);
    }
    Ok(())
}

/// One process of the frozen tree: its threads' cores, its mm, fds and memory. Every process's
/// memory goes through the incremental session (tracking, parent images).
fn dump_process(cx: &mut DumpCtx, p: &mut tree::Proc, is_root: bool) -> Result<ProcDump> {
    let pid = p.pid;
    let _scope = TaskScope::enter(pid);
    let stat = proc::stat::read_stat(pid)?;
    let status = proc::status::read_status(pid)?;
    let vmas = cx.inc.vmas(pid)?;
    // Every thread's registers and thread state before any remote syscall (see task::dump).
    let mut cores = Vec::with_capacity(p.threads.len());
    for t in &p.threads {
        let regs = t.regs()?;
        if let Some(r) = task::describe_restart(&regs) {
            log::debug!(
                "task {} is inside syscall {} ({r})",
                t.tid,
                regs.orig_rax as i64
            );
        }
        cores.push(task::thread_core(t, &regs)?);
    }
    interrupt::check()?;

    let vdso = vmas
        .iter()
        .find(|v| v.name == VmaName::Vdso)
        .with_context(|| {
            format!("PID {pid} has no vDSO: cr needs its syscall instruction for remote calls")
        })?;
    let ip = ptrace::locate_syscall(pid, vdso.start, vdso.end)?;
    // Each remote call runs with every signal blocked and ends with the thread parked as it
    // was (Remote::parked): a signal sent meanwhile stays queued (a process-wide one too: a
    // stopped thread takes none) and is read below; cr's death between two calls harms nothing.
    let mut brk_state = None;
    // The kill-safety test reads these two lines (the window of docs/architecture.md).
    log::debug!("PID {pid}: remote calls begin");
    for (i, (t, core)) in p.threads.iter_mut().zip(cores.iter_mut()).enumerate() {
        let mut remote = Remote::parked(t, ip)?;
        task::thread_state(&mut remote, core)?;
        if i == 0 {
            brk_state = Some(task::task_state(pid, &mut remote, &status)?);
        }
        remote.finish()?;
    }
    log::debug!("PID {pid}: remote calls end");
    for (i, (t, core)) in p.threads.iter().zip(cores.iter_mut()).enumerate() {
        let mut pending = task::pending_signals(t)?;
        if i != 0 {
            // Process-wide signals are read once, with the main thread.
            pending.retain(|s| !s.shared);
        }
        core.pending = pending;
    }
    let (state, brk) = brk_state.context("internal: no main thread")?;
    cores[0].task = Some(state);
    interrupt::check()?;

    let mut fdt = files::collect(
        pid,
        &mut cx.next_id,
        cx.o.shell_job,
        cx.net,
        &cx.live,
        cx.o.leave_running,
        &cx.unix,
    )?;
    cx.dedup.merge(pid, &mut fdt)?;
    let mut mm = memory::mm_fields(pid, &stat, brk)?;
    // Shared anonymous memory already dumped with an earlier VMA of the tree (the root's are
    // registered after its dump, below).
    let mut skip: Vec<(u64, u64)> = Vec::new();
    if !is_root {
        for v in &vmas {
            let Ok(e) = memory::vma_entry(v) else {
                continue; // refused by the memory dump, naming it
            };
            if let Some(link) = cx.shmem.link(pid, &e) {
                log::debug!(
                    "PID {pid}: {:#x}-{:#x} is shared with {} ({}): its pages are saved there",
                    e.start,
                    e.end,
                    link.owner_pid,
                    link.path()
                );
                skip.push((e.start, e.end));
            }
        }
    }
    let mem = cx.inc.memory(
        pid,
        &mut p.threads[0],
        Some(ip),
        &vmas,
        cx.w,
        cx.warm,
        &skip,
    )?;
    if is_root {
        // Root first: its statistics are in place, the others' add to them.
        cx.out.stats = mem.stats;
    } else {
        incremental::add_stats(&mut cx.out.stats, &mem.stats, pid);
    }
    let (vma_entries, pending_pages) = (mem.vmas, mem.pages);
    if is_root {
        for e in &vma_entries {
            cx.shmem.link(pid, e);
        }
    }
    mm.vmas = vma_entries;
    crate::files::mapped::link_mappings(
        pid,
        &mut mm.vmas,
        &mut cx.next_id,
        &cx.out.files,
        &mut fdt,
    )?;
    cx.out.files.append(&mut fdt.files);
    cx.out.contents.append(&mut fdt.contents);
    Ok(ProcDump {
        pid,
        cores,
        mm,
        fds: fdt.fds,
        pages: pending_pages,
    })
}

/// Writes every descriptor once the pages are on disk. Returns the statistics.
fn write_images(w: &ImageWriter, c: Collected) -> Result<pb::DumpStats> {
    let mut stats = c.stats;
    for p in c.procs {
        let pid = p.pid;
        let t_write = Instant::now();
        let pagemap = p.pages.finish()?;
        stats.memwrite_us += t_write.elapsed().as_micros() as u64;
        for core in &p.cores {
            w.write_msg(&imgdir::core_file(core.tid), Kind::Core, core)?;
        }
        w.write_msg(&imgdir::mm_file(pid), Kind::Mm, &p.mm)?;
        w.write_msg(&imgdir::pagemap_file(pid), Kind::PageMap, &pagemap)?;
        w.write_msg(&imgdir::fds_file(pid), Kind::Fds, &p.fds)?;
    }
    for (name, bytes) in &c.contents {
        w.write_blob(name, bytes)?;
    }
    w.write_msg(imgdir::FILES, Kind::Files, &pb::Files { files: c.files })?;
    w.write_msg(imgdir::PSTREE, Kind::PsTree, &c.pstree)?;
    if let Some(l) = &c.locks {
        w.write_msg(imgdir::LOCKS, Kind::Locks, l)?;
    }
    Ok(stats)
}
