//! Open files. Each kind of open file description implements [`FileKind`]: how it is
//! recognised, saved into the image, recreated and finished once every fd exists. The fd
//! table is collected by [`dump`] and rebuilt by [`restore`]; descriptions shared across the
//! processes of a tree get one id ([`dedup`]).
//!
//! A new kind is a file here, a line in [`KINDS`] and its message in `proto/cr.proto`'s
//! `FileEntry`.

pub mod dedup;
pub mod device;
pub mod dump;
pub mod epoll;
pub mod eventfd;
pub mod ghost;
pub mod inotify;
pub mod kind;
pub mod mapped;
pub mod memfd;
pub mod objects;
pub mod opener;
pub mod pipe;
pub mod probe;
pub mod regular;
pub mod restore;
pub mod scratch;
pub mod signalfd;
pub mod tcp;
pub mod timerfd;
pub mod tty;
pub mod unix;

pub use kind::{FileKind, Verdict};
pub use opener::Opener;
pub use probe::{DumpCx, Probe};
pub use scratch::Scratch;

use crate::image::pb::file_entry::Kind;

/// Every kind of open file cr knows, in the order they are asked to recognise an fd.
pub static KINDS: &[&dyn FileKind] = &[
    &regular::Regular,
    &ghost::Ghost,
    &memfd::Memfd,
    &pipe::Pipe,
    &pipe::Fifo,
    &device::CharDevice,
    &tty::Terminal,
    &tcp::TcpSocket,
    &eventfd::Eventfd,
    &timerfd::Timerfd,
    &signalfd::Signalfd,
    &epoll::Epoll,
    &inotify::Inotify,
    &inotify::Fanotify,
    &unix::UnixSocket,
];

/// The kind of an image entry.
pub fn kind_of(k: &Kind) -> Option<&'static dyn FileKind> {
    KINDS.iter().copied().find(|kind| kind.owns(k))
}
