//! Which pages of a process are present, swapped, written, file-backed: the PAGEMAP_SCAN ioctl
//! on `/proc/PID/pagemap` (Linux 6.7+), with the plain 64-bit-entry reader of the same file as a
//! fallback for older kernels.
//!
//! PAGEMAP_SCAN returns runs of pages with equal categories instead of one word per page, so a
//! scan costs O(runs) in output; with PM_SCAN_WP_MATCHING it also re-arms userfaultfd async
//! write-protection on what it reports, atomically — the exact dirty harvest of §5.
//!
//! Constants and layouts are from include/uapi/linux/fs.h (checked against the kernel header;
//! PAGE_IS_GUARD was added in 6.15).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

use super::page_size;

/// Page categories (`PAGE_IS_*`), used in masks and reported in [`PageRegion::categories`].
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
/// 6.15+: part of a MADV_GUARD_INSTALL guard region. Older kernels reject it in masks (EINVAL).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// Write-protect the pages that match (userfaultfd WP_ASYNC must be registered on the VMAs).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Abort with EPERM if a VMA in the range is not registered for async write-protection.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: pages `start..end` (exclusive) share `categories` (masked by the
/// query's return_mask).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

impl PageRegion {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// `_IOWR(type, nr, size)` for the asm-generic ioctl encoding (x86, arm64, riscv).
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    (3u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// What to look for. Matching follows the kernel: a page matches when, after XOR with
/// `category_inverted`, it has all of `category_mask` and (if non-zero) any of
/// `category_anyof_mask`. Reported regions carry the page's real categories ANDed with
/// `return_mask`; adjacent pages with equal reported categories form one region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanQuery {
    pub category_mask: u64,
    pub category_inverted: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
    /// PM_SCAN_WP_MATCHING: write-protect what matched (the uffd-wp re-arm).
    pub wp_matching: bool,
    /// PM_SCAN_CHECK_WPASYNC: fail (EPERM) on a VMA not registered for async WP.
    pub check_wpasync: bool,
}

impl ScanQuery {
    /// Pages with memory behind them (present or swapped), reporting present/swapped/file/
    /// zero-pfn/huge: what a full dump copies.
    pub fn resident() -> ScanQuery {
        ScanQuery {
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT
                | PAGE_IS_SWAPPED
                | PAGE_IS_FILE
                | PAGE_IS_PFNZERO
                | PAGE_IS_HUGE,
            ..ScanQuery::default()
        }
    }

    /// Pages written since they were last write-protected (userfaultfd async WP) and nothing
    /// else: the kernel's fast path (fs/proc/task_mmu.c), which looks at a pte's uffd-wp bit
    /// only, where asking for PRESENT, FILE or PFNZERO looks up every page (10x the walk). It
    /// reports none ptes (no page, no uffd-wp marker) as written too. `rearm`: write-protect
    /// what it reports, failing with EPERM on a VMA not registered for async WP.
    pub fn written(rearm: bool) -> ScanQuery {
        ScanQuery {
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            wp_matching: rearm,
            check_wpasync: rearm,
            ..ScanQuery::default()
        }
    }

    fn flags(&self) -> u64 {
        (if self.wp_matching {
            PM_SCAN_WP_MATCHING
        } else {
            0
        }) | (if self.check_wpasync {
            PM_SCAN_CHECK_WPASYNC
        } else {
            0
        })
    }

    /// Whether a page with `categories` matches (the kernel's rule, for the fallback).
    fn matches(&self, categories: u64) -> bool {
        let c = categories ^ self.category_inverted;
        (c & self.category_mask) == self.category_mask
            && (self.category_anyof_mask == 0 || c & self.category_anyof_mask != 0)
    }
}

/// One `/proc/PID/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    pub const PRESENT: u64 = 1 << 63;
    pub const SWAPPED: u64 = 1 << 62;
    /// File-backed page or shared anonymous page.
    pub const FILE_OR_SHARED_ANON: u64 = 1 << 61;
    /// The PTE is write-protected by userfaultfd-wp (5.17+).
    pub const UFFD_WP: u64 = 1 << 57;
    /// The page is mapped exclusively (4.2+).
    pub const EXCLUSIVE: u64 = 1 << 56;
    pub const SOFT_DIRTY: u64 = 1 << 55;
    const PFN_MASK: u64 = (1 << 55) - 1;

    pub fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    pub fn swapped(self) -> bool {
        self.0 & Self::SWAPPED != 0
    }
    pub fn file_or_shared_anon(self) -> bool {
        self.0 & Self::FILE_OR_SHARED_ANON != 0
    }
    pub fn uffd_wp(self) -> bool {
        self.0 & Self::UFFD_WP != 0
    }
    pub fn exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }
    pub fn soft_dirty(self) -> bool {
        self.0 & Self::SOFT_DIRTY != 0
    }

    /// The page frame number of a present page (zero without CAP_SYS_ADMIN).
    pub fn pfn(self) -> Option<u64> {
        self.present().then_some(self.0 & Self::PFN_MASK)
    }

    /// The PAGE_IS_* categories this entry can tell: PRESENT, SWAPPED, FILE, SOFT_DIRTY.
    /// (WRITTEN, PFNZERO, HUGE, WPALLOWED and GUARD are not derivable from an entry.)
    pub fn categories(self) -> u64 {
        let mut c = 0;
        if self.present() {
            c |= PAGE_IS_PRESENT;
        }
        if self.swapped() {
            c |= PAGE_IS_SWAPPED;
        }
        if self.file_or_shared_anon() && (self.present() || self.swapped()) {
            c |= PAGE_IS_FILE;
        }
        if self.soft_dirty() {
            c |= PAGE_IS_SOFT_DIRTY;
        }
        c
    }
}

/// Categories the fallback can evaluate.
const FALLBACK_CATEGORIES: u64 =
    PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE | PAGE_IS_SOFT_DIRTY;

/// Appends a region, merging it into the previous one when contiguous with equal categories
/// (the kernel does this within one call; runs split across calls are rejoined here).
fn push_merged(out: &mut Vec<PageRegion>, r: PageRegion) {
    if let Some(last) = out.last_mut() {
        if last.end == r.start && last.categories == r.categories {
            last.end = r.end;
            return;
        }
    }
    out.push(r);
}

/// Scans another (or this) process's page tables through `/proc/PID/pagemap`.
pub struct PagemapScanner {
    file: File,
    pid: i32,
    /// Output buffer reused across ioctls.
    vec: Vec<PageRegion>,
}

impl PagemapScanner {
    /// Opens `/proc/PID/pagemap` with room for 4096 regions per ioctl. Needs
    /// PTRACE_MODE_READ over the target (PFNs additionally need CAP_SYS_ADMIN).
    pub fn open(pid: i32) -> Result<PagemapScanner> {
        PagemapScanner::with_capacity(pid, 4096)
    }

    /// Like [`PagemapScanner::open`] with `regions` output slots per ioctl (at least 1).
    pub fn with_capacity(pid: i32, regions: usize) -> Result<PagemapScanner> {
        let path = format!("/proc/{pid}/pagemap");
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        Ok(PagemapScanner {
            file,
            pid,
            vec: vec![PageRegion::default(); regions.max(1)],
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn ioctl(&mut self, arg: &mut PmScanArg) -> std::io::Result<usize> {
        arg.vec = self.vec.as_mut_ptr() as u64;
        arg.vec_len = self.vec.len() as u64;
        // SAFETY: `arg` is a valid pm_scan_arg of the size it declares; `vec` points at
        // `vec_len` writable PageRegions (same layout as struct page_region) owned by self and
        // not otherwise borrowed during the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                PAGEMAP_SCAN as libc::Ioctl,
                arg as *mut PmScanArg,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Whether this kernel has PAGEMAP_SCAN (an empty scan succeeds; ENOTTY means no).
    pub fn is_supported(&mut self) -> Result<bool> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            return_mask: PAGE_IS_PRESENT,
            ..PmScanArg::default()
        };
        match self.ioctl(&mut arg) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(false),
            Err(e) => {
                Err(e).with_context(|| format!("PAGEMAP_SCAN probe on /proc/{}/pagemap", self.pid))
            }
        }
    }

    /// Scans `start..end` (start page-aligned; end is rounded up) and returns the matching
    /// regions, walking the whole range however many ioctls the output buffer needs.
    pub fn scan(&mut self, start: u64, end: u64, q: &ScanQuery) -> Result<Vec<PageRegion>> {
        let mut out = Vec::new();
        self.scan_into(start, end, q, &mut out)?;
        Ok(out)
    }

    /// [`PagemapScanner::scan`] appending to `out` (to reuse its allocation across VMAs).
    pub fn scan_into(
        &mut self,
        start: u64,
        end: u64,
        q: &ScanQuery,
        out: &mut Vec<PageRegion>,
    ) -> Result<()> {
        let ps = page_size();
        if !start.is_multiple_of(ps) {
            bail!(
                "PAGEMAP_SCAN pid {}: start {start:#x} is not page-aligned",
                self.pid
            );
        }
        let end = end.div_ceil(ps) * ps;
        let first_new = out.len();
        let mut cur = start;
        while cur < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: q.flags(),
                start: cur,
                end,
                category_inverted: q.category_inverted,
                category_mask: q.category_mask,
                category_anyof_mask: q.category_anyof_mask,
                return_mask: q.return_mask,
                ..PmScanArg::default()
            };
            let n = self.ioctl(&mut arg).with_context(|| {
                format!(
                    "PAGEMAP_SCAN pid {} {cur:#x}..{end:#x} (flags {:#x})",
                    self.pid, arg.flags
                )
            })?;
            if n > self.vec.len() {
                bail!(
                    "PAGEMAP_SCAN pid {}: kernel reported {n} regions for {} slots",
                    self.pid,
                    self.vec.len()
                );
            }
            for r in &self.vec[..n] {
                if out.len() > first_new {
                    push_merged(out, *r);
                } else {
                    out.push(*r);
                }
            }
            // A walk that did not fill the buffer went to the end. (Do not trust walk_end
            // then: the kernel leaves it at the point where its internal 512-entry buffer last
            // filled, behind regions it has reported since; resuming there reports them twice.)
            if n < self.vec.len() {
                break;
            }
            if arg.walk_end <= cur || arg.walk_end > end {
                bail!(
                    "PAGEMAP_SCAN pid {}: walk_end {:#x} makes no progress from {cur:#x} (end {end:#x})",
                    self.pid,
                    arg.walk_end
                );
            }
            // Everything up to the end of the last region is reported (a region cut by the
            // full buffer ends where the walk stopped).
            cur = arg.walk_end.max(self.vec[n - 1].end);
        }
        Ok(())
    }

    /// Reads `npages` raw pagemap entries starting at the page containing `start`.
    pub fn read_entries(&self, start: u64, npages: usize) -> Result<Vec<PagemapEntry>> {
        let ps = page_size();
        let mut bytes = vec![0u8; npages * 8];
        let off = (start / ps) * 8;
        self.file.read_exact_at(&mut bytes, off).with_context(|| {
            format!(
                "read /proc/{}/pagemap for {start:#x}, {npages} pages",
                self.pid
            )
        })?;
        let (words, _) = bytes.as_chunks::<8>();
        Ok(words
            .iter()
            .map(|w| PagemapEntry(u64::from_ne_bytes(*w)))
            .collect())
    }

    /// The fallback for kernels without PAGEMAP_SCAN: the same query evaluated on raw entries.
    /// Only PRESENT, SWAPPED, FILE and SOFT_DIRTY can be asked for (others are an error), WP
    /// flags are refused, and unmapped holes count as pages with no category (the ioctl skips
    /// them), which only matters for inverted queries.
    pub fn scan_fallback(&self, start: u64, end: u64, q: &ScanQuery) -> Result<Vec<PageRegion>> {
        let used = q.category_mask | q.category_inverted | q.category_anyof_mask | q.return_mask;
        if used & !FALLBACK_CATEGORIES != 0 || q.wp_matching || q.check_wpasync {
            bail!(
                "pagemap fallback for pid {} cannot evaluate categories {:#x} or WP flags",
                self.pid,
                used & !FALLBACK_CATEGORIES
            );
        }
        let ps = page_size();
        if !start.is_multiple_of(ps) {
            bail!(
                "pagemap pid {}: start {start:#x} is not page-aligned",
                self.pid
            );
        }
        let end = end.div_ceil(ps) * ps;
        const CHUNK: u64 = 64 * 1024; // pages per read: 512 KiB of entries
        let mut out = Vec::new();
        let mut addr = start;
        while addr < end {
            let n = ((end - addr) / ps).min(CHUNK);
            for (i, e) in self.read_entries(addr, n as usize)?.into_iter().enumerate() {
                let c = e.categories();
                if q.matches(c) {
                    let a = addr + i as u64 * ps;
                    push_merged(
                        &mut out,
                        PageRegion {
                            start: a,
                            end: a + ps,
                            categories: c & q.return_mask,
                        },
                    );
                }
            }
            addr += n * ps;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io::Write;

    fn pages_of(regions: &[PageRegion], base: u64, want: u64) -> BTreeSet<u64> {
        let ps = page_size();
        let mut s = BTreeSet::new();
        for r in regions {
            if r.categories & want == want {
                let mut a = r.start;
                while a < r.end {
                    s.insert((a - base) / ps);
                    a += ps;
                }
            }
        }
        s
    }

    /// A read/write private mapping of `npages` pages for one test, unmapped when dropped.
    struct TestMap {
        base: u64,
        npages: u64,
    }

    impl TestMap {
        /// Anonymous memory with THP off, so that touching a page makes that page present and
        /// not the whole 2 MiB run around it.
        fn anon(npages: u64) -> TestMap {
            let m = TestMap::new(npages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
            // SAFETY: madvise on our own fresh mapping.
            unsafe { libc::madvise(m.base as *mut libc::c_void, m.len(), libc::MADV_NOHUGEPAGE) };
            m
        }

        /// `fd`'s first pages, MAP_PRIVATE: written pages become anonymous copies.
        fn private_file(npages: u64, fd: i32) -> TestMap {
            TestMap::new(npages, libc::MAP_PRIVATE, fd)
        }

        fn new(npages: u64, flags: i32, fd: i32) -> TestMap {
            let len = (npages * page_size()) as usize;
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: a fresh mapping; no Rust references are made into it except raw writes
            // and reads in these tests while it is mapped.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
            assert_ne!(p, libc::MAP_FAILED);
            TestMap {
                base: p as u64,
                npages,
            }
        }

        fn len(&self) -> usize {
            (self.npages * page_size()) as usize
        }

        fn end(&self) -> u64 {
            self.base + self.npages * page_size()
        }

        /// The address of page `p`.
        fn page(&self, p: u64) -> u64 {
            assert!(p < self.npages);
            self.base + p * page_size()
        }

        /// Writes a byte into each of `pages`, making it present (and, in a private file
        /// mapping, an anonymous copy).
        fn touch(&self, pages: impl IntoIterator<Item = u64>) {
            for p in pages {
                // SAFETY: the page is inside our read/write mapping.
                unsafe { std::ptr::write_volatile((self.page(p) + 7) as *mut u8, 0x5a) };
            }
        }
    }

    impl Drop for TestMap {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping; nothing refers into it any more.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len()) };
        }
    }

    /// Pages that are present, reporting `return_mask`: the query most tests ask.
    fn present_query(return_mask: u64) -> ScanQuery {
        ScanQuery {
            category_mask: PAGE_IS_PRESENT,
            return_mask,
            ..Default::default()
        }
    }

    #[test]
    fn constants_match_uapi() {
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(PAGE_IS_GUARD, 0x100);
        let q = ScanQuery {
            category_mask: PAGE_IS_PRESENT | PAGE_IS_FILE,
            category_inverted: PAGE_IS_FILE,
            ..Default::default()
        };
        assert!(q.matches(PAGE_IS_PRESENT));
        assert!(!q.matches(PAGE_IS_PRESENT | PAGE_IS_FILE));
        let q = ScanQuery {
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        assert!(q.matches(PAGE_IS_SWAPPED) && !q.matches(PAGE_IS_FILE));
        let e = PagemapEntry(PagemapEntry::PRESENT | PagemapEntry::FILE_OR_SHARED_ANON | 0x1234);
        assert_eq!(e.pfn(), Some(0x1234));
        assert_eq!(e.categories(), PAGE_IS_PRESENT | PAGE_IS_FILE);
        assert_eq!(
            PagemapEntry(PagemapEntry::FILE_OR_SHARED_ANON).categories(),
            0
        );
        let mut v = vec![PageRegion {
            start: 0,
            end: 4096,
            categories: 8,
        }];
        push_merged(
            &mut v,
            PageRegion {
                start: 4096,
                end: 8192,
                categories: 8,
            },
        );
        push_merged(
            &mut v,
            PageRegion {
                start: 8192,
                end: 12288,
                categories: 12,
            },
        );
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].end, 8192);
    }

    /// Touch some pages of an anonymous mapping; exactly those are PRESENT, both via the ioctl
    /// (with a 1-slot buffer, so the walk_end loop runs) and via the raw-entry fallback.
    #[test]
    fn anon_present_pages_exact() {
        let ps = page_size();
        let npages = 64u64;
        let m = TestMap::anon(npages);
        let (base, end) = (m.base, m.end());
        let touched: BTreeSet<u64> = [0, 3, 4, 5, 9, 31, 32, 63].into_iter().collect();
        m.touch(touched.iter().copied());
        let me = std::process::id() as i32;

        let mut s = PagemapScanner::open(me).unwrap();
        assert!(s.is_supported().unwrap());
        let q = present_query(PAGE_IS_PRESENT | PAGE_IS_FILE);
        let regions = s.scan(base, end, &q).unwrap();
        assert_eq!(
            pages_of(&regions, base, PAGE_IS_PRESENT),
            touched,
            "{regions:x?}"
        );
        assert!(
            regions.iter().all(|r| r.categories == PAGE_IS_PRESENT),
            "anon pages are not FILE"
        );
        // Runs: {0}, {3,4,5}, {9}, {31,32}, {63}.
        assert_eq!(regions.len(), 5, "{regions:x?}");

        let mut tiny = PagemapScanner::with_capacity(me, 1).unwrap();
        assert_eq!(tiny.scan(base, end, &q).unwrap(), regions);

        // Inverted: the untouched pages.
        let qi = ScanQuery {
            category_mask: PAGE_IS_PRESENT,
            category_inverted: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT,
            ..Default::default()
        };
        let holes = s.scan(base, end, &qi).unwrap();
        let untouched: BTreeSet<u64> = (0..npages).filter(|p| !touched.contains(p)).collect();
        assert_eq!(pages_of(&holes, base, 0), untouched);

        let fb = s.scan_fallback(base, end, &q).unwrap();
        assert_eq!(fb, regions);
        let entries = s.read_entries(base, npages as usize).unwrap();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.present(), touched.contains(&(i as u64)), "page {i}");
            if e.present() {
                assert!(!e.file_or_shared_anon());
            }
        }
        assert!(s
            .scan_fallback(
                base,
                base + ps,
                &ScanQuery {
                    return_mask: PAGE_IS_WRITTEN,
                    ..Default::default()
                }
            )
            .is_err());
        assert!(s.scan(base + 1, base + ps, &q).is_err());
    }

    /// More regions than the kernel's internal 512-entry buffer, in one ioctl: every region
    /// exactly once (the kernel's walk_end is stale in that case and must not be resumed from).
    #[test]
    fn many_regions_reported_once() {
        let npages = 4096u64;
        let m = TestMap::anon(npages);
        let base = m.base;
        let touched: BTreeSet<u64> = (0..npages).step_by(2).collect();
        m.touch(touched.iter().copied());
        let q = present_query(PAGE_IS_PRESENT);
        for cap in [4096usize, 1000, 512, 7] {
            let mut s = PagemapScanner::with_capacity(std::process::id() as i32, cap).unwrap();
            let r = s.scan(base, m.end(), &q).unwrap();
            assert_eq!(r.len(), touched.len(), "capacity {cap}");
            assert!(
                r.windows(2).all(|w| w[0].end <= w[1].start),
                "capacity {cap}: regions overlap or go back"
            );
            assert_eq!(
                pages_of(&r, base, PAGE_IS_PRESENT),
                touched,
                "capacity {cap}"
            );
        }
    }

    /// MAP_PRIVATE file mapping: written pages become anonymous copies (not FILE), pages only
    /// read stay FILE.
    #[test]
    fn private_file_written_pages_are_not_file() {
        let ps = page_size();
        let npages = 8u64;
        let path = std::env::temp_dir().join(format!("cr-pagemap-test-{}", std::process::id()));
        let mut f = std::fs::File::create_new(&path).unwrap();
        f.write_all(&vec![0x11u8; (npages * ps) as usize]).unwrap();
        f.sync_all().unwrap();
        let f = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let m = TestMap::private_file(npages, f.as_raw_fd());
        let base = m.base;
        let read_only = [0u64, 2, 6];
        let written = [1u64, 3, 4];
        for p in read_only {
            // SAFETY: inside our mapping.
            let v = unsafe { std::ptr::read_volatile(m.page(p) as *const u8) };
            assert_eq!(v, 0x11);
        }
        m.touch(written);
        let mut s = PagemapScanner::open(std::process::id() as i32).unwrap();
        let q = present_query(PAGE_IS_PRESENT | PAGE_IS_FILE);
        let regions = s.scan(base, m.end(), &q).unwrap();
        let file = pages_of(&regions, base, PAGE_IS_PRESENT | PAGE_IS_FILE);
        let present = pages_of(&regions, base, PAGE_IS_PRESENT);
        for p in read_only {
            assert!(
                file.contains(&p),
                "read page {p} should be FILE: {regions:x?}"
            );
        }
        for p in written {
            assert!(
                present.contains(&p) && !file.contains(&p),
                "written page {p} should be anon: {regions:x?}"
            );
        }
        // The fallback agrees on those pages (fault-around may have mapped others as FILE too).
        let fb = s.scan_fallback(base, m.end(), &q).unwrap();
        assert_eq!(pages_of(&fb, base, PAGE_IS_PRESENT | PAGE_IS_FILE), file);
        assert_eq!(pages_of(&fb, base, PAGE_IS_PRESENT), present);
    }

    /// Scanning another process works the same way (here: a forked copy whose pages we know).
    #[test]
    fn scan_other_process() {
        let m = TestMap::anon(16);
        let (rfd, wfd) = nix::unistd::pipe().unwrap();
        // SAFETY: the child makes raw syscalls only (writes to its mapping, write, close_range,
        // pause); closing every fd keeps other tests' pipes from staying open through it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // Child: touch pages 2 and 7 of the mapping, say ready, wait to be killed.
            m.touch([2, 7]);
            // SAFETY: raw syscalls only; the child never returns into Rust code.
            unsafe {
                libc::write(wfd.as_raw_fd(), b"r".as_ptr().cast(), 1);
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                loop {
                    libc::pause();
                }
            }
        }
        drop(wfd);
        let mut b = [0u8; 1];
        nix::unistd::read(&rfd, &mut b).unwrap();
        let mut s = PagemapScanner::open(pid).unwrap();
        let r = s.scan(m.base, m.end(), &present_query(PAGE_IS_PRESENT));
        // SAFETY: killing and reaping our child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert_eq!(
            pages_of(&r.unwrap(), m.base, PAGE_IS_PRESENT),
            [2u64, 7].into_iter().collect()
        );
    }
}
