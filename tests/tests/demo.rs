//! `cargo xtask demo` as a newcomer runs it: in a terminal, redirected to a file, and piped.
//! Each way the demo must dump and restore its service and see it count on, exit 0, and leave
//! nothing behind; a failing cr must give one clear error and exit 1, never a panic.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use cr_tests::pty::Pty;
use cr_tests::{cr_bin, require_root, wait_child, TempDir};

fn demo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cr-demo"));
    c.env("CR_BIN", cr_bin()).stdin(Stdio::null());
    // A panic would print a backtrace: make sure the tests would see it.
    c.env("RUST_BACKTRACE", "1");
    c
}

/// The number after `prefix` on the line that has it.
fn number_after(out: &str, prefix: &str) -> Option<i32> {
    let rest = out.split(prefix).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// What every successful run must show, whatever its stdout and stderr are.
fn assert_demo_succeeded(how: &str, status: i32, out: &str) {
    let out = out.replace('\r', "");
    assert_eq!(status, 0, "the demo {how} exited {status}; it said:\n{out}");
    for bad in ["panicked", "backtrace", "error"] {
        assert!(
            !out.to_lowercase().contains(bad),
            "the demo {how} said {bad:?}:\n{out}"
        );
    }
    let pid = number_after(&out, "== done: PID ")
        .unwrap_or_else(|| panic!("the demo {how} did not finish:\n{out}"));
    assert!(
        out.contains(&format!("PID {pid} runs again")),
        "the demo {how} did not restore PID {pid}:\n{out}"
    );
    let before = out.matches("(written before the dump)").count();
    let after = out.matches("(written by the restored process)").count();
    assert!(
        before == 1 && after >= 5,
        "the demo {how} showed {before} line(s) before the dump and {after} after:\n{out}"
    );
    // It cleans up: the service is gone, and so is its directory.
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c != "wl_counter\n"),
        "the demo {how} left its service PID {pid} running"
    );
    let log = out
        .split("log ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("the demo {how} did not name its log:\n{out}"));
    assert!(
        !log.parent().unwrap().exists(),
        "the demo {how} left {} behind",
        log.parent().unwrap().display()
    );
}

/// In a terminal: the demo leads a session whose controlling terminal and stdio are a pty (what
/// failed before with "fd 2 is a terminal").
#[test]
fn demo_in_a_terminal() {
    require_root();
    let pty = Pty::open();
    let mut child = pty.spawn(&mut demo());
    // Read until every holder of the terminal (the demo, the cr runs) is gone: EIO then.
    let mut master = pty.master.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = wait_child(&mut child);
    drop(pty);
    let out = reader.join().unwrap();
    assert_demo_succeeded("in a terminal", status, &out);
}

/// Redirected to a file, stdout and stderr both (`cargo xtask demo > demo.log 2>&1`: what
/// failed before with "file demo.log changed size since the dump").
#[test]
fn demo_redirected_to_a_file() {
    require_root();
    let dir = TempDir::new("demo-file");
    let path = dir.join("demo.log");
    let f = std::fs::File::create(&path).unwrap();
    let mut child = demo()
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let status = wait_child(&mut child);
    let out = std::fs::read_to_string(&path).unwrap();
    assert_demo_succeeded("redirected to a file", status, &out);
}

/// Piped (`cargo xtask demo | less`).
#[test]
fn demo_piped() {
    require_root();
    let o = demo().output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_demo_succeeded("piped", o.status.code().unwrap_or(-1), &out);
}

/// A cr that fails: one line saying which command failed, exit status 1, no panic, and the
/// service (which a failed dump leaves running) killed.
#[test]
fn demo_with_a_failing_cr_says_so_and_cleans_up() {
    require_root();
    let o = demo().env("CR_BIN", "/bin/false").output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        err.trim(),
        "cr-demo: error: `cr dump` failed (exit status: 1); cr said why above",
        "stdout:\n{out}"
    );
    let pid = number_after(&out, "   PID ").expect("the demo named its service");
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c != "wl_counter\n"),
        "the demo left its service PID {pid} running"
    );
}

/// No cr at all: a clear error naming the path and what to do.
#[test]
fn demo_without_cr_says_how_to_build_it() {
    require_root();
    let o = demo().env("CR_BIN", "/nonexistent/cr").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains("no cr binary at /nonexistent/cr") && err.contains("cargo xtask build"),
        "stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "stderr:\n{err}");
}
