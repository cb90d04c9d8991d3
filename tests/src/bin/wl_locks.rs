//! Workload: file locks of every kind cr re-takes with --file-locks, each on its own file in DIR:
//! - `flock.lck`: flock LOCK_EX through fd 10 (fd 13 is a dup of it: one description),
//! - `posix.lck`: POSIX read lock on bytes 10-19 and write lock on bytes 100-199 through fd 11,
//! - `ofd.lck`:   OFD write lock on bytes 0-4095 through fd 12.
//!
//! The harness checks from outside that each is held (F_GETLK, F_OFD_GETLK, flock LOCK_NB). On
//! SIGUSR1 the workload checks its fdinfo shows each lock on the right fd, and that it can still
//! unlock and take each lock again (it owns them).
//!
//! Mode `tree` adds a child, forked once the locks are held: it shares the flock and OFD
//! descriptions and takes its own POSIX write lock on bytes 300-399 of `posix.lck` through the
//! inherited fd 11 (a POSIX lock belongs to a process: restore must give it to the child).
//! On check, the root signals the child, which checks its own fdinfo and re-locks its range.
//!
//! Usage: wl_locks DIR [tree]   (READY says `pids=ROOT[,CHILD]`)

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cr_tests::workload::{block_check_signal, ready, wait_for_check, Checker};

const FD_FLOCK: i32 = 10;
const FD_POSIX: i32 = 11;
const FD_OFD: i32 = 12;
const FD_FLOCK_DUP: i32 = 13;

fn open_at(path: &Path, at: i32) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string; plain fd syscalls.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644);
        assert!(
            fd >= 0,
            "open {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        assert!(
            libc::dup2(fd, at) == at,
            "dup2: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

/// fcntl(fd, cmd, &flock{ty, SEEK_SET, start, len}); Ok or the errno.
fn setlk(fd: i32, cmd: i32, ty: i32, start: i64, len: i64) -> Result<(), std::io::Error> {
    // SAFETY: struct flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with a valid struct flock pointer.
    if unsafe { libc::fcntl(fd, cmd, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn flock(fd: i32, op: i32) -> Result<(), std::io::Error> {
    // SAFETY: plain flock(2).
    if unsafe { libc::flock(fd, op) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The lock lines of /proc/self/fdinfo/FD as (KIND, ACCESS, START, END) tuples.
fn fdinfo_locks(fd: i32) -> Vec<(String, String, String, String)> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            // ID: KIND MODE ACCESS PID DEV START END
            (t.len() == 8).then(|| {
                (
                    t[1].to_string(),
                    t[3].to_string(),
                    t[6].to_string(),
                    t[7].to_string(),
                )
            })
        })
        .collect()
}

/// Checks that /proc/self/fdinfo/FD shows exactly the locks `want`, each (KIND, ACCESS, START,
/// END) as fdinfo spells them, in any order.
fn expect_locks(c: &mut Checker, fd: i32, want: &[(&str, &str, &str, &str)], what: &str) {
    let mut got = fdinfo_locks(fd);
    got.sort();
    let mut want: Vec<_> = want
        .iter()
        .map(|(k, a, st, e)| (k.to_string(), a.to_string(), st.to_string(), e.to_string()))
        .collect();
    want.sort();
    c.eq(got, want, what);
}

/// Unlocks `start`..+`len` through `fd` (`cmd`: F_SETLK or F_OFD_SETLK), then takes it again
/// as `ty`, without blocking: both work only while the lock is ours (one someone else took
/// meanwhile makes the second fail).
fn check_relock(c: &mut Checker, fd: i32, cmd: i32, ty: i32, (start, len): (i64, i64), what: &str) {
    c.check(
        setlk(fd, cmd, libc::F_UNLCK, start, len).is_ok(),
        format!("{what}: unlock"),
    );
    c.check(
        setlk(fd, cmd, ty, start, len).is_ok(),
        format!("{what}: lock again"),
    );
}

/// The child of mode `tree`: its POSIX lock, then "ready" on `w`, then its own check on
/// SIGUSR1; exits 0 (pass) or 1, printing its failures on stderr.
fn child(w: i32) -> ! {
    // SAFETY: the harness reads the ready pipe (fd 3) to its end: only the root may hold it.
    unsafe { libc::close(3) };
    // SIGUSR1 may come as soon as the parent is told to check: block it before saying ready,
    // so it waits for wait_for_check instead of killing us.
    block_check_signal();
    let mut c = Checker::new();
    setlk(FD_POSIX, libc::F_SETLK, libc::F_WRLCK, 300, 100).expect("child POSIX write lock");
    // SAFETY: one byte to the pipe the parent waits on, then closed.
    unsafe {
        libc::write(w, b"r".as_ptr().cast(), 1);
        libc::close(w);
    }
    wait_for_check();
    // Its own POSIX lock only (the parent's are not the child's), and the shared descriptions'.
    expect_locks(
        &mut c,
        FD_POSIX,
        &[("POSIX", "WRITE", "300", "399")],
        "child: locks shown on the POSIX fd",
    );
    expect_locks(
        &mut c,
        FD_FLOCK,
        &[("FLOCK", "WRITE", "0", "EOF")],
        "child: locks shown on the shared flock fd",
    );
    expect_locks(
        &mut c,
        FD_OFD,
        &[("OFDLCK", "WRITE", "0", "4095")],
        "child: locks shown on the shared OFD fd",
    );
    check_relock(
        &mut c,
        FD_POSIX,
        libc::F_SETLK,
        libc::F_RDLCK,
        (300, 100),
        "child: POSIX lock of 300-399, read this time",
    );
    for f in c.failures() {
        eprintln!("child: {f}");
    }
    std::process::exit(if c.failures().is_empty() { 0 } else { 1 })
}

fn main() {
    let dir =
        std::path::PathBuf::from(std::env::args().nth(1).expect("usage: wl_locks DIR [tree]"));
    let tree = std::env::args().nth(2).as_deref() == Some("tree");
    open_at(&dir.join("flock.lck"), FD_FLOCK);
    open_at(&dir.join("posix.lck"), FD_POSIX);
    open_at(&dir.join("ofd.lck"), FD_OFD);
    // SAFETY: plain dup2.
    assert_eq!(unsafe { libc::dup2(FD_FLOCK, FD_FLOCK_DUP) }, FD_FLOCK_DUP);
    flock(FD_FLOCK, libc::LOCK_EX | libc::LOCK_NB).expect("flock");
    setlk(FD_POSIX, libc::F_SETLK, libc::F_RDLCK, 10, 10).expect("POSIX read lock");
    setlk(FD_POSIX, libc::F_SETLK, libc::F_WRLCK, 100, 100).expect("POSIX write lock");
    setlk(FD_OFD, libc::F_OFD_SETLK, libc::F_WRLCK, 0, 4096).expect("OFD lock");
    let mut kid = None;
    if tree {
        // The child must be in the root's session: leave the harness's before forking
        // (ready() does it too late for the child).
        // SAFETY: setsid has no preconditions.
        unsafe { libc::setsid() };
        let mut p = [0; 2];
        // SAFETY: valid out-array; fork while single-threaded.
        let pid = unsafe {
            assert_eq!(libc::pipe(p.as_mut_ptr()), 0, "pipe");
            libc::fork()
        };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: the read end is the parent's.
            unsafe { libc::close(p[0]) };
            child(p[1]);
        }
        let mut b = [0u8; 1];
        // SAFETY: one byte from the pipe the child writes when its lock is held.
        let n = unsafe {
            libc::close(p[1]);
            let n = libc::read(p[0], b.as_mut_ptr().cast(), 1);
            libc::close(p[0]);
            n
        };
        assert_eq!(n, 1, "the child did not get ready");
        kid = Some(pid);
    }
    let pids = match kid {
        Some(k) => format!("{},{k}", std::process::id()),
        None => std::process::id().to_string(),
    };
    ready(&format!("pids={pids}"));
    wait_for_check();

    let mut c = Checker::new();
    if let Some(k) = kid {
        let mut st = 0;
        // SAFETY: plain kill and waitpid of our child.
        let ok = unsafe { libc::kill(k, libc::SIGUSR1) == 0 && libc::waitpid(k, &mut st, 0) == k };
        c.check(
            ok && libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            format!("the child failed its checks (status {st:#x}; see stderr)"),
        );
    }
    expect_locks(
        &mut c,
        FD_FLOCK,
        &[("FLOCK", "WRITE", "0", "EOF")],
        "locks shown on the flock fd",
    );
    expect_locks(
        &mut c,
        FD_FLOCK_DUP,
        &[("FLOCK", "WRITE", "0", "EOF")],
        "locks shown on the dup of the flock fd",
    );
    expect_locks(
        &mut c,
        FD_POSIX,
        &[
            ("POSIX", "READ", "10", "19"),
            ("POSIX", "WRITE", "100", "199"),
        ],
        "locks shown on the POSIX fd",
    );
    expect_locks(
        &mut c,
        FD_OFD,
        &[("OFDLCK", "WRITE", "0", "4095")],
        "locks shown on the OFD fd",
    );

    // Still ours: unlock, then lock again (non-blocking, so a lock someone else took fails).
    c.check(flock(FD_FLOCK, libc::LOCK_UN).is_ok(), "flock LOCK_UN");
    c.check(
        flock(FD_FLOCK, libc::LOCK_EX | libc::LOCK_NB).is_ok(),
        "flock LOCK_EX again",
    );
    check_relock(
        &mut c,
        FD_POSIX,
        libc::F_SETLK,
        libc::F_WRLCK,
        (10, 10),
        "POSIX lock of 10-19, write this time",
    );
    check_relock(
        &mut c,
        FD_POSIX,
        libc::F_SETLK,
        libc::F_WRLCK,
        (100, 100),
        "POSIX write lock of 100-199",
    );
    check_relock(
        &mut c,
        FD_OFD,
        libc::F_OFD_SETLK,
        libc::F_WRLCK,
        (0, 4096),
        "OFD write lock of 0-4095",
    );
    c.report()
}
