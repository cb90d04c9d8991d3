//! cr's exit statuses (README): 0 success, 1 failure, 2 bad input or usage, 3 refusal, so that
//! scripts can tell "cr refuses this target" from "cr failed". A refused dump leaves the
//! target running as before.

use cr_tests::cr_cmd::CrCmd;
use cr_tests::{assert_dump_refused_cleanly, dump_cmd, stderr_of, TempDir, Workload};

/// wl_files holding a terminal: refused without --shell-job.
fn terminal_workload(d: &TempDir) -> Workload {
    std::fs::create_dir(d.join("files")).unwrap();
    Workload::start("wl_files", &[&d.s("files"), "tty"], d)
}

#[test]
fn a_refused_dump_exits_3_and_the_target_runs_on() {
    let d = TempDir::new("exit-refused");
    let mut w = terminal_workload(&d);
    let out = dump_cmd(&w, &d).run();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a refusal exits 3: {}",
        stderr_of(&out)
    );
    assert!(
        stderr_of(&out).contains("--shell-job"),
        "the refusal names the flag that would allow it: {}",
        stderr_of(&out)
    );
    assert_dump_refused_cleanly(&w, &d);
    w.assert_pass();
}

#[test]
fn a_dump_exits_0_and_the_target_runs_on() {
    let d = TempDir::new("exit-ok");
    let mut w = Workload::start("wl_memory", &[&d.s("")], &d);
    // -R: the workload runs on and checks that nothing was disturbed.
    let out = dump_cmd(&w, &d).arg("-R").run();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    w.assert_pass();
}

#[test]
fn bad_input_and_usage_exit_2() {
    let d = TempDir::new("exit-bad-input");
    let cases: Vec<(&str, CrCmd)> = vec![
        ("no such process", CrCmd::dump(i32::MAX, d.join("img"))),
        ("not an image", {
            std::fs::create_dir(d.join("empty")).unwrap();
            CrCmd::restore(d.join("empty"))
        }),
        ("an unknown flag", CrCmd::new(&["dump", "--no-such-flag"])),
    ];
    for (what, cmd) in cases {
        let out = cmd.run();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: exit 2 expected: {}",
            stderr_of(&out)
        );
        assert!(!stderr_of(&out).contains("panicked"), "{what}: cr panicked");
    }
}
