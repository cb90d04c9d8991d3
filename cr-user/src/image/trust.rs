//! Whether a root restore may believe an image. Restore recreates whatever credentials,
//! capabilities and code the image holds; run by root, it would turn any image a user could
//! write (their own dump, credentials edited, checksums recomputed) into a root process. So a
//! root restore takes only images nobody but root could have written: every directory of the
//! chain and every file the inventories list owned by root and not writable by group or others,
//! unless `--trust-image-owner` says the owner is trusted.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};

use super::chain::ImageChain;

/// Refuses (naming `--trust-image-owner`) an image a root restore should not believe.
pub fn check(chain: &ImageChain, trust_owner: bool) -> Result<()> {
    if trust_owner || !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    for img in chain.images() {
        // The directory as resolved: `DIR/latest` of `cr periodic` is a symlink (mode 777 by
        // nature); what must be root's and unwritable is the directory it names.
        let dir = &std::fs::canonicalize(img.path())
            .with_context(|| format!("resolve {}", img.path().display()))?;
        check_path(dir)?;
        for f in img.files() {
            check_path(&dir.join(&f.name))?;
        }
    }
    Ok(())
}

fn check_path(p: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
    if m.uid() != 0 {
        crate::refuse!(
            "--trust-image-owner",
            "{} belongs to uid {}: a root restore would run what that user could write as root; restore as that user, or say --trust-image-owner",
            p.display(),
            m.uid()
        );
    }
    if m.mode() & 0o022 != 0 {
        crate::refuse!(
            "--trust-image-owner",
            "{} is writable by its group or others (mode {:o}): anyone could have changed the image; fix its mode, or say --trust-image-owner",
            p.display(),
            m.mode() & 0o7777
        );
    }
    Ok(())
}
