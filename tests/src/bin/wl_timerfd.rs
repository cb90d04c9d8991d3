//! Workload: timerfds on every clock (tests/tests/restore_events.rs).
//!
//! | fd | clock            | set as                                   | checked after the restore |
//! |----|------------------|------------------------------------------|---------------------------|
//! | 10 | MONOTONIC        | in 1 h, one-shot                          | deadline, no expiration   |
//! | 11 | BOOTTIME         | in 1 h, then every 7 s                    | deadline, interval exact  |
//! | 12 | REALTIME         | ABSTIME|CANCEL_ON_SET at now + 1 h         | same absolute deadline, flags |
//! | 13 | MONOTONIC        | ABSTIME at now + 1 h                      | same absolute deadline    |
//! | 14 | REALTIME_ALARM   | in 1 h (when the clock can be had here)   | deadline, clock           |
//! | 15 | BOOTTIME_ALARM   | in 2 h, every 1 h                         | deadline, clock           |
//! | 16 | MONOTONIC        | every 10 ms, 3+ expirations left unread   | none lost, still firing   |
//! | 17 | MONOTONIC        | one-shot 1 ms, expired, unread            | exactly 1, then disarmed  |
//! | 18 | MONOTONIC        | never set, TFD_NONBLOCK|TFD_CLOEXEC       | disarmed, EAGAIN, flags   |
//!
//! A relative timer may come back with its deadline where it was (the clock ran on while the
//! process was checkpointed) or later by at most the time the process spent checkpointed (the
//! timer was frozen with it, as CRIU does); never earlier, and never re-armed to its full
//! initial value from the moment of restore. An absolute timer keeps its deadline. fd 16 is
//! CRIU 4.2's loss: a periodic timer with expirations not yet read comes back disarmed.
//!
//! Usage: wl_timerfd

use std::time::Duration;

use cr_tests::fdinfo;
use cr_tests::workload::{ready, wait_for_check, Checker};

const HOUR: i64 = 3600;
/// How far a deadline may move for reasons of measurement alone.
const SLACK: Duration = Duration::from_millis(100);

/// `clock` now. An *_ALARM clock is read as the clock it runs on (REALTIME, BOOTTIME): without
/// an RTC device, clock_gettime(CLOCK_*_ALARM) fails (EINVAL) though timerfds on it work.
fn now(clock: libc::clockid_t) -> Duration {
    let clock = match clock {
        libc::CLOCK_REALTIME_ALARM => libc::CLOCK_REALTIME,
        libc::CLOCK_BOOTTIME_ALARM => libc::CLOCK_BOOTTIME,
        c => c,
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(
        r,
        0,
        "clock_gettime({clock}): {}",
        std::io::Error::last_os_error()
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ts(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    }
}

fn dur(t: libc::timespec) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// timerfd_create moved to `at`; false when the clock cannot be had (an *_ALARM clock without
/// CAP_WAKE_ALARM).
fn create(clock: libc::clockid_t, flags: i32, at: i32) -> bool {
    // SAFETY: plain syscalls on fds we own.
    unsafe {
        let fd = libc::timerfd_create(clock, flags);
        if fd < 0 {
            return false;
        }
        assert_eq!(
            libc::dup3(fd, at, flags & libc::TFD_CLOEXEC),
            at,
            "dup3 to {at}"
        );
        libc::close(fd);
    }
    true
}

fn settime(fd: i32, flags: i32, value: Duration, interval: Duration) {
    let its = libc::itimerspec {
        it_interval: ts(interval),
        it_value: ts(value),
    };
    // SAFETY: a valid itimerspec.
    let r = unsafe { libc::timerfd_settime(fd, flags, &its, std::ptr::null_mut()) };
    assert_eq!(
        r,
        0,
        "timerfd_settime {fd}: {}",
        std::io::Error::last_os_error()
    );
}

/// (remaining, interval) as timerfd_gettime reports them.
fn gettime(fd: i32) -> (Duration, Duration) {
    // SAFETY: an all-zero itimerspec is valid; timerfd_gettime fills it.
    let its = unsafe {
        let mut its: libc::itimerspec = std::mem::zeroed();
        libc::timerfd_gettime(fd, &mut its);
        its
    };
    (dur(its.it_value), dur(its.it_interval))
}

/// Expirations read from `fd` (blocking unless the fd is nonblocking), or the errno.
fn read_ticks(fd: i32) -> Result<u64, i32> {
    let mut v = 0u64;
    // SAFETY: an 8-byte read into a u64.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn set_nonblocking(fd: i32, on: bool) {
    // SAFETY: F_GETFL/F_SETFL on our fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fl = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, fl);
    }
}

/// A timer whose deadline the check verifies.
struct Timer {
    fd: i32,
    clock: libc::clockid_t,
    /// The clock's reading at the deadline.
    deadline: Duration,
    interval: Duration,
    absolute: bool,
}

impl Timer {
    fn set(fd: i32, clock: libc::clockid_t, flags: i32, after: Duration, every: Duration) -> Timer {
        let deadline = now(clock) + after;
        if flags & libc::TFD_TIMER_ABSTIME != 0 {
            settime(fd, flags, deadline, every);
        } else {
            settime(fd, flags, after, every);
        }
        Timer {
            fd,
            clock,
            deadline,
            interval: every,
            absolute: flags & libc::TFD_TIMER_ABSTIME != 0,
        }
    }

    /// `since_ready`: how long ago (on the monotonic clock, as this process sees it) READY
    /// was said: the most the process can have spent checkpointed.
    fn check(&self, c: &mut Checker, since_ready: Duration) {
        let (left, every) = gettime(self.fd);
        let at = now(self.clock) + left;
        let fd = self.fd;
        c.eq(every, self.interval, &format!("fd {fd}: interval"));
        c.check(
            left > Duration::ZERO,
            format!(
                "fd {fd}: disarmed (it was due in {:?})",
                self.deadline.saturating_sub(now(self.clock))
            ),
        );
        let latest = if self.absolute {
            self.deadline + SLACK
        } else {
            self.deadline + since_ready + SLACK
        };
        c.check(
            at + SLACK >= self.deadline && at <= latest,
            format!(
                "fd {fd}: deadline moved by {:+.3} s (allowed: 0 to {:+.3} s)",
                at.as_secs_f64() - self.deadline.as_secs_f64(),
                latest.as_secs_f64() - self.deadline.as_secs_f64()
            ),
        );
        c.check(!readable(fd, 0), format!("fd {fd}: expired"));
    }
}

fn main() {
    let h = Duration::from_secs(HOUR as u64);
    let mut timers = Vec::new();
    assert!(create(libc::CLOCK_MONOTONIC, 0, 10));
    timers.push(Timer::set(10, libc::CLOCK_MONOTONIC, 0, h, Duration::ZERO));
    assert!(create(libc::CLOCK_BOOTTIME, 0, 11));
    timers.push(Timer::set(
        11,
        libc::CLOCK_BOOTTIME,
        0,
        h,
        Duration::from_secs(7),
    ));
    assert!(create(libc::CLOCK_REALTIME, 0, 12));
    let abs_cancel = libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET;
    timers.push(Timer::set(
        12,
        libc::CLOCK_REALTIME,
        abs_cancel,
        h,
        Duration::ZERO,
    ));
    assert!(create(libc::CLOCK_MONOTONIC, 0, 13));
    timers.push(Timer::set(
        13,
        libc::CLOCK_MONOTONIC,
        libc::TFD_TIMER_ABSTIME,
        h,
        Duration::ZERO,
    ));
    let mut alarms = Vec::new();
    if create(libc::CLOCK_REALTIME_ALARM, 0, 14) {
        timers.push(Timer::set(
            14,
            libc::CLOCK_REALTIME_ALARM,
            0,
            h,
            Duration::ZERO,
        ));
        alarms.push(14);
    }
    if create(libc::CLOCK_BOOTTIME_ALARM, 0, 15) {
        timers.push(Timer::set(15, libc::CLOCK_BOOTTIME_ALARM, 0, 2 * h, h));
        alarms.push(15);
    }
    // fd 16: every 10 ms; wait (on a one-shot timerfd, not a sleep) until at least three
    // expirations are there, unread.
    let tick = Duration::from_millis(10);
    assert!(create(libc::CLOCK_MONOTONIC, 0, 16));
    let armed_16 = now(libc::CLOCK_MONOTONIC);
    settime(16, 0, tick, tick);
    assert!(create(libc::CLOCK_MONOTONIC, 0, 19));
    settime(19, 0, Duration::from_millis(35), Duration::ZERO);
    read_ticks(19).expect("wait 35 ms on fd 19");
    // SAFETY: closing our helper fd.
    unsafe { libc::close(19) };
    // fd 17: one-shot, expired, unread.
    assert!(create(libc::CLOCK_MONOTONIC, 0, 17));
    settime(17, 0, Duration::from_millis(1), Duration::ZERO);
    assert!(readable(17, 5000), "fd 17 never expired");
    assert!(create(
        libc::CLOCK_MONOTONIC,
        libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        18
    ));

    let all: Vec<i32> = (10..=18)
        .filter(|f| fdinfo::field(*f, "clockid").is_some())
        .collect();
    let view = |fd: i32| {
        (
            fdinfo::field(fd, "clockid"),
            fdinfo::field(fd, "settime flags"),
            fdinfo::flags(fd).map(|f| f & libc::O_NONBLOCK),
            // SAFETY: F_GETFD on our fd.
            unsafe { libc::fcntl(fd, libc::F_GETFD) },
        )
    };
    let before: Vec<_> = all.iter().map(|&f| view(f)).collect();
    let ready_at = now(libc::CLOCK_MONOTONIC);
    ready(&format!("alarms={alarms:?}"));
    wait_for_check();

    let since_ready = now(libc::CLOCK_MONOTONIC) - ready_at;
    let mut c = Checker::new();
    for (&fd, b) in all.iter().zip(&before) {
        c.eq(
            view(fd),
            b.clone(),
            &format!("fd {fd}: (clockid, settime flags, O_NONBLOCK, FD_CLOEXEC)"),
        );
    }
    for t in &timers {
        t.check(&mut c, since_ready);
    }
    // fd 16: the expirations that were there at READY are all there (plus those since, if the
    // clock ran on), and the timer still fires every 10 ms.
    set_nonblocking(16, true);
    // At most one per 10 ms since it was armed (a loaded machine may leave more than 3 at
    // READY: the wait before it is a minimum).
    let most = (now(libc::CLOCK_MONOTONIC) - armed_16).as_millis() as u64 / 10 + 1;
    match read_ticks(16) {
        Ok(n) => c.check(
            (3..=most).contains(&n),
            format!(
                "fd 16 (every 10 ms): {n} expirations unread, want 3 to {}",
                most
            ),
        ),
        Err(e) => c.check(
            false,
            format!("fd 16 (every 10 ms): read: errno {e}; its expirations are lost"),
        ),
    }
    set_nonblocking(16, false);
    c.check(
        readable(16, 1000),
        "fd 16 (every 10 ms) no longer fires".to_string(),
    );
    c.eq(gettime(16).1, tick, "fd 16: interval");
    // fd 17: exactly one expiration, then nothing.
    set_nonblocking(17, true);
    c.eq(
        read_ticks(17),
        Ok(1),
        "fd 17 (expired one-shot): expirations",
    );
    c.eq(read_ticks(17), Err(libc::EAGAIN), "fd 17: a second read");
    c.eq(
        gettime(17),
        (Duration::ZERO, Duration::ZERO),
        "fd 17: (remaining, interval)",
    );
    // fd 18: never armed.
    c.eq(
        gettime(18),
        (Duration::ZERO, Duration::ZERO),
        "fd 18: (remaining, interval)",
    );
    c.eq(
        read_ticks(18),
        Err(libc::EAGAIN),
        "fd 18 (nonblocking, unarmed): read",
    );
    c.report()
}
