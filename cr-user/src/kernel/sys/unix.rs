//! Unix sockets: one message with the fds that travel along (SCM_RIGHTS), and accept.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds in one message: the kernel's SCM_MAX_FD (a tracker hands out one userfaultfd per
/// process of its tree besides its maps).
pub const MAX_FDS: usize = 253;

/// Sends one message with optional fds.
pub fn send_msg(sock: impl AsFd, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .context("sendmsg")?;
    Ok(())
}

/// Receives one message (of at most `max_len` bytes) of a SOCK_SEQPACKET socket and the fds
/// that came with it (close-on-exec). Ok(None) at end of stream.
pub fn recv_msg(sock: impl AsFd, max_len: usize) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    // The message's length first (SOCK_SEQPACKET reports the whole length with MSG_TRUNC), so
    // the buffer fits it instead of a large zeroed one per message.
    let mut probe = [0u8; 1];
    let len = loop {
        match nix::sys::socket::recv(
            sock.as_fd().as_raw_fd(),
            &mut probe,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("peek at the next message"),
        }
    };
    if len > max_len {
        bail!("a message of {len} bytes is larger than {max_len}");
    }
    let mut buf = vec![0u8; len.max(1)];
    let mut cbuf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut cbuf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("recvmsg")?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().context("read the control messages")? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed these fds in this process for us.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let t = msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, t)
    };
    if truncated {
        bail!("a message was truncated");
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some((buf, fds)))
}

/// accept4(listener, SOCK_CLOEXEC).
pub fn accept(listener: impl AsFd) -> nix::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(
        listener.as_fd().as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: accept4 returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
