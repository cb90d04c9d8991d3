//! `cr migrate`: live migration over one TCP connection (the wire of `image::wire`).
//!
//! Source (`cr migrate -t PID --to HOST:PORT -D DIR`): pre-copy rounds while the tree runs
//! (each a pre-dump sending what the tracker says changed since the last, as a whole image
//! `pre-N` into the destination's directory), until the dirty set stops shrinking, fits
//! [`SMALL_ENOUGH`] or the rounds run out; then the final dump on top of the last round, the
//! tree left frozen (its connections locked) while the destination restores; killed only once
//! the destination says the tree runs there. Any failure before that resumes the tree here,
//! its connections unlocked and its tracker stopped. One progress line per round.
//!
//! Destination (`cr migrate --listen PORT -D DIR`): receives the images into DIR/NAME, restores
//! DIR/final (detached) when asked, says so, and exits once the source has let its tree go.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::{DumpOpts, Global, MigrateOpts, RestoreOpts};
use crate::image::dir::{self as imgdir, create_images_dir, ImageDir};
use crate::image::wire::{self, Content, Sender};
use crate::kernel::sys::fd;

/// A round that copies at most this many bytes ends the pre-copy: the final freeze has little
/// left to copy.
const SMALL_ENOUGH: u64 = 2 << 20;
/// A round that copies more than this share of the previous one's pages is not converging.
const SHRINK: f64 = 0.8;
const PAGE: u64 = 4096;
/// The name of the final image in the destination's directory.
const FINAL: &str = "final";

pub fn run(o: &MigrateOpts, g: &Global) -> Result<()> {
    match (o.listen, &o.to) {
        (Some(port), None) => listen(o, port, g),
        (None, Some(to)) => send(o, to),
        _ => crate::bad_input!(
            "cr migrate needs either --to HOST:PORT (source) or --listen PORT (destination)"
        ),
    }
}

/// HOST:PORT (HOST may be a bracketed IPv6 address).
fn host_port(to: &str) -> Result<(String, u16)> {
    let Some((h, p)) = to.rsplit_once(':') else {
        crate::bad_input!("--to {to}: expected HOST:PORT");
    };
    let Ok(port) = p.parse::<u16>() else {
        crate::bad_input!("--to {to}: {p:?} is not a port number");
    };
    Ok((
        h.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
    ))
}

fn dump_opts(o: &MigrateOpts, pid: i32, name: &str, parent: Option<&str>) -> DumpOpts {
    DumpOpts {
        pid,
        images_dir: o.images_dir.join(name),
        leave_running: false,
        tcp_established: false,
        shell_job: false,
        file_locks: o.file_locks,
        prev_images_dir: parent.map(|p| PathBuf::from("..").join(p)),
        track_mem: true,
        page_server: false,
        address: None,
        port: None,
        whole_image: false,
        display_stats: false,
    }
}

fn send(o: &MigrateOpts, to: &str) -> Result<()> {
    let t0 = Instant::now();
    let Some(pid) = o.pid else {
        crate::bad_input!("cr migrate --to needs -t PID");
    };
    let (host, port) = host_port(to)?;
    create_images_dir(&o.images_dir)?;
    let conn = Arc::new(Sender::connect(&host, port, Content::Migration)?);
    let r = precopy_and_move(o, pid, &conn, t0);
    if r.is_err() {
        // The tree runs on here (every failed step let it go); tracking ends with this try.
        stop_tracker(pid);
    }
    r
}

fn precopy_and_move(o: &MigrateOpts, pid: i32, conn: &Arc<Sender>, t0: Instant) -> Result<()> {
    let mut parent: Option<String> = None;
    let mut last_pages: Option<u64> = None;
    let mut sent: u64 = 0;
    let mut last_start: Option<Instant> = None;
    for round in 1..=o.max_rounds {
        let name = format!("pre-{round}");
        conn.begin_image(&name)?;
        let t = Instant::now();
        // This round copies what was written since the last round froze the tree.
        let since_last = last_start.map(|l| t.duration_since(l).as_secs_f64());
        last_start = Some(t);
        let stats = super::pre_dump::run_to(
            &dump_opts(o, pid, &name, parent.as_deref()),
            Some(conn.clone()),
        )
        .with_context(|| format!("pre-copy round {round}"))?;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        let bytes = stats.pages_written * PAGE;
        sent += bytes;
        let dirty_rate = since_last.map_or(0.0, |s| bytes as f64 / s.max(1e-6));
        let bandwidth = bytes as f64 / secs;
        // What the next round would find dirty (written while this one ran), at this
        // round's speed, plus this round's own freeze.
        let est_freeze_ms = if bandwidth > 0.0 && round > 1 {
            dirty_rate * secs / bandwidth * 1e3
        } else {
            0.0
        };
        log::info!(
            "migrate: round {round}: {:.1} MiB sent in {:.0} ms ({:.0} MiB/s), dirty rate {:.1} MiB/s, estimated freeze {:.1} ms",
            bytes as f64 / (1 << 20) as f64,
            secs * 1e3,
            bandwidth / (1 << 20) as f64,
            dirty_rate / (1 << 20) as f64,
            est_freeze_ms + stats.frozen_us as f64 / 1e3
        );
        parent = Some(name);
        let small = round > 1 && bytes <= SMALL_ENOUGH;
        let stalled = last_pages.is_some_and(|l| (stats.pages_written as f64) > l as f64 * SHRINK);
        if small || stalled {
            log::info!(
                "migrate: pre-copy ends after round {round}: {}",
                if small {
                    "the dirty set is small"
                } else {
                    "the dirty set stopped shrinking"
                }
            );
            break;
        }
        last_pages = Some(stats.pages_written);
    }
    conn.begin_image(FINAL)?;
    let held = super::dump::run_held(&dump_opts(o, pid, FINAL, parent.as_deref()), conn.clone())
        .context("the final dump")?;
    let t_restore = Instant::now();
    match conn.restore(FINAL) {
        Ok(remote_pid) => {
            let frozen = held.kill()?;
            conn.done()?;
            log::info!(
                "migrate: PID {pid} runs at {} as PID {remote_pid}; {:.1} MiB sent, frozen here {:.1} ms (restore there {:.1} ms), {:.0} ms in all",
                conn.peer(),
                (sent as f64) / (1 << 20) as f64,
                frozen.as_secs_f64() * 1e3,
                t_restore.elapsed().as_secs_f64() * 1e3,
                t0.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        }
        Err(e) => {
            held.release();
            Err(e.context(format!(
                "the destination did not restore PID {pid}: it runs on here"
            )))
        }
    }
}

/// Best effort: the tracker a failed migration started stops (its write-protection goes
/// with it).
fn stop_tracker(pid: i32) {
    if let Ok(Some(c)) = crate::tracker::client::TrackerConn::connect(pid) {
        if let Err(e) = c.stop() {
            log::debug!("stopping the tracker of PID {pid}: {e:#}");
        }
    }
}

fn listen(o: &MigrateOpts, port: u16, g: &Global) -> Result<()> {
    let mut status = o
        .status_fd
        .map(|f| std::fs::File::from(fd::take_inherited(f)));
    create_images_dir(&o.images_dir)?;
    let listener = TcpListener::bind((o.address.as_str(), port))
        .with_context(|| format!("cannot listen on {}:{port}", o.address))?;
    let port = listener
        .local_addr()
        .context("the listening address")?
        .port();
    log::info!(
        "migrate: listening on {}:{port}, images into {}",
        o.address,
        o.images_dir.display()
    );
    if let Some(mut s) = status.take() {
        writeln!(s, "{port}").context("write the status fd")?;
    }
    let (stream, peer) = listener.accept().context("accepting a connection")?;
    drop(listener);
    log::info!("migrate: connection from {peer}");
    let mut restore = |dir: &Path| -> Result<i32> { restore_here(o, dir, g) };
    let got = wire::receive_migration(&stream, &o.images_dir, &mut restore)
        .with_context(|| format!("migration from {peer}"))?;
    log::info!(
        "migrate: done: {} images, {} MiB received from {peer}",
        got.images,
        got.bytes >> 20
    );
    Ok(())
}

/// Restores the received image `dir` detached; returns the restored root's PID.
fn restore_here(o: &MigrateOpts, dir: &Path, g: &Global) -> Result<i32> {
    let img = ImageDir::open(dir)?;
    let inv = img.inventory();
    let ro = RestoreOpts {
        images_dir: dir.to_path_buf(),
        detached: true,
        pidfile: o.pidfile.clone(),
        tcp_established: inv.flags & imgdir::DUMP_F_TCP != 0,
        shell_job: false,
        file_locks: inv.flags & imgdir::DUMP_F_FILE_LOCKS != 0,
        // The received directory is cr's own (created 0700 by root here): checked as any other.
        trust_image_owner: false,
        display_stats: false,
    };
    let root = inv.root_pid;
    drop(img);
    super::restore::run(&ro, g)?;
    Ok(root)
}
