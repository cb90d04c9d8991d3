//! `cargo xtask bench`: cr against the full-dump path and against criu (when one is given or on
//! PATH), measured in the same run, printed as a table with ratios.
//!
//! Workload: wl_heartbeat with SIZE MiB of touched anonymous memory. Its heartbeat loop
//! measures the longest time it did not run: for `dump --leave-running` that is the time the
//! target was frozen, measured the same way for every tool.
//!
//! Second section (incremental checkpoints, issue 5): the same workload dirtying 1% and 10% of
//! its pages between checkpoints (its DIRTY_PERCENT mode); the frozen time of a full dump, of
//! the first pre-dump (which arms tracking), and of `dump -R --track-mem --prev-images-dir`
//! after it with each harvest (the exact PAGEMAP_SCAN forced with CR_HARVEST=scan, and the
//! eBPF one); then the workload's write throughput untracked, tracked, and tracked with a
//! pre-dump every 0.5 s.
//!
//! Third section (issue 6), in cr-bench/tcp.rs: 100 established connections to a peer that is
//! not dumped, echoing its messages across `dump --tcp-established` and `restore
//! --tcp-established`: how long the connections were locked, the longest gap the peer saw,
//! every stream checked message by message. `--only full|incremental|tcp` runs one section.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cr_tests::{become_subreaper, cr_bin, wait_exit, TempDir, Workload};

#[path = "cr-bench/periodic.rs"]
mod periodic;
#[path = "cr-bench/tcp.rs"]
mod tcp;

struct Args {
    criu: Option<PathBuf>,
    size_mib: usize,
    rounds: usize,
    only: Option<String>,
    dirty: Vec<usize>,
    /// Checkpoints of the periodic section.
    intervals: usize,
    tcp: tcp::TcpArgs,
}

fn parse_args() -> Args {
    let mut a = Args {
        criu: None,
        size_mib: 1024,
        rounds: 3,
        only: None,
        dirty: vec![1, 10],
        intervals: 60,
        tcp: tcp::TcpArgs::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--criu" => a.criu = it.next().map(PathBuf::from),
            "--size-mib" => {
                a.size_mib = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--size-mib N")
            }
            "--rounds" => a.rounds = it.next().and_then(|s| s.parse().ok()).expect("--rounds N"),
            "--only" => a.only = it.next(),
            "--intervals" => {
                a.intervals = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--intervals N")
            }
            "--dirty" => {
                a.dirty = it
                    .next()
                    .map(|s| s.split(',').filter_map(|p| p.parse().ok()).collect())
                    .expect("--dirty P,P")
            }
            "--tcp-conns" => {
                a.tcp.conns = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--tcp-conns N")
            }
            "--tcp-interval-us" => {
                a.tcp.interval = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .map(std::time::Duration::from_micros)
                    .expect("--tcp-interval-us N")
            }
            "--tcp-window" => {
                a.tcp.window = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&w| w > 0)
                    .expect("--tcp-window N (1 or more)")
            }
            "--tcp-loopback" => a.tcp.loopback = true,
            "-h" | "--help" => {
                println!("cr-bench [--criu PATH] [--size-mib N (1024)] [--rounds N (3)] [--only full|incremental|tcp|periodic] [--dirty 1,10] [--intervals N (60)]");
                println!("         [--tcp-conns N (100)] [--tcp-interval-us N (1000)] [--tcp-window N (1)] [--tcp-loopback]");
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
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
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
            return it
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
                / 1000.0;
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
        Command::new(&self.bin)
            .args(args)
            .arg("-D")
            .arg(dir)
            .args(["-o", log])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
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
        eprintln!(
            "{}: dump failed (see {}/dump.log)",
            tool.name,
            img.display()
        );
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
        eprintln!(
            "{}: restore failed (see {}/restore.log)",
            tool.name,
            img.display()
        );
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
    Some(Sample {
        dump_ms,
        frozen_ms,
        restore_ms,
        image_mib,
    })
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
    let run = |section: &str| a.only.as_deref().is_none_or(|o| o == section);
    if run("full") || run("incremental") {
        println!(
            "cr-bench: {} MiB of touched anonymous memory, median of {} rounds",
            a.size_mib, a.rounds
        );
    }
    let mut tools = vec![Tool {
        name: "cr",
        bin: cr_bin(),
    }];
    match &a.criu {
        Some(p) => tools.push(Tool {
            name: "criu",
            bin: p.clone(),
        }),
        None => println!("cr-bench: no criu given (--criu PATH) or on PATH: cr only"),
    }
    if run("full") {
        full_section(&a, &tools);
    }
    if run("incremental") {
        incremental::section(&a);
    }
    if run("tcp") {
        tcp::section(&a);
    }
    if run("periodic") {
        periodic::section(a.size_mib, a.intervals);
    }
}

fn full_section(a: &Args, tools: &[Tool]) {
    let noise = baseline(a.size_mib);
    let mut rows = Vec::new();
    for tool in tools {
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
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12}",
        "tool", "dump ms", "frozen ms", "restore ms", "image MiB"
    );
    for (name, s) in &rows {
        println!(
            "{:<8} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
            name, s.dump_ms, s.frozen_ms, s.restore_ms, s.image_mib
        );
    }
    println!("(heartbeat noise floor without any dump: {noise:.1} ms)");
    if let (Some((_, c)), Some((_, k))) = (
        rows.iter().find(|r| r.0 == "cr"),
        rows.iter().find(|r| r.0 == "criu"),
    ) {
        println!(
            "criu/cr ratios: dump {:.2}x, frozen {:.2}x, restore {:.2}x, image {:.2}x",
            k.dump_ms / c.dump_ms,
            k.frozen_ms / c.frozen_ms,
            k.restore_ms / c.restore_ms,
            k.image_mib / c.image_mib
        );
    }
}

/// The incremental-checkpoint section.
mod incremental {
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::{baseline, cr_bin, median, Args, TempDir, Workload};

    /// SIGUSR2 to the heartbeat: its longest pause since the last report (ms) and its total
    /// writes. Waits for the report file (the workload writes it from its loop).
    fn report(w: &Workload) -> (f64, u64) {
        let _ = std::fs::remove_file(&w.result);
        // SAFETY: plain kill(2) of our workload.
        assert_eq!(unsafe { libc::kill(w.pid, libc::SIGUSR2) }, 0);
        let t0 = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&w.result) {
                if t.ends_with('\n') {
                    let num = |key: &str| -> Option<u64> {
                        let mut it = t.split_whitespace();
                        while let Some(k) = it.next() {
                            if k == key {
                                return it.next().and_then(|v| v.parse().ok());
                            }
                        }
                        None
                    };
                    return (
                        num("max_gap_us").unwrap_or(0) as f64 / 1e3,
                        num("writes").unwrap_or(0),
                    );
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the heartbeat does not report"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A number from the statistics of an image (`cr show`): e.g. "frozen_us".
    fn stat(img: &Path, key: &str) -> String {
        let out = Command::new(cr_bin())
            .arg("show")
            .arg(img.join("inventory.img"))
            .output()
            .expect("cr show");
        let text = String::from_utf8_lossy(&out.stdout);
        let pat = format!("\"{key}\": ");
        text.find(&pat)
            .map(|i| {
                text[i + pat.len()..]
                    .split([',', '\n'])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_default()
    }

    /// One checkpoint as the workload saw it.
    #[derive(Clone, Default)]
    struct Point {
        gap_ms: f64,
        frozen_ms: f64,
        harvest_ms: f64,
        written_mib: f64,
        harvest: String,
    }

    /// Runs `cr ARGS` (with `env`) against the workload, measuring its pause.
    fn checkpoint(w: &Workload, img: &Path, args: &[&str], env: &[(&str, &str)]) -> Option<Point> {
        report(w);
        let mut c = Command::new(cr_bin());
        c.args(args)
            .args(["-t", &w.pid.to_string(), "-D"])
            .arg(img)
            .args(["-o", "dump.log"]);
        for (k, v) in env {
            c.env(k, v);
        }
        let ok = c.status().map(|s| s.success()).unwrap_or(false);
        let (gap_ms, _) = report(w);
        if !ok {
            eprintln!(
                "cr {}: failed (see {}/dump.log)",
                args.join(" "),
                img.display()
            );
            return None;
        }
        let f = |k: &str| stat(img, k).parse::<f64>().unwrap_or(0.0);
        Some(Point {
            gap_ms,
            frozen_ms: f("frozen_us") / 1e3,
            harvest_ms: f("harvest_us") / 1e3,
            written_mib: f("pages_written") * 4096.0 / (1 << 20) as f64,
            harvest: stat(img, "harvest"),
        })
    }

    fn med(points: &[Point]) -> Point {
        if points.is_empty() {
            return Point::default();
        }
        Point {
            gap_ms: median(points.iter().map(|p| p.gap_ms).collect()),
            frozen_ms: median(points.iter().map(|p| p.frozen_ms).collect()),
            harvest_ms: median(points.iter().map(|p| p.harvest_ms).collect()),
            written_mib: median(points.iter().map(|p| p.written_mib).collect()),
            harvest: points[0].harvest.clone(),
        }
    }

    /// Writes per second over `d`.
    fn rate(w: &Workload, d: Duration) -> f64 {
        let (_, w0) = report(w);
        let t = Instant::now();
        std::thread::sleep(d);
        let (_, w1) = report(w);
        (w1 - w0) as f64 / t.elapsed().as_secs_f64()
    }

    pub fn section(a: &Args) {
        println!();
        println!("incremental checkpoints: {} MiB, frozen = the workload's longest pause (median of {} rounds)", a.size_mib, a.rounds);
        let noise = baseline(a.size_mib);
        for &pct in &a.dirty {
            let d = TempDir::new(&format!("bench-inc-{pct}"));
            let w = Workload::start(
                "wl_heartbeat",
                &[&a.size_mib.to_string(), &pct.to_string()],
                &d,
            );
            // Let the dirty window fill once.
            std::thread::sleep(Duration::from_millis(300));
            let full = checkpoint(&w, &d.join("full"), &["dump", "-R"], &[]);
            let _ = std::fs::remove_dir_all(d.join("full"));
            let first = checkpoint(&w, &d.join("p0"), &["pre-dump"], &[]);
            let mut prev = "p0".to_string();
            // Pre-dumps and final dumps (-R, so the workload can tell its pause), each harvest.
            let (mut pre_scans, mut pre_ebpfs, mut scans, mut ebpfs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in 0..a.rounds {
                #[allow(clippy::type_complexity)]
                let kinds: [(&str, &str, &[(&str, &str)], &mut Vec<Point>); 4] = [
                    ("ps", "pre-dump", &[("CR_HARVEST", "scan")], &mut pre_scans),
                    ("pe", "pre-dump", &[], &mut pre_ebpfs),
                    ("s", "dump", &[("CR_HARVEST", "scan")], &mut scans),
                    ("e", "dump", &[], &mut ebpfs),
                ];
                for (name, cmd, env, out) in kinds {
                    std::thread::sleep(Duration::from_millis(500));
                    let img = format!("{name}{r}");
                    let parent = format!("../{prev}");
                    let args: Vec<&str> = if cmd == "dump" {
                        vec!["dump", "-R", "--track-mem", "--prev-images-dir", &parent]
                    } else {
                        vec!["pre-dump", "--prev-images-dir", &parent]
                    };
                    if let Some(p) = checkpoint(&w, &d.join(&img), &args, env) {
                        out.push(p);
                    }
                    prev = img;
                }
            }
            let (scan, ebpf) = (med(&scans), med(&ebpfs));
            let (st, res) = {
                let mut w = w;
                w.verify()
            };
            if st != 0 || !res.starts_with("PASS") {
                println!("dirty {pct}%: the workload failed its check: {res}");
            }
            println!();
            println!(
                "dirty {pct}% between checkpoints ({:.0} MiB):",
                a.size_mib as f64 * pct as f64 / 100.0
            );
            println!(
                "  {:<44} {:>10} {:>12} {:>11} {:>11}  harvest",
                "checkpoint", "frozen ms", "(cr says ms)", "harvest ms", "copied MiB"
            );
            let row = |name: &str, p: &Option<Point>| {
                if let Some(p) = p {
                    println!(
                        "  {:<44} {:>10.2} {:>12.2} {:>11.2} {:>11.1}  {}",
                        name, p.gap_ms, p.frozen_ms, p.harvest_ms, p.written_mib, p.harvest
                    );
                } else {
                    println!("  {name:<44} failed");
                }
            };
            row("full dump -R", &full);
            row("first pre-dump (copies all, arms tracking)", &first);
            row(
                "pre-dump --prev-images-dir (scan)",
                &(!pre_scans.is_empty()).then_some(med(&pre_scans)),
            );
            row(
                "pre-dump --prev-images-dir (eBPF)",
                &(!pre_ebpfs.is_empty()).then_some(med(&pre_ebpfs)),
            );
            row(
                "dump -R --track-mem --prev-images-dir (scan)",
                &(!scans.is_empty()).then_some(scan.clone()),
            );
            row(
                "dump -R --track-mem --prev-images-dir (eBPF)",
                &(!ebpfs.is_empty()).then_some(ebpf.clone()),
            );
            if let Some(f) = &full {
                let ratio = |p: &Point| f.gap_ms / p.gap_ms.max(0.001);
                println!(
                    "  full/incremental frozen: final dump scan {:.1}x, eBPF {:.1}x; pre-dump scan {:.1}x, eBPF {:.1}x (goal at 1%: under 10 ms and at least 20x)",
                    ratio(&scan),
                    ratio(&ebpf),
                    ratio(&med(&pre_scans)),
                    ratio(&med(&pre_ebpfs))
                );
            }

            // Throughput of the workload's writes: untracked, tracked, tracked with checkpoints.
            let d = TempDir::new(&format!("bench-inc-tp-{pct}"));
            let w = Workload::start(
                "wl_heartbeat",
                &[&a.size_mib.to_string(), &pct.to_string()],
                &d,
            );
            std::thread::sleep(Duration::from_millis(300));
            let span = Duration::from_secs(2);
            let off = rate(&w, span);
            let tracked = Command::new(cr_bin())
                .args(["pre-dump", "-t", &w.pid.to_string(), "-D"])
                .arg(d.join("t0"))
                .args(["-o", "dump.log"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !tracked {
                println!("  throughput: the pre-dump that arms tracking failed");
                continue;
            }
            let on = rate(&w, span);
            // With a pre-dump every 0.5 s during the window.
            let (_, w0) = report(&w);
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed() < span {
                std::thread::sleep(Duration::from_millis(500));
                n += 1;
                let _ = Command::new(cr_bin())
                    .args(["pre-dump", "-t", &w.pid.to_string(), "-D"])
                    .arg(d.join(&format!("t{n}")))
                    .args([
                        "--prev-images-dir",
                        &format!("../t{}", n - 1),
                        "-o",
                        "dump.log",
                    ])
                    .status();
            }
            let (_, w1) = report(&w);
            let busy = (w1 - w0) as f64 / t.elapsed().as_secs_f64();
            let pcts = |x: f64| (1.0 - x / off) * 100.0;
            println!(
                "  write throughput: untracked {:.1} M/s; tracked {:.1} M/s ({:+.1}% overhead); tracked with a pre-dump every 0.5 s {:.1} M/s ({:+.1}%)",
                off / 1e6,
                on / 1e6,
                pcts(on),
                busy / 1e6,
                pcts(busy)
            );
        }
        println!("(heartbeat noise floor without any dump: {noise:.1} ms)");
    }
}
