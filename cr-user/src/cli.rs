//! Command line, with CRIU's flags and meanings wherever CRIU has the same option.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cr",
    version,
    about = "Checkpoint/restore of Linux processes, with eBPF-assisted incremental dumps",
    long_about = "cr checkpoints a running process tree into an image directory and restores it \
                  later, at the same PIDs. Its flags follow CRIU's."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Command,
}

/// Options every command takes (CRIU's `-o`, `-v`, `--log-pid`).
#[derive(Args, Debug, Clone, Default)]
pub struct Global {
    /// Write the log to FILE (relative to the images directory unless absolute). "-" is stderr.
    #[arg(short = 'o', long = "log-file", value_name = "FILE", global = true)]
    pub log_file: Option<PathBuf>,
    /// Verbosity: -v raises it one step; -vN sets it (0 errors, 1 warnings, 2 info [default],
    /// 3 debug, 4 trace), as in CRIU.
    #[arg(short = 'v', value_name = "N", num_args = 0..=1, default_missing_value = "+", global = true, action = clap::ArgAction::Append)]
    pub verbosity: Vec<String>,
    /// On restore, write each task's messages to LOGFILE.PID instead of one log.
    #[arg(long = "log-pid", global = true)]
    pub log_pid: bool,
}

impl Global {
    /// The effective log level (CRIU scale: 0..=4; default 2).
    pub fn level(&self) -> u8 {
        let mut lvl: u8 = 2;
        for v in &self.verbosity {
            if v == "+" {
                lvl = lvl.saturating_add(1);
            } else if let Ok(n) = v.parse::<u8>() {
                lvl = n;
            } else {
                // -vvv arrives as "vv" for the value of the first -v.
                lvl = lvl.saturating_add(1 + v.chars().filter(|c| *c == 'v').count() as u8);
            }
        }
        lvl.min(4)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Checkpoint a process tree into an images directory.
    Dump(DumpOpts),
    /// Save memory of a running tree without stopping it for long (pages only; tree keeps running).
    PreDump(DumpOpts),
    /// Restore a process tree from an images directory.
    Restore(RestoreOpts),
    /// Receive the pages (or a whole image) of a dump sent with `--page-server` into an images
    /// directory; exits once that transfer is complete.
    PageServer(PageServerOpts),
    /// Move a running tree to another host: `--listen PORT` there, `-t PID --to HOST:PORT`
    /// here (pre-copy rounds while it runs, a short final freeze, restore there, killed here).
    Migrate(MigrateOpts),
    /// Check that this kernel supports everything cr needs.
    Check(CheckOpts),
    /// Print an image file, or a whole images directory, as JSON (a `cr periodic` directory:
    /// its checkpoints, one line each); `cr show DIR ps|fds|mems|stats`: a table instead.
    Show(ShowOpts),
    /// Remove the network lock a `dump --tcp-established` left for the image in DIR (when
    /// the image will not be restored, or its tree runs on).
    NetworkUnlock(NetworkUnlockOpts),
    /// (internal) The repair guard that `dump --tcp-established` starts.
    #[command(name = "__repair-guard", hide = true)]
    RepairGuard(RepairGuardOpts),
    /// Checkpoint a running tree (or a command it starts) every interval into DIR/<sequence>,
    /// incrementally, keeping DIR/latest restorable.
    Periodic(PeriodicOpts),
    /// (internal) The tracker process that `cr pre-dump` and `--track-mem` start.
    #[command(name = "__tracker", hide = true)]
    Tracker(TrackerOpts),
    /// (internal) Print the completion script for SHELL (`cargo xtask install` installs them).
    #[command(name = "__completions", hide = true)]
    Completions(CompletionsOpts),
    /// (internal) Write the man pages (cr.1, cr-dump.1, …) into DIR (`cargo xtask install`).
    #[command(name = "__man", hide = true)]
    Man(ManOpts),
}

/// Options of the hidden `cr __completions`.
#[derive(Args, Debug, Clone)]
pub struct CompletionsOpts {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Options of the hidden `cr __man`.
#[derive(Args, Debug, Clone)]
pub struct ManOpts {
    /// Directory to write the pages into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Writes the completion script for `shell`, generated from these definitions (so it can never
/// disagree with the binary that prints it).
pub fn write_completions(
    shell: clap_complete::Shell,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    // Without the hidden subcommands: clap_complete's generators would offer them.
    let full = Cli::command();
    let mut cmd = clap::Command::new("cr")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    // Into memory first: clap_complete panics on a write error (a closed pipe); we report it.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "cr", &mut script);
    out.write_all(&script)
        .and_then(|_| out.flush())
        .with_context(|| format!("write the {shell} completion script"))
}

/// Writes one man page per visible command into `dir`: cr.1, cr-dump.1, cr-restore.1, …
pub fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("write the man pages into {}", dir.display()))
}

/// Options of the hidden `cr __tracker` (see `track::daemon`).
#[derive(Args, Debug, Clone)]
pub struct TrackerOpts {
    /// The process to track.
    #[arg(long = "pid")]
    pub pid: i32,
    /// An inherited fd that receives `READY PID` (or `ERROR why`) and is closed.
    #[arg(long = "ready-fd")]
    pub ready_fd: Option<i32>,
    /// Size of the dirty-page map (tests: a tiny map proves the fallback to the exact scan).
    #[arg(long = "dirty-max-entries")]
    pub dirty_max_entries: Option<u32>,
}

#[derive(Args, Debug, Clone)]
pub struct DumpOpts {
    /// PID of the root of the tree to dump.
    #[arg(short = 't', long = "tree", value_name = "PID")]
    pub pid: i32,
    /// Images directory (created, 0700, if missing; an existing empty one is fine).
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Leave the tree running after the dump (dump only; pre-dump always does).
    #[arg(short = 'R', long = "leave-running")]
    pub leave_running: bool,
    /// Dump established TCP connections (with TCP_REPAIR).
    #[arg(long = "tcp-established")]
    pub tcp_established: bool,
    /// Allow a tree whose session leader or terminal lies outside it.
    #[arg(short = 'j', long = "shell-job")]
    pub shell_job: bool,
    /// Dump file locks held by the tree.
    #[arg(short = 'l', long = "file-locks")]
    pub file_locks: bool,
    /// The previous image in a chain: pages unchanged since it are stored as references to it
    /// (relative paths are relative to the images directory, as in CRIU).
    #[arg(long = "prev-images-dir", value_name = "DIR")]
    pub prev_images_dir: Option<PathBuf>,
    /// Track memory changes (eBPF + userfaultfd write-protection) for later incremental dumps.
    #[arg(long = "track-mem")]
    pub track_mem: bool,
    /// Send the pages to a page server (`cr page-server`) at --address/--port instead of
    /// writing pages-PID.img into -D; the rest of the image is written to -D (copy it next
    /// to the pages to restore there).
    #[arg(long = "page-server", requires_all = ["address", "port"])]
    pub page_server: bool,
    /// The page server's host (with --page-server).
    #[arg(long = "address", value_name = "HOST", requires = "page_server")]
    pub address: Option<String>,
    /// The page server's TCP port (with --page-server).
    #[arg(long = "port", value_name = "PORT", requires = "page_server")]
    pub port: Option<u16>,
    /// With --page-server: send the whole image, not only the pages, so that the page
    /// server's directory is restorable as it is (-D keeps the descriptors and the log).
    #[arg(long = "whole-image", requires = "page_server")]
    pub whole_image: bool,
    /// Print the dump's timings and page counts at the end, on stdout (CRIU's option; the
    /// same table as `cr show DIR stats`).
    #[arg(long = "display-stats")]
    pub display_stats: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MigrateOpts {
    /// (source) The root of the tree to move.
    #[arg(short = 't', long = "tree", value_name = "PID", requires = "to")]
    pub pid: Option<i32>,
    /// (source) Where `cr migrate --listen` waits: HOST:PORT.
    #[arg(long = "to", value_name = "HOST:PORT", conflicts_with = "listen")]
    pub to: Option<String>,
    /// (destination) Listen on PORT (0: any free port; --status-fd says which).
    #[arg(long = "listen", value_name = "PORT")]
    pub listen: Option<u16>,
    /// (destination) Address to listen on.
    #[arg(long = "address", value_name = "ADDR", default_value = "0.0.0.0")]
    pub address: String,
    /// Images directory: the source keeps each round's descriptors there, the destination
    /// receives the images (pre-1, pre-2, …, final) into it.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// (source) Dump file locks held by the tree (restored with them there).
    #[arg(short = 'l', long = "file-locks")]
    pub file_locks: bool,
    /// (source) At most this many pre-copy rounds before the final freeze.
    #[arg(long = "max-rounds", value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// (destination) An inherited fd that receives the listening port (decimal, newline).
    #[arg(long = "status-fd", value_name = "FD")]
    pub status_fd: Option<i32>,
    /// (destination) Write the PID of the restored root task to FILE.
    #[arg(long = "pidfile", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct PageServerOpts {
    /// Images directory to receive into (created, 0700, if missing; must not hold a complete
    /// image).
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// TCP port to listen on (0: any free port; --status-fd says which).
    #[arg(long = "port", value_name = "PORT")]
    pub port: u16,
    /// Address to listen on.
    #[arg(long = "address", value_name = "ADDR", default_value = "0.0.0.0")]
    pub address: String,
    /// The image the received one builds on (relative to -D, as the dump's own
    /// --prev-images-dir): it must be here already.
    #[arg(long = "prev-images-dir", value_name = "DIR")]
    pub prev_images_dir: Option<PathBuf>,
    /// An inherited fd that receives the listening port (decimal, newline) once the server
    /// accepts connections, and is closed. (CRIU writes a single NUL byte.)
    #[arg(long = "status-fd", value_name = "FD")]
    pub status_fd: Option<i32>,
}

/// Options of `cr periodic`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  cr periodic -t 1234 -D /var/lib/ckpt --interval 1s --keep 5\n  \
                        cr periodic -D /var/lib/ckpt --interval 500ms -- redis-server --port 7000"
)]
pub struct PeriodicOpts {
    /// PID of the root of the tree to checkpoint (or give a command after `--`).
    #[arg(
        short = 't',
        long = "tree",
        value_name = "PID",
        conflicts_with = "command"
    )]
    pub pid: Option<i32>,
    /// Directory of the checkpoints: DIR/000001, DIR/000002, …, and DIR/latest naming the newest
    /// complete one.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Time between checkpoints, as 500ms, 1s, 2m, 1h (a plain number is seconds).
    #[arg(long = "interval", value_name = "DURATION", value_parser = parse_duration)]
    pub interval: std::time::Duration,
    /// Keep at most N checkpoints: the oldest is folded into its successor (which then holds
    /// every page it needs) and removed. Default: keep all.
    #[arg(long = "keep", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Give up (exit 1) after K checkpoints in a row failed (0: never).
    #[arg(long = "max-failures", value_name = "K", default_value_t = 10)]
    pub max_failures: u32,
    /// Checkpoints at most N (then exit 0 leaving the target running; for scripts and tests).
    #[arg(long = "count", value_name = "N", hide = true)]
    pub count: Option<u64>,
    /// Dump established TCP connections (with TCP_REPAIR).
    #[arg(long = "tcp-established")]
    pub tcp_established: bool,
    /// Allow a tree whose session leader or terminal lies outside it.
    #[arg(short = 'j', long = "shell-job")]
    pub shell_job: bool,
    /// Dump file locks held by the tree.
    #[arg(short = 'l', long = "file-locks")]
    pub file_locks: bool,
    /// With a command: where its stdout and stderr go (appended; relative to DIR). "-" keeps
    /// cr's own. Its stdin is /dev/null.
    #[arg(long = "output", value_name = "FILE", default_value = "output.log")]
    pub output: PathBuf,
    /// The command to start (in a session of its own) and checkpoint.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<std::ffi::OsString>,
}

/// A duration as people write it: `500ms`, `1s`, `1.5s`, `2m`, `1h`; a plain number is seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (write 500ms, 1s, 2m or 1h)"))?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m or h)")),
    };
    let secs = n * scale;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?}: the interval must be more than zero"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Args, Debug, Clone)]
pub struct RestoreOpts {
    /// Images directory.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Return once the tree runs, leaving it detached, instead of waiting for it.
    #[arg(short = 'd', long = "restore-detached")]
    pub detached: bool,
    /// Write the PID of the restored root task to FILE.
    #[arg(long = "pidfile", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Restore established TCP connections.
    #[arg(long = "tcp-established")]
    pub tcp_established: bool,
    /// Restore a shell job: join cr's session and terminal.
    #[arg(short = 'j', long = "shell-job")]
    pub shell_job: bool,
    /// Restore file locks.
    #[arg(short = 'l', long = "file-locks")]
    pub file_locks: bool,
    /// As root, restore an image that is not root's alone (owned by another user, or writable
    /// by group or others): its owner is trusted with root's powers.
    #[arg(long = "trust-image-owner")]
    pub trust_image_owner: bool,
    /// Print the restore's timings and page counts on stdout once the tree runs (CRIU's
    /// option).
    #[arg(long = "display-stats")]
    pub display_stats: bool,
}

#[derive(Args, Debug, Clone)]
pub struct CheckOpts {
    /// Also probe optional features (nftables, …).
    #[arg(long = "all")]
    pub all: bool,
}

#[derive(Args, Debug, Clone)]
pub struct NetworkUnlockOpts {
    /// Images directory of the dump that locked the connections.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: PathBuf,
}

/// Options of the hidden `cr __repair-guard`.
#[derive(Args, Debug, Clone)]
pub struct RepairGuardOpts {
    /// The inherited socket to the dumping cr.
    #[arg(long = "fd")]
    pub fd: i32,
}

#[derive(Args, Debug, Clone)]
pub struct ShowOpts {
    /// An image file, or an images directory (every image in it).
    #[arg(value_name = "DIR|FILE")]
    pub path: Option<PathBuf>,
    /// Same as the positional argument (CRIU's `show -f FILE`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Same as the positional argument, for a directory.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// A table instead of the JSON (like `crit x DIR ps|fds|mems`): the process tree, each
    /// process's fds, each process's memory areas with the pages stored for them, or the
    /// timings and page counts of every image of the chain.
    #[arg(value_name = "VIEW", value_enum)]
    pub view: Option<ShowView>,
}

/// The human views of `cr show DIR VIEW`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShowView {
    /// The process tree: pid, ppid, pgid, sid, threads, comm.
    Ps,
    /// Per process: fd -> what it is (kind, path, flags).
    Fds,
    /// Per process: the memory areas, their sizes, protection, backing and pages stored.
    Mems,
    /// Timings and page counts of every image of the chain, with the eBPF tracker's view.
    Stats,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("cr").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn criu_style_dump_flags() {
        let c = parse(&[
            "dump",
            "-t",
            "42",
            "-D",
            "/tmp/x",
            "-R",
            "--tcp-established",
            "-j",
            "-l",
            "-o",
            "d.log",
        ]);
        let Command::Dump(d) = c.cmd else {
            panic!("not dump")
        };
        assert_eq!(d.pid, 42);
        assert!(d.leave_running && d.tcp_established && d.shell_job && d.file_locks);
        assert_eq!(
            c.global.log_file.as_deref(),
            Some(std::path::Path::new("d.log"))
        );
    }

    #[test]
    fn verbosity_levels() {
        assert_eq!(parse(&["check"]).global.level(), 2);
        assert_eq!(parse(&["check", "-v"]).global.level(), 3);
        assert_eq!(parse(&["check", "-v4"]).global.level(), 4);
        assert_eq!(parse(&["check", "-v0"]).global.level(), 0);
        assert_eq!(parse(&["-vv", "check"]).global.level(), 4);
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "0s", "1x", "ms", "-1s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn periodic_flags() {
        let c = parse(&[
            "periodic",
            "-D",
            "d",
            "--interval",
            "250ms",
            "--keep",
            "3",
            "--",
            "sleep",
            "9",
        ]);
        let Command::Periodic(p) = c.cmd else {
            panic!("not periodic")
        };
        assert_eq!(p.interval, std::time::Duration::from_millis(250));
        assert_eq!(p.keep, Some(3));
        assert_eq!(p.command, vec!["sleep", "9"]);
        assert!(p.pid.is_none());
        assert!(Cli::try_parse_from([
            "cr",
            "periodic",
            "-D",
            "d",
            "--interval",
            "1s",
            "--keep",
            "0",
            "-t",
            "1"
        ])
        .is_err());
    }

    #[test]
    fn page_server_flags() {
        let c = parse(&[
            "dump",
            "-t",
            "1",
            "-D",
            "d",
            "--page-server",
            "--address",
            "h",
            "--port",
            "9",
        ]);
        let Command::Dump(d) = c.cmd else {
            panic!("not dump")
        };
        assert!(d.page_server && !d.whole_image);
        assert_eq!((d.address.as_deref(), d.port), (Some("h"), Some(9)));
        let no_port = [
            "dump",
            "-t",
            "1",
            "-D",
            "d",
            "--page-server",
            "--address",
            "h",
        ];
        assert!(Cli::try_parse_from(std::iter::once("cr").chain(no_port)).is_err());
        let c = parse(&["page-server", "-D", "d", "--port", "0"]);
        let Command::PageServer(p) = c.cmd else {
            panic!("not page-server")
        };
        assert_eq!((p.address.as_str(), p.port), ("0.0.0.0", 0));
    }

    #[test]
    fn restore_flags() {
        let c = parse(&["restore", "-D", "d", "-d", "--pidfile", "p"]);
        let Command::Restore(r) = c.cmd else {
            panic!("not restore")
        };
        assert!(r.detached);
        assert_eq!(r.pidfile.as_deref(), Some(std::path::Path::new("p")));
    }
}
