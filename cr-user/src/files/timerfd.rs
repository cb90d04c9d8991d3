//! timerfds: the clock (also the *_ALARM ones, which need CAP_WAKE_ALARM), the interval, the
//! time left, expirations not yet read, and TFD_TIMER_ABSTIME / TFD_TIMER_CANCEL_ON_SET.
//!
//! Dump reads the timer through cr's copy of it: timerfd_gettime first (for a periodic timer
//! that expired it also counts the expirations since into the ticks, which the process would
//! see the same at its next read), then fdinfo's ticks. An absolute timer keeps its deadline (a
//! reading of its clock); a relative one is frozen with the process: it comes back with the
//! time it had left, so it fires late by the time spent checkpointed (as CRIU does).
//!
//! Restore: cr makes the timer, arms it, sets the ticks (TFD_IOC_SET_TICKS) and passes it.

use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;
use crate::kernel::proc;
use crate::kernel::sys::{events, time};

pub struct Timerfd;

/// The settime flags cr knows how to put back.
const SETTIME_FLAGS: u32 = (libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET) as u32;

/// The clock an *_ALARM clock runs on: what reads it (clock_gettime of an alarm clock fails
/// without an RTC device, though timers on it work).
fn base_clock(clock: i32) -> i32 {
    match clock {
        libc::CLOCK_REALTIME_ALARM => libc::CLOCK_REALTIME,
        libc::CLOCK_BOOTTIME_ALARM => libc::CLOCK_BOOTTIME,
        c => c,
    }
}

fn field<'a>(info: &'a proc::fdinfo::FdInfo, key: &str, what: &str) -> Result<&'a str> {
    info.get(key)
        .with_context(|| format!("{what}: no {key:?} in fdinfo"))
}

impl FileKind for Timerfd {
    fn name(&self) -> &'static str {
        "a timerfd"
    }

    fn recognise(&self, p: &Probe, _cx: &DumpCx) -> Result<Option<Verdict>> {
        Ok((p.target == "anon_inode:[timerfd]").then_some(Verdict::Dump))
    }

    fn dump(&self, p: &Probe, _id: u32, _cx: &mut DumpCx) -> Result<Kind> {
        let what = format!("timerfd fd {} of PID {}", p.fd, p.pid);
        let mine = p.copy()?;
        let (remaining_ns, interval_ns) =
            events::timerfd_gettime(&mine).with_context(|| what.clone())?;
        // After gettime: the ticks now include a periodic timer's expirations since it fired.
        let info = proc::fdinfo::read_fdinfo(p.pid, p.fd).with_context(|| what.clone())?;
        let clockid: i32 = field(&info, "clockid", &what)?
            .parse()
            .with_context(|| format!("{what}: clockid"))?;
        let ticks: u64 = field(&info, "ticks", &what)?
            .parse()
            .with_context(|| format!("{what}: ticks"))?;
        let flags_text = field(&info, "settime flags", &what)?;
        let settime_flags = u32::from_str_radix(flags_text, 8)
            .with_context(|| format!("{what}: settime flags {flags_text:?}"))?;
        if settime_flags & !SETTIME_FLAGS != 0 {
            bail!("{what}: settime flags {settime_flags:#o} include some cr does not know");
        }
        let deadline_ns =
            if settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0 && remaining_ns != 0 {
                time::now(base_clock(clockid)) + remaining_ns
            } else {
                0
            };
        Ok(Kind::Timerfd(pb::TimerfdFile {
            clockid,
            settime_flags,
            remaining_ns,
            interval_ns,
            deadline_ns,
            ticks,
        }))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Timerfd(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        matches!(k, Kind::Timerfd(_)).then(|| "timerfd".into())
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let Some(Kind::Timerfd(t)) = &f.kind else {
            bail!("internal: file {} is not a timerfd", f.id)
        };
        let what = format!("the timerfd of fd {fd_no} (clock {})", t.clockid);
        let tfd_flags = libc::TFD_CLOEXEC | (flags as i32 & libc::O_NONBLOCK);
        let mine = events::timerfd_create(t.clockid, tfd_flags)
            .with_context(|| format!("make {what} (an *_ALARM clock needs CAP_WAKE_ALARM)"))?;
        let abs = t.settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0;
        let value = match (t.remaining_ns, abs) {
            (0, _) => 0,
            (_, true) => t.deadline_ns,
            (r, false) => r,
        };
        // Always set, even disarmed: that is where TFD_TIMER_CANCEL_ON_SET is recorded.
        events::timerfd_settime(&mine, t.settime_flags as i32, value, t.interval_ns)
            .with_context(|| format!("arm {what}"))?;
        if t.ticks != 0 {
            events::timerfd_set_ticks(&mine, t.ticks)
                .with_context(|| format!("{what}: put back {} unread expirations", t.ticks))?;
        }
        o.install_from_cr(mine.as_raw_fd(), &what)
    }
}
