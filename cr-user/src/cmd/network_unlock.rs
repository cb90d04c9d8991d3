//! `cr network-unlock -D DIR`: removes the network lock that `dump --tcp-established` left
//! pinned for the image in DIR (restore removes it itself; this is for an image that will not
//! be restored, or a tree that runs on after its cr was killed before killing it).

use anyhow::Result;

use crate::cli::NetworkUnlockOpts;
use crate::image::dir::ImageDir;

pub fn run(o: &NetworkUnlockOpts) -> Result<()> {
    let dir = ImageDir::open(&o.images_dir)?;
    if !crate::tcp::unlock(&dir)? {
        crate::bad_input!(
            "{} holds no network lock record ({}): its dump locked no connection",
            o.images_dir.display(),
            crate::tcp::LOCK_RECORD
        );
    }
    Ok(())
}
