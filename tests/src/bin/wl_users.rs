//! Workload: a tree whose processes run as different users, as nginx's does
//! (tests/tests/restore_users.rs). Started as root; a dump started by root must give every
//! process back its own credentials, rlimits and fds.
//!
//! ```text
//! R       root; RLIMIT_NOFILE soft 777; holds the write end of pipe P
//! ├─ N    nobody (65534:65534, groups [65534]), umask 077, cwd DIR/nobody-home (0700, its own);
//! │       fd 20: DIR/secret (root's, 0600), opened while still root, at offset 3;
//! │       fd 21: DIR/nobody-home/mine, created as nobody, offset 4;
//! │       NOFILE 512/1024, CORE 0/0; not dumpable (the kernel's doing on setuid)
//! ├─ W1   www-data (33:33, groups [33]), umask 027, cwd DIR/www (0700, its own), dumpable set
//! │       again (as nginx does); fd 22: the read end of P; fd 23: DIR/www/log (O_APPEND);
//! │       NOFILE 2048/4096, MSGQUEUE 4096/8192
//! └─ W2   www-data (groups [33, 65534]), NOFILE 1000/4096: the same user, its own limits
//! ```
//!
//! After the check signal each process compares what it recorded before READY: real,
//! effective, saved and fs ids, groups, every rlimit, the capability sets (a child must not
//! come back with root's), dumpable, umask, cwd and its fds (targets, offsets, content); N
//! also checks it cannot open DIR/secret itself (it really is nobody now). R writes into P,
//! which W1 reads. Children report into `$CR_RESULT.NAME`.
//!
//! Usage: wl_users DIR

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cr_tests::workload::{
    block_check_signal, check_child, child_report, ready, wait_for_check, Checker,
};

const NOBODY: u32 = 65534;
const WWW: u32 = 33;

fn sys(r: i32, what: &str) -> i32 {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn open_at(p: &Path, flags: i32, at: i32) {
    // SAFETY: a valid C string; the fd is moved to a reserved number.
    unsafe {
        let fd = sys(
            libc::open(cpath(p).as_ptr(), flags, 0o640),
            &format!("open {}", p.display()),
        );
        sys(libc::dup2(fd, at), "dup2");
        libc::close(fd);
    }
}

fn rlimits() -> Vec<(u64, u64)> {
    (0..16)
        .map(|r| {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid out-pointer.
            unsafe { libc::getrlimit(r as _, &mut l) };
            (l.rlim_cur, l.rlim_max)
        })
        .collect()
}

fn setrlimit(r: u32, soft: u64, hard: u64) {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        libc::getrlimit(r as _, &mut cur);
        let l = libc::rlimit {
            rlim_cur: soft.min(cur.rlim_max),
            rlim_max: hard.min(cur.rlim_max),
        };
        sys(libc::setrlimit(r as _, &l), &format!("setrlimit {r}"));
    }
}

/// Who this process is, as the kernel keeps it.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Id {
    uid: (u32, u32, u32),
    gid: (u32, u32, u32),
    fs: (u32, u32),
    groups: Vec<u32>,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb, NoNewPrivs, Umask lines of /proc/self/status.
    status: Vec<String>,
    dumpable: i32,
    cwd: PathBuf,
    rlimits: Vec<(u64, u64)>,
}

impl Id {
    fn now() -> Id {
        let (mut r, mut e, mut s) = (0, 0, 0);
        let (mut gr, mut ge, mut gs) = (0, 0, 0);
        let mut groups = vec![0u32; 64];
        // SAFETY: valid out-pointers; setfsuid(-1) only reads.
        let (n, fsu, fsg, dumpable) = unsafe {
            libc::getresuid(&mut r, &mut e, &mut s);
            libc::getresgid(&mut gr, &mut ge, &mut gs);
            let n = libc::getgroups(64, groups.as_mut_ptr());
            (
                n,
                libc::setfsuid(u32::MAX) as u32,
                libc::setfsgid(u32::MAX) as u32,
                libc::prctl(libc::PR_GET_DUMPABLE),
            )
        };
        groups.truncate(n.max(0) as usize);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let keep = [
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Umask",
        ];
        Id {
            uid: (r, e, s),
            gid: (gr, ge, gs),
            fs: (fsu, fsg),
            groups,
            status: status
                .lines()
                .filter(|l| keep.iter().any(|k| l.starts_with(k)))
                .map(str::to_string)
                .collect(),
            dumpable,
            cwd: std::env::current_dir().unwrap_or_default(),
            rlimits: rlimits(),
        }
    }
}

/// (target, offset, flags) of each of `fds`.
fn fd_view(fds: &[i32]) -> Vec<(String, i64, i32)> {
    fds.iter()
        .map(|&fd| {
            let t = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            // A pipe's inode number is the kernel's to choose: a restored pipe is a new
            // one (that it is still R's is checked by reading what R writes into it).
            let t = if t.starts_with("pipe:[") {
                "pipe".into()
            } else {
                t
            };
            // SAFETY: lseek/fcntl on our fd.
            unsafe {
                (
                    t,
                    libc::lseek(fd, 0, libc::SEEK_CUR),
                    libc::fcntl(fd, libc::F_GETFL),
                )
            }
        })
        .collect()
}

fn become_user(uid: u32, groups: &[u32]) {
    // SAFETY: credential syscalls of our own process.
    unsafe {
        sys(libc::setgroups(groups.len(), groups.as_ptr()), "setgroups");
        sys(
            libc::setresgid(groups[0], groups[0], groups[0]),
            "setresgid",
        );
        sys(libc::setresuid(uid, uid, uid), "setresuid");
    }
}

fn read_exact(fd: i32, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    // SAFETY: a read into a valid buffer.
    let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), n) };
    b.truncate(r.max(0) as usize);
    b
}

fn say_ready(w: i32) {
    // SAFETY: a one-byte write to the ready pipe, then closing it.
    unsafe {
        libc::write(w, b"r".as_ptr().cast(), 1);
        libc::close(w);
    }
}

/// The part every child shares: record, say ready, wait, compare.
fn checkpoint(name: &str, fds: &[i32], ready_w: i32) -> Checker {
    let id = Id::now();
    let view = fd_view(fds);
    say_ready(ready_w);
    wait_for_check();
    let mut c = Checker::new();
    c.eq(
        Id::now(),
        id,
        &format!("{name}: ids, caps, dumpable, umask, cwd, rlimits"),
    );
    c.eq(
        fd_view(fds),
        view,
        &format!("{name}: fds (target, offset, flags)"),
    );
    c
}

fn nobody(dir: &Path, ready_w: i32) -> ! {
    open_at(&dir.join("secret"), libc::O_RDONLY, 20);
    // SAFETY: lseek on our fd.
    unsafe { libc::lseek(20, 3, libc::SEEK_SET) };
    setrlimit(libc::RLIMIT_NOFILE, 512, 1024);
    setrlimit(libc::RLIMIT_CORE, 0, 0);
    become_user(NOBODY, &[NOBODY]);
    std::env::set_current_dir(dir.join("nobody-home")).unwrap();
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    open_at(Path::new("mine"), libc::O_RDWR | libc::O_CREAT, 21);
    // SAFETY: a write from a valid buffer and an lseek on our fd.
    unsafe {
        libc::write(21, b"nobody's own".as_ptr().cast(), 12);
        libc::lseek(21, 4, libc::SEEK_SET);
    }
    let mut c = checkpoint("N", &[20, 21], ready_w);
    c.eq(
        read_exact(20, 5),
        b" secr".to_vec(),
        "N: fd 20 (root's file) from offset 3",
    );
    c.eq(
        read_exact(21, 8),
        b"dy's own".to_vec(),
        "N: fd 21 from offset 4",
    );
    // SAFETY: a valid C string.
    let r = unsafe { libc::open(cpath(&dir.join("secret")).as_ptr(), libc::O_RDONLY) };
    c.check(
        r < 0,
        "N: opened DIR/secret itself: it is not nobody any more",
    );
    child_report("N", c)
}

fn www(dir: &Path, name: &str, groups: &[u32], nofile: u64, ready_w: i32, pipe_r: i32) -> ! {
    if pipe_r >= 0 {
        // SAFETY: moving our fd to a reserved number.
        unsafe {
            sys(libc::dup2(pipe_r, 22), "dup2");
            libc::close(pipe_r);
        }
        setrlimit(libc::RLIMIT_MSGQUEUE, 4096, 8192);
    }
    setrlimit(libc::RLIMIT_NOFILE, nofile, 4096);
    become_user(WWW, groups);
    if pipe_r >= 0 {
        // SAFETY: plain prctl.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
    }
    std::env::set_current_dir(dir.join("www")).unwrap();
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o027) };
    let fds: &[i32] = if pipe_r >= 0 {
        open_at(
            Path::new("log"),
            libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
            23,
        );
        &[22, 23]
    } else {
        &[]
    };
    let mut c = checkpoint(name, fds, ready_w);
    if pipe_r >= 0 {
        c.eq(
            read_exact(22, 5),
            b"to-w1".to_vec(),
            "W1: what R wrote into P",
        );
        // SAFETY: a write from a valid buffer.
        let n = unsafe { libc::write(23, b"line\n".as_ptr().cast(), 5) };
        c.eq(n, 5, "W1: append to its log");
    }
    child_report(name, c)
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: wl_users DIR"));
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    block_check_signal();
    // The children (other users) must get through DIR to their own directories.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("secret"), b"top secret").unwrap();
    std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    for (sub, uid) in [("nobody-home", NOBODY), ("www", WWW)] {
        let p = dir.join(sub);
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    }
    // The children write their verdicts as themselves.
    let result = std::env::var("CR_RESULT").expect("CR_RESULT");
    for n in ["N", "W1", "W2"] {
        let p = format!("{result}.{n}");
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    setrlimit(libc::RLIMIT_NOFILE, 777, u64::MAX);
    let mut rd = [0; 2];
    let mut p = [0; 2];
    // SAFETY: valid out-arrays.
    unsafe {
        sys(libc::pipe(rd.as_mut_ptr()), "pipe");
        sys(libc::pipe(p.as_mut_ptr()), "pipe");
    }
    let fork = || {
        // SAFETY: fork while single-threaded; the child drops the fds only R keeps.
        let pid = sys(unsafe { libc::fork() }, "fork");
        if pid == 0 {
            // SAFETY: closing fds the children must not hold.
            unsafe {
                libc::close(3);
                libc::close(rd[0]);
            }
        }
        pid
    };
    let n = fork();
    if n == 0 {
        // SAFETY: closing P, which N does not use.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
        nobody(&dir, rd[1]);
    }
    let w1 = fork();
    if w1 == 0 {
        // SAFETY: closing P's write end, which R keeps.
        unsafe { libc::close(p[1]) };
        www(&dir, "W1", &[WWW], 2048, rd[1], p[0]);
    }
    let w2 = fork();
    if w2 == 0 {
        // SAFETY: closing P, which W2 does not use.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
        www(&dir, "W2", &[WWW, NOBODY], 1000, rd[1], -1);
    }
    // SAFETY: closing the ends R does not keep, then waiting for the children's bytes.
    let got = unsafe {
        libc::close(rd[1]);
        libc::close(p[0]);
        let mut b = [0u8; 3];
        let mut got = 0;
        while got < 3 {
            let r = libc::read(rd[0], b[got..].as_mut_ptr().cast(), 3 - got);
            if r <= 0 {
                break;
            }
            got += r as usize;
        }
        libc::close(rd[0]);
        got
    };
    assert_eq!(got, 3, "children ready");
    let id = Id::now();
    // SAFETY: getpid has no arguments.
    let me = unsafe { libc::getpid() };
    ready(&format!("pids={me},{n},{w1},{w2}"));
    wait_for_check();

    let mut c = Checker::new();
    c.eq(Id::now(), id, "R: ids, caps, dumpable, umask, cwd, rlimits");
    // SAFETY: a write from a valid buffer to our end of P.
    unsafe { libc::write(p[1], b"to-w1".as_ptr().cast(), 5) };
    check_child(&mut c, "N", n);
    check_child(&mut c, "W1", w1);
    check_child(&mut c, "W2", w2);
    c.report()
}
