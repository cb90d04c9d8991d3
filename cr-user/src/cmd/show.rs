//! `cr show DIR|FILE` (also `-f FILE`, `-D DIR`): an image file, or a whole images directory,
//! as pretty JSON on stdout ([`crate::image::show::render`]); `cr show DIR VIEW` one of the
//! human views (`ps`, `fds`, `mems`, `stats`: [`crate::image::show::render_view`]).

use std::io::Write;

use anyhow::{Context, Result};

use crate::cli::{ShowOpts, ShowView};
use crate::image::show::View;

/// Entry point of `cr show`.
pub fn run(o: &ShowOpts) -> Result<()> {
    let mut o = o.clone();
    // `cr show -D DIR ps`: clap hands "ps" to the positional path.
    if o.view.is_none() && (o.file.is_some() || o.images_dir.is_some()) {
        if let Some(v) = o
            .path
            .as_deref()
            .and_then(|p| p.to_str())
            .and_then(view_named)
        {
            o.view = Some(v);
            o.path = None;
        }
    }
    let given: Vec<&std::path::PathBuf> = [&o.path, &o.file, &o.images_dir]
        .into_iter()
        .flatten()
        .collect();
    let path = match given.as_slice() {
        [p] => p,
        [] => crate::bad_input!("cr show: name an image file or an images directory (cr show DIR|FILE, -f FILE or -D DIR)"),
        _ => crate::bad_input!("cr show: give only one of DIR|FILE, -f FILE, -D DIR"),
    };
    let text = match o.view {
        None => crate::image::show::render(path),
        Some(v) => crate::image::show::render_view(path, view(v)),
    }
    .map_err(crate::refusal::BadInput::wrap)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|_| out.flush())
        .context("cannot write to stdout")
}

fn view(v: ShowView) -> View {
    match v {
        ShowView::Ps => View::Ps,
        ShowView::Fds => View::Fds,
        ShowView::Mems => View::Mems,
        ShowView::Stats => View::Stats,
    }
}

fn view_named(s: &str) -> Option<ShowView> {
    use clap::ValueEnum;
    ShowView::from_str(s, false).ok()
}
