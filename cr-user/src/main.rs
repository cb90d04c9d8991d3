//! The `cr` binary: parses the command line, sets up logging, runs the command, and turns its
//! outcome into an exit status: 0 success, 1 failure, 2 bad input or usage (clap's own status
//! for a bad command line), 3 refusal (the target, or the image, holds something cr will not
//! dump or restore as asked). `cr restore` without `-d` exits with the restored root's status,
//! `cr check` with 1 when a required feature is missing.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cr::cli::{Cli, Command};
use cr::refusal::{BadInput, Refusal};

/// The exit status of a failed command.
fn status_of(e: &anyhow::Error) -> ExitCode {
    if Refusal::of(e).is_some() {
        ExitCode::from(3)
    } else if BadInput::of(e).is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let images_dir = match &cli.cmd {
        Command::Dump(o) | Command::PreDump(o) => Some(o.images_dir.clone()),
        Command::Restore(o) => Some(o.images_dir.clone()),
        Command::Periodic(o) => Some(o.images_dir.clone()),
        Command::PageServer(o) => Some(o.images_dir.clone()),
        Command::Migrate(o) => Some(o.images_dir.clone()),
        _ => None,
    };
    // CRIU: a relative -o is relative to the images directory.
    let log_path: Option<PathBuf> = cli.global.log_file.as_ref().map(|p| match &images_dir {
        Some(d) if p.is_relative() && p.as_os_str() != "-" => d.join(p),
        _ => p.clone(),
    });
    if let (Some(d), Some(_)) = (&images_dir, &log_path) {
        if matches!(
            cli.cmd,
            Command::Dump(_)
                | Command::PreDump(_)
                | Command::Periodic(_)
                | Command::PageServer(_)
                | Command::Migrate(_)
        ) {
            // The log may live in the images dir; create it now (0700) so the log can open.
            if let Err(e) = cr::image::dir::create_images_dir(d) {
                eprintln!("Error: {e:#}");
                return status_of(&e);
            }
        }
    }
    if let Err(e) = cr::logging::init(cli.global.level(), log_path.as_deref(), cli.global.log_pid) {
        eprintln!("Error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match &cli.cmd {
        Command::Dump(o) => cr::cmd::dump::run(o).map(|_| 0),
        Command::PreDump(o) => cr::cmd::pre_dump::run(o).map(|_| 0),
        Command::Restore(o) => cr::cmd::restore::run(o, &cli.global),
        Command::PageServer(o) => cr::cmd::page_server::run(o).map(|_| 0),
        Command::Migrate(o) => cr::cmd::migrate::run(o, &cli.global).map(|_| 0),
        Command::Check(o) => cr::cmd::check::run(o).map(|ok| if ok { 0 } else { 1 }),
        Command::Show(o) => cr::cmd::show::run(o).map(|_| 0),
        Command::Periodic(o) => cr::cmd::periodic::run(o),
        Command::Tracker(o) => cr::cmd::tracker::run(o.pid, o.ready_fd, o.dirty_max_entries),
        Command::NetworkUnlock(o) => cr::cmd::network_unlock::run(o).map(|_| 0),
        Command::RepairGuard(o) => cr::tcp::guard::serve(o.fd),
        Command::Completions(o) => {
            cr::cli::write_completions(o.shell, &mut std::io::stdout()).map(|_| 0)
        }
        Command::Man(o) => cr::cli::write_man_pages(&o.dir).map(|_| 0),
    };
    log::logger().flush();
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            log::error!("{e:#}");
            log::logger().flush();
            status_of(&e)
        }
    }
}
