//! Workload: eventfds (tests/tests/restore_events.rs). Each is checked after the restore by
//! what reading and writing it does, not only by what fdinfo shows:
//!
//! - fd 10: a counter at 7, blocking; fd 11 is a dup of it (one description).
//! - fd 12: EFD_SEMAPHORE at 3: three reads of 1, then empty (CRIU 4.2 brings it back as a
//!   plain counter: one read of 3).
//! - fd 13: EFD_NONBLOCK | EFD_CLOEXEC at 0: a read fails with EAGAIN.
//! - fd 14: EFD_SEMAPHORE | EFD_NONBLOCK at 2, close-on-exec set later with fcntl.
//! - fd 15: EFD_NONBLOCK at 0xffff_ffff_ffff_fffe, the largest count: a write of 1 would block.
//!
//! Usage: wl_eventfd

use cr_tests::fdinfo;
use cr_tests::workload::{ready, wait_for_check, Checker};

const MAX: u64 = 0xffff_ffff_ffff_fffe;

fn eventfd_at(init: u64, flags: i32, at: i32) {
    // SAFETY: plain syscalls; the fd is moved to a number the workload reserves.
    unsafe {
        let fd = libc::eventfd(0, flags);
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        if init > 0 {
            assert_eq!(libc::write(fd, (&init as *const u64).cast(), 8), 8, "seed");
        }
        assert_eq!(
            libc::dup3(fd, at, flags & libc::EFD_CLOEXEC),
            at,
            "dup3 to {at}"
        );
        libc::close(fd);
    }
}

/// read(2) of 8 bytes: the value, or the errno.
fn read_u64(fd: i32) -> Result<u64, i32> {
    let mut v = 0u64;
    // SAFETY: an 8-byte read into a u64.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn write_u64(fd: i32, v: u64) -> Result<(), i32> {
    // SAFETY: an 8-byte write from a u64.
    let n = unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// poll(2) events of `fd` right now (no waiting).
fn revents(fd: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    unsafe { libc::poll(&mut p, 1, 0) };
    p.revents
}

fn cloexec(fd: i32) -> bool {
    // SAFETY: F_GETFD on our fd.
    unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
}

/// What fdinfo and fcntl say of each fd: (status flags, cloexec, eventfd-count,
/// eventfd-semaphore). The count is read before any check touches the fd.
fn view(fd: i32) -> (Option<i32>, bool, Option<String>, Option<String>) {
    (
        fdinfo::flags(fd).map(|f| f & (libc::O_NONBLOCK | libc::O_ACCMODE)),
        cloexec(fd),
        fdinfo::field(fd, "eventfd-count"),
        fdinfo::field(fd, "eventfd-semaphore"),
    )
}

fn main() {
    eventfd_at(7, 0, 10);
    // SAFETY: dup of our own fd to a reserved number.
    assert_eq!(unsafe { libc::dup2(10, 11) }, 11);
    eventfd_at(3, libc::EFD_SEMAPHORE, 12);
    eventfd_at(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC, 13);
    eventfd_at(2, libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK, 14);
    // SAFETY: setting close-on-exec on our fd.
    unsafe { libc::fcntl(14, libc::F_SETFD, libc::FD_CLOEXEC) };
    eventfd_at(MAX, libc::EFD_NONBLOCK, 15);
    let fds = [10, 11, 12, 13, 14, 15];
    let before: Vec<_> = fds.iter().map(|&f| view(f)).collect();
    ready("");
    wait_for_check();

    let mut c = Checker::new();
    for (&fd, b) in fds.iter().zip(&before) {
        c.eq(
            view(fd),
            b.clone(),
            &format!("fd {fd}: (flags, cloexec, count, semaphore)"),
        );
    }
    // The dup shares the counter: a write through 11 adds to what 10 reads.
    c.eq(write_u64(11, 5), Ok(()), "write 5 through the dup (fd 11)");
    c.eq(read_u64(10), Ok(12), "fd 10: 7 + 5 read as one count");
    c.eq(
        revents(10) & libc::POLLIN,
        0,
        "fd 10 readable after it was read empty",
    );
    // Semaphore: one at a time, three times.
    let sem: Vec<_> = (0..3).map(|_| read_u64(12)).collect();
    c.eq(
        sem,
        vec![Ok(1), Ok(1), Ok(1)],
        "fd 12 (EFD_SEMAPHORE at 3): reads",
    );
    c.eq(
        revents(12) & libc::POLLIN,
        0,
        "fd 12 readable after three reads",
    );
    c.eq(
        read_u64(13),
        Err(libc::EAGAIN),
        "fd 13 (nonblocking, 0): read",
    );
    c.eq(write_u64(13, 9), Ok(()), "fd 13: write");
    c.eq(read_u64(13), Ok(9), "fd 13: read after the write");
    c.eq(
        (read_u64(14), read_u64(14), read_u64(14)),
        (Ok(1), Ok(1), Err(libc::EAGAIN)),
        "fd 14 (semaphore, nonblocking, at 2): reads",
    );
    c.eq(
        revents(15) & libc::POLLOUT,
        0,
        "fd 15 (at the largest count) writable",
    );
    c.eq(write_u64(15, 1), Err(libc::EAGAIN), "fd 15: write of 1");
    c.eq(read_u64(15), Ok(MAX), "fd 15: read");
    c.report()
}
