//! `cr check`: probes the running kernel for everything cr relies on, like `criu check`, and
//! prints one line per feature: its name, ok/MISSING, and what depends on it.
//!
//! Every probe really uses its feature ([`probes`]); none just looks at a version number or a
//! config file. Each runs on its own thread with a deadline, so a feature that hangs (say a
//! write to a write-protected page that nothing resolves) is reported MISSING instead of
//! hanging `cr check`, and each cleans up after itself even when it fails.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::CheckOpts;
use crate::kernel::probe::features as probes;

/// How long one probe may take.
const PROBE_DEADLINE: Duration = Duration::from_secs(20);

/// One feature and its probe.
struct Feature {
    name: &'static str,
    needed_by: &'static str,
    /// Counted in the exit status (dump/restore need it), as opposed to optional.
    required: bool,
    /// Probed only with --all.
    only_all: bool,
    probe: fn() -> Result<String>,
}

const FEATURES: &[Feature] = &[
    Feature {
        name: "ptrace seize/interrupt",
        needed_by: "dump, restore: stopping and driving tasks",
        required: true,
        only_all: false,
        probe: probes::ptrace_seize,
    },
    Feature {
        name: "process_vm_readv",
        needed_by: "dump: copying memory",
        required: true,
        only_all: false,
        probe: probes::process_vm_readv,
    },
    Feature {
        name: "pidfd_open + pidfd_getfd",
        needed_by: "dump: sockets, userfaultfd of the target",
        required: true,
        only_all: false,
        probe: probes::pidfd_getfd_probe,
    },
    Feature {
        name: "clone3 set_tid",
        needed_by: "restore: tasks at their PIDs",
        required: true,
        only_all: false,
        probe: probes::clone3_set_tid,
    },
    Feature {
        name: "prctl PR_SET_MM_MAP",
        needed_by: "restore: mm fields (brk, args, env)",
        required: true,
        only_all: false,
        probe: probes::prctl_mm_map,
    },
    Feature {
        name: "userfaultfd WP_ASYNC+WP_UNPOPULATED",
        needed_by: "pre-dump, incremental dump: write tracking",
        required: true,
        only_all: false,
        probe: probes::userfaultfd_wp_async,
    },
    Feature {
        name: "PAGEMAP_SCAN",
        needed_by: "dump: present pages; exact dirty scan",
        required: true,
        only_all: false,
        probe: probes::pagemap_scan_probe,
    },
    Feature {
        name: "tracepoints exceptions:page_fault_*",
        needed_by: "pre-dump, incremental dump: eBPF dirty set",
        required: true,
        only_all: false,
        probe: crate::bpf::probe::tracepoints,
    },
    Feature {
        name: "TCP_REPAIR",
        needed_by: "dump, restore --tcp-established",
        required: true,
        only_all: false,
        probe: probes::tcp_repair,
    },
    Feature {
        name: "tc BPF (clsact on lo)",
        needed_by: "--tcp-established: network lock",
        required: true,
        only_all: false,
        probe: crate::bpf::probe::tc_bpf,
    },
    Feature {
        name: "bpffs",
        needed_by: "--tcp-established: pinned network lock",
        required: true,
        only_all: false,
        probe: crate::bpf::probe::bpffs,
    },
    Feature {
        name: "nftables",
        needed_by: "optional: not used by cr (CRIU's network lock)",
        required: false,
        only_all: true,
        probe: probes::nftables,
    },
];

/// Outcome of one probe.
struct Outcome {
    feature: &'static Feature,
    result: Result<String, String>,
}

/// Runs `probe` on its own thread; gives up after `deadline` (the thread is left to finish or
/// die with the process; its children die with it through PR_SET_PDEATHSIG).
fn run_with_deadline(probe: fn() -> Result<String>, deadline: Duration) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("cr-check-probe".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(probe);
            let _ = tx.send(match r {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(_) => Err("the probe panicked".to_string()),
            });
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start the probe thread: {e}"));
    }
    match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("no answer within {deadline:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("the probe thread died".to_string()),
    }
}

/// Formats the table. Pure, so its shape is unit-tested.
fn render(outcomes: &[Outcome]) -> String {
    let w = outcomes
        .iter()
        .map(|o| o.feature.name.len())
        .max()
        .unwrap_or(0)
        .max("FEATURE".len());
    let mut s = format!("{:<w$}  {:<7}  {}\n", "FEATURE", "STATUS", "NEEDED BY");
    for o in outcomes {
        let status = if o.result.is_ok() { "ok" } else { "MISSING" };
        s.push_str(&format!(
            "{:<w$}  {:<7}  {}\n",
            o.feature.name, status, o.feature.needed_by
        ));
        if let Err(why) = &o.result {
            s.push_str(&format!("{:<w$}  {:<7}  why: {why}\n", "", ""));
        }
    }
    s.push('\n');
    let missing: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_err() && o.feature.required)
        .map(|o| o.feature.name)
        .collect();
    let optional: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_err() && !o.feature.required)
        .map(|o| o.feature.name)
        .collect();
    if missing.is_empty() {
        s.push_str("Looks good.");
        if !optional.is_empty() {
            s.push_str(&format!(" (optional, missing: {})", optional.join(", ")));
        }
    } else {
        s.push_str(&format!("missing: {}", missing.join(", ")));
    }
    s.push('\n');
    s
}

/// `cr check [--all]`. Prints the table on stdout; returns true when everything dump and
/// restore need is there.
pub fn run(opts: &CheckOpts) -> Result<bool> {
    let mut outcomes = Vec::new();
    for f in FEATURES.iter().filter(|f| opts.all || !f.only_all) {
        let t = Instant::now();
        let result = run_with_deadline(f.probe, PROBE_DEADLINE);
        match &result {
            Ok(note) => log::debug!("check {}: ok in {:?}: {note}", f.name, t.elapsed()),
            Err(why) => log::debug!("check {}: MISSING after {:?}: {why}", f.name, t.elapsed()),
        }
        outcomes.push(Outcome { feature: f, result });
    }
    print!("{}", render(&outcomes));
    Ok(outcomes
        .iter()
        .all(|o| o.result.is_ok() || !o.feature.required))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<String> {
        Ok("fine".into())
    }

    #[test]
    fn renders_an_aligned_table_and_the_verdict() {
        let a = Feature {
            name: "short",
            needed_by: "dump",
            required: true,
            only_all: false,
            probe: ok,
        };
        let b = Feature {
            name: "a longer name",
            needed_by: "restore",
            required: true,
            only_all: false,
            probe: ok,
        };
        let c = Feature {
            name: "opt",
            needed_by: "nothing",
            required: false,
            only_all: true,
            probe: ok,
        };
        // Outcome holds &'static Feature (the real ones are consts); leak these test ones.
        let (a, b, c): (&'static Feature, &'static Feature, &'static Feature) = (
            Box::leak(Box::new(a)),
            Box::leak(Box::new(b)),
            Box::leak(Box::new(c)),
        );
        let good = render(&[
            Outcome {
                feature: a,
                result: Ok("x".into()),
            },
            Outcome {
                feature: b,
                result: Ok("y".into()),
            },
        ]);
        assert_eq!(
            good,
            "FEATURE        STATUS   NEEDED BY\n\
             short          ok       dump\n\
             a longer name  ok       restore\n\
             \n\
             Looks good.\n"
        );
        let bad = render(&[
            Outcome {
                feature: a,
                result: Err("no luck".into()),
            },
            Outcome {
                feature: b,
                result: Ok("y".into()),
            },
            Outcome {
                feature: c,
                result: Err("absent".into()),
            },
        ]);
        assert!(bad.contains("short          MISSING  dump\n"), "{bad}");
        assert!(
            bad.contains("                        why: no luck\n"),
            "{bad}"
        );
        assert!(bad.ends_with("missing: short\n"), "{bad}");
        let opt = render(&[Outcome {
            feature: c,
            result: Err("absent".into()),
        }]);
        assert!(
            opt.ends_with("Looks good. (optional, missing: opt)\n"),
            "{opt}"
        );
    }

    #[test]
    fn a_hanging_probe_is_cut_off() {
        fn hangs() -> Result<String> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(String::new())
        }
        let r = run_with_deadline(hangs, Duration::from_millis(50));
        assert!(r.unwrap_err().contains("no answer"));
    }
}
