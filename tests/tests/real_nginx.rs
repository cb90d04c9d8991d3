//! Debian's nginx through checkpoints (issue 11): a master (root) and two workers running
//! as www-data, a keep-alive HTTP connection held open through dump and restore with
//! `--tcp-established`, then served again, and new connections served; also `dump -R` (left
//! running, still serving) and pre-dump + `dump --track-mem`. The control runs do the same
//! without cr and must pass as they are.

use cr_tests::services::{file, uid_of, Http, Nginx};
use cr_tests::{require_root, TempDir};

const EST: &[&str] = &["--tcp-established"];

fn get_ok(h: &mut Http, n: &Nginx, page: &str) {
    let want = file(&n.html.join(page));
    match h.get(&format!("/{page}")) {
        Ok((200, body)) => assert!(body == want, "/{page}: {} bytes, not the file", body.len()),
        other => panic!("GET /{page}: {other:?}"),
    }
}

/// The tree as nginx made it: the master as root, two workers as www-data.
fn assert_tree(n: &mut Nginx) {
    assert_eq!(uid_of(n.svc.pid), Some(0), "the master's uid");
    let w = n.workers();
    assert_eq!(w.len(), 2, "workers: {w:?}");
    for p in w {
        assert_eq!(uid_of(p), Some(33), "worker {p}'s uid (www-data)");
    }
}

fn start(d: &TempDir) -> (Nginx, Http) {
    require_root();
    let mut n = Nginx::start(d);
    assert_tree(&mut n);
    let mut h = Http::connect(n.port);
    get_ok(&mut h, &n, "index.html");
    get_ok(&mut h, &n, "big.html");
    (n, h)
}

/// After a checkpoint: the held connection is served again, and new ones.
fn served(n: &mut Nginx, h: &mut Http) {
    get_ok(h, n, "index.html");
    get_ok(h, n, "big.html");
    for _ in 0..4 {
        let mut fresh = Http::connect(n.port);
        get_ok(&mut fresh, n, "index.html");
        get_ok(&mut fresh, n, "index.html");
    }
    assert_tree(n);
}

#[test]
fn nginx_control() {
    let d = TempDir::new("nginx-control");
    let (mut n, mut h) = start(&d);
    served(&mut n, &mut h);
}

#[test]
fn nginx_restore() {
    let d = TempDir::new("nginx");
    let (mut n, mut h) = start(&d);
    n.svc.dump_and_restore(&d, EST, EST);
    served(&mut n, &mut h);
}

#[test]
fn nginx_leave_running() {
    let d = TempDir::new("nginx-R");
    let (mut n, mut h) = start(&d);
    n.svc.dump_leave_running(&d, EST);
    served(&mut n, &mut h);
}

#[test]
fn nginx_pre_dump_then_track_mem_dump() {
    let d = TempDir::new("nginx-inc");
    let (mut n, mut h) = start(&d);
    let port = n.port;
    let html = n.html.clone();
    n.svc.pre_dump_then_dump_and_restore(&d, EST, EST, || {
        // Traffic between the two checkpoints (the workers' memory changes).
        let mut x = Http::connect(port);
        let want = file(&html.join("big.html"));
        for _ in 0..20 {
            assert_eq!(x.get("/big.html").map(|(_, b)| b == want), Ok(true));
        }
    });
    served(&mut n, &mut h);
}
