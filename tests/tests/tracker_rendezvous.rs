//! The tracker's socket cannot be taken by another user, and a killed tracker does not block
//! the next one (cr-user/src/tracker/rendezvous.rs).
//!
//! cr once listened on the abstract name `@cr-track-PID`, which any local user could bind first
//! and so make every tracked dump of that PID fail. Now the socket lives in /run/cr (root's,
//! 0700), guarded by a lock held for the tracker's life.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use cr_tests::{pre_dump_then_dump_and_restore, procfs, CrCmd, TempDir, Workload};

/// The tests share /run/cr, and one of them changes its mode: one at a time.
static RUN_CR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    RUN_CR.lock().unwrap_or_else(|e| e.into_inner())
}

/// A process of uid/gid 65534 that binds the old abstract name `@cr-track-PID` and tries to
/// create /run/cr/PID.sock; it reports on a pipe ("bound-abstract <errno of the path bind>")
/// and then waits to be killed. Returns its pid and the report.
fn squatter(pid: i32) -> (i32, String) {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 into a two-int array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let abs = format!("\0cr-track-{pid}");
    let path = format!("/run/cr/{pid}.sock");
    // SAFETY: the child uses only raw syscalls (async-signal-safe) on memory prepared before
    // the fork, then pauses until killed; it never returns into the test harness.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        // SAFETY: raw syscalls on buffers made before the fork.
        unsafe {
            libc::close(p[0]);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                libc::_exit(2);
            }
            let bind = |name: &[u8]| -> i32 {
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                let mut a: libc::sockaddr_un = std::mem::zeroed();
                a.sun_family = libc::AF_UNIX as u16;
                for (i, b) in name.iter().enumerate() {
                    a.sun_path[i] = *b as libc::c_char;
                }
                let len = (std::mem::size_of::<libc::sa_family_t>() + name.len()) as u32;
                if libc::bind(s, &a as *const _ as *const libc::sockaddr, len) != 0 {
                    return *libc::__errno_location();
                }
                libc::listen(s, 1);
                0
            };
            let e_abs = bind(abs.as_bytes());
            let e_path = bind(path.as_bytes());
            let msg = format!("abstract={e_abs} path={e_path}\n");
            libc::write(p[1], msg.as_ptr().cast(), msg.len());
            libc::close(p[1]);
            loop {
                libc::pause();
            }
        }
    }
    // SAFETY: the write end was ours; the child has its own copy.
    unsafe { libc::close(p[1]) };
    // SAFETY: p[0] is an fd we own from here on.
    let mut r = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(p[0]) });
    let mut report = String::new();
    r.read_to_string(&mut report).unwrap();
    (child, report.trim().to_string())
}

fn kill_and_reap(pid: i32) {
    // SAFETY: signalling and reaping our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

#[test]
fn another_user_cannot_take_the_trackers_place() {
    let _serial = one_at_a_time();
    let d = TempDir::new("rdv-squat");
    let mut w = Workload::start("wl_steady", &["1", "4"], &d);
    let _ = std::fs::create_dir("/run/cr");
    let (sq, report) = squatter(w.pid);
    // The old name is still free to anyone (that is the point); the directory is not.
    assert_eq!(
        report,
        format!("abstract=0 path={}", libc::EACCES),
        "the squatter's report"
    );
    pre_dump_then_dump_and_restore(&mut w, &d, &[], &[], &[], || {});
    kill_and_reap(sq);
    w.assert_pass();
}

#[test]
fn a_planted_directory_is_refused_naming_it() {
    let _serial = one_at_a_time();
    // Runs as root, so plant a mode the check refuses on root's own directory instead of
    // another owner: a group-writable /run/cr is refused, and nothing is dumped.
    let d = TempDir::new("rdv-planted");
    let mut w = Workload::start("wl_steady", &["1", "4"], &d);
    let _ = std::fs::create_dir("/run/cr");
    use std::os::unix::fs::PermissionsExt;
    let before = std::fs::metadata("/run/cr").unwrap().permissions().mode();
    std::fs::set_permissions("/run/cr", std::fs::Permissions::from_mode(0o770)).unwrap();
    let o = CrCmd::pre_dump(w.pid, d.join("p1")).run();
    std::fs::set_permissions("/run/cr", std::fs::Permissions::from_mode(before & 0o7777)).unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "pre-dump with an open /run/cr: {err}");
    assert!(
        err.contains("/run/cr"),
        "the error does not name /run/cr: {err}"
    );
    assert!(procfs::running(w.pid));
    assert_eq!(procfs::tracer_of(w.pid), 0);
    w.assert_pass();
}

#[test]
fn a_killed_tracker_leaves_no_obstacle() {
    let _serial = one_at_a_time();
    let d = TempDir::new("rdv-killed");
    let mut w = Workload::start("wl_steady", &["1", "4"], &d);
    CrCmd::pre_dump(w.pid, d.join("p1")).ok();
    let t = procfs::trackers(w.pid);
    assert_eq!(t.len(), 1, "one tracker after the pre-dump: {t:?}");
    // SAFETY: signalling the tracker process.
    unsafe { libc::kill(t[0], libc::SIGKILL) };
    let sock = format!("/run/cr/{}.sock", w.pid);
    // The leader turns zombie before its other threads are gone, and the listening socket
    // lives until the last of them is: wait until the kernel lists the socket no more (a
    // connection before that reaches the dying tracker and is reset).
    let listed = || {
        std::fs::read_to_string("/proc/net/unix")
            .unwrap()
            .lines()
            .any(|l| l.ends_with(&sock))
    };
    while procfs::running(t[0]) || listed() {
        std::thread::yield_now();
    }
    assert!(
        std::path::Path::new(&sock).exists(),
        "a SIGKILLed tracker cannot remove its socket; this test needs it left"
    );
    // The next pre-dump starts a new tracker over the stale socket.
    CrCmd::pre_dump(w.pid, d.join("p2")).ok();
    let t2 = procfs::trackers(w.pid);
    assert_eq!(t2.len(), 1, "one tracker after the second pre-dump: {t2:?}");
    assert_ne!(t2[0], t[0]);
    // And a tracked dump that leaves the target running, then stops tracking.
    CrCmd::dump(w.pid, d.join("img"))
        .args(&["-R", "--track-mem", "--prev-images-dir", "../p2"])
        .ok();
    w.assert_pass();
}
