//! Workload: every kind of memory a process has, each filled with a known pattern, checked by
//! the process itself after restore. Also compares its own /proc/self/maps before and after.
//!
//! Usage: wl_memory DIR [--big]   (DIR: a scratch directory for the file-backed mappings;
//! --big adds 512 MiB of touched anonymous memory, so a dump takes a while)

use std::ffi::CString;
use std::io::Read;

use cr_tests::workload::{ready, wait_for_check, Checker};

const PAGE: usize = 4096;

static mut DATA: [u64; 1024] = [0x1111_2222_3333_4444; 1024];
static mut BSS: [u64; 4096] = [0; 4096];

fn pattern(tag: u64, page: usize, i: usize) -> u64 {
    tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((page as u64) << 20) ^ i as u64
}

unsafe fn mmap(len: usize, prot: i32, flags: i32, fd: i32) -> *mut u8 {
    let p = libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0);
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p.cast()
}

unsafe fn fill(p: *mut u8, pages: usize, tag: u64, which: impl Fn(usize) -> bool) {
    for pg in (0..pages).filter(|&pg| which(pg)) {
        let w = p.add(pg * PAGE) as *mut u64;
        for i in 0..PAGE / 8 {
            *w.add(i) = pattern(tag, pg, i);
        }
    }
}

unsafe fn verify(
    c: &mut Checker,
    what: &str,
    p: *const u8,
    pages: usize,
    tag: u64,
    which: impl Fn(usize) -> bool,
) {
    for pg in 0..pages {
        let w = p.add(pg * PAGE) as *const u64;
        let want_pattern = which(pg);
        for i in 0..PAGE / 8 {
            let want = if want_pattern { pattern(tag, pg, i) } else { 0 };
            if *w.add(i) != want {
                c.check(
                    false,
                    format!("{what}: page {pg} word {i}: {:#x} != {want:#x}", *w.add(i)),
                );
                return;
            }
        }
    }
}

/// Reads a /proc file without allocating (the heap must look the same before and after).
fn read_into(path: &str, buf: &mut Vec<u8>) {
    buf.clear();
    let mut f = std::fs::File::open(path).unwrap();
    let mut chunk = [0u8; 4096];
    loop {
        let n = f.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        assert!(buf.len() + n <= buf.capacity(), "maps buffer too small");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// /proc/self/maps with the inode of shared anonymous memory blanked (a new shmem object gets a
/// new inode number; everything else must be identical).
fn normalize(maps: &str) -> Vec<String> {
    maps.lines()
        .map(|l| {
            if l.contains("/dev/zero (deleted)") || l.contains("/SYSV") {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {} {} {} * {}", f[0], f[1], f[2], f[3], f[5..].join(" "))
            } else {
                l.split_whitespace().collect::<Vec<_>>().join(" ")
            }
        })
        .collect()
}

fn smaps_flags(addr: usize) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for l in smaps.lines() {
        if let Some((range, _)) = l.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
        }
        if inside && l.starts_with("VmFlags:") {
            return l.to_string();
        }
    }
    String::new()
}

// DATA and BSS are `static mut`: indexed, not borrowed as slices.
#[allow(clippy::needless_range_loop)]
fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: wl_memory DIR [--big]");
    let big_pages = if std::env::args().any(|a| a == "--big") {
        512 * 256
    } else {
        0
    };
    let mut c = Checker::new();
    let mut maps_before = Vec::with_capacity(1 << 20);
    let mut maps_after = Vec::with_capacity(1 << 20);
    unsafe {
        // .data and .bss
        for i in 0..1024 {
            DATA[i] = pattern(1, 0, i);
        }
        for i in (0..4096).step_by(3) {
            BSS[i] = pattern(2, 0, i);
        }
        // Heap through brk directly, and through malloc.
        let brk0 = libc::sbrk(0) as *mut u8;
        libc::sbrk((16 * PAGE) as isize);
        fill(brk0, 16, 3, |_| true);
        let boxed: Vec<u64> = (0..100_000).map(|i| pattern(4, 0, i)).collect();
        // Private anonymous: even pages touched, odd ones never.
        let anon = mmap(
            64 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        fill(anon, 64, 5, |pg| pg % 2 == 0);
        // Shared anonymous.
        let shanon = mmap(
            8 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
        );
        fill(shanon, 8, 6, |pg| pg != 3);
        // File, MAP_PRIVATE: page 1 modified in memory, pages 0 and 2 from the file.
        let fpath = format!("{dir}/private.bin");
        let mut content = vec![0u8; 3 * PAGE];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        std::fs::write(&fpath, &content).unwrap();
        let cpath = CString::new(fpath.clone()).unwrap();
        let fd = libc::open(cpath.as_ptr(), libc::O_RDONLY);
        let fpriv = libc::mmap(
            std::ptr::null_mut(),
            3 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd,
            0,
        ) as *mut u8;
        libc::close(fd);
        fill(fpriv.add(PAGE), 1, 7, |_| true);
        // File, MAP_SHARED: writes go to the file.
        let spath = format!("{dir}/shared.bin");
        std::fs::write(&spath, vec![0u8; 2 * PAGE]).unwrap();
        let cspath = CString::new(spath.clone()).unwrap();
        let fd = libc::open(cspath.as_ptr(), libc::O_RDWR);
        let fshared = libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        ) as *mut u8;
        libc::close(fd);
        fill(fshared, 2, 8, |_| true);
        // Read-only with content, then a PROT_NONE guard, inside one reservation.
        let ro = mmap(
            6 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        fill(ro, 4, 9, |_| true);
        libc::mprotect(ro.cast(), 4 * PAGE, libc::PROT_READ);
        libc::mprotect(ro.add(4 * PAGE).cast(), 2 * PAGE, libc::PROT_NONE);
        // A named anonymous VMA and madvise flags.
        let named = mmap(
            4 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        fill(named, 4, 10, |_| true);
        let name = CString::new("cr-test-name").unwrap();
        libc::prctl(
            libc::PR_SET_VMA,
            libc::PR_SET_VMA_ANON_NAME,
            named as usize,
            4 * PAGE,
            name.as_ptr() as usize,
        );
        let dontfork = mmap(
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        libc::madvise(dontfork.cast(), 2 * PAGE, libc::MADV_DONTFORK);
        let wipe = mmap(
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        libc::madvise(wipe.cast(), 2 * PAGE, libc::MADV_WIPEONFORK);
        let huge = mmap(
            4 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        libc::madvise(huge.cast(), 4 << 20, libc::MADV_HUGEPAGE);
        fill(huge, 16, 11, |pg| pg % 5 == 0);
        let flags_before: Vec<String> = [dontfork, wipe, huge]
            .iter()
            .map(|p| smaps_flags(*p as usize))
            .collect();
        let big = if big_pages > 0 {
            let p = mmap(
                big_pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
            );
            fill(p, big_pages, 13, |_| true);
            p
        } else {
            std::ptr::null_mut()
        };
        // Stack data.
        let mut stack = [0u64; 2048];
        for (i, v) in stack.iter_mut().enumerate() {
            *v = pattern(12, 0, i);
        }
        let stack = std::hint::black_box(stack);

        read_into("/proc/self/maps", &mut maps_before);
        ready("");
        wait_for_check();
        read_into("/proc/self/maps", &mut maps_after);

        let before = normalize(std::str::from_utf8(&maps_before).unwrap());
        let after = normalize(std::str::from_utf8(&maps_after).unwrap());
        if before != after {
            let diff: Vec<String> = before
                .iter()
                .filter(|l| !after.contains(l))
                .map(|l| format!("-{l}"))
                .chain(
                    after
                        .iter()
                        .filter(|l| !before.contains(l))
                        .map(|l| format!("+{l}")),
                )
                .collect();
            c.check(
                false,
                format!("/proc/self/maps changed: {}", diff.join(" | ")),
            );
        }
        for i in 0..1024 {
            if DATA[i] != pattern(1, 0, i) {
                c.check(false, format!(".data word {i}"));
                break;
            }
        }
        for i in 0..4096 {
            let want = if i % 3 == 0 { pattern(2, 0, i) } else { 0 };
            if BSS[i] != want {
                c.check(false, format!(".bss word {i}"));
                break;
            }
        }
        verify(&mut c, "brk heap", brk0, 16, 3, |_| true);
        c.check(
            boxed
                .iter()
                .enumerate()
                .all(|(i, v)| *v == pattern(4, 0, i)),
            "malloc'd vector",
        );
        verify(&mut c, "private anon", anon, 64, 5, |pg| pg % 2 == 0);
        verify(&mut c, "shared anon", shanon, 8, 6, |pg| pg != 3);
        c.check(
            std::slice::from_raw_parts(fpriv, PAGE) == &content[..PAGE],
            "private file page 0 (from the file)",
        );
        c.check(
            std::slice::from_raw_parts(fpriv.add(2 * PAGE), PAGE) == &content[2 * PAGE..],
            "private file page 2 (from the file)",
        );
        verify(
            &mut c,
            "private file page 1 (modified)",
            fpriv.add(PAGE),
            1,
            7,
            |_| true,
        );
        verify(&mut c, "shared file", fshared, 2, 8, |_| true);
        verify(&mut c, "read-only", ro, 4, 9, |_| true);
        verify(&mut c, "named anon", named, 4, 10, |_| true);
        verify(&mut c, "THP region", huge, 16, 11, |pg| pg % 5 == 0);
        if big_pages > 0 {
            verify(&mut c, "big region", big, big_pages, 13, |_| true);
        }
        c.check(
            stack
                .iter()
                .enumerate()
                .all(|(i, v)| *v == pattern(12, 0, i)),
            "stack array",
        );
        let flags_after: Vec<String> = [dontfork, wipe, huge]
            .iter()
            .map(|p| smaps_flags(*p as usize))
            .collect();
        c.eq(flags_after, flags_before, "VmFlags of madvise'd regions");
        // The shared file mapping still writes through to the file.
        let saved = *fshared;
        *fshared = 0xAB;
        libc::msync(fshared.cast(), PAGE, libc::MS_SYNC);
        let disk = std::fs::read(&spath).unwrap();
        c.eq(disk[0], 0xAB, "shared file write-through after restore");
        // Put it back: an image taken earlier (dump -R) may be restored against this file.
        *fshared = saved;
        libc::msync(fshared.cast(), PAGE, libc::MS_SYNC);
        // brk must keep growing after restore: lots of small allocations come from brk.
        let mut many: Vec<Vec<u8>> = Vec::new();
        for i in 0..100_000usize {
            many.push(vec![(i % 255) as u8; 600]);
        }
        c.check(
            many.iter()
                .enumerate()
                .all(|(i, v)| v.iter().all(|b| *b == (i % 255) as u8)),
            "allocations after restore",
        );
        let top = libc::sbrk(0) as usize;
        c.check(
            libc::sbrk(1 << 20) as usize == top,
            "sbrk growth after restore",
        );
    }
    c.report()
}
