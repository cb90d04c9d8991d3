//! Rebuilding the address space of a fresh task from the outside.
//!
//! The task starts as a copy of `cr`. Everything it inherited is unmapped except the
//! kernel-provided vDSO/vvar, which are moved to their dumped addresses (mremap keeps the
//! kernel's bookkeeping right). Then every VMA of the image is mapped at its address with its
//! final protection, and its saved pages written in: process_vm_writev for writable memory,
//! /proc/PID/mem (which may write read-only private mappings) for the rest. The mm fields are
//! set with PR_SET_MM_MAP. After this the task's /proc/PID/maps equals the image's VMA list.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};

use super::shmem::ShmemLink;
use crate::image::chain::PageSegment;
use crate::image::{pb, vma};
use crate::kernel::proc::maps::{read_maps, VmaName};
use crate::kernel::ptrace::Remote;
use crate::kernel::sys::abi::PrctlMmMap;
use crate::kernel::sys::uffd::Userfaultfd;
use crate::ranges::RangeSet;

const PAGE: u64 = 4096;
pub use crate::kernel::ptrace::inject::{put_str, SCRATCH_LEN};

/// Lowest address mmap accepts (vm.mmap_min_addr's usual value).
const MIN_ADDR: u64 = 0x10000;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Checks, before anything is created, that every file the image maps is still there with
/// the size it had.
pub fn validate_mapped(vmas: &[pb::Vma]) -> Result<()> {
    for v in vmas {
        if v.flags & libc::MAP_ANONYMOUS as u32 != 0 || vma::is_special(v.kind) || v.file_id != 0 {
            continue;
        }
        let meta = std::fs::metadata(&v.path)
            .with_context(|| format!("mapped file {} (at {:#x}) is gone", v.path, v.start))?;
        if meta.size() != v.file_size {
            bail!(
                "mapped file {} changed size since the dump ({} bytes then, {} now)",
                v.path,
                v.file_size,
                meta.size()
            );
        }
    }
    Ok(())
}

/// Finds `len` bytes (plus a guard page on each side) that no VMA of the image uses.
pub fn find_gap(vmas: &[pb::Vma], len: u64) -> Result<u64> {
    let mut sorted: Vec<(u64, u64)> = vmas
        .iter()
        .filter(|v| v.end <= TASK_SIZE)
        .map(|v| (v.start, v.end))
        .collect();
    sorted.sort();
    let mut prev_end = MIN_ADDR;
    for (s, e) in sorted
        .iter()
        .copied()
        .chain(std::iter::once((TASK_SIZE, TASK_SIZE)))
    {
        if s >= prev_end + len + 2 * PAGE {
            // Take the top of the gap: far from the heap's growth area below it.
            return Ok(s - PAGE - len);
        }
        prev_end = prev_end.max(e);
    }
    bail!("no free address range of {len} bytes in the image's address space")
}

/// Unmaps everything the task inherited from cr except the kernel-provided mappings, and closes
/// every inherited fd.
pub fn clear_inherited(r: &mut Remote, pid: i32) -> Result<()> {
    r.syscall(
        "close_range(0, ~0)",
        libc::SYS_close_range,
        &[0, u32::MAX as u64, 0],
    )?;
    // The child inherited cr's rseq registration (it lives in the TLS of cr's thread). Once
    // that memory is gone, every return to user mode would fault updating it: unregister first.
    let rs = r.t.rseq()?;
    if rs.rseq_abi_pointer != 0 {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        r.syscall(
            "rseq(unregister cr's)",
            libc::SYS_rseq,
            &[
                rs.rseq_abi_pointer,
                rs.rseq_abi_size as u64,
                RSEQ_FLAG_UNREGISTER,
                rs.signature as u64,
            ],
        )?;
    }
    let current = read_maps(pid)?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for v in &current {
        if matches!(
            v.name,
            VmaName::Vdso
                | VmaName::Vvar
                | VmaName::VvarVclock
                | VmaName::Vsyscall
                | VmaName::Uprobes
        ) {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.1 == v.start => last.1 = v.end,
            _ => ranges.push((v.start, v.end)),
        }
    }
    for (s, e) in ranges {
        log::trace!("unmapping inherited {s:#x}-{e:#x}");
        r.syscall("munmap(inherited)", libc::SYS_munmap, &[s, e - s])?;
    }
    Ok(())
}

/// Moves the fresh vDSO and vvar pages to the addresses they had at dump time; returns how far
/// the vDSO moved (to adjust the syscall instruction pointer).
pub fn move_vdso(r: &mut Remote, pid: i32, image: &[pb::Vma]) -> Result<i64> {
    let current = read_maps(pid)?;
    let find_cur = |name: &VmaName| {
        current
            .iter()
            .find(|v| &v.name == name)
            .map(|v| (v.start, v.end))
    };
    let parts = [
        (VmaName::Vvar, vma::KIND_VVAR),
        (VmaName::VvarVclock, vma::KIND_VVAR_VCLOCK),
        (VmaName::Vdso, vma::KIND_VDSO),
    ];
    let mut moves = Vec::new();
    for (name, kind) in &parts {
        let cur = find_cur(name);
        let img = image
            .iter()
            .find(|v| v.kind == *kind)
            .map(|v| (v.start, v.end));
        match (cur, img) {
            (Some(c), Some(i)) => {
                if c.1 - c.0 != i.1 - i.0 {
                    bail!(
                        "the {name:?} of this kernel is {} bytes, the dumped one {}: images restore only on the kernel they were dumped on",
                        c.1 - c.0,
                        i.1 - i.0
                    );
                }
                moves.push((c, i.0, kind));
            }
            (Some(c), None) => {
                r.syscall("munmap(vdso part)", libc::SYS_munmap, &[c.0, c.1 - c.0])?;
            }
            (None, Some(_)) => {
                bail!("the image has a {name:?} mapping but this kernel provides none")
            }
            (None, None) => {}
        }
    }
    let vdso_delta = moves
        .iter()
        .find(|m| *m.2 == vma::KIND_VDSO)
        .map(|m| m.1 as i64 - m.0 .0 as i64)
        .unwrap_or(0);
    if moves.iter().all(|m| m.0 .0 == m.1) {
        return Ok(vdso_delta);
    }
    // If a destination overlaps a current part, move everything out of the way first.
    let overlaps = moves.iter().any(|(_, dst, _)| {
        let len = moves
            .iter()
            .find(|m| m.1 == *dst)
            .map(|m| m.0 .1 - m.0 .0)
            .unwrap_or(0);
        moves.iter().any(|(c, _, _)| *dst < c.1 && c.0 < dst + len)
    });
    let mut cur: Vec<(u64, u64)> = moves.iter().map(|m| m.0).collect();
    if overlaps {
        let total: u64 = cur.iter().map(|c| c.1 - c.0).sum();
        let mut tmp = find_gap(image, total + 16 * PAGE)?;
        for c in cur.iter_mut() {
            let len = c.1 - c.0;
            r.syscall(
                "mremap(vdso to temp)",
                libc::SYS_mremap,
                &[
                    c.0,
                    len,
                    len,
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    tmp,
                ],
            )?;
            *c = (tmp, tmp + len);
            tmp += len;
        }
    }
    for (c, (_, dst, _)) in cur.iter().zip(&moves) {
        if c.0 == *dst {
            continue;
        }
        let len = c.1 - c.0;
        r.syscall(
            "mremap(vdso)",
            libc::SYS_mremap,
            &[
                c.0,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                *dst,
            ],
        )?;
    }
    Ok(vdso_delta)
}

fn madvise(r: &mut Remote, v: &pb::Vma) -> Result<()> {
    let len = v.end - v.start;
    for (_, bit, advice) in super::MADVISE {
        if v.madv & bit != 0 {
            r.syscall("madvise", libc::SYS_madvise, &[v.start, len, advice as u64])?;
        }
    }
    Ok(())
}

/// Maps every VMA of the image at its address, with its final protection, name and advice.
pub fn map_vmas(r: &mut Remote, scratch: u64, vmas: &[pb::Vma]) -> Result<()> {
    map_vmas_linked(r, scratch, vmas, &HashMap::new(), &HashMap::new())
}

/// [`map_vmas`], where the VMAs in `links` (by start address) map shared anonymous memory that
/// an earlier VMA of the tree already maps: they map that very object, opened through
/// /proc/OWNER/map_files, so the memory stays shared (see [`super::shmem::ShmemOwners`]);
/// and the file VMAs in `paths` (by start address: memfds, unlinked files) map the file
/// opened at that path (cr's recreated file) instead of their own path.
pub fn map_vmas_linked(
    r: &mut Remote,
    scratch: u64,
    vmas: &[pb::Vma],
    links: &HashMap<u64, ShmemLink>,
    paths: &HashMap<u64, String>,
) -> Result<()> {
    for v in vmas {
        if let Some(l) = links.get(&v.start) {
            map_linked(r, scratch, v, l)?;
            continue;
        }
        if vma::is_special(v.kind) {
            continue;
        }
        let len = v.end - v.start;
        let file_backed = v.flags & libc::MAP_ANONYMOUS as u32 == 0;
        let mut flags = (v.flags as i32
            & (libc::MAP_SHARED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN))
            | libc::MAP_FIXED_NOREPLACE;
        let what = if file_backed {
            v.path.as_str()
        } else {
            "anonymous memory"
        };
        let got = if file_backed {
            let open_path = paths.get(&v.start).unwrap_or(&v.path);
            let path = put_str(r, scratch, 0, open_path)?;
            let shared_writable =
                v.flags & libc::MAP_SHARED as u32 != 0 && v.prot & libc::PROT_WRITE as u32 != 0;
            let oflags = if shared_writable {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            } | libc::O_CLOEXEC;
            let fd = r
                .syscall(
                    "openat(mapped file)",
                    libc::SYS_openat,
                    &[libc::AT_FDCWD as u64, path, oflags as u64, 0],
                )
                .with_context(|| format!("open {} to map it at {:#x}", v.path, v.start))?;
            let m = r.syscall(
                "mmap(file)",
                libc::SYS_mmap,
                &[v.start, len, v.prot as u64, flags as u64, fd, v.pgoff],
            );
            r.syscall("close", libc::SYS_close, &[fd])?;
            m
        } else {
            flags |= libc::MAP_ANONYMOUS;
            r.syscall(
                "mmap(anon)",
                libc::SYS_mmap,
                &[v.start, len, v.prot as u64, flags as u64, u64::MAX, 0],
            )
        }
        .with_context(|| format!("map {what} at {:#x}-{:#x}", v.start, v.end))?;
        if got != v.start {
            bail!("mapping {what} landed at {got:#x}, not {:#x}", v.start);
        }
        // [heap] and [stack] are names the kernel gives, not anonymous names one can set.
        let anon_named = !file_backed && v.kind != vma::KIND_HEAP && v.kind != vma::KIND_STACK;
        finish_vma(r, scratch, v, anon_named)?;
    }
    Ok(())
}

/// What a VMA gets once it is mapped, however it was mapped: its anonymous name (`[anon:NAME]`,
/// when the caller says it carries one: not for files, heap or stack), its madvise flags, its
/// mlock. One place, so that a VMA mapped from a linked shared object ends up like any other.
fn finish_vma(r: &mut Remote, scratch: u64, v: &pb::Vma, anon_named: bool) -> Result<()> {
    let len = v.end - v.start;
    if anon_named && !v.name.is_empty() {
        let name = put_str(r, scratch, 0, &v.name)?;
        r.syscall(
            "prctl(PR_SET_VMA_ANON_NAME)",
            libc::SYS_prctl,
            &[
                libc::PR_SET_VMA as u64,
                libc::PR_SET_VMA_ANON_NAME as u64,
                v.start,
                len,
                name,
            ],
        )?;
    }
    madvise(r, v)?;
    if v.locked {
        r.syscall("mlock", libc::SYS_mlock, &[v.start, len])?;
    }
    Ok(())
}

/// Maps `v` from the shared anonymous object of an earlier VMA (see [`map_vmas_linked`]).
fn map_linked(r: &mut Remote, scratch: u64, v: &pb::Vma, l: &ShmemLink) -> Result<()> {
    let len = v.end - v.start;
    let path = l.path();
    let p = put_str(r, scratch, 0, &path)?;
    // Read-write whatever the protection: a later mprotect may need write access.
    let fd = r
        .syscall(
            "openat(map_files)",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                p,
                (libc::O_RDWR | libc::O_CLOEXEC) as u64,
                0,
            ],
        )
        .with_context(|| format!("open {path} to share it at {:#x}", v.start))?;
    let flags = libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE;
    let m = r.syscall(
        "mmap(shared anon)",
        libc::SYS_mmap,
        &[v.start, len, v.prot as u64, flags as u64, fd, l.offset],
    );
    r.syscall("close", libc::SYS_close, &[fd])?;
    let got = m.with_context(|| {
        format!(
            "map the shared memory of {path} at {:#x}-{:#x}",
            v.start, v.end
        )
    })?;
    if got != v.start {
        bail!(
            "shared memory of {path} landed at {got:#x}, not {:#x}",
            v.start
        );
    }
    finish_vma(r, scratch, v, true)?;
    log::debug!(
        "{:#x}-{:#x} shares {path} (offset {:#x})",
        v.start,
        v.end,
        l.offset
    );
    Ok(())
}

/// Whether UFFDIO_COPY can fill this VMA: userfaultfd's missing mode covers anonymous and shmem
/// memory, not file-backed private mappings.
fn uffd_fillable(v: &pb::Vma) -> bool {
    v.flags & libc::MAP_ANONYMOUS as u32 != 0 && !vma::is_special(v.kind)
}

/// A userfaultfd of the task being restored, created inside it and taken into cr (the task's
/// own copy is closed again).
fn task_uffd(r: &mut Remote, pid: i32) -> Result<Userfaultfd> {
    let fd = r.syscall(
        "userfaultfd",
        libc::SYS_userfaultfd,
        &[libc::O_CLOEXEC as u64],
    )?;
    let pidfd = crate::kernel::sys::pidfd::pidfd_open(pid)?;
    let mine = crate::kernel::sys::pidfd::pidfd_getfd(&pidfd, fd as i32);
    r.syscall("close(userfaultfd)", libc::SYS_close, &[fd])?;
    let uffd = Userfaultfd::from_fd(mine?);
    uffd.handshake(0)?;
    Ok(uffd)
}

/// Writes the saved pages into the mapped VMAs. Anonymous and shmem memory is filled with
/// UFFDIO_COPY (the kernel allocates each page already holding its data: no zeroing, no fault
/// per page); file-backed private memory (relocated data of libraries) with process_vm_writev,
/// or /proc/PID/mem where it is read-only.
pub fn fill_pages(
    r: &mut Remote,
    pid: i32,
    vmas: &[pb::Vma],
    segments: &[PageSegment],
    progress: &crate::progress::Progress,
) -> Result<()> {
    let mut sorted: Vec<&pb::Vma> = vmas.iter().collect();
    sorted.sort_by_key(|v| v.start);
    let mut batch: Vec<(u64, &[u8])> = Vec::new();
    let mut copies: Vec<(u64, &[u8])> = Vec::new();
    for seg in segments {
        let bytes = seg.bytes();
        if bytes.len() as u64 != seg.len() {
            bail!(
                "page segment at {:#x} is outside its page file {}",
                seg.vaddr,
                seg.file.path().display()
            );
        }
        // Split the segment at VMA boundaries: each VMA decides how its piece is written.
        let mut addr = seg.vaddr;
        let end = seg.vaddr + seg.len();
        while addr < end {
            let i = sorted.partition_point(|v| v.end <= addr);
            let v = sorted.get(i).filter(|v| v.start <= addr).with_context(|| {
                format!("saved page at {addr:#x} is outside every VMA of the image")
            })?;
            let piece_end = end.min(v.end);
            let data = &bytes[(addr - seg.vaddr) as usize..(piece_end - seg.vaddr) as usize];
            if uffd_fillable(v) {
                copies.push((addr, data));
            } else if v.prot & libc::PROT_WRITE as u32 != 0 {
                batch.push((addr, data));
            } else {
                crate::kernel::ptrace::inject::write_mem(pid, addr, data)
                    .with_context(|| format!("fill read-only memory at {addr:#x}"))?;
                progress.add(data.len() as u64);
            }
            addr = piece_end;
        }
    }
    if !copies.is_empty() {
        let uffd = task_uffd(r, pid)?;
        let targets: Vec<&pb::Vma> = sorted
            .iter()
            .copied()
            .filter(|v| uffd_fillable(v))
            .collect();
        for v in &targets {
            uffd.register_missing(v.start, v.end - v.start)?;
        }
        let filled = copies.iter().try_for_each(|(addr, data)| {
            uffd.copy(*addr, data)?;
            progress.add(data.len() as u64);
            Ok::<_, anyhow::Error>(())
        });
        for v in &targets {
            uffd.unregister(v.start, v.end - v.start)?;
        }
        filled?;
    }
    // In pieces of PROGRESS_STEP bytes, so that the progress line moves.
    const PROGRESS_STEP: usize = 64 << 20;
    let mut from = 0;
    while from < batch.len() {
        let (mut to, mut bytes) = (from, 0);
        while to < batch.len() && (to == from || bytes < PROGRESS_STEP) {
            bytes += batch[to].1.len();
            to += 1;
        }
        crate::kernel::sys::vm::process_vm_writev_slices(pid, &batch[from..to])?;
        progress.add(bytes as u64);
        from = to;
    }
    Ok(())
}

/// The page segments without the parts inside `ranges` (memory shared with an earlier VMA,
/// whose pages that VMA's owner restores).
pub fn without_ranges(segments: &[PageSegment], ranges: &[(u64, u64)]) -> Vec<PageSegment> {
    if ranges.is_empty() {
        return segments.to_vec();
    }
    let skip = RangeSet::from_ranges(ranges.to_vec());
    let mut out = Vec::with_capacity(segments.len());
    for seg in segments {
        let whole = RangeSet::from_ranges(vec![(seg.vaddr, seg.vaddr + seg.len())]);
        for &(a, b) in whole.intersect(&skip).ranges() {
            log::debug!("saved pages {a:#x}-{b:#x} belong to shared memory restored elsewhere");
        }
        for &(a, b) in whole.subtract(&skip).ranges() {
            let mut p = seg.clone();
            p.offset = seg.offset + (a - seg.vaddr);
            p.vaddr = a;
            p.nr_pages = (b - a) / 4096;
            out.push(p);
        }
    }
    out
}

/// Sets the mm fields (code/data/brk/stack/args/env, auxv, exe) with PR_SET_MM_MAP.
pub fn set_mm(r: &mut Remote, scratch: u64, mm: &pb::Mm) -> Result<()> {
    let path = put_str(r, scratch, 0, &mm.exe_path)?;
    let exe_fd = r
        .syscall(
            "openat(exe)",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                path,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
            ],
        )
        .with_context(|| format!("open the executable {}", mm.exe_path))?;
    let auxv_addr = scratch + 4096;
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if auxv.len() > 4096 {
        bail!("auxv of {} bytes is too long", auxv.len());
    }
    r.write_mem(auxv_addr, &auxv)?;
    let map = PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk,
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: auxv_addr,
        auxv_size: auxv.len() as u32,
        exe_fd: exe_fd as u32,
    };
    let map_addr = scratch + 8192;
    let bytes = map.as_bytes();
    r.write_mem(map_addr, bytes)?;
    let res = r.syscall(
        "prctl(PR_SET_MM, PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            libc::PR_SET_MM as u64,
            libc::PR_SET_MM_MAP as u64,
            map_addr,
            bytes.len() as u64,
            0,
        ],
    );
    r.syscall("close(exe)", libc::SYS_close, &[exe_fd])?;
    res.with_context(|| {
        format!(
            "set the mm fields (brk {:#x}-{:#x}, exe {})",
            mm.start_brk, mm.brk, mm.exe_path
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(start: u64, end: u64) -> pb::Vma {
        pb::Vma {
            start,
            end,
            ..Default::default()
        }
    }

    #[test]
    fn gap_avoids_every_vma_with_guards() {
        let vmas = vec![v(0x10000, 0x20000), v(0x23000, 0x40000)];
        let g = find_gap(&vmas, 0x1000).unwrap();
        assert_eq!(g, 0x21000);
        let g = find_gap(&vmas, 0x10000).unwrap();
        assert!(g >= 0x40000 + PAGE);
    }
}
