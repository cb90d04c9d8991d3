//! pidfd wrappers: a stable handle on a process (no pid-reuse races) and the way `cr` takes a
//! copy of a target's file descriptor (sockets for TCP_REPAIR, the injected userfaultfd).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

/// Names a pidfd in errors: its number and, when the kernel still says, its pid.
fn describe(pidfd: i32) -> String {
    let pid = std::fs::read_to_string(format!("/proc/self/fdinfo/{pidfd}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pid:"))
                .map(|v| v.trim().to_string())
        });
    match pid {
        Some(p) => format!("pidfd {pidfd} (pid {p})"),
        None => format!("pidfd {pidfd}"),
    }
}

/// pidfd_open(pid, 0). The fd is close-on-exec.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pidfd_open(pid {pid})"));
    }
    // SAFETY: on success the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// pidfd_getfd(pidfd, targetfd, 0): a duplicate, in this process, of the target's fd
/// `targetfd` (same open file description). The new fd is close-on-exec. Needs
/// PTRACE_MODE_ATTACH_REALCREDS over the target.
pub fn pidfd_getfd(pidfd: impl AsFd, targetfd: i32) -> Result<OwnedFd> {
    let raw = pidfd.as_fd().as_raw_fd();
    // SAFETY: pidfd_getfd takes three integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, raw, targetfd, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pidfd_getfd({}, fd {targetfd})", describe(raw)));
    }
    // SAFETY: on success the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// pidfd_send_signal(pidfd, sig, NULL, 0): like kill(), but to exactly the process the pidfd
/// refers to even if its pid has been reused.
pub fn pidfd_send_signal(pidfd: impl AsFd, sig: i32) -> Result<()> {
    let raw = pidfd.as_fd().as_raw_fd();
    // SAFETY: a NULL siginfo pointer is allowed (the kernel then fills a SI_USER one); the
    // other arguments are integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            raw,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pidfd_send_signal({}, signal {sig})", describe(raw)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Take a child's stdin pipe end with pidfd_getfd, write through it, read the child's echo.
    #[test]
    fn getfd_from_child_and_signal_it() {
        use std::process::{Command, Stdio};
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let pfd = pidfd_open(pid).unwrap();
        // fd 0 in the child is the read end of its stdin pipe; fd 1 the write end of stdout.
        let their_stdout = pidfd_getfd(&pfd, 1).unwrap();
        let mut w = std::fs::File::from(their_stdout);
        w.write_all(b"via pidfd_getfd\n").unwrap();
        drop(w);
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 16];
        out.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"via pidfd_getfd\n");

        pidfd_send_signal(&pfd, libc::SIGKILL).unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));

        let err = pidfd_send_signal(&pfd, libc::SIGKILL).unwrap_err();
        assert!(
            format!("{err:#}").contains("pidfd_send_signal(pidfd"),
            "{err:#}"
        );
        let err = pidfd_getfd(&pfd, 0).unwrap_err();
        assert!(format!("{err:#}").contains("fd 0"), "{err:#}");
    }

    #[test]
    fn errors_name_the_call() {
        let err = pidfd_open(i32::MAX).unwrap_err();
        assert!(
            format!("{err:#}").starts_with(&format!("pidfd_open(pid {})", i32::MAX)),
            "{err:#}"
        );
        let pfd = pidfd_open(std::process::id() as i32).unwrap();
        let err = pidfd_getfd(&pfd, 99_999).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("fd 99999"),
            "{msg}"
        );
        // A socket taken from ourselves is the same socket.
        let (a, mut b) = UnixStream::pair().unwrap();
        let dup = pidfd_getfd(&pfd, a.as_raw_fd()).unwrap();
        let mut a2 = UnixStream::from(dup);
        a2.write_all(b"x").unwrap();
        let mut c = [0u8; 1];
        b.read_exact(&mut c).unwrap();
        assert_eq!(&c, b"x");
    }
}
