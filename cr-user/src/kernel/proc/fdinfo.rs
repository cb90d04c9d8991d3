//! `/proc/PID/fdinfo/N` and `/proc/PID/fd/`: what each open file descriptor is and the state
//! that only fdinfo shows (position, open flags including close-on-exec, eventfd counter, epoll
//! targets, inotify watches, locks held through it).
//!
//! The common header (`pos`, `flags`, `mnt_id`, `ino`) is parsed; everything else is kept as raw
//! key/value pairs or records, with typed accessors for the kinds a dump needs today.

use anyhow::{Context, Result};

use super::locks::{parse_lock_line, FileLock};
use super::{parse_dec, parse_hex, parse_oct, pid_path, read_text};

/// A multi-field fdinfo line: `tfd: …` (epoll), `inotify …`, `fanotify …` or `lock: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdRecord {
    /// `tfd`, `inotify`, `fanotify` or `lock`.
    pub kind: String,
    /// The `key:value` / `key: value` pairs of the line (empty for `lock`, see `raw`).
    pub fields: Vec<(String, String)>,
    /// The whole line.
    pub raw: String,
}

impl FdRecord {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parsed `/proc/PID/fdinfo/N`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FdInfo {
    pub pos: u64,
    /// Open flags (printed in octal); O_CLOEXEC is folded in from the fd table.
    pub flags: u32,
    pub mnt_id: Option<u64>,
    pub ino: Option<u64>,
    /// Other single `key: value` lines in file order (eventfd-count, clockid, sigmask, Pid,
    /// it_value, …), value trimmed.
    pub fields: Vec<(String, String)>,
    /// Multi-field lines in file order.
    pub records: Vec<FdRecord>,
}

/// One epoll target (`tfd:` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpollTarget {
    pub tfd: i32,
    /// EPOLL* event mask (hex in the file).
    pub events: u32,
    /// epoll_data (hex in the file).
    pub data: u64,
    pub pos: u64,
    /// Inode of the target file (hex in the file).
    pub ino: u64,
    /// Device of the target file (hex in the file, kernel dev_t encoding).
    pub sdev: u64,
}

impl FdInfo {
    /// A single-line field by key, e.g. `get("eventfd-count")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_cloexec(&self) -> bool {
        self.flags & libc::O_CLOEXEC as u32 != 0
    }

    /// The eventfd counter (`eventfd-count:` is printed in hex).
    pub fn eventfd_count(&self) -> Result<Option<u64>> {
        self.get("eventfd-count")
            .map(|v| parse_hex(v, "eventfd-count"))
            .transpose()
    }

    /// The `tfd:` lines of an epoll fd.
    pub fn epoll_targets(&self) -> Result<Vec<EpollTarget>> {
        self.records
            .iter()
            .filter(|r| r.kind == "tfd")
            .map(|r| {
                let f = |k: &str| {
                    r.get(k)
                        .with_context(|| format!("epoll line without {k}: {:?}", r.raw))
                };
                Ok(EpollTarget {
                    tfd: parse_dec(f("tfd")?, "tfd")?,
                    events: u32::try_from(parse_hex(f("events")?, "events")?)
                        .with_context(|| format!("epoll events out of range: {:?}", r.raw))?,
                    data: parse_hex(f("data")?, "data")?,
                    pos: parse_dec(f("pos")?, "pos")?,
                    ino: parse_hex(f("ino")?, "ino")?,
                    sdev: parse_hex(f("sdev")?, "sdev")?,
                })
            })
            .collect()
    }

    /// The `lock:` lines: locks held (or waited for) through this open file.
    pub fn locks(&self) -> Result<Vec<FileLock>> {
        self.records
            .iter()
            .filter(|r| r.kind == "lock")
            .map(|r| parse_lock_line(&r.raw))
            .collect()
    }
}

/// Splits `a:1 b: 2 c:3` into pairs: a token ending in ':' takes the next token as its value.
fn pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut t = s.split_ascii_whitespace();
    while let Some(tok) = t.next() {
        if let Some(k) = tok.strip_suffix(':') {
            out.push((k.to_string(), t.next().unwrap_or("").to_string()));
        } else if let Some((k, v)) = tok.split_once(':') {
            out.push((k.to_string(), v.to_string()));
        } else {
            out.push((tok.to_string(), String::new()));
        }
    }
    out
}

/// Parses the text of an fdinfo file.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo> {
    let mut info = FdInfo::default();
    let mut have_flags = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("tfd:") {
            info.records.push(FdRecord {
                kind: "tfd".into(),
                fields: pairs(line),
                raw: line.into(),
            });
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("inotify ")
            .or_else(|| line.strip_prefix("fanotify "))
        {
            let kind = line.split(' ').next().unwrap_or_default();
            info.records.push(FdRecord {
                kind: kind.into(),
                fields: pairs(rest),
                raw: line.into(),
            });
            continue;
        }
        if line.starts_with("lock:") {
            info.records.push(FdRecord {
                kind: "lock".into(),
                fields: Vec::new(),
                raw: line.into(),
            });
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .with_context(|| format!("fdinfo line without ':': {line:?}"))?;
        let value = value.trim();
        match key {
            "pos" => info.pos = parse_dec(value, "pos")?,
            "flags" => {
                info.flags = u32::try_from(parse_oct(value, "flags")?)
                    .with_context(|| format!("fdinfo flags out of range: {value:?}"))?;
                have_flags = true;
            }
            "mnt_id" => info.mnt_id = Some(parse_dec(value, "mnt_id")?),
            "ino" => info.ino = Some(parse_dec(value, "ino")?),
            _ => info.fields.push((key.to_string(), value.to_string())),
        }
    }
    if !have_flags {
        anyhow::bail!("fdinfo has no flags line");
    }
    Ok(info)
}

/// Reads and parses `/proc/PID/fdinfo/FD`.
pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let path = pid_path(pid, &format!("fdinfo/{fd}"));
    parse_fdinfo(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

/// The open fds of a process and their link targets, sorted by fd: paths (with " (deleted)"
/// when unlinked), `pipe:[INO]`, `socket:[INO]`, `anon_inode:[eventfd]`, `anon_inode:[eventpoll]`,
/// `/memfd:NAME (deleted)`, …. An fd closed while listing is skipped.
pub fn list_fds(pid: i32) -> Result<Vec<(i32, String)>> {
    let dir = pid_path(pid, "fd");
    let rd = std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.with_context(|| format!("read {}", dir.display()))?;
        let name = ent.file_name();
        let Some(fd) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let link = ent.path();
        match std::fs::read_link(&link) {
            Ok(t) => out.push((fd, t.to_string_lossy().into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("readlink {}", link.display())),
        }
    }
    out.sort_by_key(|(fd, _)| *fd);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::proc::locks::{LockAccess, LockKind};

    #[test]
    fn regular_file_with_locks() {
        let t = "pos:\t4096\nflags:\t02100002\nmnt_id:\t27\nino:\t10010662\n\
lock:\t1: FLOCK  ADVISORY  WRITE 9433 fe:00:10010662 0 EOF\n\
lock:\t2: POSIX  ADVISORY  WRITE 9433 fe:00:10010662 5 14\n";
        let i = parse_fdinfo(t).unwrap();
        assert_eq!(i.pos, 4096);
        assert_eq!(i.flags, 0o2100002);
        assert!(i.is_cloexec());
        assert_eq!(i.flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
        assert_eq!((i.mnt_id, i.ino), (Some(27), Some(10010662)));
        let l = i.locks().unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].kind, LockKind::Flock);
        assert_eq!(
            (l[1].kind.clone(), l[1].access.clone(), l[1].start, l[1].end),
            (LockKind::Posix, LockAccess::Write, 5, Some(14))
        );
    }

    #[test]
    fn eventfd() {
        let t = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\neventfd-count:                1f\neventfd-id: 1\neventfd-semaphore: 1\n";
        let i = parse_fdinfo(t).unwrap();
        assert!(!i.is_cloexec());
        assert_eq!(i.eventfd_count().unwrap(), Some(0x1f));
        assert_eq!(i.get("eventfd-semaphore"), Some("1"));
        assert_eq!(i.get("eventfd-id"), Some("1"));
    }

    #[test]
    fn epoll() {
        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
tfd:        5 events:       19 data:                5  pos:0 ino:3e94 sdev:f\n\
tfd:        3 events: 80000019 data: ffffffffffffffff  pos:12 ino:40e sdev:10\n";
        let i = parse_fdinfo(t).unwrap();
        let e = i.epoll_targets().unwrap();
        assert_eq!(
            e,
            vec![
                EpollTarget {
                    tfd: 5,
                    events: 0x19,
                    data: 5,
                    pos: 0,
                    ino: 0x3e94,
                    sdev: 0xf
                },
                EpollTarget {
                    tfd: 3,
                    events: 0x8000_0019,
                    data: u64::MAX,
                    pos: 12,
                    ino: 0x40e,
                    sdev: 0x10
                },
            ]
        );
    }

    #[test]
    fn inotify_timerfd_signalfd_pidfd() {
        let t = "pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t1038\n\
inotify wd:2 ino:a0001 sdev:fe00000 mask:fce ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:0100aa0041424344\n";
        let i = parse_fdinfo(t).unwrap();
        let r = &i.records[0];
        assert_eq!(r.kind, "inotify");
        assert_eq!(r.get("wd"), Some("2"));
        assert_eq!(r.get("mask"), Some("fce"));
        assert_eq!(r.get("f_handle"), Some("0100aa0041424344"));

        let t = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 0\nsettime flags: 01\n\
it_value: (0, 499999)\nit_interval: (1, 0)\n";
        let i = parse_fdinfo(t).unwrap();
        assert_eq!(i.get("settime flags"), Some("01"));
        assert_eq!(i.get("it_value"), Some("(0, 499999)"));

        let t = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000000000004\n";
        assert_eq!(
            parse_fdinfo(t).unwrap().get("sigmask"),
            Some("0000000000000004")
        );

        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\nPid:\t1234\nNSpid:\t1234\n";
        assert_eq!(parse_fdinfo(t).unwrap().get("Pid"), Some("1234"));
    }

    #[test]
    fn bad_input() {
        assert!(parse_fdinfo("").is_err());
        assert!(parse_fdinfo("pos:\t0\nflags:\t9\n").is_err());
        assert!(parse_fdinfo("pos:\tx\nflags:\t0\n").is_err());
        assert!(parse_fdinfo("pos:\t0\nflags:\t0\ngarbage\n").is_err());
        let i = parse_fdinfo("pos:\t0\nflags:\t0\ntfd: 1 events: zz data: 0 pos:0 ino:0 sdev:0\n")
            .unwrap();
        assert!(i.epoll_targets().is_err());
        let i = parse_fdinfo("pos:\t0\nflags:\t0\ntfd: 1\n").unwrap();
        assert!(i.epoll_targets().is_err());
    }

    #[test]
    fn live_pipe_and_eventfd() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let me = std::process::id() as i32;
        let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // SAFETY: eventfd has no memory-safety preconditions; the fd is owned below.
        let efd = unsafe { libc::eventfd(7, 0) };
        assert!(efd >= 0);
        // SAFETY: efd was just returned by eventfd and is owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let fds = list_fds(me).unwrap();
        let target = |fd: i32| fds.iter().find(|(f, _)| *f == fd).map(|(_, t)| t.clone());
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", r.as_raw_fd())).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(target(r.as_raw_fd()), Some(format!("pipe:[{}]", ino.ino())));
        assert_eq!(
            target(efd.as_raw_fd()).as_deref(),
            Some("anon_inode:[eventfd]")
        );
        assert!(fds.windows(2).all(|w| w[0].0 < w[1].0));

        let ri = read_fdinfo(me, r.as_raw_fd()).unwrap();
        assert!(ri.is_cloexec());
        assert_eq!(ri.flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32);
        assert_eq!(ri.ino, Some(ino.ino()));
        let ei = read_fdinfo(me, efd.as_raw_fd()).unwrap();
        assert!(!ei.is_cloexec());
        assert_eq!(ei.eventfd_count().unwrap(), Some(7));
    }
}
