//! Workload: a task checkpointed while blocked inside a syscall resumes that syscall correctly.
//!
//! Usage: wl_syscall MODE [EXPECTED_EINTR]
//!
//! The harness waits until /proc/PID/syscall shows the task blocked in the syscall, then dumps.
//! - `nanosleep N`, `clock-rel N`: sleep (SYS_nanosleep / clock_nanosleep relative) until an
//!   absolute CLOCK_MONOTONIC deadline ~2 s away, re-sleeping the remainder after EINTR. Such a
//!   sleep stops with -ERESTART_RESTARTBLOCK; its restart block (the remaining time) lives in the
//!   kernel task and is gone after a restore, so there the call returns EINTR once (as with
//!   CRIU); with -R or undisturbed it simply continues. N is the number of EINTRs expected.
//! - `clock-abs N`: clock_nanosleep(TIMER_ABSTIME) stops with -ERESTARTNOHAND and is simply
//!   re-executed with the same deadline: no EINTR, ever.
//!   In these three modes SIGUSR1 is blocked and waited for after the deadline.
//! - `read-restart`: read() on a pipe that gets data only from the SIGUSR1 handler, which has
//!   SA_RESTART: read is restarted after the handler and returns the data.
//! - `read-eintr`: the same without SA_RESTART: read fails with EINTR, the data is then there.
//! - `pause`: pause() returns EINTR after the SIGUSR1 handler.
//! - `sigsuspend`: blocked {USR1, USR2}, sigsuspend with {WINCH}: the handler runs with
//!   {WINCH, USR1} blocked, and afterwards the mask is {USR1, USR2} again (the kernel's saved
//!   mask must be the original one after restore).
//! - `futex`: FUTEX_WAIT without timeout until the SIGUSR1 handler (SA_RESTART) sets the word.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use cr_tests::sys::{blocked_mask, set_blocked_mask, sig_bit};
use cr_tests::workload::{ready, wait_for_check, Checker};

static PIPE_W: AtomicI32 = AtomicI32::new(-1);
static HANDLED: AtomicU32 = AtomicU32::new(0);
/// The blocked mask seen inside the handler.
static HANDLER_MASK: AtomicU64 = AtomicU64::new(0);
static FUTEX_WORD: AtomicU32 = AtomicU32::new(0);

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn now_mono() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ts(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    }
}

extern "C" fn on_usr1(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    HANDLER_MASK.store(blocked_mask(), Ordering::SeqCst);
    let w = PIPE_W.load(Ordering::SeqCst);
    if w >= 0 {
        // SAFETY: write(2) of a static buffer; async-signal-safe.
        unsafe { libc::write(w, b"ping".as_ptr().cast(), 4) };
    }
    FUTEX_WORD.store(1, Ordering::SeqCst);
    // SAFETY: FUTEX_WAKE on a static word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            FUTEX_WORD.as_ptr(),
            libc::FUTEX_WAKE,
            1,
            0,
            0,
            0,
        )
    };
}

fn install_usr1(flags: i32) {
    // SAFETY: the handler only uses async-signal-safe syscalls and atomics.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = flags;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

/// Sleeps until `deadline` with the given kind of call; returns how many calls failed with EINTR.
fn sleep_until(c: &mut Checker, mode: &str, deadline: Duration) -> u32 {
    let mut eintr = 0;
    loop {
        let now = now_mono();
        if now >= deadline {
            return eintr;
        }
        let rel = ts(deadline - now);
        let abs = ts(deadline);
        // SAFETY: the sleep syscalls with valid timespec pointers and no remainder pointer.
        let r = unsafe {
            match mode {
                "nanosleep" => libc::syscall(
                    libc::SYS_nanosleep,
                    &rel,
                    std::ptr::null_mut::<libc::timespec>(),
                ),
                "clock-rel" => libc::syscall(
                    libc::SYS_clock_nanosleep,
                    libc::CLOCK_MONOTONIC,
                    0,
                    &rel,
                    std::ptr::null_mut::<libc::timespec>(),
                ),
                _ => libc::syscall(
                    libc::SYS_clock_nanosleep,
                    libc::CLOCK_MONOTONIC,
                    libc::TIMER_ABSTIME,
                    &abs,
                    std::ptr::null_mut::<libc::timespec>(),
                ),
            }
        };
        // syscall(2) reports every failure as -1/errno.
        let err = if r == 0 { 0 } else { errno() };
        match err {
            0 => {}
            libc::EINTR => eintr += 1,
            e => {
                c.check(false, format!("{mode}: error {e}"));
                return eintr;
            }
        }
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let expected_eintr: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut c = Checker::new();
    match mode.as_str() {
        "nanosleep" | "clock-rel" | "clock-abs" => {
            set_blocked_mask(sig_bit(libc::SIGUSR1));
            let deadline = now_mono() + Duration::from_secs(2);
            ready("");
            let eintr = sleep_until(&mut c, &mode, deadline);
            let late = now_mono().saturating_sub(deadline);
            c.eq(eintr, expected_eintr, "sleeps that ended in EINTR");
            c.check(
                late < Duration::from_secs(2),
                format!("woke {late:?} after the deadline"),
            );
            wait_for_check();
        }
        "read-restart" | "read-eintr" => {
            let mut fds = [0; 2];
            // SAFETY: valid out-array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            PIPE_W.store(fds[1], Ordering::SeqCst);
            let restart = mode == "read-restart";
            install_usr1(if restart { libc::SA_RESTART } else { 0 });
            ready("");
            let mut buf = [0u8; 64];
            // SAFETY: read into a valid buffer.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            let e = errno();
            c.eq(HANDLED.load(Ordering::SeqCst), 1, "SIGUSR1 handler runs");
            if restart {
                c.eq(
                    n,
                    4,
                    "read restarted after the SA_RESTART handler returns the data",
                );
                c.eq(&buf[..4], b"ping", "data read");
            } else {
                c.eq(
                    (n, e),
                    (-1, libc::EINTR),
                    "read interrupted by a handler without SA_RESTART",
                );
                // SAFETY: read into a valid buffer (the handler wrote 4 bytes).
                let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
                c.eq(n, 4, "the data is then there");
            }
        }
        "pause" => {
            install_usr1(libc::SA_RESTART);
            ready("");
            // SAFETY: pause(2).
            let r = unsafe { libc::pause() };
            c.eq((r, errno()), (-1, libc::EINTR), "pause returns EINTR");
            c.eq(HANDLED.load(Ordering::SeqCst), 1, "SIGUSR1 handler runs");
        }
        "sigsuspend" => {
            install_usr1(0);
            let original = sig_bit(libc::SIGUSR1) | sig_bit(libc::SIGUSR2);
            set_blocked_mask(original);
            ready("");
            let temp = sig_bit(libc::SIGWINCH);
            // SAFETY: rt_sigsuspend(&temp, 8).
            let r = unsafe { libc::syscall(libc::SYS_rt_sigsuspend, &temp as *const u64, 8) };
            c.eq((r, errno()), (-1, libc::EINTR), "sigsuspend returns EINTR");
            c.eq(HANDLED.load(Ordering::SeqCst), 1, "SIGUSR1 handler runs");
            c.eq(
                HANDLER_MASK.load(Ordering::SeqCst),
                temp | sig_bit(libc::SIGUSR1),
                "mask inside the handler",
            );
            c.eq(blocked_mask(), original, "mask after sigsuspend");
        }
        "futex" => {
            install_usr1(libc::SA_RESTART);
            ready("");
            while FUTEX_WORD.load(Ordering::SeqCst) == 0 {
                // SAFETY: FUTEX_WAIT on a static word, no timeout.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        FUTEX_WORD.as_ptr(),
                        libc::FUTEX_WAIT,
                        0,
                        0,
                        0,
                        0,
                    )
                };
                let e = errno();
                c.check(
                    r == 0 || e == libc::EAGAIN || e == libc::EINTR,
                    format!("futex wait: errno {e}"),
                );
            }
            c.eq(HANDLED.load(Ordering::SeqCst), 1, "SIGUSR1 handler runs");
        }
        _ => c.check(false, format!("unknown mode {mode:?}")),
    }
    c.report();
}
