//! PAGEMAP_SCAN (ioctl on /proc/PID/pagemap, Linux 6.7+): find pages by category in a range
//! in one call per batch of regions, instead of reading 8 bytes per page from pagemap.
//!
//! cr uses it two ways: to find present pages for a dump, and (with PM_SCAN_WP_MATCHING on a
//! range armed by [`super::uffd`]) as the exact dirty scan: report the pages written since the
//! last scan and write-protect them again, atomically. The exact scan is the fallback whenever
//! the eBPF dirty set may be incomplete (see [`super::dirty::Tracker::lost`]).

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

/// Page categories (`PAGE_IS_*`).
pub mod category {
    pub const WPALLOWED: u64 = 1 << 0;
    pub const WRITTEN: u64 = 1 << 1;
    pub const FILE: u64 = 1 << 2;
    pub const PRESENT: u64 = 1 << 3;
    pub const SWAPPED: u64 = 1 << 4;
    pub const PFNZERO: u64 = 1 << 5;
    pub const HUGE: u64 = 1 << 6;
    pub const SOFT_DIRTY: u64 = 1 << 7;
    pub const GUARD: u64 = 1 << 8;
}

/// Write-protect the matching pages (re-arm), atomically with reporting them.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (EPERM) unless the whole range is registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
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

/// One run of pages with the same categories, `[start, end)` in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

const PAGEMAP_SCAN: nix::sys::ioctl::ioctl_num_type = nix::request_code_readwrite!(b'f', 16, std::mem::size_of::<PmScanArg>());

/// What to look for. A page matches when `((categories ^ inverted) & mask) == mask` and, if
/// `anyof` is non-zero, `(categories ^ inverted) & anyof != 0` (the kernel's rule).
#[derive(Clone, Copy, Debug, Default)]
pub struct Query {
    pub flags: u64,
    pub inverted: u64,
    pub mask: u64,
    pub anyof: u64,
    /// Categories to report in [`PageRegion::categories`].
    pub report: u64,
}

/// Regions per ioctl call.
const BATCH: usize = 512;

/// Scans `[start, end)` of the process whose `pagemap` is given and returns every matching
/// region (adjacent regions with equal categories are merged by the kernel within a batch).
pub fn scan(pagemap: &File, start: u64, end: u64, q: &Query) -> Result<Vec<PageRegion>> {
    let mut out = Vec::new();
    let mut buf = vec![PageRegion::default(); BATCH];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start: at,
            end,
            walk_end: 0,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            max_pages: 0,
            category_inverted: q.inverted,
            category_mask: q.mask,
            category_anyof_mask: q.anyof,
            return_mask: q.report,
        };
        // SAFETY: PAGEMAP_SCAN reads a pm_scan_arg (PmScanArg mirrors it, size included) and
        // writes at most vec_len page_regions to `vec`, which points into `buf`, alive and
        // exclusively borrowed for the call.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg as *mut PmScanArg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return Err(e).with_context(|| format!("PAGEMAP_SCAN of {at:#x}..{end:#x} (flags {:#x})", q.flags));
        }
        let n = n as usize;
        if n > buf.len() {
            bail!("PAGEMAP_SCAN returned {n} regions for a buffer of {}", buf.len());
        }
        out.extend_from_slice(&buf[..n]);
        if arg.walk_end <= at {
            bail!("PAGEMAP_SCAN made no progress at {at:#x} (walk_end {:#x})", arg.walk_end);
        }
        at = arg.walk_end;
    }
    Ok(out)
}

/// Opens /proc/PID/pagemap (`pid` 0: this process) for scanning.
pub fn open_pagemap(pid: i32) -> Result<File> {
    let path = if pid == 0 { "/proc/self/pagemap".to_string() } else { format!("/proc/{pid}/pagemap") };
    File::open(&path).with_context(|| format!("open {path}"))
}

/// Expands regions into page numbers (address >> 12).
pub fn pages_of(regions: &[PageRegion]) -> Vec<u64> {
    regions
        .iter()
        .flat_map(|r| (r.start >> cr_common::PAGE_SHIFT)..(r.end >> cr_common::PAGE_SHIFT))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_kernel_header() {
        // _IOWR('f', 16, struct pm_scan_arg), 96 bytes.
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN as u64, 0xc0606610);
    }

    #[test]
    fn expands_regions_to_pages() {
        let r = [PageRegion { start: 0x1000, end: 0x3000, categories: 0 }, PageRegion { start: 0x8000, end: 0x9000, categories: 0 }];
        assert_eq!(pages_of(&r), vec![1, 2, 8]);
    }
}
