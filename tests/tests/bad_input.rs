//! Bad input named clearly (exit status 2), the target untouched: a thread's TID given to
//! `-t`, an ancestor of cr, an images directory whose parent does not exist; and a log that is a
//! symbolic link is not followed; a root restore refuses an image another user could write.

use cr_tests::{cr, procfs, stderr_of, TempDir, Workload};

fn threads_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

#[test]
fn a_thread_id_is_refused_naming_its_thread_group() {
    let d = TempDir::new("bad-tid");
    let mut w = Workload::start("wl_steady", &["2", "4"], &d);
    let tid = *threads_of(w.pid)
        .iter()
        .find(|&&t| t != w.pid)
        .expect("a second thread");
    let o = cr(&["dump", "-t", &tid.to_string(), "-D", &d.s("img"), "-j"]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("thread group {}", w.pid)),
        "the refusal does not name the thread group: {err}"
    );
    assert_eq!(procfs::tracer_of(w.pid), 0);
    w.assert_pass();
}

#[test]
fn an_ancestor_of_cr_is_refused_by_name() {
    let d = TempDir::new("bad-ancestor");
    // This test process is cr's parent.
    let me = std::process::id().to_string();
    let o = cr(&["dump", "-t", &me, "-D", &d.s("img"), "-R"]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("ancestor of cr"), "{err}");
}

#[test]
fn an_images_dir_without_its_parent_is_refused() {
    let d = TempDir::new("bad-dir");
    let mut w = Workload::start("wl_steady", &["1", "4"], &d);
    let deep = d.join("a/b/img");
    let o = cr(&[
        "dump",
        "-t",
        &w.pid.to_string(),
        "-D",
        &deep.to_string_lossy(),
        "-R",
    ]);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!d.join("a").exists(), "cr created the missing parents");
    w.assert_pass();
}

#[test]
fn a_symlinked_log_is_not_followed() {
    let d = TempDir::new("bad-log");
    let mut w = Workload::start("wl_steady", &["1", "4"], &d);
    let victim = d.join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    std::fs::create_dir(d.join("img")).unwrap();
    std::os::unix::fs::symlink(&victim, d.join("img/dump.log")).unwrap();
    let o = cr(&[
        "dump",
        "-t",
        &w.pid.to_string(),
        "-D",
        &d.s("img"),
        "-R",
        "-o",
        "dump.log",
    ]);
    let err = stderr_of(&o);
    assert!(!o.status.success(), "the dump followed the log symlink");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
    w.assert_pass();
}

/// As root, an image another user could have written (here: its directory handed to uid
/// 65534) is refused naming --trust-image-owner, and nothing is restored; with the flag it is.
#[test]
fn a_root_restore_refuses_an_image_not_roots_alone() {
    let d = TempDir::new("trust");
    let mut w = Workload::start("wl_steady", &["1", "4"], &d);
    cr_tests::dump_and_reap(&mut w, &d, &[]);
    let img = d.join("img");
    std::os::unix::fs::chown(&img, Some(65534), Some(65534)).unwrap();
    let err = cr_tests::restore_cmd(&d).fails("the image directory is not root's");
    assert!(err.contains("--trust-image-owner"), "{err}");
    assert!(err.contains("uid 65534"), "{err}");
    assert!(!procfs::running(w.pid), "a refused restore left a process");
    cr_tests::restore_cmd(&d).arg("--trust-image-owner").ok();
    w.assert_pass();
}
