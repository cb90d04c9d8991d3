//! Collecting the address space: the VMA list, the mm fields, and which pages hold data.
//!
//! Pages are found with PAGEMAP_SCAN (one ioctl per VMA, exact) and copied with
//! process_vm_readv straight into the page file. What is dumped:
//! - private mappings (anonymous or file): present or swapped pages that are not the file's own
//!   page-cache pages (i.e. written, copy-on-write copies) and not the shared zero page;
//! - shared anonymous memory: every present or swapped page;
//! - shared file mappings: nothing (the data is in the file);
//! - vDSO/vvar/vsyscall, I/O and PFN mappings: nothing (the kernel provides them).

use anyhow::{Context, Result};

use crate::image::{pb, vma};
use crate::kernel::proc::maps::{VmFlags, Vma, VmaName};
use crate::kernel::sys::pagemap::{self, PagemapScanner, ScanQuery};
use crate::ranges::RangeSet;

/// A range of pages to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub end: u64,
    /// The VMA is readable: process_vm_readv works; otherwise /proc/PID/mem (FOLL_FORCE).
    pub readable: bool,
}

fn kind_of(v: &Vma) -> u32 {
    match &v.name {
        VmaName::Vdso => vma::KIND_VDSO,
        VmaName::Vvar => vma::KIND_VVAR,
        VmaName::VvarVclock => vma::KIND_VVAR_VCLOCK,
        VmaName::Vsyscall => vma::KIND_VSYSCALL,
        VmaName::Uprobes => vma::KIND_UPROBES,
        VmaName::Heap => vma::KIND_HEAP,
        VmaName::Stack => vma::KIND_STACK,
        _ if v.is_shmem_anon() => vma::KIND_SHMEM_ANON,
        VmaName::Other(_) => vma::KIND_UNSUPPORTED,
        _ => vma::KIND_REGULAR,
    }
}

fn madv_of(f: VmFlags) -> u32 {
    let mut m = 0;
    for (flag, bit, _) in super::MADVISE {
        if f.contains(flag) {
            m |= bit;
        }
    }
    m
}

/// Converts a parsed VMA to its image form, recording the file's identity for restore checks.
pub fn vma_entry(v: &Vma) -> Result<pb::Vma> {
    let kind = kind_of(v);
    let mut flags = if v.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    } as u32;
    let file_backed = v.path.is_some() && kind == vma::KIND_REGULAR;
    if !file_backed {
        flags |= libc::MAP_ANONYMOUS as u32;
    }
    if v.vm_flags.contains(VmFlags::GROWSDOWN) {
        flags |= libc::MAP_GROWSDOWN as u32;
    }
    let name = match &v.name {
        VmaName::Anon(n) => n.clone(),
        VmaName::AnonShmem(n) => n.clone(),
        VmaName::Other(n) => n.clone(),
        _ => String::new(),
    };
    let mut e = pb::Vma {
        start: v.start,
        end: v.end,
        pgoff: v.offset,
        prot: v.prot() as u32,
        flags,
        kind,
        path: v.path.clone().unwrap_or_default(),
        dev: ((v.dev_major as u64) << 8) | v.dev_minor as u64,
        inode: v.inode,
        deleted: v.deleted,
        name,
        madv: madv_of(v.vm_flags),
        locked: v.vm_flags.contains(VmFlags::LOCKED),
        ..Default::default()
    };
    // A deleted file (an unlinked file, a memfd) has no name to check at restore: its content
    // goes into the image with its fds' (files::mapped links the VMA to it).
    if file_backed && !v.deleted {
        let meta = std::fs::metadata(&e.path)
            .with_context(|| format!("stat {} (mapped at {:#x})", e.path, v.start))?;
        use std::os::unix::fs::MetadataExt;
        e.file_size = meta.size();
        e.file_mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    }
    Ok(e)
}

/// Whether the dump saves pages of this VMA (`kind` from [`vma_entry`]).
pub fn wants_pages(v: &Vma, kind: u32) -> bool {
    match kind {
        vma::KIND_VDSO
        | vma::KIND_VVAR
        | vma::KIND_VVAR_VCLOCK
        | vma::KIND_VSYSCALL
        | vma::KIND_UPROBES => false,
        _ if v.vm_flags.contains(VmFlags::IO) || v.vm_flags.contains(VmFlags::PFNMAP) => false,
        vma::KIND_SHMEM_ANON => true,
        _ => !v.shared,
    }
}

/// The pages of a VMA that hold data of its own: every present or swapped page of shared
/// anonymous memory; of private memory those that are neither the file's own page-cache pages
/// nor the shared zero page.
///
/// Private anonymous memory has no page-cache pages, so its query leaves PAGE_IS_FILE out:
/// telling a file page needs the kernel to look at every page's `struct page` (a cache miss
/// each), which makes the scan several times slower (docs/benchmarks.md).
pub fn resident_query(v: &Vma) -> ScanQuery {
    if v.is_shmem_anon() {
        ScanQuery {
            category_anyof_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            ..Default::default()
        }
    } else if v.path.is_none() && !v.shared {
        ScanQuery {
            category_inverted: pagemap::PAGE_IS_PFNZERO,
            category_mask: pagemap::PAGE_IS_PFNZERO,
            category_anyof_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            ..Default::default()
        }
    } else {
        ScanQuery {
            category_inverted: pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO,
            category_mask: pagemap::PAGE_IS_FILE | pagemap::PAGE_IS_PFNZERO,
            category_anyof_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            ..Default::default()
        }
    }
}

/// Whether every page of a private VMA is an anonymous page in memory, by its smaps
/// counters: then [`resident_query`] would report the whole VMA, and the page-table walk of
/// PAGEMAP_SCAN can be skipped. (The shared zero page and page-cache pages do not count as
/// `Anonymous:`; swapped pages count as `Swap:`.)
fn fully_anonymous(v: &Vma) -> bool {
    !v.shared && !v.is_shmem_anon() && !v.is_empty() && v.anonymous == v.len()
}

/// The VMAs of the image and the page runs to copy. `vmas` must come from smaps read while the
/// target is frozen (their counters decide whether a VMA is scanned, see [`fully_anonymous`]).
pub fn plan(pid: i32, vmas: &[Vma]) -> Result<(Vec<pb::Vma>, Vec<Run>, u64)> {
    let t0 = std::time::Instant::now();
    let mut scanner =
        PagemapScanner::open(pid).with_context(|| format!("open the pagemap of PID {pid}"))?;
    let mut entries = Vec::with_capacity(vmas.len());
    let mut runs: Vec<Run> = Vec::new();
    let mut scanned = 0u64;
    for v in vmas {
        let e = vma_entry(v)?;
        if e.kind == vma::KIND_UNSUPPORTED {
            crate::refuse!(
                None,
                "mapping {:#x}-{:#x} ({}) of PID {pid} is not supported",
                v.start,
                v.end,
                e.name
            );
        }
        let wants_pages = wants_pages(v, e.kind);
        entries.push(e);
        if !wants_pages {
            continue;
        }
        scanned += (v.end - v.start) / 4096;
        let regions = if fully_anonymous(v) {
            vec![pagemap::PageRegion {
                start: v.start,
                end: v.end,
                categories: 0,
            }]
        } else {
            let query = resident_query(v);
            scanner.scan(v.start, v.end, &query).with_context(|| {
                format!("PAGEMAP_SCAN of {:#x}-{:#x} of PID {pid}", v.start, v.end)
            })?
        };
        for r in regions {
            match runs.last_mut() {
                Some(last) if last.end == r.start && last.readable == v.read => last.end = r.end,
                _ => runs.push(Run {
                    start: r.start,
                    end: r.end,
                    readable: v.read,
                }),
            }
        }
    }
    log::debug!(
        "PID {pid}: {} VMAs scanned in {:.1} ms: {} page runs",
        entries.len(),
        t0.elapsed().as_secs_f64() * 1e3,
        runs.len()
    );
    Ok((entries, runs, scanned))
}

/// The mm fields of the image from /proc/PID/stat, auxv and the current brk.
pub fn mm_fields(pid: i32, stat: &crate::kernel::proc::stat::Stat, brk: u64) -> Result<pb::Mm> {
    let auxv = crate::kernel::proc::auxv::read_auxv_raw(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("readlink /proc/{pid}/exe"))?;
    Ok(pb::Mm {
        start_code: stat.start_code,
        end_code: stat.end_code,
        start_data: stat.start_data,
        end_data: stat.end_data,
        start_brk: stat.start_brk,
        brk,
        start_stack: stat.start_stack,
        arg_start: stat.arg_start,
        arg_end: stat.arg_end,
        env_start: stat.env_start,
        env_end: stat.env_end,
        auxv,
        exe_path: exe.to_string_lossy().into_owned(),
        vmas: Vec::new(),
        thp_disabled: false,
    })
}

/// `runs` without the ranges in `skip` (memory another process of the tree saves).
pub fn without(runs: Vec<Run>, skip: &[(u64, u64)]) -> Vec<Run> {
    if skip.is_empty() {
        return runs;
    }
    let skip = RangeSet::from_ranges(skip.to_vec());
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        let rest = RangeSet::from_ranges(vec![(r.start, r.end)]).subtract(&skip);
        out.extend(rest.ranges().iter().map(|&(start, end)| Run {
            start,
            end,
            readable: r.readable,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_minus_shared_ranges() {
        let r = |start, end| Run {
            start,
            end,
            readable: true,
        };
        let got = without(
            vec![r(0x1000, 0x9000), r(0xa000, 0xb000)],
            &[(0x2000, 0x3000), (0x8000, 0xb000)],
        );
        assert_eq!(got, vec![r(0x1000, 0x2000), r(0x3000, 0x8000)]);
        assert_eq!(
            without(vec![r(0x1000, 0x2000)], &[]),
            vec![r(0x1000, 0x2000)]
        );
    }
}
