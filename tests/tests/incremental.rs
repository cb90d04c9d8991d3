//! Incremental dumps end to end: `cr pre-dump`, `--track-mem`, `--prev-images-dir`, the tracker
//! process, and both harvests (DESIGN §5, issue 5).
//!
//! - Agreement: for each way a page can be written, the eBPF write-fault set and the exact
//!   PAGEMAP_SCAN set are read side by side (without consuming them), then a pre-dump harvests
//!   and its image must hold exactly the written pages, everything else as `in_parent`. Kinds
//!   the eBPF programs cannot see as faults (writes from other processes, /proc/PID/mem,
//!   process_vm_writev) must make the harvest fall back to the exact scan, and still be right.
//! - Fallback: a tracker whose dirty map is tiny loses events; the harvest notices and scans.
//! - Chains: a 256 MiB workload dirtied continuously through 3 pre-dumps and a final dump
//!   verifies every page after restore; `dump --track-mem -R` repeated gives checkpoints that
//!   each restore.
//! - Nothing is left behind: after a final dump the tracker process and its socket are gone.
//!
//! Must run as root (eBPF, ptrace): `cargo xtask test` does.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout};
use std::time::{Duration, Instant};

use cr::image::{pb, ImageDir};
use cr_tests::page_pattern::content;
use cr_tests::procfs::running;
use cr_tests::{become_subreaper, require_root, CrCmd, TempDir, Workload};

const PAGE: u64 = 4096;

/// How [`Dirty::write_from_outside`] writes into the target's memory.
enum Remote {
    /// process_vm_writev naming this task (the PID, or the TID of another thread).
    VmWritev(i32),
    /// A write into /proc/PID/mem.
    ProcMem,
}

/// A running wl_dirty, driven through its stdin.
struct Dirty {
    w: Workload,
    pid: i32,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Dirty {
    fn start(d: &TempDir) -> Dirty {
        become_subreaper();
        let (w, stdin, stdout) = Workload::start_piped("wl_dirty", &[], d);
        Dirty {
            pid: w.pid,
            w,
            stdin: Some(stdin),
            stdout: Some(BufReader::new(stdout)),
        }
    }

    /// Sends a command; returns what followed "ok".
    fn cmd(&mut self, c: &str) -> String {
        let stdin = self.stdin.as_mut().expect("wl_dirty's stdin");
        writeln!(stdin, "{c}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        let line = line.trim();
        assert!(
            line.starts_with("ok"),
            "wl_dirty answered {line:?} to {c:?}"
        );
        line.trim_start_matches("ok").trim().to_string()
    }

    fn region(&mut self, id: u64, pages: u64, thp: bool) -> u64 {
        let a = self.cmd(&format!(
            "region {id} {pages}{}",
            if thp { " thp" } else { "" }
        ));
        u64::from_str_radix(&a, 16).unwrap()
    }

    /// Writes page `p` of region `id` (mapped at `addr`) from this process, with the content
    /// of its next generation, and tells wl_dirty, whose own check then covers the page: a
    /// write the target takes no fault for.
    fn write_from_outside(&mut self, id: u64, addr: u64, p: u64, how: Remote) {
        let gen: u64 = self.cmd(&format!("gen {id} {p}")).parse().unwrap();
        let data = content(id, p, gen + 1);
        let at = addr + p * PAGE;
        match how {
            Remote::VmWritev(task) => {
                let n = cr::kernel::sys::process_vm_writev(task, &data, at).unwrap();
                assert_eq!(n, data.len(), "process_vm_writev to {task}: a short write");
            }
            Remote::ProcMem => cr::kernel::sys::write_mem_file(self.pid, at, &data).unwrap(),
        }
        self.cmd(&format!("note {id} {p} {}", gen + 1));
    }

    /// After a dump killed it: reap it so its PID is free.
    fn reap(&mut self) {
        self.stdin = None;
        self.stdout = None;
        self.w.reap_killed();
    }
}

/// The statistics in an image's inventory.
fn stats(img: &Path) -> pb::DumpStats {
    ImageDir::open(img)
        .unwrap()
        .inventory()
        .stats
        .clone()
        .unwrap_or_default()
}

/// Page numbers of `pid`'s pages held in the image itself, and those marked in_parent.
fn image_pages(img: &Path, pid: i32) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let pm = ImageDir::open(img).unwrap().page_map(pid).unwrap();
    let (mut data, mut parent) = (BTreeSet::new(), BTreeSet::new());
    for r in pm.runs {
        let first = r.vaddr / PAGE;
        let set = if r.in_parent { &mut parent } else { &mut data };
        set.extend(first..first + u64::from(r.nr_pages));
    }
    (data, parent)
}

/// Page numbers `addr + i*PAGE` for each i.
fn at(addr: u64, idx: &[u64]) -> BTreeSet<u64> {
    idx.iter().map(|i| addr / PAGE + i).collect()
}

fn within(set: &BTreeSet<u64>, addr: u64, n: u64) -> BTreeSet<u64> {
    set.range(addr / PAGE..addr / PAGE + n).copied().collect()
}

/// A chain of pre-dumps of one wl_dirty in one directory: p1, p2, … each the parent of the
/// next.
struct Chain<'a> {
    d: &'a TempDir,
    pid: i32,
    n: usize,
}

impl<'a> Chain<'a> {
    /// A chain of `pid` in `d`, no pre-dump taken yet.
    fn new(d: &'a TempDir, pid: i32) -> Chain<'a> {
        Chain { d, pid, n: 0 }
    }

    /// The last pre-dump's directory relative to a sibling, for --prev-images-dir.
    fn parent_arg(&self) -> String {
        format!("../p{}", self.n)
    }

    /// `cr pre-dump` (the first one arms tracking); returns the new image and its statistics.
    fn pre_dump(&mut self, env: &[(&str, &str)]) -> (PathBuf, pb::DumpStats) {
        let prev = self.parent_arg();
        let extra: &[&str] = if self.n > 0 {
            &["--prev-images-dir", &prev]
        } else {
            &[]
        };
        self.n += 1;
        let name = format!("p{}", self.n);
        let s = checkpoint(self.d, self.pid, &name, "pre-dump", extra, env);
        (self.d.join(&name), s)
    }
}

/// The tracker of `pid` (from the statistics) must be gone, and its socket with it.
fn assert_tracker_gone(pid: i32, tracker_pid: i32) {
    assert!(tracker_pid > 0, "no tracker PID recorded");
    let t0 = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: reaping the tracker if it became our child (we are a subreaper).
        let r = unsafe { libc::waitpid(tracker_pid, &mut st, libc::WNOHANG) };
        let alive = r == 0 || (r < 0 && running(tracker_pid));
        if !alive {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "tracker {tracker_pid} of PID {pid} still runs after the final dump"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    let name = format!("/run/cr/{pid}.sock");
    assert!(
        !unix.lines().any(|l| l.ends_with(&name)),
        "socket {name} is still bound"
    );
    assert!(
        !std::path::Path::new(&name).exists(),
        "the tracker left {name} behind"
    );
    // No pinned objects: the tracker pins nothing, so bpffs holds nothing of cr.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(
                !n.contains("cr_dirty") && !n.contains("CR_"),
                "pinned map left: {n}"
            );
        }
    }
}

/// `cr SUBCOMMAND -t PID -D DIR/NAME -o dump.log -v4 EXTRA` with `env` and the tracker's log
/// in DIR/tracker.log (the first tracking dump starts the tracker); must succeed. Returns the
/// image's statistics, printed for the record.
fn checkpoint(
    d: &TempDir,
    pid: i32,
    name: &str,
    subcommand: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> pb::DumpStats {
    let mut cmd = CrCmd::checkpoint(subcommand, pid, d.join(name))
        .args(extra)
        .env("CR_TRACKER_LOG", d.join("tracker.log"));
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    cmd.ok();
    let s = stats(&d.join(name));
    eprintln!(
        "{name}: harvest {} ({}), {} written, {} in parent, {} scanned, frozen {} us, harvest {} us",
        s.harvest, s.harvest_reason, s.pages_written, s.pages_in_parent, s.pages_scanned, s.frozen_us, s.harvest_us
    );
    s
}

/// `cr restore -d` of DIR/NAME (its PID written to DIR/NAME.pid); must succeed.
fn restore_checkpoint(d: &TempDir, name: &str) {
    CrCmd::restore(d.join(name))
        .pidfile(d.join(&format!("{name}.pid")))
        .ok();
}

/// Final dump (kills) on top of the chain's last pre-dump, restore, verify; the tracker must
/// be gone afterwards.
fn final_dump_and_restore(w: &mut Dirty, chain: &Chain<'_>) -> pb::DumpStats {
    let d = chain.d;
    let parent = chain.parent_arg();
    let s = checkpoint(
        d,
        w.pid,
        "final",
        "dump",
        &["--track-mem", "--prev-images-dir", &parent],
        &[],
    );
    w.reap();
    assert_tracker_gone(w.pid, s.tracker_pid);
    restore_checkpoint(d, "final");
    w.w.assert_pass();
    s
}

/// One epoch of the agreement test: the given commands; `expect` must be what both harvests
/// report for the `n` pages at `addr`, and exactly what the next pre-dump copies there.
fn epoch(
    w: &mut Dirty,
    chain: &mut Chain<'_>,
    cmds: &[&str],
    addr: u64,
    n: u64,
    expect: BTreeSet<u64>,
    what: &str,
) {
    for c in cmds {
        w.cmd(c);
    }
    let p = cr::mem::harvest::peek(w.pid, &[(addr, addr + n * PAGE)]).unwrap();
    let ebpf: BTreeSet<u64> = within(&p.ebpf.iter().copied().collect(), addr, n);
    let scan: BTreeSet<u64> = p.written.iter().copied().collect();
    assert!(
        p.unsafe_why.is_empty(),
        "{what}: the epoch looks unsafe: {:?}",
        p.unsafe_why
    );
    assert_eq!(ebpf, expect, "{what}: eBPF set");
    assert_eq!(scan, expect, "{what}: PAGEMAP_SCAN set");
    pre_dump_copies(w, chain, addr, n, &expect, "ebpf", what);
}

/// Takes the chain's next pre-dump and checks, for the `n` pages at `addr`, that the harvest
/// `harvest` made it copy exactly `expect` and take every other page from the parent.
fn pre_dump_copies(
    w: &Dirty,
    chain: &mut Chain<'_>,
    addr: u64,
    n: u64,
    expect: &BTreeSet<u64>,
    harvest: &str,
    what: &str,
) -> pb::DumpStats {
    let (img, s) = chain.pre_dump(&[]);
    assert_eq!(s.harvest, harvest, "{what}: harvest ({})", s.harvest_reason);
    let (data, parent) = image_pages(&img, w.pid);
    assert_eq!(within(&data, addr, n), *expect, "{what}: pages copied");
    let all: BTreeSet<u64> = (addr / PAGE..addr / PAGE + n).collect();
    let rest: BTreeSet<u64> = all.difference(expect).copied().collect();
    assert_eq!(
        within(&parent, addr, n),
        rest,
        "{what}: pages in the parent"
    );
    s
}

/// Both harvests agree on writes the fault programs see: user and kernel writes, THP,
/// fork/COW, new, unmapped and moved VMAs, dropped and populated pages. Each epoch is checked
/// side by side (eBPF set vs PAGEMAP_SCAN), then harvested by a pre-dump whose image must hold
/// exactly the written pages; the chain finally restores and the workload verifies every page.
#[test]
fn harvests_agree_on_writes_the_programs_see() {
    require_root();
    let d = TempDir::new("inc-agree");
    let mut w = Dirty::start(&d);
    let a = w.region(1, 64, false);
    let t = w.region(2, 1024, true); // 4 MiB of THP
    let mut chain = Chain::new(&d, w.pid);
    let (p1, s1) = chain.pre_dump(&[]);
    assert_eq!(s1.harvest, "full");
    let (data, _) = image_pages(&p1, w.pid);
    assert!(
        at(a, &(0..64).collect::<Vec<_>>()).is_subset(&data),
        "the first pre-dump copies everything"
    );

    epoch(
        &mut w,
        &mut chain,
        &["write 1 3,4,10,63"],
        a,
        64,
        at(a, &[3, 4, 10, 63]),
        "user writes",
    );
    epoch(
        &mut w,
        &mut chain,
        &["read 1 0,1,2,3"],
        a,
        64,
        BTreeSet::new(),
        "reads only",
    );
    epoch(
        &mut w,
        &mut chain,
        &["pipe 1 5,6", "file 1 20"],
        a,
        64,
        at(a, &[5, 6, 20]),
        "kernel writes (read, pread)",
    );
    epoch(
        &mut w,
        &mut chain,
        &["write 2 7,600"],
        t,
        1024,
        at(t, &[7, 600]),
        "THP region",
    );
    epoch(
        &mut w,
        &mut chain,
        &["fork 1 1,2,3"],
        a,
        64,
        BTreeSet::new(),
        "a forked child's writes",
    );
    epoch(
        &mut w,
        &mut chain,
        &["cow 1 8,9"],
        a,
        64,
        at(a, &[8, 9]),
        "COW writes while a child shares the pages",
    );

    // New VMA: copied whole, then tracked like the others.
    let b = w.region(3, 32, false);
    let (img, s) = chain.pre_dump(&[]);
    assert!(s.new_vmas >= 1, "the new region was not seen as new: {s:?}");
    let (data, _) = image_pages(&img, w.pid);
    assert!(
        at(b, &(0..32).collect::<Vec<_>>()).is_subset(&data),
        "new region not copied whole"
    );
    epoch(
        &mut w,
        &mut chain,
        &["write 3 0,31"],
        b,
        32,
        at(b, &[0, 31]),
        "writes to a VMA mapped since",
    );

    // munmap and mremap: unmapped pages are gone from the image (not in_parent); moved pages
    // are copied at their new address.
    w.cmd("munmap 1 40 8");
    let c_old = w.region(4, 16, false);
    let (_, _) = chain.pre_dump(&[]);
    let c_new = u64::from_str_radix(&w.cmd("mremap 4"), 16).unwrap();
    let (img, s) = chain.pre_dump(&[]);
    assert!(
        s.vma_events >= 1,
        "the VMA changes were not recorded: {s:?}"
    );
    let (data, parent) = image_pages(&img, w.pid);
    let gone = at(a, &(40..48).collect::<Vec<_>>());
    assert!(
        data.is_disjoint(&gone) && parent.is_disjoint(&gone),
        "unmapped pages still in the image"
    );
    let old: BTreeSet<u64> = at(c_old, &(0..16).collect::<Vec<_>>());
    assert!(
        data.is_disjoint(&old) && parent.is_disjoint(&old),
        "pages at the old place of a moved VMA are still in the image"
    );
    assert!(
        at(c_new, &(0..16).collect::<Vec<_>>()).is_subset(&data),
        "a moved VMA must be copied at its new address"
    );

    // Dropped pages must not be taken from the parent; populated ones are zeros, written.
    w.cmd("dontneed 1 11,12");
    w.cmd("populate 1 12");
    let (img, s) = chain.pre_dump(&[]);
    assert_eq!(s.harvest, "ebpf", "{}", s.harvest_reason);
    let (data, parent) = image_pages(&img, w.pid);
    let dropped = at(a, &[11, 12]);
    assert!(
        parent.is_disjoint(&dropped),
        "dropped pages claimed unchanged: {:?}",
        parent.intersection(&dropped).collect::<Vec<_>>()
    );
    assert!(
        !data.contains(&(a / PAGE + 11)),
        "a dropped, untouched page was copied"
    );
    w.cmd("check");

    let s = final_dump_and_restore(&mut w, &chain);
    assert_eq!(s.harvest, "ebpf", "{}", s.harvest_reason);
}

/// Writes that take no fault in the target (another process's process_vm_writev or
/// /proc/PID/mem, the target's own process_vm_writev or /proc/self/mem) are invisible to the
/// fault programs: the syscall programs must flag the epoch, the harvest must be the exact
/// scan, and the image must still hold exactly the written pages.
#[test]
fn remote_writes_make_the_harvest_exact() {
    require_root();
    let d = TempDir::new("inc-remote");
    let mut w = Dirty::start(&d);
    let a = w.region(1, 64, false);
    let mut chain = Chain::new(&d, w.pid);
    chain.pre_dump(&[]);

    // (what, the pages it writes, how)
    type Case<'a> = (&'a str, &'a [u64], &'a dyn Fn(&mut Dirty));
    let cases: [Case; 4] = [
        ("process_vm_writev from another process", &[2, 30], &|w| {
            let pid = w.pid;
            w.write_from_outside(1, a, 2, Remote::VmWritev(pid));
            w.write_from_outside(1, a, 30, Remote::VmWritev(pid));
        }),
        ("/proc/PID/mem from another process", &[7], &|w| {
            w.write_from_outside(1, a, 7, Remote::ProcMem)
        }),
        ("the target's own process_vm_writev", &[9, 10], &|w| {
            w.cmd("selfvm 1 9,10");
        }),
        ("the target's own /proc/self/mem", &[50], &|w| {
            w.cmd("selfmem 1 50");
        }),
    ];
    for (what, pages, act) in cases {
        act(&mut w);
        let expect = at(a, pages);
        let p = cr::mem::harvest::peek(w.pid, &[(a, a + 64 * PAGE)]).unwrap();
        assert_eq!(
            p.written.iter().copied().collect::<BTreeSet<_>>(),
            expect,
            "{what}: PAGEMAP_SCAN set"
        );
        assert!(
            !p.unsafe_why.is_empty(),
            "{what}: the epoch was not flagged: eBPF saw {:?}",
            within(&p.ebpf.iter().copied().collect(), a, 64)
        );
        pre_dump_copies(&w, &mut chain, a, 64, &expect, "pagemap-scan", what);
    }
    // The epoch after a stranger's write is clean again (the writer has closed its file).
    w.cmd("write 1 1");
    let (_, s) = chain.pre_dump(&[]);
    assert_eq!(s.harvest, "ebpf", "{}", s.harvest_reason);
    w.cmd("check");
    final_dump_and_restore(&mut w, &chain);
}

/// A process with two threads: the other thread's writes are the process's (the eBPF set
/// agrees with the scan), and a process_vm_writev naming the other thread's TID is a remote
/// write like one naming the PID (the harvest is exact). Pre-dumps freeze both threads.
#[test]
fn threads_writes_and_task_ids() {
    require_root();
    let d = TempDir::new("inc-threads");
    let mut w = Dirty::start(&d);
    let a = w.region(1, 64, false);
    let tid: i32 = w.cmd("thread").parse().unwrap();
    assert_ne!(tid, w.pid);
    let mut chain = Chain::new(&d, w.pid);
    chain.pre_dump(&[]);
    epoch(
        &mut w,
        &mut chain,
        &["twrite 1 4,5,40"],
        a,
        64,
        at(a, &[4, 5, 40]),
        "writes by the second thread",
    );

    w.write_from_outside(1, a, 9, Remote::VmWritev(tid));
    let p = cr::mem::harvest::peek(w.pid, &[(a, a + 64 * PAGE)]).unwrap();
    assert!(
        !p.unsafe_why.is_empty(),
        "process_vm_writev to TID {tid} was not flagged"
    );
    pre_dump_copies(
        &w,
        &mut chain,
        a,
        64,
        &at(a, &[9]),
        "pagemap-scan",
        "process_vm_writev to the second thread",
    );
    w.cmd("check");
    final_dump_and_restore(&mut w, &chain);
}

/// A dirty map too small for the epoch loses write faults: the harvest must see the loss,
/// scan exactly, and the image must be complete.
#[test]
fn a_full_dirty_map_makes_the_harvest_exact() {
    require_root();
    let d = TempDir::new("inc-full-map");
    let mut w = Dirty::start(&d);
    let a = w.region(1, 256, false);
    let mut chain = Chain::new(&d, w.pid);
    chain.pre_dump(&[("CR_TEST_DIRTY_MAX_ENTRIES", "16")]);
    let written: Vec<u64> = (0..256).collect();
    let list: Vec<String> = written.iter().map(|p| p.to_string()).collect();
    w.cmd(&format!("write 1 {}", list.join(",")));
    let p = cr::mem::harvest::peek(w.pid, &[(a, a + 256 * PAGE)]).unwrap();
    assert!(p.ebpf.len() <= 16, "the map holds {} entries", p.ebpf.len());
    // (The ring, sized to match, holds about 170 faults: the 256 do not fit.)
    assert!(
        p.unsafe_why.iter().any(|r| r.contains("lost")),
        "no loss seen: {:?}",
        p.unsafe_why
    );
    let s = pre_dump_copies(
        &w,
        &mut chain,
        a,
        256,
        &at(a, &written),
        "pagemap-scan",
        "more writes than the dirty map holds",
    );
    assert!(s.harvest_reason.contains("lost"), "{}", s.harvest_reason);
    // Losses are counted since the last checkpoint: the next epoch, small enough, is eBPF again.
    w.cmd("write 1 1,3");
    let (_, s) = chain.pre_dump(&[]);
    assert_eq!(s.harvest, "ebpf", "{}", s.harvest_reason);
    final_dump_and_restore(&mut w, &chain);
}

/// A dump without tracking options leaves a running tracker's state alone (nothing harvested),
/// and a later incremental dump still builds on the tracker's last checkpoint.
#[test]
fn a_plain_dump_does_not_consume_the_tracking_state() {
    require_root();
    let d = TempDir::new("inc-plain");
    let mut w = Dirty::start(&d);
    let a = w.region(1, 64, false);
    let mut chain = Chain::new(&d, w.pid);
    chain.pre_dump(&[]);
    w.cmd("write 1 5");
    CrCmd::dump(w.pid, d.join("plain")).arg("-R").ok();
    let s = stats(&d.join("plain"));
    assert_eq!(s.harvest, "full");
    let (data, parent) = image_pages(&d.join("plain"), w.pid);
    assert!(parent.is_empty());
    assert!(at(a, &(0..64).collect::<Vec<_>>()).is_subset(&data));
    w.cmd("write 1 6");
    let (img, s) = chain.pre_dump(&[]);
    assert_eq!(s.harvest, "ebpf", "{}", s.harvest_reason);
    let (data, _) = image_pages(&img, w.pid);
    assert_eq!(within(&data, a, 64), at(a, &[5, 6]), "both epochs' writes");
    // A parent that is not the tracker's last checkpoint gives a full dump, not a wrong one.
    CrCmd::pre_dump(w.pid, d.join("stale"))
        .args(&["--prev-images-dir", "../p1"])
        .ok();
    let s = stats(&d.join("stale"));
    assert_eq!(s.harvest, "full", "{}", s.harvest_reason);
    assert!(ImageDir::open(&d.join("stale"))
        .unwrap()
        .inventory()
        .parent_path
        .is_empty());
}

// ---------------------------------------------------------------------------------------
// The chain workload (wl_dirty_chain): 256 MiB of self-describing pages, dirtied all along.

fn start_chainer(d: &TempDir, mib: u64) -> Workload {
    become_subreaper();
    Workload::start("wl_dirty_chain", &[&mib.to_string()], d)
}

/// Restores checkpoint `name` and has the chain workload verify every page.
fn restore_and_verify(d: &TempDir, c: &mut Workload, name: &str) {
    restore_checkpoint(d, name);
    let _ = std::fs::remove_file(&c.result);
    c.assert_pass();
}

/// Control: the chain workload passes its own check undisturbed.
#[test]
fn chain_workload_control() {
    let d = TempDir::new("inc-chain-control");
    let mut c = start_chainer(&d, 64);
    std::thread::sleep(Duration::from_millis(300));
    c.assert_pass();
}

/// 256 MiB dirtied continuously (user writes, read() into pages, process_vm_writev to itself,
/// THP, mmap/munmap/mremap churn, MADV_DONTNEED) through 3 pre-dumps and a final dump; after
/// restore every page matches the workload's generation table.
#[test]
fn chain_of_pre_dumps_and_final_dump_restores_every_page() {
    require_root();
    let d = TempDir::new("inc-chain");
    let mut c = start_chainer(&d, 256);
    let pid = c.pid;
    // The workload's process_vm_writev writes are on at first: that epoch needs the exact
    // scan. Turned off (SIGUSR2, long before the next checkpoint: a burst takes milliseconds),
    // the following epochs are the eBPF harvest's; on again for the last.
    let toggle_gup = || {
        // SAFETY: plain kill(2) of our workload.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    };
    let s1 = checkpoint(&d, pid, "p1", "pre-dump", &[], &[]);
    assert_eq!(s1.harvest, "full");
    std::thread::sleep(Duration::from_millis(300));
    toggle_gup();
    std::thread::sleep(Duration::from_millis(100));
    let s2 = checkpoint(
        &d,
        pid,
        "p2",
        "pre-dump",
        &["--prev-images-dir", "../p1"],
        &[],
    );
    assert!(s2.pages_in_parent > 0, "nothing taken from the parent");
    assert_eq!(s2.harvest, "pagemap-scan", "{}", s2.harvest_reason);
    std::thread::sleep(Duration::from_millis(300));
    let s3 = checkpoint(
        &d,
        pid,
        "p3",
        "pre-dump",
        &["--prev-images-dir", "../p2"],
        &[("CR_HARVEST", "ebpf")],
    );
    assert_eq!(s3.harvest, "ebpf", "{}", s3.harvest_reason);
    std::thread::sleep(Duration::from_millis(300));
    let s4 = checkpoint(
        &d,
        pid,
        "p4",
        "pre-dump",
        &["--prev-images-dir", "../p3"],
        &[],
    );
    assert_ne!(s4.harvest, "full", "{}", s4.harvest_reason);
    toggle_gup();
    std::thread::sleep(Duration::from_millis(300));
    let sf = checkpoint(
        &d,
        pid,
        "final",
        "dump",
        &["--prev-images-dir", "../p4", "--track-mem"],
        &[],
    );
    assert_eq!(sf.harvest, "pagemap-scan", "{}", sf.harvest_reason);
    assert!(sf.pages_in_parent > 0);
    c.reap_killed();
    assert_tracker_gone(pid, sf.tracker_pid);
    assert_eq!(
        s4.tracker_pid, sf.tracker_pid,
        "one tracker for the whole chain"
    );
    restore_and_verify(&d, &mut c, "final");
}

/// `dump --track-mem -R` repeated with --prev-images-dir: every checkpoint of the chain is
/// complete and restores (an intermediate one too), while the service ran on in between.
#[test]
fn leave_running_dumps_form_a_chain_of_restorable_checkpoints() {
    require_root();
    let d = TempDir::new("inc-leave-running");
    let mut c = start_chainer(&d, 64);
    let pid = c.pid;
    let s1 = checkpoint(&d, pid, "c1", "dump", &["--track-mem", "-R"], &[]);
    assert_eq!(s1.harvest, "full");
    std::thread::sleep(Duration::from_millis(200));
    let s2 = checkpoint(
        &d,
        pid,
        "c2",
        "dump",
        &["--track-mem", "-R", "--prev-images-dir", "../c1"],
        &[],
    );
    assert_ne!(s2.harvest, "full", "{}", s2.harvest_reason);
    std::thread::sleep(Duration::from_millis(200));
    let s3 = checkpoint(
        &d,
        pid,
        "c3",
        "dump",
        &["--track-mem", "-R", "--prev-images-dir", "../c2"],
        &[],
    );
    assert_ne!(s3.harvest, "full", "{}", s3.harvest_reason);
    // The service ran on; stop it, then bring back the middle checkpoint, then the last.
    c.kill_and_reap();
    assert_tracker_gone(pid, s3.tracker_pid);
    restore_and_verify(&d, &mut c, "c2");
    restore_and_verify(&d, &mut c, "c3");
}
