//! Dump and restore of a single process's memory: every kind of mapping survives, and the
//! restored /proc/PID/maps equals the dumped one (checked by the workload itself).

use cr_tests::{dump_and_restore, TempDir, Workload};

/// The workload passes its own checks when nothing happens to it (so a PASS after restore means
/// the restore preserved its state, not that the checks are blind).
#[test]
fn memory_workload_passes_undisturbed() {
    let d = TempDir::new("mem-control");
    let mut w = Workload::start("wl_memory", &[&d.s("")], &d);
    w.assert_pass();
}

#[test]
fn memory_survives_dump_and_restore() {
    let d = TempDir::new("mem");
    let mut w = Workload::start("wl_memory", &[&d.s("")], &d);
    dump_and_restore(&mut w, &d, &[], &[]);
    w.assert_pass();
}
