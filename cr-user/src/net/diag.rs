//! sock_diag (NETLINK_SOCK_DIAG): the one fact about a listening socket that no sockopt gives,
//! its backlog (inet_diag_msg.idiag_wqueue of a LISTEN socket is sk_max_ack_backlog).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

/// A dump request for the TCP sockets of `family` in the states of `states` (bit per state).
fn request(family: u8, states: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDRLEN + 56);
    m.extend_from_slice(&((NLMSG_HDRLEN + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]);
    m
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Walks the messages of one netlink reply buffer: (inode, wqueue) of each socket, and whether
/// the dump is over.
fn parse(buf: &[u8], out: &mut Vec<(u64, u32)>) -> Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off).unwrap_or(0) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            bail!("malformed sock_diag reply");
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let err = u32_at(buf, off + NLMSG_HDRLEN).unwrap_or(0) as i32;
                if err != 0 {
                    return Err(std::io::Error::from_raw_os_error(-err)).context("sock_diag request");
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                let m = &buf[off + NLMSG_HDRLEN..off + len];
                if let (Some(wq), Some(ino)) = (u32_at(m, 60), u32_at(m, 68)) {
                    out.push((ino as u64, wq));
                }
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// The backlog of the listening socket with inode `inode`.
pub fn backlog(family: u32, inode: u64) -> Result<u32> {
    // SAFETY: socket() with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(NETLINK_SOCK_DIAG)");
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = request(family as u8, 1 << super::tcp::TCP_LISTEN);
    // SAFETY: send reads from the valid buffer.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error()).context("send the sock_diag request");
    }
    let mut socks = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("read the sock_diag reply");
        }
        if n == 0 || parse(&buf[..n as usize], &mut socks)? {
            break;
        }
    }
    socks
        .iter()
        .find(|(ino, _)| *ino == inode)
        .map(|&(_, wq)| wq)
        .with_context(|| format!("socket:[{inode}] not among the listening sockets sock_diag reports"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_reports_its_backlog() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap());
        // std listens with a backlog of 128.
        assert_eq!(backlog(libc::AF_INET as u32, ino).unwrap(), 128);
    }
}
