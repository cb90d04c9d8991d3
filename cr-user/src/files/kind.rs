//! The trait every kind of open file implements (CRIU's fdtype_ops).

use anyhow::Result;

use super::opener::Opener;
use super::probe::{DumpCx, Probe};
use super::scratch::Scratch;
use crate::image::pb;
use crate::image::pb::file_entry::Kind;

/// What [`FileKind::recognise`] says of an fd of its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// cr can dump it.
    Dump,
    /// cr will not dump it. The message is "fd N is {what} (TARGET){hint}"; `allowed_by` names
    /// the flag that would allow it, if one would.
    Refuse {
        what: String,
        hint: &'static str,
        allowed_by: Option<&'static str>,
    },
}

/// One kind of open file description: how cr recognises it, saves it into the image,
/// recreates it in a restored task and finishes it once every fd exists.
///
/// Dump: [`recognise`](FileKind::recognise) is asked of every fd (first kind of
/// [`super::KINDS`] to answer wins) before anything is copied; then [`dump`](FileKind::dump)
/// saves each description once per process (fds sharing it point at its id).
///
/// Restore: [`validate`](FileKind::validate) before any task exists, [`plan`](FileKind::plan)
/// once for the tree, then per process [`open`](FileKind::open) for each description (at a
/// temporary fd: made by the task with remote syscalls, or made in cr and passed in with
/// [`Opener::install_from_cr`]), [`opened`](FileKind::opened) when all are open and
/// [`fixup`](FileKind::fixup) once every fd is in place (epoll registrations, socket peers).
pub trait FileKind: Sync {
    /// For messages ("a pipe").
    fn name(&self) -> &'static str;

    /// Whether fd `p` is of this kind (None: not this kind).
    fn recognise(&self, p: &Probe, cx: &DumpCx) -> Result<Option<Verdict>>;

    /// The image entry of the description first seen at fd `p`, file id `id`.
    fn dump(&self, p: &Probe, id: u32, cx: &mut DumpCx) -> Result<Kind>;

    /// After every fd of the process was dumped.
    fn dumped_process(&self, _cx: &mut DumpCx) {}

    /// Whether an image entry is of this kind.
    fn owns(&self, k: &Kind) -> bool;

    /// What identifies the object behind a description, to look for the same description
    /// in other processes (kcmp); None: descriptions of this kind are never merged across
    /// processes.
    fn identity(&self, _k: &Kind) -> Option<String> {
        None
    }

    /// The image blobs (`file-ID.img`) an entry refers to.
    fn blobs<'k>(&self, _k: &'k Kind) -> Vec<&'k str> {
        Vec::new()
    }

    /// Restore, before anything is created: what the entry needs is still there.
    fn validate(&self, _k: &Kind) -> Result<()> {
        Ok(())
    }

    /// Restore, once: what the fd tables of the tree share (state for [`Opener::tree`]).
    fn plan(&self, _tables: &[&pb::Fds], _files: &pb::Files, _tree: &mut Scratch) {}

    /// Opens the description `f` (with `flags`, its status flags minus the creation ones) in
    /// the task at a temporary fd; `fd_no` is the first fd that uses it (for messages).
    fn open(&self, f: &pb::FileEntry, flags: u32, fd_no: i32, o: &mut Opener) -> Result<u64>;

    /// Every description of the process is open; its temporary fds are still there.
    fn opened(&self, _o: &mut Opener) -> Result<()> {
        Ok(())
    }

    /// Every fd of the process is in place.
    fn fixup(&self, _o: &mut Opener) -> Result<()> {
        Ok(())
    }
}
