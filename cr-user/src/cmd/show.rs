//! `cr show DIR|FILE` (also `-f FILE`, `-D DIR`): an image file, or a whole images directory,
//! as pretty JSON on stdout ([`crate::image::show::render`]).

use std::io::Write;

use anyhow::{Context, Result};

use crate::cli::ShowOpts;

/// Entry point of `cr show`.
pub fn run(o: &ShowOpts) -> Result<()> {
    let given: Vec<&std::path::PathBuf> = [&o.path, &o.file, &o.images_dir]
        .into_iter()
        .flatten()
        .collect();
    let path = match given.as_slice() {
        [p] => p,
        [] => crate::bad_input!("cr show: name an image file or an images directory (cr show DIR|FILE, -f FILE or -D DIR)"),
        _ => crate::bad_input!("cr show: give only one of DIR|FILE, -f FILE, -D DIR"),
    };
    let text = crate::image::show::render(path).map_err(crate::refusal::BadInput::wrap)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
        .context("cannot write to stdout")
}
