//! Network state: TCP sockets ([`tcp`]), the backlog of listeners ([`diag`]).
//!
//! A dump holds every established connection it saved in repair mode ([`DumpGuard`]) until
//! the dump ends: if the tree is killed, cr's copies are closed still in repair mode, so the
//! kernel sends neither FIN nor RST; on failure or with --leave-running, repair mode is left
//! and the connections run on.

pub mod diag;
pub mod tcp;

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use anyhow::{bail, Result};

use crate::image::pb;

/// State of the dump in progress (one per cr process).
struct DumpState {
    tcp_established: bool,
    /// cr's copies of the sockets put in repair mode, with a name for messages.
    held: Vec<(OwnedFd, String)>,
}

static DUMP: Mutex<Option<DumpState>> = Mutex::new(None);

/// Scope of one dump's network state: dropping it without [`DumpGuard::target_killed`] takes
/// every saved connection out of repair mode.
pub struct DumpGuard {
    killed: bool,
}

impl DumpGuard {
    pub fn begin(tcp_established: bool) -> DumpGuard {
        if let Ok(mut g) = DUMP.lock() {
            *g = Some(DumpState { tcp_established, held: Vec::new() });
        }
        DumpGuard { killed: false }
    }

    /// The tree is gone: close the connections silently (still in repair mode).
    pub fn target_killed(mut self) {
        self.killed = true;
    }

    /// Takes the connections out of repair mode now (before a --leave-running tree runs on).
    pub fn resume(&mut self) {
        let held = match DUMP.lock() {
            Ok(mut g) => g.as_mut().map(|s| std::mem::take(&mut s.held)).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for (fd, what) in held {
            if let Err(e) = tcp::set_repair(&fd, false) {
                log::warn!("{what}: leaving repair mode: {e:#}");
            }
        }
    }
}

impl Drop for DumpGuard {
    fn drop(&mut self) {
        if !self.killed {
            self.resume();
        }
        if let Ok(mut g) = DUMP.lock() {
            *g = None;
        }
    }
}

/// Why a socket fd cannot be dumped, or `None` when it can (called while surveying fds).
pub fn refusal(fd: &OwnedFd) -> Result<Option<String>> {
    let allowed = DUMP.lock().ok().and_then(|g| g.as_ref().map(|s| s.tcp_established)).unwrap_or(false);
    Ok(match tcp::classify(fd)? {
        tcp::SockKind::Listen => None,
        tcp::SockKind::Established if allowed => None,
        tcp::SockKind::Established => Some("an established TCP connection; dump it with --tcp-established".into()),
        tcp::SockKind::Other(what) => Some(what),
    })
}

/// Saves the socket `fd` (cr's copy of fd `target_fd` of the target, inode `inode`).
pub fn dump_socket(fd: OwnedFd, inode: u64) -> Result<pb::TcpSocket> {
    let kind = tcp::classify(&fd)?;
    let mut s = tcp::describe(&fd, inode, &kind)?;
    match kind {
        tcp::SockKind::Listen => tcp::save_listen(&fd, &mut s)?,
        tcp::SockKind::Established => {
            let what = format!(
                "TCP connection {} -> {}",
                tcp::show_addr(s.family, &s.src_addr, s.src_port),
                tcp::show_addr(s.family, &s.dst_addr, s.dst_port)
            );
            tcp::set_repair(&fd, true)?;
            let mut g = match DUMP.lock() {
                Ok(g) => g,
                Err(_) => bail!("internal: the dump's network state is poisoned"),
            };
            let Some(state) = g.as_mut() else {
                tcp::set_repair(&fd, false)?;
                bail!("internal: a TCP connection dumped outside a dump");
            };
            let r = tcp::save_established(&fd, &mut s);
            state.held.push((fd, what.clone()));
            r.map_err(|e| e.context(what))?;
        }
        tcp::SockKind::Other(what) => bail!("{what} cannot be dumped"),
    }
    Ok(s)
}

/// Refuses to restore established connections without --tcp-established.
pub fn check_restore(files: &pb::Files, tcp_established: bool) -> Result<()> {
    if tcp_established {
        return Ok(());
    }
    for f in &files.files {
        if let Some(pb::file_entry::Kind::Tcp(t)) = &f.kind {
            if t.state == tcp::TCP_ESTABLISHED {
                bail!(
                    "the image holds the established TCP connection {} -> {}: restore it with --tcp-established",
                    tcp::show_addr(t.family, &t.src_addr, t.src_port),
                    tcp::show_addr(t.family, &t.dst_addr, t.dst_port)
                );
            }
        }
    }
    Ok(())
}
