//! --file-locks: flock, POSIX and OFD locks survive dump and restore, held by the same owners
//! (see tests/src/bin/wl_locks.rs), checked from another process (this harness); without the
//! flag a dump of a tree holding locks is refused and leaves it running, and so is a restore of
//! an image with locks; a lock someone else took meanwhile fails the restore cleanly.

use std::os::fd::AsRawFd;

use cr_tests::{
    assert_dump_refused_cleanly, cr, dump_and_reap, dump_and_restore, dump_and_restore_tree,
    dump_cmd, dump_leave_running, pid_exists, restore_cmd, TempDir, Workload,
};

fn start(d: &TempDir) -> Workload {
    Workload::start("wl_locks", &[&d.s("")], d)
}

fn open(d: &TempDir, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join(name))
        .unwrap()
}

/// F_GETLK / F_OFD_GETLK for a lock of type `ty` on `start`..+`len`: the conflicting lock's
/// (type, start, len, pid), or type F_UNLCK.
fn getlk(f: &std::fs::File, cmd: i32, ty: i32, start: i64, len: i64) -> (i32, i64, i64, i32) {
    // SAFETY: struct flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with a valid struct flock pointer.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    assert_eq!(r, 0, "fcntl GETLK: {}", std::io::Error::last_os_error());
    (fl.l_type as i32, fl.l_start, fl.l_len, fl.l_pid)
}

/// Asserts, from this process, that PID `pid` (the workload) holds each of its locks.
fn assert_held(d: &TempDir, pid: i32) {
    // flock: a new description cannot take it.
    let f = open(d, "flock.lck");
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    let e = std::io::Error::last_os_error();
    assert!(
        r < 0 && e.raw_os_error() == Some(libc::EWOULDBLOCK),
        "flock.lck is not flock-locked ({r}, {e})"
    );
    // POSIX: a read lock on 10-19 (others may read-lock, not write-lock), a write lock on 100-199.
    let f = open(d, "posix.lck");
    assert_eq!(
        getlk(&f, libc::F_GETLK, libc::F_WRLCK, 10, 10),
        (libc::F_RDLCK, 10, 10, pid),
        "POSIX read lock on 10-19"
    );
    assert_eq!(
        getlk(&f, libc::F_GETLK, libc::F_RDLCK, 10, 10).0,
        libc::F_UNLCK,
        "10-19 is read-locked only"
    );
    assert_eq!(
        getlk(&f, libc::F_GETLK, libc::F_RDLCK, 100, 100),
        (libc::F_WRLCK, 100, 100, pid),
        "POSIX write lock on 100-199"
    );
    assert_eq!(
        getlk(&f, libc::F_GETLK, libc::F_WRLCK, 20, 80).0,
        libc::F_UNLCK,
        "20-99 is free"
    );
    // OFD: a write lock on 0-4095, owned by a description (pid -1).
    let f = open(d, "ofd.lck");
    assert_eq!(
        getlk(&f, libc::F_OFD_GETLK, libc::F_RDLCK, 0, 4096),
        (libc::F_WRLCK, 0, 4096, -1),
        "OFD write lock on 0-4095"
    );
}

/// The child of wl_locks' tree mode holds its own POSIX write lock on 300-399.
fn assert_child_held(d: &TempDir, child: i32) {
    let f = open(d, "posix.lck");
    assert_eq!(
        getlk(&f, libc::F_GETLK, libc::F_RDLCK, 300, 100),
        (libc::F_WRLCK, 300, 100, child),
        "the child's POSIX write lock on 300-399"
    );
}

/// The checks of the tree mode, the same for the control and after restore: the root and the
/// child hold their locks (seen from here), then both pass their own checks.
fn assert_tree_holds_its_locks(d: &TempDir, w: &mut Workload, pids: &[i32]) {
    assert_held(d, w.pid);
    assert_child_held(d, pids[1]);
    w.assert_pass();
}

fn start_tree(d: &TempDir) -> (Workload, Vec<i32>) {
    let w = Workload::start("wl_locks", &[&d.s(""), "tree"], d);
    let pids = w.tree_pids();
    assert_eq!(pids.len(), 2, "READY {}", w.info);
    (w, pids)
}

#[test]
fn locks_workload_passes_undisturbed() {
    let d = TempDir::new("locks-control");
    let mut w = start(&d);
    assert_held(&d, w.pid);
    w.assert_pass();
}

#[test]
fn locks_survive_dump_and_restore() {
    let d = TempDir::new("locks");
    let mut w = start(&d);
    dump_and_restore(&mut w, &d, &["--file-locks"], &["--file-locks"]);
    assert_held(&d, w.pid);
    let show = cr(&["show", &d.s("img/locks.img")]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && text.contains("\"flock\"") && text.contains("\"ofd\""),
        "cr show locks.img: {text}"
    );
    w.assert_pass();
}

/// Without --file-locks the dump names every lock, points at the flag and leaves the workload
/// running with its locks.
#[test]
fn dump_without_file_locks_refuses() {
    let d = TempDir::new("locks-refused");
    let mut w = start(&d);
    let err = dump_cmd(&w, &d).fails("the tree holds locks and --file-locks is not given");
    for want in [
        "a flock write lock on",
        "flock.lck (fd 10)",
        "a POSIX read lock on bytes 10-19",
        "a POSIX write lock on bytes 100-199",
        "an OFD write lock on bytes 0-4095",
        "ofd.lck (fd 12)",
        "--file-locks",
    ] {
        assert!(err.contains(want), "dump error lacks {want:?}: {err}");
    }
    assert_dump_refused_cleanly(&w, &d);
    assert_held(&d, w.pid);
    w.assert_pass();
}

/// Starts wl_locks in a new directory `name` and dumps it with -l (killing it): the PID is
/// free for the restore the test then tries.
fn dumped_with_locks(name: &str) -> (TempDir, Workload) {
    let d = TempDir::new(name);
    let mut w = start(&d);
    dump_and_reap(&mut w, &d, &["-l"]);
    (d, w)
}

/// `restore -l` of `d`'s image, which must work, and the restored workload holds every lock.
fn restore_holding_locks(d: &TempDir, w: &mut Workload) {
    restore_cmd(d).arg("-l").ok();
    assert_held(d, w.pid);
    w.assert_pass();
}

/// An image with locks is not restored without --file-locks; with it, it is.
#[test]
fn restore_without_file_locks_refuses() {
    let (d, mut w) = dumped_with_locks("locks-restore-refused");
    let err = restore_cmd(&d).fails("the image holds locks and --file-locks is not given");
    assert!(err.contains("--file-locks"), "restore without -l: {err}");
    assert!(!pid_exists(w.pid), "a refused restore left PID {}", w.pid);
    restore_holding_locks(&d, &mut w);
}

/// A lock taken by someone else between dump and restore fails the restore, naming the lock,
/// and leaves no process; once it is released, the restore works.
#[test]
fn restore_fails_when_a_lock_is_taken() {
    let (d, mut w) = dumped_with_locks("locks-taken");
    let f = open(&d, "flock.lck");
    // SAFETY: flock on an fd we own.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) },
        0
    );
    let err = restore_cmd(&d)
        .arg("-l")
        .fails("flock.lck is locked by another process");
    assert!(
        err.contains("flock write lock") && err.contains("another process holds"),
        "restore error: {err}"
    );
    assert!(!pid_exists(w.pid), "a failed restore left PID {}", w.pid);
    drop(f);
    restore_holding_locks(&d, &mut w);
}

#[test]
fn tree_locks_workload_passes_undisturbed() {
    let d = TempDir::new("locks-tree-control");
    let (mut w, pids) = start_tree(&d);
    assert_tree_holds_its_locks(&d, &mut w, &pids);
}

/// A child sharing the flock and OFD descriptions, with a POSIX lock of its own: after restore
/// the child owns its lock again (not the root), and both pass their checks.
#[test]
fn tree_locks_survive_dump_and_restore() {
    let d = TempDir::new("locks-tree");
    let (mut w, pids) = start_tree(&d);
    dump_and_restore_tree(&mut w, &d, &pids, &["-l"], &["-l"]);
    assert_tree_holds_its_locks(&d, &mut w, &pids);
}

/// `dump -R -l` leaves the workload running with every lock it held.
#[test]
fn leave_running_dump_keeps_the_locks() {
    let d = TempDir::new("locks-R");
    let mut w = start(&d);
    dump_leave_running(&w, &d, &["-l"]);
    assert!(d.join("img/locks.img").exists(), "no locks.img");
    assert_held(&d, w.pid);
    w.assert_pass();
}
