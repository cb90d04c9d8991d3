//! What the dump knows of an fd before anything is copied ([`Probe`]): its link target, fdinfo,
//! stat and what they say it is ([`classify`], pure), and for a socket its type; and what the
//! kinds share while a process's fds are dumped ([`DumpCx`]).

use std::fs::Metadata;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::Result;

use super::scratch::Scratch;
use crate::kernel::proc;
use crate::kernel::sys::pidfd::pidfd_getfd;
use crate::kernel::sys::sock::SockType;
use crate::tcp::DumpNet;

/// Character devices that need no state beyond their path.
pub const PLAIN_CHAR_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// What an fd's link target and file type say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A file or directory reachable by `path`.
    Path { path: String },
    /// A file or directory whose name was removed; `path` is the name it had.
    Unlinked { path: String },
    /// A memfd; `name` is what memfd_create was given.
    Memfd { name: String },
    /// A plain character device (/dev/null & co.).
    CharDev { path: String },
    /// A named pipe at `path`.
    Fifo { path: String },
    /// An anonymous pipe.
    Pipe,
    /// A terminal (a pty slave, /dev/tty*, the console): with --shell-job it is dumped as an
    /// external terminal, which restore replaces with cr's own.
    Tty { path: String },
    /// Something none of the path-based kinds is: the text says what it is (for the error
    /// message, unless a kind recognises it by other means: a socket, an anonymous inode).
    Unsupported(String),
}

/// The broad file type of an fd, from its stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FType {
    File,
    Dir,
    Chr,
    Blk,
    Fifo,
    Sock,
    Other,
}

impl FType {
    pub fn of(m: &Metadata) -> FType {
        let t = m.file_type();
        if t.is_file() {
            FType::File
        } else if t.is_dir() {
            FType::Dir
        } else if t.is_char_device() {
            FType::Chr
        } else if t.is_block_device() {
            FType::Blk
        } else if t.is_fifo() {
            FType::Fifo
        } else if t.is_socket() {
            FType::Sock
        } else {
            FType::Other
        }
    }
}

/// Names an anonymous-inode file for people: `anon_inode:[eventfd]` → "an eventfd".
fn anon_inode_kind(name: &str) -> String {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    match bare {
        "eventfd" => "an eventfd".into(),
        "eventpoll" => "an epoll instance".into(),
        "signalfd" => "a signalfd".into(),
        "timerfd" => "a timerfd".into(),
        "inotify" => "an inotify instance".into(),
        "fanotify" => "a fanotify instance".into(),
        "userfaultfd" => "a userfaultfd".into(),
        "pidfd" => "a pidfd".into(),
        "io_uring" => "an io_uring instance".into(),
        "perf_event" => "a perf event".into(),
        b if b.starts_with("bpf") => format!("a BPF object ({b})"),
        b => format!("an anonymous-inode file ({b})"),
    }
}

/// Is `path` a terminal device cr would need --shell-job for?
fn is_terminal(path: &str) -> bool {
    path.starts_with("/dev/pts/")
        || path.starts_with("/dev/tty")
        || path == "/dev/console"
        || path == "/dev/ptmx"
}

/// A pty master (/dev/ptmx, /dev/pts/ptmx): a terminal whose other side is the process itself.
fn is_pty_master(path: &str) -> bool {
    path == "/dev/ptmx" || path == "/dev/pts/ptmx"
}

/// Decides what an fd is from its link target (`/proc/PID/fd/N`), its file type and link count,
/// and whether the target path, as printed, names this very file (`names_self`: a file really
/// called "x (deleted)" is not an unlinked "x"). Pure, so its cases are unit-tested.
pub fn classify(target: &str, ftype: FType, nlink: u64, names_self: bool) -> FdKind {
    if let Some(rest) = target.strip_prefix("anon_inode:") {
        return FdKind::Unsupported(anon_inode_kind(rest));
    }
    if target.starts_with("socket:[") || ftype == FType::Sock {
        return FdKind::Unsupported("a socket".into());
    }
    if target.starts_with("pipe:[") {
        return FdKind::Pipe;
    }
    if !target.starts_with('/') {
        // nsfs ("net:[4026531840]"), and whatever else has no path.
        let what = target.split(':').next().unwrap_or(target);
        return FdKind::Unsupported(format!("a {what} file with no path"));
    }
    let deleted = nlink == 0 || (target.ends_with(" (deleted)") && !names_self);
    let path = match target.strip_suffix(" (deleted)") {
        Some(p) if deleted => p.to_string(),
        _ => target.to_string(),
    };
    if let Some(name) = path.strip_prefix("/memfd:").filter(|_| deleted) {
        if ftype == FType::File {
            return FdKind::Memfd { name: name.into() };
        }
        return FdKind::Unsupported("a memfd".into());
    }
    match ftype {
        FType::Chr if is_pty_master(&path) => {
            FdKind::Unsupported("a terminal (a pty master)".into())
        }
        FType::Chr if is_terminal(&path) && !deleted => FdKind::Tty { path },
        FType::Chr if is_terminal(&path) => FdKind::Unsupported("a terminal".into()),
        FType::Chr if PLAIN_CHAR_DEVICES.contains(&path.as_str()) && !deleted => {
            FdKind::CharDev { path }
        }
        FType::Chr => FdKind::Unsupported("a character device".into()),
        FType::Blk => FdKind::Unsupported("a block device".into()),
        FType::Fifo if deleted => FdKind::Unsupported("an unlinked FIFO".into()),
        FType::Fifo => FdKind::Fifo { path },
        FType::Dir if deleted => FdKind::Unsupported("a removed directory".into()),
        FType::File if deleted && nlink > 0 => FdKind::Unsupported(format!(
            "a file whose name was removed but which has {nlink} other link(s)"
        )),
        FType::File if deleted => FdKind::Unlinked { path },
        FType::File | FType::Dir => FdKind::Path { path },
        FType::Sock => FdKind::Unsupported("a socket".into()),
        FType::Other => FdKind::Unsupported("a file of unknown type".into()),
    }
}

/// Is the link target of fd `fd` of `pid` valid UTF-8 (as opposed to lossily converted)?
pub(super) fn utf8_link(pid: i32, fd: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.into_os_string().into_string().is_ok())
        .unwrap_or(false)
}

/// Does `path` (as printed in the fd link) name the same inode as the fd?
pub(super) fn names_same_inode(path: &str, meta: &Metadata) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        .unwrap_or(false)
}

/// What the dump knows of one fd before anything is copied: what [`FileKind::recognise`]
/// decides by, and [`FileKind::dump`] works from.
pub struct Probe<'a> {
    pub pid: i32,
    pub fd: i32,
    /// The fd's link target (`/proc/PID/fd/N`).
    pub target: String,
    pub info: proc::fdinfo::FdInfo,
    /// stat of the fd (its file).
    pub meta: Metadata,
    /// What the link target and the file type say ([`classify`]).
    pub class: FdKind,
    /// A socket's domain, type and protocol, and cr's copy of it (pidfd_getfd).
    pub sock: Option<(SockType, OwnedFd)>,
    /// The process's pidfd.
    pub pidfd: &'a OwnedFd,
}

impl Probe<'_> {
    /// A copy of the fd in cr (pidfd_getfd: the same open file description).
    pub fn copy(&self) -> Result<OwnedFd> {
        pidfd_getfd(self.pidfd, self.fd)
    }

    /// The socket's type, if the fd is a socket.
    pub fn sock_type(&self) -> Option<SockType> {
        self.sock.as_ref().map(|(t, _)| *t)
    }
}

/// What the kinds share while one process's fds are dumped.
pub struct DumpCx<'a> {
    pub pid: i32,
    /// Every live process of the dumped tree (an epoll entry's target may be in another; a
    /// socket's peer must be among them).
    pub tree: &'a [i32],
    /// --shell-job: terminals outside the tree are dumped (as external).
    pub shell_job: bool,
    /// The dump's network side (TCP sockets, the network lock).
    pub net: &'a mut DumpNet,
    /// Blobs for the image besides the descriptors: (image file name, bytes).
    pub contents: &'a mut Vec<(String, Vec<u8>)>,
    /// The kinds' own state for this process.
    pub scratch: Scratch,
    /// `-R`: the tree runs on after the dump (nothing of it may be consumed).
    pub leave_running: bool,
    /// The tree's UNIX sockets as sock_diag shows them, read at the first one of the dump.
    pub unix: &'a std::cell::OnceCell<super::unix::View>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_and_directories() {
        assert_eq!(
            classify("/tmp/a b", FType::File, 1, false),
            FdKind::Path {
                path: "/tmp/a b".into()
            }
        );
        assert_eq!(
            classify("/tmp", FType::Dir, 5, false),
            FdKind::Path {
                path: "/tmp".into()
            }
        );
        // Really named "x (deleted)": still linked, and the name is its own.
        assert_eq!(
            classify("/tmp/x (deleted)", FType::File, 1, true),
            FdKind::Path {
                path: "/tmp/x (deleted)".into()
            }
        );
    }

    #[test]
    fn unlinked_files() {
        assert_eq!(
            classify("/tmp/gone (deleted)", FType::File, 0, false),
            FdKind::Unlinked {
                path: "/tmp/gone".into()
            }
        );
        assert_eq!(
            classify("/tmp/#1234 (deleted)", FType::File, 0, false),
            FdKind::Unlinked {
                path: "/tmp/#1234".into()
            }
        );
        assert!(
            matches!(classify("/tmp/gone (deleted)", FType::File, 2, false), FdKind::Unsupported(w) if w.contains("2 other link"))
        );
        assert!(
            matches!(classify("/tmp/d (deleted)", FType::Dir, 0, false), FdKind::Unsupported(w) if w.contains("removed directory"))
        );
        assert_eq!(
            classify("/memfd:ring buf (deleted)", FType::File, 0, false),
            FdKind::Memfd {
                name: "ring buf".into()
            }
        );
    }

    #[test]
    fn pipes_fifos_devices() {
        assert_eq!(classify("pipe:[4242]", FType::Fifo, 1, false), FdKind::Pipe);
        assert_eq!(
            classify("/run/f", FType::Fifo, 1, false),
            FdKind::Fifo {
                path: "/run/f".into()
            }
        );
        assert_eq!(
            classify("/dev/null", FType::Chr, 1, false),
            FdKind::CharDev {
                path: "/dev/null".into()
            }
        );
        assert_eq!(
            classify("/dev/urandom", FType::Chr, 1, false),
            FdKind::CharDev {
                path: "/dev/urandom".into()
            }
        );
        assert_eq!(
            classify("/dev/pts/3", FType::Chr, 1, false),
            FdKind::Tty {
                path: "/dev/pts/3".into()
            }
        );
        assert_eq!(
            classify("/dev/ptmx", FType::Chr, 1, false),
            FdKind::Unsupported("a terminal (a pty master)".into())
        );
        assert_eq!(
            classify("/dev/kvm", FType::Chr, 1, false),
            FdKind::Unsupported("a character device".into())
        );
        assert_eq!(
            classify("/dev/sda", FType::Blk, 1, false),
            FdKind::Unsupported("a block device".into())
        );
    }

    #[test]
    fn things_without_a_path() {
        assert_eq!(
            classify("socket:[991]", FType::Sock, 1, false),
            FdKind::Unsupported("a socket".into())
        );
        assert_eq!(
            classify("anon_inode:[eventfd]", FType::Other, 1, false),
            FdKind::Unsupported("an eventfd".into())
        );
        assert_eq!(
            classify("anon_inode:[eventpoll]", FType::Other, 1, false),
            FdKind::Unsupported("an epoll instance".into())
        );
        assert_eq!(
            classify("anon_inode:inotify", FType::Other, 1, false),
            FdKind::Unsupported("an inotify instance".into())
        );
        assert_eq!(
            classify("anon_inode:bpf-map", FType::Other, 1, false),
            FdKind::Unsupported("a BPF object (bpf-map)".into())
        );
        assert_eq!(
            classify("net:[4026531840]", FType::File, 1, false),
            FdKind::Unsupported("a net file with no path".into())
        );
    }
}
