//! `cr dump`: freeze → collect → write → commit → kill (or let run with -R).
//!
//! The target is held with ptrace from seize to the end. On any error after seizing, every
//! change is undone on the way out (registers put back by `Remote`, scratch memory unmapped,
//! the task detached by `Tracee`'s drop), so a failed dump leaves the target running as before,
//! and the image directory has no inventory (never mistaken for a complete image).

pub mod files;
pub mod incremental;
pub mod interrupt;
pub mod memory;
pub mod pages;
pub mod task;
pub mod target;

use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::DumpOpts;
use crate::image::dir::{self as imgdir, ImageWriter};
use crate::image::file::Kind;
use crate::image::pb;
use crate::proc;
use crate::proc::maps::VmaName;
use crate::ptrace::{self, Remote, Tracee};

/// Inventory flag bits.
pub const DUMP_F_PRE_DUMP: u64 = 1;
pub const DUMP_F_TCP: u64 = 2;
pub const DUMP_F_SHELL_JOB: u64 = 4;
pub const DUMP_F_FILE_LOCKS: u64 = 8;

pub fn run(o: &DumpOpts, pre_dump: bool) -> Result<()> {
    if pre_dump {
        return incremental::pre_dump(o);
    }
    let t_start = Instant::now();
    interrupt::install();
    let target = target::check(o.pid, o.shell_job)?;
    let pid = target.pid;
    let writer = ImageWriter::create(&o.images_dir)?;
    log::info!("dumping PID {pid} ({}) into {}", target.stat.comm, o.images_dir.display());
    let mut inc = incremental::Session::prepare(o, false, pid)?;
    interrupt::check()?;

    let mut tracee = Tracee::seize(pid, pid).with_context(|| format!("freezing PID {pid}"))?;
    let t_frozen = Instant::now();
    log::info!("PID {pid} frozen");
    let collected = match inc.frozen().and_then(|_| dump_frozen(&mut tracee, &writer, o, &mut inc)) {
        Ok(c) => c,
        Err(e) => {
            // Dropping the tracee detaches it; the Remote (already dropped) restored registers.
            drop(tracee);
            return Err(e);
        }
    };
    // With -R the target needs nothing more from us: everything is read. Let it run while the
    // page writer finishes.
    let mut frozen_us = 0;
    let tracee = if o.leave_running {
        tracee.detach()?;
        frozen_us = t_frozen.elapsed().as_micros() as u64;
        log::info!("PID {pid} runs on (frozen {:.1} ms); finishing the image", frozen_us as f64 / 1e3);
        None
    } else {
        Some(tracee)
    };
    let result = write_images(&writer, collected).and_then(|mut stats| {
        interrupt::check()?;
        stats.frozen_us = if frozen_us != 0 { frozen_us } else { t_frozen.elapsed().as_micros() as u64 };
        stats.total_us = t_start.elapsed().as_micros() as u64;
        let mut flags = 0;
        if o.tcp_established {
            flags |= DUMP_F_TCP;
        }
        if o.shell_job {
            flags |= DUMP_F_SHELL_JOB;
        }
        if o.file_locks {
            flags |= DUMP_F_FILE_LOCKS;
        }
        let mut inventory = pb::Inventory {
            kernel_release: proc::task::kernel_release().unwrap_or_default(),
            root_pid: pid,
            flags,
            stats: Some(stats),
            cr_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            ..Default::default()
        };
        inc.fill_inventory(&mut inventory);
        // Commit before the target goes away: a dump that cannot be committed must not kill it.
        writer.commit(inventory)?;
        inc.committed(&o.images_dir);
        Ok(())
    });
    let Some(tracee) = tracee else {
        result?;
        log::info!("dump of PID {pid} complete in {:.1} ms", t_start.elapsed().as_secs_f64() * 1e3);
        return Ok(());
    };
    if let Err(e) = result {
        drop(tracee);
        return Err(e);
    }
    let frozen = t_frozen.elapsed();
    tracee.kill()?;
    inc.target_gone();
    log::info!("dump of PID {pid} complete; the process was killed (frozen {:.1} ms)", frozen.as_secs_f64() * 1e3);
    Ok(())
}

/// What was collected while the target was frozen; pages may still be on their way to disk.
struct Collected {
    pid: i32,
    core: pb::Core,
    mm: pb::Mm,
    fdt: files::FdTable,
    pstree: pb::PsTree,
    pages: pages::PendingPages,
    stats: pb::DumpStats,
}

/// Everything that needs the target frozen: its state, and a copy of its memory.
fn dump_frozen(t: &mut Tracee, w: &ImageWriter, o: &DumpOpts, inc: &mut incremental::Session) -> Result<Collected> {
    let pid = t.tgid;
    let stat = proc::stat::read_stat(pid)?;
    let status = proc::status::read_status(pid)?;
    let vmas = inc.vmas()?;
    let regs = t.regs()?;
    if let Some(r) = task::describe_restart(&regs) {
        log::debug!("PID {pid} is inside syscall {} ({r})", regs.orig_rax as i64);
    }
    let mut core = task::thread_core(t, &regs)?;
    interrupt::check()?;

    let vdso = vmas
        .iter()
        .find(|v| v.name == VmaName::Vdso)
        .with_context(|| format!("PID {pid} has no vDSO: cr needs its syscall instruction for remote calls"))?;
    let ip = ptrace::locate_syscall(pid, vdso.start, vdso.end)?;
    // Signals stay queued (not stopping remote calls) until the mask is put back.
    let held = task::SignalsHeld::hold(t, core.sigmask)?;
    let mut remote = Remote::new(t, ip)?;
    task::thread_state(&mut remote, &mut core)?;
    let (state, brk) = task::task_state(pid, &mut remote, &status)?;
    remote.finish()?;
    core.pending = task::pending_signals(t)?;
    held.release()?;
    core.task = Some(state);
    interrupt::check()?;

    let mut next_id = 1;
    let fdt = files::collect(pid, &mut next_id, o.shell_job)?;
    let mut mm = memory::mm_fields(pid, &stat, brk)?;
    let mem = inc.memory(t, Some(ip), &vmas, w)?;
    mm.vmas = mem.vmas;

    let pstree = pb::PsTree {
        tasks: vec![pb::PsTreeEntry {
            pid,
            ppid: stat.ppid,
            pgid: stat.pgrp,
            sid: stat.session,
            threads: vec![pid],
            zombie: false,
            exit_status: 0,
        }],
    };
    let stats = mem.stats;
    Ok(Collected { pid, core, mm, fdt, pstree, pages: mem.pages, stats })
}

/// Writes every descriptor once the pages are on disk. Returns the statistics.
fn write_images(w: &ImageWriter, c: Collected) -> Result<pb::DumpStats> {
    let pid = c.pid;
    let pagemap = c.pages.finish()?;
    w.write_msg(&imgdir::core_file(pid), Kind::Core, &c.core)?;
    w.write_msg(&imgdir::mm_file(pid), Kind::Mm, &c.mm)?;
    w.write_msg(&imgdir::pagemap_file(pid), Kind::PageMap, &pagemap)?;
    w.write_msg(&imgdir::fds_file(pid), Kind::Fds, &c.fdt.fds)?;
    for (name, bytes) in &c.fdt.contents {
        w.write_blob(name, bytes)?;
    }
    w.write_msg(imgdir::FILES, Kind::Files, &pb::Files { files: c.fdt.files })?;
    w.write_msg(imgdir::PSTREE, Kind::PsTree, &c.pstree)?;
    Ok(c.stats)
}
