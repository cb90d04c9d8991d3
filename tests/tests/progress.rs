//! The progress line: on a terminal (here a pty made by `script`), a dump and a restore that
//! last show `writing pages of PID N: X / Y MiB (P%), R MiB/s` and `restoring pages of PID N:
//! …`; a quick dump shows nothing; with stderr redirected nothing of it is printed, whatever
//! the duration. The workload checks itself after each.

use std::process::Command;

use cr_tests::{become_subreaper, cr_bin, stderr_of, CrCmd, TempDir, Workload};

/// Runs `cr ARGS` on a fresh pty (`script -qefc`), with `env`; returns what the terminal
/// showed. cr must succeed.
fn on_a_terminal(args: &[String], env: &[(&str, &str)]) -> String {
    let line = std::iter::once(cr_bin().display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = Command::new("script");
    c.args(["-qefc", &line, "/dev/null"]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run script (util-linux)");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("$ script -qefc {line:?}\n-> {}\n{shown:?}", out.status);
    assert!(out.status.success(), "{line} failed on the pty: {shown}");
    shown
}

/// The last progress line of `what` that `shown` holds: (done MiB, total MiB, percent).
fn last_line(shown: &str, what: &str) -> (f64, f64, u64) {
    let l = shown
        .split(['\r', '\n'])
        .filter_map(|l| l.trim_start_matches("\x1b[K").strip_prefix(what))
        .next_back()
        .unwrap_or_else(|| panic!("no progress line {what:?} on the terminal: {shown:?}"));
    // ": X / Y MiB (P%), R MiB/s"
    let f: Vec<&str> = l.split_whitespace().collect();
    assert!(
        f.len() == 8 && f[0] == ":" || f.len() == 7,
        "malformed line {l:?}"
    );
    let f: Vec<&str> = l.trim_start_matches(':').split_whitespace().collect();
    assert_eq!((f[1], f[3], f[6]), ("/", "MiB", "MiB/s"), "line {l:?}");
    let pct = f[4].trim_matches(|c| c == '(' || c == ')' || c == '%' || c == ',');
    (
        f[0].parse().unwrap(),
        f[2].parse().unwrap(),
        pct.parse().unwrap(),
    )
}

#[test]
fn a_long_dump_and_restore_show_progress_on_a_terminal() {
    let d = TempDir::new("progress-tty");
    let mut w = Workload::start("wl_memory", &[&d.s(""), "--big"], &d);
    become_subreaper();
    // A second is long for a test: the line is asked for at once, and the test looks at what
    // it says.
    let quick = [("CR_TEST_PROGRESS_AFTER_MS", "0")];
    let pid = w.pid.to_string();
    let shown = on_a_terminal(
        &["dump", "-t", &pid, "-D", &d.s("img"), "-o", "dump.log"].map(String::from),
        &quick,
    );
    let (done, total, pct) = last_line(&shown, &format!("writing pages of PID {pid}"));
    assert!(
        total >= 512.0,
        "the page file is at least the 512 MiB touched: {total}"
    );
    assert!(done <= total && pct <= 100, "{done} / {total} ({pct}%)");
    assert!(
        shown.trim_end().ends_with("\x1b[K"),
        "the line is cleared at the end: {:?}",
        &shown[shown.len().saturating_sub(80)..]
    );
    w.reap_killed();
    let shown = on_a_terminal(
        &[
            "restore",
            "-D",
            &d.s("img"),
            "-d",
            "-o",
            "restore.log",
            "--pidfile",
            &d.s("restore.pid"),
        ]
        .map(String::from),
        &quick,
    );
    let (_, total, _) = last_line(&shown, &format!("restoring pages of PID {pid}"));
    assert!(total >= 512.0, "{total}");
    w.assert_pass();
}

#[test]
fn a_quick_dump_shows_nothing_on_a_terminal() {
    let d = TempDir::new("progress-quick");
    let mut w = Workload::start("wl_memory", &[&d.s("")], &d);
    let pid = w.pid.to_string();
    let shown = on_a_terminal(
        &[
            "dump",
            "-t",
            &pid,
            "-D",
            &d.s("img"),
            "-o",
            "dump.log",
            "-R",
        ]
        .map(String::from),
        &[],
    );
    assert!(
        !shown.contains("pages of PID"),
        "a dump well under a second printed a progress line: {shown:?}"
    );
    w.assert_pass();
}

#[test]
fn nothing_of_it_when_stderr_is_redirected() {
    let d = TempDir::new("progress-redirected");
    let mut w = Workload::start("wl_memory", &[&d.s(""), "--big"], &d);
    // The log goes to stderr (no -o), which is a pipe here.
    let out = CrCmd::new(&["dump", "-t", &w.pid.to_string(), "-D", &d.s("img"), "-R"])
        .env("CR_TEST_PROGRESS_AFTER_MS", "0")
        .ok();
    let err = stderr_of(&out);
    assert!(err.contains("dump of PID"), "the log is there: {err}");
    assert!(
        !err.contains("pages of PID") && !err.contains('\r') && !err.contains("\x1b["),
        "a progress line reached a pipe: {err:?}"
    );
    w.assert_pass();
}
