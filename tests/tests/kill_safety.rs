//! SIGKILL of cr at points spread over a whole dump (an OOM kill, a node agent's timeout): the
//! target must run on as before (its own check, tests/src/bin/wl_steady.rs) or, for a dump
//! that kills it, be in a complete image that restores; a connection locked by
//! `--tcp-established` must carry data again, with nothing of cr's left in bpffs or on the
//! interface; a killed pre-dump must not leave a second tracker beside the next one.
//!
//! Each mode first times one whole run of its command, then kills cr at TRIALS delays
//! stratified over that time (the delay is the one deliberate timing of these tests; every
//! other step waits on a pipe or a process exit). The outcomes are printed as a table (the
//! numbers in docs/benchmarks.md come from it) before the test asserts that none was harmful.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cr_tests::net::enter_netns;
use cr_tests::{become_subreaper, procfs, restore_cmd, CrCmd, TempDir, Workload};

const TRIALS: usize = 20;
const MIB: &str = "64";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `dump -R` of a 4-thread target.
    LeaveRunning,
    /// `dump` (the target is killed once the image is complete).
    Kill,
    /// `pre-dump --track-mem`, then a whole pre-dump: one tracker at most.
    PreDump,
    /// `dump -R --tcp-established` of a target with a connection to an echo peer.
    Tcp,
}

impl Mode {
    fn cmd(self, pid: i32, img: &Path) -> CrCmd {
        match self {
            Mode::LeaveRunning => CrCmd::dump(pid, img).arg("-R"),
            Mode::Kill => CrCmd::dump(pid, img),
            Mode::PreDump => CrCmd::pre_dump(pid, img).arg("--track-mem"),
            Mode::Tcp => CrCmd::dump(pid, img).args(&["-R", "--tcp-established"]),
        }
    }
}

/// The network namespace of the TCP trials, so that what cr leaves on `lo` is its own and no
/// other test's; removed on drop.
struct Netns(String);

impl Netns {
    fn create() -> Netns {
        let name = format!("crks{}", std::process::id());
        let run = |a: &[&str]| {
            let st = std::process::Command::new("ip").args(a).status().unwrap();
            assert!(st.success(), "ip {a:?}");
        };
        run(&["netns", "add", &name]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// What of cr's network lock is left on `lo`: clsact qdisc, tc filters.
    fn leftovers(&self) -> Vec<String> {
        let tc = |a: &[&str]| {
            let o = std::process::Command::new("tc")
                .args(["-n", &self.0])
                .args(a)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let mut out = Vec::new();
        if tc(&["qdisc", "show", "dev", "lo"]).contains("clsact") {
            out.push("clsact qdisc on lo".to_string());
        }
        for dir in ["ingress", "egress"] {
            let n = tc(&["filter", "show", "dev", "lo", dir])
                .matches("cr_netlock")
                .count();
            if n > 0 {
                out.push(format!("{n} cr_netlock filter(s) on lo {dir}"));
            }
        }
        // This thread is in the namespace: TCX links are not tc filters, ask the kernel.
        match cr::bpf::netlock::attached_on("lo") {
            Ok(0) => {}
            Ok(n) => out.push(format!("{n} cr_netlock TCX program(s) on lo")),
            Err(e) => out.push(format!("TCX query of lo: {e:#}")),
        }
        out
    }

    /// Removes what a trial left on `lo` (so that the next trial's count is its own).
    fn clean(&self) {
        let _ = std::process::Command::new("tc")
            .args(["-n", &self.0, "qdisc", "del", "dev", "lo", "clsact"])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// An echo peer in the current network namespace: every connection gets back what it sends.
fn echo_peer() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Pins of a network lock of `pid` in bpffs.
fn lock_pins(pid: i32) -> Vec<String> {
    let prefix = format!("netlock-{pid}-");
    std::fs::read_dir("/sys/fs/bpf/cr")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn start(mode: Mode, d: &TempDir, peer: Option<&str>) -> Workload {
    let threads = if mode == Mode::LeaveRunning { "4" } else { "2" };
    match peer {
        Some(a) => Workload::start("wl_steady", &[threads, MIB, "tcp", a], d),
        None => Workload::start("wl_steady", &[threads, MIB], d),
    }
}

/// How long one whole run of the mode's command takes: the faster of two (the first run of a
/// test binary pays for cold caches).
fn time_one(mode: Mode, peer: Option<&str>) -> Duration {
    (0..2)
        .map(|_| {
            let d = TempDir::new("kill-time");
            let mut w = start(mode, &d, peer);
            let t = Instant::now();
            mode.cmd(w.pid, &d.join("img")).ok();
            let took = t.elapsed();
            if mode == Mode::Kill {
                w.reap_killed();
            }
            took
        })
        .min()
        .unwrap()
}

/// One trial: cr killed `delay` after its start; returns what became of the target (and of
/// the lock, the tracker), "ok …" when nothing was harmed.
fn trial(mode: Mode, delay: Duration, peer: Option<&str>, ns: Option<&Netns>) -> String {
    let d = TempDir::new("kill");
    let mut w = start(mode, &d, peer);
    let img = d.join("img");
    let mut cr = mode
        .cmd(w.pid, &img)
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(cr.id() as i32, libc::SIGKILL) };
    let st = cr.wait().unwrap();
    let finished = st.success();
    let mut harm = Vec::new();
    let image = img.join("inventory.img").exists();
    if mode == Mode::PreDump {
        // The next pre-dump must work and find no second tracker beside it.
        let next = CrCmd::pre_dump(w.pid, d.join("p2"))
            .arg("--track-mem")
            .run();
        if !next.status.success() {
            let err = String::from_utf8_lossy(&next.stderr);
            harm.push(format!(
                "the next pre-dump failed: {}",
                err.lines().last().unwrap_or("").trim()
            ));
        }
        let t = procfs::trackers(w.pid);
        if t.len() > 1 {
            harm.push(format!("{} trackers of the target", t.len()));
        }
    }
    if let Some(ns) = ns {
        harm.extend(ns.leftovers());
        ns.clean();
    }
    let pins = lock_pins(w.pid);
    if !pins.is_empty() {
        harm.push(format!("{} lock pin dir(s) left", pins.len()));
        for p in pins {
            let dir = Path::new("/sys/fs/bpf/cr").join(p);
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
    // Whether cr was killed inside a task's remote calls: the one window in which its death
    // can still cost the target (docs/architecture.md, "Kill safety").
    let log = std::fs::read_to_string(img.join("dump.log")).unwrap_or_default();
    let in_window = log.rfind("remote calls begin") > log.rfind("remote calls end");
    let alive = procfs::running(w.pid);
    let verdict = if alive {
        let (st, res) = w.verify();
        if res.starts_with("PASS") && st == 0 {
            "ran on".to_string()
        } else {
            harm.push(format!("target harmed: {} (status {st})", res.trim()));
            String::new()
        }
    } else {
        let c = w.child.take().unwrap();
        let st = {
            use std::os::unix::process::ExitStatusExt;
            let mut c = c;
            c.wait().unwrap().signal().unwrap_or(0)
        };
        if mode == Mode::Kill && image {
            restore_cmd(&d).ok();
            let (rst, res) = w.verify();
            if res.starts_with("PASS") && rst == 0 {
                "restored".to_string()
            } else {
                harm.push(format!("restored target: {} (status {rst})", res.trim()));
                String::new()
            }
        } else if mode == Mode::Kill {
            harm.push(format!("target lost with no image (signal {st})"));
            String::new()
        } else {
            harm.push(format!("target died (signal {st})"));
            String::new()
        }
    };
    if in_window && !harm.is_empty() {
        return format!("in the remote-call window: {}", harm.join("; "));
    }
    if harm.is_empty() {
        format!(
            "ok: {verdict}{}",
            if finished { " (cr had finished)" } else { "" }
        )
    } else {
        harm.join("; ")
    }
}

fn run(mode: Mode) {
    cr_tests::require_root();
    become_subreaper();
    let ns = (mode == Mode::Tcp).then(|| {
        let ns = Netns::create();
        enter_netns(&ns.0);
        ns
    });
    let peer = ns.as_ref().map(|_| echo_peer());
    let whole = time_one(mode, peer.as_deref());
    eprintln!("{mode:?}: one whole run takes {whole:?}");
    let mut outcomes: BTreeMap<String, Vec<u128>> = BTreeMap::new();
    for k in 0..TRIALS {
        let delay = whole.mul_f64((k as f64 + 0.5) / TRIALS as f64);
        let o = trial(mode, delay, peer.as_deref(), ns.as_ref());
        eprintln!("{mode:?} kill at {delay:?}: {o}");
        outcomes.entry(o).or_default().push(delay.as_millis());
    }
    eprintln!("== {mode:?}: {TRIALS} kills over {whole:?} ==");
    for (o, delays) in &outcomes {
        eprintln!("{:3}  {o}  (at ms {delays:?})", delays.len());
    }
    let bad: Vec<&String> = outcomes
        .keys()
        .filter(|o| !o.starts_with("ok") && !o.starts_with("in the remote-call window: target"))
        .collect();
    assert!(bad.is_empty(), "{mode:?}: harmful outcomes: {bad:?}");
    // Harm inside the window is counted, not failed: how often kills land in it depends on
    // the machine's load (docs/architecture.md gives its length).
}

#[test]
fn sigkill_of_dump_leave_running() {
    run(Mode::LeaveRunning);
}

#[test]
fn sigkill_of_dump() {
    run(Mode::Kill);
}

#[test]
fn sigkill_of_pre_dump() {
    run(Mode::PreDump);
}

#[test]
fn sigkill_of_dump_tcp_established() {
    run(Mode::Tcp);
}
