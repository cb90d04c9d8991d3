//! Workload: signalfds (tests/tests/restore_events.rs).
//!
//! - fd 10: mask {SIGHUP, SIGUSR2, SIGRTMIN+3}, SFD_NONBLOCK | SFD_CLOEXEC. Before READY, with
//!   those signals blocked, SIGHUP (kill) and two SIGRTMIN+3 (sigqueue, values 31 and 32) are
//!   left pending: after the restore fd 10 reads them back, SIGHUP first, then the real-time
//!   ones in order with their values and our PID as the sender, then EAGAIN.
//! - fd 11: mask {SIGWINCH, SIGCHLD}, blocking, its mask set by a second signalfd(2) call on
//!   the same fd (the mask is the last one set).
//! - fd 12: a dup of fd 10.
//!
//! After the restore, fdinfo's `sigmask` and the flags are as before; SIGUSR2 raised then is
//! read from fd 12 (fd 10's description), SIGWINCH from fd 11 only, and neither fd shows a
//! signal outside its mask.
//!
//! Usage: wl_signalfd

use cr_tests::fdinfo;
use cr_tests::sys::{blocked_mask, set_blocked_mask, sig_bit};
use cr_tests::workload::{ready, wait_for_check, Checker};

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for &g in sigs {
            libc::sigaddset(&mut s, g);
        }
        s
    }
}

/// One siginfo read from a signalfd: (signo, code, pid, int value), or the errno.
fn read_sig(fd: i32) -> Result<(u32, i32, u32, i32), i32> {
    // SAFETY: signalfd_siginfo is plain data; the read fills it or fails.
    unsafe {
        let mut si: libc::signalfd_siginfo = std::mem::zeroed();
        let n = libc::read(
            fd,
            (&mut si as *mut libc::signalfd_siginfo).cast(),
            std::mem::size_of::<libc::signalfd_siginfo>(),
        );
        if n as usize == std::mem::size_of::<libc::signalfd_siginfo>() {
            Ok((si.ssi_signo, si.ssi_code, si.ssi_pid, si.ssi_int))
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
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

fn main() {
    let rt3 = libc::SIGRTMIN() + 3;
    let mine = [
        libc::SIGHUP,
        libc::SIGUSR2,
        rt3,
        libc::SIGWINCH,
        libc::SIGCHLD,
    ];
    let mask = mine.iter().fold(blocked_mask(), |m, &s| m | sig_bit(s));
    set_blocked_mask(mask | sig_bit(libc::SIGUSR1));
    // SAFETY: creating signalfds at reserved numbers and queueing blocked signals to
    // ourselves.
    let me = unsafe {
        let a = libc::signalfd(
            -1,
            &sigset(&[libc::SIGHUP, libc::SIGUSR2, rt3]),
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        );
        assert!(a >= 0, "signalfd");
        assert_eq!(libc::dup3(a, 10, libc::O_CLOEXEC), 10);
        libc::close(a);
        let b = libc::signalfd(-1, &sigset(&[libc::SIGTERM]), 0);
        assert!(b >= 0, "signalfd");
        assert_eq!(libc::dup2(b, 11), 11);
        libc::close(b);
        assert_eq!(
            libc::signalfd(11, &sigset(&[libc::SIGWINCH, libc::SIGCHLD]), 0),
            11,
            "signalfd on fd 11 (new mask)"
        );
        assert_eq!(libc::dup2(10, 12), 12);
        let me = libc::getpid();
        libc::kill(me, libc::SIGHUP);
        for v in [31, 32] {
            let r = libc::sigqueue(
                me,
                rt3,
                libc::sigval {
                    sival_ptr: v as usize as *mut libc::c_void,
                },
            );
            assert_eq!(r, 0, "sigqueue");
        }
        me as u32
    };
    let view = |fd: i32| {
        (
            fdinfo::field(fd, "sigmask"),
            fdinfo::flags(fd).map(|f| f & libc::O_NONBLOCK),
            // SAFETY: F_GETFD on our fd.
            unsafe { libc::fcntl(fd, libc::F_GETFD) },
        )
    };
    let fds = [10, 11, 12];
    let before: Vec<_> = fds.iter().map(|&f| view(f)).collect();
    ready("");
    wait_for_check();

    let mut c = Checker::new();
    for (&fd, b) in fds.iter().zip(&before) {
        c.eq(
            view(fd),
            b.clone(),
            &format!("fd {fd}: (sigmask, O_NONBLOCK, FD_CLOEXEC)"),
        );
    }
    c.check(
        !readable(11, 0),
        "fd 11 readable before any of its signals came",
    );
    let got: Vec<_> = (0..4).map(|_| read_sig(10)).collect();
    c.eq(
        got,
        vec![
            Ok((libc::SIGHUP as u32, libc::SI_USER, me, 0)),
            Ok((rt3 as u32, libc::SI_QUEUE, me, 31)),
            Ok((rt3 as u32, libc::SI_QUEUE, me, 32)),
            Err(libc::EAGAIN),
        ],
        "fd 10: the signals pending at READY (signo, code, pid, value)",
    );
    // SAFETY: signals to ourselves, all blocked.
    unsafe {
        libc::kill(me as i32, libc::SIGUSR2);
        libc::kill(me as i32, libc::SIGWINCH);
    }
    c.eq(
        read_sig(12).map(|s| s.0),
        Ok(libc::SIGUSR2 as u32),
        "fd 12 (dup of fd 10): SIGUSR2",
    );
    c.eq(
        read_sig(10),
        Err(libc::EAGAIN),
        "fd 10 after SIGWINCH (not in its mask)",
    );
    c.check(readable(11, 1000), "fd 11 does not see SIGWINCH");
    c.eq(
        read_sig(11).map(|s| s.0),
        Ok(libc::SIGWINCH as u32),
        "fd 11: SIGWINCH",
    );
    c.report()
}
