//! Workload of the tree-tracking tests: a root and its children, each dirtying generation-
//! stamped pages of its own memory continuously while checkpoints are taken, each verifying
//! every page it holds after a restore.
//!
//! Usage: wl_tree_dirty [PAGES]. Harness protocol: READY on fd 3 (`pids=R,A,B`), SIGUSR1 to R
//! → every process verifies itself, R collects the children's verdicts and reports. SIGUSR2
//! to R → R forks one more child, L (a process first seen after tracking started), and writes
//! its PID into `$CR_RESULT.late`.
//!
//! ```text
//! R  its region (PAGES pages), written before A and B are forked
//! ├─ A  R's region as of the fork (copy-on-write, never written by A) + a region of its own
//! ├─ B  the same
//! └─ L  (on SIGUSR2) R's region as of its fork + a region of its own
//! ```
//! Every page holds words that are a pure function of (process tag, page index, generation);
//! each process keeps the generation of every page of every region it holds in its own
//! memory, so whatever instant a checkpoint freezes it at, table and pages agree (a restored
//! process finishes the write it was in before it checks). Each process dirties its own region
//! only: mostly a hot window of HOT pages at its start, one write in 256 any page; by user stores
//! and by read() from a pipe into the page (a kernel write). Every page starts at generation 1
//! (populated): what a checkpoint does not copy again must come from its parent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cr_tests::sys::{mmap_anon, pipe_cloexec};
use cr_tests::workload::{
    check_child, check_requested, child_report, install_check_flag, ready, Checker,
};
use std::os::fd::IntoRawFd;

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// The hot window of each region, in pages.
const HOT: usize = 64;

static FORK_LATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr2(_: libc::c_int) {
    FORK_LATE.store(true, Ordering::SeqCst);
}

fn word(tag: u64, page: u64, gen: u32, k: usize) -> u64 {
    let id = (tag << 32) | page;
    match k {
        0 => id,
        1 => gen as u64,
        _ => {
            (id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (gen as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
            .rotate_left((k % 63) as u32)
                ^ k as u64
        }
    }
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Pages of one process's making, and the generation of each.
struct Region {
    tag: u64,
    base: usize,
    gen: Vec<u32>,
}

impl Region {
    /// A fresh region of `pages` pages, every page written at generation 1.
    fn new(tag: u64, pages: usize) -> Region {
        let base = mmap_anon(pages * PAGE).unwrap_or_else(|e| panic!("mmap: {e}"));
        let mut r = Region {
            tag,
            base,
            gen: vec![0; pages],
        };
        let mut buf = vec![0u64; WORDS];
        for p in 0..pages {
            r.write(p, 1, &mut buf);
        }
        r
    }

    fn page(&self, p: usize) -> *mut u64 {
        (self.base + p * PAGE) as *mut u64
    }

    fn write(&mut self, p: usize, gen: u32, buf: &mut [u64]) {
        for (k, w) in buf.iter_mut().enumerate() {
            *w = word(self.tag, p as u64, gen, k);
        }
        // SAFETY: page p of our own read/write mapping; buf holds one page.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.page(p), WORDS) };
        self.gen[p] = gen;
    }

    /// Every page against the table.
    fn verify(&self, c: &mut Checker, who: &str) {
        let mut bad = 0;
        for (p, &g) in self.gen.iter().enumerate() {
            let dst = self.page(p);
            let ok = (0..WORDS).all(|k| {
                // SAFETY: page p of our own mapping.
                unsafe { std::ptr::read_volatile(dst.add(k)) == word(self.tag, p as u64, g, k) }
            });
            if !ok {
                if bad < 4 {
                    c.check(
                        false,
                        format!("{who}: region {} page {p} is not generation {g}", self.tag),
                    );
                }
                bad += 1;
            }
        }
        c.check(
            bad == 0,
            format!("{who}: region {}: {bad} bad pages", self.tag),
        );
    }
}

/// The writing of one process: dirties `own` (by user stores and by read() from a pipe), a
/// burst at a time.
struct Writer {
    own: Region,
    pipe_r: i32,
    pipe_w: i32,
    rng: Rng,
    buf: Vec<u64>,
}

impl Writer {
    fn new(tag: u64, pages: usize) -> Writer {
        let (r, w) = pipe_cloexec();
        Writer {
            own: Region::new(tag, pages),
            pipe_r: r.into_raw_fd(),
            pipe_w: w.into_raw_fd(),
            rng: Rng(0x9e37_79b9 ^ (tag << 17) ^ std::process::id() as u64),
            buf: vec![0u64; WORDS],
        }
    }

    fn burst(&mut self) {
        let n = self.own.gen.len();
        for _ in 0..4 {
            let p = if self.rng.below(256) == 0 {
                self.rng.below(n as u64) as usize
            } else {
                self.rng.below(HOT.min(n) as u64) as usize
            };
            let gen = self.own.gen[p].wrapping_add(1).max(1);
            if self.rng.below(4) == 0 {
                for (k, w) in self.buf.iter_mut().enumerate() {
                    *w = word(self.own.tag, p as u64, gen, k);
                }
                // SAFETY: one page of ours through our own pipe into page p of our region.
                unsafe {
                    assert_eq!(
                        libc::write(self.pipe_w, self.buf.as_ptr().cast(), PAGE),
                        PAGE as isize
                    );
                    assert_eq!(
                        libc::read(self.pipe_r, self.own.page(p).cast(), PAGE),
                        PAGE as isize
                    );
                }
                self.own.gen[p] = gen;
            } else {
                self.own.write(p, gen, &mut self.buf);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A child: its own region beside what it inherited; writes until told to check.
fn child(name: &str, tag: u64, pages: usize, inherited: &Region) -> ! {
    let mut w = Writer::new(tag, pages);
    while !check_requested() {
        w.burst();
    }
    let mut c = Checker::new();
    inherited.verify(&mut c, name);
    w.own.verify(&mut c, name);
    // SAFETY: getppid has no arguments.
    c.check(unsafe { libc::getppid() } > 1, format!("{name}: orphaned"));
    child_report(name, c)
}

fn fork() -> i32 {
    // SAFETY: single-threaded process.
    let p = unsafe { libc::fork() };
    assert!(p >= 0, "fork");
    if p == 0 {
        // The harness reads the ready pipe (fd 3) to its end: only R may hold it.
        // SAFETY: closing an inherited fd in the child.
        unsafe { libc::close(3) };
    }
    p
}

fn main() {
    let pages: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("PAGES"))
        .unwrap_or(2048);
    // Children must be in R's session (a dump refuses a session leader outside the tree).
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    install_check_flag();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr2 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
    }
    let mut root = Writer::new(1, pages);
    let mut kids: Vec<(String, i32)> = Vec::new();
    for (name, tag) in [("A", 2u64), ("B", 3u64)] {
        let pid = fork();
        if pid == 0 {
            child(name, tag, pages, &root.own);
        }
        kids.push((name.to_string(), pid));
    }
    let pids: Vec<String> = std::iter::once(std::process::id() as i32)
        .chain(kids.iter().map(|k| k.1))
        .map(|p| p.to_string())
        .collect();
    ready(&format!("pids={}", pids.join(",")));
    while !check_requested() {
        if FORK_LATE.swap(false, Ordering::SeqCst) {
            let pid = fork();
            if pid == 0 {
                child("L", 4, pages, &root.own);
            }
            kids.push(("L".into(), pid));
            let path = format!("{}.late", std::env::var("CR_RESULT").expect("CR_RESULT"));
            // Whole or not at all: the harness reads it as soon as it exists.
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, pid.to_string()).expect("write the late child's PID");
            std::fs::rename(&tmp, &path).expect("publish the late child's PID");
        }
        root.burst();
    }
    let mut c = Checker::new();
    root.own.verify(&mut c, "R");
    for (name, pid) in &kids {
        check_child(&mut c, name, *pid);
    }
    c.report()
}
