//! `cr page-server`: receives what a `cr dump|pre-dump --page-server` sends (the pages, or a
//! whole image) into an images directory, then exits. The transfer itself is
//! `image::wire::receive`.

use std::io::Write;
use std::net::TcpListener;

use anyhow::{Context, Result};

use crate::cli::PageServerOpts;
use crate::image::dir::prepare_images_dir;
use crate::image::wire;
use crate::kernel::sys::fd;

pub fn run(o: &PageServerOpts) -> Result<()> {
    // The fd was passed for us alone: take it before anything can fail.
    let mut status = o
        .status_fd
        .map(|f| std::fs::File::from(fd::take_inherited(f)));
    prepare_images_dir(&o.images_dir, false)?;
    if let Some(prev) = &o.prev_images_dir {
        let p = o.images_dir.join(prev);
        if !p.is_dir() {
            crate::bad_input!(
                "--prev-images-dir {}: {} is not a directory (the parent image must be received first)",
                prev.display(),
                p.display()
            );
        }
    }
    let listener = TcpListener::bind((o.address.as_str(), o.port))
        .with_context(|| format!("cannot listen on {}:{}", o.address, o.port))?;
    let port = listener
        .local_addr()
        .context("the page server's own address")?
        .port();
    log::info!(
        "page server listening on {}:{port}, receiving into {}",
        o.address,
        o.images_dir.display()
    );
    if let Some(mut s) = status.take() {
        writeln!(s, "{port}").context("write the status fd")?;
    }
    let (stream, peer) = listener.accept().context("accepting a connection")?;
    drop(listener);
    log::info!("connection from {peer}");
    let got = wire::receive(&stream, &o.images_dir)
        .with_context(|| format!("receiving from {peer} into {}", o.images_dir.display()))?;
    log::info!(
        "received {} files ({} MiB){} from {peer}",
        got.files.len(),
        got.bytes >> 20,
        if got.complete_image {
            ", a complete image,"
        } else {
            ""
        }
    );
    Ok(())
}
