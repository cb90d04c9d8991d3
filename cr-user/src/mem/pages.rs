//! Copying the pages of a frozen target into its page file.
//!
//! The page plan is cut into batches of at most [`CHUNK`] bytes ([`plan_batches`]); reader
//! threads ([`readers`]) copy them with `process_vm_readv` into page-aligned buffers and one
//! writer thread appends them, in plan order, to the page file. Buffers go back to the readers
//! once written, so a dump of any size turns over a few MiB of them: touching fresh memory is
//! the dearest thing a dump does on a VM that reports free memory to its host (numbers:
//! docs/benchmarks.md). A reader takes, in order: a buffer the writer gave back, one warmed
//! before the freeze ([`WarmBuffers`]), a fresh one while the copy has fewer than
//! [`MIN_BUFFERS`] or when the measured costs say that beats waiting for the writer; else it
//! waits. Whoever has the time checksums. Incremental dumps ([`copy_plan`]) may hold the writer
//! back until the target runs again when the data fits in the warmed buffers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use super::dump::Run;
use crate::image::pages::{PageWriter, RunPiece};
use crate::image::pb;
use crate::kernel::interrupt;
use crate::kernel::sys::mman::PageBuf;

/// Size of one buffer. Small, so that the few buffers a copy turns over stay in the caches and
/// the TLB between the read, the checksum and the write (docs/benchmarks.md).
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
/// fresh 2 MiB page faults in from the host much slower than 512 small ones, and since the buffers are turned over, huge pages' cheaper TLB never pays that
/// back.
fn new_buf() -> Result<PageBuf> {
    PageBuf::new(CHUNK as usize)
}

/// Page buffers made ready before a freeze ([`WarmBuffers::warm`]) for the copies of one
/// dump: the dump owns them and lends them to each copy in turn ([`copy`], [`copy_plan`]),
/// which takes what it needs and leaves the rest for the next.
#[derive(Default)]
pub struct WarmBuffers(Vec<PageBuf>);

impl WarmBuffers {
    /// Maps and populates buffers for about `bytes` of pages now, before the target is frozen:
    /// a fresh buffer's first touch costs the kernel (and the host) zeroing its pages, which
    /// would otherwise run while the target waits. Best effort: a failure only means fresh
    /// buffers later.
    pub fn warm(&mut self, bytes: u64) {
        let n = bytes.div_ceil(CHUNK) as usize;
        while self.0.len() < n {
            let Ok(b) = new_buf() else { return };
            self.0.push(b);
        }
    }

    fn bytes(&self) -> u64 {
        self.0.len() as u64 * CHUNK
    }
}

/// Pages copied but perhaps not yet written: [`PendingPages::finish`] waits for the writer.
pub struct PendingPages {
    writer: Option<JoinHandle<Result<pb::PageMap>>>,
    /// What the writer shares with the readers: the gate that holds it back until the target
    /// runs again (see [`copy_plan`]) and the flag that tells it to give up.
    shared: Arc<Shared>,
}

impl PendingPages {
    /// Lets a held-back writer start (the target no longer waits for us).
    pub fn start_writing(&mut self) {
        self.shared.release_gate();
    }

    /// Waits until every page is written and the page file is complete.
    pub fn finish(mut self) -> Result<pb::PageMap> {
        self.shared.release_gate();
        let h = self.writer.take().expect("finish called once");
        h.join()
            .map_err(|_| anyhow!("the page writer thread panicked"))?
    }
}

impl Drop for PendingPages {
    fn drop(&mut self) {
        if let Some(h) = self.writer.take() {
            // Dropped unfinished (an error elsewhere): the writer gives up and its PageWriter
            // removes the temporary file.
            self.shared.abort.store(true, Ordering::Release);
            self.shared.release_gate();
            let _ = h.join();
        }
    }
}

/// How much copied memory may wait for the disk: all of it if it fits in a quarter of the
/// available memory, else that quarter.
pub fn budget(total: u64) -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemAvailable:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30);
    total.min(avail / 4).max(2 * CHUNK)
}

/// Reads every run of `pid` (frozen) and hands the data to a writer thread.
/// Returns once everything is read; the writes may still be going on.
pub fn copy(
    pid: i32,
    runs: &[Run],
    writer: PageWriter,
    budget: u64,
    warm: &mut WarmBuffers,
) -> Result<PendingPages> {
    let plan: Vec<PlanItem> = runs
        .iter()
        .map(|r| PlanItem::Data {
            start: r.start,
            end: r.end,
            readable: r.readable,
        })
        .collect();
    run_copy(pid, &plan, writer, budget, false, readers(), warm)
}

/// One step of an incremental dump's page plan, in ascending address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanItem {
    /// Copy `[start, end)` from the target (`readable`: process_vm_readv works; otherwise
    /// /proc/PID/mem).
    Data {
        start: u64,
        end: u64,
        readable: bool,
    },
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
pub fn copy_plan(
    pid: i32,
    plan: &[PlanItem],
    writer: PageWriter,
    budget: u64,
    warm: &mut WarmBuffers,
) -> Result<PendingPages> {
    let data: u64 = plan
        .iter()
        .map(|i| match *i {
            PlanItem::Data { start, end, .. } => end - start,
            PlanItem::Parent { .. } => 0,
        })
        .sum();
    let hold = data <= budget && data <= warm.bytes() + HOLD_FRESH_MAX;
    run_copy(pid, plan, writer, budget, hold, readers(), warm)
}

/// One batch of the copy, planned before any read: up to [`CHUNK`] bytes of data (read back to
/// back into one buffer) and the parent runs among them, in address order.
#[derive(Default)]
struct Planned {
    pieces: Vec<Piece>,
    /// The remote ranges of the data pieces, in order (one process_vm_readv per IOV_MAX).
    ranges: Vec<(u64, usize)>,
    /// Bytes of data (0: a batch of parent runs only, which needs no buffer).
    used: usize,
    /// The data is read through /proc/PID/mem (its VMA is not readable).
    forced: bool,
}

/// Cuts a plan into batches: at most [`CHUNK`] bytes and IOV_MAX ranges each; unreadable
/// memory in batches of its own.
fn plan_batches(plan: &[PlanItem]) -> Vec<Planned> {
    let chunk = CHUNK as usize;
    let mut out = Vec::new();
    let mut cur = Planned::default();
    let close = |cur: &mut Planned, out: &mut Vec<Planned>| {
        if !cur.pieces.is_empty() {
            out.push(std::mem::take(cur));
        }
    };
    for item in plan {
        match *item {
            PlanItem::Parent { start, end } => cur.pieces.push(Piece::Parent {
                vaddr: start,
                pages: (end - start) / 4096,
            }),
            PlanItem::Data {
                start,
                end,
                readable,
            } => {
                if cur.forced != !readable && cur.used > 0 {
                    close(&mut cur, &mut out);
                }
                cur.forced = !readable;
                let mut addr = start;
                while addr < end {
                    if cur.used == chunk || cur.ranges.len() >= crate::kernel::sys::IOV_MAX {
                        close(&mut cur, &mut out);
                        cur.forced = !readable;
                    }
                    let len = ((end - addr) as usize).min(chunk - cur.used);
                    cur.ranges.push((addr, len));
                    cur.pieces.push(Piece::Data {
                        vaddr: addr,
                        off: cur.used,
                        len,
                        crc: None,
                    });
                    cur.used += len;
                    addr += len as u64;
                }
            }
        }
    }
    close(&mut cur, &mut out);
    out
}

/// Threads that read at the same time: one core is the writer's (a file takes one buffered
/// writer at a time), the others may read, up to two (two readers keep pace with the writer).
/// On two cores, with a third party keeping one busy, a second reader made the freeze longer
/// (more threads to schedule and hand buffers between): no second reader below three cores.
fn readers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .clamp(1, 2)
}

/// The writer's pace so far, shared with the readers.
#[derive(Default)]
struct Pace {
    bytes: AtomicU64,
    ns: AtomicU64,
    /// Batches written (the readers count those they sent).
    batches: AtomicU64,
    /// Batches the writer took from the queue (being written or waiting for their turn).
    taken: AtomicU64,
}

/// The buffers of one copy.
struct Buffers {
    free: Vec<PageBuf>,
    /// Buffers this copy owns (free, being read, queued or being written).
    live: usize,
    /// The writer ended (error or abort): nothing comes back any more.
    writer_gone: bool,
}

/// What the readers and the writer share.
struct Shared {
    pid: i32,
    /// Reader threads of this copy.
    readers: usize,
    bufs: std::sync::Mutex<Buffers>,
    /// The dump's warmed buffers while the copy reads (given back when it is done).
    warm: std::sync::Mutex<Vec<PageBuf>>,
    returned: std::sync::Condvar,
    max_live: usize,
    /// The held-back writer's gate (None: the writer runs).
    gate: std::sync::Mutex<Option<Sender<()>>>,
    pace: Pace,
    /// Batches sent to the writer.
    sent: AtomicU64,
    /// Next batch to claim.
    next: std::sync::atomic::AtomicUsize,
    /// A reader failed (or the dump was abandoned): everyone stops.
    abort: AtomicBool,
    stats: std::sync::Mutex<ReadStats>,
}

impl Shared {
    fn held(&self) -> bool {
        self.gate.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// Lets a held-back writer go.
    fn release_gate(&self) {
        if let Ok(mut g) = self.gate.lock() {
            if let Some(g) = g.take() {
                let _ = g.send(());
            }
        }
    }

    /// A buffer for the next batch: one the writer gave back, one warmed before the freeze, a
    /// fresh one (see the module doc), or the next one the writer gives back.
    fn take(&self, st: &mut ReadStats) -> Result<PageBuf> {
        let mut b = self
            .bufs
            .lock()
            .map_err(|_| anyhow!("page buffers poisoned"))?;
        let t_wait = Instant::now();
        let mut waited = false;
        loop {
            if let Some(buf) = b.free.pop() {
                if waited {
                    st.wait_ns += t_wait.elapsed().as_nanos() as u64;
                    st.waits += 1;
                }
                return Ok(buf);
            }
            if b.writer_gone || self.abort.load(Ordering::Acquire) {
                return Err(anyhow!("the page writer stopped"));
            }
            if let Some(buf) = self.warm.lock().ok().and_then(|mut w| w.pop()) {
                b.live += 1;
                st.warmed += 1;
                return Ok(buf);
            }
            let held = self.held();
            if held && b.live >= self.max_live {
                // Held back, the writer cannot give buffers back: let it go now rather than
                // exceed the budget.
                log::debug!(
                    "PID {}: the page data outgrew the buffers held back: writing while frozen",
                    self.pid
                );
                self.release_gate();
            }
            if b.live < MIN_BUFFERS || (b.live < self.max_live && (held || self.fresh_pays(st))) {
                b.live += 1;
                drop(b);
                let t = Instant::now();
                let r = new_buf();
                st.fresh_ns += t.elapsed().as_nanos() as u64;
                st.fresh += 1;
                if r.is_err() {
                    if let Ok(mut b) = self.bufs.lock() {
                        b.live -= 1;
                    }
                }
                return r;
            }
            waited = true;
            b = self
                .returned
                .wait(b)
                .map_err(|_| anyhow!("page buffers poisoned"))?;
        }
    }

    /// Gives a buffer back (the writer, or a reader that did not need it).
    fn give(&self, buf: PageBuf) {
        if let Ok(mut b) = self.bufs.lock() {
            b.free.push(buf);
        }
        self.returned.notify_one();
    }

    /// The writer is gone: wake every reader waiting for a buffer.
    fn writer_gone(&self) {
        if let Ok(mut b) = self.bufs.lock() {
            b.writer_gone = true;
        }
        self.returned.notify_all();
    }

    /// Whether reading into a fresh buffer is quicker than waiting for the writer: the
    /// writer's measured time per MiB against this reader's plus a fresh buffer's.
    fn fresh_pays(&self, st: &ReadStats) -> bool {
        let wb = self.pace.bytes.load(Ordering::Acquire);
        if wb < MIB {
            // The writer has not finished anything yet: it will shortly.
            return false;
        }
        let t_write = self.pace.ns.load(Ordering::Relaxed).saturating_mul(MIB) / wb;
        let t_read = if st.bytes >= MIB {
            st.read_ns.saturating_mul(MIB) / st.bytes
        } else {
            0
        };
        let t_fresh = if st.fresh > 0 {
            st.fresh_ns.saturating_mul(MIB) / (st.fresh * CHUNK)
        } else {
            FRESH_GUESS_NS_PER_MIB
        };
        // Readers share the work: each only needs to keep up with its share of the writer.
        t_read + t_fresh < t_write * self.readers as u64
    }

    /// Whether batches queue up for the writer (sent, not yet taken): then the writer, not the
    /// readers, sets the pace, and a reader's time for checksums is free. Otherwise the writer
    /// waits for batches and has the time.
    fn writer_behind(&self) -> bool {
        self.sent.load(Ordering::Acquire) >= self.pace.taken.load(Ordering::Acquire) + 2
    }
}

fn run_copy(
    pid: i32,
    plan: &[PlanItem],
    writer: PageWriter,
    budget: u64,
    hold: bool,
    readers: usize,
    warm: &mut WarmBuffers,
) -> Result<PendingPages> {
    let (t0, cpu0) = (Instant::now(), thread_cpu_ns());
    let batches = plan_batches(plan);
    let (tx, rx) = mpsc::channel::<(usize, Batch)>();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let shared = Arc::new(Shared {
        pid,
        readers: readers.clamp(1, batches.len().max(1)),
        bufs: std::sync::Mutex::new(Buffers {
            free: Vec::new(),
            live: 0,
            writer_gone: false,
        }),
        warm: std::sync::Mutex::new(std::mem::take(&mut warm.0)),
        returned: std::sync::Condvar::new(),
        max_live: ((budget / CHUNK) as usize).max(MIN_BUFFERS),
        gate: std::sync::Mutex::new(hold.then_some(gate_tx)),
        pace: Pace::default(),
        sent: AtomicU64::new(0),
        next: std::sync::atomic::AtomicUsize::new(0),
        abort: AtomicBool::new(false),
        stats: std::sync::Mutex::new(ReadStats::default()),
    });
    let writer_shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name("cr-page-writer".into())
        .spawn(move || {
            let r = write_batches(writer, rx, hold.then_some(gate_rx), &writer_shared);
            writer_shared.writer_gone();
            r
        })
        .context("start the page writer thread")?;
    let mut pending = PendingPages {
        writer: Some(handle),
        shared: shared.clone(),
    };
    let readers = shared.readers;
    let result = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..readers)
            .map(|i| {
                let (shared, batches, tx) = (&shared, &batches, tx.clone());
                std::thread::Builder::new()
                    .name(format!("cr-page-read{i}"))
                    .spawn_scoped(s, move || read_batches(shared, batches, &tx))
            })
            .collect();
        let mut result = read_batches(&shared, &batches, &tx);
        for h in helpers {
            let r = match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("a page reader thread panicked"))),
                Err(e) => Err(anyhow::Error::new(e).context("start a page reader thread")),
            };
            if result.is_ok() {
                result = r;
            }
        }
        result
    });
    drop(tx);
    // The readers are done: the warmed buffers they did not take are the next copy's.
    if let Ok(mut w) = shared.warm.lock() {
        warm.0 = std::mem::take(&mut *w);
    }
    log_stats(&shared, t0, cpu0);
    if let Err(e) = result {
        shared.abort.store(true, Ordering::Release);
        shared.release_gate();
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

/// One reader: claims batches in order while holding a buffer (so that every claimed batch can
/// be completed and the writer, which writes them in order, never waits on a reader that
/// waits on it), reads them, checksums them if the writer is behind, and sends them.
fn read_batches(sh: &Shared, batches: &[Planned], tx: &Sender<(usize, Batch)>) -> Result<()> {
    let mut st = ReadStats::default();
    let r = read_loop(sh, batches, tx, &mut st);
    if r.is_err() {
        sh.abort.store(true, Ordering::Release);
        sh.returned.notify_all();
    }
    if let Ok(mut all) = sh.stats.lock() {
        all.add(&st);
    }
    r
}

fn read_loop(
    sh: &Shared,
    batches: &[Planned],
    tx: &Sender<(usize, Batch)>,
    st: &mut ReadStats,
) -> Result<()> {
    let mut buf: Option<PageBuf> = None;
    loop {
        interrupt::check()?;
        if sh.abort.load(Ordering::Acquire) {
            return Err(anyhow!("the page copy was abandoned"));
        }
        if buf.is_none() && sh.next.load(Ordering::Acquire) < batches.len() {
            buf = Some(sh.take(st)?);
        }
        let k = sh.next.fetch_add(1, Ordering::AcqRel);
        let Some(b) = batches.get(k) else {
            if let Some(b) = buf.take() {
                sh.give(b);
            }
            return Ok(());
        };
        let mut pieces: Vec<Piece> = b
            .pieces
            .iter()
            .map(|p| match *p {
                Piece::Data {
                    vaddr, off, len, ..
                } => Piece::Data {
                    vaddr,
                    off,
                    len,
                    crc: None,
                },
                Piece::Parent { vaddr, pages } => Piece::Parent { vaddr, pages },
            })
            .collect();
        let mut data = PageBuf::default();
        if b.used > 0 {
            let Some(mut d) = buf.take() else {
                return Err(anyhow!("internal: a page batch claimed without a buffer"));
            };
            d.set_len(CHUNK as usize);
            let t = Instant::now();
            if b.forced {
                for p in &pieces {
                    if let Piece::Data {
                        vaddr, off, len, ..
                    } = *p
                    {
                        crate::kernel::ptrace::inject::read_mem(
                            sh.pid,
                            vaddr,
                            &mut d[off..off + len],
                        )?;
                    }
                }
            } else {
                crate::kernel::sys::vm::process_vm_readv_ranges(
                    sh.pid,
                    &b.ranges,
                    &mut d[..b.used],
                )?;
            }
            st.read_ns += t.elapsed().as_nanos() as u64;
            st.bytes += b.used as u64;
            if !sh.held() && sh.writer_behind() {
                let t = Instant::now();
                for p in pieces.iter_mut() {
                    if let Piece::Data { off, len, crc, .. } = p {
                        *crc = Some(crc32c::crc32c(&d[*off..*off + *len]));
                        st.crc_bytes += *len as u64;
                    }
                }
                st.crc_ns += t.elapsed().as_nanos() as u64;
            }
            data = d;
        }
        tx.send((k, (data, pieces)))
            .map_err(|_| anyhow!("the page writer stopped"))?;
        sh.sent.fetch_add(1, Ordering::AcqRel);
    }
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
    Data {
        vaddr: u64,
        off: usize,
        len: usize,
        crc: Option<u32>,
    },
    Parent {
        vaddr: u64,
        pages: u64,
    },
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

/// The writer thread: waits for the gate (if held back), then writes the batches in their
/// order (readers may deliver them out of order), gathering consecutive ones into one write of
/// up to [`WRITE_MAX`], and gives the buffers back.
fn write_batches(
    mut w: PageWriter,
    rx: Receiver<(usize, Batch)>,
    gate: Option<Receiver<()>>,
    sh: &Shared,
) -> Result<pb::PageMap> {
    if let Some(g) = gate {
        // Returns on a message or when every sender is gone: either means go.
        let _ = g.recv();
    }
    let (mut busy_ns, mut bytes_total) = (0u64, 0u64);
    let cpu0 = thread_cpu_ns();
    let mut waiting: std::collections::BTreeMap<usize, Batch> = std::collections::BTreeMap::new();
    let mut next = 0usize;
    let mut batches: Vec<Batch> = Vec::new();
    loop {
        if !waiting.contains_key(&next) {
            // Nothing to write in order: wait for the readers.
            match rx.recv() {
                Ok((k, b)) => {
                    waiting.insert(k, b);
                    sh.pace.taken.fetch_add(1, Ordering::AcqRel);
                }
                Err(_) => break,
            }
        }
        while let Ok((k, b)) = rx.try_recv() {
            waiting.insert(k, b);
            sh.pace.taken.fetch_add(1, Ordering::AcqRel);
        }
        if sh.abort.load(Ordering::Acquire) {
            break;
        }
        let mut bytes = 0;
        while bytes < WRITE_MAX {
            let Some(b) = waiting.remove(&next) else {
                break;
            };
            next += 1;
            bytes += batch_bytes(&b);
            batches.push(b);
        }
        if batches.is_empty() {
            continue;
        }
        let t = Instant::now();
        let pieces: Vec<RunPiece> = batches
            .iter()
            .flat_map(|(buf, ps)| {
                ps.iter().map(move |p| match *p {
                    Piece::Data {
                        vaddr,
                        off,
                        len,
                        crc,
                    } => RunPiece::Data {
                        vaddr,
                        bytes: &buf[off..off + len],
                        crc,
                    },
                    Piece::Parent { vaddr, pages } => RunPiece::Parent {
                        vaddr,
                        nr_pages: pages,
                    },
                })
            })
            .collect();
        w.add(&pieces)?;
        drop(pieces);
        let ns = t.elapsed().as_nanos() as u64;
        busy_ns += ns;
        bytes_total += bytes;
        sh.pace.ns.fetch_add(ns, Ordering::Relaxed);
        sh.pace.bytes.fetch_add(bytes, Ordering::Release);
        sh.pace
            .batches
            .fetch_add(batches.len() as u64, Ordering::Release);
        for (buf, _) in batches.drain(..) {
            if buf.is_mapped() {
                sh.give(buf);
            }
        }
    }
    if sh.abort.load(Ordering::Acquire) || !waiting.is_empty() {
        // Dropping `w` removes the temporary file.
        return Err(anyhow::Error::new(Aborted));
    }
    log::debug!(
        "page writer: {} MiB in {:.1} ms of checksums and writes (CPU {:.1} ms, {})",
        bytes_total / MIB,
        busy_ns as f64 / 1e6,
        (thread_cpu_ns() - cpu0) as f64 / 1e6,
        if w.is_direct() {
            "O_DIRECT"
        } else {
            "page cache"
        }
    );
    w.finish()
}

/// CPU time of the calling thread, in ns (for the log: on a busy machine the wall-clock times
/// include waiting for a CPU).
fn thread_cpu_ns() -> u64 {
    crate::kernel::sys::time::thread_cpu_ns()
}

/// What the readers did, for the log.
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

impl ReadStats {
    fn add(&mut self, o: &ReadStats) {
        self.bytes += o.bytes;
        self.read_ns += o.read_ns;
        self.wait_ns += o.wait_ns;
        self.waits += o.waits;
        self.fresh += o.fresh;
        self.fresh_ns += o.fresh_ns;
        self.warmed += o.warmed;
        self.crc_bytes += o.crc_bytes;
        self.crc_ns += o.crc_ns;
    }
}

fn log_stats(sh: &Shared, t0: Instant, cpu0: u64) {
    let Ok(s) = sh.stats.lock() else { return };
    let ms = |ns: u64| ns as f64 / 1e6;
    log::debug!(
        "PID {}: {} MiB read in {:.1} ms (this thread's CPU {:.1} ms); over all readers: process_vm_readv {:.1} ms, waited for the writer {:.1} ms ({} times), {} fresh buffers in {:.1} ms, {} warmed, {} MiB checksummed in {:.1} ms",
        sh.pid,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::dir::{pagemap_file, ImageDir, ImageWriter};
    use crate::image::file::Kind;
    use crate::image::testutil::TempDir;
    use crate::kernel::sys::mman::AnonMap;

    const P: u64 = 4096;

    fn data_len(b: &Planned) -> Vec<(u64, usize, usize)> {
        b.pieces
            .iter()
            .filter_map(|p| match *p {
                Piece::Data {
                    vaddr, off, len, ..
                } => Some((vaddr, off, len)),
                Piece::Parent { .. } => None,
            })
            .collect()
    }

    #[test]
    fn plans_are_cut_into_batches() {
        let c = CHUNK;
        let plan = [
            PlanItem::Data {
                start: 0x1000_0000,
                end: 0x1000_0000 + c + 2 * P,
                readable: true,
            },
            PlanItem::Parent {
                start: 0x2000_0000,
                end: 0x2000_0000 + 3 * P,
            },
            PlanItem::Data {
                start: 0x3000_0000,
                end: 0x3000_0000 + P,
                readable: false,
            },
            PlanItem::Data {
                start: 0x4000_0000,
                end: 0x4000_0000 + P,
                readable: true,
            },
        ];
        let b = plan_batches(&plan);
        assert_eq!(
            b.len(),
            4,
            "full chunk | rest + parent | unreadable | readable"
        );
        assert_eq!(data_len(&b[0]), [(0x1000_0000, 0, c as usize)]);
        assert_eq!(data_len(&b[1]), [(0x1000_0000 + c, 0, 2 * P as usize)]);
        assert!(matches!(
            b[1].pieces[1],
            Piece::Parent {
                vaddr: 0x2000_0000,
                pages: 3
            }
        ));
        assert!(b[2].forced && !b[1].forced && !b[3].forced);
        assert_eq!((b[2].used, b[3].used), (P as usize, P as usize));
        // Many small ranges: IOV_MAX per batch at most.
        let many: Vec<PlanItem> = (0..3000u64)
            .map(|i| PlanItem::Data {
                start: i * 2 * P,
                end: i * 2 * P + P,
                readable: true,
            })
            .collect();
        let b = plan_batches(&many);
        assert!(b
            .iter()
            .all(|x| x.ranges.len() <= crate::kernel::sys::IOV_MAX && x.used <= CHUNK as usize));
        assert_eq!(b.iter().map(|x| x.ranges.len()).sum::<usize>(), 3000);
        // Only parent runs: one batch without data.
        let b = plan_batches(&[PlanItem::Parent { start: 0, end: P }]);
        assert_eq!((b.len(), b[0].used), (1, 0));
    }

    fn pattern(page: u64) -> u8 {
        (page.wrapping_mul(37) % 251) as u8 + 1
    }

    /// Copies a plan of readable, unreadable (PROT_NONE, through /proc/PID/mem) and parent runs
    /// out of a forked child, with one and three readers, held back or not, and checks the
    /// page file byte for byte.
    #[test]
    fn copies_a_child_exactly() {
        let pages = 3 * CHUNK / P + 5;
        let mut region = AnonMap::new(pages as usize).unwrap();
        let base = region.addr();
        for (pg, page) in region.as_mut_slice().chunks_mut(P as usize).enumerate() {
            page.fill(pattern(pg as u64));
        }
        // The last 5 pages unreadable (in the child too: it inherits the protection).
        let ro = base + (pages - 5) * P;
        region
            .protect(
                ((pages - 5) * P) as usize,
                (5 * P) as usize,
                libc::PROT_NONE,
            )
            .unwrap();
        let child = crate::kernel::sys::vm::tests::Forked::new();
        let plan = [
            PlanItem::Data {
                start: base,
                end: base + CHUNK + 3 * P,
                readable: true,
            },
            PlanItem::Parent {
                start: base + CHUNK + 3 * P,
                end: base + CHUNK + 10 * P,
            },
            PlanItem::Data {
                start: base + CHUNK + 10 * P,
                end: ro,
                readable: true,
            },
            PlanItem::Data {
                start: ro,
                end: ro + 5 * P,
                readable: false,
            },
        ];
        for (readers, hold) in [(1, false), (3, false), (1, true), (3, true)] {
            let t = TempDir::new("dump-pages");
            let w = ImageWriter::create(t.path()).unwrap();
            let data_pages = pages - 7;
            let pw = PageWriter::create(&w, 7, data_pages).unwrap();
            let mut pending = run_copy(
                child.pid,
                &plan,
                pw,
                64 << 20,
                hold,
                readers,
                &mut WarmBuffers::default(),
            )
            .unwrap();
            pending.start_writing();
            let pm = pending.finish().unwrap();
            let got: Vec<_> = pm
                .runs
                .iter()
                .map(|r| (r.vaddr, u64::from(r.nr_pages), r.in_parent))
                .collect();
            assert_eq!(
                got,
                [
                    (base, CHUNK / P + 3, false),
                    (base + CHUNK + 3 * P, 7, true),
                    (base + CHUNK + 10 * P, pages - CHUNK / P - 10, false)
                ],
                "readers {readers}, hold {hold}"
            );
            w.write_msg(&pagemap_file(7), Kind::PageMap, &pm).unwrap();
            w.commit(crate::image::pb::Inventory::default()).unwrap();
            let img = ImageDir::open(t.path()).unwrap();
            img.validate().unwrap();
            let pf = img.page_file("pages-7.img").unwrap();
            for r in pm.runs.iter().filter(|r| !r.in_parent) {
                let bytes = pf.bytes(r.offset, u64::from(r.nr_pages) * P).unwrap();
                for (i, page) in bytes.chunks(P as usize).enumerate() {
                    let pg = (r.vaddr - base) / P + i as u64;
                    assert!(
                        page.iter().all(|b| *b == pattern(pg)),
                        "page {pg}, readers {readers}, hold {hold}"
                    );
                }
            }
        }
        drop(child);
        drop(region);
    }

    /// A failed copy (a range the child does not have) leaves no page file behind.
    #[test]
    fn a_failed_copy_leaves_nothing() {
        let child = crate::kernel::sys::vm::tests::Forked::new();
        let t = TempDir::new("dump-pages-fail");
        let w = ImageWriter::create(t.path()).unwrap();
        let pw = PageWriter::create(&w, 8, 4).unwrap();
        let plan = [PlanItem::Data {
            start: 0x1000,
            end: 0x5000,
            readable: true,
        }];
        assert!(run_copy(
            child.pid,
            &plan,
            pw,
            64 << 20,
            false,
            1,
            &mut WarmBuffers::default()
        )
        .is_err());
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            0,
            "leftover files"
        );
    }
}
