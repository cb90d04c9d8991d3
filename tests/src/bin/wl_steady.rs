//! A steady service for the kill-safety tests: THREADS threads rewrite known patterns over
//! MIB MiB of their own memory and check them after every pass, for as long as the workload
//! runs (through dumps, a killed cr, a restore). With `tcp ADDR`, it also holds a connection to
//! an echo peer at ADDR.
//!
//! Usage: wl_steady THREADS MIB [tcp ADDR]
//! SIGUSR1: every thread must still be making progress (two more passes each) with every
//! check passed, and the connection must still carry data both ways (a message out, the same
//! message back); then PASS/FAIL to $CR_RESULT and exit.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cr_tests::workload::{check_requested, install_check_flag, ready, Checker};

const WORDS_PER_PAGE: usize = 512;

/// The word written at the start of page `page` of thread `t` in pass `gen` (the end of the
/// page holds its complement).
fn tag(t: usize, page: usize, gen: u64) -> u64 {
    ((t as u64) << 56) ^ ((page as u64) << 20) ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

struct Shared {
    stop: AtomicBool,
    passes: Vec<AtomicU64>,
    failures: Mutex<Vec<String>>,
}

fn worker(t: usize, pages: usize, sh: Arc<Shared>, first_pass: std::sync::mpsc::Sender<()>) {
    let mut mem = vec![0u64; pages * WORDS_PER_PAGE];
    let mut gen = 0u64;
    let mut first = Some(first_pass);
    while !sh.stop.load(Ordering::SeqCst) {
        gen += 1;
        for (p, page) in mem.chunks_mut(WORDS_PER_PAGE).enumerate() {
            page[0] = tag(t, p, gen);
            page[WORDS_PER_PAGE - 1] = !tag(t, p, gen);
        }
        for (p, page) in mem.chunks(WORDS_PER_PAGE).enumerate() {
            let (a, b) = (page[0], page[WORDS_PER_PAGE - 1]);
            if a != tag(t, p, gen) || b != !tag(t, p, gen) {
                sh.failures.lock().unwrap().push(format!(
                    "thread {t}, pass {gen}: page {p} holds {a:#x}/{b:#x}"
                ));
                sh.stop.store(true, Ordering::SeqCst);
                return;
            }
        }
        sh.passes[t].fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        // Not a synchronization: a service's pace, so that a few of these do not take every
        // core of the machine.
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let peer = match (args.get(3).map(String::as_str), args.get(4)) {
        (Some("tcp"), Some(a)) => Some(a.clone()),
        (None, _) => None,
        _ => panic!("usage: wl_steady THREADS MIB [tcp ADDR]"),
    };
    install_check_flag();
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        passes: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        failures: Mutex::new(Vec::new()),
    });
    let pages = (mib * 256 / threads).max(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (sh, tx) = (sh.clone(), tx.clone());
            std::thread::spawn(move || worker(t, pages, sh, tx))
        })
        .collect();
    drop(tx);
    // Every thread has its memory populated before the harness may dump us.
    for _ in 0..threads {
        rx.recv().expect("a worker died before its first pass");
    }
    let mut conn = peer.map(|a| {
        let s = std::net::TcpStream::connect(&a).unwrap_or_else(|e| panic!("connect {a}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    });
    ready(&format!("threads={threads} mib={mib}"));
    while !check_requested() {
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut c = Checker::new();
    // Progress: every thread completes two more passes (a stuck or dead thread does not).
    let base: Vec<u64> = sh.passes.iter().map(|p| p.load(Ordering::SeqCst)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let behind: Vec<usize> = (0..threads)
            .filter(|&t| sh.passes[t].load(Ordering::SeqCst) < base[t] + 2)
            .collect();
        if behind.is_empty() || sh.stop.load(Ordering::SeqCst) {
            break;
        }
        if Instant::now() > deadline {
            c.check(
                false,
                format!("threads {behind:?} made no progress in 20 s"),
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    sh.stop.store(true, Ordering::SeqCst);
    for h in handles {
        c.check(h.join().is_ok(), "a worker thread panicked");
    }
    for f in sh.failures.lock().unwrap().iter() {
        c.check(false, f.clone());
    }
    if let Some(s) = conn.as_mut() {
        let msg = format!(
            "ping {} from {}\n",
            base.iter().sum::<u64>(),
            std::process::id()
        );
        match s.write_all(msg.as_bytes()) {
            Err(e) => c.check(false, format!("send on the connection: {e}")),
            Ok(()) => {
                let mut back = vec![0u8; msg.len()];
                match s.read_exact(&mut back) {
                    Ok(()) => c.eq(
                        String::from_utf8_lossy(&back).into_owned(),
                        msg.clone(),
                        "the echo",
                    ),
                    Err(e) => c.check(false, format!("no echo within 10 s: {e}")),
                }
            }
        }
    }
    c.report_noting(&format!(
        "passes {}",
        sh.passes
            .iter()
            .map(|p| p.load(Ordering::SeqCst).to_string())
            .collect::<Vec<_>>()
            .join(",")
    ));
}
