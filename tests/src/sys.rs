//! Thin syscall wrappers that several workloads (and the harness) need alike: pipes, fresh
//! anonymous memory, and the blocked-signal mask as the kernel stores it.

use std::os::fd::{FromRawFd, OwnedFd};

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe_cloexec() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 returned two fresh fds we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A fresh private anonymous read/write mapping of `len` bytes where the kernel chooses;
/// returns its address.
pub fn mmap_anon(len: usize) -> std::io::Result<usize> {
    // SAFETY: a new mapping at an address of the kernel's choosing: nothing of ours is there.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p as usize)
}

/// The bit of signal `sig` in a 64-bit signal mask (bit n-1 for signal n, as the kernel has it).
pub fn sig_bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// This thread's blocked mask as the kernel's 64-bit word (the libc sigset_t is larger and
/// hides nothing more). Async-signal-safe: handlers call it to record the mask they run with.
pub fn blocked_mask() -> u64 {
    let mut m: u64 = 0;
    // SAFETY: rt_sigprocmask(SIG_BLOCK, NULL, &m, 8) only reads the mask into `m`.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            std::ptr::null::<u64>(),
            &mut m as *mut u64,
            8,
        )
    };
    m
}

/// Sets this thread's blocked mask to exactly `mask` (bits as in [`sig_bit`]).
pub fn set_blocked_mask(mask: u64) {
    // SAFETY: rt_sigprocmask(SIG_SETMASK, &mask, NULL, 8) reads `mask` only.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            std::ptr::null_mut::<u64>(),
            8,
        )
    };
}
