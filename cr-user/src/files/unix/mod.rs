//! UNIX sockets: stream, datagram and seqpacket; socketpairs, names (path, a path since
//! unlinked, abstract, none), listeners and the connections waiting in them, receive queues
//! with message boundaries and the senders' addresses and credentials, shutdown states and
//! options.
//!
//! Dump ([`dump`]): the tree's sockets are seen once through sock_diag ([`View`]: names,
//! peers, waiting connections, queue lengths); each queue is read with MSG_PEEK at a moving
//! SO_PEEK_OFF from cr's copy (nothing consumed, both options put back). A peer outside the
//! tree and files in flight (SCM_RIGHTS) are refused, each named.
//!
//! Restore ([`restore`]): every UNIX socket of the tree is made at once, before any process
//! is rebuilt, inside the processes that hold it (still clean copies of cr): socketpair,
//! listen and connect there, so SO_PEERCRED names the right process; cr keeps a copy of each,
//! fills the queues from the peers' side, sets shutdown states and options, and `open` hands
//! the copy to the task.

mod dump;
mod restore;

use anyhow::{Context, Result};
use std::os::fd::AsRawFd;

use super::kind::{FileKind, Verdict};
use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

pub use dump::View;
pub(super) use restore::Built;

/// sk_state values sock_diag reports for UNIX sockets.
pub(super) const TCP_ESTABLISHED: u32 = 1;
pub(super) const TCP_LISTEN: u32 = 10;

pub struct UnixSocket;

impl FileKind for UnixSocket {
    fn name(&self) -> &'static str {
        "a UNIX socket"
    }

    fn recognise(&self, p: &Probe, cx: &DumpCx) -> Result<Option<Verdict>> {
        match p.sock_type() {
            Some(st) if st.domain == libc::AF_UNIX => dump::recognise(p, cx).map(Some),
            _ => Ok(None),
        }
    }

    fn dump(&self, p: &Probe, _id: u32, cx: &mut DumpCx) -> Result<Kind> {
        Ok(Kind::Unix(dump::dump(p, cx).with_context(|| {
            format!("fd {} ({}) of PID {}", p.fd, p.target, p.pid)
        })?))
    }

    fn owns(&self, k: &Kind) -> bool {
        matches!(k, Kind::Unix(_))
    }

    fn identity(&self, k: &Kind) -> Option<String> {
        match k {
            Kind::Unix(u) => Some(format!("unix:{}", u.inode)),
            _ => None,
        }
    }

    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64> {
        let mine = o
            .tree()
            .get::<Built>()
            .socks
            .get(&f.id)
            .map(|s| s.as_raw_fd())
            .with_context(|| {
                format!(
                    "internal: UNIX socket (file {}) for fd {fd_no} was not built",
                    f.id
                )
            })?;
        let t = o.install_from_cr(mine, &format!("UNIX socket (file {}) for fd {fd_no}", f.id))?;
        o.setfl(t, flags)?;
        Ok(t)
    }
}

/// A name for messages: "path /x", "abstract @x", "no name".
pub(super) fn show_name(n: &[u8]) -> String {
    match n.first() {
        None => "no name".into(),
        Some(0) => format!("abstract name @{}", String::from_utf8_lossy(&n[1..])),
        Some(_) => format!("path {}", String::from_utf8_lossy(n)),
    }
}

/// SOCK_* for messages.
pub(super) fn type_name(ty: u32) -> &'static str {
    match ty as i32 {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown-type",
    }
}
