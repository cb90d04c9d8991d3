//! Real programs from Debian's packages (installed by `cargo xtask setup`), run by the tests
//! on loopback with their own configuration in a scratch directory, never as the system's
//! services: redis-server and nginx, and the small clients the tests talk to them with (the
//! redis protocol, HTTP/1.1 keep-alive). The tests check the services' answers: that is their
//! self-verification.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{become_subreaper, reap_orphan, CrCmd, TempDir};

/// A free TCP port on 127.0.0.1 (the kernel's pick; another process could take it before the
/// service binds it, which the service's start then reports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The PID of `pid` and of all its descendants, parents first.
pub fn tree_of(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{p}/task"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for t in tasks {
            let kids =
                std::fs::read_to_string(format!("/proc/{p}/task/{t}/children")).unwrap_or_default();
            out.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
        i += 1;
    }
    out
}

/// The real uid of `pid` (from /proc/PID/status).
pub fn uid_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The number of the system call `pid` is blocked in (/proc/PID/syscall), if any.
pub fn syscall_of(pid: i32) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A service process tree started by a test: its root runs in a session of its own (a dump
/// needs the session leader in the tree), its output goes to a file in the scratch
/// directory. Everything it became is killed on drop.
pub struct Service {
    child: Option<Child>,
    pub pid: i32,
    /// Every PID the tree had when last looked at (killed on drop).
    pids: Vec<i32>,
}

impl Service {
    /// Spawns `cmd` (stdin /dev/null, stdout and stderr to DIR/NAME.out) in a new session.
    pub fn spawn(mut cmd: Command, name: &str, d: &TempDir) -> Service {
        let out = std::fs::File::create(d.join(&format!("{name}.out"))).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // SAFETY: only setsid (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} (run `cargo xtask setup`?): {e}"));
        let pid = child.id() as i32;
        Service {
            child: Some(child),
            pid,
            pids: vec![pid],
        }
    }

    /// The tree's PIDs now (and remembered for the cleanup).
    pub fn pids(&mut self) -> Vec<i32> {
        let now = tree_of(self.pid);
        for p in &now {
            if !self.pids.contains(p) {
                self.pids.push(*p);
            }
        }
        now
    }

    /// Waits (bounded) until `ok` holds for the tree, polling /proc: a service says nothing
    /// when its workers are up.
    pub fn wait_until(&mut self, what: &str, mut ok: impl FnMut(&[i32]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pids = self.pids();
            if ok(&pids) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 20 s (tree {pids:?})"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// `cr dump` of the tree into DIR/img (it must succeed and kill the tree), then every
    /// process of it reaped, so that their PIDs are free for the restore.
    pub fn dump_and_reap(&mut self, d: &TempDir, extra: &[&str]) {
        become_subreaper();
        let pids = self.pids();
        CrCmd::dump(self.pid, d.join("img")).args(extra).ok();
        self.reap(&pids);
    }

    fn reap(&mut self, pids: &[i32]) {
        if let Some(mut c) = self.child.take() {
            let st = crate::wait_child(&mut c);
            assert_ne!(
                st, 0,
                "the dumped service exited normally; expected it killed"
            );
        } else {
            reap_orphan(self.pid);
        }
        for &p in pids.iter().filter(|&&p| p != self.pid) {
            reap_orphan(p);
        }
    }

    /// `cr restore -d` of DIR/img; the restored tree is then ours (we are its subreaper).
    pub fn restore(&mut self, d: &TempDir, extra: &[&str]) {
        CrCmd::restore(d.join("img"))
            .pidfile(d.join("restore.pid"))
            .args(extra)
            .ok();
        let got: i32 = std::fs::read_to_string(d.join("restore.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(got, self.pid, "restored at another PID");
    }

    /// dump (killing) → reap → restore.
    pub fn dump_and_restore(&mut self, d: &TempDir, dump_extra: &[&str], restore_extra: &[&str]) {
        self.dump_and_reap(d, dump_extra);
        self.restore(d, restore_extra);
    }

    /// `cr dump -R`: the tree keeps running.
    pub fn dump_leave_running(&mut self, d: &TempDir, extra: &[&str]) {
        CrCmd::dump(self.pid, d.join("img"))
            .arg("-R")
            .args(extra)
            .ok();
    }

    /// `cr pre-dump` into DIR/p1, `between()`, then `cr dump --track-mem --prev-images-dir
    /// ../p1` into DIR/img (killing), reap, restore.
    pub fn pre_dump_then_dump_and_restore(
        &mut self,
        d: &TempDir,
        dump_extra: &[&str],
        restore_extra: &[&str],
        between: impl FnOnce(),
    ) {
        become_subreaper();
        CrCmd::pre_dump(self.pid, d.join("p1"))
            .args(dump_extra)
            .env("CR_TRACKER_LOG", d.join("tracker.log"))
            .ok();
        between();
        let pids = self.pids();
        CrCmd::dump(self.pid, d.join("img"))
            .args(&["--track-mem", "--prev-images-dir", "../p1"])
            .args(dump_extra)
            .ok();
        self.reap(&pids);
        self.restore(d, restore_extra);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let mut all = self.pids.clone();
        all.extend(tree_of(self.pid));
        for &p in &all {
            // SAFETY: plain kill(2) of processes this service became.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        for &p in &all {
            let mut st = 0;
            // SAFETY: reaping what we may be the (sub)reaper of; failure is fine.
            unsafe { libc::waitpid(p, &mut st, libc::WNOHANG) };
        }
    }
}

/// redis-server on 127.0.0.1:PORT, persistence off, its files in DIR/redis.
pub struct Redis {
    pub svc: Service,
    pub port: u16,
}

impl Redis {
    /// Starts it and waits for its READY=1 (it speaks systemd's notify protocol: a datagram
    /// on $NOTIFY_SOCKET, which the test binds: no polling of the port).
    pub fn start(d: &TempDir) -> Redis {
        let dir = d.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let conf = dir.join("redis.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\nsupervised systemd\nsave \"\"\n\
                 appendonly no\ndir {dir}\nlogfile {dir}/redis.log\ndatabases 2\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let sock_path = dir.join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).env("NOTIFY_SOCKET", &sock_path);
        let svc = Service::spawn(cmd, "redis", d);
        let mut b = [0u8; 512];
        loop {
            let n = notify.recv(&mut b).unwrap_or_else(|e| {
                panic!(
                    "redis-server never said READY=1 ({e}); its log:\n{}",
                    std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
                )
            });
            if String::from_utf8_lossy(&b[..n]).contains("READY=1") {
                break;
            }
        }
        Redis { svc, port }
    }

    pub fn connect(&self) -> RedisConn {
        RedisConn::connect(self.port)
    }
}

/// A reply of the redis protocol (RESP2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A bulk string's text.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Reply::Simple(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// One client connection to redis.
pub struct RedisConn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl RedisConn {
    pub fn connect(port: u16) -> RedisConn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        RedisConn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// Sends one command (without reading its reply: for pipelines).
    pub fn send(&mut self, args: &[&str]) {
        let mut m = format!("*{}\r\n", args.len());
        for a in args {
            m.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(m.as_bytes()).expect("write to redis");
    }

    /// Reads one reply.
    pub fn read(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n");
        let (t, rest) = line.split_at(1.min(line.len()));
        let num = || rest.parse::<i64>().unwrap_or(-1);
        Ok(match t {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(num()),
            "$" if num() < 0 => Reply::Bulk(None),
            "$" => {
                let mut b = vec![0u8; num() as usize + 2];
                self.r.read_exact(&mut b)?;
                b.truncate(b.len() - 2);
                Reply::Bulk(Some(b))
            }
            "*" if num() < 0 => Reply::Array(None),
            "*" => Reply::Array(Some(
                (0..num()).map(|_| self.read()).collect::<Result<_, _>>()?,
            )),
            _ => return Err(std::io::Error::other(format!("bad reply line {line:?}"))),
        })
    }

    /// One command and its reply.
    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        self.read()
            .unwrap_or_else(|e| panic!("redis reply to {args:?}: {e}"))
    }
}

/// nginx: a master (root) and two workers (www-data), serving DIR/nginx/html on
/// 127.0.0.1:PORT with keep-alive.
pub struct Nginx {
    pub svc: Service,
    pub port: u16,
    pub html: PathBuf,
}

/// x86_64 system call numbers of epoll_wait and epoll_pwait(2): where an idle worker waits.
const EPOLL_WAITS: [i64; 3] = [232, 281, 441];

impl Nginx {
    pub fn start(d: &TempDir) -> Nginx {
        let dir = d.join("nginx");
        let html = dir.join("html");
        std::fs::create_dir_all(&html).unwrap();
        for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join("tmp").join(t)).unwrap();
        }
        std::fs::write(html.join("index.html"), page("index", 10_000)).unwrap();
        std::fs::write(html.join("big.html"), page("big", 300_000)).unwrap();
        let port = free_port();
        let p = |s: &str| dir.join(s).display().to_string();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process on;\nworker_processes 2;\nuser www-data www-data;\n\
                 pid {pid};\nerror_log {err} info;\nevents {{ worker_connections 64; }}\n\
                 http {{\n  access_log {acc};\n  client_body_temp_path {tmp}/body;\n  \
                 proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n  \
                 uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n  \
                 keepalive_timeout 300s;\n  keepalive_requests 100000;\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    root {html};\n  }}\n}}\n",
                pid = p("nginx.pid"),
                err = p("error.log"),
                acc = p("access.log"),
                tmp = p("tmp"),
                html = html.display(),
            ),
        )
        .unwrap();
        // /usr/sbin may be missing from a test runner's PATH.
        let bin = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|b| !b.starts_with('/') || Path::new(b).exists())
            .unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(p("error.log"));
        let mut svc = Service::spawn(cmd, "nginx", d);
        let err = dir.join("error.log");
        let master = svc.pid;
        svc.wait_until("nginx's two workers waiting in epoll", |pids| {
            let workers: Vec<i32> = pids.iter().copied().filter(|&p| p != master).collect();
            if !crate::procfs::running(master) {
                panic!(
                    "nginx exited; its error log:\n{}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            workers.len() == 2
                && workers.iter().all(|&w| {
                    uid_of(w) == Some(33) && syscall_of(w).is_some_and(|n| EPOLL_WAITS.contains(&n))
                })
        });
        Nginx { svc, port, html }
    }

    /// The master's workers now.
    pub fn workers(&mut self) -> Vec<i32> {
        let m = self.svc.pid;
        self.svc.pids().into_iter().filter(|&p| p != m).collect()
    }
}

/// A page of `len` bytes, different for each `name`.
pub fn page(name: &str, len: usize) -> Vec<u8> {
    let line = format!("<p>{name}: the quick brown fox jumps over the lazy dog</p>\n");
    line.bytes().cycle().take(len).collect()
}

/// An HTTP/1.1 keep-alive connection.
pub struct Http {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Http {
    pub fn connect(port: u16) -> Http {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to nginx");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Http {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// GET `path`: (status, body), or what went wrong.
    pub fn get(&mut self, path: &str) -> Result<(u16, Vec<u8>), String> {
        write!(self.w, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut status = String::new();
        self.r
            .read_line(&mut status)
            .map_err(|e| format!("status line: {e}"))?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line {status:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.r
                .read_line(&mut h)
                .map_err(|e| format!("headers: {e}"))?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(|e| format!("{h}: {e}"))?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.r
            .read_exact(&mut body)
            .map_err(|e| format!("body: {e}"))?;
        Ok((code, body))
    }
}

/// What a file under a service's directory holds (for comparing served bodies).
pub fn file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}
