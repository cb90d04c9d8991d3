//! The tracker's file-lock table (cr-ebpf/src/locks.rs, cr-user/src/track/locks.rs) against
//! the kernel's own view: a tree (tests/src/bin/wl_lock_churn.rs) takes and releases flock,
//! POSIX and OFD locks in every pattern, some before the tracker starts and most after, and at
//! each step the table (asked through the library, as a dump asks) equals `/proc/locks` on the
//! tree's files. Then dumps with a tracker: the table replaces `/proc/locks` (and with no lock
//! held nothing is read), a tree holding locks is dumped and restored with them, and a refusal
//! without `-l` still names every lock.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use cr::kernel::proc::locks::{FileLock, LockKind};
use cr::tracker::client::TrackerConn;
use cr::tracker::locks::{InodeId, TableKind, TableLock};
use cr_tests::{dump_and_restore_tree, dump_cmd, workload_bin, CrCmd, TempDir, Workload};

/// The churn workload, driven line by line.
struct Churn {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
    kids: HashMap<String, i32>,
    d: TempDir,
}

impl Churn {
    fn start(name: &str) -> Churn {
        let d = TempDir::new(name);
        let err = std::fs::File::create(d.join("churn.stderr")).unwrap();
        let mut child = Command::new(workload_bin("wl_lock_churn"))
            .arg(d.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start wl_lock_churn");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id() as i32;
        let mut w = Churn {
            child,
            stdin,
            stdout,
            pid,
            kids: HashMap::new(),
            d,
        };
        // The first reply means the workload runs its loop (and left our session).
        w.expect_errno("root flock nothing sh");
        w
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut r = String::new();
        self.stdout.read_line(&mut r).unwrap();
        let r = r.trim().to_string();
        eprintln!("> {line}\n< {r}");
        r
    }

    fn ok(&mut self, line: &str) -> String {
        let r = self.cmd(line);
        assert!(r.starts_with("ok"), "{line}: {r}");
        r
    }

    fn expect_errno(&mut self, line: &str) -> String {
        let r = self.cmd(line);
        assert!(
            r.starts_with("errno") || r.starts_with("err "),
            "{line}: expected a failure, got {r}"
        );
        r
    }

    fn fork(&mut self, name: &str) -> i32 {
        let r = self.ok(&format!("root fork {name}"));
        let pid: i32 = r.trim_start_matches("ok").trim().parse().unwrap();
        self.kids.insert(name.to_string(), pid);
        pid
    }

    fn exit(&mut self, name: &str) {
        self.ok(&format!("{name} exit"));
        self.kids.remove(name);
    }

    fn tree(&self) -> Vec<i32> {
        let mut t = vec![self.pid];
        t.extend(self.kids.values());
        t
    }

    /// `cr ARGS -t ROOT -D DIR/img -o dump.log -v4`; returns the log.
    fn cr_on(&self, args: &[&str], img: &str) -> (bool, String, String) {
        let pid = self.pid.to_string();
        let dir = self.d.s(img);
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-t", &pid, "-D", &dir, "-o", "dump.log", "-v4"]);
        let out = Command::new(cr_tests::cr_bin())
            .args(&a)
            .env("CR_TRACKER_LOG", self.d.join("tracker.log"))
            .output()
            .unwrap();
        let log =
            std::fs::read_to_string(self.d.join(&format!("{img}/dump.log"))).unwrap_or_default();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            log,
        )
    }

    /// Starts the tracker (`cr pre-dump`, as a user would).
    fn start_tracker(&self) {
        let (ok, err, log) = self.cr_on(&["pre-dump"], "p0");
        assert!(ok, "pre-dump failed: {err}\n{log}\n{}", self.tracker_log());
    }

    fn tracker_log(&self) -> String {
        std::fs::read_to_string(self.d.join("tracker.log")).unwrap_or_default()
    }

    /// The files of the workload's directory by inode.
    fn files(&self) -> HashMap<InodeId, String> {
        let mut out = HashMap::new();
        for e in std::fs::read_dir(self.d.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".lck") {
                continue;
            }
            let m = e.metadata().unwrap();
            let id = InodeId {
                major: libc::major(m.dev()),
                minor: libc::minor(m.dev()),
                ino: m.ino(),
            };
            out.insert(id, name);
        }
        out
    }

    /// Waits until `/proc/locks` shows a request blocked on `file` (a thread of the workload
    /// is then asleep in the kernel; nothing else can tell that).
    fn wait_blocked(&self, file: &str) {
        let t0 = Instant::now();
        loop {
            let files = self.files();
            let all = cr::kernel::proc::locks::read_locks().unwrap();
            if all
                .iter()
                .any(|l| l.blocked && name_of(&files, l).as_deref() == Some(file))
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no request got blocked on {file}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The table (asked as a dump asks) equals `/proc/locks` on the workload's files, except
    /// those the table says it cannot tell, which must be exactly `unknown`.
    fn check(&self, what: &str, unknown: &[&str]) {
        let files = self.files();
        let conn = TrackerConn::connect(self.pid).unwrap().expect("no tracker");
        let (state, view) = conn.locks(&self.tree()).unwrap();
        drop(conn);
        assert_eq!(state.pid, self.pid);
        assert!(
            view.usable,
            "{what}: the lock table is not usable: {}\n{}",
            view.why,
            self.tracker_log()
        );
        let mut unk: Vec<String> = view
            .unknown
            .iter()
            .filter_map(|(i, _)| files.get(i).cloned())
            .collect();
        unk.sort();
        assert_eq!(
            unk, unknown,
            "{what}: inodes the table cannot tell: {:?}",
            view.unknown
        );
        let line =
            |name: String, kind: &str, write: bool, start: u64, end: Option<u64>, pid: i32| {
                format!(
                    "{name} {kind} {} {start}-{} pid {pid}",
                    if write { "W" } else { "R" },
                    end.map_or("EOF".into(), |e| e.to_string())
                )
            };
        let mut table: Vec<String> = view
            .locks
            .iter()
            .filter_map(|l: &TableLock| {
                let name = files.get(&l.inode)?.clone();
                let kind = match l.kind {
                    TableKind::Posix => "POSIX",
                    TableKind::Ofd => "OFD",
                    TableKind::Flock => "FLOCK",
                };
                (!unknown.contains(&name.as_str()))
                    .then(|| line(name, kind, l.write, l.start, l.end, l.pid))
            })
            .collect();
        let mut kernel: Vec<String> = cr::kernel::proc::locks::read_locks()
            .unwrap()
            .iter()
            .filter(|l| !l.blocked)
            .filter_map(|l| {
                let name = name_of(&files, l)?;
                let kind = match l.kind {
                    LockKind::Posix => "POSIX",
                    LockKind::Ofd => "OFD",
                    LockKind::Flock => "FLOCK",
                    _ => "OTHER",
                };
                let write = l.access == cr::kernel::proc::locks::LockAccess::Write;
                (!unknown.contains(&name.as_str()))
                    .then(|| line(name, kind, write, l.start, l.end, l.pid))
            })
            .collect();
        table.sort();
        kernel.sort();
        assert_eq!(
            table, kernel,
            "{what}: the lock table (left) differs from /proc/locks (right)"
        );
        eprintln!("== {what}: {} locks agree", table.len());
    }
}

fn name_of(files: &HashMap<InodeId, String>, l: &FileLock) -> Option<String> {
    let id = InodeId {
        major: l.dev_major,
        minor: l.dev_minor,
        ino: l.inode?,
    };
    files.get(&id).cloned()
}

impl Drop for Churn {
    fn drop(&mut self) {
        for &k in self.kids.values() {
            // SAFETY: plain kill(2) of the workload's child.
            unsafe { libc::kill(k, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every pattern, before and after the tracker starts; at each step the table equals
/// `/proc/locks`. A dump then reads the inode the table cannot tell and gives it back.
#[test]
fn lock_table_matches_proc_locks() {
    let mut w = Churn::start("lock-table");
    // Before the tracker: POSIX ranges, a flock and an OFD lock of the root, a child's own
    // POSIX lock.
    w.ok("root open d d.lck");
    w.ok("root posix d w 0 100");
    w.ok("root posix d r 200 0");
    w.ok("root open e e.lck");
    w.ok("root flock e sh");
    w.ok("root open f f.lck");
    w.ok("root ofd f w 0 10");
    w.ok("root open g g.lck");
    w.fork("c1");
    w.ok("c1 posix g w 1000 100");
    w.start_tracker();
    w.check("seeded from the survey", &[]);

    // POSIX: split by a middle unlock, a hole of another type, merged back, adjacent ranges
    // of the same type merged and of another type not, split again, downgrade.
    w.ok("root open a a.lck");
    w.ok("root posix a w 0 100");
    w.ok("root posix a u 40 20");
    w.check("POSIX split", &[]);
    w.ok("root posix a r 40 20");
    w.check("POSIX hole of another type", &[]);
    w.ok("root posix a w 40 20");
    w.ok("root posix a r 100 100");
    w.ok("root posix a r 200 100");
    w.check("POSIX merges", &[]);
    w.ok("root posix a w 150 10");
    w.ok("root posix a r 0 100");
    w.ok("root posix a w 250 0");
    w.check("POSIX split, downgrade, upgrade to EOF", &[]);
    // OFD: the same rules, owned by the description.
    w.ok("root open b b.lck");
    w.ok("root ofd b w 0 100");
    w.ok("root ofd b u 10 10");
    w.ok("root ofd b r 10 10");
    w.ok("root posix b r 500 10");
    w.check("OFD and POSIX on one file", &[]);
    // flock: conversions, a dup sharing the description, a close that is not the last.
    w.ok("root open c c.lck");
    w.ok("root flock c ex");
    w.ok("root flock c sh");
    w.ok("root flock c ex");
    w.ok("root dup c c2");
    w.ok("root flock c2 un");
    w.check("flock unlocked through a dup", &[]);
    w.ok("root flock c2 sh");
    w.ok("root close c2");
    w.check("flock kept after closing a dup", &[]);
    // A POSIX lock from before the tracker, changed after: its process is its owner.
    w.ok("root posix d u 0 50");
    w.check("surveyed POSIX lock changed", &[]);
    // Any close of a file drops the process's POSIX locks on it (not the description's OFD).
    w.ok("root open a2 a.lck");
    w.ok("root close a2");
    w.ok("root ofd a w 1000 10");
    w.ok("root open b2 b.lck");
    w.ok("root close b2");
    w.check("close releases the POSIX locks only", &[]);
    // A child: its own POSIX lock; it converts the flock of the description it shares; it
    // exits (its POSIX lock goes, the shared description's flock stays).
    w.fork("c2");
    w.ok("c2 posix a w 500 100");
    w.ok("c2 flock c ex");
    w.ok("c2 flock c sh");
    w.check("child's own POSIX lock, shared flock converted", &[]);
    w.exit("c2");
    w.check("child exited", &[]);
    // A blocked F_SETLKW, granted when the holder (c1, from before the tracker) unlocks.
    w.ok("root bg posixw g w 1000 50");
    w.wait_blocked("g.lck");
    w.check("POSIX request blocked", &[]);
    w.ok("c1 posix g u 1000 100");
    assert_eq!(w.ok("root join"), "ok");
    w.check("blocked POSIX request granted", &[]);
    // A blocking flock conversion: the shared lock goes first, then the request waits.
    w.ok("c1 open cc c.lck");
    w.ok("c1 flock cc sh");
    w.ok("root bg flockw c ex");
    w.wait_blocked("c.lck");
    w.check("flock conversion blocked (old lock dropped)", &[]);
    w.ok("c1 flock cc un");
    assert_eq!(w.ok("root join"), "ok");
    w.check("flock conversion granted", &[]);
    // A refused conversion drops the old lock too.
    w.expect_errno("c1 flock cc sh");
    w.ok("root flock c sh");
    w.ok("c1 flock cc sh");
    w.expect_errno("root flock c ex");
    w.check("refused flock conversion", &[]);
    // OFD through a child's copy of the description; another description is refused.
    w.ok("c1 ofd g w 2000 10");
    w.ok("root open g2 g.lck");
    w.expect_errno("root ofd g2 w 2000 1");
    w.check("OFD through a shared description", &[]);

    // The flock from before the tracker is converted: the table cannot tell which
    // description that was, and says so.
    w.ok("root flock e ex");
    w.check("surveyed flock touched", &["e.lck"]);
    // A dump reads the exact state (the table cannot tell) and hands it back.
    let (ok, err, log) = w.cr_on(&["dump", "-R", "-l"], "d1");
    assert!(ok, "dump -R -l: {err}\n{log}");
    assert!(
        log.contains("file locks: read from /proc/locks")
            && log.contains("cannot tell the state of"),
        "{log}"
    );
    w.check("after a dump gave the exact state back", &[]);
    let (ok, err, log) = w.cr_on(&["dump", "-R", "-l"], "d2");
    assert!(ok, "dump -R -l: {err}\n{log}");
    assert!(
        log.contains("file locks: from the tracker's lock table"),
        "{log}"
    );
    // The exact read named the converted flock's description: it is known from now on.
    w.ok("root flock e un");
    w.ok("root close d");
    w.check("released", &[]);
    let (ok, err, log) = w.cr_on(&["dump", "-R", "-l"], "d3");
    assert!(ok, "dump -R -l: {err}\n{log}");
    assert!(
        log.contains("file locks: from the tracker's lock table"),
        "{log}"
    );
}

/// A burst of lock requests many times the ring's size: the tracker keeps up (woken when the
/// ring is half full), nothing is lost and the table still equals `/proc/locks`.
#[test]
fn burst_of_events() {
    let mut w = Churn::start("lock-table-burst");
    w.ok("root open a a.lck");
    w.ok("root open b b.lck");
    w.start_tracker();
    // 2 events per round: 200 000 events of 72 bytes in the ring (14 Ki fit).
    w.ok("root repeat 50000 posix a w 0 100");
    w.ok("root repeat 50000 posix a u 0 100");
    w.ok("root repeat 50000 flock b ex");
    w.ok("root repeat 50000 flock b un");
    w.ok("root posix a r 10 10");
    w.ok("root flock b sh");
    w.check("after 200 000 events", &[]);
}

/// A tracked tree that holds no lock: the dump asks the table and reads nothing else.
#[test]
fn no_locks_no_reads() {
    let w = Churn::start("lock-table-none");
    w.start_tracker();
    let (ok, err, log) = w.cr_on(
        &["dump", "-R", "--track-mem", "--prev-images-dir", "../p0"],
        "d1",
    );
    assert!(ok, "dump: {err}\n{log}");
    assert!(
        log.contains("file locks: from the tracker's lock table")
            && log.contains("0 held through the tree's fds, 0 fds read"),
        "{log}"
    );
    w.check("nothing held", &[]);
}

/// wl_locks (a tree, locks taken before the tracker starts): `dump -l --track-mem` on top of
/// a pre-dump takes the locks from the table, and the restored tree holds them again.
#[test]
fn tracked_tree_with_locks_dumped_and_restored() {
    let d = TempDir::new("lock-table-e2e");
    let mut w = Workload::start("wl_locks", &[&d.s(""), "tree"], &d);
    let pids = w.tree_pids();
    assert_eq!(pids.len(), 2, "READY {}", w.info);
    CrCmd::pre_dump(w.pid, d.join("p0")).ok();
    dump_and_restore_tree(
        &mut w,
        &d,
        &pids,
        &["-l", "--track-mem", "--prev-images-dir", "../p0"],
        &["-l"],
    );
    let log = d.img_log("dump.log");
    assert!(
        log.contains("file locks: from the tracker's lock table"),
        "{log}"
    );
    w.assert_pass();
}

/// Without `-l` a tracked tree holding locks is still refused, every lock named.
#[test]
fn tracked_tree_without_file_locks_refuses() {
    let d = TempDir::new("lock-table-refused");
    let mut w = Workload::start("wl_locks", &[&d.s("")], &d);
    CrCmd::pre_dump(w.pid, d.join("p0")).ok();
    let err = dump_cmd(&w, &d)
        .arg("-R")
        .fails("the tree holds locks and -l is not given");
    for want in [
        "a flock write lock on",
        "a POSIX read lock on bytes 10-19",
        "a POSIX write lock on bytes 100-199",
        "an OFD write lock on bytes 0-4095",
    ] {
        assert!(err.contains(want), "dump error lacks {want:?}: {err}");
    }
    let log = d.img_log("dump.log");
    assert!(
        log.contains("file locks: from the tracker's lock table"),
        "{log}"
    );
    w.assert_pass();
}
