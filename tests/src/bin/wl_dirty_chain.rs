//! The chain workload of the incremental-dump tests: SIZE MiB (default 256) of self-describing
//! pages, dirtied continuously at a random rate while pre-dumps and dumps are taken, verified
//! page by page after the final restore.
//!
//! Usage: wl_dirty_chain [SIZE_MIB]. Harness protocol: READY on fd 3, SIGUSR1 → verify, report.
//! SIGUSR2 turns the process_vm_writev writes off and on (they start on), so that a test can
//! have epochs the eBPF records cover and epochs they do not.
//!
//! Every page of the big region holds words that are a pure function of (page index,
//! generation) (generation 0: zeros); the workload keeps the generation of every page in a
//! table in its own memory, so whatever instant a checkpoint freezes it at, table and pages
//! agree (the restored process finishes the write it was in, then checks). Writes come in
//! bursts of random size with random pauses, mostly into a hot window that wanders, some
//! anywhere, in several ways: user stores, read() from a pipe into the page (a kernel write),
//! process_vm_writev to itself (a write without a fault in its context), MADV_DONTNEED (the page
//! becomes zeros). The first half of the region may use transparent huge pages. Beside it,
//! small "churn" regions are unmapped and mapped again, moved with mremap, and rewritten.
//! (No /proc/self/mem here: a checkpoint that freezes it with that file open would refuse the
//! fd; the agreement tests cover that kind.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::os::fd::IntoRawFd;

use cr_tests::sys::{mmap_anon, pipe_cloexec};
use cr_tests::workload::{check_requested, install_check_flag, ready, Checker};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const HUGE: usize = 2 << 20;
/// Churn regions: how many, pages each, id base (their content uses id SLOT_ID + slot).
const SLOTS: usize = 8;
const SLOT_PAGES: usize = 16;
const SLOT_ID: u64 = 1 << 30;
/// The hot window, in pages (8 MiB).
const HOT: usize = 2048;

/// Whether the process_vm_writev kind of write is used (SIGUSR2 flips it).
static GUP_WRITES: AtomicBool = AtomicBool::new(true);

extern "C" fn on_usr2(_: libc::c_int) {
    GUP_WRITES.fetch_xor(true, Ordering::SeqCst);
}

fn word(id: u64, gen: u32, k: usize) -> u64 {
    if gen == 0 {
        return 0;
    }
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

fn fill(buf: &mut [u64; WORDS], id: u64, gen: u32) {
    for (k, w) in buf.iter_mut().enumerate() {
        *w = word(id, gen, k);
    }
}

/// xorshift64*: reproducible from the seed printed on stderr.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Slot {
    addr: usize,
    gen: u32,
}

struct W {
    base: usize,
    gen: Vec<u32>,
    slots: Vec<Slot>,
    pipe_r: i32,
    pipe_w: i32,
    rng: Rng,
    buf: Box<[u64; WORDS]>,
}

/// A fresh anonymous mapping of `len` bytes (the workload cannot go on without it).
fn map(len: usize) -> usize {
    mmap_anon(len).unwrap_or_else(|e| panic!("mmap: {e}"))
}

impl W {
    fn page(&self, p: usize) -> *mut u64 {
        (self.base + p * PAGE) as *mut u64
    }

    fn user_write(dst: *mut u64, id: u64, gen: u32) {
        for k in 0..WORDS {
            // SAFETY: `dst` is a page of one of our read/write mappings.
            unsafe { std::ptr::write_volatile(dst.add(k), word(id, gen, k)) };
        }
    }

    /// One write of page `p` in a random way.
    fn dirty(&mut self, p: usize) {
        let gen = self.gen[p].wrapping_add(1).max(1);
        let dst = self.page(p);
        match self.rng.below(100) {
            0..70 => Self::user_write(dst, p as u64, gen),
            70..85 => {
                fill(&mut self.buf, p as u64, gen);
                // SAFETY: a 4 KiB buffer of ours into the pipe, then out of it into our page.
                unsafe {
                    assert_eq!(
                        libc::write(self.pipe_w, self.buf.as_ptr().cast(), PAGE),
                        PAGE as isize
                    );
                    assert_eq!(libc::read(self.pipe_r, dst.cast(), PAGE), PAGE as isize);
                }
            }
            85..95 if GUP_WRITES.load(Ordering::SeqCst) => {
                fill(&mut self.buf, p as u64, gen);
                let l = libc::iovec {
                    iov_base: self.buf.as_mut_ptr().cast(),
                    iov_len: PAGE,
                };
                let r = libc::iovec {
                    iov_base: dst.cast(),
                    iov_len: PAGE,
                };
                // SAFETY: copies our buffer into our own page.
                let n = unsafe { libc::process_vm_writev(libc::getpid(), &l, 1, &r, 1, 0) };
                assert_eq!(
                    n,
                    PAGE as isize,
                    "process_vm_writev: {}",
                    std::io::Error::last_os_error()
                );
            }
            85..95 => Self::user_write(dst, p as u64, gen),
            _ => {
                // SAFETY: advice on one page of our own mapping.
                assert_eq!(
                    unsafe { libc::madvise(dst.cast(), PAGE, libc::MADV_DONTNEED) },
                    0
                );
                self.gen[p] = 0;
                return;
            }
        }
        self.gen[p] = gen;
    }

    /// The content id of page `i` of churn slot `s` (its `word`s are a function of it).
    fn slot_page_id(s: usize, i: usize) -> u64 {
        SLOT_ID + s as u64 + ((i as u64) << 40)
    }

    /// Writes every page of churn slot `s` (mapped at `addr`) at generation `gen`.
    fn fill_slot(addr: usize, s: usize, gen: u32) {
        for i in 0..SLOT_PAGES {
            Self::user_write((addr + i * PAGE) as *mut u64, Self::slot_page_id(s, i), gen);
        }
    }

    /// Rewrites churn slot `s` at its next generation.
    fn rewrite_slot(&mut self, s: usize) {
        self.slots[s].gen += 1;
        Self::fill_slot(self.slots[s].addr, s, self.slots[s].gen);
    }

    /// Unmap and map again, move, or rewrite one churn region.
    fn churn(&mut self) {
        let s = self.rng.below(SLOTS as u64) as usize;
        let len = SLOT_PAGES * PAGE;
        match self.rng.below(3) {
            0 => {
                // SAFETY: unmapping our own slot; nothing references it.
                unsafe { libc::munmap(self.slots[s].addr as *mut libc::c_void, len) };
                self.slots[s].addr = map(len);
                self.rewrite_slot(s);
            }
            1 => {
                let to = map(len);
                // SAFETY: moving our own slot onto our own fresh reservation.
                let p = unsafe {
                    libc::mremap(
                        self.slots[s].addr as *mut libc::c_void,
                        len,
                        len,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        to as *mut libc::c_void,
                    )
                };
                assert_ne!(
                    p,
                    libc::MAP_FAILED,
                    "mremap: {}",
                    std::io::Error::last_os_error()
                );
                self.slots[s].addr = p as usize;
            }
            _ => self.rewrite_slot(s),
        }
    }

    fn verify(&self) -> Checker {
        let mut c = Checker::new();
        let mut bad = 0;
        for (p, &gen) in self.gen.iter().enumerate() {
            let src = self.page(p);
            for k in 0..WORDS {
                // SAFETY: a page of our region.
                let got = unsafe { std::ptr::read_volatile(src.add(k)) };
                if got != word(p as u64, gen, k) {
                    bad += 1;
                    if bad <= 5 {
                        // SAFETY: as above.
                        let (w0, w1) = unsafe {
                            (
                                std::ptr::read_volatile(src),
                                std::ptr::read_volatile(src.add(1)),
                            )
                        };
                        c.check(false, format!("page {p} word {k}: {got:#x}; table says generation {gen}, page says id {w0} generation {w1}"));
                    }
                    break;
                }
            }
        }
        for (s, slot) in self.slots.iter().enumerate() {
            for i in 0..SLOT_PAGES {
                let src = (slot.addr + i * PAGE) as *const u64;
                let id = W::slot_page_id(s, i);
                // SAFETY: a page of a mapped slot.
                let ok = (0..WORDS).all(
                    |k| unsafe { std::ptr::read_volatile(src.add(k)) } == word(id, slot.gen, k),
                );
                c.check(
                    ok,
                    format!("churn region {s} page {i} (generation {})", slot.gen),
                );
            }
        }
        c.check(
            bad == 0,
            format!("{bad} pages differ from the generation table"),
        );
        c
    }
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let pages = mib * 256;
    let raw = map(pages * PAGE + HUGE);
    let base = (raw + HUGE - 1) & !(HUGE - 1);
    // SAFETY: advice on our own fresh mapping: huge pages in the first half, none in the second.
    unsafe {
        libc::madvise(
            base as *mut libc::c_void,
            pages * PAGE / 2,
            libc::MADV_HUGEPAGE,
        );
        libc::madvise(
            (base + pages * PAGE / 2) as *mut libc::c_void,
            pages * PAGE / 2,
            libc::MADV_NOHUGEPAGE,
        );
    }
    let (pipe_r, pipe_w) = pipe_cloexec();
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            t ^ std::process::id() as u64
        })
        | 1;
    eprintln!("wl_dirty_chain: {mib} MiB, seed {seed}");
    let mut w = W {
        base,
        gen: vec![1; pages],
        slots: Vec::new(),
        pipe_r: pipe_r.into_raw_fd(),
        pipe_w: pipe_w.into_raw_fd(),
        rng: Rng(seed),
        buf: Box::new([0u64; WORDS]),
    };
    for p in 0..pages {
        W::user_write(w.page(p), p as u64, 1);
    }
    for s in 0..SLOTS {
        let addr = map(SLOT_PAGES * PAGE);
        W::fill_slot(addr, s, 1);
        w.slots.push(Slot { addr, gen: 1 });
    }
    install_check_flag();
    // SAFETY: installing a handler that only flips an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr2 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
    }
    ready(&format!("{base:x}"));
    let mut hot = w.rng.below((pages - HOT) as u64) as usize;
    let mut bursts: u64 = 0;
    while !check_requested() {
        let n = 1 + w.rng.below(32) as usize;
        for _ in 0..n {
            let p = if w.rng.below(100) == 0 {
                w.rng.below(pages as u64) as usize
            } else {
                hot + w.rng.below(HOT as u64) as usize
            };
            w.dirty(p);
        }
        bursts += 1;
        if bursts.is_multiple_of(64) {
            w.churn();
        }
        if bursts.is_multiple_of(512) {
            hot = w.rng.below((pages - HOT) as u64) as usize;
        }
        std::thread::sleep(Duration::from_micros(500 + w.rng.below(3000)));
    }
    // (Nothing more on stderr: its file is part of the image, and a later restore of the same
    // chain checks that it has not changed.)
    let _ = bursts;
    w.verify().report();
}
