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

/// sockaddr_un bytes for `name` (sun_path as bound: empty for none, a leading NUL for an
/// abstract name; a path gets its terminating NUL), as bind/connect take them.
pub fn sockaddr_un(name: &[u8]) -> Result<Vec<u8>> {
    if name.len() > 107 {
        bail!("UNIX socket name of {} bytes is too long", name.len());
    }
    let mut b = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    b.extend_from_slice(name);
    if name.first().is_some_and(|&c| c != 0) {
        b.push(0);
    }
    Ok(b)
}

fn raw_addr(name: &[u8]) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let b = sockaddr_un(name).map_err(std::io::Error::other)?;
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // SAFETY: b is at most 2 + 108 bytes, the size of sockaddr_un.
    unsafe {
        std::ptr::copy_nonoverlapping(
            b.as_ptr(),
            (&mut sa as *mut libc::sockaddr_un).cast::<u8>(),
            b.len(),
        )
    };
    Ok((sa, b.len() as libc::socklen_t))
}

/// bind(2) of a UNIX socket to `name`.
pub fn bind_name(fd: impl AsFd, name: &[u8]) -> std::io::Result<()> {
    let (sa, len) = raw_addr(name)?;
    // SAFETY: a valid sockaddr_un of `len` bytes.
    if unsafe {
        libc::bind(
            fd.as_fd().as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// connect(2) of a UNIX socket to `name`.
pub fn connect_name(fd: impl AsFd, name: &[u8]) -> std::io::Result<()> {
    let (sa, len) = raw_addr(name)?;
    // SAFETY: a valid sockaddr_un of `len` bytes.
    if unsafe {
        libc::connect(
            fd.as_fd().as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One message of a receive queue, as a peek saw it.
pub struct Peeked {
    pub data: Vec<u8>,
    /// The sender's address (sun_path bytes; empty: unnamed or not reported).
    pub from: Vec<u8>,
    /// SCM_CREDENTIALS: (pid, uid, gid).
    pub creds: Option<(i32, u32, u32)>,
    /// Files in flight with it (SCM_RIGHTS), now also held by cr.
    pub fds: Vec<OwnedFd>,
}

/// Largest message a peek reads whole.
const PEEK_MAX: usize = 4 << 20;

/// One recvmsg(MSG_PEEK | MSG_DONTWAIT) into `buf`; None when nothing is queued (EAGAIN).
fn peek_one(fd: RawFd, buf: &mut [u8]) -> Result<Option<(usize, Peeked, bool)>> {
    let mut cbuf = vec![0u64; 512];
    // SAFETY: an all-zero sockaddr_un and msghdr are valid.
    let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
    mh.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = cbuf.len() * 8;
    // SAFETY: every pointer in mh points at a live buffer of the length given.
    let n = unsafe {
        libc::recvmsg(
            fd,
            &mut mh,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        // ECONNRESET: the peer closed with data of ours unread; the queue ends here.
        if matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN) | Some(libc::ECONNRESET)
        ) {
            return Ok(None);
        }
        return Err(e).context("recvmsg(MSG_PEEK)");
    }
    let mut p = Peeked {
        data: buf[..n as usize].to_vec(),
        from: Vec::new(),
        creds: None,
        fds: Vec::new(),
    };
    let base = std::mem::size_of::<libc::sa_family_t>();
    let nl = (mh.msg_namelen as usize).saturating_sub(base).min(108);
    if nl > 0 {
        let raw: Vec<u8> = from.sun_path[..nl].iter().map(|&c| c as u8).collect();
        // A path's name comes with its NUL (and maybe more): keep the name only.
        p.from = if raw[0] == 0 {
            raw
        } else {
            raw.split(|&b| b == 0).next().unwrap_or(&[]).to_vec()
        };
    }
    // SAFETY: the control messages are walked with the CMSG macros within the buffer the
    // kernel filled; SCM_RIGHTS fds were just installed in cr for us.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&mh);
        while !cm.is_null() {
            let data = libc::CMSG_DATA(cm);
            let len = (*cm).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
            if (*cm).cmsg_level == libc::SOL_SOCKET {
                match (*cm).cmsg_type {
                    libc::SCM_CREDENTIALS => {
                        let u = std::ptr::read_unaligned(data as *const libc::ucred);
                        p.creds = Some((u.pid, u.uid, u.gid));
                    }
                    libc::SCM_RIGHTS => {
                        for i in 0..len / 4 {
                            let f = std::ptr::read_unaligned((data as *const i32).add(i));
                            p.fds.push(OwnedFd::from_raw_fd(f));
                        }
                    }
                    // SCM_PIDFD (SO_PASSPIDFD): a pidfd made for us; close it.
                    0x04 => {
                        let f = std::ptr::read_unaligned(data as *const i32);
                        drop(OwnedFd::from_raw_fd(f));
                    }
                    _ => {}
                }
            }
            cm = libc::CMSG_NXTHDR(&mh, cm);
        }
    }
    if mh.msg_flags & libc::MSG_CTRUNC != 0 {
        bail!("a queued message carries more control data than cr reads");
    }
    Ok(Some((n as usize, p, mh.msg_flags & libc::MSG_TRUNC != 0)))
}

fn sockopt_int(fd: RawFd, opt: i32) -> Result<i32> {
    // SAFETY: fd is borrowed for the call only.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    super::sock::getsockopt_int(b, libc::SOL_SOCKET, opt, "SOL_SOCKET option")
}

fn set_sockopt_int(fd: RawFd, opt: i32, v: i32) -> Result<()> {
    // SAFETY: fd is borrowed for the call only.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    super::sock::setsockopt_int(b, libc::SOL_SOCKET, opt, v, "SOL_SOCKET option")
}

/// Every message of the receive queue of UNIX socket `fd`, read with MSG_PEEK at a moving
/// SO_PEEK_OFF (nothing is consumed), with the senders' credentials (SO_PASSCRED is set for
/// the reading); both options are put back as they were. `stream`: the socket is
/// SOCK_STREAM (a 0-byte read is the end); `eof_ends`: a 0-byte message ends the queue (a
/// socket shut for reading returns 0 forever once its queue is read).
pub fn peek_queue(fd: impl AsFd, stream: bool, eof_ends: bool) -> Result<Vec<Peeked>> {
    let raw = fd.as_fd().as_raw_fd();
    let peek_off = sockopt_int(raw, libc::SO_PEEK_OFF)?;
    let passcred = sockopt_int(raw, libc::SO_PASSCRED)?;
    set_sockopt_int(raw, libc::SO_PASSCRED, 1)?;
    let r = (|| {
        set_sockopt_int(raw, libc::SO_PEEK_OFF, 0)?;
        let mut buf = vec![0u8; PEEK_MAX];
        let mut out = Vec::new();
        while let Some((n, p, trunc)) = peek_one(raw, &mut buf)? {
            if trunc && !stream {
                bail!("a queued message is larger than {PEEK_MAX} bytes");
            }
            if n == 0 && (stream || eof_ends) && p.fds.is_empty() {
                break;
            }
            out.push(p);
            if out.len() > 1 << 20 {
                bail!("more than a million queued messages");
            }
        }
        Ok(out)
    })();
    let back = set_sockopt_int(raw, libc::SO_PEEK_OFF, peek_off)
        .and_then(|_| set_sockopt_int(raw, libc::SO_PASSCRED, passcred));
    let out = r?;
    back.context("put SO_PEEK_OFF and SO_PASSCRED back")?;
    Ok(out)
}

/// sendmsg of one queued message (MSG_DONTWAIT | MSG_NOSIGNAL): to `to` when given, with
/// SCM_CREDENTIALS `creds` when given.
pub fn send_queued(
    fd: impl AsFd,
    data: &[u8],
    to: Option<&[u8]>,
    creds: Option<(i32, u32, u32)>,
) -> std::io::Result<usize> {
    let addr = match to {
        Some(n) => Some(raw_addr(n)?),
        None => None,
    };
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below points at a live buffer
    // of the length given, the control message is built with the CMSG macros inside cbuf.
    let n = unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        if let Some((sa, len)) = &addr {
            mh.msg_name = (sa as *const libc::sockaddr_un) as *mut libc::c_void;
            mh.msg_namelen = *len;
        }
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if let Some((pid, uid, gid)) = creds {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen =
                libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) as usize;
            let cm = libc::CMSG_FIRSTHDR(&mh);
            (*cm).cmsg_level = libc::SOL_SOCKET;
            (*cm).cmsg_type = libc::SCM_CREDENTIALS;
            (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::ucred>() as u32) as usize;
            std::ptr::write_unaligned(
                libc::CMSG_DATA(cm) as *mut libc::ucred,
                libc::ucred { pid, uid, gid },
            );
        }
        libc::sendmsg(
            fd.as_fd().as_raw_fd(),
            &mh,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// shutdown(2).
pub fn shutdown(fd: impl AsFd, how: i32) -> std::io::Result<()> {
    // SAFETY: shutdown with integer arguments.
    if unsafe { libc::shutdown(fd.as_fd().as_raw_fd(), how) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
