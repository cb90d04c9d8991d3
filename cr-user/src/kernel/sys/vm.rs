//! Copying memory to and from another process.
//!
//! `process_vm_readv`/`process_vm_writev` are the fast path: no ptrace stop needed, many ranges
//! per syscall. They obey the target's page protections (a PROT_NONE or read-only page gives
//! EFAULT). `/proc/PID/mem` goes through FOLL_FORCE, so it can read PROT_NONE-less-readable
//! pages and write read-only mappings (text, RELRO) — what restore needs after setting final
//! protections, and what a debugger's breakpoint writes use.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};

/// Most iovecs one process_vm_* call accepts (UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// A remote range that could not be transferred (EFAULT): not mapped, or its protection
/// forbids the access. Returned inside the `anyhow::Error`; `downcast_ref::<RemoteFault>()`
/// to react to it (e.g. skip a VMA that vanished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFault {
    /// "process_vm_readv" or "process_vm_writev".
    pub op: &'static str,
    pub pid: i32,
    /// First address that failed.
    pub addr: u64,
    /// Index, start and length of the caller's range containing `addr`.
    pub range_index: usize,
    pub range_start: u64,
    pub range_len: usize,
    /// Bytes transferred before the fault (over all ranges).
    pub done: usize,
}

impl fmt::Display for RemoteFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pid {}: address {:#x} is not accessible (EFAULT) in range #{} {:#x}..{:#x}, after {} bytes",
            self.op,
            self.pid,
            self.addr,
            self.range_index,
            self.range_start,
            self.range_start + self.range_len as u64,
            self.done
        )
    }
}

impl std::error::Error for RemoteFault {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Read => "process_vm_readv",
            Dir::Write => "process_vm_writev",
        }
    }
}

/// One paired piece: `len` bytes at `remote` in the target ↔ at `local` here.
#[derive(Clone, Copy)]
struct Seg {
    remote: u64,
    local: *mut u8,
    len: usize,
}

/// One process_vm_{readv,writev} call.
///
/// Callers guarantee every `seg.local..+len` is valid memory of this process for the direction
/// (writable for Read) and not aliased by a live Rust reference for the call's duration.
fn raw_call(pid: i32, dir: Dir, segs: &[Seg]) -> std::io::Result<usize> {
    let local: Vec<libc::iovec> = segs
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.local.cast(),
            iov_len: s.len,
        })
        .collect();
    let remote: Vec<libc::iovec> = segs
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.remote as usize as *mut libc::c_void,
            iov_len: s.len,
        })
        .collect();
    // The two calls take the same arguments; only the direction differs.
    let call = match dir {
        Dir::Read => libc::process_vm_readv,
        Dir::Write => libc::process_vm_writev,
    };
    // SAFETY: the iovec arrays live across the call and hold at most IOV_MAX entries (callers
    // chunk); local iovecs point at memory the caller guarantees valid (see above); remote
    // iovecs are only addresses in the other process, which the kernel checks.
    let r = unsafe {
        call(
            pid,
            local.as_ptr(),
            local.len() as libc::c_ulong,
            remote.as_ptr(),
            remote.len() as libc::c_ulong,
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Transfers all of `segs` (each tagged with the caller's range index), in IOV_MAX chunks,
/// resuming after partial transfers. A fault is reported as [`RemoteFault`].
fn transfer(pid: i32, dir: Dir, segs: &[(usize, Seg)], ranges: &[(u64, usize)]) -> Result<()> {
    let mut i = 0; // current segment
    let mut off = 0; // bytes of segs[i] already done
    let mut done = 0;
    while i < segs.len() {
        if off == segs[i].1.len {
            i += 1;
            off = 0;
            continue;
        }
        let mut chunk: Vec<Seg> = Vec::with_capacity(IOV_MAX.min(segs.len() - i));
        let first = segs[i].1;
        chunk.push(Seg {
            remote: first.remote + off as u64,
            // SAFETY: off < first.len, so this stays inside the caller's buffer.
            local: unsafe { first.local.add(off) },
            len: first.len - off,
        });
        chunk.extend(
            segs[i + 1..]
                .iter()
                .map(|(_, s)| *s)
                .filter(|s| s.len > 0)
                .take(IOV_MAX - 1),
        );
        let fault = |addr: u64| {
            let idx = segs[i].0;
            let (rs, rl) = ranges[idx];
            anyhow::Error::new(RemoteFault {
                op: dir.name(),
                pid,
                addr,
                range_index: idx,
                range_start: rs,
                range_len: rl,
                done,
            })
        };
        let n = match raw_call(pid, dir, &chunk) {
            Ok(0) => return Err(fault(chunk[0].remote)),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => return Err(fault(chunk[0].remote)),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{} pid {pid}: {} iovecs from {:#x}",
                        dir.name(),
                        chunk.len(),
                        chunk[0].remote
                    )
                })
            }
        };
        done += n;
        // Advance (i, off) by n bytes.
        let mut left = n;
        while left > 0 && i < segs.len() {
            let room = segs[i].1.len - off;
            if left < room {
                off += left;
                left = 0;
            } else {
                left -= room;
                i += 1;
                off = 0;
            }
        }
    }
    Ok(())
}

fn check_total(ranges: &[(u64, usize)], local_len: usize, op: &str, pid: i32) -> Result<()> {
    let total = ranges
        .iter()
        .try_fold(0usize, |a, (_, l)| a.checked_add(*l))
        .with_context(|| format!("{op} pid {pid}: range lengths overflow"))?;
    if total != local_len {
        bail!("{op} pid {pid}: ranges total {total} bytes but the local buffer has {local_len}");
    }
    Ok(())
}

/// One process_vm_* call for one segment (nothing for an empty one), its error naming the
/// range: the single-range forms below differ only in direction.
fn transfer_one(pid: i32, dir: Dir, seg: Seg) -> Result<usize> {
    if seg.len == 0 {
        return Ok(0);
    }
    raw_call(pid, dir, &[seg])
        .with_context(|| format!("{} pid {pid}: {:#x}+{:#x}", dir.name(), seg.remote, seg.len))
}

/// One process_vm_readv of `local.len()` bytes at `remote_addr`. Returns the bytes read, which
/// is short only when the range runs into an inaccessible page (EFAULT at the very start is an
/// error).
pub fn process_vm_readv(pid: i32, local: &mut [u8], remote_addr: u64) -> Result<usize> {
    let seg = Seg {
        remote: remote_addr,
        local: local.as_mut_ptr(),
        len: local.len(),
    };
    transfer_one(pid, Dir::Read, seg)
}

/// One process_vm_writev of `local` to `remote_addr`. Returns the bytes written (short only at
/// an inaccessible page).
pub fn process_vm_writev(pid: i32, local: &[u8], remote_addr: u64) -> Result<usize> {
    // The kernel only reads local memory for writev; the *mut is what iovec wants.
    let seg = Seg {
        remote: remote_addr,
        local: local.as_ptr().cast_mut(),
        len: local.len(),
    };
    transfer_one(pid, Dir::Write, seg)
}

/// Transfers one contiguous local buffer (`base`, `local_len` bytes) from or to many remote
/// `(addr, len)` ranges, back to back: what both `*_ranges` forms do, in their direction.
/// Ranges whose lengths do not add up to the buffer's are refused before any syscall, which is
/// what keeps every segment inside the buffer.
fn transfer_contiguous(
    pid: i32,
    dir: Dir,
    ranges: &[(u64, usize)],
    base: *mut u8,
    local_len: usize,
) -> Result<()> {
    check_total(ranges, local_len, dir.name(), pid)?;
    let mut at = 0usize;
    let segs: Vec<(usize, Seg)> = ranges
        .iter()
        .enumerate()
        .map(|(i, &(remote, len))| {
            // SAFETY: at + len <= local_len (checked by check_total above), so the pointer
            // stays inside the caller's buffer.
            let s = Seg {
                remote,
                local: unsafe { base.add(at) },
                len,
            };
            at += len;
            (i, s)
        })
        .collect();
    transfer(pid, dir, &segs, ranges)
}

/// Reads many remote `(addr, len)` ranges into one contiguous local buffer, back to back
/// (`local.len()` must equal the sum of the lengths). Batches IOV_MAX ranges per syscall and
/// resumes after partial transfers; an inaccessible range fails with a [`RemoteFault`]
/// naming it.
pub fn process_vm_readv_ranges(pid: i32, ranges: &[(u64, usize)], local: &mut [u8]) -> Result<()> {
    transfer_contiguous(pid, Dir::Read, ranges, local.as_mut_ptr(), local.len())
}

/// Writes one contiguous local buffer to many remote `(addr, len)` ranges, back to back.
/// Same batching and fault reporting as [`process_vm_readv_ranges`].
pub fn process_vm_writev_ranges(pid: i32, local: &[u8], ranges: &[(u64, usize)]) -> Result<()> {
    // writev only reads the local buffer; the *mut is what iovec wants.
    transfer_contiguous(
        pid,
        Dir::Write,
        ranges,
        local.as_ptr().cast_mut(),
        local.len(),
    )
}

/// Writes separate local slices to their remote addresses: `(remote_addr, bytes)` pairs.
pub fn process_vm_writev_slices(pid: i32, pieces: &[(u64, &[u8])]) -> Result<()> {
    let ranges: Vec<(u64, usize)> = pieces.iter().map(|(a, b)| (*a, b.len())).collect();
    let segs: Vec<(usize, Seg)> = pieces
        .iter()
        .enumerate()
        .map(|(i, (remote, b))| {
            (
                i,
                Seg {
                    remote: *remote,
                    local: b.as_ptr().cast_mut(),
                    len: b.len(),
                },
            )
        })
        .collect();
    transfer(pid, Dir::Write, &segs, &ranges)
}

/// `/proc/PID/mem`, opened once for many accesses. Access goes through FOLL_FORCE: it reads
/// and writes regardless of the target's page protections (but not unmapped or VM_IO/PFNMAP
/// areas, which give EIO). Opening needs PTRACE_MODE_ATTACH over the target.
pub struct MemFile {
    file: File,
    pid: i32,
}

impl MemFile {
    pub fn open(pid: i32, writable: bool) -> Result<MemFile> {
        let path = format!("/proc/{pid}/mem");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .with_context(|| {
                format!("open {path}{}", if writable { " for writing" } else { "" })
            })?;
        Ok(MemFile { file, pid })
    }

    /// Reads exactly `buf.len()` bytes at `addr`.
    pub fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, addr).with_context(|| {
            format!(
                "read /proc/{}/mem at {:#x}+{:#x}",
                self.pid,
                addr,
                buf.len()
            )
        })
    }

    /// Writes all of `buf` at `addr`.
    pub fn write_at(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.file.write_all_at(buf, addr).with_context(|| {
            format!(
                "write /proc/{}/mem at {:#x}+{:#x}",
                self.pid,
                addr,
                buf.len()
            )
        })
    }
}

/// Reads exactly `buf.len()` bytes at `addr` through `/proc/PID/mem` (see [`MemFile`]).
pub fn read_mem_file(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    MemFile::open(pid, false)?.read_at(addr, buf)
}

/// Writes `buf` at `addr` through `/proc/PID/mem`; works on read-only mappings.
pub fn write_mem_file(pid: i32, addr: u64, buf: &[u8]) -> Result<()> {
    MemFile::open(pid, true)?.write_at(addr, buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// A forked copy of this test process: same layout, its own copy-on-write memory. Fork in a
    /// multi-threaded test binary is fine as long as the child only makes raw syscalls: it
    /// closes every inherited fd (so other tests' pipes still see EOF) and pauses until killed.
    /// A forked copy of the test process (same memory), paused until dropped (killed and
    /// reaped): a real other process to read from and write to. Shared by the unit tests of
    /// the modules built on process_vm_*.
    pub(crate) struct Forked {
        pub(crate) pid: i32,
    }

    impl Forked {
        pub(crate) fn new() -> Forked {
            // SAFETY: the child only calls async-signal-safe functions (close_range, pause).
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: raw syscalls only; the child never returns into Rust code.
                unsafe { libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) };
                loop {
                    // SAFETY: pause is async-signal-safe.
                    unsafe { libc::pause() };
                }
            }
            Forked { pid }
        }
    }

    impl Drop for Forked {
        fn drop(&mut self) {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }

    fn map(pages: usize, prot: i32) -> u64 {
        // SAFETY: fresh anonymous mapping; we never create Rust references into it except
        // through slices built in the tests while it is mapped.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    fn unmap(addr: u64, pages: usize) {
        // SAFETY: unmapping a mapping made by `map`.
        unsafe { libc::munmap(addr as *mut libc::c_void, pages * PAGE) };
    }

    fn fill(addr: u64, pages: usize) {
        for p in 0..pages {
            let a = addr as usize + p * PAGE;
            // SAFETY: the page is mapped read/write by `map`.
            unsafe { std::ptr::write_bytes(a as *mut u8, (p as u8).wrapping_add(1), PAGE) };
        }
    }

    /// Many ranges (more than IOV_MAX) in one call, read from a forked child.
    #[test]
    fn readv_ranges_many_iovecs_from_child() {
        let pages = 3000;
        let addr = map(pages, libc::PROT_READ | libc::PROT_WRITE);
        fill(addr, pages);
        let child = Forked::new();
        // Parent changes its copy; the child keeps the original.
        // SAFETY: page 0 is mapped read/write.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0xee, PAGE) };

        // Half of each page, every page: 3000 ranges → 3 syscalls at least.
        let ranges: Vec<(u64, usize)> = (0..pages)
            .map(|p| (addr + (p * PAGE) as u64 + 100, PAGE / 2))
            .collect();
        let mut buf = vec![0u8; pages * PAGE / 2];
        process_vm_readv_ranges(child.pid, &ranges, &mut buf).unwrap();
        for p in 0..pages {
            let want = (p as u8).wrapping_add(1);
            assert!(
                buf[p * PAGE / 2..(p + 1) * PAGE / 2]
                    .iter()
                    .all(|b| *b == want),
                "page {p}"
            );
        }
        unmap(addr, pages);
    }

    /// Writes land in the child only, and a fault names the bad range.
    #[test]
    fn writev_and_faults() {
        let pages = 8;
        let addr = map(pages, libc::PROT_READ | libc::PROT_WRITE);
        fill(addr, pages);
        // A hole: page 5 is unmapped in both processes.
        // SAFETY: unmapping one page of our own mapping.
        unsafe { libc::munmap((addr + 5 * PAGE as u64) as *mut libc::c_void, PAGE) };
        let child = Forked::new();

        let data: Vec<u8> = (0..2 * PAGE).map(|i| (i % 251) as u8).collect();
        process_vm_writev_ranges(
            child.pid,
            &data,
            &[(addr + 10, PAGE), (addr + 3 * PAGE as u64, PAGE)],
        )
        .unwrap();
        process_vm_writev_slices(child.pid, &[(addr + 7 * PAGE as u64, &b"slice"[..])]).unwrap();
        let mut back = vec![0u8; 2 * PAGE + 5];
        process_vm_readv_ranges(
            child.pid,
            &[
                (addr + 10, PAGE),
                (addr + 3 * PAGE as u64, PAGE),
                (addr + 7 * PAGE as u64, 5),
            ],
            &mut back,
        )
        .unwrap();
        assert_eq!(&back[..2 * PAGE], &data[..]);
        assert_eq!(&back[2 * PAGE..], b"slice");
        // Our own copy is untouched.
        // SAFETY: page 0 is mapped and readable.
        assert_eq!(unsafe { *((addr + 10) as *const u8) }, 1);

        // A range crossing into the hole: the first part transfers, then a RemoteFault.
        let hole = addr + 5 * PAGE as u64;
        let ranges = [
            (addr, PAGE),
            (hole - 100, 200),
            (addr + 6 * PAGE as u64, 16),
        ];
        let mut buf = vec![0u8; PAGE + 216];
        let err = process_vm_readv_ranges(child.pid, &ranges, &mut buf).unwrap_err();
        let f = err.downcast_ref::<RemoteFault>().expect("RemoteFault");
        assert_eq!(
            (f.addr, f.range_index, f.range_start, f.done),
            (hole, 1, hole - 100, PAGE + 100)
        );
        assert!(err.to_string().contains("range #1"), "{err}");

        // Single-range form returns a short count at the hole.
        let mut one = vec![0u8; 200];
        assert_eq!(
            process_vm_readv(child.pid, &mut one, hole - 100).unwrap(),
            100
        );
        assert!(process_vm_readv(child.pid, &mut one, hole).is_err());
        assert_eq!(process_vm_writev(child.pid, &one[..10], addr).unwrap(), 10);

        // Length mismatch is refused before any syscall.
        assert!(process_vm_readv_ranges(child.pid, &[(addr, 10)], &mut [0u8; 9]).is_err());
        unmap(addr, pages);
    }

    /// /proc/PID/mem writes a read-only page that process_vm_writev cannot.
    #[test]
    fn mem_file_writes_read_only_pages() {
        let addr = map(1, libc::PROT_READ | libc::PROT_WRITE);
        fill(addr, 1);
        // SAFETY: changing protection of our own page.
        unsafe { libc::mprotect(addr as *mut libc::c_void, PAGE, libc::PROT_READ) };
        let child = Forked::new();
        let err = process_vm_writev_ranges(child.pid, b"nope", &[(addr, 4)]).unwrap_err();
        assert!(err.downcast_ref::<RemoteFault>().is_some(), "{err:#}");

        write_mem_file(child.pid, addr + 8, b"forced").unwrap();
        let mut b = [0u8; 6];
        read_mem_file(child.pid, addr + 8, &mut b).unwrap();
        assert_eq!(&b, b"forced");
        let m = MemFile::open(child.pid, false).unwrap();
        let mut c = [0u8; 2];
        m.read_at(addr, &mut c).unwrap();
        assert_eq!(c, [1, 1]);
        let err = m.read_at(8, &mut c).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("read /proc/{}/mem at 0x8+0x2", child.pid)),
            "{err:#}"
        );
        unmap(addr, 1);
    }
}
