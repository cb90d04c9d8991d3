//! `cargo xtask bench`: cr against the full-dump path and against criu (when one is given or on
//! PATH), measured in the same run, printed as a table with ratios.
//!
//! Workload: wl_heartbeat with SIZE MiB of touched anonymous memory. Its heartbeat loop
//! measures the longest time it did not run: for `dump --leave-running` that is the time the
//! target was frozen, measured the same way for every tool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cr_tests::{become_subreaper, cr_bin, wait_exit, TempDir, Workload};

struct Args {
    criu: Option<PathBuf>,
    size_mib: usize,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut a = Args { criu: None, size_mib: 1024, rounds: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--criu" => a.criu = it.next().map(PathBuf::from),
            "--size-mib" => a.size_mib = it.next().and_then(|s| s.parse().ok()).expect("--size-mib N"),
            "--rounds" => a.rounds = it.next().and_then(|s| s.parse().ok()).expect("--rounds N"),
            "-h" | "--help" => {
                println!("cr-bench [--criu PATH] [--size-mib N (1024)] [--rounds N (3)]");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    if a.criu.is_none() {
        a.criu = which("criu");
    }
    a
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p).map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// One measurement of one tool.
#[derive(Default, Clone, Copy)]
struct Sample {
    dump_ms: f64,
    frozen_ms: f64,
    restore_ms: f64,
    image_mib: f64,
}

fn max_gap_ms(result: &str) -> f64 {
    let mut it = result.split_whitespace();
    while let Some(w) = it.next() {
        if w == "max_gap_us" {
            return it.next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN) / 1000.0;
        }
    }
    f64::NAN
}

/// A checkpoint tool driven through its command line; cr and criu share the flags used here.
struct Tool {
    name: &'static str,
    bin: PathBuf,
}

impl Tool {
    fn run(&self, args: &[&str], dir: &Path, log: &str) -> bool {
        Command::new(&self.bin).args(args).arg("-D").arg(dir).args(["-o", log]).status().map(|s| s.success()).unwrap_or(false)
    }
    fn dump(&self, pid: i32, dir: &Path, leave_running: bool) -> bool {
        // criu wants the images directory to exist (cr creates it).
        if std::fs::create_dir_all(dir).is_err() {
            return false;
        }
        let pid = pid.to_string();
        let mut args = vec!["dump", "-t", &pid];
        if leave_running {
            args.push("-R");
        }
        self.run(&args, dir, "dump.log")
    }
    fn restore(&self, dir: &Path) -> bool {
        self.run(&["restore", "-d"], dir, "restore.log")
    }
}

/// dump -R (dump time, frozen time, image size), then restore of that image (restore time).
fn measure(tool: &Tool, size_mib: usize) -> Option<Sample> {
    let d = TempDir::new(&format!("bench-{}", tool.name));
    let mut w = Workload::start("wl_heartbeat", &[&size_mib.to_string()], &d);
    let img = d.join("img");
    let t = Instant::now();
    if !tool.dump(w.pid, &img, true) {
        eprintln!("{}: dump failed (see {}/dump.log)", tool.name, img.display());
        return None;
    }
    let dump_ms = t.elapsed().as_secs_f64() * 1e3;
    let (st, res) = w.verify();
    if st != 0 || !res.starts_with("PASS") {
        eprintln!("{}: the workload failed after dump -R: {res}", tool.name);
        return None;
    }
    let frozen_ms = max_gap_ms(&res);
    let image_mib = dir_size(&img) as f64 / (1 << 20) as f64;
    std::fs::remove_file(&w.result).ok();
    let t = Instant::now();
    if !tool.restore(&img) {
        eprintln!("{}: restore failed (see {}/restore.log)", tool.name, img.display());
        return None;
    }
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: plain kill(2) of the restored workload (our adopted child as subreaper).
    unsafe { libc::kill(w.pid, libc::SIGUSR1) };
    let st = wait_exit(w.pid);
    let res = std::fs::read_to_string(&w.result).unwrap_or_default();
    if st != 0 || !res.starts_with("PASS") {
        eprintln!("{}: the restored workload failed: {res}", tool.name);
        return None;
    }
    Some(Sample { dump_ms, frozen_ms, restore_ms, image_mib })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn summarize(samples: &[Sample]) -> Sample {
    Sample {
        dump_ms: median(samples.iter().map(|s| s.dump_ms).collect()),
        frozen_ms: median(samples.iter().map(|s| s.frozen_ms).collect()),
        restore_ms: median(samples.iter().map(|s| s.restore_ms).collect()),
        image_mib: median(samples.iter().map(|s| s.image_mib).collect()),
    }
}

/// The heartbeat's own noise floor: the largest gap with nobody touching it.
fn baseline(size_mib: usize) -> f64 {
    let d = TempDir::new("bench-baseline");
    let mut w = Workload::start("wl_heartbeat", &[&size_mib.to_string()], &d);
    // Run about as long as a dump would take.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, res) = w.verify();
    max_gap_ms(&res)
}

fn main() {
    let a = parse_args();
    become_subreaper();
    println!("cr-bench: {} MiB of touched anonymous memory, median of {} rounds", a.size_mib, a.rounds);
    let mut tools = vec![Tool { name: "cr", bin: cr_bin() }];
    match &a.criu {
        Some(p) => tools.push(Tool { name: "criu", bin: p.clone() }),
        None => println!("cr-bench: no criu given (--criu PATH) or on PATH: cr only"),
    }
    let noise = baseline(a.size_mib);
    let mut rows = Vec::new();
    for tool in &tools {
        let mut samples = Vec::new();
        for _ in 0..a.rounds {
            if let Some(s) = measure(tool, a.size_mib) {
                samples.push(s);
            }
        }
        if samples.is_empty() {
            println!("{}: no successful round", tool.name);
            continue;
        }
        rows.push((tool.name.to_string(), summarize(&samples)));
    }
    println!();
    println!("{:<8} {:>12} {:>12} {:>12} {:>12}", "tool", "dump ms", "frozen ms", "restore ms", "image MiB");
    for (name, s) in &rows {
        println!("{:<8} {:>12.1} {:>12.1} {:>12.1} {:>12.1}", name, s.dump_ms, s.frozen_ms, s.restore_ms, s.image_mib);
    }
    println!("(heartbeat noise floor without any dump: {noise:.1} ms)");
    if let (Some((_, c)), Some((_, k))) = (rows.iter().find(|r| r.0 == "cr"), rows.iter().find(|r| r.0 == "criu")) {
        println!(
            "criu/cr ratios: dump {:.2}x, frozen {:.2}x, restore {:.2}x, image {:.2}x",
            k.dump_ms / c.dump_ms,
            k.frozen_ms / c.frozen_ms,
            k.restore_ms / c.restore_ms,
            k.image_mib / c.image_mib
        );
    }
}
