//! `cr periodic` (issue 12): a chain of incremental checkpoints at an interval, bounded by
//! folding, always with a restorable `latest`.
//!
//! - A chain workload dirtied continuously (wl_dirty_chain: generation-stamped pages) is
//!   checkpointed with `--keep`; the first kept (folded), a middle one and `latest` each restore
//!   and the workload verifies every page.
//! - SIGTERM at a moment of a checkpoint: exit 0, `latest` complete, nothing half-written, the
//!   tracker gone, the target untraced and intact.
//! - cr SIGKILLed at each step of a fold: every listed checkpoint and `latest` restore; the next
//!   `cr periodic` clears the leftovers.
//! - A full disk (a small tmpfs): failed checkpoints are discarded, the target is unharmed,
//!   `--max-failures` ends it with a non-zero status, `latest` restores.
//! - The target exiting: periodic says so and exits with its status (`-- CMD`).
//! - A log the tree only appends to grew since an older checkpoint: restore accepts it.
//!
//! Must run as root (eBPF, ptrace): `cargo xtask test` does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cr::image::fold::{seq_name, sequence};
use cr::image::ImageDir;
use cr_tests::cr_cmd::WatchedCr;
use cr_tests::procfs::tracer_of;
use cr_tests::{become_subreaper, require_root, CrCmd, TempDir, Workload};

/// `cr periodic -t PID -D DIR --interval INTERVAL EXTRA`, the tracker's log beside DIR.
fn periodic(d: &TempDir, pid: i32, dir: &Path, interval: &str, extra: &[&str]) -> CrCmd {
    CrCmd::new(&[
        "periodic",
        "-t",
        &pid.to_string(),
        "-D",
        &dir.to_string_lossy(),
        "--interval",
        interval,
    ])
    .args(extra)
    .env("CR_TRACKER_LOG", d.join("tracker.log"))
}

/// No tracker process for `pid` may be left (within a few seconds: it unloads its programs).
fn assert_no_tracker(pid: i32) {
    let needle = format!("__tracker\0--pid\0{pid}\0");
    let t0 = Instant::now();
    loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        });
        if !found {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a tracker of PID {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every entry of a periodic directory is a complete checkpoint, `latest` or a file: nothing
/// half-written, no fold leftovers.
fn assert_tidy(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if name == "latest" || !p.is_dir() {
            continue;
        }
        assert!(
            p.join("inventory.img").exists(),
            "{} is left incomplete",
            p.display()
        );
    }
}

/// `cr restore -d` of `img` (log and pidfile in `d`, not in the image: it may be on a full
/// disk); the restored workload then verifies itself.
fn restore_and_verify(d: &TempDir, w: &mut Workload, img: &Path, tag: &str) {
    CrCmd::new(&[
        "restore",
        "-D",
        &img.to_string_lossy(),
        "-d",
        "-o",
        &d.s(&format!("restore-{tag}.log")),
        "-v4",
    ])
    .pidfile(d.join(&format!("restore-{tag}.pid")))
    .ok();
    let _ = std::fs::remove_file(&w.result);
    w.assert_pass();
}

fn stats(img: &Path) -> cr::image::pb::DumpStats {
    ImageDir::open(img)
        .unwrap()
        .inventory()
        .stats
        .clone()
        .unwrap_or_default()
}

fn chainer(d: &TempDir, mib: u64) -> Workload {
    become_subreaper();
    Workload::start("wl_dirty_chain", &[&mib.to_string()], d)
}

/// Seven checkpoints with `--keep 3`: 5 (folded: holds every page), 6 and 7 remain; each
/// restores with every page of the generation table right.
#[test]
fn kept_checkpoints_restore_after_pruning() {
    require_root();
    let d = TempDir::new("periodic-keep");
    let mut w = chainer(&d, 32);
    let pid = w.pid;
    let ck = d.join("ck");
    periodic(&d, pid, &ck, "200ms", &["--keep", "3", "--count", "7"]).ok();
    assert_eq!(sequence(&ck).unwrap(), vec![5, 6, 7]);
    assert_tidy(&ck);
    assert_eq!(
        std::fs::read_link(ck.join("latest")).unwrap(),
        PathBuf::from(seq_name(7))
    );
    let first = ImageDir::open(&ck.join(seq_name(5))).unwrap();
    assert!(
        first.inventory().parent_path.is_empty(),
        "000005 still has a parent"
    );
    assert_ne!(first.inventory().flags & cr::image::dir::DUMP_F_FOLDED, 0);
    let mid = ImageDir::open(&ck.join(seq_name(6))).unwrap();
    assert_eq!(mid.inventory().parent_path, "../000005");
    assert_eq!(
        mid.inventory().parent_checkpoint_id,
        first.inventory().checkpoint_id
    );
    for n in [6, 7] {
        let s = stats(&ck.join(seq_name(n)));
        assert_ne!(s.harvest, "full", "checkpoint {n}: {}", s.harvest_reason);
        assert!(
            s.pages_in_parent > 0,
            "checkpoint {n} took nothing from its parent"
        );
    }
    // `cr show DIR` lists the chain, one line per checkpoint.
    let out = CrCmd::new(&["show", &ck.to_string_lossy()]).ok();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"checkpoint\""))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("\"folded\":true") && lines[2].contains("\"latest\":true"),
        "{text}"
    );
    // The service ran on; stop it, then bring back the first kept, the middle, the latest.
    w.kill_and_reap();
    assert_no_tracker(pid);
    restore_and_verify(&d, &mut w, &ck.join(seq_name(5)), "first");
    restore_and_verify(&d, &mut w, &ck.join(seq_name(6)), "middle");
    restore_and_verify(&d, &mut w, &ck.join("latest"), "latest");
}

/// SIGTERM while checkpoints are being taken back to back: exit 0, a complete `latest`, the
/// tracker gone, the target running untraced and intact.
#[test]
fn sigterm_leaves_a_restorable_latest() {
    require_root();
    let d = TempDir::new("periodic-sigterm");
    let mut w = chainer(&d, 64);
    let pid = w.pid;
    let ck = d.join("ck");
    let mut cr = WatchedCr::spawn_cmd(&periodic(&d, pid, &ck, "50ms", &[]));
    cr.wait_for_line("checkpoint 000002");
    // The third is under way now (50 ms after the second began; a 64 MiB tree takes longer).
    std::thread::sleep(Duration::from_millis(60));
    // SAFETY: plain kill(2) of our child.
    assert_eq!(unsafe { libc::kill(cr.pid(), libc::SIGTERM) }, 0);
    let st = cr.finish();
    assert!(st.success(), "cr periodic after SIGTERM: {st}");
    assert_tidy(&ck);
    let latest = ck.join("latest");
    ImageDir::open(&latest).expect("latest is a complete checkpoint");
    assert_no_tracker(pid);
    assert_eq!(tracer_of(pid), 0, "the target is still traced");
    // The target itself is intact…
    w.assert_pass();
    // …and so is its latest checkpoint.
    restore_and_verify(&d, &mut w, &latest, "latest");
}

/// cr SIGKILLed at each step of a fold (written, committed, exchanged, the oldest renamed
/// away): every checkpoint listed and `latest` restore; a new `cr periodic` on the directory
/// clears what the fold left.
#[test]
fn killed_during_a_fold_every_listed_checkpoint_restores() {
    require_root();
    for step in ["written", "committed", "exchanged", "renamed"] {
        let d = TempDir::new(&format!("periodic-fold-{step}"));
        let mut w = chainer(&d, 16);
        let pid = w.pid;
        let ck = d.join("ck");
        let mut cr = WatchedCr::spawn_cmd(
            &periodic(&d, pid, &ck, "100ms", &["--keep", "2"]).env("CR_TEST_FOLD_PAUSE", step),
        );
        cr.wait_for_line(&format!("FOLD {step}"));
        // SAFETY: plain kill(2) of our (stopped) child.
        assert_eq!(unsafe { libc::kill(cr.pid(), libc::SIGKILL) }, 0);
        cr.finish();
        w.kill_and_reap();
        assert_no_tracker(pid);
        let listed = sequence(&ck).unwrap();
        eprintln!("after a kill at {step}: {listed:?}");
        assert!(!listed.is_empty());
        for n in &listed {
            restore_and_verify(&d, &mut w, &ck.join(seq_name(*n)), &format!("{step}-{n}"));
        }
        restore_and_verify(&d, &mut w, &ck.join("latest"), &format!("{step}-latest"));
        // Restored once more, and checkpointed again in the same directory: the leftovers go.
        CrCmd::new(&["restore", "-D", &ck.join("latest").to_string_lossy(), "-d"])
            .arg("-o")
            .arg(d.join("restore-again.log"))
            .ok();
        periodic(&d, pid, &ck, "100ms", &["--keep", "2", "--count", "1"]).ok();
        for e in std::fs::read_dir(&ck).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "{name} left in {}", ck.display());
        }
        assert_tidy(&ck);
        w.assert_pass();
        assert_no_tracker(pid);
    }
}

/// Unmounts a mount point (lazily) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A tmpfs too small for more than a few checkpoints: failures are discarded, the target is
/// unharmed, `--max-failures 3` ends it with status 1, `latest` restores.
#[test]
fn a_full_disk_discards_checkpoints_and_gives_up_after_max_failures() {
    require_root();
    let d = TempDir::new("periodic-full");
    let mnt = d.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "mount a tmpfs on {}", mnt.display());
    let _unmount = Unmount(mnt.clone());
    let mut w = chainer(&d, 16);
    let pid = w.pid;
    let ck = mnt.join("ck");
    let out = periodic(
        &d,
        pid,
        &ck,
        "100ms",
        &["--max-failures", "3", "--count", "500"],
    )
    .run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("3 checkpoints in a row failed"), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_tidy(&ck);
    assert_no_tracker(pid);
    assert_eq!(tracer_of(pid), 0, "the target is still traced");
    w.assert_pass();
    let latest = ck.join("latest");
    if latest.exists() {
        restore_and_verify(&d, &mut w, &latest, "latest");
    }
}

/// `cr periodic -- CMD`: when the command exits, periodic says so and exits with its status.
#[test]
fn target_exit_ends_periodic_with_its_status() {
    require_root();
    let d = TempDir::new("periodic-exit");
    let ck = d.join("ck");
    let out = CrCmd::new(&[
        "periodic",
        "-D",
        &ck.to_string_lossy(),
        "--interval",
        "100ms",
        "--",
        "sh",
        "-c",
        "sleep 1; exit 7",
    ])
    .run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("exited with status 7"), "{err}");
    assert!(
        !sequence(&ck).unwrap().is_empty(),
        "no checkpoint was taken"
    );
    assert_tidy(&ck);
}

/// A log the tree only appends to grew after the first checkpoint: restoring that checkpoint
/// accepts it (and says so); the restored service's next line lands at the end.
#[test]
fn an_older_checkpoint_restores_with_a_grown_log() {
    require_root();
    become_subreaper();
    let d = TempDir::new("periodic-log");
    let log = d.join("service.log");
    let mut w = Workload::start("wl_log", &[&log.to_string_lossy()], &d);
    let pid = w.pid;
    let ck = d.join("ck");
    periodic(&d, pid, &ck, "100ms", &["--count", "3"]).ok();
    w.kill_and_reap();
    assert_no_tracker(pid);
    restore_and_verify(&d, &mut w, &ck.join(seq_name(1)), "first");
    let rlog = std::fs::read_to_string(d.join("restore-first.log")).unwrap();
    assert!(rlog.contains("grew since the checkpoint"), "{rlog}");
}
