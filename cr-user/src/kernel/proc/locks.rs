//! `/proc/locks` (and the `lock:` lines of fdinfo, which use the same format): the flock, POSIX
//! and OFD locks `--file-locks` must dump and re-take.
//!
//! Format (lock_get_status() in fs/locks.c):
//! `ID: [-> ]KIND MODE ACCESS PID MAJ:MIN:INODE START END` where MAJ/MIN are hex, INODE decimal,
//! END is a number or `EOF`, and a `->` marks a waiter blocked on the lock above it.

use anyhow::{bail, Context, Result};

use super::{parse_dec, parse_hex, read_text};

/// An inode as `/proc/locks` and stat(2) name it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct InodeId {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

impl InodeId {
    /// From a tracepoint's `s_dev` (kernel encoding: major << 20 | minor).
    pub fn from_kernel(dev: u32, ino: u64) -> InodeId {
        InodeId {
            major: dev >> 20,
            minor: dev & 0xf_ffff,
            ino,
        }
    }

    /// The kernel's encoding of its device (major << 20 | minor).
    pub fn kernel_dev(&self) -> u32 {
        (self.major << 20) | (self.minor & 0xf_ffff)
    }
}

impl std::fmt::Display for InodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}:{}", self.major, self.minor, self.ino)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockKind {
    /// flock(2).
    Flock,
    /// fcntl F_SETLK (process-associated record lock).
    Posix,
    /// fcntl F_OFD_SETLK (open-file-description record lock; pid shows as -1).
    Ofd,
    Lease,
    Deleg,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockMode {
    Advisory,
    /// Mandatory locking (removed in 5.15).
    Mandatory,
    /// Lease states.
    Active,
    Breaking,
    Breaker,
    /// `*NOINODE*`: a POSIX lock whose inode is gone.
    NoInode,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAccess {
    Read,
    Write,
    /// `UNLCK` (a lease being broken to nothing).
    Unlock,
    Other(String),
}

/// One lock line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLock {
    /// The ordinal the kernel printed (waiters share their blocker's id).
    pub id: u64,
    /// A `->` line: this is a waiter blocked on lock `id`, not a held lock.
    pub blocked: bool,
    pub kind: LockKind,
    pub mode: LockMode,
    pub access: LockAccess,
    /// The owner's pid in the reader's pid namespace; -1 for OFD locks (and 0 for a pid not
    /// visible there).
    pub pid: i32,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// None for `<none>:0` (no inode).
    pub inode: Option<u64>,
    pub start: u64,
    /// Last byte covered, inclusive; None for `EOF` (to the end of the file, also flock).
    pub end: Option<u64>,
}

/// Parses one lock line. A leading `lock:` (fdinfo) is accepted.
pub fn parse_lock_line(line: &str) -> Result<FileLock> {
    let bad = || format!("bad lock line {line:?}");
    let body = line.trim();
    let body = body.strip_prefix("lock:").unwrap_or(body);
    let mut t = body.split_ascii_whitespace().peekable();
    let id = t.next().with_context(bad)?;
    let id = id.strip_suffix(':').with_context(bad)?;
    let id: u64 = parse_dec(id, "lock id").with_context(bad)?;
    let mut blocked = false;
    while t.peek() == Some(&"->") {
        blocked = true;
        t.next();
    }
    let kind = match t.next().with_context(bad)? {
        "FLOCK" => LockKind::Flock,
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        "LEASE" => LockKind::Lease,
        "DELEG" => LockKind::Deleg,
        o => LockKind::Other(o.to_string()),
    };
    let mode = match t.next().with_context(bad)? {
        "ADVISORY" => LockMode::Advisory,
        "MANDATORY" => LockMode::Mandatory,
        "ACTIVE" => LockMode::Active,
        "BREAKING" => LockMode::Breaking,
        "BREAKER" => LockMode::Breaker,
        "*NOINODE*" => LockMode::NoInode,
        o => LockMode::Other(o.to_string()),
    };
    let access = match t.next().with_context(bad)? {
        "READ" => LockAccess::Read,
        "WRITE" => LockAccess::Write,
        "UNLCK" => LockAccess::Unlock,
        o => LockAccess::Other(o.to_string()),
    };
    let pid: i32 = parse_dec(t.next().with_context(bad)?, "lock pid").with_context(bad)?;
    let dev = t.next().with_context(bad)?;
    let (dev_major, dev_minor, inode) = if dev.starts_with("<none>") {
        (0, 0, None)
    } else {
        let mut p = dev.splitn(3, ':');
        let (Some(ma), Some(mi), Some(ino)) = (p.next(), p.next(), p.next()) else {
            bail!("{}: device {dev:?}", bad());
        };
        let ma = u32::try_from(parse_hex(ma, "major").with_context(bad)?).with_context(bad)?;
        let mi = u32::try_from(parse_hex(mi, "minor").with_context(bad)?).with_context(bad)?;
        (ma, mi, Some(parse_dec(ino, "inode").with_context(bad)?))
    };
    let start: u64 = parse_dec(t.next().with_context(bad)?, "lock start").with_context(bad)?;
    let end = match t.next().with_context(bad)? {
        "EOF" => None,
        e => Some(parse_dec(e, "lock end").with_context(bad)?),
    };
    if t.next().is_some() {
        bail!("{}: trailing fields", bad());
    }
    Ok(FileLock {
        id,
        blocked,
        kind,
        mode,
        access,
        pid,
        dev_major,
        dev_minor,
        inode,
        start,
        end,
    })
}

/// Parses the whole of `/proc/locks`.
pub fn parse_locks(text: &str) -> Result<Vec<FileLock>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_lock_line)
        .collect()
}

/// Reads and parses `/proc/locks`.
pub fn read_locks() -> Result<Vec<FileLock>> {
    parse_locks(&read_text("/proc/locks".as_ref())?).context("parse /proc/locks")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
1: POSIX  ADVISORY  WRITE 12345 fe:00:1234 0 EOF
1: -> POSIX  ADVISORY  WRITE 12346 fe:00:1234 0 EOF
1:  -> -> POSIX  ADVISORY  READ 12347 fe:00:1234 10 19
2: OFDLCK ADVISORY  READ  -1 08:01:5 100 199
3: FLOCK  ADVISORY  WRITE 4242 00:1a:77 0 EOF
4: LEASE  BREAKING  UNLCK 4242 103:02:78 0 EOF
5: POSIX  *NOINODE* WRITE 99 <none>:0 0 EOF
6: POSIX  MANDATORY WRITE 98 fe:00:9 4096 8191
";

    #[test]
    fn sample() {
        let v = parse_locks(SAMPLE).unwrap();
        assert_eq!(v.len(), 8);
        assert_eq!(
            v[0],
            FileLock {
                id: 1,
                blocked: false,
                kind: LockKind::Posix,
                mode: LockMode::Advisory,
                access: LockAccess::Write,
                pid: 12345,
                dev_major: 0xfe,
                dev_minor: 0,
                inode: Some(1234),
                start: 0,
                end: None,
            }
        );
        assert!(v[1].blocked && v[1].id == 1 && v[1].pid == 12346);
        assert!(v[2].blocked && v[2].access == LockAccess::Read);
        assert_eq!((v[2].start, v[2].end), (10, Some(19)));
        assert_eq!(
            (v[3].kind.clone(), v[3].pid, v[3].dev_major, v[3].dev_minor),
            (LockKind::Ofd, -1, 8, 1)
        );
        assert_eq!((v[3].start, v[3].end), (100, Some(199)));
        assert_eq!(v[4].kind, LockKind::Flock);
        assert_eq!((v[4].dev_minor, v[4].inode), (0x1a, Some(77)));
        assert_eq!(
            (v[5].kind.clone(), v[5].mode.clone(), v[5].access.clone()),
            (LockKind::Lease, LockMode::Breaking, LockAccess::Unlock)
        );
        assert_eq!(v[5].dev_major, 0x103);
        assert_eq!((v[6].mode.clone(), v[6].inode), (LockMode::NoInode, None));
        assert_eq!(v[7].mode, LockMode::Mandatory);
    }

    #[test]
    fn fdinfo_form() {
        let l = parse_lock_line("lock:\t1: FLOCK  ADVISORY  WRITE 4242 00:1a:77 0 EOF").unwrap();
        assert_eq!(l.kind, LockKind::Flock);
        assert_eq!(l.pid, 4242);
    }

    #[test]
    fn bad_input() {
        for l in [
            "",
            "1 POSIX ADVISORY WRITE 1 fe:00:1 0 EOF",
            "1: POSIX ADVISORY WRITE x fe:00:1 0 EOF",
            "1: POSIX ADVISORY WRITE 1 fe00 0 EOF",
            "1: POSIX ADVISORY WRITE 1 fe:00:1 0",
            "1: POSIX ADVISORY WRITE 1 fe:00:1 0 EOF extra",
            "1: POSIX ADVISORY WRITE 1 zz:00:1 0 EOF",
        ] {
            assert!(parse_lock_line(l).is_err(), "{l:?}");
        }
    }

    /// A flock we take shows up with our pid and the file's inode.
    #[test]
    fn live_flock_shows_up() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(format!("cr-locks-test-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        // SAFETY: flock on an fd we own.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        let ino = f.metadata().unwrap().ino();
        let locks = read_locks().unwrap();
        let me = std::process::id() as i32;
        assert!(
            locks.iter().any(|l| l.kind == LockKind::Flock
                && l.inode == Some(ino)
                && l.pid == me
                && l.access == LockAccess::Write),
            "{locks:?}"
        );
    }
}
