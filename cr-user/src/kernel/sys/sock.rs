//! Sockets: options, addresses, the calls TCP repair needs, and the interface list. One
//! wrapper each; errors name the option or call.

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

/// getsockopt into `buf`; returns the length the kernel wrote.
pub fn getsockopt_bytes(
    fd: impl AsFd,
    level: i32,
    opt: i32,
    buf: &mut [u8],
    what: &str,
) -> Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("getsockopt {what}"));
    }
    Ok(len as usize)
}

/// getsockopt of an int option.
pub fn getsockopt_int(fd: impl AsFd, level: i32, opt: i32, what: &str) -> Result<i32> {
    let mut b = [0u8; 4];
    getsockopt_bytes(fd, level, opt, &mut b, what)?;
    Ok(i32::from_ne_bytes(b))
}

/// setsockopt from `val`.
pub fn setsockopt_bytes(fd: impl AsFd, level: i32, opt: i32, val: &[u8], what: &str) -> Result<()> {
    // SAFETY: the kernel reads `val.len()` bytes from `val`.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt {what}"));
    }
    Ok(())
}

/// setsockopt of an int option.
pub fn setsockopt_int(fd: impl AsFd, level: i32, opt: i32, val: i32, what: &str) -> Result<()> {
    setsockopt_bytes(fd, level, opt, &val.to_ne_bytes(), what)
}

/// What a socket is: SO_DOMAIN, SO_TYPE, SO_PROTOCOL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockType {
    pub domain: i32,
    pub ty: i32,
    pub protocol: i32,
}

impl SockType {
    /// Reads the three options of the socket `fd`.
    pub fn of(fd: impl AsFd) -> Result<SockType> {
        let fd = fd.as_fd();
        Ok(SockType {
            domain: getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?,
            ty: getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE")?,
            protocol: getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?,
        })
    }

    /// "IPv4" or "IPv6" for an inet socket.
    pub fn inet_family(&self) -> Option<&'static str> {
        match self.domain {
            libc::AF_INET => Some("IPv4"),
            libc::AF_INET6 => Some("IPv6"),
            _ => None,
        }
    }

    /// An IPv4 or IPv6 TCP socket.
    pub fn is_tcp(&self) -> bool {
        self.inet_family().is_some()
            && self.ty == libc::SOCK_STREAM
            && self.protocol == libc::IPPROTO_TCP
    }

    /// What it is, for messages ("a unix socket", "a UDP IPv4 socket (type 2, protocol 17)").
    pub fn describe(&self) -> String {
        let fam = match self.domain {
            libc::AF_UNIX => return "a unix socket".into(),
            libc::AF_NETLINK => return "a netlink socket".into(),
            libc::AF_PACKET => return "a packet socket".into(),
            d => match self.inet_family() {
                Some(f) => f,
                None => return format!("a socket of family {d}"),
            },
        };
        if self.is_tcp() {
            return format!("an {fam} TCP socket");
        }
        let what = if self.ty == libc::SOCK_DGRAM {
            "a UDP"
        } else {
            "an"
        };
        format!(
            "{what} {fam} socket (type {}, protocol {})",
            self.ty, self.protocol
        )
    }
}

/// An IPv4 or IPv6 socket address. IPv4 addresses fill the first 4 bytes of `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InetAddr {
    /// AF_INET or AF_INET6.
    pub family: i32,
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
}

impl InetAddr {
    /// The address bytes: 4 for IPv4, 16 for IPv6.
    pub fn bytes(&self) -> &[u8] {
        if self.family == libc::AF_INET {
            &self.addr[..4]
        } else {
            &self.addr
        }
    }
}

/// Human form of an address (family, 4 or 16 address bytes, port), for messages.
pub fn show_addr(family: u32, addr: &[u8], port: u32) -> String {
    match (family as i32, addr.len()) {
        (libc::AF_INET, 4) => format!("{}.{}.{}.{}:{port}", addr[0], addr[1], addr[2], addr[3]),
        (libc::AF_INET6, 16) => {
            let a: [u8; 16] = addr.try_into().unwrap_or([0; 16]);
            format!("[{}]:{port}", std::net::Ipv6Addr::from(a))
        }
        _ => format!("?:{port}"),
    }
}

/// Parses a sockaddr_storage that getsockname/getpeername/getifaddrs filled.
fn parse_addr(ss: &libc::sockaddr_storage) -> Result<InetAddr> {
    let mut addr = [0u8; 16];
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            addr[..4].copy_from_slice(&sin.sin_addr.s_addr.to_ne_bytes());
            Ok(InetAddr {
                family: libc::AF_INET,
                addr,
                port: u16::from_be(sin.sin_port),
            })
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Ok(InetAddr {
                family: libc::AF_INET6,
                addr: sin6.sin6_addr.s6_addr,
                port: u16::from_be(sin6.sin6_port),
            })
        }
        f => bail!("socket address of family {f}"),
    }
}

fn name(fd: impl AsFd, peer: bool) -> std::io::Result<libc::sockaddr_storage> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: the kernel writes at most `len` bytes into `ss`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ss)
}

/// getsockname of an IPv4/IPv6 socket.
pub fn local_addr(fd: impl AsFd) -> Result<InetAddr> {
    parse_addr(&name(fd, false).context("getsockname")?)
}

/// getpeername of an IPv4/IPv6 socket; None when it is not connected.
pub fn peer_addr(fd: impl AsFd) -> Result<Option<InetAddr>> {
    match name(fd, true) {
        Ok(ss) => Ok(Some(parse_addr(&ss)?)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(None),
        Err(e) => Err(e).context("getpeername"),
    }
}

/// A sockaddr for (family, address, port), and its length.
pub fn make_addr(
    family: u32,
    addr: &[u8],
    port: u32,
) -> Result<(libc::sockaddr_storage, libc::socklen_t)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let port = u16::try_from(port).context("port out of range")?.to_be();
    match family as i32 {
        libc::AF_INET => {
            let a: [u8; 4] = addr.try_into().context("IPv4 address is not 4 bytes")?;
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = port;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a);
            Ok((
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ))
        }
        libc::AF_INET6 => {
            let a: [u8; 16] = addr.try_into().context("IPv6 address is not 16 bytes")?;
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = port;
            sin6.sin6_addr.s6_addr = a;
            Ok((
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ))
        }
        f => bail!("unknown address family {f}"),
    }
}

/// socket(2); the fd is close-on-exec when `ty` says so.
pub fn socket(domain: i32, ty: i32, protocol: i32, what: &str) -> Result<OwnedFd> {
    // SAFETY: socket() with integer arguments.
    let fd = unsafe { libc::socket(domain, ty, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("socket({what})"));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// bind(2) to (family, address, port).
pub fn bind(fd: impl AsFd, family: u32, addr: &[u8], port: u32) -> std::io::Result<()> {
    let (ss, len) = make_addr(family, addr, port).map_err(std::io::Error::other)?;
    // SAFETY: ss is a valid sockaddr of length len.
    if unsafe {
        libc::bind(
            fd.as_fd().as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// connect(2) to (family, address, port).
pub fn connect(fd: impl AsFd, family: u32, addr: &[u8], port: u32) -> std::io::Result<()> {
    let (ss, len) = make_addr(family, addr, port).map_err(std::io::Error::other)?;
    // SAFETY: ss is a valid sockaddr of length len.
    if unsafe {
        libc::connect(
            fd.as_fd().as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// listen(2).
pub fn listen(fd: impl AsFd, backlog: i32) -> std::io::Result<()> {
    // SAFETY: listen with integer arguments.
    if unsafe { libc::listen(fd.as_fd().as_raw_fd(), backlog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// send(2) of `data` with `flags`; returns the bytes taken.
pub fn send(fd: impl AsFd, data: &[u8], flags: i32) -> std::io::Result<usize> {
    // SAFETY: send reads from the valid slice.
    let n = unsafe {
        libc::send(
            fd.as_fd().as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// recv(2) into `buf` with `flags`; returns the bytes received.
pub fn recv(fd: impl AsFd, buf: &mut [u8], flags: i32) -> std::io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            fd.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// (interface, address) of every IP address of this network namespace (empty if the list
/// cannot be read).
pub fn if_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_name is a NUL-terminated string of the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: ifa_addr is valid; its family says which sockaddr it is.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let ip = match fam {
                // SAFETY: family AF_INET: a sockaddr_in.
                libc::AF_INET => Some(IpAddr::from(
                    unsafe { *ifa.ifa_addr.cast::<libc::sockaddr_in>() }
                        .sin_addr
                        .s_addr
                        .to_ne_bytes(),
                )),
                // SAFETY: family AF_INET6: a sockaddr_in6.
                libc::AF_INET6 => Some(IpAddr::from(
                    unsafe { *ifa.ifa_addr.cast::<libc::sockaddr_in6>() }
                        .sin6_addr
                        .s6_addr,
                )),
                _ => None,
            };
            if let Some(ip) = ip {
                out.push((name, ip));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Brings the interface `name` up (SIOCSIFFLAGS with IFF_UP | IFF_RUNNING).
pub fn set_link_up(name: &str) -> Result<()> {
    let s = socket(
        libc::AF_INET,
        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
        0,
        "for SIOCSIFFLAGS",
    )?;
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        bail!("interface name {name} is too long");
    }
    for (d, b) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("SIOCGIFFLAGS on {name}"));
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("SIOCSIFFLAGS (up) on {name}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        let (ss, len) = make_addr(libc::AF_INET as u32, &[127, 0, 0, 1], 8080).unwrap();
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        let a = parse_addr(&ss).unwrap();
        assert_eq!(
            (a.family, a.bytes(), a.port),
            (libc::AF_INET, &[127, 0, 0, 1][..], 8080)
        );
        let mut a6 = [0u8; 16];
        a6[15] = 1;
        let (ss, _) = make_addr(libc::AF_INET6 as u32, &a6, 443).unwrap();
        let a = parse_addr(&ss).unwrap();
        assert_eq!(
            (a.family, a.bytes(), a.port),
            (libc::AF_INET6, &a6[..], 443)
        );
        assert!(make_addr(libc::AF_INET as u32, &[1, 2, 3], 1).is_err());
    }

    #[test]
    fn names_of_a_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let me = local_addr(&c).unwrap();
        let peer = peer_addr(&c).unwrap().unwrap();
        assert_eq!(me.port, c.local_addr().unwrap().port());
        assert_eq!(peer.port, l.local_addr().unwrap().port());
        assert_eq!(peer_addr(&l).unwrap(), None, "a listener has no peer");
        let ty = getsockopt_int(&c, libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE").unwrap();
        assert_eq!(ty, libc::SOCK_STREAM);
    }
}
