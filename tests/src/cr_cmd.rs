//! Running the `cr` binary under test.
//!
//! The tests spell the same command lines again and again (a dump of a PID into an images
//! directory with its log beside the images, a detached restore with a pidfile) and want the
//! same things shown when one fails: cr's stderr and the log it wrote. [`CrCmd`] puts a command
//! line together once, runs it, prints it for the record, and says all of that on failure.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Output, Stdio};

/// The `cr` binary under test: $CR_BIN (set by `cargo xtask test`) or target/release/cr.
pub fn cr_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CR_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    root.join("target/release/cr")
}

/// Runs `cr ARGS`, capturing its output (also printed: the test's output then shows what cr
/// said when the test fails).
pub fn cr(args: &[&str]) -> Output {
    CrCmd::new(args).run()
}

/// Runs `cr ARGS` and asserts it succeeded.
pub fn cr_ok(args: &[&str]) -> Output {
    CrCmd::new(args).ok()
}

/// What a finished command wrote on stderr, as text (cr's errors are there).
pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One `cr` command line: built by [`CrCmd::dump`], [`CrCmd::restore`] (or [`CrCmd::new`]),
/// extended with flags, then run by [`CrCmd::run`], [`CrCmd::ok`] or [`CrCmd::fails`].
#[derive(Clone, Debug)]
pub struct CrCmd {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// The log file its `-o` names inside its `-D` directory: shown when the command fails.
    log: Option<PathBuf>,
}

impl CrCmd {
    /// `cr ARGS`, nothing added.
    pub fn new(args: &[&str]) -> CrCmd {
        CrCmd {
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
            log: None,
        }
    }

    /// `cr SUBCOMMAND -t PID -D IMG -o dump.log -v4`: a dump or pre-dump as the tests take
    /// them, with the most verbose log beside the images (IMG/dump.log).
    pub fn checkpoint(subcommand: &str, pid: i32, img: impl AsRef<Path>) -> CrCmd {
        let img = img.as_ref();
        let mut c = CrCmd::new(&[subcommand, "-t", &pid.to_string()]);
        c.args.extend(["-D".into(), img.as_os_str().to_owned()]);
        c.args.extend(["-o", "dump.log", "-v4"].map(OsString::from));
        c.log = Some(img.join("dump.log"));
        c
    }

    /// `cr dump -t PID -D IMG -o dump.log -v4`.
    pub fn dump(pid: i32, img: impl AsRef<Path>) -> CrCmd {
        CrCmd::checkpoint("dump", pid, img)
    }

    /// `cr pre-dump -t PID -D IMG -o dump.log -v4`.
    pub fn pre_dump(pid: i32, img: impl AsRef<Path>) -> CrCmd {
        CrCmd::checkpoint("pre-dump", pid, img)
    }

    /// `cr restore -D IMG -d -o restore.log -v4`: detached, so that cr returns once the tree
    /// runs and the harness (its subreaper) collects the restored tasks' exit status itself.
    pub fn restore(img: impl AsRef<Path>) -> CrCmd {
        let img = img.as_ref();
        let mut c = CrCmd::new(&["restore"]);
        c.args.extend(["-D".into(), img.as_os_str().to_owned()]);
        c.args
            .extend(["-d", "-o", "restore.log", "-v4"].map(OsString::from));
        c.log = Some(img.join("restore.log"));
        c
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> CrCmd {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// Appends arguments (the flags a test is about: `-R`, `--tcp-established`, …).
    pub fn args(mut self, a: &[&str]) -> CrCmd {
        self.args.extend(a.iter().map(OsString::from));
        self
    }

    /// `--pidfile P`: where a restore writes the PID of the restored root.
    pub fn pidfile(self, p: impl AsRef<Path>) -> CrCmd {
        self.arg("--pidfile").arg(p.as_ref())
    }

    /// Sets an environment variable for cr (test knobs such as CR_TRACKER_LOG).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> CrCmd {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// The command line as a shell would show it, environment first.
    fn display(&self) -> String {
        let env = self
            .env
            .iter()
            .map(|(k, v)| format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        let args = self
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        format!("{}cr {args}", env.collect::<String>())
    }

    /// The command, ready to run or to spawn (on a terminal, say).
    pub fn command(&self) -> Command {
        let mut c = Command::new(cr_bin());
        c.args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs it, capturing its output; prints the command line, exit status and output.
    pub fn run(&self) -> Output {
        let out = self.command().output().expect("run cr");
        eprintln!(
            "$ {}\n-> {}\n{}{}",
            self.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// What its log file holds (empty when it wrote none, or the command has no `-o`).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Runs it and asserts it succeeded; a failure shows cr's stderr and its log.
    pub fn ok(&self) -> Output {
        let out = self.run();
        if !out.status.success() {
            let log = match &self.log {
                Some(p) => format!("\n--- {} ---\n{}", p.display(), self.log()),
                None => String::new(),
            };
            panic!(
                "{} failed ({}): {}{log}",
                self.display(),
                out.status,
                stderr_of(&out)
            );
        }
        out
    }

    /// Runs it and asserts it failed (`why`: what should make it fail, for the message if it
    /// does not); returns its stderr, for the test to check that cr gave that reason.
    pub fn fails(&self, why: &str) -> String {
        let out = self.run();
        assert!(
            !out.status.success(),
            "{} succeeded; it must fail: {why}",
            self.display()
        );
        stderr_of(&out)
    }
}

/// A `cr` running in the background whose stderr the test follows line by line, so that it can
/// act at a precise point of cr's work (a log line says it is there) instead of after a guessed
/// delay. Killed on drop if the test ends early.
pub struct WatchedCr {
    child: Option<Child>,
    lines: Lines<BufReader<ChildStderr>>,
}

impl WatchedCr {
    /// Starts `cr ARGS` (which must log to stderr: no `-o`).
    pub fn spawn(args: &[&str]) -> WatchedCr {
        WatchedCr::spawn_cmd(&CrCmd::new(args))
    }

    /// Starts `c` (with its environment; it must log to stderr: no `-o`).
    pub fn spawn_cmd(c: &CrCmd) -> WatchedCr {
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = c
            .command()
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cr");
        eprintln!("$ cr {} &", args.join(" "));
        let lines = BufReader::new(child.stderr.take().expect("cr's stderr")).lines();
        WatchedCr {
            child: Some(child),
            lines,
        }
    }

    /// cr's PID.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Echoes cr's stderr up to and including the first line containing `needle`; panics if
    /// cr's stderr ends before (the moment the test waits for never came).
    pub fn wait_for_line(&mut self, needle: &str) {
        for l in self.lines.by_ref() {
            let l = l.expect("read cr's stderr");
            eprintln!("{l}");
            if l.contains(needle) {
                return;
            }
        }
        panic!("cr's stderr ended without a line containing {needle:?}");
    }

    /// Echoes the rest of cr's stderr and waits for it to exit.
    pub fn finish(mut self) -> ExitStatus {
        for l in self.lines.by_ref() {
            eprintln!("{}", l.expect("read cr's stderr"));
        }
        self.child.take().expect("cr").wait().expect("wait for cr")
    }
}

impl Drop for WatchedCr {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
