//! Event fds of cr's own: eventfd, timerfd (with TFD_IOC_SET_TICKS), signalfd, inotify (with
//! INOTIFY_IOC_SETNEXTWD), epoll_create1 and open_by_handle_at. Restore makes these objects in
//! cr and passes them to the task; dump reads a timer through cr's copy of it.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

/// TFD_IOC_SET_TICKS: _IOW('T', 0, u64).
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
/// INOTIFY_IOC_SETNEXTWD: _IOW('I', 0, __s32).
const INOTIFY_IOC_SETNEXTWD: libc::c_ulong = 0x4004_4900;

/// A fresh fd returned by a syscall, or the error naming `what`.
fn owned(r: libc::c_long, what: &str) -> Result<OwnedFd> {
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| what.to_string());
    }
    // SAFETY: the syscall just returned this fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// eventfd2(0, flags) (EFD_SEMAPHORE, EFD_NONBLOCK, EFD_CLOEXEC).
pub fn eventfd(flags: i32) -> Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_eventfd2, 0, flags) };
    owned(r, "eventfd2")
}

/// timerfd_create(clock, flags).
pub fn timerfd_create(clock: i32, flags: i32) -> Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_timerfd_create, clock, flags) };
    owned(r, &format!("timerfd_create(clock {clock})"))
}

fn ts(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    }
}

fn ns(t: libc::timespec) -> u64 {
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// timerfd_settime(fd, flags, {value, interval}) in ns.
pub fn timerfd_settime(fd: impl AsFd, flags: i32, value_ns: u64, interval_ns: u64) -> Result<()> {
    let its = libc::itimerspec {
        it_interval: ts(interval_ns),
        it_value: ts(value_ns),
    };
    // SAFETY: a valid itimerspec; no old value wanted.
    let r =
        unsafe { libc::timerfd_settime(fd.as_fd().as_raw_fd(), flags, &its, std::ptr::null_mut()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("timerfd_settime");
    }
    Ok(())
}

/// timerfd_gettime(fd): (time left, interval) in ns. For a periodic timer that expired, the
/// kernel also counts the expirations since into its ticks (what fdinfo shows after).
pub fn timerfd_gettime(fd: impl AsFd) -> Result<(u64, u64)> {
    // SAFETY: an all-zero itimerspec is valid; timerfd_gettime fills it.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::timerfd_gettime(fd.as_fd().as_raw_fd(), &mut its) } < 0 {
        return Err(std::io::Error::last_os_error()).context("timerfd_gettime");
    }
    Ok((ns(its.it_value), ns(its.it_interval)))
}

/// TFD_IOC_SET_TICKS: the timer's expirations not yet read (non-zero).
pub fn timerfd_set_ticks(fd: impl AsFd, ticks: u64) -> Result<()> {
    // SAFETY: the ioctl reads one u64 from the valid pointer.
    if unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } < 0 {
        return Err(std::io::Error::last_os_error())
            .context("ioctl TFD_IOC_SET_TICKS (needs CONFIG_CHECKPOINT_RESTORE)");
    }
    Ok(())
}

/// signalfd4(-1, mask, flags): `mask` bit N-1 is signal N.
pub fn signalfd(mask: u64, flags: i32) -> Result<OwnedFd> {
    // SAFETY: the kernel reads 8 bytes of mask from the valid pointer.
    let r = unsafe { libc::syscall(libc::SYS_signalfd4, -1, &mask, 8usize, flags) };
    owned(r, &format!("signalfd4(mask {mask:#x})"))
}

/// inotify_init1(flags).
pub fn inotify_init1(flags: i32) -> Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_inotify_init1, flags) };
    owned(r, "inotify_init1")
}

/// INOTIFY_IOC_SETNEXTWD: the next watch gets descriptor `wd` (if free).
pub fn inotify_set_next_wd(fd: impl AsFd, wd: i32) -> Result<()> {
    // SAFETY: the ioctl takes its argument by value.
    if unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            INOTIFY_IOC_SETNEXTWD,
            wd as libc::c_ulong,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!("ioctl INOTIFY_IOC_SETNEXTWD {wd} (needs CONFIG_CHECKPOINT_RESTORE)")
        });
    }
    Ok(())
}

/// inotify_add_watch(fd, path, mask) → the watch descriptor.
pub fn inotify_add_watch(fd: impl AsFd, path: &str, mask: u32) -> Result<i32> {
    let c = std::ffi::CString::new(path).with_context(|| format!("path {path:?} holds a NUL"))?;
    // SAFETY: a valid C string.
    let r = unsafe { libc::inotify_add_watch(fd.as_fd().as_raw_fd(), c.as_ptr(), mask) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("inotify_add_watch {path} mask {mask:#x}"));
    }
    Ok(r)
}

/// open_by_handle_at(mount_fd, {type, bytes}, flags) (needs CAP_DAC_READ_SEARCH).
pub fn open_by_handle_at(
    mount_fd: impl AsFd,
    handle_type: i32,
    handle: &[u8],
    flags: i32,
) -> Result<OwnedFd> {
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut buf = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    buf.extend_from_slice(&handle_type.to_ne_bytes());
    buf.extend_from_slice(handle);
    // SAFETY: buf is a complete struct file_handle of handle.len() bytes; the kernel reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_fd().as_raw_fd(),
            buf.as_mut_ptr(),
            flags,
        )
    };
    owned(r, "open_by_handle_at")
}
