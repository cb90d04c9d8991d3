//! Page files (`pages-PID.img`): one 4096-byte header page, then raw page data, every run page
//! aligned and contiguous in the order it was added.
//!
//! The header page starts with the usual frame header (see `file.rs`) of kind
//! [`Kind::Pages`] whose payload is all the page data after the header page (its length and
//! CRC32C), so a page file checks itself; the rest of the header page is zero.
//!
//! Writing: [`PageWriter`] hands the dump a reusable window (a few MiB) to fill directly, e.g.
//! with `process_vm_readv`; [`PageWriter::finish_run`] checksums the window while it is still
//! in the CPU cache and appends it to the file with one large `write`. Why not a `MAP_SHARED`
//! mapping of the file: a full disk then kills `cr` with SIGBUS instead of returning ENOSPC,
//! every page costs a fault plus a zeroing of the fresh page-cache page, and munmap costs TLB
//! shootdowns; a buffered write copies once into the page cache, which is what the fault path
//! costs anyway. The whole-file CRC that the inventory records is combined from the run CRCs
//! (`crc32c_combine`), so the data is never read back.
//!
//! Reading: [`PageFile`] maps a page file read-only; restore can `process_vm_writev` straight
//! from the returned slices, or `preadv` from the file at the run's offset.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use super::dir::{create_temp, pages_file, ImageWriter, Written};
use super::file::{Header, Kind, FORMAT_VERSION, HEADER_LEN};
use super::pb;

/// Page size of the images (x86_64).
pub const PAGE_SIZE: usize = 4096;
/// Size of the header page at the start of every page file; the first run starts here.
pub const HEADER_PAGE: u64 = PAGE_SIZE as u64;
/// Largest window [`PageWriter::window`] hands out: big enough that syscall costs vanish,
/// small enough to stay in L2/L3 between the copy-in, the CRC and the write.
pub const WINDOW_PAGES: usize = 1024;
/// Start writeback every this many bytes, so the final fsync has little left to do.
const WRITEBACK_CHUNK: u64 = 64 << 20;

fn combine(crc1: u32, crc2: u32, len2: u64) -> u32 {
    crc32c::crc32c_combine(crc1, crc2, len2 as usize)
}

/// Writes `pages-PID.img` of one process. Create with [`PageWriter::create`], add runs in
/// ascending address order, then [`PageWriter::finish`]. Dropped unfinished (a failed dump), it
/// removes its temporary file.
pub struct PageWriter {
    dir: PathBuf,
    name: String,
    tmp: PathBuf,
    file: File,
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
    writeback_from: u64,
    done: bool,
}

impl PageWriter {
    /// Starts `pages-PID.img` in the image being written. `total_pages_hint` (0 if unknown)
    /// sizes the buffers.
    pub fn create(dir: &ImageWriter, pid: i32, total_pages_hint: u64) -> Result<PageWriter> {
        let name = pages_file(pid);
        dir.written.reserve(&name)?;
        let (mut file, tmp) = create_temp(dir.path(), &name)?;
        // Placeholder header page; the real header (with the data CRC) is written by finish().
        file.write_all(&[0u8; PAGE_SIZE])
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let first = (total_pages_hint.clamp(1, WINDOW_PAGES as u64) as usize) * PAGE_SIZE;
        Ok(PageWriter {
            dir: dir.path().to_path_buf(),
            name,
            tmp,
            file,
            written: dir.written.clone(),
            buf: vec![0u8; first],
            window_pages: 0,
            runs: Vec::new(),
            data_len: 0,
            data_crc: 0,
            end_vaddr: 0,
            writeback_from: HEADER_PAGE,
            done: false,
        })
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
        let r = self.append(vaddr, &buf[..nr_pages as usize * PAGE_SIZE]);
        self.buf = buf;
        r
    }

    /// Appends `data` (whole pages) as the memory at `vaddr`; a copy-free alternative to the
    /// window when the bytes are already in memory.
    pub fn write_run(&mut self, vaddr: u64, data: &[u8]) -> Result<()> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            bail!(
                "{}: run at {vaddr:#x} is {} bytes, not whole pages",
                self.name,
                data.len()
            );
        }
        self.append(vaddr, data)
    }

    /// Records that the `nr_pages` pages at `vaddr` are unchanged since the parent image: restore
    /// reads them from there (the parent must have them, or restore fails).
    pub fn add_parent_run(&mut self, vaddr: u64, nr_pages: u64) -> Result<()> {
        if nr_pages == 0 {
            return Ok(());
        }
        let end = self.check_range(vaddr, nr_pages)?;
        match self.runs.last_mut() {
            Some(last)
                if last.in_parent
                    && run_end(last) == vaddr
                    && u64::from(last.nr_pages) + nr_pages <= u64::from(u32::MAX) =>
            {
                last.nr_pages += nr_pages as u32;
            }
            _ => self.push_runs(vaddr, nr_pages, |vaddr, n| pb::PageRun {
                vaddr,
                nr_pages: n,
                in_parent: true,
                offset: 0,
                crc32c: 0,
            }),
        }
        self.end_vaddr = end;
        Ok(())
    }

    /// Pushes runs of at most u32::MAX pages each (the field is 32 bits).
    fn push_runs(
        &mut self,
        mut vaddr: u64,
        mut nr_pages: u64,
        mk: impl Fn(u64, u32) -> pb::PageRun,
    ) {
        while nr_pages > 0 {
            let n = nr_pages.min(u64::from(u32::MAX)) as u32;
            self.runs.push(mk(vaddr, n));
            vaddr += u64::from(n) * PAGE_SIZE as u64;
            nr_pages -= u64::from(n);
        }
    }

    /// Checks alignment and ordering of a new run; returns its end address.
    fn check_range(&self, vaddr: u64, nr_pages: u64) -> Result<u64> {
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
        if vaddr < self.end_vaddr {
            bail!(
                "{}: run at {vaddr:#x} overlaps or precedes the previous run (ending at {:#x}); runs must be added in ascending address order",
                self.name,
                self.end_vaddr
            );
        }
        Ok(end)
    }

    fn append(&mut self, vaddr: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let nr_pages = (data.len() / PAGE_SIZE) as u64;
        let end = self.check_range(vaddr, nr_pages)?;
        let crc = crc32c::crc32c(data);
        self.file
            .write_all(data)
            .with_context(|| format!("cannot write pages to {}", self.tmp.display()))?;
        let offset = HEADER_PAGE + self.data_len;
        let len = data.len() as u64;
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
            _ if nr_pages <= u64::from(u32::MAX) => self.runs.push(pb::PageRun {
                vaddr,
                nr_pages: nr_pages as u32,
                in_parent: false,
                offset,
                crc32c: crc,
            }),
            _ => bail!(
                "{}: run at {vaddr:#x} has more than 2^32 pages; write it in pieces",
                self.name
            ),
        }
        self.end_vaddr = end;
        let written_to = HEADER_PAGE + self.data_len;
        if written_to - self.writeback_from >= WRITEBACK_CHUNK {
            start_writeback(
                &self.file,
                self.writeback_from,
                written_to - self.writeback_from,
            );
            self.writeback_from = written_to;
        }
        Ok(())
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
        self.file
            .write_all_at(&page, 0)
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        self.file
            .sync_all()
            .with_context(|| format!("cannot fsync {}", self.tmp.display()))?;
        let final_path = self.dir.join(&self.name);
        std::fs::rename(&self.tmp, &final_path)
            .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.name))?;
        self.done = true;
        let crc = combine(crc32c::crc32c(&page), self.data_crc, self.data_len);
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
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// End address of a run (saturating: runs from a file may be nonsense).
pub(crate) fn run_end(r: &pb::PageRun) -> u64 {
    r.vaddr
        .saturating_add(u64::from(r.nr_pages) * PAGE_SIZE as u64)
}

/// Asks the kernel to start writing `len` bytes at `off` back to disk, without waiting. Only a
/// hint: failure changes nothing but when the final fsync does the work.
fn start_writeback(f: &File, off: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; the fd is owned by `f`.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// A read-only, shared mapping of a whole file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing &[u8] views across threads is sound.
unsafe impl Send for Mapping {}
// SAFETY: as above, nothing mutates through the mapping.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map_readonly(f: &File, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh PROT_READ mapping chosen by the kernel (addr NULL) of an fd we hold;
        // it aliases no Rust memory. len > 0 is checked by the caller.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on our own mapping; failure is harmless.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        Ok(Mapping { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live PROT_READ mapping until Drop. (If someone truncates
        // the file meanwhile, access raises SIGBUS: image files must not change under cr.)
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mmap returned; no slice of it outlives self.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A page file mapped read-only. Slices returned by [`PageFile::bytes`] point into the
/// mapping: restore can hand them to `process_vm_writev` without copying.
pub struct PageFile {
    path: PathBuf,
    map: Mapping,
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
        let map = Mapping::map_readonly(&f, len)
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
        self.map.len as u64
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
