//! Workload: inotify, and fanotify (tests/tests/restore_events.rs).
//!
//! Usage: `wl_inotify DIR inotify | fanotify` (DIR an empty scratch directory).
//!
//! `inotify`: instance I1 (fd 10, blocking) watches, under DIR/in:
//!
//! | wd | path at the watch             | mask                               | then |
//! |----|-------------------------------|------------------------------------|------|
//! | 1  | watched-dir/                  | CREATE, DELETE, MOVED_TO           | |
//! | 2  | file-a                        | MODIFY, ONESHOT                    | |
//! | 3  | file-b                        | ATTRIB                             | removed (inotify_rm_watch): a gap |
//! | 4  | moved-dir/                    | CREATE, EXCL_UNLINK, ONLYDIR       | renamed to elsewhere/moved-dir-new: its path is gone |
//! | 5  | linked-file                   | MODIFY, CLOSE_WRITE                | unlinked; the inode lives on as elsewhere/other-link |
//!
//! I2 (fd 11, IN_NONBLOCK | IN_CLOEXEC) watches watched-dir too (wd 1 of its own), I3 (fd 12,
//! nonblocking) watches queued-dir with one IN_CREATE event left unread at READY. After the
//! restore: every watch as fdinfo shows it (wd, mask, inode, device), the flags, and the events
//! that changes to the files make — each under its wd, a one-shot watch firing once, nothing
//! for the removed wd 3, the renamed directory and the unlinked file still watched through
//! their new names — and a new watch gets a wd none of the others has. I3's queued event may
//! be kept or dropped: the verdict says which (`PASS queued=kept|dropped`), and the harness
//! requires the restore log to say so when dropped.
//!
//! `fanotify`: a fanotify group (fd 13, FAN_CLASS_NOTIF | FAN_REPORT_FID) marks watched-dir
//! for FAN_CREATE; after the check signal a file created there is reported.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cr_tests::fdinfo::{self, InotifyWatch};
use cr_tests::workload::{ready, wait_for_check, Checker};

fn sys(r: i32, what: &str) -> i32 {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn watch(fd: i32, p: &Path, mask: u32) -> i32 {
    // SAFETY: a valid C string.
    sys(
        unsafe { libc::inotify_add_watch(fd, cpath(p).as_ptr(), mask) },
        &format!("inotify_add_watch {}", p.display()),
    )
}

fn move_to(fd: i32, at: i32, cloexec: bool) {
    // SAFETY: dup3 to a reserved number, then closing the original.
    unsafe {
        sys(
            libc::dup3(fd, at, if cloexec { libc::O_CLOEXEC } else { 0 }),
            "dup3",
        );
        libc::close(fd);
    }
}

/// The events queued on inotify fd `fd` now: (wd, mask, name).
fn events(fd: i32) -> Vec<(i32, u32, String)> {
    let mut out = Vec::new();
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting: inotify events are queued synchronously by
        // the syscalls that cause them.
        if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
            return out;
        }
        let mut buf = vec![0u8; 4096];
        // SAFETY: a read into a valid buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return out;
        }
        let mut off = 0usize;
        while off + 16 <= n as usize {
            let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap());
            let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
            let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
            let name = &buf[off + 16..off + 16 + len];
            let name = String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or(&[]));
            out.push((wd, mask, name.into_owned()));
            off += 16 + len;
        }
    }
}

/// (wd, mask, ino, sdev) of each watch: what must survive; the file handle is the kernel's
/// encoding of the same inode.
fn watches(fd: i32) -> Vec<(i32, u32, u64, u64)> {
    fdinfo::inotify_watches(fd)
        .into_iter()
        .map(|w: InotifyWatch| (w.wd, w.mask, w.ino, w.sdev))
        .collect()
}

fn flags(fd: i32) -> (Option<i32>, i32) {
    (
        fdinfo::flags(fd).map(|f| f & libc::O_NONBLOCK),
        // SAFETY: F_GETFD on our fd.
        unsafe { libc::fcntl(fd, libc::F_GETFD) },
    )
}

fn write_file(p: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.write_all(data).unwrap();
}

fn inotify(dir: PathBuf) -> ! {
    let d = dir.join("in");
    for sub in ["watched-dir", "moved-dir", "elsewhere", "queued-dir"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    for f in ["file-a", "file-b", "linked-file"] {
        std::fs::write(d.join(f), b"x").unwrap();
    }
    std::fs::hard_link(d.join("linked-file"), d.join("elsewhere/other-link")).unwrap();
    // SAFETY: creating inotify instances, moved to reserved numbers.
    let (i1, i2, i3) = unsafe {
        (
            sys(libc::inotify_init1(0), "inotify_init1"),
            sys(
                libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC),
                "inotify_init1",
            ),
            sys(libc::inotify_init1(libc::IN_NONBLOCK), "inotify_init1"),
        )
    };
    move_to(i1, 10, false);
    move_to(i2, 11, true);
    move_to(i3, 12, false);
    let w = [
        watch(
            10,
            &d.join("watched-dir"),
            libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_TO,
        ),
        watch(10, &d.join("file-a"), libc::IN_MODIFY | libc::IN_ONESHOT),
        watch(10, &d.join("file-b"), libc::IN_ATTRIB),
        watch(
            10,
            &d.join("moved-dir"),
            libc::IN_CREATE | libc::IN_EXCL_UNLINK | libc::IN_ONLYDIR,
        ),
        watch(
            10,
            &d.join("linked-file"),
            libc::IN_MODIFY | libc::IN_CLOSE_WRITE,
        ),
    ];
    assert_eq!(w, [1, 2, 3, 4, 5], "wd numbers of a fresh instance");
    // SAFETY: removing our own watch.
    sys(unsafe { libc::inotify_rm_watch(10, 3) }, "inotify_rm_watch");
    std::fs::rename(d.join("moved-dir"), d.join("elsewhere/moved-dir-new")).unwrap();
    std::fs::remove_file(d.join("linked-file")).unwrap();
    assert_eq!(watch(11, &d.join("watched-dir"), libc::IN_CREATE), 1);
    assert_eq!(watch(12, &d.join("queued-dir"), libc::IN_CREATE), 1);
    std::fs::write(d.join("queued-dir/queued"), b"").unwrap();
    // I1's queue (IN_IGNORED of wd 3, …) is drained: what it holds at READY is nothing.
    let _ = events(10);
    let before = [watches(10), watches(11), watches(12)];
    let flags_before = [flags(10), flags(11), flags(12)];
    ready("");
    wait_for_check();

    let mut c = Checker::new();
    for (i, fd) in [10, 11, 12].into_iter().enumerate() {
        c.eq(
            watches(fd),
            before[i].clone(),
            &format!("fd {fd}: watches (wd, mask, ino, sdev)"),
        );
        c.eq(
            flags(fd),
            flags_before[i],
            &format!("fd {fd}: (O_NONBLOCK, FD_CLOEXEC)"),
        );
    }
    let queued = events(12);
    let note = match queued.as_slice() {
        [] => "queued=dropped",
        [(1, m, n)] if *m == libc::IN_CREATE && n == "queued" => "queued=kept",
        other => {
            c.check(false, format!("fd 12: queued events {other:?}"));
            ""
        }
    };
    c.eq(events(10), vec![], "fd 10: events before any change");
    c.eq(events(11), vec![], "fd 11: events before any change");
    std::fs::write(d.join("watched-dir/new"), b"").unwrap();
    write_file(&d.join("file-a"), b"1");
    write_file(&d.join("file-a"), b"2");
    // SAFETY: a valid C string; a change of mode fires IN_ATTRIB (wd 3 is gone: no event).
    unsafe { libc::chmod(cpath(&d.join("file-b")).as_ptr(), 0o600) };
    std::fs::write(d.join("elsewhere/moved-dir-new/inner"), b"").unwrap();
    write_file(&d.join("elsewhere/other-link"), b"3");
    std::fs::write(d.join("queued-dir/after"), b"").unwrap();
    c.eq(
        events(10),
        vec![
            (1, libc::IN_CREATE, "new".to_string()),
            (2, libc::IN_MODIFY, String::new()),
            (2, libc::IN_IGNORED, String::new()),
            (4, libc::IN_CREATE, "inner".to_string()),
            (5, libc::IN_MODIFY, String::new()),
            (5, libc::IN_CLOSE_WRITE, String::new()),
        ],
        "fd 10: events of the changes (wd, mask, name)",
    );
    c.eq(
        events(11),
        vec![(1, libc::IN_CREATE, "new".to_string())],
        "fd 11: events",
    );
    c.eq(
        events(12),
        vec![(1, libc::IN_CREATE, "after".to_string())],
        "fd 12: events after the restore",
    );
    std::fs::create_dir(d.join("fresh")).unwrap();
    let fresh = watch(10, &d.join("fresh"), libc::IN_CREATE);
    let taken: BTreeSet<i32> = [1, 2, 4, 5].into();
    c.check(
        !taken.contains(&fresh),
        format!("a new watch got wd {fresh}, which another watch has"),
    );
    c.report_noting(note)
}

fn fanotify(dir: PathBuf) -> ! {
    let d = dir.join("in/watched-dir");
    std::fs::create_dir_all(&d).unwrap();
    // SAFETY: fanotify_init/mark with a valid path; the fd is moved to a reserved number.
    unsafe {
        let fd = sys(
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_FID | libc::FAN_NONBLOCK,
                libc::O_RDONLY as u32,
            ),
            "fanotify_init",
        );
        sys(
            libc::fanotify_mark(
                fd,
                libc::FAN_MARK_ADD,
                libc::FAN_CREATE,
                libc::AT_FDCWD,
                cpath(&d).as_ptr(),
            ),
            "fanotify_mark",
        );
        move_to(fd, 13, false);
    }
    ready("fd=13");
    wait_for_check();
    let mut c = Checker::new();
    std::fs::write(d.join("new"), b"").unwrap();
    let mut buf = [0u8; 4096];
    // SAFETY: a read into a valid buffer (nonblocking: the event is queued by the create).
    let n = unsafe { libc::read(13, buf.as_mut_ptr().cast(), buf.len()) };
    c.check(n > 0, format!("fanotify: no event for a create (read {n})"));
    c.report()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: wl_inotify DIR inotify|fanotify"));
    match args.get(2).map(String::as_str) {
        Some("inotify") => inotify(dir),
        Some("fanotify") => fanotify(dir),
        other => panic!("unknown mode {other:?}"),
    }
}
