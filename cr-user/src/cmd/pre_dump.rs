//! `cr pre-dump`: the memory of every process of the tree, into an image that later dumps use as
//! their parent.

use std::time::Instant;

use anyhow::{Context, Result};

use super::dump::Opened;
use crate::cli::DumpOpts;
use crate::image::dir as imgdir;
use crate::image::file::Kind;
use crate::image::pb;
use crate::tree::dump as tree;

/// `cr pre-dump`: freeze, harvest (or arm), copy the pages to buffers, let the target go, then
/// write the page files and a pre-dump inventory. The image holds pages and the VMA list only:
/// it is a parent for later dumps, not restorable on its own.
pub fn run(o: &DumpOpts) -> Result<()> {
    run_to(o, None).map(|_| ())
}

/// `cr pre-dump`, through the connection of a migration when given; returns the statistics.
pub(super) fn run_to(
    o: &DumpOpts,
    remote: Option<std::sync::Arc<crate::image::wire::Sender>>,
) -> Result<pb::DumpStats> {
    let t_start = Instant::now();
    // Sessions and terminals do not matter for memory; threads and children do (they must
    // not run while the memory is read), so the whole tree is frozen, and every live
    // process's memory pre-dumped (each is then tracked on its own).
    let Opened {
        target,
        writer,
        inc: mut session,
        mut warm,
    } = super::dump::open(o, true, remote)?;
    let pid = target.pid;
    let t_seize = Instant::now();
    let mut tree = tree::seize(pid).with_context(|| format!("freezing the tree of PID {pid}"))?;
    let t_frozen = Instant::now();
    let freezing_us = (t_frozen - t_seize).as_micros() as u64;
    let live: Vec<i32> = tree
        .procs
        .iter()
        .filter(|p| !p.zombie)
        .map(|p| p.pid)
        .collect();
    let mems = session.frozen(&live).and_then(|_| {
        let mut out = Vec::with_capacity(live.len());
        for p in tree.procs.iter_mut().filter(|p| !p.zombie) {
            let ppid = p.pid;
            let vmas = session.vmas(ppid)?;
            let main = p
                .threads
                .first_mut()
                .with_context(|| format!("PID {ppid} has no thread to work through"))?;
            let mem = session
                .memory(ppid, main, None, &vmas, &writer, &mut warm, &[])
                .with_context(|| format!("pre-dumping PID {ppid}"))?;
            out.push((ppid, mem));
        }
        session.end_freeze()?;
        Ok(out)
    });
    // On error, dropping the tree lets every task go.
    let mems = mems?;
    tree.detach()?;
    let frozen_us = t_frozen.elapsed().as_micros() as u64;
    log::info!(
        "PID {pid} runs on (frozen {:.2} ms); writing the pre-dump",
        frozen_us as f64 / 1e3
    );
    let mut mems = mems;
    for (_, mem) in mems.iter_mut() {
        mem.pages.start_writing();
    }
    let t_write = Instant::now();
    let mut total: Option<pb::DumpStats> = None;
    for (ppid, mem) in mems {
        let pagemap = mem.pages.finish()?;
        let mm = pb::Mm {
            vmas: mem.vmas,
            ..Default::default()
        };
        writer.write_msg(&imgdir::mm_file(ppid), Kind::Mm, &mm)?;
        writer.write_msg(&imgdir::pagemap_file(ppid), Kind::PageMap, &pagemap)?;
        match &mut total {
            None => total = Some(mem.stats),
            Some(t) => crate::mem::incremental::add_stats(t, &mem.stats, ppid),
        }
    }
    let memwrite_us = t_write.elapsed().as_micros() as u64;
    let mem_stats = total.with_context(|| format!("PID {pid}: nothing to pre-dump"))?;
    let mut stats = mem_stats;
    stats.frozen_us = frozen_us;
    stats.freezing_us = freezing_us;
    stats.memwrite_us = memwrite_us;
    stats.total_us = t_start.elapsed().as_micros() as u64;
    let mut inventory = super::dump::inventory(pid, 0, stats.clone());
    session.fill_inventory(&mut inventory);
    let inventory = writer.commit(inventory)?;
    session.committed(&o.images_dir);
    log::info!(
        "pre-dump of PID {pid} complete in {:.1} ms",
        t_start.elapsed().as_secs_f64() * 1e3
    );
    super::dump::display_stats(o, &inventory);
    Ok(stats)
}
