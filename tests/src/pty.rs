//! Real terminals for the tests of controlling terminals and shell jobs: a pty allocated here,
//! a process started as the leader of a session on it, and the master side to type on and read.

use std::ffi::{CStr, CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A pty: the master (ours) and the slave's path.
pub struct Pty {
    pub master: std::fs::File,
    slave: CString,
}

impl Pty {
    pub fn open() -> Pty {
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a fresh master fd we own.
        unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            assert_eq!(libc::grantpt(m), 0, "grantpt");
            assert_eq!(libc::unlockpt(m), 0, "unlockpt");
            let slave = CStr::from_ptr(libc::ptsname(m)).to_owned();
            Pty {
                master: std::fs::File::from(OwnedFd::from_raw_fd(m)),
                slave,
            }
        }
    }

    /// The slave's path (/dev/pts/N): what the fds of a process on this terminal point to.
    pub fn slave_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(self.slave.as_bytes()))
    }

    /// Starts `cmd` as the leader of a new session whose controlling terminal (and stdin,
    /// stdout, stderr) is this pty's slave.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let slave = self.slave.clone();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
                if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for n in 0..3 {
                    libc::dup2(fd, n);
                }
                if fd > 2 {
                    libc::close(fd);
                }
                Ok(())
            });
        }
        cmd.spawn().expect("start a process on the pty")
    }

    /// Reads the terminal's output until `needle` shows up (or panics after a while); returns
    /// everything read.
    pub fn expect(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the terminal never showed {needle:?}; it showed {seen:?}"
            );
            let mut p = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) } <= 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(10)),
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    }

    /// Waits for a whole line containing `prefix`; returns what follows the prefix on it.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let mut seen = self.expect(prefix);
        loop {
            let after = seen.split(prefix).nth(1).unwrap_or("").to_string();
            if let Some((line, _)) = after.split_once('\n') {
                return line.trim().to_string();
            }
            seen.push_str(&self.expect("\n"));
        }
    }

    /// Types `s` and Enter.
    pub fn type_line(&mut self, s: &str) {
        self.master
            .write_all(format!("{s}\n").as_bytes())
            .expect("type on the terminal");
    }
}
