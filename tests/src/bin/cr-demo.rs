//! `cargo xtask demo`: start a small counter service, dump it, show it gone, restore it, and
//! show it counting on from where it stopped.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cr_tests::{cr_bin, workload_bin};

fn last_count(log: &Path) -> u64 {
    let f = std::fs::File::open(log).unwrap();
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("count ").and_then(|n| n.parse().ok()))
        .last()
        .unwrap_or(0)
}

/// Follows the log until it reaches `n` (the service writes every 200 ms).
fn wait_for_count(log: &Path, n: u64, limit: Duration) -> bool {
    let t = Instant::now();
    let mut f = std::fs::File::open(log).unwrap();
    let mut seen = String::new();
    while t.elapsed() < limit {
        f.seek(SeekFrom::Start(0)).unwrap();
        seen.clear();
        std::io::Read::read_to_string(&mut f, &mut seen).unwrap();
        if seen
            .lines()
            .filter_map(|l| l.strip_prefix("count ").and_then(|x| x.parse::<u64>().ok()))
            .any(|c| c >= n)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn run(cr: &Path, args: &[&str]) -> (bool, f64) {
    println!("$ cr {}", args.join(" "));
    let t = Instant::now();
    let st = Command::new(cr).args(args).status().expect("run cr");
    (st.success(), t.elapsed().as_secs_f64() * 1e3)
}

fn main() {
    let cr = cr_bin();
    let dir = std::env::temp_dir().join(format!("cr-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("counter.log");
    let img = dir.join("img");
    std::fs::write(&log, "").unwrap();

    println!(
        "== starting a counter service (writes `count N` to {} every 200 ms)",
        log.display()
    );
    let mut svc = Command::new(workload_bin("wl_counter"))
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = svc.id() as i32;
    assert!(
        wait_for_count(&log, 5, Duration::from_secs(10)),
        "the counter did not start"
    );
    println!("   PID {pid} has counted to {}", last_count(&log));

    println!("== dumping it");
    let (ok, dump_ms) = run(
        &cr,
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &img.to_string_lossy(),
            "-v",
        ],
    );
    assert!(ok, "dump failed");
    svc.wait().unwrap();
    let at_dump = last_count(&log);
    println!(
        "   dump took {dump_ms:.1} ms; PID {pid} exists: {}; last count {at_dump}",
        Path::new(&format!("/proc/{pid}")).exists()
    );

    println!("== restoring it");
    let (ok, restore_ms) = run(&cr, &["restore", "-D", &img.to_string_lossy(), "-d", "-v"]);
    assert!(ok, "restore failed");
    println!(
        "   restore took {restore_ms:.1} ms; PID {pid} exists: {}",
        Path::new(&format!("/proc/{pid}")).exists()
    );
    let ok = wait_for_count(&log, at_dump + 5, Duration::from_secs(10));
    let after = last_count(&log);
    println!(
        "   counting on: {at_dump} -> {after} ({})",
        if ok && after > at_dump {
            "it continued where it stopped"
        } else {
            "NOT counting"
        }
    );
    // SAFETY: plain kill(2) of the demo service.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = std::fs::remove_dir_all(&dir);
    if !(ok && after > at_dump) {
        std::process::exit(1);
    }
    println!("== done: dump {dump_ms:.1} ms, restore {restore_ms:.1} ms");
}
