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

/// A buffer for pages copied out of the target: an anonymous mapping of [`CHUNK`] bytes,
/// 2 MiB aligned and advised MADV_HUGEPAGE, so that filling it costs a few huge-page faults
/// instead of one fault per 4 KiB page (the copy then runs at memory speed), and page aligned
/// (as O_DIRECT writes want).
pub struct PageBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a PageBuf exclusively owns its mapping; moving it to the writer thread moves that
// ownership.
unsafe impl Send for PageBuf {}

const HUGE: usize = 2 << 20;

impl PageBuf {
    fn new() -> Result<PageBuf> {
        let cap = CHUNK as usize;
        // SAFETY: a fresh anonymous mapping; we trim it to a 2 MiB-aligned CHUNK and own that.
        unsafe {
            let raw = libc::mmap(std::ptr::null_mut(), cap + HUGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            if raw == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mmap a page buffer");
            }
            let start = raw as usize;
            let aligned = (start + HUGE - 1) & !(HUGE - 1);
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let tail = start + cap + HUGE - (aligned + cap);
            if tail > 0 {
                libc::munmap((aligned + cap) as *mut libc::c_void, tail);
            }
            // Advice only: without THP the buffer still works, with 4 KiB pages.
            libc::madvise(aligned as *mut libc::c_void, cap, libc::MADV_HUGEPAGE);
            Ok(PageBuf { ptr: aligned as *mut u8, len: cap })
        }
    }

    /// A buffer from the pool [`warm_buffers`] filled, or a fresh one.
    fn take() -> Result<PageBuf> {
        match POOL.lock().ok().and_then(|mut p| p.pop()) {
            Some(b) => Ok(b),
            None => PageBuf::new(),
        }
    }

    /// Sets the length in use (at most CHUNK); the content is whatever was there.
    fn set_len(&mut self, len: usize) {
        self.len = len.min(CHUNK as usize);
    }

    /// False for the empty placeholder left behind by `std::mem::take`.
    fn is_mapped(&self) -> bool {
        self.ptr != std::ptr::NonNull::<u8>::dangling().as_ptr()
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies in our live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold it exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if !self.is_mapped() {
            return;
        }
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr.cast(), CHUNK as usize) };
    }
}

impl Default for PageBuf {
    /// An empty placeholder (no mapping); only `std::mem::take` uses it.
    fn default() -> PageBuf {
        PageBuf { ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0 }
    }
}

/// Buffers made ready before a freeze (see [`warm_buffers`]).
static POOL: std::sync::Mutex<Vec<PageBuf>> = std::sync::Mutex::new(Vec::new());

/// Maps and populates buffers for about `bytes` of pages now, before the target is frozen:
/// a fresh buffer's first touch costs the kernel zeroing its (huge) pages, which would
/// otherwise run while the target waits. Best effort: a failure only means fresh buffers later.
pub fn warm_buffers(bytes: u64) {
    let n = bytes.div_ceil(CHUNK) as usize;
    let Ok(mut pool) = POOL.lock() else { return };
    while pool.len() < n {
        let Ok(b) = PageBuf::new() else { return };
        // SAFETY: advice on the buffer's own mapping; it only populates it.
        unsafe { libc::madvise(b.ptr.cast(), CHUNK as usize, libc::MADV_POPULATE_WRITE) };
        pool.push(b);
    }
}

/// Pages copied but perhaps not yet written: [`PendingPages::finish`] waits for the writer.
pub struct PendingPages {
    writer: Option<JoinHandle<Result<pb::PageMap>>>,
    /// Holds the writer back until the target runs again (see [`copy_plan`]); dropping it
    /// lets the writer go.
    gate: Option<mpsc::Sender<()>>,
}

impl PendingPages {
    /// Lets a held-back writer start (the target no longer waits for us).
    pub fn start_writing(&mut self) {
        self.gate = None;
    }

    /// Waits until every page is written and the page file is complete.
    pub fn finish(mut self) -> Result<pb::PageMap> {
        self.gate = None;
        let h = self.writer.take().expect("finish called once");
        h.join().map_err(|_| anyhow!("the page writer thread panicked"))?
    }
}

impl Drop for PendingPages {
    fn drop(&mut self) {
        self.gate = None;
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
    let (tx, rx): (SyncSender<(u64, PageBuf)>, Receiver<(u64, PageBuf)>) = mpsc::sync_channel(slots);
    let (back_tx, back_rx) = mpsc::channel::<PageBuf>();
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
    let mut pending = PendingPages { writer: Some(handle), gate: None };
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

fn read_all(pid: i32, runs: &[Run], tx: &SyncSender<(u64, PageBuf)>, back: &Receiver<PageBuf>) -> Result<()> {
    for run in runs {
        let mut addr = run.start;
        while addr < run.end {
            interrupt::check()?;
            let len = (run.end - addr).min(CHUNK) as usize;
            let mut buf = match back.try_recv() {
                Ok(b) => b,
                Err(_) => PageBuf::new()?,
            };
            buf.set_len(len);
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

/// One step of an incremental dump's page plan, in ascending address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanItem {
    /// Copy `[start, end)` from the target (`readable`: process_vm_readv works; otherwise
    /// /proc/PID/mem).
    Data { start: u64, end: u64, readable: bool },
    /// `[start, end)` is unchanged since the parent image: an `in_parent` run.
    Parent { start: u64, end: u64 },
}

/// A piece of a batch for the writer thread.
enum Piece {
    Data { vaddr: u64, off: usize, len: usize },
    Parent { vaddr: u64, pages: u64 },
}

/// Like [`copy`], for a plan that mixes copied runs and parent runs. Many small runs (a
/// scattered dirty set) are gathered into one buffer and read with one process_vm_readv per
/// IOV_MAX of them, so the frozen time stays proportional to the data, not to the runs.
///
/// When all the data fits in `budget`, the writer is held back until
/// [`PendingPages::start_writing`] or [`PendingPages::finish`]: while the target is frozen the
/// CPU is the reader's (on a small machine a writer checksumming and writing beside it slows
/// the copy the target waits for).
pub fn copy_plan(pid: i32, plan: &[PlanItem], writer: PageWriter, budget: u64) -> Result<PendingPages> {
    let slots = (budget / CHUNK).max(2) as usize;
    let data: u64 = plan
        .iter()
        .map(|i| match *i {
            PlanItem::Data { start, end, .. } => end - start,
            PlanItem::Parent { .. } => 0,
        })
        .sum();
    let hold = data <= budget;
    // Held back, the writer cannot drain a bounded channel: then the channel is unbounded
    // (the budget bounds the memory).
    let (tx, rx): (BatchSender, Receiver<Batch>) = if hold {
        let (t, r) = mpsc::channel();
        (BatchSender::Unbounded(t), r)
    } else {
        let (t, r) = mpsc::sync_channel(slots);
        (BatchSender::Bounded(t), r)
    };
    let (back_tx, back_rx) = mpsc::channel::<PageBuf>();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("cr-page-writer".into())
        .spawn(move || -> Result<pb::PageMap> {
            if hold {
                // Returns when the sender is dropped (start_writing, finish, or an error).
                let _ = gate_rx.recv();
            }
            let mut w = writer;
            for (buf, pieces) in rx {
                for p in pieces {
                    match p {
                        Piece::Data { vaddr, off, len } => w.write_run(vaddr, &buf[off..off + len])?,
                        Piece::Parent { vaddr, pages } => w.add_parent_run(vaddr, pages)?,
                    }
                }
                let _ = back_tx.send(buf);
            }
            w.finish()
        })
        .context("start the page writer thread")?;
    let mut pending = PendingPages { writer: Some(handle), gate: Some(gate_tx) };
    let result = read_plan(pid, plan, &tx, &back_rx);
    drop(tx);
    if let Err(e) = result {
        pending.gate = None;
        if let Some(h) = pending.writer.take() {
            if let Ok(Err(we)) = h.join() {
                return Err(we).context("writing the page file");
            }
        }
        return Err(e);
    }
    Ok(pending)
}

type Batch = (PageBuf, Vec<Piece>);

/// The reader's end of the batch channel (bounded unless the writer is held back).
enum BatchSender {
    Bounded(SyncSender<Batch>),
    Unbounded(mpsc::Sender<Batch>),
}

impl BatchSender {
    fn send(&self, b: Batch) -> Result<()> {
        let r = match self {
            BatchSender::Bounded(t) => t.send(b).is_ok(),
            BatchSender::Unbounded(t) => t.send(b).is_ok(),
        };
        if r {
            Ok(())
        } else {
            Err(anyhow!("the page writer stopped"))
        }
    }
}

fn read_plan(pid: i32, plan: &[PlanItem], tx: &BatchSender, back: &Receiver<PageBuf>) -> Result<()> {
    let chunk = CHUNK as usize;
    // Buffers are always CHUNK long; `used` is how much of the current one is filled.
    let new_buf = || -> Result<PageBuf> {
        loop {
            match back.try_recv() {
                Ok(mut b) if b.is_mapped() => {
                    b.set_len(chunk);
                    return Ok(b);
                }
                Ok(_) => continue, // a batch of parent runs only: it carried no buffer
                Err(_) => return PageBuf::take(),
            }
        }
    };
    let mut buf = PageBuf::default();
    let mut used = 0usize;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut ranges: Vec<(u64, usize)> = Vec::new();
    // Reads the gathered ranges (back to back at the start of the buffer) and hands the
    // batch to the writer.
    let flush = |buf: &mut PageBuf, used: &mut usize, pieces: &mut Vec<Piece>, ranges: &mut Vec<(u64, usize)>| -> Result<()> {
        if pieces.is_empty() {
            return Ok(());
        }
        if !ranges.is_empty() {
            crate::sys::vm::process_vm_readv_ranges(pid, ranges, &mut buf[..*used])?;
        }
        tx.send((std::mem::take(buf), std::mem::take(pieces)))?;
        ranges.clear();
        *used = 0;
        Ok(())
    };
    for item in plan {
        interrupt::check()?;
        match *item {
            PlanItem::Parent { start, end } => {
                pieces.push(Piece::Parent { vaddr: start, pages: (end - start) / 4096 });
            }
            PlanItem::Data { start, end, readable } => {
                if !readable {
                    // Unreadable memory goes through /proc/PID/mem, in batches of its own.
                    flush(&mut buf, &mut used, &mut pieces, &mut ranges)?;
                }
                let mut addr = start;
                while addr < end {
                    if buf.is_empty() {
                        buf = new_buf()?;
                    }
                    if used == chunk || ranges.len() >= crate::sys::IOV_MAX {
                        flush(&mut buf, &mut used, &mut pieces, &mut ranges)?;
                        continue;
                    }
                    let len = ((end - addr) as usize).min(chunk - used);
                    if readable {
                        ranges.push((addr, len));
                    } else {
                        crate::ptrace::inject::read_mem(pid, addr, &mut buf[used..used + len])?;
                    }
                    pieces.push(Piece::Data { vaddr: addr, off: used, len });
                    used += len;
                    addr += len as u64;
                }
                if !readable {
                    flush(&mut buf, &mut used, &mut pieces, &mut ranges)?;
                }
            }
        }
    }
    flush(&mut buf, &mut used, &mut pieces, &mut ranges)
}
