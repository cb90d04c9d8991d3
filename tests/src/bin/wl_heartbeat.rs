//! Benchmark workload: SIZE MiB of touched anonymous memory and a heartbeat loop that measures,
//! from inside, the longest time it did not run (how long a checkpoint froze it).
//!
//! Usage: wl_heartbeat SIZE_MIB [DIRTY_PERCENT]
//! SIGUSR2: write `max_gap_us N` to $CR_RESULT and reset the maximum.
//! SIGUSR1: verify the memory pattern, write `PASS max_gap_us N` / `FAIL …`, exit.
//! With DIRTY_PERCENT, each heartbeat also rewrites one page, cycling through that share of
//! the memory (a write-heavy service); `writes N` in the result says how many pages it wrote.

use std::sync::atomic::{AtomicBool, Ordering};

use cr_tests::workload::ready;

static REPORT: AtomicBool = AtomicBool::new(false);
static CHECK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr2(_: libc::c_int) {
    REPORT.store(true, Ordering::SeqCst);
}
extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("usage: wl_heartbeat SIZE_MIB [DIRTY_PERCENT]");
    let dirty_pct: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let pages = mib * 256;
    // SAFETY: installing handlers that only store to atomics.
    unsafe {
        for (sig, h) in [
            (libc::SIGUSR1, on_usr1 as *const () as usize),
            (libc::SIGUSR2, on_usr2 as *const () as usize),
        ] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = h;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let mut mem = vec![0u64; pages * 512];
    for (pg, chunk) in mem.chunks_mut(512).enumerate() {
        chunk[0] = pg as u64;
        chunk[511] = !(pg as u64);
    }
    let result = std::env::var_os("CR_RESULT").expect("CR_RESULT");
    let dirty_pages = (pages * dirty_pct / 100).max(1);
    let mut writes: u64 = 0;
    let mut cursor = 0usize;
    ready("");
    let mut last = now_ns();
    let mut max_gap = 0u64;
    loop {
        let t = now_ns();
        max_gap = max_gap.max(t - last);
        last = t;
        if dirty_pct > 0 {
            let pg = cursor % dirty_pages;
            mem[pg * 512 + 1] = writes;
            writes += 1;
            cursor += 1;
        }
        if REPORT.swap(false, Ordering::SeqCst) {
            std::fs::write(
                &result,
                format!("max_gap_us {} writes {writes}\n", max_gap / 1000),
            )
            .expect("write result");
            max_gap = 0;
            last = now_ns();
        }
        if CHECK.load(Ordering::SeqCst) {
            break;
        }
    }
    let ok = mem
        .chunks(512)
        .enumerate()
        .all(|(pg, c)| c[0] == pg as u64 && c[511] == !(pg as u64));
    let verdict = if ok { "PASS" } else { "FAIL: memory pattern" };
    std::fs::write(
        &result,
        format!("{verdict} max_gap_us {} writes {writes}\n", max_gap / 1000),
    )
    .expect("write result");
    std::process::exit(if ok { 0 } else { 1 });
}
