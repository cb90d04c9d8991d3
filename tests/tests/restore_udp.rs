//! UDP and UDP-Lite sockets over IPv4 and IPv6 across dump and restore (issue 11;
//! tests/src/bin/wl_udp.rs checks its own view): bound and connected sockets, their options,
//! and queued datagrams with their senders, among them datagrams from outside the tree (the
//! harness's peers below), which the restored server answers at their source address.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cr_tests::{
    dump_and_restore, dump_leave_running, pre_dump_then_dump_and_restore, TempDir, Workload,
};

/// A UDP socket outside the tree: answers "hello" with three datagrams `ext-0..2`, then
/// collects the `ack-N` answers sent to it.
struct UdpPeer {
    addr: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<String>>,
}

impl UdpPeer {
    fn start(bind: &str) -> UdpPeer {
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = s.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut acks = Vec::new();
            let mut b = [0u8; 100];
            while !st.load(Ordering::SeqCst) && acks.len() < 3 {
                let Ok((n, from)) = s.recv_from(&mut b) else {
                    continue;
                };
                let m = String::from_utf8_lossy(&b[..n]).into_owned();
                if m == "hello" {
                    for i in 0..3 {
                        s.send_to(format!("ext-{i}").as_bytes(), from).unwrap();
                    }
                } else {
                    acks.push(m);
                }
            }
            acks
        });
        UdpPeer { addr, stop, handle }
    }

    /// Stops it (once the workload has checked itself) and asserts every answer came.
    fn assert_answered(self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.handle.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::SeqCst);
        let acks = self.handle.join().unwrap();
        assert_eq!(
            acks,
            ["ack-0", "ack-1", "ack-2"],
            "answers to the peer at {}",
            self.addr
        );
    }
}

fn peers() -> (UdpPeer, UdpPeer) {
    (UdpPeer::start("127.0.0.1:0"), UdpPeer::start("[::1]:0"))
}

#[test]
fn udp_control() {
    let d = TempDir::new("udp-control");
    let (p4, p6) = peers();
    let mut w = Workload::start("wl_udp", &[&p4.addr, &p6.addr], &d);
    w.assert_pass();
    p4.assert_answered();
    p6.assert_answered();
}

#[test]
#[ignore = "needs issue 11 implementation"]
fn udp_restore() {
    let d = TempDir::new("udp");
    let (p4, p6) = peers();
    let mut w = Workload::start("wl_udp", &[&p4.addr, &p6.addr], &d);
    dump_and_restore(&mut w, &d, &[], &[]);
    w.assert_pass();
    p4.assert_answered();
    p6.assert_answered();
}

#[test]
#[ignore = "needs issue 11 implementation"]
fn udp_leave_running() {
    let d = TempDir::new("udp-R");
    let (p4, p6) = peers();
    let mut w = Workload::start("wl_udp", &[&p4.addr, &p6.addr], &d);
    dump_leave_running(&w, &d, &[]);
    w.assert_pass();
    p4.assert_answered();
    p6.assert_answered();
}

#[test]
#[ignore = "needs issue 11 implementation"]
fn udp_pre_dump_then_track_mem_dump() {
    let d = TempDir::new("udp-inc");
    let mut w = Workload::start("wl_udp", &[], &d);
    pre_dump_then_dump_and_restore(&mut w, &d, &[], &[], &[], || {});
    w.assert_pass();
}
