//! `cr show` (see `cmd::show`): an image file, or a whole images directory, as JSON
//! ([`render`], [`json`]); or one of the human views of an images directory, like crit's
//! `x DIR ps|fds|mems` ([`render_view`]): [`ps`], [`fds`], [`mems`], [`stats`] (also what
//! `--display-stats` prints), laid out by [`table`].

pub mod fds;
pub mod json;
pub mod mems;
pub mod ps;
pub mod stats;
pub mod table;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

pub use json::render;

use crate::image::chain::ImageChain;
use crate::image::dir::{ImageDir, INVENTORY};

/// A human view of an images directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Ps,
    Fds,
    Mems,
    Stats,
}

/// The text of `view` for the image at `path`. A `cr periodic` directory stands for the
/// checkpoint its `latest` names.
pub fn render_view(path: &Path, view: View) -> Result<String> {
    let path = image_path(path)?;
    match view {
        View::Ps => ps::render(&process_image(&path, "ps")?),
        View::Fds => fds::render(&process_image(&path, "fds")?),
        View::Mems => mems::render(&ImageDir::open(&path)?),
        View::Stats => stats::render(&ImageChain::open(&path)?),
    }
}

/// `path`, or the checkpoint `latest` names when `path` is a `cr periodic` directory.
fn image_path(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        bail!(
            "{} is not an images directory (the views read a whole image; `cr show FILE` prints one file)",
            path.display()
        );
    }
    if !path.join(INVENTORY).exists() && !crate::image::fold::sequence(path)?.is_empty() {
        let latest = path.join("latest");
        if latest.join(INVENTORY).exists() {
            return Ok(latest);
        }
        bail!(
            "{} is a cr periodic directory without a latest checkpoint: name one of its checkpoints",
            path.display()
        );
    }
    Ok(path.to_path_buf())
}

/// The image at `path`, which must describe processes (not be a pre-dump).
fn process_image(path: &Path, view: &str) -> Result<ImageDir> {
    let img = ImageDir::open(path)?;
    if img.inventory().flags & crate::image::names::DUMP_F_PRE_DUMP != 0 {
        bail!(
            "{} is a pre-dump (memory only): it has no processes to show as {view}; try `cr show {} mems` or `stats`",
            path.display(),
            path.display()
        );
    }
    Ok(img)
}
