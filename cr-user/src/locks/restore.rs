//! Taking the tree's file locks again (`--file-locks`), each by the owner it had: flock and OFD
//! locks on an fd of their open file description, POSIX locks in their owning process (see
//! [`super::dump`]).
//!
//! Every lock is taken non-blocking, from inside its process, once its fd table is complete
//! (closing a temporary fd of a file would drop the process's POSIX locks on it). A lock
//! someone else holds now is an error naming the lock and the holders `/proc/locks` shows; the
//! caller then kills the half-made tree, so nothing is left behind.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};

use crate::image::dir::ImageDir;
use crate::image::dir::LOCKS as LOCKS_IMG;
use crate::image::file::Kind;
use crate::image::pb;
use crate::kernel::ptrace::Remote;
use crate::kernel::sys::abi::flock_bytes;

/// Reads locks.img, if the image has one. An image with locks restored without
/// `--file-locks` is refused: the tree would run without the mutual exclusion it relies on.
/// `tables` are the fd tables of the live processes, by PID: every lock must name an fd there
/// with its file id.
pub fn plan(
    dir: &ImageDir,
    allowed: bool,
    tables: &HashMap<i32, &pb::Fds>,
) -> Result<HashMap<i32, Vec<pb::FileLock>>> {
    let mut out: HashMap<i32, Vec<pb::FileLock>> = HashMap::new();
    if !dir.has(LOCKS_IMG) {
        return Ok(out);
    }
    let locks: pb::Locks = dir.read_msg(LOCKS_IMG, Kind::Locks)?;
    if locks.locks.is_empty() {
        return Ok(out);
    }
    if !allowed {
        let names: Vec<String> = locks.locks.iter().map(describe).collect();
        crate::refuse!(
            "--file-locks",
            "{} holds file locks ({}): restore with --file-locks (-l) to take them again",
            dir.path().display(),
            names.join("; ")
        );
    }
    for l in locks.locks {
        let fds = tables.get(&l.pid).with_context(|| {
            format!(
                "{LOCKS_IMG}: {} belongs to PID {}, which is not a live process of the image",
                describe(&l),
                l.pid
            )
        })?;
        let fd = fds.fds.iter().find(|f| f.fd == l.fd);
        if fd.map(|f| f.file_id) != Some(l.file_id) {
            bail!(
                "{LOCKS_IMG}: {}: fd {} of PID {} is not file {} in the image",
                describe(&l),
                l.fd,
                l.pid,
                l.file_id
            );
        }
        if !matches!(l.kind.as_str(), "flock" | "posix" | "ofd") {
            bail!(
                "{LOCKS_IMG}: unknown lock kind {:?} (image from a newer cr?)",
                l.kind
            );
        }
        out.entry(l.pid).or_default().push(l);
    }
    Ok(out)
}

/// "PID 10's flock write lock on /a (fd 3)", "… POSIX read lock on bytes 10-19 of /b …".
pub fn describe(l: &pb::FileLock) -> String {
    let access = if l.write { "write" } else { "read" };
    let kind = match l.kind.as_str() {
        "posix" => "POSIX",
        "ofd" => "OFD",
        k => k,
    };
    let range = match (l.kind.as_str(), l.len) {
        ("flock", _) => String::new(),
        (_, 0) => format!(" on bytes {}-EOF", l.start),
        (_, n) => format!(" on bytes {}-{}", l.start, l.start.saturating_add(n - 1)),
    };
    format!(
        "PID {}'s {kind} {access} lock{range} on {} (fd {})",
        l.pid, l.path, l.fd
    )
}

/// Takes `locks` (those of the process `r` drives, `pid`) again. `scratch` is 32 bytes of
/// writable memory in the process.
pub fn take(r: &mut Remote, scratch: u64, pid: i32, locks: &[pb::FileLock]) -> Result<()> {
    for l in locks {
        let fd = l.fd as u64;
        let (what, res) = match l.kind.as_str() {
            "flock" => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                } | libc::LOCK_NB;
                ("flock", r.raw_syscall(libc::SYS_flock, &[fd, op as u64])?)
            }
            k => {
                let (name, cmd) = if k == "ofd" {
                    ("fcntl(F_OFD_SETLK)", libc::F_OFD_SETLK)
                } else {
                    ("fcntl(F_SETLK)", libc::F_SETLK)
                };
                r.write_mem(scratch, &flock_bytes(l.write, l.start, l.len))?;
                (
                    name,
                    r.raw_syscall(libc::SYS_fcntl, &[fd, cmd as u64, scratch])?,
                )
            }
        };
        if res == 0 {
            log::debug!("took {} again", describe(l));
            continue;
        }
        let err = std::io::Error::from_raw_os_error((-res) as i32);
        if res == -(libc::EAGAIN as i64) || res == -(libc::EACCES as i64) {
            bail!(
                "cannot take {} again: another process holds a conflicting lock on it now{}",
                describe(l),
                holders(pid, l)
            );
        }
        return Err(err)
            .with_context(|| format!("remote {what} in PID {pid} to take {} again", describe(l)));
    }
    Ok(())
}

/// ` (held by PID 123, PID 456)`: who else holds locks on the lock's file now, as `/proc/locks`
/// tells (best effort: empty when it cannot tell).
fn holders(pid: i32, l: &pb::FileLock) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/fd/{}", l.fd)) else {
        return String::new();
    };
    let Ok(all) = crate::kernel::proc::locks::read_locks() else {
        return String::new();
    };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let mut who: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for h in all.iter().filter(|h| {
        !h.blocked && h.inode == Some(meta.ino()) && (h.dev_major, h.dev_minor) == (major, minor)
    }) {
        let name = if h.pid > 0 {
            format!("PID {}", h.pid)
        } else {
            "an OFD lock".to_string()
        };
        if h.pid != pid && seen.insert(name.clone()) {
            who.push(name);
        }
    }
    if who.is_empty() {
        String::new()
    } else {
        format!(" (held by {})", who.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(kind: &str, write: bool, start: u64, len: u64) -> pb::FileLock {
        pb::FileLock {
            kind: kind.into(),
            write,
            pid: 7,
            fd: 3,
            file_id: 1,
            start,
            len,
            path: "/x".into(),
        }
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            describe(&lock("flock", true, 0, 0)),
            "PID 7's flock write lock on /x (fd 3)"
        );
        assert_eq!(
            describe(&lock("posix", false, 10, 10)),
            "PID 7's POSIX read lock on bytes 10-19 on /x (fd 3)"
        );
        assert_eq!(
            describe(&lock("ofd", true, 5, 0)),
            "PID 7's OFD write lock on bytes 5-EOF on /x (fd 3)"
        );
    }
}
