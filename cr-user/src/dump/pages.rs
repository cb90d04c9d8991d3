//! Copying the pages of a frozen target into its page file.
//!
//! One reader (the dumping thread) copies page runs out of the target with `process_vm_readv`
//! into page-aligned buffers of [`CHUNK`] bytes; one writer thread appends them to the page
//! file (`image::pages::PageWriter`: page cache, writeback started as it goes). The two run
//! side by side while the target is frozen, one core each, and buffers go back to the reader
//! once written: a dump of any size turns over a few MiB of buffers.
//!
//! Why the reader does not copy everything into memory first and let the target go: on this
//! kind of machine (a VM whose free memory is reported back to the host) touching fresh memory
//! is the dearest thing a dump does. Measured for 1 GiB: populating fresh 4 KiB pages 0.35-0.5
//! s (fresh 2 MiB pages 2-3 s), while `process_vm_readv` into buffers already touched takes
//! about 0.25 s and writing them into the page cache about 0.3 s. The old way (fresh 2 MiB
//! buffers for everything, written after) froze a 1 GiB target for about 1 s.
//!
//! So, for each buffer it needs, the reader takes in order: one the writer gave back, one
//! warmed before the freeze ([`warm_buffers`]), a fresh one while it has fewer than
//! [`MIN_BUFFERS`], a fresh one if the measured costs say that reading plus populating a fresh
//! buffer beats the writer's pace (a slow disk), and otherwise it waits for the writer. When
//! the writer has a backlog (it sets the pace), the reader checksums each batch it just read
//! (still in the cache) so that the writer only writes; otherwise the writer checksums.
//! Up to a memory budget ([`budget`]) of buffers may be in flight. With `-R` the target is let
//! go as soon as the last read is done, while the last writes finish.
//!
//! Incremental dumps ([`copy_plan`]) may hold the writer back until the target runs again
//! when everything fits in the buffers warmed before the freeze: then the freeze costs the
//! reads alone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use super::interrupt;
use super::memory::Run;
use crate::image::pages::{PageWriter, RunPiece};
use crate::image::pb;

/// Size of one buffer. Small, so that the few buffers a copy turns over stay in the caches and
/// the TLB between the read, the checksum and the write (2 MiB buffers read about a quarter
/// quicker than 8 MiB ones here).
const CHUNK: u64 = 2 << 20;
/// Buffers a copy takes fresh without weighing the cost: enough for the writer to write one
/// gathered batch while the reader fills as much again.
const MIN_BUFFERS: usize = 8;
/// The writer gathers queued batches into one write of up to this many bytes (only `O_DIRECT`
/// cares: a larger request keeps more of the device busy).
const WRITE_MAX: u64 = 4 * CHUNK;
/// Assumed cost of a fresh buffer (ns per MiB) until one was measured.
const FRESH_GUESS_NS_PER_MIB: u64 = 500_000;
/// An incremental copy holds the writer back only if its data needs at most this much fresh
/// memory beyond the warmed buffers.
const HOLD_FRESH_MAX: u64 = 16 * CHUNK;

const MIB: u64 = 1 << 20;

/// A buffer for pages copied out of the target: an anonymous mapping of [`CHUNK`] bytes, page
/// aligned (as `O_DIRECT` writes want), with small pages: on a VM with free page reporting a
/// fresh 2 MiB page faults in from the host about five times slower than 512 small ones
/// (measured), and since the buffers are turned over, huge pages' cheaper TLB never pays that
/// back.
pub struct PageBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a PageBuf exclusively owns its mapping; moving it to the writer thread moves that
// ownership.
unsafe impl Send for PageBuf {}

impl PageBuf {
    /// A new buffer, every page populated (so its cost is paid, and measured, here rather than
    /// inside the first `process_vm_readv`).
    fn new() -> Result<PageBuf> {
        let cap = CHUNK as usize;
        // SAFETY: a fresh anonymous mapping, owned by the PageBuf from here; the advice only
        // concerns it.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), cap, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mmap a page buffer");
            }
            libc::madvise(p, cap, libc::MADV_NOHUGEPAGE);
            // Best effort: unpopulated pages are faulted in by the first read instead.
            libc::madvise(p, cap, libc::MADV_POPULATE_WRITE);
            Ok(PageBuf { ptr: p.cast(), len: cap })
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

fn pool_pop() -> Option<PageBuf> {
    POOL.lock().ok().and_then(|mut p| p.pop())
}

fn pooled_bytes() -> u64 {
    POOL.lock().map(|p| p.len() as u64 * CHUNK).unwrap_or(0)
}

/// Maps and populates buffers for about `bytes` of pages now, before the target is frozen:
/// a fresh buffer's first touch costs the kernel (and the host) zeroing its pages, which would
/// otherwise run while the target waits. Best effort: a failure only means fresh buffers later.
pub fn warm_buffers(bytes: u64) {
    let n = bytes.div_ceil(CHUNK) as usize;
    loop {
        if POOL.lock().map(|p| p.len() >= n).unwrap_or(true) {
            return;
        }
        let Ok(b) = PageBuf::new() else { return };
        let Ok(mut pool) = POOL.lock() else { return };
        pool.push(b);
    }
}

/// Pages copied but perhaps not yet written: [`PendingPages::finish`] waits for the writer.
pub struct PendingPages {
    writer: Option<JoinHandle<Result<pb::PageMap>>>,
    /// Holds the writer back until the target runs again (see [`copy_plan`]); dropping it (or
    /// a message on it) lets the writer go.
    gate: Option<Sender<()>>,
    /// Tells the writer to give up instead of completing the page file.
    abort: Arc<AtomicBool>,
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
            // Dropped unfinished (an error elsewhere): the writer gives up and its PageWriter
            // removes the temporary file.
            self.abort.store(true, Ordering::Release);
            let _ = h.join();
        }
    }
}

/// How much copied memory may wait for the disk: all of it if it fits in a quarter of the
/// available memory, else that quarter.
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
    let plan: Vec<PlanItem> = runs.iter().map(|r| PlanItem::Data { start: r.start, end: r.end, readable: r.readable }).collect();
    run_copy(pid, &plan, writer, budget, false)
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

/// Like [`copy`], for a plan that mixes copied runs and parent runs. Many small runs (a
/// scattered dirty set) are gathered into one buffer and read with one process_vm_readv per
/// IOV_MAX of them, so the frozen time stays proportional to the data, not to the runs.
///
/// When all the data fits in the buffers warmed before the freeze (and the budget), the writer
/// is held back until [`PendingPages::start_writing`] or [`PendingPages::finish`]: while the
/// target is frozen the CPU is the reader's.
pub fn copy_plan(pid: i32, plan: &[PlanItem], writer: PageWriter, budget: u64) -> Result<PendingPages> {
    let data: u64 = plan
        .iter()
        .map(|i| match *i {
            PlanItem::Data { start, end, .. } => end - start,
            PlanItem::Parent { .. } => 0,
        })
        .sum();
    let hold = data <= budget && data <= pooled_bytes() + HOLD_FRESH_MAX;
    run_copy(pid, plan, writer, budget, hold)
}

/// The writer's pace so far, shared with the reader.
#[derive(Default)]
struct Pace {
    bytes: AtomicU64,
    ns: AtomicU64,
    /// Batches written (the reader counts those it sent).
    batches: AtomicU64,
}

fn run_copy(pid: i32, plan: &[PlanItem], writer: PageWriter, budget: u64, hold: bool) -> Result<PendingPages> {
    let (tx, rx) = mpsc::channel::<Batch>();
    let (back_tx, back_rx) = mpsc::channel::<PageBuf>();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let pace = Arc::new(Pace::default());
    let abort = Arc::new(AtomicBool::new(false));
    let (writer_pace, writer_abort) = (pace.clone(), abort.clone());
    let handle = std::thread::Builder::new()
        .name("cr-page-writer".into())
        .spawn(move || write_batches(writer, rx, back_tx, hold.then_some(gate_rx), &writer_pace, &writer_abort))
        .context("start the page writer thread")?;
    let mut pending = PendingPages { writer: Some(handle), gate: hold.then(|| gate_tx.clone()), abort };
    let mut r = Reader::new(pid, tx, back_rx, pace, budget, hold.then_some(gate_tx));
    let (t0, cpu0) = (Instant::now(), thread_cpu_ns());
    let result = r.read_plan(plan);
    r.log_stats(t0, cpu0);
    if result.is_err() {
        pending.abort.store(true, Ordering::Release);
    }
    drop(r);
    if let Err(e) = result {
        pending.gate = None;
        // If the writer failed first, its error is the cause.
        if let Some(h) = pending.writer.take() {
            if let Ok(Err(we)) = h.join() {
                if we.downcast_ref::<Aborted>().is_none() {
                    return Err(we).context("writing the page file");
                }
            }
        }
        return Err(e);
    }
    Ok(pending)
}

/// The writer gave up because the dump failed elsewhere.
#[derive(Debug)]
struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the page file was abandoned: the dump failed")
    }
}

impl std::error::Error for Aborted {}

/// A piece of a batch for the writer thread.
enum Piece {
    /// `len` bytes at `off` in the batch's buffer are the memory at `vaddr`; `crc` if the
    /// reader already checksummed them.
    Data { vaddr: u64, off: usize, len: usize, crc: Option<u32> },
    Parent { vaddr: u64, pages: u64 },
}

type Batch = (PageBuf, Vec<Piece>);

fn batch_bytes(b: &Batch) -> u64 {
    b.1.iter()
        .map(|p| match p {
            Piece::Data { len, .. } => *len as u64,
            Piece::Parent { .. } => 0,
        })
        .sum()
}

/// The writer thread: waits for the gate (if held back), then writes batches, gathering what
/// is queued into one write of up to [`WRITE_MAX`], and gives the buffers back.
fn write_batches(mut w: PageWriter, rx: Receiver<Batch>, back: Sender<PageBuf>, gate: Option<Receiver<()>>, pace: &Pace, abort: &AtomicBool) -> Result<pb::PageMap> {
    if let Some(g) = gate {
        // Returns on a message or when every sender is gone: either means go.
        let _ = g.recv();
    }
    let (mut busy_ns, mut bytes_total) = (0u64, 0u64);
    let cpu0 = thread_cpu_ns();
    let mut batches: Vec<Batch> = Vec::new();
    while let Ok(first) = rx.recv() {
        if abort.load(Ordering::Acquire) {
            break;
        }
        let mut bytes = batch_bytes(&first);
        batches.push(first);
        while bytes < WRITE_MAX {
            match rx.try_recv() {
                Ok(b) => {
                    bytes += batch_bytes(&b);
                    batches.push(b);
                }
                Err(_) => break,
            }
        }
        let t = Instant::now();
        let pieces: Vec<RunPiece> = batches
            .iter()
            .flat_map(|(buf, ps)| {
                ps.iter().map(move |p| match *p {
                    Piece::Data { vaddr, off, len, crc } => RunPiece::Data { vaddr, bytes: &buf[off..off + len], crc },
                    Piece::Parent { vaddr, pages } => RunPiece::Parent { vaddr, nr_pages: pages },
                })
            })
            .collect();
        w.add(&pieces)?;
        drop(pieces);
        let ns = t.elapsed().as_nanos() as u64;
        busy_ns += ns;
        bytes_total += bytes;
        pace.ns.fetch_add(ns, Ordering::Relaxed);
        pace.bytes.fetch_add(bytes, Ordering::Release);
        pace.batches.fetch_add(batches.len() as u64, Ordering::Release);
        for (buf, _) in batches.drain(..) {
            if buf.is_mapped() {
                let _ = back.send(buf);
            }
        }
    }
    if abort.load(Ordering::Acquire) {
        // Dropping `w` removes the temporary file.
        return Err(anyhow::Error::new(Aborted));
    }
    log::debug!(
        "page writer: {} MiB in {:.1} ms of checksums and writes (CPU {:.1} ms, {})",
        bytes_total / MIB,
        busy_ns as f64 / 1e6,
        (thread_cpu_ns() - cpu0) as f64 / 1e6,
        if w.is_direct() { "O_DIRECT" } else { "page cache" }
    );
    w.finish()
}

/// CPU time of the calling thread, in ns (for the log: on a busy machine the wall-clock times
/// above include waiting for a CPU).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the reader did, for the log.
#[derive(Default)]
struct ReadStats {
    bytes: u64,
    read_ns: u64,
    wait_ns: u64,
    waits: u64,
    fresh: u64,
    fresh_ns: u64,
    warmed: u64,
    crc_bytes: u64,
    crc_ns: u64,
}

/// The reading side of a copy: gathers plan items into buffers, reads them, sends them.
struct Reader {
    pid: i32,
    tx: Sender<Batch>,
    back: Receiver<PageBuf>,
    pace: Arc<Pace>,
    /// The held-back writer's gate (None: the writer runs).
    gate: Option<Sender<()>>,
    /// Buffers this copy owns (in its hands, queued or being written).
    live: usize,
    max_live: usize,
    /// Batches sent to the writer.
    sent: u64,
    buf: PageBuf,
    used: usize,
    pieces: Vec<Piece>,
    ranges: Vec<(u64, usize)>,
    stats: ReadStats,
}

impl Reader {
    fn new(pid: i32, tx: Sender<Batch>, back: Receiver<PageBuf>, pace: Arc<Pace>, budget: u64, gate: Option<Sender<()>>) -> Reader {
        Reader {
            pid,
            tx,
            back,
            pace,
            gate,
            live: 0,
            max_live: ((budget / CHUNK) as usize).max(MIN_BUFFERS),
            sent: 0,
            buf: PageBuf::default(),
            used: 0,
            pieces: Vec::new(),
            ranges: Vec::new(),
            stats: ReadStats::default(),
        }
    }

    fn read_plan(&mut self, plan: &[PlanItem]) -> Result<()> {
        let chunk = CHUNK as usize;
        for item in plan {
            interrupt::check()?;
            match *item {
                PlanItem::Parent { start, end } => self.pieces.push(Piece::Parent { vaddr: start, pages: (end - start) / 4096 }),
                PlanItem::Data { start, end, readable } => {
                    if !readable {
                        // Unreadable memory goes through /proc/PID/mem, in batches of its own.
                        self.flush()?;
                    }
                    let mut addr = start;
                    while addr < end {
                        if !self.buf.is_mapped() {
                            self.buf = self.next_buf()?;
                            self.buf.set_len(chunk);
                        }
                        if self.used == chunk || self.ranges.len() >= crate::sys::IOV_MAX {
                            self.flush()?;
                            interrupt::check()?;
                            continue;
                        }
                        let len = ((end - addr) as usize).min(chunk - self.used);
                        if readable {
                            self.ranges.push((addr, len));
                        } else {
                            let t = Instant::now();
                            crate::ptrace::inject::read_mem(self.pid, addr, &mut self.buf[self.used..self.used + len])?;
                            self.stats.read_ns += t.elapsed().as_nanos() as u64;
                        }
                        self.pieces.push(Piece::Data { vaddr: addr, off: self.used, len, crc: None });
                        self.used += len;
                        self.stats.bytes += len as u64;
                        addr += len as u64;
                    }
                    if !readable {
                        self.flush()?;
                    }
                }
            }
        }
        self.flush()
    }

    /// Reads the gathered ranges (back to back at the start of the buffer) and hands the batch
    /// to the writer; checksums it first if the reader would wait for a buffer anyway.
    fn flush(&mut self) -> Result<()> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        if !self.ranges.is_empty() {
            let t = Instant::now();
            crate::sys::vm::process_vm_readv_ranges(self.pid, &self.ranges, &mut self.buf[..self.used])?;
            self.stats.read_ns += t.elapsed().as_nanos() as u64;
        }
        if self.gate.is_none() && self.buf.is_mapped() && self.writer_behind() {
            let t = Instant::now();
            for p in self.pieces.iter_mut() {
                if let Piece::Data { off, len, crc, .. } = p {
                    *crc = Some(crc32c::crc32c(&self.buf[*off..*off + *len]));
                    self.stats.crc_bytes += *len as u64;
                }
            }
            self.stats.crc_ns += t.elapsed().as_nanos() as u64;
        }
        let batch = (std::mem::take(&mut self.buf), std::mem::take(&mut self.pieces));
        self.tx.send(batch).map_err(|_| anyhow!("the page writer stopped"))?;
        self.sent += 1;
        self.ranges.clear();
        self.used = 0;
        Ok(())
    }

    /// Whether the writer has more than the batch it is writing to do: then it, not the
    /// reader, sets the pace, and the reader's time for checksums is free.
    fn writer_behind(&self) -> bool {
        self.sent >= self.pace.batches.load(Ordering::Acquire) + 2
    }

    /// The next buffer: given back by the writer, warmed before the freeze, fresh, or (when
    /// the writer's pace beats fresh memory) the next one the writer gives back.
    fn next_buf(&mut self) -> Result<PageBuf> {
        loop {
            match self.back.try_recv() {
                Ok(b) if b.is_mapped() => return Ok(b),
                Ok(_) => continue,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(anyhow!("the page writer stopped")),
            }
        }
        if let Some(b) = pool_pop() {
            self.live += 1;
            self.stats.warmed += 1;
            return Ok(b);
        }
        if self.gate.is_some() && self.live >= self.max_live {
            // Held back, the writer cannot give buffers back: let it go now rather than
            // exceed the budget.
            log::debug!("PID {}: the page data outgrew the buffers held back: writing while frozen", self.pid);
            if let Some(g) = self.gate.take() {
                let _ = g.send(());
            }
        }
        if self.live < MIN_BUFFERS || (self.live < self.max_live && (self.gate.is_some() || self.fresh_pays())) {
            let t = Instant::now();
            let b = PageBuf::new()?;
            self.stats.fresh_ns += t.elapsed().as_nanos() as u64;
            self.stats.fresh += 1;
            self.live += 1;
            return Ok(b);
        }
        let t = Instant::now();
        let b = loop {
            match self.back.recv() {
                Ok(b) if b.is_mapped() => break b,
                Ok(_) => continue,
                Err(_) => return Err(anyhow!("the page writer stopped")),
            }
        };
        self.stats.wait_ns += t.elapsed().as_nanos() as u64;
        self.stats.waits += 1;
        Ok(b)
    }

    /// Whether reading into a fresh buffer is quicker than waiting for the writer: the
    /// writer's measured time per MiB against the reader's plus a fresh buffer's.
    fn fresh_pays(&self) -> bool {
        let wb = self.pace.bytes.load(Ordering::Acquire);
        if wb < MIB {
            // The writer has not finished anything yet: it will shortly.
            return false;
        }
        let t_write = self.pace.ns.load(Ordering::Relaxed).saturating_mul(MIB) / wb;
        let t_read = if self.stats.bytes >= MIB { self.stats.read_ns.saturating_mul(MIB) / self.stats.bytes } else { 0 };
        let t_fresh = if self.stats.fresh > 0 { self.stats.fresh_ns.saturating_mul(MIB) / (self.stats.fresh * CHUNK) } else { FRESH_GUESS_NS_PER_MIB };
        t_read + t_fresh < t_write
    }

    fn log_stats(&self, t0: Instant, cpu0: u64) {
        let s = &self.stats;
        let ms = |ns: u64| ns as f64 / 1e6;
        log::debug!(
            "PID {}: {} MiB read in {:.1} ms (CPU {:.1} ms): process_vm_readv {:.1} ms, waited for the writer {:.1} ms ({} times), {} fresh buffers in {:.1} ms, {} warmed, {} MiB checksummed by the reader in {:.1} ms",
            self.pid,
            s.bytes / MIB,
            t0.elapsed().as_secs_f64() * 1e3,
            ms(thread_cpu_ns() - cpu0),
            ms(s.read_ns),
            ms(s.wait_ns),
            s.waits,
            s.fresh,
            ms(s.fresh_ns),
            s.warmed,
            s.crc_bytes / MIB,
            ms(s.crc_ns)
        );
    }
}
