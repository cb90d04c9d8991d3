//! `cr pre-dump`: the root's memory only, into an image that later dumps use as their parent.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::DumpOpts;
use crate::image::dir::{self as imgdir, ImageWriter};
use crate::image::file::Kind;
use crate::image::pb;
use crate::kernel::interrupt;
use crate::mem::incremental::Session;
use crate::tree::{dump as tree, target};

/// `cr pre-dump`: freeze, harvest (or arm), copy the pages to buffers, let the target go, then
/// write the page files and a pre-dump inventory. The image holds pages and the VMA list only:
/// it is a parent for later dumps, not restorable on its own.
pub fn run(o: &DumpOpts) -> Result<()> {
    let t_start = Instant::now();
    interrupt::install();
    // Sessions and terminals do not matter for memory; threads and children do (they must
    // not run while the memory is read), so the whole tree is frozen, and the root's memory
    // pre-dumped.
    let target = target::check_root(o.pid)?;
    let pid = target.pid;
    let writer = ImageWriter::create(&o.images_dir)?;
    log::info!(
        "pre-dumping PID {pid} ({}) into {}",
        target.stat.comm,
        o.images_dir.display()
    );
    let mut session = Session::prepare(&super::dump::tracking(o), true, pid)?;
    interrupt::check()?;
    let mut tree = tree::seize(pid).with_context(|| format!("freezing the tree of PID {pid}"))?;
    let t_frozen = Instant::now();
    let mem = session.frozen().and_then(|_| {
        let vmas = session.vmas()?;
        let main = tree
            .procs
            .iter_mut()
            .find(|p| p.pid == pid)
            .and_then(|p| p.threads.first_mut())
            .with_context(|| format!("PID {pid} has no thread to work through"))?;
        session.memory(main, None, &vmas, &writer)
    });
    // On error, dropping the tree lets every task go.
    let mem = mem?;
    tree.detach()?;
    let frozen_us = t_frozen.elapsed().as_micros() as u64;
    let mut mem = mem;
    mem.pages.start_writing();
    log::info!(
        "PID {pid} runs on (frozen {:.2} ms); writing the pre-dump",
        frozen_us as f64 / 1e3
    );
    let pagemap = mem.pages.finish()?;
    let mm = pb::Mm {
        vmas: mem.vmas,
        ..Default::default()
    };
    writer.write_msg(&imgdir::mm_file(pid), Kind::Mm, &mm)?;
    writer.write_msg(&imgdir::pagemap_file(pid), Kind::PageMap, &pagemap)?;
    let mut stats = mem.stats;
    stats.frozen_us = frozen_us;
    stats.total_us = t_start.elapsed().as_micros() as u64;
    let mut inventory = pb::Inventory {
        kernel_release: crate::kernel::proc::task::kernel_release().unwrap_or_default(),
        root_pid: pid,
        stats: Some(stats),
        cr_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        ..Default::default()
    };
    session.fill_inventory(&mut inventory);
    writer.commit(inventory)?;
    session.committed(&o.images_dir);
    log::info!(
        "pre-dump of PID {pid} complete in {:.1} ms",
        t_start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
