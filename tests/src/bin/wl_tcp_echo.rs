//! Echo workload of cr-bench's tcp section (tests/src/bin/cr-bench/tcp.rs).
//!
//! `wl_tcp_echo ADDR N`: opens N connections to a peer outside the dumped tree and sends back
//! every byte it receives on each, unchanged, until the check signal. The peer owns the
//! measurement (it timestamps and numbers its messages and checks the echoes); this side only
//! has to keep echoing across dump and restore. Any reset, end of stream or socket error is a
//! FAIL.
//!
//! Single-threaded around poll(2): no epoll (cr does not dump epoll instances yet). The poll
//! has a timeout so that a check signal landing between the flag test and the poll is seen; a
//! poll interrupted by the dump returns EINTR after restore (its restart block is not
//! restored), which the loop simply retries.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use cr_tests::workload::{check_requested, install_check_flag, ready, Checker};

/// One connection and the bytes received on it not yet sent back.
struct Conn {
    s: TcpStream,
    pending: Vec<u8>,
}

impl Conn {
    /// Reads what is there into `pending`; Err on end of stream or a socket error.
    fn read_in(&mut self, buf: &mut [u8]) -> Result<(), String> {
        loop {
            match self.s.read(buf) {
                Ok(0) => return Err("the peer closed the connection".into()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Sends back as much of `pending` as the socket takes.
    fn write_out(&mut self) -> Result<(), String> {
        while !self.pending.is_empty() {
            match self.s.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }
}

fn echo(conns: &mut [Conn]) -> Result<(), String> {
    let mut buf = vec![0u8; 64 << 10];
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.s.as_raw_fd(),
            events: 0,
            revents: 0,
        })
        .collect();
    while !check_requested() {
        for (p, c) in fds.iter_mut().zip(conns.iter()) {
            p.events = libc::POLLIN
                | if c.pending.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                };
            p.revents = 0;
        }
        // SAFETY: fds is a valid array of fds.len() pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for (i, (p, c)) in fds.iter().zip(conns.iter_mut()).enumerate() {
            if p.revents == 0 {
                continue;
            }
            c.read_in(&mut buf)
                .map_err(|e| format!("connection {i}: {e}"))?;
            c.write_out().map_err(|e| format!("connection {i}: {e}"))?;
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: wl_tcp_echo ADDR N");
        std::process::exit(2)
    };
    install_check_flag();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = TcpStream::connect(addr.as_str())
            .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
        s.set_nodelay(true).expect("TCP_NODELAY");
        s.set_nonblocking(true).expect("O_NONBLOCK");
        conns.push(Conn {
            s,
            pending: Vec::new(),
        });
    }
    ready(&format!("conns={n}"));
    let mut c = Checker::new();
    if let Err(e) = echo(&mut conns) {
        c.check(false, e);
    }
    c.report()
}
