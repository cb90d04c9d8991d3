//! The repair guard of `--tcp-established`: a small process (`cr __repair-guard`, this very
//! binary) holding a copy of every connection the dump put in repair mode. Repair mode is a
//! state of the socket, not of cr's fd: if cr died with connections in it, the tree (released
//! by the kernel) would find them dead. The guard sees its socket to cr end without the word
//! that the dump dealt with them ([`RepairGuard::done`]), takes each out of repair mode and
//! exits; the kernel has already removed the network lock, which cr's fds held.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::kernel::sys::{fd as sysfd, process, unix};

const HOLD: &[u8] = b"H";
const DONE: &[u8] = b"D";

/// cr's end of the guard.
pub struct RepairGuard {
    sock: OwnedFd,
}

impl RepairGuard {
    /// Starts the guard (before the freeze: it costs an exec). It needs no answer: what cr
    /// sends waits in the socket, also when cr dies right after sending.
    pub fn spawn() -> Result<RepairGuard> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("socketpair for the repair guard")?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args(["-o", "/dev/null", "__repair-guard", "--fd", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/");
        // Its own session: the terminal's signals to cr's process group do not reach it.
        process::new_session_with_fd(&mut cmd, theirs.as_raw_fd(), 3);
        let child = cmd
            .spawn()
            .context("start the repair guard (cr __repair-guard)")?;
        // It runs on by itself and exits when cr's end closes; its parent's death reparents it.
        drop(child);
        Ok(RepairGuard { sock: ours })
    }

    /// Gives the guard a copy of `fd`, which is about to enter repair mode.
    pub fn hold(&self, fd: &OwnedFd) -> Result<()> {
        unix::send_msg(&self.sock, HOLD, &[fd.as_raw_fd()])
            .context("hand a connection to the repair guard")
    }

    /// The dump dealt with repair mode itself (left it, or the tree is killed and the
    /// connections go with it, silently): the guard closes its copies as they are and exits.
    pub fn done(self) {
        if let Err(e) = unix::send_msg(&self.sock, DONE, &[]) {
            log::warn!("telling the repair guard the dump is done: {e:#}");
        }
    }
}

/// The guard process (`cr __repair-guard --fd FD`): holds what cr sends on FD until cr says
/// done (returns at once) or FD ends (cr died: every connection leaves repair mode).
pub fn serve(fd: RawFd) -> Result<i32> {
    let sock = sysfd::take_inherited(fd);
    let mut held: Vec<OwnedFd> = Vec::new();
    loop {
        match unix::recv_msg(&sock, 16) {
            Ok(Some((m, fds))) if m == HOLD => held.extend(fds),
            Ok(Some((m, _))) if m == DONE => return Ok(0),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for s in &held {
        let _ = super::socket::set_repair(s, false);
    }
    Ok(0)
}
