//! `--only periodic`: `cr periodic --interval 1s --keep 5` over the heartbeat workload (SIZE
//! MiB, one page rewritten per heartbeat over 1% of it) for N intervals: the frozen time of
//! every checkpoint (p50/p99/max, from periodic's one line per checkpoint), the dirty and
//! written MiB, the heartbeat's own longest pause, and the disk the directory holds at the end
//! (hard links counted once).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{baseline, cr_bin, TempDir, Workload};

/// Bytes of disk the tree under `p` holds, each inode once.
fn disk_use(p: &Path, seen: &mut HashSet<u64>) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_dir() {
            n += disk_use(&e.path(), seen);
        } else if m.is_file() && seen.insert(m.ino()) {
            n += m.blocks() * 512;
        }
    }
    n
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The number after `key` in a line ("frozen 3.2 ms" → 3.2).
fn after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

pub fn section(size_mib: usize, intervals: usize) {
    println!(
        "periodic: wl_heartbeat {size_mib} MiB dirtying 1%, cr periodic --interval 1s --keep 5, {intervals} checkpoints"
    );
    let noise = baseline(size_mib);
    let d = TempDir::new("bench-periodic");
    let mut w = Workload::start("wl_heartbeat", &[&size_mib.to_string(), "1"], &d);
    let ck = d.join("ck");
    let t0 = std::time::Instant::now();
    let mut child = Command::new(cr_bin())
        .args(["periodic", "-t", &w.pid.to_string(), "-D"])
        .arg(&ck)
        .args([
            "--interval",
            "1s",
            "--keep",
            "5",
            "--count",
            &intervals.to_string(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cr periodic");
    let (mut frozen, mut dirty, mut written) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = None;
    let mut said = HashSet::new();
    for l in BufReader::new(child.stderr.take().unwrap()).lines() {
        let Ok(l) = l else { break };
        if !l.contains(": frozen ") {
            // Each distinct warning once (the line without its timestamp).
            let text = l
                .split_once(") ")
                .map_or(l.as_str(), |(_, t)| t)
                .to_string();
            if (l.contains("Error") || l.contains("Warn")) && said.insert(text) {
                println!("  cr: {l}");
            }
            continue;
        }
        let f = after(&l, "frozen ").unwrap_or(0.0);
        if first.is_none() {
            first = Some(f);
            continue;
        }
        frozen.push(f);
        dirty.push(after(&l, "dirty ").unwrap_or(0.0));
        written.push(after(&l, "written ").unwrap_or(0.0));
    }
    let st = child.wait().expect("wait for cr periodic");
    let wall = t0.elapsed().as_secs_f64();
    let disk = disk_use(&ck, &mut HashSet::new()) as f64 / (1u64 << 20) as f64;
    w.assert_pass();
    frozen.sort_by(f64::total_cmp);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        pct(v, 0.5)
    };
    println!(
        "  cr periodic: {st}; {intervals} checkpoints in {wall:.0} s: one every {:.2} s (asked: 1 s; a checkpoint and its fold that take longer delay the next)",
        wall / intervals.max(1) as f64
    );
    println!(
        "  first (full) checkpoint frozen {:.1} ms; {} incremental: frozen p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 <= 10 ms)",
        first.unwrap_or(0.0),
        frozen.len(),
        pct(&frozen, 0.5),
        pct(&frozen, 0.99),
        frozen.last().copied().unwrap_or(0.0)
    );
    println!(
        "  per checkpoint: dirty {:.1} MiB, written {:.1} MiB (medians); disk after {intervals} with --keep 5: {disk:.0} MiB ({:.2}x the {size_mib} MiB resident)",
        med(&mut dirty),
        med(&mut written),
        disk / size_mib as f64
    );
    println!("  (heartbeat noise floor without any checkpoint: {noise:.1} ms)");
}
