//! File descriptors of cr's own: fcntl, pipes and tee, ioctls that report a count, terminals,
//! and fds handed to cr at exec.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

/// fcntl(fd, cmd, arg) with an integer argument; `what` names it in the error.
pub fn fcntl_int(fd: impl AsFd, cmd: i32, arg: i32, what: &str) -> Result<i32> {
    // SAFETY: fcntl with integer arguments on an fd we hold.
    let r = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| what.to_string());
    }
    Ok(r)
}

/// An ioctl that writes one int (FIONREAD, SIOCINQ, SIOCOUTQ, …); negative values read as 0.
pub fn ioctl_int(fd: impl AsFd, req: libc::c_ulong, what: &str) -> Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: these ioctls write one int to the valid pointer.
    if unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req, &mut n) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("ioctl {what}"));
    }
    Ok(n.max(0) as u32)
}

/// pipe2(flags): (read end, write end).
pub fn pipe2(flags: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds that we own now.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// tee(2) of up to `len` bytes from pipe `src` to pipe `dst` (the data stays in `src`).
pub fn tee(src: impl AsFd, dst: impl AsFd, len: usize, flags: u32) -> std::io::Result<usize> {
    // SAFETY: tee between two pipe fds we hold; no pointers.
    let n = unsafe { libc::tee(src.as_fd().as_raw_fd(), dst.as_fd().as_raw_fd(), len, flags) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether `fd` (one of cr's) is a terminal.
pub fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty on an fd number; no pointers.
    unsafe { libc::isatty(fd) == 1 }
}

/// Takes ownership of fd `fd`, which this process inherited for its sole use (a pipe end
/// passed by number on the command line). The caller must not use the number otherwise.
pub fn take_inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: the spawner passed this fd for us alone; it is owned from here (the contract
    // of this function).
    unsafe { OwnedFd::from_raw_fd(fd) }
}
