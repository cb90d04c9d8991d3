//! Writing an images directory: creating it, writing descriptor files into it atomically, and
//! committing it with `inventory.img` last.
//!
//! Why the ordering: a dump is complete only when `inventory.img` exists. Every other file is
//! written under a temporary name, fsynced and renamed; `commit` fsyncs the directory and only
//! then writes the inventory (itself temp + fsync + rename + fsync of the directory). So a
//! crash or an error at any point leaves a directory without an inventory, which
//! `ImageDir::open` refuses: a half-written image can never be restored.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;

use super::file::{self, Kind};
use super::names::INVENTORY;
use super::pb;
use super::wire::{Content, Sender};

/// Prepares `path` as an images directory for a dump: creates it (mode 0700) if missing. An
/// existing directory is fine (it may hold the log) unless it already holds a complete image.
pub fn create_images_dir(path: &Path) -> Result<()> {
    prepare_images_dir(path, false)
}

/// Like [`create_images_dir`]; with `overwrite`, an existing complete image is made incomplete
/// (its `inventory.img` removed) so the new dump replaces it.
pub fn prepare_images_dir(path: &Path, overwrite: bool) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => crate::bad_input!(
            "images dir {} exists and is not a directory",
            path.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // As CRIU: the directory itself is made, not a whole path a typo invented.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                if !parent.is_dir() {
                    crate::bad_input!(
                        "the parent of images dir {} ({}) does not exist: create it first",
                        path.display(),
                        parent.display()
                    );
                }
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .with_context(|| format!("cannot create images dir {}", path.display()))?;
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot use images dir {}", path.display()))
        }
    }
    // access(2) rather than trying a write: it also catches a read-only filesystem without
    // leaving anything behind.
    nix::unistd::access(
        path,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| {
        anyhow!(
            "images dir {} is not writable: {}",
            path.display(),
            e.desc()
        )
    })?;
    let inv = path.join(INVENTORY);
    if inv.exists() {
        if !overwrite {
            crate::bad_input!(
                "images dir {} already holds a complete image ({INVENTORY} exists); use another directory or remove it",
                path.display()
            );
        }
        std::fs::remove_file(&inv)
            .with_context(|| format!("cannot remove the old {}", inv.display()))?;
        fsync_dir(path)?;
    }
    Ok(())
}

/// fsync of a directory, so that renames in it are durable.
pub(crate) fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync images dir {}", path.display()))
}

/// The temporary name a file is written under before its rename. Our PID makes it unique
/// among concurrent writers; `O_EXCL` makes sure we never write into someone else's file.
pub(crate) fn temp_name(name: &str) -> String {
    format!(".{name}.tmp-{}", std::process::id())
}

/// Creates `dir/.NAME.tmp-PID` with `O_EXCL` and mode 0600 (a stale one from a dead cr with
/// our PID is removed first).
pub(crate) fn create_temp(dir: &Path, name: &str) -> Result<(File, PathBuf)> {
    let tmp = dir.join(temp_name(name));
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
    };
    let f = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)
                .with_context(|| format!("cannot remove stale {}", tmp.display()))?;
            open()
        }
        r => r,
    }
    .with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((f, tmp))
}

/// A file name must be a plain `*.img` name inside the directory.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') || !name.ends_with(".img") {
        bail!("bad image file name {name:?}: must be a plain NAME.img");
    }
    Ok(())
}

/// The list of files written so far, shared by the writer and its page writers.
#[derive(Default)]
pub(crate) struct Written(Mutex<Vec<pb::ImageFile>>);

impl Written {
    pub(crate) fn reserve(&self, name: &str) -> Result<()> {
        let list = self
            .0
            .lock()
            .map_err(|_| anyhow!("image file list poisoned"))?;
        if list.iter().any(|f| f.name == name) {
            bail!("{name} written twice in one dump");
        }
        Ok(())
    }
    pub(crate) fn add(&self, f: pb::ImageFile) -> Result<()> {
        let mut list = self
            .0
            .lock()
            .map_err(|_| anyhow!("image file list poisoned"))?;
        if list.iter().any(|e| e.name == f.name) {
            bail!("{} written twice in one dump", f.name);
        }
        list.push(f);
        Ok(())
    }
}

/// Writes one image. Shared by reference between threads (`write_msg` takes `&self`).
/// Created by [`ImageWriter::create`]; finished by [`ImageWriter::commit`]. Dropping it without
/// commit leaves an incomplete directory (no inventory), which is what a failed dump must leave.
pub struct ImageWriter {
    path: PathBuf,
    pub(crate) written: Arc<Written>,
    /// A page server that receives the page files (and page maps, or with
    /// [`Content::Image`] every file): see [`ImageWriter::send_to`].
    remote: Option<Arc<Sender>>,
}

impl ImageWriter {
    /// Starts an image in `path` (see [`create_images_dir`]: created 0700 if missing; refused if
    /// it already holds a complete image).
    pub fn create(path: &Path) -> Result<ImageWriter> {
        Self::create_with(path, false)
    }

    /// Like [`ImageWriter::create`], but an existing complete image in `path` is replaced.
    pub fn create_overwriting(path: &Path) -> Result<ImageWriter> {
        Self::create_with(path, true)
    }

    fn create_with(path: &Path, overwrite: bool) -> Result<ImageWriter> {
        prepare_images_dir(path, overwrite)?;
        Ok(ImageWriter {
            path: path.to_path_buf(),
            written: Arc::new(Written::default()),
            remote: None,
        })
    }

    /// Sends this image to a page server as it is written: page files go there instead of
    /// into the directory; page maps go there too and stay here (a later incremental dump
    /// plans against them); with [`Content::Image`] every descriptor is also sent and the
    /// inventory, sent last, makes the server's copy a complete image. `commit` returns only
    /// once the server has it all on disk.
    pub fn send_to(&mut self, to: Arc<Sender>) {
        self.remote = Some(to);
    }

    /// The page server this image goes to, if any.
    pub fn remote(&self) -> Option<&Arc<Sender>> {
        self.remote.as_ref()
    }

    /// The images directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `msg` framed as `kind` to `NAME` (e.g. [`core_file`]`(tid)`): temp file (0600,
    /// O_EXCL), fsync, rename. Records its size and CRC for the inventory.
    pub fn write_msg<M: Message>(&self, name: &str, kind: Kind, msg: &M) -> Result<()> {
        if kind == Kind::Pages || kind == Kind::Inventory {
            bail!(
                "{name}: {} files are not written with write_msg",
                kind.name()
            );
        }
        self.write_framed(name, kind, &msg.encode_to_vec())
    }

    /// Writes raw bytes (e.g. an unlinked file's content) framed as [`Kind::Blob`].
    pub fn write_blob(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write_framed(name, Kind::Blob, data)
    }

    fn write_framed(&self, name: &str, kind: Kind, payload: &[u8]) -> Result<()> {
        check_name(name)?;
        if name == INVENTORY {
            bail!("{INVENTORY} is written by commit");
        }
        self.written.reserve(name)?;
        let bytes = file::frame(kind, payload);
        write_atomically(&self.path, name, &bytes)?;
        if let Some(to) = &self.remote {
            if kind == Kind::PageMap || to.content() != Content::Pages {
                to.send_file(name, &bytes)?;
            }
        }
        self.written.add(pb::ImageFile {
            name: name.to_string(),
            size: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
        })
    }

    /// Makes `src/NAME` (a file of another image, as its inventory lists it) part of this
    /// image too, by a hard link: its bytes are not copied (a fold keeps the files it does not
    /// change).
    pub fn link_from(&self, src: &Path, f: &pb::ImageFile) -> Result<()> {
        check_name(&f.name)?;
        self.written.reserve(&f.name)?;
        let to = self.path.join(&f.name);
        std::fs::hard_link(src.join(&f.name), &to).with_context(|| {
            format!(
                "cannot link {} to {}",
                src.join(&f.name).display(),
                to.display()
            )
        })?;
        self.written.add(f.clone())
    }

    /// Completes the image: fsyncs the directory, then writes `inventory.img` listing every
    /// file written (its `files` and, if 0, `format_version` are filled in here). Returns the
    /// inventory as written.
    pub fn commit(self, mut inventory: pb::Inventory) -> Result<pb::Inventory> {
        let mut files = self
            .written
            .0
            .lock()
            .map_err(|_| anyhow!("image file list poisoned"))?
            .clone();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        inventory.files = files;
        if inventory.checkpoint_id == 0 {
            inventory.checkpoint_id = new_checkpoint_id()?;
        }
        if inventory.format_version == 0 {
            inventory.format_version = file::FORMAT_VERSION;
        }
        let bytes = file::frame(Kind::Inventory, &inventory.encode_to_vec());
        // The page server's part first: a local inventory names files that must exist there.
        if let Some(to) = &self.remote {
            if to.content() != Content::Pages {
                to.sync()?;
                to.send_file(INVENTORY, &bytes)?;
            }
            to.sync()?;
            // A migration goes on (more images, then the restore).
            if to.content() != Content::Migration {
                to.done()?;
            }
        }
        // Every file was fsynced before its rename; this makes the renames durable before the
        // inventory can exist.
        fsync_dir(&self.path)?;
        write_atomically(&self.path, INVENTORY, &bytes)?;
        fsync_dir(&self.path)?;
        Ok(inventory)
    }
}

/// 64 random bits (never 0): a checkpoint's id.
fn new_checkpoint_id() -> Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom for the checkpoint id")?;
    Ok(u64::from_le_bytes(b).max(1))
}

/// temp (0600, O_EXCL) + write + fsync + rename.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let (mut f, tmp) = create_temp(dir, name)?;
    let done = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|_| {
            std::fs::rename(&tmp, dir.join(name))
                .with_context(|| format!("cannot rename {} to {name}", tmp.display()))
        });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}
