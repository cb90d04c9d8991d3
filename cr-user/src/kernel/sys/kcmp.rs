//! kcmp(2): whether two processes share a kernel object (an open file description, an mm,
//! an fd table, fs state, signal handlers).

use anyhow::{Context, Result};

/// What kcmp compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kcmp {
    File = 0,
    Vm = 1,
    Files = 2,
    Fs = 3,
    Sighand = 4,
}

/// kcmp(pid1, pid2, kind, idx1, idx2) == 0.
fn kcmp(pid1: i32, pid2: i32, kind: Kcmp, idx1: u64, idx2: u64) -> std::io::Result<bool> {
    // SAFETY: kcmp takes integers only.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind as i32, idx1, idx2) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r == 0)
}

/// Whether `pid1` and `pid2` share the object `kind` (Vm, Files, Fs, Sighand); a failed
/// comparison (a process gone) counts as not sharing.
pub fn shares(pid1: i32, pid2: i32, kind: Kcmp) -> bool {
    kcmp(pid1, pid2, kind, 0, 0).unwrap_or(false)
}

/// Whether fd `fd1` of `pid1` and fd `fd2` of `pid2` are one open file description.
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<bool> {
    kcmp(pid1, pid2, Kcmp::File, fd1 as u64, fd2 as u64).with_context(|| {
        if pid1 == pid2 {
            format!("kcmp(KCMP_FILE) of fds {fd1} and {fd2} of PID {pid1}")
        } else {
            format!("kcmp(KCMP_FILE) of fd {fd1} of PID {pid1} and fd {fd2} of PID {pid2}")
        }
    })
}

/// struct kcmp_epoll_slot.
#[repr(C)]
struct EpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// Whether fd `fd` of `pid` is the target file of an entry of the epoll at fd `efd` of
/// `ep_pid`: the `toff`-th entry (in the epoll's own order, as fdinfo lists them) added under
/// fd number `tfd` (KCMP_EPOLL_TFD). False also when there is no such fd or entry.
pub fn epoll_target_is(pid: i32, fd: i32, ep_pid: i32, efd: i32, tfd: i32, toff: u32) -> bool {
    let slot = EpollSlot {
        efd: efd as u32,
        tfd: tfd as u32,
        toff,
    };
    // SAFETY: the kernel reads one kcmp_epoll_slot from the valid pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            ep_pid,
            7, /* KCMP_EPOLL_TFD */
            fd as u64,
            &slot as *const EpollSlot as u64,
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_dup_is_the_same_file() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let d = f.try_clone().unwrap();
        let g = std::fs::File::open("/proc/self/stat").unwrap();
        let me = std::process::id() as i32;
        assert!(same_file(me, f.as_raw_fd(), me, d.as_raw_fd()).unwrap());
        assert!(!same_file(me, f.as_raw_fd(), me, g.as_raw_fd()).unwrap());
        assert!(shares(me, me, Kcmp::Vm));
        let e = same_file(me, 99_999, me, 1).unwrap_err();
        assert!(format!("{e:#}").contains("fds 99999 and 1"), "{e:#}");
    }
}
