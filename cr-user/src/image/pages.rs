//! Page files (`pages-PID.img`): one 4096-byte header page (the usual frame header, kind
//! [`Kind::Pages`], whose CRC covers all the data after it), then page-aligned runs in the order
//! they were added. [`PageWriter`] takes pieces already in the dump's buffers, checksums them
//! (unless the reader did) and writes them at the end of the file; the whole-file CRC is
//! combined from the run CRCs, so the data is never read back. [`PageFile`] maps a page file
//! read-only for restore.
//!
//! Writes through the page cache are cut at [`BUFFERED_WRITE_MAX`] (the kernel sizes page-cache
//! folios by the write, and large folios are slow to get on a ballooned VM: docs/benchmarks.md);
//! writeback is started as it goes. `CR_PAGE_IO=direct` uses O_DIRECT instead (not the default:
//! a restore right after the dump then reads the disk). Not a shared mapping of the output: a
//! full disk would be SIGBUS instead of ENOSPC.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use super::file::{Header, Kind, FORMAT_VERSION, HEADER_LEN};
use super::names::pages_file;
use super::pb;
use super::wire::Sender;
use super::writer::{create_temp, ImageWriter, Written};
use crate::kernel::sys::fs;
use crate::kernel::sys::mman::FileMap;

/// Page size of the images (x86_64).
pub const PAGE_SIZE: usize = 4096;
/// Size of the header page at the start of every page file; the first run starts here.
pub const HEADER_PAGE: u64 = PAGE_SIZE as u64;
/// Largest window [`PageWriter::window`] hands out: big enough that syscall costs vanish,
/// small enough to stay in L2/L3 between the copy-in, the CRC and the write.
pub const WINDOW_PAGES: usize = 1024;
/// Start writeback every this many bytes, so the final fsync has little left to do.
const WRITEBACK_CHUNK: u64 = 32 << 20;
/// Largest single write through the page cache (see the module doc: it bounds the size of the
/// page-cache folios the kernel allocates).
pub const BUFFERED_WRITE_MAX: usize = 512 << 10;

/// `crc32c_combine`: the CRC32C of A followed by B from their CRCs and B's length. The crate's
/// version builds the "append `len2` zero bytes" operator from scratch on every call (dear, for
/// a hot path); a dump combines twice per buffer it writes, nearly always with the same length, so
/// the operator is kept per length (a few per thread) and applying it is one 32×32 bit
/// matrix-vector product.
fn combine(crc1: u32, crc2: u32, len2: u64) -> u32 {
    if len2 == 0 {
        return crc1;
    }
    crc_shift::apply(len2, crc1) ^ crc2
}

/// CRC32C shift operators over GF(2) (as in zlib's crc32_combine): `op[n]` is the image of
/// bit `n` of a CRC register after feeding a number of zero bytes.
mod crc_shift {
    use std::cell::RefCell;

    type Op = [u32; 32];

    /// The CRC32C polynomial (reversed).
    const POLY: u32 = 0x82F6_3B78;
    /// Operators kept per thread.
    const KEPT: usize = 8;

    fn times(op: &Op, mut v: u32) -> u32 {
        let mut sum = 0;
        let mut i = 0;
        while v != 0 {
            if v & 1 != 0 {
                sum ^= op[i];
            }
            v >>= 1;
            i += 1;
        }
        sum
    }

    /// `a` after `b`.
    fn compose(a: &Op, b: &Op) -> Op {
        let mut out = [0u32; 32];
        for (o, bn) in out.iter_mut().zip(b) {
            *o = times(a, *bn);
        }
        out
    }

    /// The operator for `len` zero bytes.
    fn build(mut len: u64) -> Op {
        let mut bit: Op = [0; 32];
        bit[0] = POLY;
        for (n, b) in bit.iter_mut().enumerate().skip(1) {
            *b = 1 << (n - 1);
        }
        let two = compose(&bit, &bit);
        let four = compose(&two, &two);
        let mut base = compose(&four, &four); // one zero byte
        let mut acc: Option<Op> = None;
        while len != 0 {
            if len & 1 != 0 {
                acc = Some(match acc {
                    None => base,
                    Some(a) => compose(&base, &a),
                });
            }
            len >>= 1;
            if len != 0 {
                base = compose(&base, &base);
            }
        }
        acc.unwrap_or_else(|| std::array::from_fn(|n| 1 << n))
    }

    thread_local! {
        static KEPT_OPS: RefCell<(Vec<(u64, Op)>, usize)> = const { RefCell::new((Vec::new(), 0)) };
    }

    /// `crc` shifted by `len` zero bytes.
    pub(super) fn apply(len: u64, crc: u32) -> u32 {
        KEPT_OPS.with(|k| {
            let mut k = k.borrow_mut();
            if let Some((_, op)) = k.0.iter().find(|(l, _)| *l == len) {
                return times(op, crc);
            }
            let op = build(len);
            let r = times(&op, crc);
            let (ops, next) = &mut *k;
            if ops.len() < KEPT {
                ops.push((len, op));
            } else {
                ops[*next] = (len, op);
                *next = (*next + 1) % KEPT;
            }
            r
        })
    }
}

/// One piece for [`PageWriter::add`], in ascending address order.
#[derive(Clone, Copy, Debug)]
pub enum RunPiece<'a> {
    /// `bytes` (whole pages) are the memory at `vaddr`; `crc` is their CRC32C if the caller
    /// already has it (computed here otherwise).
    Data {
        vaddr: u64,
        bytes: &'a [u8],
        crc: Option<u32>,
    },
    /// The `nr_pages` pages at `vaddr` are unchanged since the parent image.
    Parent { vaddr: u64, nr_pages: u64 },
}

/// Writes `pages-PID.img` of one process. Create with [`PageWriter::create`], add runs in
/// ascending address order, then [`PageWriter::finish`]. Dropped unfinished (a failed dump), it
/// removes its temporary file.
pub struct PageWriter {
    dir: PathBuf,
    name: String,
    tmp: PathBuf,
    file: File,
    /// Set when the pages go to a page server instead of `file` (which is then /dev/null:
    /// nothing is written locally).
    wire: Option<(Arc<Sender>, u32)>,
    written: Arc<Written>,
    buf: Vec<u8>,
    /// Pages of the window handed out by the last `window()` call (0: none outstanding).
    window_pages: usize,
    runs: Vec<pb::PageRun>,
    /// Bytes of page data after the header page, and their CRC32C.
    data_len: u64,
    data_crc: u32,
    /// End address of the last run added (runs must ascend).
    end_vaddr: u64,
    /// Page-aligned data goes with O_DIRECT (the filesystem took the flag).
    direct_ok: bool,
    /// O_DIRECT is set on `file` right now.
    direct_on: bool,
    /// Bytes written through the page cache and not yet handed to writeback.
    writeback_from: u64,
    /// Bytes written with O_DIRECT and through the page cache (for the log).
    direct_bytes: u64,
    buffered_bytes: u64,
    /// Starts writeback on its own thread (None: inline, if the thread could not start).
    flusher: Option<Flusher>,
    /// Time spent starting writeback (for the log).
    writeback_ns: u64,
    done: bool,
    /// The terminal's progress line while the pages go out (see `crate::progress`).
    progress: crate::progress::Progress,
}

impl PageWriter {
    /// Starts `pages-PID.img` in the image being written. `total_pages_hint` (0 if unknown)
    /// sizes the buffers.
    pub fn create(dir: &ImageWriter, pid: i32, total_pages_hint: u64) -> Result<PageWriter> {
        let name = pages_file(pid);
        dir.written.reserve(&name)?;
        let (file, tmp, wire) = match dir.remote() {
            None => {
                let (file, tmp) = create_temp(dir.path(), &name)?;
                (file, tmp, None)
            }
            Some(to) => {
                let id = to.open(&name)?;
                let null = File::options()
                    .write(true)
                    .open("/dev/null")
                    .context("cannot open /dev/null")?;
                let shown = PathBuf::from(format!("{}:{name}", to.peer()));
                (null, shown, Some((to.clone(), id)))
            }
        };
        // The header page (offset 0) is written by finish(), with the data CRC; data goes at
        // explicit offsets after it.
        let first = (total_pages_hint.clamp(1, WINDOW_PAGES as u64) as usize) * PAGE_SIZE;
        let progress = crate::progress::Progress::start(
            match &wire {
                Some((to, _)) => format!("sending pages of PID {pid} to {}", to.peer()),
                None => format!("writing pages of PID {pid}"),
            },
            total_pages_hint * PAGE_SIZE as u64,
        );
        let mut w = PageWriter {
            dir: dir.path().to_path_buf(),
            name,
            tmp,
            file,
            wire,
            written: dir.written.clone(),
            buf: Vec::new(),
            window_pages: 0,
            runs: Vec::new(),
            data_len: 0,
            data_crc: 0,
            end_vaddr: 0,
            direct_ok: crate::tunables::get().page_io_direct,
            direct_on: false,
            writeback_from: HEADER_PAGE,
            direct_bytes: 0,
            buffered_bytes: 0,
            flusher: None,
            writeback_ns: 0,
            done: false,
            progress,
        };
        w.buf.reserve_exact(first);
        if w.wire.is_some() {
            w.direct_ok = false;
            return Ok(w);
        }
        if w.direct_ok && !w.set_direct(true) {
            w.direct_ok = false;
        }
        if total_pages_hint > 0 {
            w.reserve(total_pages_hint)?;
        }
        if total_pages_hint * PAGE_SIZE as u64 >= WRITEBACK_CHUNK {
            w.flusher = Flusher::start(&w.file);
        }
        Ok(w)
    }

    /// Allocates the disk blocks of `nr_pages` of data up front (fallocate; finish() trims the
    /// file to what was written): a full disk fails the dump here, before any page is copied,
    /// and the writes skip ext4's delayed-allocation bookkeeping (less CPU per page). Only on
    /// ext4 and XFS: tmpfs would allocate and zero every page now (while the
    /// target waits), and copy-on-write filesystems gain nothing. Elsewhere, and where
    /// fallocate is not supported, blocks are allocated as pages are written.
    fn reserve(&mut self, nr_pages: u64) -> Result<()> {
        const EXT4_SUPER_MAGIC: i64 = 0xEF53;
        const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
        let Some(fs_type) = fs::fs_type(&self.file) else {
            return Ok(());
        };
        if fs_type != EXT4_SUPER_MAGIC && fs_type != XFS_SUPER_MAGIC {
            return Ok(());
        }
        let len = nr_pages
            .saturating_mul(PAGE_SIZE as u64)
            .saturating_add(HEADER_PAGE);
        let Err(e) = fs::fallocate(&self.file, len) else {
            return Ok(());
        };
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EFBIG) => Err(e).with_context(|| {
                format!(
                    "cannot reserve {} MiB for {}",
                    len >> 20,
                    self.tmp.display()
                )
            }),
            _ => {
                log::debug!(
                    "{}: no fallocate ({e}): blocks are allocated as pages are written",
                    self.tmp.display()
                );
                Ok(())
            }
        }
    }

    /// Whether page-aligned data goes to disk with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct_ok
    }

    /// Sets or clears O_DIRECT on the file; false if the filesystem refuses it.
    fn set_direct(&mut self, on: bool) -> bool {
        if self.direct_on == on {
            return true;
        }
        let r = fs::set_direct(&self.file, on);
        let ok = r.is_ok();
        if ok {
            self.direct_on = on;
        } else if on {
            log::debug!(
                "{}: O_DIRECT refused ({}): pages go through the page cache",
                self.tmp.display(),
                r.err().map(|e| e.to_string()).unwrap_or_default()
            );
        }
        ok
    }

    /// A writable window for the next `min(nr_pages, WINDOW_PAGES)` pages (its length says
    /// how many). Fill it, e.g. with `process_vm_readv`, then call [`PageWriter::finish_run`]
    /// with the address the bytes came from and how many pages were filled; then ask for the
    /// next window. Contiguous pieces are merged into one run.
    pub fn window(&mut self, nr_pages: u64) -> &mut [u8] {
        let n = nr_pages.min(WINDOW_PAGES as u64) as usize;
        if self.buf.len() < n * PAGE_SIZE {
            self.buf.resize(n * PAGE_SIZE, 0);
        }
        self.window_pages = n;
        &mut self.buf[..n * PAGE_SIZE]
    }

    /// Appends the first `nr_pages` pages of the current window as the memory at `vaddr`
    /// (page aligned, above every run added before).
    pub fn finish_run(&mut self, vaddr: u64, nr_pages: u64) -> Result<()> {
        if nr_pages > self.window_pages as u64 {
            bail!(
                "{}: finish_run of {nr_pages} pages, but the window holds {}",
                self.name,
                self.window_pages
            );
        }
        self.window_pages = 0;
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_run(vaddr, &buf[..nr_pages as usize * PAGE_SIZE]);
        self.buf = buf;
        r
    }

    /// Appends `data` (whole pages) as the memory at `vaddr`; a copy-free alternative to the
    /// window when the bytes are already in memory.
    pub fn write_run(&mut self, vaddr: u64, data: &[u8]) -> Result<()> {
        self.add(&[RunPiece::Data {
            vaddr,
            bytes: data,
            crc: None,
        }])
    }

    /// Records that the `nr_pages` pages at `vaddr` are unchanged since the parent image: restore
    /// reads them from there (the parent must have them, or restore fails).
    pub fn add_parent_run(&mut self, vaddr: u64, nr_pages: u64) -> Result<()> {
        self.add(&[RunPiece::Parent { vaddr, nr_pages }])
    }

    /// Appends `pieces` (ascending, above every run added before): the data of all of them
    /// with one vectored write at the end of the file, then their runs (merged with their
    /// neighbours where contiguous). Nothing is recorded if anything is refused or fails.
    pub fn add(&mut self, pieces: &[RunPiece]) -> Result<()> {
        // Check every piece and complete the CRCs before touching the file.
        let mut end = self.end_vaddr;
        let mut crcs = Vec::with_capacity(pieces.len());
        for p in pieces {
            match *p {
                RunPiece::Data { vaddr, bytes, crc } => {
                    if !bytes.len().is_multiple_of(PAGE_SIZE) {
                        bail!(
                            "{}: run at {vaddr:#x} is {} bytes, not whole pages",
                            self.name,
                            bytes.len()
                        );
                    }
                    if bytes.is_empty() {
                        crcs.push(0);
                        continue;
                    }
                    let nr_pages = (bytes.len() / PAGE_SIZE) as u64;
                    if nr_pages > u64::from(u32::MAX) {
                        bail!(
                            "{}: run at {vaddr:#x} has more than 2^32 pages; write it in pieces",
                            self.name
                        );
                    }
                    end = self.check_range(end, vaddr, nr_pages)?;
                    crcs.push(crc.unwrap_or_else(|| crc32c::crc32c(bytes)));
                }
                RunPiece::Parent { vaddr, nr_pages } => {
                    crcs.push(0);
                    if nr_pages > 0 {
                        end = self.check_range(end, vaddr, nr_pages)?;
                    }
                }
            }
        }
        let data: Vec<&[u8]> = pieces
            .iter()
            .filter_map(|p| match *p {
                RunPiece::Data { bytes, .. } if !bytes.is_empty() => Some(bytes),
                _ => None,
            })
            .collect();
        self.write_data(&data)?;
        for (p, crc) in pieces.iter().zip(crcs) {
            match *p {
                RunPiece::Data { vaddr, bytes, .. } if !bytes.is_empty() => {
                    self.record_data(vaddr, bytes.len() as u64, crc)
                }
                RunPiece::Parent { vaddr, nr_pages } if nr_pages > 0 => {
                    self.record_parent(vaddr, nr_pages)
                }
                _ => {}
            }
        }
        self.end_vaddr = end;
        Ok(())
    }

    /// Writes `data` back to back at the end of the page data: O_DIRECT for page-aligned
    /// slices (when the filesystem takes it), the page cache otherwise.
    fn write_data(&mut self, data: &[&[u8]]) -> Result<()> {
        let mut off = HEADER_PAGE + self.data_len;
        if let Some((to, id)) = &self.wire {
            to.write(*id, off, data)?;
            let len = data.iter().map(|d| d.len() as u64).sum::<u64>();
            self.buffered_bytes += len;
            self.progress.add(len);
            return Ok(());
        }
        let mut i = 0;
        while i < data.len() {
            let aligned = |d: &[u8]| (d.as_ptr() as usize).is_multiple_of(PAGE_SIZE);
            let direct = self.direct_ok && aligned(data[i]);
            // The longest stretch that goes the same way.
            let mut j = i + 1;
            while j < data.len() && (self.direct_ok && aligned(data[j])) == direct {
                j += 1;
            }
            let direct = direct && self.set_direct(true);
            if !direct {
                self.set_direct(false);
            }
            let len: u64 = data[i..j].iter().map(|d| d.len() as u64).sum();
            let r = if direct {
                fs::pwritev_all(&self.file, &data[i..j], off)
            } else {
                pwrite_pieces(&self.file, &data[i..j], off)
            };
            match r {
                Ok(()) => {}
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    // The filesystem took the flag but not the write (alignment it wants
                    // bigger than a page): from here on, the page cache.
                    log::debug!(
                        "{}: O_DIRECT write refused ({e}): pages go through the page cache",
                        self.tmp.display()
                    );
                    self.direct_ok = false;
                    continue;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot write pages to {}", self.tmp.display()))
                }
            }
            self.progress.add(len);
            if direct {
                self.direct_bytes += len;
                self.writeback_from = off + len;
            } else {
                self.buffered_bytes += len;
                let written_to = off + len;
                if written_to - self.writeback_from >= WRITEBACK_CHUNK {
                    let (from, len) = (self.writeback_from, written_to - self.writeback_from);
                    match &self.flusher {
                        Some(f) => f.start_range(from, len),
                        None => self.writeback_ns += start_writeback(&self.file, from, len),
                    }
                    self.writeback_from = written_to;
                }
            }
            off += len;
            i = j;
        }
        Ok(())
    }

    /// Records `len` bytes of data (just written at the end of the page data) as the memory at
    /// `vaddr`.
    fn record_data(&mut self, vaddr: u64, len: u64, crc: u32) {
        let nr_pages = len / PAGE_SIZE as u64;
        let offset = HEADER_PAGE + self.data_len;
        self.data_len += len;
        self.data_crc = combine(self.data_crc, crc, len);
        match self.runs.last_mut() {
            Some(last)
                if !last.in_parent
                    && run_end(last) == vaddr
                    && last.offset + u64::from(last.nr_pages) * PAGE_SIZE as u64 == offset
                    && u64::from(last.nr_pages) + nr_pages <= u64::from(u32::MAX) =>
            {
                last.nr_pages += nr_pages as u32;
                last.crc32c = combine(last.crc32c, crc, len);
            }
            // `add` refused pieces of 2^32 pages or more.
            _ => self.runs.push(pb::PageRun {
                vaddr,
                nr_pages: nr_pages as u32,
                in_parent: false,
                offset,
                crc32c: crc,
            }),
        }
    }

    fn record_parent(&mut self, vaddr: u64, nr_pages: u64) {
        match self.runs.last_mut() {
            Some(last)
                if last.in_parent
                    && run_end(last) == vaddr
                    && u64::from(last.nr_pages) + nr_pages <= u64::from(u32::MAX) =>
            {
                last.nr_pages += nr_pages as u32;
            }
            _ => {
                let (mut vaddr, mut left) = (vaddr, nr_pages);
                while left > 0 {
                    let n = left.min(u64::from(u32::MAX)) as u32;
                    self.runs.push(pb::PageRun {
                        vaddr,
                        nr_pages: n,
                        in_parent: true,
                        offset: 0,
                        crc32c: 0,
                    });
                    vaddr += u64::from(n) * PAGE_SIZE as u64;
                    left -= u64::from(n);
                }
            }
        }
    }

    /// Checks alignment and ordering of a new run after `prev_end`; returns its end address.
    fn check_range(&self, prev_end: u64, vaddr: u64, nr_pages: u64) -> Result<u64> {
        if !vaddr.is_multiple_of(PAGE_SIZE as u64) {
            bail!("{}: run address {vaddr:#x} is not page aligned", self.name);
        }
        let end = nr_pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| vaddr.checked_add(l))
            .ok_or_else(|| {
                anyhow!(
                    "{}: run at {vaddr:#x} of {nr_pages} pages overflows the address space",
                    self.name
                )
            })?;
        if vaddr < prev_end {
            bail!(
                "{}: run at {vaddr:#x} overlaps or precedes the previous run (ending at {prev_end:#x}); runs must be added in ascending address order",
                self.name
            );
        }
        Ok(end)
    }

    /// Writes the header page, fsyncs, renames the file into place and registers it for the
    /// inventory. Returns the page map for `pagemap-PID.img` (write it with
    /// [`ImageWriter::write_msg`] and [`Kind::PageMap`]).
    pub fn finish(mut self) -> Result<pb::PageMap> {
        let mut page = [0u8; PAGE_SIZE];
        let h = Header {
            kind: Kind::Pages,
            version: FORMAT_VERSION,
            payload_len: self.data_len,
            payload_crc: self.data_crc,
        };
        page[..HEADER_LEN].copy_from_slice(&h.encode());
        if let Some((to, id)) = &self.wire {
            to.write(*id, 0, &[&page])?;
            to.close(*id, HEADER_PAGE + self.data_len)?;
            self.done = true;
            log::debug!(
                "{}: {} MiB of pages in {} runs sent",
                self.tmp.display(),
                self.data_len >> 20,
                self.runs.len()
            );
            return self.register(&page);
        }
        // The header page is a stack array: through the page cache.
        self.set_direct(false);
        self.file
            .write_all_at(&page, 0)
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        // Exactly the header and the data (a reservation may have made it longer).
        self.file
            .set_len(HEADER_PAGE + self.data_len)
            .with_context(|| format!("cannot truncate {}", self.tmp.display()))?;
        if let Some(f) = self.flusher.take() {
            self.writeback_ns += f.stop();
        }
        let t = std::time::Instant::now();
        self.file
            .sync_all()
            .with_context(|| format!("cannot fsync {}", self.tmp.display()))?;
        let fsync_ms = t.elapsed().as_secs_f64() * 1e3;
        let final_path = self.dir.join(&self.name);
        std::fs::rename(&self.tmp, &final_path)
            .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.name))?;
        self.done = true;
        log::debug!(
            "{}: {} MiB of pages in {} runs ({} MiB with O_DIRECT); starting writeback took {:.1} ms, the final fsync {fsync_ms:.1} ms",
            self.name,
            self.data_len >> 20,
            self.runs.len(),
            self.direct_bytes >> 20,
            self.writeback_ns as f64 / 1e6
        );
        self.register(&page)
    }

    /// Lists the finished file for the inventory; returns the page map.
    fn register(&mut self, page: &[u8]) -> Result<pb::PageMap> {
        let crc = combine(crc32c::crc32c(page), self.data_crc, self.data_len);
        self.written.add(pb::ImageFile {
            name: self.name.clone(),
            size: HEADER_PAGE + self.data_len,
            crc32c: crc,
        })?;
        Ok(pb::PageMap {
            pages_file: self.name.clone(),
            runs: std::mem::take(&mut self.runs),
        })
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        if let Some(f) = self.flusher.take() {
            f.stop();
        }
        if !self.done && self.wire.is_none() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// End address of a run (saturating: runs from a file may be nonsense).
pub(crate) fn run_end(r: &pb::PageRun) -> u64 {
    r.vaddr
        .saturating_add(u64::from(r.nr_pages) * PAGE_SIZE as u64)
}

/// Writes all of `data`, back to back, at `off`, through the page cache: one `pwrite` per
/// [`BUFFERED_WRITE_MAX`]-aligned stretch of the file at most.
fn pwrite_pieces(f: &File, data: &[&[u8]], mut off: u64) -> std::io::Result<()> {
    let max = BUFFERED_WRITE_MAX as u64;
    for d in data {
        let mut rest = *d;
        while !rest.is_empty() {
            let n = ((max - off % max) as usize).min(rest.len());
            f.write_all_at(&rest[..n], off)?;
            off += n as u64;
            rest = &rest[n..];
        }
    }
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `off` back to disk. Only a hint: failure
/// changes nothing but when the final fsync does the work. Returns the time it took (ns): the
/// call submits the I/O itself and waits for room when the device queue is full.
fn start_writeback(f: &File, off: u64, len: u64) -> u64 {
    let t = std::time::Instant::now();
    fs::start_writeback(f, off, len);
    t.elapsed().as_nanos() as u64
}

/// Starts writeback of the ranges it is given on a thread of its own, so that the writer (and,
/// while the target is frozen, the target behind it) does not wait for room in the device
/// queue (docs/benchmarks.md).
struct Flusher {
    tx: std::sync::mpsc::Sender<(u64, u64)>,
    thread: std::thread::JoinHandle<u64>,
}

impl Flusher {
    /// None if the file cannot be shared with a thread (then the writer starts writeback
    /// itself).
    fn start(f: &File) -> Option<Flusher> {
        let f = f.try_clone().ok()?;
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
        let thread = std::thread::Builder::new()
            .name("cr-page-flush".into())
            .spawn(move || {
                rx.iter()
                    .map(|(off, len)| start_writeback(&f, off, len))
                    .sum()
            })
            .ok()?;
        Some(Flusher { tx, thread })
    }

    fn start_range(&self, off: u64, len: u64) {
        let _ = self.tx.send((off, len));
    }

    /// Waits for the writeback started so far to be submitted; returns the time that took
    /// the thread (ns).
    fn stop(self) -> u64 {
        drop(self.tx);
        self.thread.join().unwrap_or(0)
    }
}

/// A page file mapped read-only. Slices returned by [`PageFile::bytes`] point into the
/// mapping: restore can hand them to `process_vm_writev` without copying.
pub struct PageFile {
    path: PathBuf,
    map: FileMap,
    header: Header,
}

impl PageFile {
    /// Maps `path` and checks its header page (magic, kind, version, header CRC) and that the
    /// file is exactly as long as the header says.
    pub fn open(path: &Path) -> Result<PageFile> {
        let f = File::open(path)
            .with_context(|| format!("cannot open page file {}", path.display()))?;
        let size = f
            .metadata()
            .with_context(|| format!("cannot stat page file {}", path.display()))?
            .len();
        let mut head = [0u8; HEADER_LEN];
        let n = f
            .read_at(&mut head, 0)
            .with_context(|| format!("cannot read page file {}", path.display()))?;
        let header =
            Header::decode(&head[..n]).map_err(|why| anyhow!("{}: {why}", path.display()))?;
        if header.kind != Kind::Pages {
            bail!(
                "{}: holds a {} image, expected pages",
                path.display(),
                header.kind.name()
            );
        }
        let want = HEADER_PAGE
            .checked_add(header.payload_len)
            .ok_or_else(|| anyhow!("{}: header size overflows", path.display()))?;
        if size != want {
            let what = if size < want {
                "truncated"
            } else {
                "too long (file corrupted)"
            };
            bail!(
                "{}: {what}: header says {} bytes of pages, file has {}",
                path.display(),
                header.payload_len,
                size.saturating_sub(HEADER_PAGE)
            );
        }
        let len =
            usize::try_from(size).map_err(|_| anyhow!("{}: too large to map", path.display()))?;
        let map = FileMap::map_readonly(&f, len)
            .with_context(|| format!("cannot map page file {}", path.display()))?;
        Ok(PageFile {
            path: path.to_path_buf(),
            map,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes (header page included).
    pub fn size(&self) -> u64 {
        self.map.as_slice().len() as u64
    }

    /// Number of data pages after the header page.
    pub fn nr_pages(&self) -> u64 {
        self.header.payload_len / PAGE_SIZE as u64
    }

    /// CRC32C of all page data (after the header page), as the header records it.
    pub fn data_crc(&self) -> u32 {
        self.header.payload_crc
    }

    /// `len` bytes at file offset `offset`, or an error if that lies outside the page data.
    pub fn bytes(&self, offset: u64, len: u64) -> Result<&[u8]> {
        let end = offset
            .checked_add(len)
            .filter(|e| offset >= HEADER_PAGE && *e <= self.size());
        match end {
            Some(end) => Ok(&self.map.as_slice()[offset as usize..end as usize]),
            None => bail!(
                "{}: bytes {offset:#x}..+{len:#x} lie outside the page data (file has {} bytes)",
                self.path.display(),
                self.size()
            ),
        }
    }

    /// Checks every run's CRC32C (`runs` are this file's own runs, `in_parent` ones excluded)
    /// and the header's data CRC, in one pass over the data. Returns the whole file's CRC32C
    /// (what the inventory lists).
    pub(crate) fn verify_runs(&self, runs: &[pb::PageRun]) -> Result<u32> {
        let all = self.map.as_slice();
        let mut order: Vec<&pb::PageRun> = runs.iter().collect();
        order.sort_by_key(|r| r.offset);
        let mut cursor = HEADER_PAGE;
        let mut data_crc = 0u32;
        let gap = |from: u64, to: u64, data_crc: &mut u32| {
            let c = crc32c::crc32c(&all[from as usize..to as usize]);
            *data_crc = combine(*data_crc, c, to - from);
        };
        for r in order {
            let len = u64::from(r.nr_pages) * PAGE_SIZE as u64;
            if r.offset < cursor {
                bail!(
                    "{}: page run at vaddr {:#x} (offset {:#x}) overlaps another run or the header",
                    self.path.display(),
                    r.vaddr,
                    r.offset
                );
            }
            let bytes = self
                .bytes(r.offset, len)
                .with_context(|| format!("page run at vaddr {:#x}", r.vaddr))?;
            gap(cursor, r.offset, &mut data_crc);
            let c = crc32c::crc32c(bytes);
            if c != r.crc32c {
                bail!(
                    "{}: page run at vaddr {:#x} ({} pages at offset {:#x}): checksum mismatch (file corrupted)",
                    self.path.display(),
                    r.vaddr,
                    r.nr_pages,
                    r.offset
                );
            }
            data_crc = combine(data_crc, c, len);
            cursor = r.offset + len;
        }
        gap(cursor, self.size(), &mut data_crc);
        if data_crc != self.header.payload_crc {
            bail!(
                "{}: page data checksum mismatch outside the listed runs (file corrupted)",
                self.path.display()
            );
        }
        let head = crc32c::crc32c(&all[..PAGE_SIZE]);
        Ok(combine(head, data_crc, self.size() - HEADER_PAGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::dir::{pagemap_file, ImageDir};
    use crate::image::testutil::TempDir;
    use crate::kernel::sys::mman::PageBuf;

    const P: u64 = PAGE_SIZE as u64;

    fn fill(buf: &mut [u8], seed: u64) {
        for (i, c) in buf.chunks_mut(8).enumerate() {
            c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
        }
    }

    #[test]
    fn runs_merge_and_read_back() {
        let t = TempDir::new("pages-rt");
        let w = ImageWriter::create(t.path()).unwrap();
        let mut pw = PageWriter::create(&w, 9, 10).unwrap();
        // 3 pages at 0x10000 via two windows (merged), a parent run, 1 page at 0x20000.
        let win = pw.window(2);
        assert_eq!(win.len(), 2 * PAGE_SIZE);
        fill(win, 1);
        pw.finish_run(0x10000, 2).unwrap();
        let win = pw.window(5);
        fill(win, 2);
        pw.finish_run(0x12000, 1).unwrap(); // partial window
        pw.add_parent_run(0x13000, 4).unwrap();
        pw.add_parent_run(0x17000, 1).unwrap(); // merged with the previous parent run
        let mut one = vec![0u8; PAGE_SIZE];
        fill(&mut one, 3);
        pw.write_run(0x20000, &one).unwrap();
        assert!(
            pw.write_run(0x1f000, &one).is_err(),
            "descending run accepted"
        );
        assert!(
            pw.write_run(0x30001, &one).is_err(),
            "unaligned run accepted"
        );
        assert!(
            pw.finish_run(0x40000, 1).is_err(),
            "finish_run without a window accepted"
        );
        let pm = pw.finish().unwrap();
        assert_eq!(pm.pages_file, "pages-9.img");
        let summary: Vec<_> = pm
            .runs
            .iter()
            .map(|r| (r.vaddr, r.nr_pages, r.in_parent, r.offset))
            .collect();
        assert_eq!(
            summary,
            [
                (0x10000, 3, false, P),
                (0x13000, 5, true, 0),
                (0x20000, 1, false, 4 * P)
            ]
        );
        w.write_msg(&pagemap_file(9), Kind::PageMap, &pm).unwrap();
        w.commit(pb::Inventory::default()).unwrap();

        let img = ImageDir::open(t.path()).unwrap();
        img.validate().unwrap();
        let pf = img.page_file("pages-9.img").unwrap();
        assert_eq!(pf.nr_pages(), 4);
        let mut want = vec![0u8; 2 * PAGE_SIZE];
        fill(&mut want, 1);
        assert_eq!(pf.bytes(P, 2 * P).unwrap(), &want[..]);
        assert_eq!(pf.bytes(4 * P, P).unwrap(), &one[..]);
        assert!(pf.bytes(4 * P, 2 * P).is_err());
        assert!(pf.bytes(0, P).is_err(), "header page handed out as data");
    }

    #[test]
    fn flipped_page_byte_names_file_and_vaddr() {
        let t = TempDir::new("pages-flip");
        let w = ImageWriter::create(t.path()).unwrap();
        let mut pw = PageWriter::create(&w, 4, 0).unwrap();
        let mut data = vec![0u8; 3 * PAGE_SIZE];
        fill(&mut data, 7);
        pw.write_run(0x7f00_0000_0000, &data).unwrap();
        pw.write_run(0x7f00_0001_0000, &data[..PAGE_SIZE]).unwrap();
        let pm = pw.finish().unwrap();
        w.write_msg(&pagemap_file(4), Kind::PageMap, &pm).unwrap();
        w.commit(pb::Inventory::default()).unwrap();
        let p = t.path().join("pages-4.img");
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER_PAGE as usize + 3 * PAGE_SIZE + 100] ^= 0x01; // in the second run
        std::fs::write(&p, &b).unwrap();
        let e = format!(
            "{:#}",
            ImageDir::open(t.path()).unwrap().validate().unwrap_err()
        );
        assert!(
            e.contains("pages-4.img: page run at vaddr 0x7f0000010000")
                && e.contains("checksum mismatch"),
            "{e}"
        );

        // A flipped byte in the header page (outside the 32-byte header) is caught by the file CRC.
        b[HEADER_PAGE as usize + 3 * PAGE_SIZE + 100] ^= 0x01;
        b[200] = 1;
        std::fs::write(&p, &b).unwrap();
        let e = format!(
            "{:#}",
            ImageDir::open(t.path()).unwrap().validate().unwrap_err()
        );
        assert!(e.contains("pages-4.img: checksum differs"), "{e}");

        // Truncated page file.
        b[200] = 0;
        std::fs::write(&p, &b[..b.len() - PAGE_SIZE]).unwrap();
        let e = format!(
            "{:#}",
            ImageDir::open(t.path()).unwrap().validate().unwrap_err()
        );
        assert!(e.contains("pages-4.img: truncated"), "{e}");
        let e = format!("{:#}", PageFile::open(&p).err().unwrap());
        assert!(
            e.contains("pages-4.img: truncated: header says 16384 bytes of pages, file has 12288"),
            "{e}"
        );
    }

    /// Page-aligned memory (as the dump's buffers are), filled with a pattern.
    struct Aligned(PageBuf);
    impl Aligned {
        fn new(pages: usize, seed: u64) -> Aligned {
            let mut a = Aligned(PageBuf::new(pages * PAGE_SIZE).unwrap());
            fill(a.bytes_mut(), seed);
            a
        }
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
    }

    /// One `add` of aligned and unaligned data, given and missing CRCs and a parent run, with
    /// O_DIRECT on and off; a reservation larger than the data is trimmed away.
    #[test]
    fn pieces_direct_and_buffered_read_back() {
        for direct in [false, true] {
            let t = TempDir::new("pages-pieces");
            let w = ImageWriter::create(t.path()).unwrap();
            let mut pw = PageWriter::create(&w, 5, 1000).unwrap();
            if direct {
                pw.direct_ok = pw.set_direct(true);
            }
            let a = Aligned::new(2, 1);
            let big = Aligned::new(200, 2); // more than one BUFFERED_WRITE_MAX
            let mut unaligned = vec![0u8; PAGE_SIZE + 1];
            fill(&mut unaligned[1..], 3);
            let pieces = [
                RunPiece::Data {
                    vaddr: 0x10_0000,
                    bytes: a.bytes(),
                    crc: Some(crc32c::crc32c(a.bytes())),
                },
                RunPiece::Parent {
                    vaddr: 0x10_2000,
                    nr_pages: 3,
                },
                RunPiece::Data {
                    vaddr: 0x10_5000,
                    bytes: &unaligned[1..],
                    crc: None,
                },
                RunPiece::Data {
                    vaddr: 0x10_6000,
                    bytes: big.bytes(),
                    crc: None,
                },
            ];
            pw.add(&pieces).unwrap();
            // Refused as a whole: nothing of it is recorded.
            assert!(pw
                .add(&[
                    RunPiece::Data {
                        vaddr: 0x20_0000,
                        bytes: a.bytes(),
                        crc: None
                    },
                    RunPiece::Data {
                        vaddr: 0x1f_0000,
                        bytes: a.bytes(),
                        crc: None
                    }
                ])
                .is_err());
            assert_eq!(pw.direct_bytes > 0, direct, "direct {direct}");
            let pm = pw.finish().unwrap();
            let summary: Vec<_> = pm
                .runs
                .iter()
                .map(|r| (r.vaddr, r.nr_pages, r.in_parent, r.offset))
                .collect();
            assert_eq!(
                summary,
                [
                    (0x10_0000, 2, false, P),
                    (0x10_2000, 3, true, 0),
                    (0x10_5000, 201, false, 3 * P)
                ]
            );
            w.write_msg(&pagemap_file(5), Kind::PageMap, &pm).unwrap();
            w.commit(pb::Inventory::default()).unwrap();
            let img = ImageDir::open(t.path()).unwrap();
            img.validate().unwrap();
            let pf = img.page_file("pages-5.img").unwrap();
            assert_eq!(pf.nr_pages(), 203);
            assert_eq!(pf.bytes(P, 2 * P).unwrap(), a.bytes());
            assert_eq!(pf.bytes(3 * P, P).unwrap(), &unaligned[1..]);
            assert_eq!(pf.bytes(4 * P, 200 * P).unwrap(), big.bytes());
        }
    }

    #[test]
    fn combine_agrees_with_the_crate() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in [
            0u64,
            1,
            2,
            3,
            7,
            8,
            4096,
            4097,
            2 << 20,
            (2 << 20) + 4096,
            1 << 30,
            123_456_789,
        ] {
            for _ in 0..3 {
                let (a, b) = (next() as u32, next() as u32);
                assert_eq!(
                    combine(a, b, len),
                    crc32c::crc32c_combine(a, b, len as usize),
                    "len {len}"
                );
            }
        }
        // And on real data: CRC(A ++ B) from the parts.
        let mut data = vec![0u8; 3 * PAGE_SIZE + 128];
        fill(&mut data, 5);
        let (a, b) = data.split_at(PAGE_SIZE + 8);
        assert_eq!(
            combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64),
            crc32c::crc32c(&data)
        );
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let t = TempDir::new("pages-drop");
        let w = ImageWriter::create(t.path()).unwrap();
        let mut pw = PageWriter::create(&w, 1, 0).unwrap();
        pw.write_run(0, &[0u8; PAGE_SIZE]).unwrap();
        drop(pw);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
        assert!(
            PageWriter::create(&w, 1, 0).is_ok(),
            "cannot start again after an aborted writer"
        );
    }

    /// Throughput of the dump path: fill a window (stands in for process_vm_readv), CRC, write;
    /// then validate (read + CRC). Prints numbers, asserts only correctness.
    #[test]
    fn page_file_throughput() {
        const MIB: u64 = 256;
        let t = TempDir::new("pages-bench");
        let w = ImageWriter::create(t.path()).unwrap();
        let total = MIB * (1 << 20) / P;
        let src = {
            let mut v = vec![0u8; WINDOW_PAGES * PAGE_SIZE];
            fill(&mut v, 11);
            v
        };
        let t0 = std::time::Instant::now();
        let mut pw = PageWriter::create(&w, 2, total).unwrap();
        let mut done = 0u64;
        while done < total {
            let win = pw.window(total - done);
            let n = win.len() / PAGE_SIZE;
            win.copy_from_slice(&src[..win.len()]);
            pw.finish_run(0x1000_0000 + done * P, n as u64).unwrap();
            done += n as u64;
        }
        let t_fill = t0.elapsed();
        let pm = pw.finish().unwrap();
        let t_write = t0.elapsed();
        assert_eq!(pm.runs.len(), 1);
        w.write_msg(&pagemap_file(2), Kind::PageMap, &pm).unwrap();
        w.commit(pb::Inventory::default()).unwrap();
        let t1 = std::time::Instant::now();
        ImageDir::open(t.path()).unwrap().validate().unwrap();
        let t_val = t1.elapsed();
        let rate = |d: std::time::Duration| MIB as f64 / d.as_secs_f64();
        eprintln!(
            "page file {MIB} MiB: copy+crc+write {:.0} MiB/s, incl. fsync {:.0} MiB/s, validate {:.0} MiB/s",
            rate(t_fill),
            rate(t_write),
            rate(t_val)
        );
    }
}
