//! A progress line on stderr for the long parts of a dump, a restore or a page transfer:
//! `writing pages of PID 42: 812.0 / 2048.0 MiB (39%), 1630.2 MiB/s`, redrawn in place four
//! times a second, and cleared when the work ends.
//!
//! Only on a terminal (stderr is a tty) and only once the work has lasted a second
//! (`CR_TEST_PROGRESS_AFTER_MS` sets that delay for tests): a quick dump prints nothing, and
//! nothing reaches a log file or a pipe. Written by hand rather than with indicatif: one
//! counter and a thread is all it takes, and the logger has to clear the line before each of
//! its own lines ([`write_stderr`]), which a crate's own terminal handling would not know of.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether a progress line is on the terminal now (it must be cleared before other output).
/// Held while writing to stderr, so lines never interleave.
static ON_SCREEN: Mutex<bool> = Mutex::new(false);

const REDRAW: Duration = Duration::from_millis(250);
const MIB: f64 = (1u64 << 20) as f64;

/// Writes `bytes` to stderr, clearing a progress line first (it comes back at its next redraw).
pub fn write_stderr(bytes: &[u8]) {
    let mut shown = ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = std::io::stderr().lock();
    if *shown {
        let _ = err.write_all(b"\r\x1b[K");
        *shown = false;
    }
    let _ = err.write_all(bytes);
}

/// The progress of one piece of work; the line goes away when this is dropped.
pub struct Progress(Option<Running>);

struct Running {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    what: String,
    /// Bytes in all (0: unknown).
    total: u64,
    done: AtomicU64,
    t0: Instant,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Progress {
    /// Work on `total` bytes (0 if unknown) called `what`; shown if stderr is a terminal and the
    /// work outlasts the delay.
    pub fn start(what: impl Into<String>, total: u64) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let after = crate::tunables::get()
            .progress_after_ms
            .map_or(Duration::from_secs(1), Duration::from_millis);
        let shared = Arc::new(Shared {
            what: what.into(),
            total,
            done: AtomicU64::new(0),
            t0: Instant::now(),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cr-progress".into())
            .spawn(move || s.run(after))
            .ok();
        Progress(thread.map(|t| Running {
            shared,
            thread: Some(t),
        }))
    }

    /// No line at all (the work is not worth one).
    pub fn none() -> Progress {
        Progress(None)
    }

    /// `bytes` more are done.
    pub fn add(&self, bytes: u64) {
        if let Some(r) = &self.0 {
            r.shared.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(r) = &mut self.0 {
            *r.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
            r.shared.wake.notify_all();
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Shared {
    /// Sleeps `first`, then redraws until stopped; clears the line at the end.
    fn run(&self, first: Duration) {
        let mut wait = first;
        let mut drawn = false;
        loop {
            let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
            let (stop, _) = self
                .wake
                .wait_timeout_while(stop, wait, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *stop {
                break;
            }
            drop(stop);
            self.draw();
            drawn = true;
            wait = REDRAW;
        }
        if drawn {
            let mut shown = ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner());
            if *shown {
                let _ = std::io::stderr().lock().write_all(b"\r\x1b[K");
                *shown = false;
            }
        }
    }

    fn draw(&self) {
        let line = line(
            &self.what,
            self.done.load(Ordering::Relaxed),
            self.total,
            self.t0.elapsed(),
        );
        let mut shown = ON_SCREEN.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(format!("\r\x1b[K{line}").as_bytes());
        let _ = err.flush();
        *shown = true;
    }
}

/// The text of the line.
fn line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done as f64 / MIB / secs;
    if total > 0 {
        format!(
            "{what}: {:.1} / {:.1} MiB ({}%), {rate:.1} MiB/s",
            done as f64 / MIB,
            total as f64 / MIB,
            (done.min(total) * 100) / total
        )
    } else {
        format!("{what}: {:.1} MiB, {rate:.1} MiB/s", done as f64 / MIB)
    }
}

#[cfg(test)]
#[test]
fn lines() {
    assert_eq!(
        line(
            "writing pages of PID 7",
            512 << 20,
            2048 << 20,
            Duration::from_secs(2)
        ),
        "writing pages of PID 7: 512.0 / 2048.0 MiB (25%), 256.0 MiB/s"
    );
    assert_eq!(
        line("receiving", 3 << 20, 0, Duration::from_secs(1)),
        "receiving: 3.0 MiB, 3.0 MiB/s"
    );
}
