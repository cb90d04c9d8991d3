//! Where the tracker of a target listens, so that no one but cr's own user can take its place.
//!
//! An abstract unix name (`@cr-track-PID`, what cr used first) is open to every local user: any
//! of them could bind it before the tracker and make every tracked dump of that PID fail. The
//! tracker therefore listens on a path in a directory only cr's user can write:
//! `/run/cr/` for root, else `$XDG_RUNTIME_DIR/cr/` (or `/tmp/cr-UID/`). The directory is made
//! 0700 if missing and refused if it is a symbolic link, belongs to another user or is open to
//! others — a planted directory would be the same squatting by another road.
//!
//! One tracker per target: the tracker holds an exclusive flock on `PID.lock` for its life.
//! A socket file left by a killed tracker is stale once that lock is free, so the next tracker
//! removes it and binds again; a client finding a stale file gets ECONNREFUSED, which means
//! "no tracker".

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// The directory trackers of cr's user listen in, made (0700) if missing, checked always.
pub fn dir() -> Result<PathBuf> {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = if uid == 0 {
        PathBuf::from("/run/cr")
    } else {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(r) if Path::new(&r).is_absolute() => Path::new(&r).join("cr"),
            _ => PathBuf::from(format!("/tmp/cr-{uid}")),
        }
    };
    match DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
    }
    let m = std::fs::symlink_metadata(&dir).with_context(|| format!("stat {}", dir.display()))?;
    if !m.file_type().is_dir() {
        bail!(
            "{} is not a directory (a symbolic link?): cr's trackers will not listen there",
            dir.display()
        );
    }
    if m.uid() != uid {
        bail!(
            "{} belongs to uid {}, not to cr's uid {uid}: cr's trackers will not listen there \
             (remove it)",
            dir.display(),
            m.uid()
        );
    }
    if m.mode() & 0o077 != 0 {
        bail!(
            "{} is open to other users (mode {:o}): cr's trackers will not listen there \
             (chmod 700 it)",
            dir.display(),
            m.mode() & 0o7777
        );
    }
    Ok(dir)
}

/// The socket path of the tracker of `pid`.
pub fn socket_path(pid: i32) -> Result<PathBuf> {
    Ok(dir()?.join(format!("{pid}.sock")))
}

/// The tracker's claim on a target: the lock held for its life, and its socket path (removed
/// when the claim is dropped).
pub struct Claim {
    _lock: Flock<File>,
    pub socket: PathBuf,
}

impl Claim {
    /// Claims `pid` for this tracker. Err names the other tracker if one holds it.
    pub fn take(pid: i32) -> Result<Claim> {
        let dir = dir()?;
        let lock_path = dir.join(format!("{pid}.lock"));
        loop {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&lock_path)
                .with_context(|| format!("open {}", lock_path.display()))?;
            let lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    bail!(
                        "PID {pid} already has a tracker ({} is locked)",
                        lock_path.display()
                    )
                }
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("flock {}", lock_path.display()))
                }
            };
            // A tracker that was exiting may have removed the file we locked: the lock only
            // counts on the file the path names now.
            let held = lock.metadata().context("fstat the tracker lock")?;
            match std::fs::symlink_metadata(&lock_path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                _ => continue,
            }
            let socket = dir.join(format!("{pid}.sock"));
            remove_stale(&socket)?;
            return Ok(Claim {
                _lock: lock,
                socket,
            });
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // The socket first, while the lock still says it is ours; the lock file goes with it
        // (a tracker starting meanwhile re-checks that the path still names what it locked).
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.socket.parent() {
            if let Some(pid) = self
                .socket
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_owned)
            {
                let _ = std::fs::remove_file(dir.join(format!("{pid}.lock")));
            }
        }
    }
}

/// Removes a socket file a killed tracker left (we hold the lock: no live tracker uses it).
/// Anything else at that path is refused rather than removed.
fn remove_stale(socket: &Path) -> Result<()> {
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket)
            .with_context(|| format!("remove the stale tracker socket {}", socket.display())),
        Ok(_) => bail!(
            "{} exists and is not a socket: not removing it",
            socket.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("stat {}", socket.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_refused_and_a_dropped_one_frees_the_pid() {
        // A PID no process has (beyond pid_max's default range is fine: only names are made).
        let pid = 0x3fff_fff0;
        let a = Claim::take(pid).unwrap();
        let err = Claim::take(pid).err().expect("second claim refused");
        assert!(
            format!("{err:#}").contains("already has a tracker"),
            "{err:#}"
        );
        drop(a);
        let b = Claim::take(pid).unwrap();
        drop(b);
        assert!(!socket_path(pid).unwrap().exists());
    }
}
