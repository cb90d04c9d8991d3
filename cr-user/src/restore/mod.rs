//! `cr restore`: read → validate → rebuild, ptrace-driven, with no restorer blob.
//!
//! Every image of the chain is validated (checksums of every file and page run, files the
//! image refers to still as they were) before anything is created. The task is then created at
//! its PID as a stopped, traced copy of cr and rebuilt one remote syscall at a time
//! (see [`spawn`], [`memory`], [`files`], [`task`]). Until it is released it is killed if
//! anything fails or cr dies (PTRACE_O_EXITKILL): a failed restore leaves no process behind.

pub mod files;
pub mod memory;
pub mod spawn;
pub mod task;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::{Global, RestoreOpts};
use crate::image::chain::ImageChain;
use crate::image::dir as imgdir;
use crate::image::file::Kind;
use crate::image::pb;
use crate::logging::TaskScope;
use crate::ptrace::{self, Remote, Tracee};

/// How long restore waits for a PID still held by a dying process.
const PID_WAIT: Duration = Duration::from_secs(5);

/// Everything read from the image for one process.
struct ProcImage {
    entry: pb::PsTreeEntry,
    core: pb::Core,
    mm: pb::Mm,
    fds: pb::Fds,
}

pub fn run(o: &RestoreOpts, _g: &Global) -> Result<i32> {
    let t0 = Instant::now();
    let chain = ImageChain::open(&o.images_dir)?;
    chain.validate()?;
    log::debug!("images validated in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let dir = chain.newest();
    let inv = dir.inventory();
    if inv.flags & crate::dump::DUMP_F_PRE_DUMP != 0 {
        bail!("{} is a pre-dump (memory only): restore from the final dump", o.images_dir.display());
    }
    if let Ok(k) = crate::proc::task::kernel_release() {
        if k != inv.kernel_release {
            log::warn!("the image was dumped on kernel {}, this is {k}", inv.kernel_release);
        }
    }
    let pstree: pb::PsTree = dir.read_msg(imgdir::PSTREE, Kind::PsTree)?;
    if pstree.tasks.len() != 1 {
        bail!("the image holds {} processes: restoring process trees is not supported yet", pstree.tasks.len());
    }
    let entry = pstree.tasks[0].clone();
    let pid = entry.pid;
    if entry.threads.len() != 1 {
        bail!("process {pid} has {} threads: multi-threaded restore is not supported yet", entry.threads.len());
    }
    let files: pb::Files = dir.read_msg(imgdir::FILES, Kind::Files)?;
    let img = ProcImage {
        core: dir.read_msg(&imgdir::core_file(pid), Kind::Core)?,
        mm: dir.read_msg(&imgdir::mm_file(pid), Kind::Mm)?,
        fds: dir.read_msg(&imgdir::fds_file(pid), Kind::Fds)?,
        entry,
    };
    let segments = chain.pages_for(pid)?;
    files::validate(&files, &img.mm.vmas)?;
    log::info!("restoring PID {pid} from {} ({} images in the chain)", o.images_dir.display(), chain.images().len());

    let _scope = TaskScope::enter(pid);
    let mut t = spawn::spawn_at(pid, PID_WAIT)?;
    build(&mut t, &img, &files, dir, &segments).with_context(|| format!("restoring PID {pid}"))?;
    // Past this point the task runs: write the pidfile before anything can observe it missing.
    if let Some(pf) = &o.pidfile {
        if let Err(e) = std::fs::write(pf, format!("{pid}\n")).with_context(|| format!("write pidfile {}", pf.display())) {
            drop(t); // killed: a restore that fails leaves nothing behind
            return Err(e);
        }
    }
    t.detach()?;
    log::info!("PID {pid} restored in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    drop(_scope);
    if o.detached {
        return Ok(0);
    }
    wait_for(pid)
}

/// Rebuilds one process inside the stopped task `t`.
fn build(t: &mut Tracee, img: &ProcImage, files: &pb::Files, dir: &imgdir::ImageDir, segments: &[crate::image::chain::PageSegment]) -> Result<()> {
    let pid = t.tgid;
    // The task is a copy of cr: its vDSO is cr's, at the same address.
    let cur = crate::proc::maps::read_maps(pid)?;
    let vdso = cur
        .iter()
        .find(|v| v.name == crate::proc::maps::VmaName::Vdso)
        .context("the new task has no vDSO (booted with vdso=0?): cr needs it for remote syscalls")?;
    let ip = ptrace::locate_syscall(pid, vdso.start, vdso.end)?;
    // Block every signal while cr drives the task: nothing may run a handler mid-restore.
    t.set_sigmask(!0)?;
    let mut r = Remote::new(t, ip)?;
    memory::clear_inherited(&mut r, pid)?;
    let delta = memory::move_vdso(&mut r, pid, &img.mm.vmas)?;
    r.set_syscall_ip((ip as i64 + delta) as u64);
    let scratch_at = memory::find_gap(&img.mm.vmas, memory::SCRATCH_LEN)?;
    let scratch = r.scratch_at(scratch_at, memory::SCRATCH_LEN)?.addr;
    let t_map = std::time::Instant::now();
    memory::map_vmas(&mut r, scratch, &img.mm.vmas)?;
    log::debug!("{} VMAs mapped in {:.1} ms", img.mm.vmas.len(), t_map.elapsed().as_secs_f64() * 1e3);
    let t_fill = std::time::Instant::now();
    memory::fill_pages(&mut r, pid, &img.mm.vmas, segments)?;
    log::debug!("pages written in {:.1} ms", t_fill.elapsed().as_secs_f64() * 1e3);
    memory::set_mm(&mut r, scratch, &img.mm)?;
    let keep = files::restore_fds(&mut r, scratch, pid, dir, &img.fds, files)?;
    task::restore_task(&mut r, scratch, pid, &img.core, &img.entry)?;
    r.release_scratch()?;
    r.done_without_restoring_regs();
    drop(keep);
    task::restore_cpu(t, &img.core)?;
    Ok(())
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
