//! Copying the target's pages into the page file, split so that the target is frozen only for
//! the part that needs it.
//!
//! The ptrace thread reads memory with process_vm_readv into buffers (the fast part, about
//! 3 GB/s here); a writer thread checksums each buffer and writes it into the page file (the
//! slow part: page cache and filesystem). Up to a memory budget of buffers may be in flight, so
//! with a budget that holds the whole dump the target can be released (`-R`) as soon as the
//! last read is done, while the writes finish.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

use super::interrupt;
use super::memory::Run;
use crate::image::pages::PageWriter;
use crate::image::pb;

/// Size of one buffer (and the largest write).
const CHUNK: u64 = 8 << 20;

/// Pages copied but perhaps not yet written: [`PendingPages::finish`] waits for the writer.
pub struct PendingPages {
    writer: Option<JoinHandle<Result<pb::PageMap>>>,
}

impl PendingPages {
    /// Waits until every page is written and the page file is complete.
    pub fn finish(mut self) -> Result<pb::PageMap> {
        let h = self.writer.take().expect("finish called once");
        h.join().map_err(|_| anyhow!("the page writer thread panicked"))?
    }
}

impl Drop for PendingPages {
    fn drop(&mut self) {
        if let Some(h) = self.writer.take() {
            // Dropped unfinished (an error elsewhere): let the writer end; its PageWriter
            // removes the temporary file.
            let _ = h.join();
        }
    }
}

/// How much copied memory may wait for the disk: all of it if it fits in a quarter of the
/// available memory, else that quarter (then the reads wait for the writes).
pub fn budget(total: u64) -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())))
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30);
    total.min(avail / 4).max(2 * CHUNK)
}

/// Reads every run of `pid` (frozen) and hands the data to a writer thread.
/// Returns once everything is read; the writes may still be going on.
pub fn copy(pid: i32, runs: &[Run], writer: PageWriter, budget: u64) -> Result<PendingPages> {
    let slots = (budget / CHUNK).max(2) as usize;
    let (tx, rx): (SyncSender<(u64, Vec<u8>)>, Receiver<(u64, Vec<u8>)>) = mpsc::sync_channel(slots);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let handle = std::thread::Builder::new()
        .name("cr-page-writer".into())
        .spawn(move || -> Result<pb::PageMap> {
            let mut w = writer;
            for (vaddr, buf) in rx {
                w.write_run(vaddr, &buf)?;
                let _ = back_tx.send(buf);
            }
            w.finish()
        })
        .context("start the page writer thread")?;
    let mut pending = PendingPages { writer: Some(handle) };
    let result = read_all(pid, runs, &tx, &back_rx);
    drop(tx);
    if let Err(e) = result {
        // If the writer failed first, its error is the cause.
        if let Some(h) = pending.writer.take() {
            if let Ok(Err(we)) = h.join() {
                return Err(we).context("writing the page file");
            }
        }
        return Err(e);
    }
    Ok(pending)
}

fn read_all(pid: i32, runs: &[Run], tx: &SyncSender<(u64, Vec<u8>)>, back: &Receiver<Vec<u8>>) -> Result<()> {
    for run in runs {
        let mut addr = run.start;
        while addr < run.end {
            interrupt::check()?;
            let len = (run.end - addr).min(CHUNK) as usize;
            // A recycled buffer, or a fresh zeroed one (calloc: fresh pages, no memset).
            let mut buf = match back.try_recv() {
                Ok(mut b) => {
                    b.resize(len, 0);
                    b
                }
                Err(_) => vec![0u8; len],
            };
            if run.readable {
                crate::sys::vm::process_vm_readv_ranges(pid, &[(addr, len)], &mut buf)?;
            } else {
                crate::ptrace::inject::read_mem(pid, addr, &mut buf)?;
            }
            tx.send((addr, buf)).map_err(|_| anyhow!("the page writer stopped"))?;
            addr += len as u64;
        }
    }
    Ok(())
}
