//! Workload for the lock-table tests (tests/tests/lock_table.rs): a small tree that takes and
//! releases file locks when told, one command per line on stdin, one reply per line on stdout.
//!
//! Usage: wl_lock_churn DIR
//!
//! A command is `PROC VERB ARGS…`, PROC being `root` or a child's name; the root runs its own
//! and forwards the others to the child (over a pipe pair) and relays the reply. Replies:
//! `ok [PID]`, `errno N` (the lock call failed with N), or `err WHY`.
//! - `open SLOT FILE` (DIR/FILE, read-write, created), `dup SLOT NEW`, `close SLOT`
//! - `posix SLOT r|w|u START LEN` (F_SETLK; LEN 0: to the end), `posixw …` (F_SETLKW),
//!   `ofd …` / `ofdw …` (F_OFD_SETLK / F_OFD_SETLKW)
//! - `flock SLOT sh|ex|un` (LOCK_NB), `flockw SLOT sh|ex` (blocking)
//! - `bg LOCKCMD…`: runs a lock command in a new thread and replies at once; `join` waits for
//!   it and replies with its result
//! - `repeat N LOCKCMD…`: runs a lock command N times in a row (stops at the first failure)
//! - `fork NAME` (root only): a child that shares the root's fd table as it is (a copy: its
//!   own POSIX locks, the root's descriptions); replies `ok PID`
//! - `exit` (a child): it exits; the root reaps it before replying.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

struct Proc {
    dir: PathBuf,
    slots: HashMap<String, i32>,
    bg: Option<JoinHandle<String>>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A lock command on `fd`: "ok" or "errno N".
fn lock_cmd(fd: i32, w: &[String]) -> String {
    let arg = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    let num = |i: usize| arg(i).parse::<i64>().unwrap_or(-1);
    let r = match arg(0) {
        "posix" | "posixw" | "ofd" | "ofdw" => {
            let cmd = match arg(0) {
                "posix" => libc::F_SETLK,
                "posixw" => libc::F_SETLKW,
                "ofd" => libc::F_OFD_SETLK,
                _ => libc::F_OFD_SETLKW,
            };
            let ty = match arg(2) {
                "r" => libc::F_RDLCK,
                "w" => libc::F_WRLCK,
                "u" => libc::F_UNLCK,
                t => return format!("err lock type {t:?}"),
            };
            // SAFETY: struct flock is plain data.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = ty as i16;
            fl.l_whence = libc::SEEK_SET as i16;
            fl.l_start = num(3);
            fl.l_len = num(4);
            // SAFETY: fcntl with a valid struct flock pointer.
            unsafe { libc::fcntl(fd, cmd, &mut fl) }
        }
        "flock" | "flockw" => {
            let op = match arg(2) {
                "sh" => libc::LOCK_SH,
                "ex" => libc::LOCK_EX,
                "un" => libc::LOCK_UN,
                o => return format!("err flock op {o:?}"),
            };
            let nb = if arg(0) == "flock" { libc::LOCK_NB } else { 0 };
            // SAFETY: plain flock(2).
            unsafe { libc::flock(fd, op | nb) }
        }
        v => return format!("err unknown command {v:?}"),
    };
    if r < 0 {
        format!("errno {}", errno())
    } else {
        "ok".to_string()
    }
}

impl Proc {
    fn slot(&self, name: &str) -> Result<i32, String> {
        self.slots
            .get(name)
            .copied()
            .ok_or_else(|| format!("err no slot {name:?}"))
    }

    /// Runs a command of this process (not `fork`, not `exit`).
    fn exec(&mut self, w: &[String]) -> String {
        match self.exec_inner(w) {
            Ok(s) | Err(s) => s,
        }
    }

    fn exec_inner(&mut self, w: &[String]) -> Result<String, String> {
        let arg = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
        match arg(0) {
            "open" => {
                let path = self.dir.join(arg(2));
                let c =
                    CString::new(path.as_os_str().as_bytes()).map_err(|e| format!("err {e}"))?;
                // SAFETY: valid C string.
                let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
                if fd < 0 {
                    return Err(format!("errno {}", errno()));
                }
                self.slots.insert(arg(1).to_string(), fd);
                Ok("ok".into())
            }
            "dup" => {
                // SAFETY: plain dup.
                let fd = unsafe { libc::dup(self.slot(arg(1))?) };
                if fd < 0 {
                    return Err(format!("errno {}", errno()));
                }
                self.slots.insert(arg(2).to_string(), fd);
                Ok("ok".into())
            }
            "close" => {
                let fd = self.slot(arg(1))?;
                self.slots.remove(arg(1));
                // SAFETY: closing an fd this workload opened.
                if unsafe { libc::close(fd) } < 0 {
                    return Err(format!("errno {}", errno()));
                }
                Ok("ok".into())
            }
            "bg" => {
                if self.bg.is_some() {
                    return Err("err a background command is running".into());
                }
                let fd = self.slot(arg(2))?;
                let rest: Vec<String> = w[1..].to_vec();
                self.bg = Some(std::thread::spawn(move || lock_cmd(fd, &rest)));
                Ok("ok".into())
            }
            "repeat" => {
                // repeat N LOCKCMD…: N times in a row, as fast as it goes (a burst of events).
                let n: u64 = arg(1)
                    .parse()
                    .map_err(|_| format!("err count {:?}", arg(1)))?;
                let fd = self.slot(arg(3))?;
                for _ in 0..n {
                    let r = lock_cmd(fd, &w[2..]);
                    if r != "ok" {
                        return Err(r);
                    }
                }
                Ok("ok".into())
            }
            "join" => match self.bg.take() {
                Some(h) => Ok(h
                    .join()
                    .unwrap_or_else(|_| "err the thread panicked".into())),
                None => Err("err nothing runs in the background".into()),
            },
            _ => {
                let fd = self.slot(arg(1))?;
                Ok(lock_cmd(fd, w))
            }
        }
    }
}

struct Child {
    pid: i32,
    cmd: std::fs::File,
    ack: BufReader<std::fs::File>,
}

fn pipe() -> (i32, i32) {
    let mut p = [0; 2];
    // SAFETY: valid out-array.
    assert_eq!(
        unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) },
        0,
        "pipe2"
    );
    (p[0], p[1])
}

/// A child's life: commands from `cmd_r`, replies on `ack_w`.
fn child_loop(mut p: Proc, cmd_r: i32, ack_w: i32) -> ! {
    // SAFETY: the fds are this child's ends of its pipes, owned from here.
    let (cmd, mut ack) = unsafe {
        (
            std::fs::File::from_raw_fd(cmd_r),
            std::fs::File::from_raw_fd(ack_w),
        )
    };
    for line in BufReader::new(cmd).lines() {
        let Ok(line) = line else { break };
        let w: Vec<String> = line.split_whitespace().map(String::from).collect();
        if w.first().map(String::as_str) == Some("exit") {
            let _ = writeln!(ack, "ok");
            std::process::exit(0);
        }
        let r = p.exec(&w);
        if writeln!(ack, "{r}").is_err() {
            break;
        }
    }
    std::process::exit(0)
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: wl_lock_churn DIR"));
    // SAFETY: setsid has no preconditions; its own session makes the tree dumpable.
    unsafe { libc::setsid() };
    let mut root = Proc {
        dir: Path::new(&dir).to_path_buf(),
        slots: HashMap::new(),
        bg: None,
    };
    let mut children: HashMap<String, Child> = HashMap::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<String> = line.split_whitespace().map(String::from).collect();
        let (who, cmd) = match w.split_first() {
            Some((who, cmd)) if !cmd.is_empty() => (who.as_str(), cmd),
            _ => {
                let _ = writeln!(out, "err bad line {line:?}");
                let _ = out.flush();
                continue;
            }
        };
        let reply = if who == "root" && cmd[0] == "fork" {
            let name = cmd.get(1).cloned().unwrap_or_default();
            let (cmd_r, cmd_w) = pipe();
            let (ack_r, ack_w) = pipe();
            // SAFETY: no other thread runs (the harness joins background commands before a
            // fork); the child only runs this workload's own loop.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: the parent's ends and the harness's pipes are not the child's.
                unsafe {
                    libc::close(cmd_w);
                    libc::close(ack_r);
                    for c in children.values() {
                        use std::os::fd::AsRawFd;
                        libc::close(c.cmd.as_raw_fd());
                        libc::close(c.ack.get_ref().as_raw_fd());
                    }
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::close(null);
                }
                let p = Proc {
                    dir: root.dir.clone(),
                    slots: root.slots.clone(),
                    bg: None,
                };
                child_loop(p, cmd_r, ack_w);
            }
            // SAFETY: the child's ends, not ours.
            unsafe {
                libc::close(cmd_r);
                libc::close(ack_w);
            }
            if pid < 0 {
                format!("errno {}", errno())
            } else {
                // SAFETY: our ends of the pipes, owned from here.
                let (cmd, ack) = unsafe {
                    (
                        std::fs::File::from_raw_fd(cmd_w),
                        std::fs::File::from_raw_fd(ack_r),
                    )
                };
                children.insert(
                    name,
                    Child {
                        pid,
                        cmd,
                        ack: BufReader::new(ack),
                    },
                );
                format!("ok {pid}")
            }
        } else if who == "root" {
            root.exec(cmd)
        } else if let Some(c) = children.get_mut(who) {
            let mut reply = String::new();
            let sent = writeln!(c.cmd, "{}", cmd.join(" ")).is_ok();
            if sent && c.ack.read_line(&mut reply).is_ok() && !reply.is_empty() {
                if cmd[0] == "exit" {
                    let mut st = 0;
                    // SAFETY: reaping our own child.
                    unsafe { libc::waitpid(c.pid, &mut st, 0) };
                    children.remove(who);
                }
                reply.trim().to_string()
            } else {
                format!("err child {who} does not answer")
            }
        } else {
            format!("err no process {who:?}")
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
