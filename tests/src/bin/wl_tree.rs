//! Workload: a process tree with threads, sessions, groups, a zombie, and files and memory
//! shared across fork, which must all be as they were after a checkpoint.
//!
//! Usage: wl_tree DIR
//!
//! ```text
//! R  session leader, 2 threads; holds the write end of pipe P, file F (offset 10), shm S
//! ├─ Z  exited with code 42 before the dump, not reaped: a zombie
//! ├─ Y  killed by SIGTERM before the dump, not reaped: a zombie too
//! ├─ A  leader of its own process group, 2 threads; holds the read end of P, and S
//! │  └─ G  in A's group, 2 threads
//! └─ B  leader of its own session, 2 threads; holds F (the same description as R)
//! ```
//! Before READY, R writes "before-dump" into P and 0x1234 into S (after the fork: A sees it
//! only through the shared mapping). Every process blocks SIGUSR1 and waits for it.
//!
//! On SIGUSR1 (to R), R: reaps Z (exit code 42) and Y (SIGTERM), writes "after" into P, checks A (which reads
//! "before-dump" then "after" from P, finds 0x1234 in S and writes 0x5678 there, and checks G),
//! finds 0x5678 in S, checks B (which finds F at offset 10 and moves it to 50), finds F at
//! offset 50. Each process also checks its pid, parent, group, session, and that its helper
//! thread still runs with its own TID. Children report into `$CR_RESULT.NAME`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cr_tests::workload::{block_check_signal, ready, wait_for_check, Checker};

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: fresh fds we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn fork() -> i32 {
    // SAFETY: every process forks while single-threaded (helper threads start afterwards).
    let p = unsafe { libc::fork() };
    assert!(p >= 0, "fork");
    if p == 0 {
        // The harness reads the ready pipe (fd 3) to its end: only R may hold it.
        // SAFETY: closing an inherited fd in the child.
        unsafe { libc::close(3) };
    }
    p
}

/// Who this process is, recorded before the dump and compared after.
struct Identity {
    pid: i32,
    ppid: i32,
    pgid: i32,
    sid: i32,
}

impl Identity {
    fn now() -> Identity {
        // SAFETY: plain id queries.
        unsafe {
            Identity {
                pid: libc::getpid(),
                ppid: libc::getppid(),
                pgid: libc::getpgid(0),
                sid: libc::getsid(0),
            }
        }
    }

    fn check(&self, c: &mut Checker, who: &str) {
        let n = Identity::now();
        c.eq(n.pid, self.pid, &format!("{who}: pid"));
        c.eq(n.ppid, self.ppid, &format!("{who}: parent"));
        c.eq(n.pgid, self.pgid, &format!("{who}: process group"));
        c.eq(n.sid, self.sid, &format!("{who}: session"));
    }
}

/// A second thread that counts and answers "what is your TID".
struct Helper {
    tid: Arc<AtomicI32>,
    counter: Arc<AtomicU64>,
    ask: Arc<AtomicI32>,
}

impl Helper {
    fn start() -> Helper {
        let tid = Arc::new(AtomicI32::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let ask = Arc::new(AtomicI32::new(0));
        let (t, n, a) = (tid.clone(), counter.clone(), ask.clone());
        std::thread::Builder::new()
            .name("helper".into())
            .spawn(move || {
                t.store(gettid(), Ordering::SeqCst);
                loop {
                    n.fetch_add(1, Ordering::SeqCst);
                    if a.load(Ordering::SeqCst) == 1 {
                        a.store(gettid(), Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .expect("spawn the helper thread");
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        Helper { tid, counter, ask }
    }

    fn check(&self, c: &mut Checker, who: &str) {
        let tid = self.tid.load(Ordering::SeqCst);
        let before = self.counter.load(Ordering::SeqCst);
        self.ask.store(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while (self.ask.load(Ordering::SeqCst) == 1
            || self.counter.load(Ordering::SeqCst) <= before)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        c.eq(
            self.ask.load(Ordering::SeqCst),
            tid,
            &format!("{who}: the helper thread's TID"),
        );
        c.check(
            self.counter.load(Ordering::SeqCst) > before,
            format!("{who}: the helper thread stands still"),
        );
        let mut tasks: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                    .collect()
            })
            .unwrap_or_default();
        tasks.sort_unstable();
        // SAFETY: getpid has no arguments.
        let mut want = vec![unsafe { libc::getpid() }, tid];
        want.sort_unstable();
        c.eq(tasks, want, &format!("{who}: threads"));
    }
}

/// A child's verdict: into `$CR_RESULT.NAME`, and the exit status.
fn child_report(name: &str, c: Checker) -> ! {
    let path = format!("{}.{name}", std::env::var("CR_RESULT").expect("CR_RESULT"));
    let failures = c.failures();
    let text = if failures.is_empty() {
        "PASS\n".to_string()
    } else {
        format!("FAIL: {}\n", failures.join("; "))
    };
    std::fs::write(&path, text).expect("write the child's result");
    // SAFETY: _exit skips the parent's atexit work (this is a forked child).
    unsafe { libc::_exit(if failures.is_empty() { 0 } else { 1 }) }
}

/// The verdict of child `name` (pid `pid`): SIGUSR1 it, wait for it, read its result.
fn check_child(c: &mut Checker, name: &str, pid: i32) {
    // SAFETY: plain kill/waitpid on our child.
    let st = unsafe {
        libc::kill(pid, libc::SIGUSR1);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        st
    };
    let path = format!("{}.{name}", std::env::var("CR_RESULT").expect("CR_RESULT"));
    let res = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("no result: {e}"));
    c.check(
        res.starts_with("PASS"),
        format!("{name} ({pid}): {} (status {st:#x})", res.trim()),
    );
}

/// A child's part of the protocol: notes its identity and starts its helper thread, says
/// ready on `ready_wr`, waits for the check, then checks both (as `who`); the caller adds its
/// own checks to the returned Checker.
fn child_checkpoint(who: &str, ready_wr: &OwnedFd) -> Checker {
    let id = Identity::now();
    let h = Helper::start();
    say_ready(ready_wr);
    wait_for_check();
    let mut c = Checker::new();
    id.check(&mut c, who);
    h.check(&mut c, who);
    c
}

fn say_ready(w: &OwnedFd) {
    // SAFETY: a one-byte write to our end of the ready pipe.
    assert_eq!(
        unsafe { libc::write(w.as_raw_fd(), b"r".as_ptr().cast(), 1) },
        1
    );
}

/// Reads exactly `n` bytes from `fd`, giving up after a few seconds.
fn read_n(fd: &OwnedFd, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut f = std::fs::File::from(fd.try_clone().expect("dup"));
    while out.len() < n && Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        let mut buf = vec![0u8; n - out.len()];
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(_) => break,
        }
    }
    out
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: wl_tree DIR");
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    // Every process of the tree inherits SIGUSR1 blocked.
    block_check_signal();
    // SAFETY: a fresh shared mapping of one page, single-threaded here; it lives as long as
    // the process.
    let shm = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap shared");
        &*(p as *const [AtomicU64; 512])
    };
    let (p_rd, p_wr) = pipe();
    let (ready_rd, ready_wr) = pipe();
    let fpath = format!("{dir}/tree-shared-offset");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&fpath)
        .expect("create F");
    file.write_all(&[7u8; 100]).expect("write F");
    // SAFETY: lseek on our fd.
    assert_eq!(
        unsafe { libc::lseek(file.as_raw_fd(), 10, libc::SEEK_SET) },
        10
    );
    let fd = file.as_raw_fd();

    // Z: a zombie.
    let z = fork();
    if z == 0 {
        // SAFETY: _exit in a forked child.
        unsafe { libc::_exit(42) };
    }
    let y = fork();
    if y == 0 {
        // SAFETY: the default action of SIGTERM ends us with it.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), libc::SIGTERM);
            libc::_exit(1);
        }
    }
    // A (with G).
    let a = fork();
    if a == 0 {
        drop(p_wr);
        // SAFETY: setpgid of ourselves.
        unsafe { libc::setpgid(0, 0) };
        let g = fork();
        if g == 0 {
            let c = child_checkpoint("G", &ready_wr);
            child_report("G", c);
        }
        let mut c = child_checkpoint("A", &ready_wr);
        let got = read_n(&p_rd, b"before-dump".len() + b"after".len());
        c.eq(
            String::from_utf8_lossy(&got).into_owned(),
            "before-dumpafter".to_string(),
            "A: what R wrote into the pipe",
        );
        c.eq(
            shm[0].load(Ordering::SeqCst),
            0x1234,
            "A: what R wrote into the shared memory before the dump",
        );
        shm[1].store(0x5678, Ordering::SeqCst);
        check_child(&mut c, "G", g);
        child_report("A", c);
    }
    // B.
    let b = fork();
    if b == 0 {
        drop(p_wr);
        drop(p_rd);
        // SAFETY: setsid of ourselves.
        unsafe { libc::setsid() };
        let mut c = child_checkpoint("B", &ready_wr);
        // SAFETY: lseek on the inherited fd.
        unsafe {
            c.eq(libc::lseek(fd, 0, libc::SEEK_CUR), 10, "B: offset of F");
            libc::lseek(fd, 50, libc::SEEK_SET);
        }
        child_report("B", c);
    }
    drop(p_rd);
    drop(ready_wr);
    let mut p_wr = std::fs::File::from(p_wr);
    p_wr.write_all(b"before-dump").expect("write P");
    shm[0].store(0x1234, Ordering::SeqCst);
    // Z is a zombie once waitid(WNOWAIT) sees it exited (without reaping it).
    // SAFETY: waitid with a valid out-struct.
    unsafe {
        for zombie in [z, y] {
            let mut si: libc::siginfo_t = std::mem::zeroed();
            assert_eq!(
                libc::waitid(
                    libc::P_PID,
                    zombie as u32,
                    &mut si,
                    libc::WEXITED | libc::WNOWAIT
                ),
                0,
                "waitid {zombie}"
            );
        }
    }
    let got = read_n(&ready_rd, 3);
    assert_eq!(got.len(), 3, "children ready");
    let id = Identity::now();
    let h = Helper::start();
    let g = std::fs::read_to_string(format!("/proc/{a}/task/{a}/children"))
        .unwrap_or_default()
        .trim()
        .to_string();
    ready(&format!("pids={},{z},{y},{a},{g},{b}", id.pid));
    wait_for_check();

    let mut c = Checker::new();
    id.check(&mut c, "R");
    // SAFETY: waitpid on our zombie child.
    let st = unsafe {
        let mut st = 0;
        let r = libc::waitpid(z, &mut st, libc::WNOHANG);
        c.eq(r, z, "R: Z is a zombie, reaped at once");
        st
    };
    c.check(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 42,
        format!("R: Z's exit status {st:#x}, want exit code 42"),
    );
    // SAFETY: waitpid on our zombie child.
    let st = unsafe {
        let mut st = 0;
        let r = libc::waitpid(y, &mut st, libc::WNOHANG);
        c.eq(r, y, "R: Y is a zombie, reaped at once");
        st
    };
    c.check(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGTERM,
        format!("R: Y's exit status {st:#x}, want killed by SIGTERM"),
    );
    p_wr.write_all(b"after").expect("write P");
    check_child(&mut c, "A", a);
    c.eq(
        shm[1].load(Ordering::SeqCst),
        0x5678,
        "R: what A wrote into the shared memory after the restore",
    );
    check_child(&mut c, "B", b);
    // SAFETY: lseek on our fd.
    c.eq(
        unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) },
        50,
        "R: offset of F after B moved it",
    );
    h.check(&mut c, "R");
    drop(file);
    c.report()
}
