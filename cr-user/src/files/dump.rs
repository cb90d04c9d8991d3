//! Collecting the fd table and the open files behind it.
//!
//! Each fd points at an open file description; fds sharing one description (dup, fork) get one
//! `FileEntry` (found with kcmp), so offsets stay shared after restore. What each description
//! is comes from the fd's link target and a stat through `/proc/PID/fd/N` ([`classify`]).
//!
//! Unread pipe and FIFO data is copied with tee(2), which leaves it in the pipe: a dump with
//! --leave-running changes nothing. The content of an open-but-unlinked file is saved once per
//! inode, however many descriptions point at it.
//!
//! Every fd of a kind cr cannot restore is reported in one error, naming each fd and its kind,
//! before any data is copied: the caller then detaches and the target runs on untouched.

use std::collections::{HashMap, HashSet};
use std::fs::Metadata;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use anyhow::{bail, Context, Result};

use crate::image::pb;
use crate::kernel::proc;
use crate::kernel::sys::{fd, kcmp};

/// Character devices that need no state beyond their path.
const PLAIN_CHAR_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Largest unlinked file whose content is saved in the image (CRIU's --ghost-limit, which
/// defaults to 1 MiB there; cr is more generous but still refuses to swallow huge files).
pub const GHOST_LIMIT: u64 = 512 << 20;

/// The fd table of one process and the descriptions it points at.
#[derive(Default)]
pub struct FdTable {
    pub fds: pb::Fds,
    pub files: Vec<pb::FileEntry>,
    /// Content of unlinked files: (image file name, bytes).
    pub contents: Vec<(String, Vec<u8>)>,
}

/// What an fd's link target and file type say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// A file or directory reachable by `path`.
    Path { path: String },
    /// A file or directory whose name was removed; `path` is the name it had.
    Unlinked { path: String },
    /// A plain character device (/dev/null & co.).
    CharDev { path: String },
    /// A named pipe at `path`.
    Fifo { path: String },
    /// An anonymous pipe.
    Pipe,
    /// A terminal (a pty slave, /dev/tty*, the console): with --shell-job it is dumped as an
    /// external terminal, which restore replaces with cr's own.
    Tty { path: String },
    /// Something cr cannot restore: the text says what it is (for the error message).
    Unsupported(String),
    /// A TCP socket cr can save (listening, or established with --tcp-established).
    Tcp,
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
    fn of(m: &Metadata) -> FType {
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
    if path.starts_with("/memfd:") && deleted {
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

/// kcmp(pid, pid, KCMP_FILE, a, b) == 0: the two fds share one open file description.
fn same_description(pid: i32, a: i32, b: i32) -> Result<bool> {
    kcmp::same_file(pid, a, pid, b)
}

/// fcntl(fd, cmd, arg) on one of cr's own fds, as a Result.
fn fcntl(fd: &OwnedFd, cmd: i32, arg: i32, what: &str) -> Result<i32> {
    fd::fcntl_int(fd, cmd, arg, what)
}

/// FIONREAD: bytes waiting in a pipe.
fn bytes_in_pipe(fd: &OwnedFd, what: &str) -> Result<usize> {
    Ok(fd::ioctl_int(fd, libc::FIONREAD, &format!("FIONREAD on {what}"))? as usize)
}

/// A pipe of cr's own with room for `capacity` bytes, both ends non-blocking.
fn pipe_pair(capacity: i32) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) =
        fd::pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK).context("pipe2 for a copy of pipe data")?;
    fcntl(
        &w,
        libc::F_SETPIPE_SZ,
        capacity,
        &format!("F_SETPIPE_SZ {capacity} on cr's copy pipe"),
    )?;
    Ok((r, w))
}

/// A readable fd of cr's own on the pipe or FIFO behind fd `fd` of `pid`: a duplicate of the
/// very description when it is readable, else a new read end opened through /proc (the target
/// is frozen, so the brief extra reader changes nothing it can see).
fn readable_end(pidfd: &OwnedFd, pid: i32, fd: i32, flags: u32) -> Result<OwnedFd> {
    if flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32 {
        return crate::kernel::sys::pidfd::pidfd_getfd(pidfd, fd);
    }
    let path = format!("/proc/{pid}/fd/{fd}");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("open {path} to read the pipe's buffer"))?;
    Ok(f.into())
}

/// Copies the unread bytes of a pipe/FIFO without consuming them (tee into a pipe of cr's own
/// of the same capacity, then read that). Returns (data, pipe capacity).
fn peek_pipe(src: &OwnedFd, what: &str) -> Result<(Vec<u8>, u32)> {
    let cap = fcntl(
        src,
        libc::F_GETPIPE_SZ,
        0,
        &format!("F_GETPIPE_SZ on {what}"),
    )?;
    let queued = bytes_in_pipe(src, what)?;
    if queued == 0 {
        return Ok((Vec::new(), cap as u32));
    }
    // Same capacity, hence the same number of buffer slots: tee can copy every buffer.
    let (r, w) = pipe_pair(cap)?;
    let n = fd::tee(src, &w, queued, libc::SPLICE_F_NONBLOCK)
        .with_context(|| format!("tee from {what}"))?;
    if n != queued {
        bail!("{what} holds {queued} unread bytes but tee copied only {n}");
    }
    let mut data = vec![0u8; queued];
    let mut f = std::fs::File::from(r);
    f.read_exact(&mut data)
        .with_context(|| format!("read the copy of {what}'s buffer"))?;
    Ok((data, cap as u32))
}

/// Is the link target of fd `fd` of `pid` valid UTF-8 (as opposed to lossily converted)?
fn utf8_link(pid: i32, fd: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.into_os_string().into_string().is_ok())
        .unwrap_or(false)
}

/// Does `path` (as printed in the fd link) name the same inode as the fd?
fn names_same_inode(path: &str, meta: &Metadata) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
        .unwrap_or(false)
}

/// One fd as surveyed, before anything is copied.
struct Surveyed {
    fd: i32,
    target: String,
    info: proc::fdinfo::FdInfo,
    meta: Metadata,
    kind: FdKind,
}

/// First pass: what every fd is. Reads only /proc; fails naming every fd cr cannot dump, so a
/// refused dump has not touched a single pipe.
fn survey(pid: i32, shell_job: bool, net: &crate::tcp::DumpNet) -> Result<Vec<Surveyed>> {
    let fds =
        proc::fdinfo::list_fds(pid).with_context(|| format!("listing the fds of PID {pid}"))?;
    let mut out = Vec::with_capacity(fds.len());
    let mut refused: Vec<String> = Vec::new();
    for (fd, target) in fds {
        let info =
            proc::fdinfo::read_fdinfo(pid, fd).with_context(|| format!("fd {fd} of PID {pid}"))?;
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .with_context(|| format!("stat fd {fd} ({target}) of PID {pid}"))?;
        let names_self = target.ends_with(" (deleted)") && names_same_inode(&target, &meta);
        let mut kind = classify(&target, FType::of(&meta), meta.nlink(), names_self);
        if target.contains(char::REPLACEMENT_CHARACTER) && !utf8_link(pid, fd) {
            // The image stores paths as UTF-8; a lossy one would reopen the wrong name.
            kind = FdKind::Unsupported("a file whose path is not valid UTF-8".into());
        }
        if target.starts_with("socket:[") {
            let mine = crate::kernel::sys::pidfd::pidfd_getfd(
                crate::kernel::sys::pidfd::pidfd_open(pid)?,
                fd,
            )?;
            kind = match net
                .refusal(&mine)
                .with_context(|| format!("fd {fd} ({target}) of PID {pid}"))?
            {
                None => FdKind::Tcp,
                Some(what) => FdKind::Unsupported(what),
            };
        }
        if let FdKind::Tty { .. } = &kind {
            if !shell_job {
                refused.push(format!(
                    "fd {fd} is a terminal ({target}); dump it with --shell-job (-j)"
                ));
            }
        }
        if let FdKind::Unsupported(what) = &kind {
            let hint = match (what.as_str(), shell_job) {
                ("a terminal", false) => "; dump it with --shell-job (-j)",
                _ => "",
            };
            refused.push(format!("fd {fd} is {what} ({target}){hint}"));
        }
        out.push(Surveyed {
            fd,
            target,
            info,
            meta,
            kind,
        });
    }
    if !refused.is_empty() {
        bail!(
            "PID {pid} has open files cr cannot dump: {}",
            refused.join("; ")
        );
    }
    Ok(out)
}

/// Collects the fd table of `pid`. `next_id` numbers descriptions across the whole tree.
pub fn collect(
    pid: i32,
    next_id: &mut u32,
    shell_job: bool,
    net: &mut crate::tcp::DumpNet,
) -> Result<FdTable> {
    let surveyed = survey(pid, shell_job, net)?;
    let mut table = FdTable::default();
    let pidfd = crate::kernel::sys::pidfd::pidfd_open(pid)?;
    // Descriptions seen so far, (fd, file id) by (dev, ino), to compare new fds with kcmp.
    let mut seen: HashMap<(u64, u64), Vec<(i32, u32)>> = HashMap::new();
    // Pipes and FIFOs whose data is already saved, and which pipe ends are held.
    let mut pipes_saved: HashSet<(u64, u64)> = HashSet::new();
    let mut pipe_ends: HashMap<u64, (bool, bool)> = HashMap::new();
    // Unlinked inodes whose content is already saved: image file name.
    let mut ghosts: HashMap<(u64, u64), String> = HashMap::new();
    for Surveyed {
        fd,
        target,
        info,
        meta,
        kind,
    } in surveyed
    {
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let key = (meta.dev(), meta.ino());
        let mut shared_with = None;
        for &(ofd, id) in seen.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
            if same_description(pid, ofd, fd)? {
                shared_with = Some(id);
                break;
            }
        }
        if let Some(id) = shared_with {
            table.fds.fds.push(pb::Fd {
                fd,
                file_id: id,
                cloexec,
            });
            continue;
        }
        let id = *next_id;
        let kind = match kind {
            FdKind::Pipe => {
                let pipe_id = meta.ino();
                let ends = pipe_ends.entry(pipe_id).or_default();
                if info.flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                    ends.1 = true;
                } else {
                    ends.0 = true;
                }
                let (data, capacity) = if pipes_saved.insert(key) {
                    let src = readable_end(&pidfd, pid, fd, info.flags)?;
                    peek_pipe(&src, &format!("pipe {target} (fd {fd} of PID {pid})"))?
                } else {
                    (Vec::new(), 0)
                };
                pb::file_entry::Kind::Pipe(pb::PipeFile {
                    pipe_id,
                    data,
                    capacity,
                })
            }
            FdKind::Fifo { path } => {
                let (data, capacity) = if pipes_saved.insert(key) {
                    let src = readable_end(&pidfd, pid, fd, info.flags)?;
                    peek_pipe(&src, &format!("FIFO {path} (fd {fd} of PID {pid})"))?
                } else {
                    (Vec::new(), 0)
                };
                pb::file_entry::Kind::Fifo(pb::FifoFile {
                    path,
                    pipe_id: meta.ino(),
                    data,
                    capacity,
                })
            }
            FdKind::CharDev { path } => pb::file_entry::Kind::Chr(pb::CharDev {
                path,
                rdev: meta.rdev() as u32,
            }),
            FdKind::Tty { path } => pb::file_entry::Kind::Tty(pb::TtyFile {
                path,
                rdev: meta.rdev() as u32,
            }),
            FdKind::Path { path } => {
                pb::file_entry::Kind::Reg(reg_file(path, &meta, false, String::new()))
            }
            FdKind::Unlinked { path } => {
                let content = match ghosts.get(&key) {
                    Some(name) => name.clone(),
                    None => {
                        let name = format!("file-{id}.img");
                        let link = format!("/proc/{pid}/fd/{fd}");
                        table.contents.push((
                            name.clone(),
                            read_ghost(&link, &path, fd, pid, meta.size())?,
                        ));
                        ghosts.insert(key, name.clone());
                        name
                    }
                };
                pb::file_entry::Kind::Reg(reg_file(path, &meta, true, content))
            }
            FdKind::Tcp => pb::file_entry::Kind::Tcp(
                net.dump_socket(
                    crate::kernel::sys::pidfd::pidfd_getfd(&pidfd, fd)?,
                    meta.ino(),
                )
                .with_context(|| format!("fd {fd} ({target}) of PID {pid}"))?,
            ),
            FdKind::Unsupported(what) => bail!("fd {fd} of PID {pid} is {what} ({target})"),
        };
        *next_id += 1;
        let flags = info.flags & !(libc::O_CLOEXEC as u32);
        table.files.push(pb::FileEntry {
            id,
            flags,
            pos: info.pos,
            kind: Some(kind),
        });
        table.fds.fds.push(pb::Fd {
            fd,
            file_id: id,
            cloexec,
        });
        seen.entry(key).or_default().push((fd, id));
    }
    for (ino, (rd, wr)) in &pipe_ends {
        if !(rd & wr) {
            log::warn!(
                "PID {pid}: only the {} end of pipe:[{ino}] is in the dumped tree; after restore its other end is gone",
                if *rd { "read" } else { "write" }
            );
        }
    }
    Ok(table)
}

fn reg_file(path: String, meta: &Metadata, unlinked: bool, content: String) -> pb::RegFile {
    pb::RegFile {
        path,
        size: meta.size(),
        mode: meta.mode(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        dev: meta.dev(),
        inode: meta.ino(),
        unlinked,
        content,
        uid: meta.uid(),
        gid: meta.gid(),
    }
}

/// Reads the content of an unlinked file through its fd link (a new description: the target's
/// offset is not touched).
fn read_ghost(link: &str, path: &str, fd: i32, pid: i32, size: u64) -> Result<Vec<u8>> {
    if size > GHOST_LIMIT {
        bail!("fd {fd} of PID {pid} is the unlinked file {path} of {size} bytes: larger than the {GHOST_LIMIT}-byte limit for saving unlinked files");
    }
    std::fs::read(link)
        .with_context(|| format!("read the unlinked file {path} (fd {fd} of PID {pid})"))
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
            classify("/memfd:buf (deleted)", FType::File, 0, false),
            FdKind::Unsupported("a memfd".into())
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
