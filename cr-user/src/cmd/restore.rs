//! `cr restore`: read → validate → rebuild, ptrace-driven, with no restorer blob.
//!
//! Every image of the chain is validated (checksums of every file and page run, files the
//! image refers to still as they were) before anything is created. The tree is then created
//! ([`tree`]: every process at its PID under its parent, sessions, groups, zombies), each
//! process being a stopped, traced copy of cr, and each is rebuilt one remote syscall at a
//! time (see [`memory`], [`files`], [`threads`], [`task`]), parents first. Until the whole tree
//! is released every task is killed if anything fails or cr dies (PTRACE_O_EXITKILL): a failed
//! restore leaves no process behind.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::{Global, RestoreOpts};
use crate::files::restore as files;
use crate::image::chain::{ImageChain, PageSegment};
use crate::image::dir as imgdir;
use crate::image::file::Kind;
use crate::image::pb;
use crate::kernel::ptrace::{self, Remote, Tracee};
use crate::locks::restore as locks;
use crate::logging::TaskScope;
use crate::mem::restore as memory;
use crate::mem::shmem::{ShmemLink, ShmemOwners};
use crate::refusal::BadInput;
use crate::task::restore as task;
use crate::task::threads;
use crate::tree::restore as tree;

/// How long restore waits for a PID still held by a dying process.
const PID_WAIT: Duration = Duration::from_secs(5);

/// Everything read from the image for one live process.
struct ProcImage {
    entry: pb::PsTreeEntry,
    /// One per thread, the main thread first.
    cores: Vec<pb::Core>,
    mm: pb::Mm,
    fds: pb::Fds,
    segments: Vec<PageSegment>,
}

pub fn run(o: &RestoreOpts, _g: &Global) -> Result<i32> {
    let t0 = Instant::now();
    let chain = ImageChain::open(&o.images_dir).map_err(BadInput::wrap)?;
    chain.validate().map_err(BadInput::wrap)?;
    crate::image::trust::check(&chain, o.trust_image_owner)?;
    let mut stats = RestoreStats {
        validate_us: t0.elapsed().as_micros() as u64,
        images: chain.images().len(),
        ..Default::default()
    };
    log::debug!(
        "images validated in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let dir = chain.newest();
    let inv = dir.inventory();
    if inv.flags & imgdir::DUMP_F_PRE_DUMP != 0 {
        crate::bad_input!(
            "{} is a pre-dump (memory only): restore from the final dump",
            o.images_dir.display()
        );
    }
    if inv.flags & imgdir::DUMP_F_SHELL_JOB != 0 && !o.shell_job {
        crate::refuse!(
            "--shell-job",
            "{} was dumped with --shell-job: restore it with --shell-job (-j)",
            o.images_dir.display()
        );
    }
    if let Ok(k) = crate::kernel::proc::task::kernel_release() {
        if k != inv.kernel_release {
            log::warn!(
                "the image was dumped on kernel {}, this is {k}",
                inv.kernel_release
            );
        }
    }
    let pstree: pb::PsTree = dir.read_msg(imgdir::PSTREE, Kind::PsTree)?;
    let shell = if o.shell_job {
        Some(crate::kernel::sys::process::session_and_group())
    } else {
        None
    };
    if let Some((sid, pgid)) = shell.filter(|_| o.detached) {
        warn_background_job(sid, pgid);
    }
    let entries = tree::plan_sessions(&pstree.tasks, shell)?;
    let files: pb::Files = dir.read_msg(imgdir::FILES, Kind::Files)?;
    let net_lock = crate::tcp::check_restore(&files, o.tcp_established, dir)?;
    let mut procs: Vec<ProcImage> = Vec::new();
    for e in entries.iter().filter(|e| !e.zombie) {
        let pid = e.pid;
        let mut cores = Vec::with_capacity(e.threads.len());
        for &tid in &e.threads {
            let core: pb::Core = dir.read_msg(&imgdir::core_file(tid), Kind::Core)?;
            if core.tid != tid {
                bail!(
                    "{} holds thread {}, not {tid}",
                    imgdir::core_file(tid),
                    core.tid
                );
            }
            cores.push(core);
        }
        let img = ProcImage {
            cores,
            mm: dir.read_msg(&imgdir::mm_file(pid), Kind::Mm)?,
            fds: dir.read_msg(&imgdir::fds_file(pid), Kind::Fds)?,
            segments: chain.pages_for(pid)?,
            entry: e.clone(),
        };
        files::validate(&files)?;
        memory::validate_mapped(&img.mm.vmas)?;
        procs.push(img);
    }
    // Shared anonymous memory: which VMAs map an object an earlier one creates.
    let mut owners = ShmemOwners::default();
    let mut links: HashMap<i32, HashMap<u64, ShmemLink>> = HashMap::new();
    for p in &procs {
        for v in &p.mm.vmas {
            if let Some(l) = owners.link(p.entry.pid, v) {
                links.entry(p.entry.pid).or_default().insert(v.start, l);
            }
        }
    }
    let tables: HashMap<i32, &pb::Fds> = procs.iter().map(|p| (p.entry.pid, &p.fds)).collect();
    let file_locks = locks::plan(dir, o.file_locks, &tables)?;
    let mut tree_files = files::TreeFiles::plan(procs.iter().map(|p| &p.fds), &files);
    let root = entries[0].pid;
    log::info!(
        "restoring PID {root} from {} ({} processes, {} threads, {} images in the chain)",
        o.images_dir.display(),
        entries.len(),
        procs.iter().map(|p| p.cores.len()).sum::<usize>(),
        chain.images().len()
    );

    let t_fork = Instant::now();
    let mut created = tree::create(&entries, PID_WAIT)?;
    stats.forking_us = t_fork.elapsed().as_micros() as u64;
    stats.processes = entries.len();
    // UNIX sockets are made at once for the whole tree, inside the processes that hold them.
    let fd_tables: Vec<(i32, &pb::Fds)> = procs.iter().map(|p| (p.entry.pid, &p.fds)).collect();
    tree_files
        .build_unix(&mut created.tasks, &fd_tables, &files)
        .context("rebuilding the UNIX sockets")?;
    log::debug!("tree created in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let mut keep = Vec::new();
    let mut released: Vec<Tracee> = Vec::new();
    let progress = crate::progress::Progress::start(
        format!("restoring pages of PID {root}"),
        procs
            .iter()
            .flat_map(|p| &p.segments)
            .map(|s| s.len())
            .sum(),
    );
    for p in &procs {
        let pid = p.entry.pid;
        let _scope = TaskScope::enter(pid);
        let mut t = created
            .tasks
            .remove(&pid)
            .context("internal: a process was not created")?;
        let no_links = HashMap::new();
        let ctx = BuildCtx {
            files: &files,
            dir,
            links: links.get(&pid).unwrap_or(&no_links),
            zombie_children: created.zombie_parents.contains(&pid),
            locks: file_locks.get(&pid).map(Vec::as_slice).unwrap_or(&[]),
        };
        let (k, threads) = build(&mut t, p, &ctx, &mut tree_files, &mut stats, &progress)
            .with_context(|| format!("restoring PID {pid}"))?;
        keep.push(k);
        released.push(t);
        released.extend(threads);
    }
    drop(progress);
    tree_files.seal()?;
    drop(tree_files);
    net_lock.release();
    // Past this point the tree runs: write the pidfile before anything can observe it missing.
    if let Some(pf) = &o.pidfile {
        if let Err(e) = std::fs::write(pf, format!("{root}\n"))
            .with_context(|| format!("write pidfile {}", pf.display()))
        {
            drop(released); // killed: a restore that fails leaves nothing behind
            return Err(e);
        }
    }
    for t in released {
        let tid = t.tid;
        t.detach()
            .with_context(|| format!("releasing task {tid}"))?;
    }
    drop(keep);
    stats.restore_us = t0.elapsed().as_micros() as u64;
    log::info!(
        "PID {root} restored in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    if o.display_stats {
        print!("{}", stats.display());
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    if o.detached {
        return Ok(0);
    }
    wait_for(root)
}

/// With --shell-job the tree joins cr's session and process group (as with CRIU). Run as a job
/// of a job-control shell, cr leads a group of its own, and with -d that group is no job of the
/// shell's once cr exits: the shell takes the terminal back, and the tree's reads from it fail
/// (EIO) or stop it. Run by a shell without job control, or by a script, cr shares its parent's
/// group and the tree stays in the foreground as long as that parent does. Only the first case
/// is worth a warning.
fn warn_background_job(sid: i32, pgid: i32) {
    let me = std::process::id() as i32;
    if pgid == me && sid != me {
        log::warn!(
            "cr leads its own process group {pgid} (a job of a job-control shell): the restored tree joins it, \
             and once cr exits the shell takes the terminal back, so the tree can no longer read it; \
             restore without -d to keep it in the foreground"
        );
    }
}

/// What `--display-stats` prints at the end of a restore (CRIU's "Displaying restore stats").
#[derive(Default)]
struct RestoreStats {
    /// Reading and checking every file and page run of the chain.
    validate_us: u64,
    /// Creating the tree (every process at its PID).
    forking_us: u64,
    /// Mapping every VMA and writing the pages in, all processes.
    memory_us: u64,
    pages_restored: u64,
    /// Of those, pages read from the chain's parents.
    pages_from_parents: u64,
    /// From the start until the tree runs.
    restore_us: u64,
    processes: usize,
    threads: usize,
    images: usize,
}

impl RestoreStats {
    fn display(&self) -> String {
        use crate::image::show::table::{ms, size, Table};
        let pages = |n: u64| format!("{n} ({})", size(n * 4096));
        let mut t = Table::headless(&[false, true]);
        t.row(["Images in the chain".to_string(), self.images.to_string()]);
        t.row(["Processes".to_string(), self.processes.to_string()]);
        t.row(["Threads".to_string(), self.threads.to_string()]);
        t.row(["Validation time".to_string(), ms(self.validate_us)]);
        t.row(["Forking time".to_string(), ms(self.forking_us)]);
        t.row(["Memory restore time".to_string(), ms(self.memory_us)]);
        t.row(["Pages restored".to_string(), pages(self.pages_restored)]);
        t.row([
            "Pages from parents".to_string(),
            pages(self.pages_from_parents),
        ]);
        t.row(["Restore time".to_string(), ms(self.restore_us)]);
        format!(
            "Displaying restore stats:
{}",
            t.render(2)
        )
    }
}

/// What [`build`] needs besides the process's own image.
struct BuildCtx<'a> {
    files: &'a pb::Files,
    dir: &'a imgdir::ImageDir,
    /// VMAs (by start) that map shared memory an earlier VMA of the tree created.
    links: &'a HashMap<u64, ShmemLink>,
    /// A zombie child sent a SIGCHLD that must be taken back.
    zombie_children: bool,
    /// File locks this process takes again (--file-locks).
    locks: &'a [pb::FileLock],
}

/// Rebuilds one process inside the stopped task `t` (a clean copy of cr, every signal
/// blocked): memory, files, threads, task state, then every thread's registers. Returns what
/// must stay open until the tree runs, and the threads.
fn build(
    t: &mut Tracee,
    img: &ProcImage,
    ctx: &BuildCtx,
    tree_files: &mut files::TreeFiles,
    stats: &mut RestoreStats,
    progress: &crate::progress::Progress,
) -> Result<(files::Keepalive, Vec<Tracee>)> {
    stats.threads += img.cores.len();
    let pid = t.tgid;
    // The task is a copy of cr: its vDSO is cr's, at the same address.
    let cur = crate::kernel::proc::maps::read_maps(pid)?;
    let vdso = cur
        .iter()
        .find(|v| v.name == crate::kernel::proc::maps::VmaName::Vdso)
        .context(
            "the new task has no vDSO (booted with vdso=0?): cr needs it for remote syscalls",
        )?;
    let ip = ptrace::locate_syscall(pid, vdso.start, vdso.end)?;
    // Every signal stays blocked while cr drives the task: nothing may run a handler
    // mid-restore (set when the task was created; again here for the record).
    t.set_sigmask(!0)?;
    let main_core = img
        .cores
        .first()
        .context("the image has no core of the main thread")?;
    let mut r = Remote::new(t, ip)?;
    memory::clear_inherited(&mut r, pid)?;
    let delta = memory::move_vdso(&mut r, pid, &img.mm.vmas)?;
    r.set_syscall_ip((ip as i64 + delta) as u64);
    let scratch_at = memory::find_gap(&img.mm.vmas, memory::SCRATCH_LEN)?;
    let scratch = r.scratch_at(scratch_at, memory::SCRATCH_LEN)?.addr;
    let t_map = std::time::Instant::now();
    // memfds and unlinked files: mapped from the file recreated for their inode.
    let mut paths = HashMap::new();
    for v in img.mm.vmas.iter().filter(|v| v.file_id != 0) {
        let p = tree_files
            .mapped_path(ctx.dir, ctx.files, v.file_id)
            .with_context(|| format!("the file mapped at {:#x} ({})", v.start, v.path))?;
        paths.insert(v.start, p);
    }
    memory::map_vmas_linked(&mut r, scratch, &img.mm.vmas, ctx.links, &paths)?;
    log::debug!(
        "{} VMAs mapped in {:.1} ms",
        img.mm.vmas.len(),
        t_map.elapsed().as_secs_f64() * 1e3
    );
    let t_fill = std::time::Instant::now();
    let linked: Vec<(u64, u64)> = img
        .mm
        .vmas
        .iter()
        .filter(|v| ctx.links.contains_key(&v.start))
        .map(|v| (v.start, v.end))
        .collect();
    let segments = memory::without_ranges(&img.segments, &linked);
    memory::fill_pages(&mut r, pid, &img.mm.vmas, &segments, progress)?;
    stats.memory_us += t_map.elapsed().as_micros() as u64;
    for s in &segments {
        stats.pages_restored += s.nr_pages;
        if s.image != 0 {
            stats.pages_from_parents += s.nr_pages;
        }
    }
    log::debug!(
        "pages written in {:.1} ms",
        t_fill.elapsed().as_secs_f64() * 1e3
    );
    memory::set_mm(&mut r, scratch, &img.mm)?;
    let keep = files::restore_fds_in_tree(
        &mut r, scratch, pid, ctx.dir, &img.fds, ctx.files, tree_files,
    )?;
    locks::take(&mut r, scratch, pid, ctx.locks)?;
    if ctx.zombie_children {
        tree::dequeue_sigchld(&mut r, scratch)?;
    }
    let mut threads = threads::create(&mut r, scratch, pid, &img.cores[1..])?;
    let st = main_core
        .task
        .as_ref()
        .context("core image has no task state")?;
    let syscall_ip = r.syscall_ip();
    for (th, core) in threads.iter_mut().zip(&img.cores[1..]) {
        let tid = th.tid;
        let mut tr = Remote::new(th, syscall_ip)?;
        threads::restore_thread(&mut tr, scratch, pid, core, st)
            .with_context(|| format!("restoring thread {tid}"))?;
        tr.done_without_restoring_regs();
    }
    task::restore_task(&mut r, scratch, pid, main_core)?;
    r.release_scratch()?;
    r.done_without_restoring_regs();
    task::restore_cpu(t, main_core)?;
    for (th, core) in threads.iter().zip(&img.cores[1..]) {
        task::restore_cpu(th, core)?;
    }
    Ok((keep, threads))
}

/// Without -d: wait for the restored task and exit with its status (128+N if killed by N).
fn wait_for(pid: i32) -> Result<i32> {
    loop {
        match ptrace::raw::wait(pid).with_context(|| format!("waiting for restored PID {pid}"))? {
            ptrace::raw::Wait::Exited(c) => return Ok(c),
            ptrace::raw::Wait::Signaled(s) => return Ok(128 + s),
            ptrace::raw::Wait::Stopped(..) => continue,
        }
    }
}
