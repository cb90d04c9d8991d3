//! Workload: memfds and mappings of unlinked files (tests/tests/restore_memfd.rs).
//!
//! Usage: `wl_memfd DIR` (DIR an empty scratch directory).
//!
//! - fd 10: memfd "cr test: sealed", 10000 bytes of pattern, offset 1234, close-on-exec,
//!   sealed F_SEAL_SHRINK | F_SEAL_GROW: writes inside work, truncation is refused.
//! - fd 11: memfd "write-sealed", F_SEAL_WRITE | F_SEAL_SEAL: writes and new seals refused.
//! - fd 12: memfd "noexec" made with MFD_NOEXEC_SEAL: F_SEAL_EXEC and mode 0666, chmod +x
//!   refused.
//! - fd 13: memfd "mapped", 2 pages, mapped MAP_SHARED (M1) and MAP_PRIVATE (M2); M1 written
//!   (the file shows it), M2's page 0 written (copied on write), M2's page 1 only read: it
//!   must still follow the file.
//! - memfd "map-only": 1 page mapped MAP_SHARED, its fd closed: the mapping alone holds it.
//! - fd 14: memfd "sparse", 64 MiB with data in pages 0 and 8192 only: holes stay holes.
//! - fd 15: DIR/gone-shared, 3 pages, mapped MAP_SHARED, then unlinked: fd and mapping are one
//!   inode.
//! - DIR/gone-private, 2 pages, mapped MAP_PRIVATE read-only, fd closed, unlinked (a deleted
//!   library's mapping).
//!
//! After the restore each checks its name, size, content, seals, offsets, flags, holes, and
//! that each shared mapping is still the file (a write through it shows through the fd or
//! /proc/self/map_files, and back).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use cr_tests::workload::{ready, wait_for_check, Checker};

const PAGE: usize = 4096;

fn sys(r: i32, what: &str) -> i32 {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn memfd_at(name: &str, flags: u32, at: i32) {
    let n = CString::new(name).unwrap();
    // SAFETY: a valid name; the fd is moved to a reserved number.
    unsafe {
        let fd = sys(libc::memfd_create(n.as_ptr(), flags), "memfd_create");
        sys(
            libc::dup3(
                fd,
                at,
                if flags & libc::MFD_CLOEXEC != 0 {
                    libc::O_CLOEXEC
                } else {
                    0
                },
            ),
            "dup3",
        );
        libc::close(fd);
    }
}

fn pwrite(fd: i32, data: &[u8], off: usize) -> Result<(), i32> {
    // SAFETY: a write from a valid buffer.
    let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), off as i64) };
    if n as usize == data.len() {
        Ok(())
    } else {
        Err(errno())
    }
}

fn pread(fd: i32, len: usize, off: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    // SAFETY: a read into a valid buffer.
    let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), len, off as i64) };
    b.truncate(n.max(0) as usize);
    b
}

fn map(fd: i32, len: usize, prot: i32, flags: i32) -> *mut u8 {
    // SAFETY: a new mapping where the kernel chooses.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

/// `len` bytes at `p`, a mapping of ours.
fn at(p: *mut u8, off: usize, len: usize) -> Vec<u8> {
    // SAFETY: callers pass ranges inside mappings they made and keep.
    unsafe { std::slice::from_raw_parts(p.add(off), len).to_vec() }
}

fn put(p: *mut u8, off: usize, data: &[u8]) {
    // SAFETY: callers pass writable ranges inside mappings they made and keep.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(off), data.len()) };
}

fn link(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn fstat(fd: i32) -> libc::stat {
    // SAFETY: an all-zero stat is valid; fstat fills it.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st);
        st
    }
}

fn seals(fd: i32) -> i32 {
    // SAFETY: F_GET_SEALS on our fd.
    unsafe { libc::fcntl(fd, libc::F_GET_SEALS) }
}

/// The /proc/self/maps line of the mapping at `p`: (path as shown, inode).
fn maps_entry(p: *mut u8) -> Option<(String, u64)> {
    let start = format!("{:x}-", p as usize);
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let l = maps.lines().find(|l| l.starts_with(&start))?;
    let w: Vec<&str> = l.split_whitespace().collect();
    Some((w.get(5..)?.join(" "), w.get(4)?.parse().ok()?))
}

/// An fd on the file mapped at `p`, through /proc/self/map_files (what the mapping maps).
fn map_file(p: *mut u8, len: usize) -> Option<std::fs::File> {
    let a = p as usize;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/map_files/{:x}-{:x}", a, a + len))
        .ok()
}

/// The data ranges of `fd` (SEEK_DATA/SEEK_HOLE), which moves its offset to the last hole.
fn holes(fd: i32) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut off = 0i64;
    loop {
        // SAFETY: lseek with SEEK_DATA on our fd.
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            return out;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        out.push((d, h));
        off = h;
    }
}

struct Maps {
    m1: *mut u8,
    m2: *mut u8,
    only: *mut u8,
    gone_shared: *mut u8,
    gone_private: *mut u8,
}

fn setup(dir: &Path) -> Maps {
    memfd_at(
        "cr test: sealed",
        libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
        10,
    );
    pwrite(10, &pattern(1, 10_000), 0).unwrap();
    // SAFETY: seals and an offset on our fd.
    unsafe {
        sys(
            libc::fcntl(
                10,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            ),
            "F_ADD_SEALS",
        );
        libc::lseek(10, 1234, libc::SEEK_SET);
    }
    memfd_at("write-sealed", libc::MFD_ALLOW_SEALING, 11);
    pwrite(11, &pattern(2, 3 * PAGE), 0).unwrap();
    // SAFETY: seals on our fd.
    unsafe {
        sys(
            libc::fcntl(
                11,
                libc::F_ADD_SEALS,
                libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
            ),
            "F_ADD_SEALS",
        )
    };
    memfd_at("noexec", libc::MFD_NOEXEC_SEAL, 12);
    pwrite(12, b"#!/bin/sh\n", 0).unwrap();
    memfd_at("mapped", 0, 13);
    pwrite(13, &pattern(3, 2 * PAGE), 0).unwrap();
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let m1 = map(13, 2 * PAGE, rw, libc::MAP_SHARED);
    let m2 = map(13, 2 * PAGE, rw, libc::MAP_PRIVATE);
    put(m1, 100, b"through the shared mapping");
    put(m2, 0, b"private page 0");
    // Page 1 of M2 read only: still the page cache's.
    let _ = at(m2, PAGE, 16);
    memfd_at("map-only", 0, 20);
    pwrite(20, &pattern(4, PAGE), 0).unwrap();
    let only = map(20, PAGE, rw, libc::MAP_SHARED);
    // SAFETY: closing our fd: the mapping holds the file.
    unsafe { libc::close(20) };
    memfd_at("sparse", 0, 14);
    // SAFETY: ftruncate of our fd.
    sys(unsafe { libc::ftruncate(14, 64 << 20) }, "ftruncate");
    pwrite(14, &pattern(5, PAGE), 0).unwrap();
    pwrite(14, &pattern(6, PAGE), 8192 * PAGE).unwrap();

    let gs = dir.join("gone-shared");
    std::fs::write(&gs, pattern(7, 3 * PAGE)).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&gs)
        .unwrap();
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: moving our fd to a reserved number.
    unsafe {
        sys(libc::dup2(fd, 15), "dup2");
        libc::close(fd);
    }
    let gone_shared = map(15, 3 * PAGE, rw, libc::MAP_SHARED);
    put(gone_shared, 2 * PAGE, b"written before the unlink");
    std::fs::remove_file(&gs).unwrap();
    let gp = dir.join("gone-private");
    std::fs::write(&gp, pattern(8, 2 * PAGE)).unwrap();
    let f = std::fs::File::open(&gp).unwrap();
    let fd = f.into_raw_fd();
    let gone_private = map(fd, 2 * PAGE, libc::PROT_READ, libc::MAP_PRIVATE);
    // SAFETY: closing our fd: the mapping holds the file.
    unsafe { libc::close(fd) };
    std::fs::remove_file(&gp).unwrap();
    Maps {
        m1,
        m2,
        only,
        gone_shared,
        gone_private,
    }
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: wl_memfd DIR"));
    let m = setup(&dir);
    let holes_before = holes(14);
    let fds = [10, 11, 12, 13, 14, 15];
    let view = |fd: i32| {
        let st = fstat(fd);
        (
            link(fd),
            st.st_size,
            st.st_mode & 0o7777,
            st.st_nlink,
            seals(fd),
            // SAFETY: F_GETFD, F_GETFL and a SEEK_CUR lseek on our fd.
            unsafe {
                (
                    libc::fcntl(fd, libc::F_GETFD),
                    libc::fcntl(fd, libc::F_GETFL),
                    libc::lseek(fd, 0, libc::SEEK_CUR),
                )
            },
        )
    };
    let before: Vec<_> = fds.iter().map(|&f| view(f)).collect();
    let maps_before: Vec<_> = [m.m1, m.m2, m.only, m.gone_shared, m.gone_private]
        .iter()
        .map(|&p| maps_entry(p).map(|e| e.0))
        .collect();
    ready("");
    wait_for_check();

    let mut c = Checker::new();
    for (&fd, b) in fds.iter().zip(&before) {
        c.eq(
            view(fd),
            b.clone(),
            &format!("fd {fd}: (link, size, mode, nlink, seals, (FD flags, FL flags, offset))"),
        );
    }
    c.eq(
        [m.m1, m.m2, m.only, m.gone_shared, m.gone_private]
            .iter()
            .map(|&p| maps_entry(p).map(|e| e.0))
            .collect::<Vec<_>>(),
        maps_before,
        "the mappings' names in /proc/self/maps",
    );
    c.eq(
        link(10),
        "/memfd:cr test: sealed (deleted)".into(),
        "fd 10's name",
    );
    c.eq(pread(10, 10_000, 0), pattern(1, 10_000), "fd 10: content");
    c.eq(pwrite(10, b"inside", 500), Ok(()), "fd 10: a write inside");
    // SAFETY: ftruncate of our fd (refused by the seal).
    let r = unsafe { libc::ftruncate(10, 100) };
    c.eq(
        (r, errno()),
        (-1, libc::EPERM),
        "fd 10: ftruncate (F_SEAL_SHRINK)",
    );
    c.eq(
        seals(10),
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        "fd 10: seals",
    );
    c.eq(
        pread(11, 3 * PAGE, 0),
        pattern(2, 3 * PAGE),
        "fd 11: content",
    );
    c.eq(
        pwrite(11, b"no", 0),
        Err(libc::EPERM),
        "fd 11: write (F_SEAL_WRITE)",
    );
    // SAFETY: F_ADD_SEALS on our fd (refused: F_SEAL_SEAL).
    let r = unsafe { libc::fcntl(11, libc::F_ADD_SEALS, libc::F_SEAL_GROW) };
    c.eq(
        (r, errno()),
        (-1, libc::EPERM),
        "fd 11: F_ADD_SEALS (F_SEAL_SEAL)",
    );
    c.check(
        seals(12) & libc::F_SEAL_EXEC != 0,
        format!(
            "fd 12 (MFD_NOEXEC_SEAL): seals {:#x} lack F_SEAL_EXEC",
            seals(12)
        ),
    );
    // SAFETY: fchmod of our fd (refused by F_SEAL_EXEC).
    let r = unsafe { libc::fchmod(12, 0o777) };
    c.eq((r, errno()), (-1, libc::EPERM), "fd 12: chmod +x");
    // fd 13 and its mappings.
    let mut want = pattern(3, 2 * PAGE);
    want[100..126].copy_from_slice(b"through the shared mapping");
    c.eq(
        pread(13, 2 * PAGE, 0),
        want.clone(),
        "fd 13: content (with M1's write)",
    );
    c.eq(
        at(m.m1, 0, 2 * PAGE),
        want.clone(),
        "M1 (MAP_SHARED of fd 13)",
    );
    c.eq(
        at(m.m2, 0, 14),
        b"private page 0".to_vec(),
        "M2 page 0 (copied on write)",
    );
    c.eq(
        at(m.m2, 100, 26),
        want[100..126].to_vec(),
        "M2 page 0 beyond its write",
    );
    c.eq(at(m.m2, PAGE, PAGE), want[PAGE..].to_vec(), "M2 page 1");
    put(m.m1, PAGE + 8, b"M1 after");
    c.eq(
        pread(13, 8, PAGE + 8),
        b"M1 after".to_vec(),
        "fd 13 sees M1's write",
    );
    c.eq(pwrite(13, b"fd after", PAGE + 40), Ok(()), "fd 13: write");
    c.eq(
        at(m.m1, PAGE + 40, 8),
        b"fd after".to_vec(),
        "M1 sees fd 13's write",
    );
    c.eq(
        at(m.m2, PAGE + 40, 8),
        b"fd after".to_vec(),
        "M2 page 1 (not copied) sees fd 13's write",
    );
    c.eq(pwrite(13, b"fd page0", 0), Ok(()), "fd 13: write page 0");
    c.eq(
        at(m.m2, 0, 14),
        b"private page 0".to_vec(),
        "M2 page 0 stays private",
    );
    // map-only.
    c.eq(at(m.only, 0, PAGE), pattern(4, PAGE), "map-only: content");
    match map_file(m.only, PAGE) {
        Some(f) => {
            use std::os::fd::AsRawFd;
            put(m.only, 10, b"via mapping");
            c.eq(
                pread(f.as_raw_fd(), 11, 10),
                b"via mapping".to_vec(),
                "map-only: its file",
            );
            c.eq(
                link(f.as_raw_fd()),
                "/memfd:map-only (deleted)".into(),
                "map-only: the file's name",
            );
        }
        None => c.check(false, "map-only: no file behind the mapping"),
    }
    c.eq(holes(14), holes_before, "fd 14 (sparse): data ranges");
    c.eq(
        pread(14, PAGE, 8192 * PAGE),
        pattern(6, PAGE),
        "fd 14: page 8192",
    );
    // The unlinked, shared-mapped file: fd 15 and the mapping are one inode.
    let mut gs = pattern(7, 3 * PAGE);
    gs[2 * PAGE..2 * PAGE + 25].copy_from_slice(b"written before the unlink");
    c.eq(
        at(m.gone_shared, 0, 3 * PAGE),
        gs.clone(),
        "gone-shared: mapping",
    );
    c.eq(pread(15, 3 * PAGE, 0), gs, "gone-shared: fd 15");
    put(m.gone_shared, 7, b"after");
    c.eq(
        pread(15, 5, 7),
        b"after".to_vec(),
        "gone-shared: fd 15 sees the mapping's write",
    );
    c.eq(
        maps_entry(m.gone_shared).map(|e| e.1),
        Some(fstat(15).st_ino),
        "gone-shared: the mapping's inode is fd 15's",
    );
    c.eq(
        at(m.gone_private, 0, 2 * PAGE),
        pattern(8, 2 * PAGE),
        "gone-private: mapping",
    );
    match map_file(m.gone_private, 2 * PAGE).or_else(|| {
        let a = m.gone_private as usize;
        std::fs::File::open(format!("/proc/self/map_files/{:x}-{:x}", a, a + 2 * PAGE)).ok()
    }) {
        Some(f) => {
            use std::os::fd::AsRawFd;
            c.eq(
                fstat(f.as_raw_fd()).st_nlink,
                0,
                "gone-private: its file's links",
            );
        }
        None => c.check(false, "gone-private: no file behind the mapping"),
    }
    c.report()
}
