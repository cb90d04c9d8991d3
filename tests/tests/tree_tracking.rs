//! Every process of a tree tracked incrementally (issue 12): each child's memory has its own
//! write-protection and dirty set, so a checkpoint after the first copies what each process
//! wrote, not every child whole; a process forked after tracking started is copied whole once,
//! then tracked; a process that exited is dropped.
//!
//! The workload (wl_tree_dirty) is a root and two children each dirtying generation-stamped
//! pages of its own region (a hot window, now and then any page) beside the root's region they
//! inherited; SIGUSR2 makes the root fork a late child. After every restore each process checks
//! every page it holds.
//!
//! - `pre-dump` → (late child forked) → `dump --track-mem -R` ×2 → final `dump --track-mem`:
//!   the children's pages are incremental (their page maps), the late child first whole then
//!   incremental; the final image and a middle checkpoint restore and verify.
//! - `cr periodic` (6 checkpoints, `--keep 4`, the late child forked after the first): the
//!   children are incremental in the kept checkpoints; a middle one and `latest` restore.
//!
//! Must run as root (eBPF, ptrace): `cargo xtask test` does.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cr::image::fold::{seq_name, sequence};
use cr::image::{pb, ImageDir};
use cr_tests::cr_cmd::WatchedCr;
use cr_tests::{become_subreaper, require_root, CrCmd, TempDir, Workload};

/// Pages of each process's region (wl_tree_dirty PAGES), and its hot window.
const REGION: u64 = 2048;
const HOT: u64 = 64;

fn start(d: &TempDir) -> Workload {
    become_subreaper();
    Workload::start("wl_tree_dirty", &[&REGION.to_string()], d)
}

/// SIGUSR2 to the root: it forks the late child; returns its PID (once written).
fn fork_late(w: &Workload) -> i32 {
    // SAFETY: plain kill(2) of our child.
    assert_eq!(unsafe { libc::kill(w.pid, libc::SIGUSR2) }, 0);
    let path = w.result.with_extension("result.late");
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(&path) {
            return s.trim().parse().expect("the late child's PID");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the late child was not forked: no {}",
            path.display()
        );
        // Polling a file the workload publishes by rename: nothing else can say "forked"
        // without an fd the dumped tree would hold.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pages of `pid` held in the image itself and those marked in_parent.
fn image_pages(img: &Path, pid: i32) -> (u64, u64) {
    let pm = ImageDir::open(img)
        .unwrap()
        .page_map(pid)
        .unwrap_or_else(|e| panic!("{}: no page map of PID {pid}: {e:#}", img.display()));
    let (mut data, mut parent) = (0, 0);
    for r in pm.runs {
        if r.in_parent {
            parent += u64::from(r.nr_pages);
        } else {
            data += u64::from(r.nr_pages);
        }
    }
    eprintln!(
        "{}: PID {pid}: {data} pages in the image, {parent} in the parent",
        img.display()
    );
    (data, parent)
}

/// `pid`'s pages in `img` are incremental: at most its hot window and a little more copied
/// (stack, heap, library data; each checkpoint also catches a few writes anywhere), and most
/// of what it holds — its own region beyond the hot window, the inherited region — taken
/// from the parent.
fn assert_incremental(img: &Path, pid: i32, inherited: bool) {
    let (data, parent) = image_pages(img, pid);
    let held = if inherited { 2 * REGION } else { REGION };
    assert!(
        parent >= held - HOT - REGION / 4,
        "{}: PID {pid} took only {parent} pages from its parent (holds {held})",
        img.display()
    );
    assert!(
        data < REGION / 2,
        "{}: PID {pid} copied {data} pages: not incremental",
        img.display()
    );
}

/// `pid`'s pages in `img` are all in the image (first seen).
fn assert_whole(img: &Path, pid: i32) {
    let (data, parent) = image_pages(img, pid);
    assert_eq!(parent, 0, "{}: PID {pid} first seen", img.display());
    assert!(data >= 2 * REGION, "{}: PID {pid}", img.display());
}

fn stats(img: &Path) -> pb::DumpStats {
    ImageDir::open(img)
        .unwrap()
        .inventory()
        .stats
        .clone()
        .unwrap_or_default()
}

fn checkpoint(d: &TempDir, pid: i32, name: &str, sub: &str, extra: &[&str]) -> PathBuf {
    CrCmd::checkpoint(sub, pid, d.join(name))
        .args(extra)
        .env("CR_TRACKER_LOG", d.join("tracker.log"))
        .ok();
    let s = stats(&d.join(name));
    eprintln!(
        "{name}: harvest {} ({}), {} written, {} in parent, frozen {} us",
        s.harvest, s.harvest_reason, s.pages_written, s.pages_in_parent, s.frozen_us
    );
    d.join(name)
}

/// `cr restore -d` of `img`; the restored tree verifies itself.
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

fn log_of(img: &Path) -> String {
    std::fs::read_to_string(img.join("dump.log")).unwrap_or_default()
}

#[test]
fn pre_dump_and_track_mem_dumps_track_every_process() {
    require_root();
    let d = TempDir::new("tree-tracking");
    let mut w = start(&d);
    let pids = w.tree_pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    let (a, b) = (pids[1], pids[2]);
    let pid = w.pid;

    let pre = checkpoint(&d, pid, "pre", "pre-dump", &[]);
    for &p in &pids {
        // The pre-dump holds every process's memory.
        let (data, _) = image_pages(&pre, p);
        assert!(data >= REGION, "pre-dump: PID {p}: {data} pages");
    }
    let late = fork_late(&w);

    let ck1 = checkpoint(
        &d,
        pid,
        "ck1",
        "dump",
        &["--track-mem", "-R", "--prev-images-dir", "../pre"],
    );
    assert_incremental(&ck1, a, true);
    assert_incremental(&ck1, b, true);
    assert_incremental(&ck1, pid, false);
    assert_whole(&ck1, late);
    assert!(
        log_of(&ck1).contains(&format!("PID {late} first seen")),
        "the log does not say the late child was first seen"
    );

    let ck2 = checkpoint(
        &d,
        pid,
        "ck2",
        "dump",
        &["--track-mem", "-R", "--prev-images-dir", "../ck1"],
    );
    for p in [a, b, late] {
        assert_incremental(&ck2, p, true);
    }
    let s = stats(&ck2);
    assert_ne!(s.harvest, "full", "{}", s.harvest_reason);

    let fin = checkpoint(
        &d,
        pid,
        "final",
        "dump",
        &["--track-mem", "--prev-images-dir", "../ck2"],
    );
    for p in [a, b, late] {
        assert_incremental(&fin, p, true);
    }
    let mut all = pids.clone();
    all.push(late);
    w.reap_killed_tree(&all);
    restore_and_verify(&d, &mut w, &fin, "final");
    restore_and_verify(&d, &mut w, &ck1, "middle");
}

#[test]
fn periodic_tracks_every_process() {
    require_root();
    let d = TempDir::new("tree-periodic");
    let mut w = start(&d);
    let pids = w.tree_pids();
    let (a, b) = (pids[1], pids[2]);
    let pid = w.pid;
    let ck = d.join("ck");
    let mut cr = WatchedCr::spawn_cmd(
        &CrCmd::new(&[
            "periodic",
            "-t",
            &pid.to_string(),
            "-D",
            &ck.to_string_lossy(),
            "--interval",
            "300ms",
            "--keep",
            "4",
            "--count",
            "6",
        ])
        .env("CR_TRACKER_LOG", d.join("tracker.log")),
    );
    cr.wait_for_line("checkpoint 000001");
    let late = fork_late(&w);
    let st = cr.finish();
    assert!(st.success(), "cr periodic: {st}");
    assert_eq!(sequence(&ck).unwrap(), vec![3, 4, 5, 6]);
    // 4 and 5 build on their predecessors (3 is folded: whole); the late child was forked
    // before checkpoint 2 began or at least before 5 (the fork is asked for right after 1).
    for n in [4, 5, 6] {
        let img = ck.join(seq_name(n));
        assert_incremental(&img, a, true);
        assert_incremental(&img, b, true);
        assert_incremental(&img, pid, false);
    }
    assert_incremental(&ck.join(seq_name(6)), late, true);
    let mut all = pids.clone();
    all.push(late);
    // The tree ran on: stop all of it (children first: they are not to outlive the root).
    for &p in all.iter().rev() {
        // SAFETY: plain kill(2) of a process of our workload's tree.
        assert_eq!(unsafe { libc::kill(p, libc::SIGKILL) }, 0, "kill {p}");
    }
    w.reap_killed_tree(&all);
    restore_and_verify(&d, &mut w, &ck.join(seq_name(4)), "middle");
    restore_and_verify(&d, &mut w, &ck.join("latest"), "latest");
}
