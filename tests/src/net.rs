//! Network helpers of the TCP tests: a peer outside the dumped tree that keeps a connection
//! busy through the checkpoint, a pair of network namespaces joined by a veth, and what cr's
//! network lock leaves behind (pins) or reports (how long the connections were locked).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A peer outside the dumped tree: accepts one connection and exchanges the counting streams
/// of `wl_tcp stream` (byte i is i % 251, both ways) until told to stop or the workload closes.
pub struct Peer {
    /// The address it listens on (ADDR:PORT), for the workload to connect to.
    pub addr: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<(u64, u64), String>>,
}

impl Peer {
    /// Listens on `bind` (e.g. `127.0.0.1:0`) and serves the one connection in a thread.
    pub fn start(bind: &str) -> Peer {
        let l = std::net::TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
            s.set_nonblocking(true).unwrap();
            let (mut sent, mut recvd) = (0u64, 0u64);
            let mut buf = [0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                let chunk: Vec<u8> = (sent..sent + 4096).map(|i| (i % 251) as u8).collect();
                match s.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("peer write after {sent} bytes: {e}")),
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        // The workload is done (orderly FIN): close our side too.
                        let _ = s.shutdown(std::net::Shutdown::Write);
                        return Ok((sent, recvd));
                    }
                    Ok(n) => {
                        for (k, &b) in buf[..n].iter().enumerate() {
                            let i = recvd + k as u64;
                            if b != (i % 251) as u8 {
                                return Err(format!("peer: byte {i} is {b}"));
                            }
                        }
                        recvd += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("peer read after {recvd} bytes: {e}")),
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok((sent, recvd))
        });
        Peer { addr, stop, handle }
    }

    /// Stops it; returns (bytes sent, bytes received), or panics with what went wrong (a
    /// reset, a byte out of sequence).
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Two network namespaces joined by a veth pair (10.213.0.1 in `a`, 10.213.0.2 in `b`),
/// removed when dropped: a connection between them crosses a real interface, not lo.
pub struct NetPair {
    pub a: String,
    pub b: String,
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

impl NetPair {
    /// Creates both namespaces and the veth pair between them (`ip`, as root).
    pub fn create() -> NetPair {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("cra{id}"), format!("crb{id}"));
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let pair = NetPair {
            a: a.clone(),
            b: b.clone(),
        };
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        for (ns, dev, addr) in [(&a, &va, "10.213.0.1/24"), (&b, &vb, "10.213.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// Moves the calling thread (and the threads and processes it starts) into netns `name`.
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: setns on a valid namespace fd; affects this thread only.
    assert_eq!(
        unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// Asserts that no pin of a network lock taken for `pid` is left in bpffs (a lock left behind
/// would keep the connections' packets dropped).
pub fn assert_no_lock_left(pid: i32) {
    let prefix = format!("netlock-{pid}-");
    let left: Vec<String> = std::fs::read_dir("/sys/fs/bpf/cr")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "network lock pins left: {left:?}");
}

/// How long the connections were locked, in ms, from the line the restore logs when it removes
/// the network lock (`network lock … removed: the connections were locked for X ms`): from the
/// lock taken by the dump to the lock removed by the restore, as cr measured it.
pub fn locked_ms(restore_log: &str) -> Option<f64> {
    const SAYS: &str = "the connections were locked for ";
    restore_log.lines().find_map(|l| {
        l.split_once(SAYS)?
            .1
            .strip_suffix(" ms")?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::locked_ms;

    #[test]
    fn locked_ms_reads_the_restore_log_line() {
        let log = "(  0.001234) info: restoring 2 sockets\n\
                   (  0.012345) info: network lock /sys/fs/bpf/cr/netlock-42-1 removed: the connections were locked for 123.456 ms\n";
        assert_eq!(locked_ms(log), Some(123.456));
        assert_eq!(
            locked_ms("(  0.1) info: network lock /sys/fs/bpf/cr/netlock-42-1 removed\n"),
            None
        );
    }
}
