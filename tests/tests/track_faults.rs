//! The eBPF write-fault tracker against real processes, and `cr check` end to end.
//!
//! Each test loads its own tracker (its own maps), starts `wl_write_pages`, makes it the
//! target *before* telling it to touch anything, then has it write, read and read() into known
//! pages of a fresh region and compares the tracker's dirty set with exactly the pages written.
//! Must run as root (loading eBPF); `cargo xtask test` does.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use cr::bpf::Tracker;
use cr_common::{PAGE_SHIFT, TARGET_F_TRACK_WRITES};
use cr_tests::{cr_ok, require_root};

/// A running wl_write_pages.
struct Workload {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Page number of the region's first page.
    first_page: u64,
    npages: u64,
}

impl Workload {
    fn start(npages: u64) -> Workload {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wl_write_pages"))
            .arg(npages.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start wl_write_pages");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the workload's ready line");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(
            f.len() == 3 && f[0] == "ready",
            "unexpected first line from the workload: {line:?}"
        );
        let addr = u64::from_str_radix(f[1].trim_start_matches("0x"), 16).expect("region address");
        assert_eq!(addr % 4096, 0, "region not page aligned");
        Workload {
            child,
            stdin,
            stdout,
            first_page: addr >> PAGE_SHIFT,
            npages,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command and waits for its `ok`.
    fn run(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("send a command to the workload");
        self.stdin.flush().expect("flush the command");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the workload's answer");
        assert_eq!(line.trim(), "ok", "workload answered {line:?} to {cmd:?}");
    }

    /// Region-relative indices of the given page numbers that fall inside the region.
    fn in_region(&self, pages: &[u64]) -> Vec<u64> {
        pages
            .iter()
            .filter(|p| **p >= self.first_page && **p < self.first_page + self.npages)
            .map(|p| p - self.first_page)
            .collect()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pages first, first+step, … (count of them).
fn every(first: u64, count: u64, step: u64) -> Vec<u64> {
    (0..count).map(|k| first + k * step).collect()
}

/// A tracker of its own with a fresh wl_write_pages of `npages` as its target (added before the
/// workload touches anything).
fn tracked_workload(npages: u64) -> (Tracker, Workload) {
    require_root();
    let mut t = Tracker::start().expect("load and attach the tracker");
    let w = Workload::start(npages);
    t.add_target(w.pid(), TARGET_F_TRACK_WRITES).unwrap();
    (t, w)
}

#[test]
fn records_exactly_the_pages_the_target_writes_not_those_it_reads() {
    let (t, mut w) = tracked_workload(64);

    w.run("w 0 16 3"); // writes: 0, 3, …, 45
    w.run("r 1 16 3"); // reads:  1, 4, …, 46 (never written)

    let dirty = t.dirty(w.pid()).unwrap();
    let pages: Vec<u64> = dirty.iter().map(|d| d.page).collect();
    assert_eq!(
        w.in_region(&pages),
        every(0, 16, 3),
        "dirty set within the region"
    );
    for d in dirty.iter().filter(|d| w.in_region(&[d.page]).len() == 1) {
        assert!(d.writes >= 1, "page {:#x} recorded with no write", d.page);
        assert_eq!(d.epoch, 0);
    }
    let s = t.stats().unwrap();
    assert!(s.write_faults >= 16, "user write faults counted: {s:?}");
    assert!(
        s.read_faults >= 16,
        "the 16 read faults were seen (and not recorded): {s:?}"
    );
    assert_eq!(s.dirty_lost, 0);
    assert!(!t.lost().unwrap());
}

#[test]
fn records_pages_the_kernel_writes_for_the_target() {
    let (t, mut w) = tracked_workload(64);
    let before = t.stats().unwrap().kernel_write_faults;

    w.run("k 40 6 4"); // read() into 40, 44, …, 60: written by copy_to_user
    w.run("w 2 2 1"); // and two user writes: 2, 3

    let pages = t.dirty_pages(w.pid()).unwrap();
    let mut want = every(2, 2, 1);
    want.extend(every(40, 6, 4));
    assert_eq!(w.in_region(&pages), want, "dirty set within the region");
    let s = t.stats().unwrap();
    assert!(
        s.kernel_write_faults - before >= 6,
        "kernel-mode write faults counted: {s:?}"
    );
}

#[test]
fn ignores_processes_that_are_not_targets() {
    require_root();
    let mut t = Tracker::start().expect("load and attach the tracker");
    let mut target = Workload::start(32);
    let mut other = Workload::start(32);
    t.add_target(target.pid(), TARGET_F_TRACK_WRITES).unwrap();

    other.run("w 0 32 1");
    other.run("k 0 8 1");
    target.run("w 5 3 2");

    assert_eq!(
        t.dirty_pages(other.pid()).unwrap(),
        Vec::<u64>::new(),
        "pages of a process that is not a target"
    );
    assert_eq!(
        target.in_region(&t.dirty_pages(target.pid()).unwrap()),
        vec![5, 7, 9]
    );
    // Nothing of the other process's region under any tgid.
    let all_other: Vec<u64> = every(other.first_page, 32, 1);
    let target_pages = t.dirty_pages(target.pid()).unwrap();
    assert!(all_other.iter().all(|p| !target_pages.contains(p)));
}

#[test]
fn epochs_take_remove_and_clear() {
    let (mut t, mut w) = tracked_workload(64);
    let pid = w.pid();

    w.run("w 0 4 1");
    assert_eq!(t.bump_epoch(pid).unwrap(), 1);
    w.run("w 10 2 1");
    let taken = t.take_dirty(pid).unwrap();
    let taken: Vec<(u64, u64)> = taken
        .iter()
        .filter(|d| w.in_region(&[d.page]).len() == 1)
        .map(|d| (d.page - w.first_page, d.epoch))
        .collect();
    assert_eq!(
        taken,
        vec![(0, 0), (1, 0), (2, 0), (3, 0), (10, 1), (11, 1)]
    );
    assert!(
        w.in_region(&t.dirty_pages(pid).unwrap()).is_empty(),
        "take_dirty removed what it returned"
    );

    t.remove_target(pid).unwrap();
    w.run("w 20 2 1");
    assert!(
        w.in_region(&t.dirty_pages(pid).unwrap()).is_empty(),
        "writes after remove_target are not recorded"
    );
    t.remove_target(pid).unwrap(); // removing twice is fine

    t.add_target(pid, TARGET_F_TRACK_WRITES).unwrap();
    w.run("w 30 1 1");
    assert_eq!(w.in_region(&t.dirty_pages(pid).unwrap()), vec![30]);
    assert!(t.clear(pid).unwrap() >= 1);
    assert!(t.dirty_pages(pid).unwrap().is_empty());
}

#[test]
fn cr_check_reports_every_feature_ok() {
    require_root();
    let out = cr_ok(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("FEATURE") && header.contains("STATUS") && header.contains("NEEDED BY"),
        "header: {header:?}"
    );
    let rows: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
    let status_col = header.find("STATUS").unwrap();
    for name in [
        "ptrace",
        "process_vm_readv",
        "pidfd_getfd",
        "clone3 set_tid",
        "PR_SET_MM_MAP",
        "userfaultfd",
        "PAGEMAP_SCAN",
        "tracepoints",
        "TCP_REPAIR",
        "tc BPF",
        "bpffs",
    ] {
        assert!(
            rows.iter().any(|r| r.contains(name)),
            "no line for {name} in:\n{stdout}"
        );
    }
    for r in &rows {
        let status = r
            .get(status_col..)
            .and_then(|s| s.split_whitespace().next());
        assert_eq!(status, Some("ok"), "feature line not ok: {r:?}");
    }
    assert_eq!(lines.next(), Some("Looks good."), "verdict line");
}
