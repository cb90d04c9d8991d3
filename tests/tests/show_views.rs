//! `cr show DIR ps|fds|mems|stats` and `--display-stats` on real images: a dump of a process
//! tree (wl_tree) for ps and fds, compared with what /proc said of each process before the
//! dump; a pre-dump + dump chain of wl_memory for mems and stats, compared with the images'
//! own page maps and inventories, and the restored workload checking itself.

use std::path::Path;

use cr::image::dir::ImageDir;
use cr_tests::{
    become_subreaper, cr, cr_ok, dump_leave_running, restore_cmd, stderr_of, CrCmd, TempDir,
    Workload,
};

fn stdout(args: &[&str]) -> String {
    String::from_utf8(cr_ok(args).stdout).expect("cr show prints UTF-8")
}

/// The value after `label` on the line that starts with it (after the indent).
fn value_of<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(label).filter(|r| r.starts_with("  ")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no line {label:?} in:\n{text}"))
}

/// The leading number of a value such as `123 (492.0 KiB)`.
fn number(v: &str) -> u64 {
    v.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{v:?} does not start with a number"))
}

fn proc_comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim_end()
        .to_string()
}

fn stat_fields(pid: i32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After "(comm)": state ppid pgrp session ...
    s[s.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn ps_and_fds_of_a_tree_match_what_proc_said() {
    let d = TempDir::new("show-ps-fds");
    let mut w = Workload::start("wl_tree", &[&d.s("")], &d);
    let pids = w.tree_pids();
    assert_eq!(pids.len(), 6, "pids: {}", w.info);
    // What /proc says before the dump (the tree is at rest, waiting for its check signal).
    struct Seen {
        pid: i32,
        ppid: String,
        pgid: String,
        sid: String,
        zombie: bool,
        threads: usize,
        comm: String,
    }
    let seen: Vec<Seen> = pids
        .iter()
        .map(|&pid| {
            let f = stat_fields(pid);
            Seen {
                pid,
                ppid: f[1].clone(),
                pgid: f[2].clone(),
                sid: f[3].clone(),
                zombie: f[0] == "Z",
                threads: std::fs::read_dir(format!("/proc/{pid}/task"))
                    .unwrap()
                    .count(),
                comm: proc_comm(pid),
            }
        })
        .collect();
    assert_eq!(
        seen.iter().filter(|s| s.zombie).count(),
        2,
        "wl_tree has two zombies"
    );
    assert_eq!(seen[0].pid, w.pid, "the root is listed first");
    let root_fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{}/fd", w.pid))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let fd = e.file_name().to_str().unwrap().parse().unwrap();
            (
                fd,
                std::fs::read_link(e.path()).unwrap().display().to_string(),
            )
        })
        .collect();
    let root_cwd = std::fs::read_link(format!("/proc/{}/cwd", w.pid)).unwrap();
    dump_leave_running(&w, &d, &[]);
    w.assert_pass();
    let img = d.s("img");

    let ps = stdout(&["show", &img, "ps"]);
    let mut lines = ps.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        ["PID", "PPID", "PGID", "SID", "THREADS", "COMM"],
        "{ps}"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), pids.len(), "one row per process:\n{ps}");
    assert!(
        rows[0].trim_start().starts_with(&format!("{} ", w.pid)),
        "the root comes first:\n{ps}"
    );
    let depth = |pid: i32| {
        let mut n = 0;
        let mut p = pid;
        while p != w.pid {
            p = seen
                .iter()
                .find(|s| s.pid == p)
                .unwrap()
                .ppid
                .parse()
                .unwrap();
            n += 1;
        }
        n
    };
    for s in &seen {
        let row = rows
            .iter()
            .find(|r| r.split_whitespace().next() == Some(&s.pid.to_string()))
            .unwrap_or_else(|| panic!("no row for PID {}:\n{ps}", s.pid));
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            (f[1], f[2], f[3]),
            (s.ppid.as_str(), s.pgid.as_str(), s.sid.as_str()),
            "ppid, pgid, sid of {}:\n{ps}",
            s.pid
        );
        let indent = "  ".repeat(depth(s.pid));
        if s.zombie {
            assert!(
                row.contains(&format!("  {indent}<zombie, ")),
                "zombie {} shown as one, under its parent:\n{ps}",
                s.pid
            );
        } else {
            assert!(
                row.ends_with(&format!(" {}  {indent}{}", s.threads, s.comm)),
                "PID {}: {} threads, comm {:?} at depth {}:\n{ps}",
                s.pid,
                s.threads,
                s.comm,
                depth(s.pid)
            );
        }
    }

    // wl_tree's zombies: Z exited with 42, Y was killed by SIGTERM.
    assert!(ps.contains("<zombie, exited 42>"), "{ps}");
    assert!(ps.contains("<zombie, killed by signal 15>"), "{ps}");

    let fds = stdout(&["show", &img, "fds"]);
    let heading = format!("PID {} ({}): {} fds", w.pid, seen[0].comm, root_fds.len());
    let section: Vec<&str> = fds
        .split("\n\n")
        .find(|s| s.starts_with(&heading))
        .unwrap_or_else(|| panic!("no section {heading:?}:\n{fds}"))
        .lines()
        .collect();
    let live = seen.iter().filter(|s| !s.zombie).count();
    assert_eq!(
        fds.matches("PID ").count(),
        live,
        "one section per live process:\n{fds}"
    );
    for (fd, link) in &root_fds {
        let row = section
            .iter()
            .find(|r| r.split_whitespace().next() == Some(&fd.to_string()))
            .unwrap_or_else(|| panic!("fd {fd} ({link}) missing:\n{fds}"));
        let f: Vec<&str> = row.split_whitespace().collect();
        let what = f[3..].join(" ");
        if link.starts_with("pipe:") {
            assert_eq!(f[1], "pipe", "fd {fd} ({link}): {row}");
            assert!(what.starts_with(link.as_str()), "fd {fd} ({link}): {row}");
        } else if link.starts_with("/dev/") {
            assert!(["chr", "tty"].contains(&f[1]), "fd {fd} ({link}): {row}");
            assert!(what.starts_with(link.as_str()), "fd {fd} ({link}): {row}");
        } else if link.starts_with('/') {
            assert_eq!(f[1], "reg", "fd {fd} ({link}): {row}");
            assert!(what.starts_with(link.as_str()), "fd {fd} ({link}): {row}");
        }
    }
    let cwd = section
        .iter()
        .find(|r| r.trim_start().starts_with("cwd "))
        .unwrap_or_else(|| panic!("no cwd row:\n{fds}"));
    assert!(
        cwd.trim_end().ends_with(&root_cwd.display().to_string()),
        "cwd {}: {cwd}",
        root_cwd.display()
    );
    // -D DIR VIEW works as DIR VIEW does.
    assert_eq!(stdout(&["show", "-D", &img, "ps"]), ps);
}

/// Pages of `pid` the image's page map stores in it and in its parents.
fn stored(img: &Path, pid: i32) -> (u64, u64) {
    let pm = ImageDir::open(img).unwrap().page_map(pid).unwrap();
    pm.runs.iter().fold((0, 0), |(h, p), r| {
        if r.in_parent {
            (h, p + u64::from(r.nr_pages))
        } else {
            (h + u64::from(r.nr_pages), p)
        }
    })
}

#[test]
fn mems_stats_and_display_stats_of_a_chain() {
    let d = TempDir::new("show-chain");
    let mut w = Workload::start("wl_memory", &[&d.s("")], &d);
    become_subreaper();
    let pre = CrCmd::pre_dump(w.pid, d.join("p1"))
        .arg("--display-stats")
        .env("CR_TRACKER_LOG", d.join("tracker.log"))
        .ok();
    let pre_out = String::from_utf8(pre.stdout).unwrap();
    let dump = CrCmd::dump(w.pid, d.join("img"))
        .args(&[
            "--track-mem",
            "--prev-images-dir",
            "../p1",
            "--display-stats",
        ])
        .ok();
    let dump_out = String::from_utf8(dump.stdout).unwrap();
    w.reap_killed();
    let restore = restore_cmd(&d).arg("--display-stats").ok();
    let restore_out = String::from_utf8(restore.stdout).unwrap();
    w.assert_pass();

    let inv = |name: &str| {
        ImageDir::open(&d.join(name))
            .unwrap()
            .inventory()
            .stats
            .clone()
            .unwrap()
    };
    let (s1, s2) = (inv("p1"), inv("img"));
    // --display-stats: the numbers the images recorded.
    assert!(
        pre_out.starts_with("Displaying pre-dump stats:\n"),
        "{pre_out}"
    );
    assert!(
        dump_out.starts_with("Displaying dump stats:\n"),
        "{dump_out}"
    );
    for (out, s) in [(&pre_out, &s1), (&dump_out, &s2)] {
        assert_eq!(
            number(value_of(out, "Memory pages written")),
            s.pages_written,
            "{out}"
        );
        assert_eq!(
            number(value_of(out, "Memory pages scanned")),
            s.pages_scanned,
            "{out}"
        );
        assert_eq!(
            number(value_of(out, "Memory pages skipped from parent")),
            s.pages_in_parent,
            "{out}"
        );
        assert_eq!(value_of(out, "Harvest"), s.harvest, "{out}");
        assert!(value_of(out, "Frozen time").ends_with(" ms"), "{out}");
        assert!(s.freezing_us > 0, "the freezing time is recorded: {s:?}");
    }
    assert!(s1.pages_written > 0, "the pre-dump copied the memory");
    assert!(
        s2.pages_in_parent > s2.pages_written,
        "an idle workload's final dump takes most pages from the pre-dump: {s2:?}"
    );

    // mems: every VMA of the final dump, pages here and in the parent as its page map says.
    let img = d.join("img");
    let mems = stdout(&["show", &d.s("img"), "mems"]);
    let (here, parents) = stored(&img, w.pid);
    assert_eq!(parents, s2.pages_in_parent, "page map and stats agree");
    let total = mems
        .lines()
        .find(|l| l.split_whitespace().next() == Some("total"))
        .unwrap_or_else(|| panic!("no total row:\n{mems}"));
    let f: Vec<&str> = total.split_whitespace().collect();
    assert_eq!(
        (f[f.len() - 2], f[f.len() - 1]),
        (here.to_string().as_str(), parents.to_string().as_str()),
        "pages here and in parents:\n{mems}"
    );
    let mm: cr::image::pb::Mm = ImageDir::open(&img)
        .unwrap()
        .read_msg(&format!("mm-{}.img", w.pid), cr::image::Kind::Mm)
        .unwrap();
    for v in &mm.vmas {
        let start = format!("{:x}", v.start);
        let row = mems
            .lines()
            .find(|l| l.split_whitespace().next() == Some(start.as_str()))
            .unwrap_or_else(|| panic!("no row for VMA {start}:\n{mems}"));
        assert_eq!(
            row.split_whitespace().nth(1),
            Some(format!("{:x}", v.end).as_str()),
            "{row}"
        );
        if v.name == "[heap]" || v.name == "[stack]" {
            assert!(row.contains(&v.name), "{row}");
        }
    }
    // The pre-dump has VMAs and pages too (all its own).
    let pre_mems = stdout(&["show", &d.s("p1"), "mems"]);
    let (h1, p1) = stored(&d.join("p1"), w.pid);
    assert_eq!(p1, 0);
    assert!(
        pre_mems.contains(&format!("pages stored here {h1} (")),
        "{pre_mems}"
    );

    // stats: both images, oldest first, with the tracker's view.
    let stats = stdout(&["show", &d.s("img"), "stats"]);
    let head: Vec<&str> = stats.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["p1", "img"], "{stats}");
    let row = |label: &str| -> Vec<String> {
        value_of(&stats, label)
            .split("  ")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    assert_eq!(row("Kind"), ["pre-dump", "dump"], "{stats}");
    assert_eq!(
        row("Harvest"),
        [s1.harvest.clone(), s2.harvest.clone()],
        "{stats}"
    );
    let written: Vec<u64> = row("Memory pages written")
        .iter()
        .map(|v| number(v))
        .collect();
    assert_eq!(written, [s1.pages_written, s2.pages_written], "{stats}");
    let dirty: Vec<u64> = row("eBPF dirty pages").iter().map(|v| number(v)).collect();
    assert_eq!(dirty, [s1.ebpf_dirty_pages, s2.ebpf_dirty_pages], "{stats}");
    let reason = if s2.harvest_reason.is_empty() {
        "-"
    } else {
        s2.harvest_reason.as_str()
    };
    assert!(
        stats.contains(&format!("img:  {} ({reason})", s2.harvest)),
        "the harvest used and why:\n{stats}"
    );

    // Restore: every page of the chain written back, the parent's among them.
    assert!(
        restore_out.starts_with("Displaying restore stats:\n"),
        "{restore_out}"
    );
    assert_eq!(
        number(value_of(&restore_out, "Pages restored")),
        here + parents,
        "{restore_out}"
    );
    assert_eq!(
        number(value_of(&restore_out, "Pages from parents")),
        parents,
        "{restore_out}"
    );
    assert_eq!(
        number(value_of(&restore_out, "Processes")),
        1,
        "{restore_out}"
    );

    // A pre-dump has no processes to list.
    let out = cr(&["show", &d.s("p1"), "ps"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("is a pre-dump"),
        "{}",
        stderr_of(&out)
    );
}
