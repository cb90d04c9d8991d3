//! The tracker's eBPF TCP socket table (cr-ebpf/src/sock.rs) against a sock_diag scan of the
//! same tree (cr::tcp::inventory): a tree (tests/src/bin/wl_sockets.rs) opens listeners (IPv4
//! and IPv6, wildcard and loopback), connects, accepts, leaves connections waiting, closes and
//! half-closes, forks, with a tracker started before or after some of it; at each settled
//! point the table and the scan must hold the same sockets in the same states.
//!
//! And a dump of an established connection with a tracker running takes its inventory from the
//! table (the log says so) and restores a workload that checks itself.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use cr::bpf::maps::TrackMaps;
use cr::bpf::sockets::TableStats;
use cr::tcp::inventory::{self, Inventory};
use cr::tracker::client::TrackerConn;
use cr_tests::{dump_and_restore, dump_cmd, dump_leave_running, CrCmd, TempDir, Workload};

/// The harness's ends of wl_sockets's command and answer FIFOs.
struct Driver {
    cmd: File,
    ack: BufReader<File>,
}

fn mkfifo(path: &str) {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {path}"
    );
}

/// Starts wl_sockets (`late`: no socket before READY).
fn start(d: &TempDir, late: bool) -> (Workload, Driver) {
    let (cmd, ack) = (d.s("cmd.fifo"), d.s("ack.fifo"));
    mkfifo(&cmd);
    mkfifo(&ack);
    let mut args = vec![cmd.as_str(), ack.as_str()];
    if late {
        args.push("late");
    }
    let w = Workload::start("wl_sockets", &args, d);
    // The workload holds both FIFOs open read-write: neither open blocks.
    let drv = Driver {
        cmd: std::fs::OpenOptions::new().write(true).open(&cmd).unwrap(),
        ack: BufReader::new(File::open(&ack).unwrap()),
    };
    (w, drv)
}

impl Driver {
    /// Sends a command; returns what followed `ok`.
    fn send(&mut self, c: &str) -> String {
        writeln!(self.cmd, "{c}").unwrap();
        let mut line = String::new();
        self.ack.read_line(&mut line).unwrap();
        let line = line.trim();
        assert!(
            line.starts_with("ok"),
            "wl_sockets answered {line:?} to {c:?}"
        );
        line.trim_start_matches("ok").trim().to_string()
    }
}

/// The tracker's view of `pid`'s tree, and its counters.
fn table(pid: i32) -> (Inventory, TableStats) {
    let conn = TrackerConn::connect(pid)
        .unwrap()
        .expect("a tracker runs for the workload");
    let snap = conn.get().unwrap();
    // Hang up at once: the tracker serves one client at a time.
    drop(conn);
    let maps = TrackMaps::from_fds(snap.map_fds).unwrap();
    let st = maps.sockets.stats().unwrap();
    let inv = inventory::from_table(&maps.sockets, &[pid as u32])
        .unwrap_or_else(|e| panic!("the table is not usable: {e:#} ({st:?})"));
    (inv, st)
}

fn show(inv: &Inventory) -> String {
    inv.socks
        .iter()
        .map(|s| {
            format!(
                "  {} {} pid={} listener-child={} held={:?}\n",
                s.conn,
                inventory::state_name(s.state),
                s.pid,
                s.from_listener,
                s.held
            )
        })
        .collect()
}

/// The table and a scan of the tree agree. A connection the harness just made may still be
/// completing its handshake in the kernel: the two views get a second to converge (the
/// settled answer must be equal).
fn assert_same(pid: i32, what: &str) -> TableStats {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let (t, st) = table(pid);
        let s = inventory::scan(&inventory::tree_of(pid)).unwrap();
        let d = t.diff(&s);
        if d.is_empty() {
            eprintln!(
                "{what}: table and scan agree on {} sockets ({st:?})",
                t.socks.len()
            );
            assert_eq!(
                (st.lost, st.read_errors, st.untrackable),
                (0, 0, 0),
                "{what}: {st:?}"
            );
            return st;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: the table and the scan differ:\n{}\n--- table ({st:?}):\n{}--- scan:\n{}",
                d.join("\n"),
                show(&t),
                show(&s)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Phases b and c: new sockets and closes while the tracker runs; the harness connects twice
/// to the new listener (from outside the tree: the accepted side is the tree's).
fn phases_b_c(w: &Workload, drv: &mut Driver) -> (TcpListener, Vec<TcpStream>) {
    let outside = TcpListener::bind("127.0.0.1:0").unwrap();
    let reply = drv.send(&format!("b {}", outside.local_addr().unwrap()));
    let port: u16 = reply
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("phase b answered {reply:?}"));
    let clients: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    drv.send("c");
    assert!(
        inventory::tree_of(w.pid).len() >= 3,
        "the tree has its two children"
    );
    (outside, clients)
}

#[test]
fn control() {
    let d = TempDir::new("socktab-control");
    let (mut w, mut drv) = start(&d, false);
    let _keep = phases_b_c(&w, &mut drv);
    drv.send("end");
    w.assert_pass();
}

/// A tracker started (by `cr pre-dump`) when the tree already has sockets: they are in the
/// table by its seeding scan; what the tree does afterwards, by events.
#[test]
fn seeded_then_followed() {
    let d = TempDir::new("socktab-seeded");
    let (mut w, mut drv) = start(&d, false);
    CrCmd::pre_dump(w.pid, d.join("pre")).ok();
    let st = assert_same(w.pid, "seeded");
    assert_eq!(st.status, cr_common::sock::status::READY);
    let _keep = phases_b_c(&w, &mut drv);
    let st = assert_same(w.pid, "after phases b and c");
    assert!(
        st.children > 0,
        "no connection was attributed to a listener: {st:?}"
    );
    drv.send("end");
    w.assert_pass();
}

/// A tracker started (by `cr dump --track-mem -R`) before the tree has any socket: everything
/// is in the table by events.
#[test]
fn followed_from_the_start() {
    let d = TempDir::new("socktab-events");
    let (mut w, mut drv) = start(&d, true);
    dump_leave_running(&w, &d, &["--track-mem"]);
    assert_same(w.pid, "no sockets yet");
    drv.send("a");
    assert_same(w.pid, "after phase a");
    let _keep = phases_b_c(&w, &mut drv);
    let st = assert_same(w.pid, "after phases b and c");
    assert!(
        st.children > 0,
        "no connection was attributed to a listener: {st:?}"
    );
    drv.send("end");
    w.assert_pass();
}

/// `cr dump --tcp-established` with a tracker running takes the tree's sockets from the
/// table, and the restored connections work.
#[test]
fn dump_uses_the_table() {
    let d = TempDir::new("socktab-dump");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    CrCmd::pre_dump(w.pid, d.join("pre")).ok();
    dump_and_restore(&mut w, &d, &["--tcp-established"], &["--tcp-established"]);
    let log = std::fs::read_to_string(d.join("img/dump.log")).unwrap();
    assert!(
        log.contains("from the tracker's socket table"),
        "the dump did not use the table:\n{log}"
    );
    assert!(
        log.contains("established TCP connection(s) of the tree locked"),
        "the connections were not locked at the freeze:\n{log}"
    );
    w.assert_pass();
}

/// Without a tracker the dump scans, and says why.
#[test]
fn dump_without_tracker_scans() {
    let d = TempDir::new("socktab-scan");
    let mut w = Workload::start("wl_tcp", &["local"], &d);
    dump_leave_running(&w, &d, &["--tcp-established"]);
    let log = std::fs::read_to_string(d.join("img/dump.log")).unwrap();
    assert!(
        log.contains(&format!(
            "from a sock_diag scan (no tracker runs for PID {})",
            w.pid
        )),
        "the dump did not say it scanned and why:\n{log}"
    );
    w.assert_pass();
}

/// A dump without --tcp-established refuses, before touching the tree, naming every
/// established connection the tree holds; the connections waiting in its listeners are named
/// as lost in the log. The workload runs on untouched.
#[test]
fn refusal_names_connections_and_lost_ones() {
    let d = TempDir::new("socktab-refused");
    let (mut w, mut drv) = start(&d, false);
    CrCmd::pre_dump(w.pid, d.join("pre")).ok();
    let (t, _) = table(w.pid);
    let err = dump_cmd(&w, &d)
        .fails("the tree holds established connections and --tcp-established is not given");
    let log = std::fs::read_to_string(d.join("img/dump.log")).unwrap();
    assert!(
        log.contains("from the tracker's socket table"),
        "the dump did not use the table:\n{log}"
    );
    let fds = inventory::fd_view(&inventory::tree_of(w.pid)).unwrap();
    let held: Vec<_> = fds
        .iter()
        .filter(|f| f.state == cr_common::sock::tcp_state::ESTABLISHED)
        .collect();
    assert!(
        held.len() >= 4,
        "wl_sockets holds established connections: {held:?}"
    );
    for f in &held {
        assert!(
            err.contains(&f.conn.to_string()),
            "the refusal does not name {}: {err}",
            f.conn
        );
    }
    assert!(
        err.contains("--tcp-established"),
        "the refusal does not name the flag: {err}"
    );
    // The connections waiting in the tree's listeners (accepted by the kernel, not by the tree).
    let waiting: Vec<_> = t
        .socks
        .iter()
        .filter(|s| s.from_listener && !fds.iter().any(|f| f.conn == s.conn))
        .collect();
    assert!(
        waiting.len() >= 2,
        "wl_sockets leaves connections waiting: {waiting:?}"
    );
    for s in waiting {
        assert!(
            log.contains(&format!(
                "TCP connection {} waits in the accept queue of listener",
                s.conn
            )),
            "{} is not logged as lost:\n{log}",
            s.conn
        );
    }
    drv.send("end");
    w.assert_pass();
}
