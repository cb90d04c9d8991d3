//! Workload: a multi-threaded process whose threads all keep running, with their own TIDs,
//! names, counters and thread-local data, across a checkpoint.
//!
//! Usage: wl_threads
//!
//! Threads (besides main, which waits for SIGUSR1 in sigwaitinfo; every other thread has
//! SIGUSR1 blocked):
//! - `busy`: spins, incrementing its counter;
//! - `sleeper`: increments its counter every millisecond, sleeping in between;
//! - `holder`: takes a mutex and holds it (sleeping) until main says "release";
//! - `waiter`: blocks in pthread_mutex_lock (a futex wait) on that mutex, then records that
//!   it got it.
//!
//! Each thread records gettid() and its name and fills a `thread_local!` value derived from
//! its index. After SIGUSR1, main checks: /proc/self/task lists exactly the TIDs of before;
//! each thread still sees its own TID, name and thread-local value; the counters of `busy`
//! and `sleeper` advance; after "release" the waiter gets the mutex.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cr_tests::workload::{block_check_signal, ready, wait_for_check, Checker};

thread_local! {
    static MINE: Cell<u64> = const { Cell::new(0) };
}

const NAMES: [&str; 4] = ["busy", "sleeper", "holder", "waiter"];

/// What each thread shares with main.
#[derive(Default)]
struct Slot {
    tid: AtomicI32,
    counter: AtomicU64,
    /// Main asks the thread to check itself (1), the thread answers 2 (ok) or 3 (bad).
    check: AtomicI32,
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn my_name() -> String {
    std::fs::read_to_string(format!("/proc/self/task/{}/comm", gettid()))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Answers a pending check request: the TID, the name and the thread-local value are still
/// this thread's.
fn answer(slot: &Slot, idx: usize) {
    if slot.check.load(Ordering::SeqCst) != 1 {
        return;
    }
    let ok = gettid() == slot.tid.load(Ordering::SeqCst)
        && MINE.with(|m| m.get()) == 1000 + idx as u64
        && my_name() == NAMES[idx];
    slot.check.store(if ok { 2 } else { 3 }, Ordering::SeqCst);
}

fn tasks() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn main() {
    // SIGUSR1 goes to main only: every thread inherits it blocked.
    block_check_signal();
    let slots: Arc<Vec<Slot>> = Arc::new((0..4).map(|_| Slot::default()).collect());
    let release = Arc::new(AtomicBool::new(false));
    let got_lock = Arc::new(AtomicBool::new(false));
    let lock = Arc::new(Mutex::new(0u64));
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let mut handles = Vec::new();
    for (idx, name) in NAMES.iter().enumerate() {
        let slots = slots.clone();
        let release = release.clone();
        let got_lock = got_lock.clone();
        let lock = lock.clone();
        let held_tx = held_tx.clone();
        let h = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let s = &slots[idx];
                MINE.with(|m| m.set(1000 + idx as u64));
                s.tid.store(gettid(), Ordering::SeqCst);
                match idx {
                    0 => loop {
                        s.counter.fetch_add(1, Ordering::Relaxed);
                        answer(s, idx);
                    },
                    1 => loop {
                        s.counter.fetch_add(1, Ordering::Relaxed);
                        answer(s, idx);
                        std::thread::sleep(Duration::from_millis(1));
                    },
                    2 => {
                        let mut g = lock.lock().expect("lock");
                        *g += 1;
                        held_tx.send(()).expect("say held");
                        while !release.load(Ordering::SeqCst) {
                            answer(s, idx);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        drop(g);
                        loop {
                            answer(s, idx);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    _ => {
                        // Blocks in the futex until the holder lets go.
                        let mut g = lock.lock().expect("lock");
                        *g += 1;
                        got_lock.store(true, Ordering::SeqCst);
                        drop(g);
                        loop {
                            answer(s, idx);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            })
            .expect("spawn thread");
        handles.push(h);
        if idx == 2 {
            held_rx.recv().expect("the holder took the lock");
        }
    }
    // Ready once every thread runs and the waiter sleeps in its futex.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = slots.iter().all(|s| s.tid.load(Ordering::SeqCst) != 0);
        let waiter = slots[3].tid.load(Ordering::SeqCst);
        let blocked = waiter != 0
            && std::fs::read_to_string(format!("/proc/self/task/{waiter}/syscall"))
                .map(|t| t.split_whitespace().next() == Some(&libc::SYS_futex.to_string()))
                .unwrap_or(false);
        if all && blocked {
            break;
        }
        assert!(Instant::now() < deadline, "threads did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = tasks();
    let main_tid = gettid();
    ready(&format!(
        "tids={}",
        before
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",")
    ));
    wait_for_check();

    let mut c = Checker::new();
    c.eq(gettid(), main_tid, "main thread TID");
    c.eq(tasks(), before, "the threads in /proc/self/task");
    c.check(
        !got_lock.load(Ordering::SeqCst),
        "the waiter got the mutex while the holder held it",
    );
    // Counters move on.
    let snap: Vec<u64> = slots
        .iter()
        .map(|s| s.counter.load(Ordering::SeqCst))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (slots[0].counter.load(Ordering::SeqCst) <= snap[0]
        || slots[1].counter.load(Ordering::SeqCst) <= snap[1] + 5)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    c.check(
        slots[0].counter.load(Ordering::SeqCst) > snap[0],
        "the busy thread's counter stands still",
    );
    c.check(
        slots[1].counter.load(Ordering::SeqCst) > snap[1] + 5,
        "the sleeper's counter stands still",
    );
    // The holder lets go; the waiter gets the mutex.
    release.store(true, Ordering::SeqCst);
    while !got_lock.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    c.check(
        got_lock.load(Ordering::SeqCst),
        "the waiter never got the mutex",
    );
    // Each thread checks its own TID, name and thread-local data.
    for s in slots.iter() {
        s.check.store(1, Ordering::SeqCst);
    }
    while slots.iter().any(|s| s.check.load(Ordering::SeqCst) == 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    for (i, s) in slots.iter().enumerate() {
        c.eq(
            s.check.load(Ordering::SeqCst),
            2,
            &format!(
                "thread {} ({}) sees its TID, name and thread-local value",
                NAMES[i],
                s.tid.load(Ordering::SeqCst)
            ),
        );
    }
    c.eq(*lock.lock().expect("lock"), 2, "both lockers counted");
    c.report()
}
