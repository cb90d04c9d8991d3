//! memfds and mappings of unlinked files across dump and restore (issue 11;
//! tests/src/bin/wl_memfd.rs checks its own view): names, sizes, contents, seals, holes,
//! shared and private mappings that still follow their file.

use std::collections::BTreeSet;

use cr_tests::{
    dump_and_restore, dump_leave_running, pre_dump_then_dump_and_restore, TempDir, Workload,
};

fn start(d: &TempDir) -> Workload {
    std::fs::create_dir(d.join("m")).unwrap();
    Workload::start("wl_memfd", &[&d.s("m")], d)
}

/// What DIR/m holds: the unlinked files must not come back, nor leave a temporary link.
fn names(d: &TempDir) -> BTreeSet<String> {
    std::fs::read_dir(d.join("m"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn memfd_control() {
    let d = TempDir::new("memfd-control");
    let mut w = start(&d);
    assert!(names(&d).is_empty(), "left in DIR/m: {:?}", names(&d));
    w.assert_pass();
}

#[test]
fn memfd_restore() {
    let d = TempDir::new("memfd");
    let mut w = start(&d);
    dump_and_restore(&mut w, &d, &[], &[]);
    assert!(
        names(&d).is_empty(),
        "the restore left in DIR/m: {:?}",
        names(&d)
    );
    w.assert_pass();
}

#[test]
fn memfd_leave_running() {
    let d = TempDir::new("memfd-R");
    let mut w = start(&d);
    dump_leave_running(&w, &d, &[]);
    assert!(
        names(&d).is_empty(),
        "dump -R left in DIR/m: {:?}",
        names(&d)
    );
    w.assert_pass();
}

#[test]
fn memfd_pre_dump_then_track_mem_dump() {
    let d = TempDir::new("memfd-inc");
    let mut w = start(&d);
    pre_dump_then_dump_and_restore(&mut w, &d, &[], &[], &[], || {});
    assert!(
        names(&d).is_empty(),
        "the restore left in DIR/m: {:?}",
        names(&d)
    );
    w.assert_pass();
}
