//! `cargo xtask`: setup, build-ebpf, build, run, test, lint, bench, demo, install.
//!
//! Every command first checks the prerequisites (`setup`) and installs what is missing, so a
//! fresh machine needs nothing but `cargo xtask <command>`.

mod build;
mod install;
mod lint;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and run cr")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every missing prerequisite (LLVM 22, the pinned toolchain with rust-src,
    /// bpf-linker, protoc) and mount tracefs/bpffs. Idempotent; prints each step.
    Setup,
    /// Build the eBPF object (target/bpfel-unknown-none/release/cr-ebpf).
    BuildEbpf,
    /// Build the eBPF object, then `cr` (release unless --debug).
    Build {
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run `cr ARGS` as root.
    Run {
        #[arg(long)]
        debug: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the unit and integration tests (as root). Extra args go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check cr-user's layering (imports between its modules, `unsafe` only in kernel/ and
    /// bpf/), then `cargo fmt --check` and `cargo clippy --all-targets -- -D warnings`.
    Lint {
        /// Print the module graph and stop after the layering check.
        #[arg(long)]
        report: bool,
    },
    /// Build, then run the benchmarks and print their tables.
    Bench {
        /// A criu binary to compare against (default: `criu` on PATH, if any).
        #[arg(long)]
        criu: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start a counter service, dump it, restore it, and show it counting on.
    Demo,
    /// Build cr (release, eBPF object embedded) and install it: PREFIX/bin/cr, bash, zsh and
    /// fish completions, and man pages (cr.1, cr-dump.1, …).
    Install {
        /// Installation prefix.
        #[arg(long, value_name = "DIR", default_value = "/usr/local")]
        prefix: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let root = build::workspace_root();
    std::env::set_current_dir(&root).context("cd to the workspace root")?;
    setup::ensure(matches!(cli.cmd, Cmd::Setup))?;
    match cli.cmd {
        Cmd::Setup => Ok(ExitCode::SUCCESS),
        Cmd::BuildEbpf => build::ebpf().map(|_| ExitCode::SUCCESS),
        Cmd::Build { debug } => build::all(!debug).map(|_| ExitCode::SUCCESS),
        Cmd::Run { debug, args } => {
            let cr = build::all(!debug)?;
            status_code(as_root(&cr, &args, &[])?)
        }
        Cmd::Test { args } => {
            let cr = build::all(true)?;
            let mut cmd = cargo();
            cmd.args(["test", "--release", "--workspace"]).args(&args);
            cmd.env("CR_BIN", &cr);
            cmd.env("CR_EBPF_OBJECT", build::ebpf_object());
            println!("xtask: running tests with CR_BIN={}", cr.display());
            run_tests(cmd)
        }
        Cmd::Lint { report } => lint::run(&root, report).map(|_| ExitCode::SUCCESS),
        Cmd::Bench { criu, args } => {
            let cr = build::all(true)?;
            let mut cmd = cargo();
            cmd.args([
                "run",
                "--release",
                "-p",
                "cr-tests",
                "--bin",
                "cr-bench",
                "--",
            ]);
            if let Some(c) = criu {
                cmd.args(["--criu", &c]);
            }
            cmd.args(&args).env("CR_BIN", &cr);
            status_code(cmd.status().context("run the benchmark")?)
        }
        Cmd::Demo => {
            let cr = build::all(true)?;
            // The demo binary was built beside cr (build::all builds cr-tests' binaries too);
            // run it directly, as root, with cr's path.
            let demo = cr.with_file_name("cr-demo");
            let env = [("CR_BIN".to_string(), cr.display().to_string())];
            status_code(as_root(&demo, &[], &env)?)
        }
        Cmd::Install { prefix } => {
            let cr = build::all(true)?;
            let prefix = std::path::absolute(&prefix)
                .with_context(|| format!("the prefix {}", prefix.display()))?;
            println!("xtask: installing cr under {}", prefix.display());
            for f in install::install(&cr, &prefix)? {
                println!("xtask: installed {}", f.display());
            }
            let bin = prefix.join("bin");
            if !install::on_path(&bin) {
                println!("xtask: note: {} is not on your PATH", bin.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `cargo` from the pinned toolchain (the one running xtask).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("PATH", setup::tool_path());
    cmd
}

/// Runs `bin ARGS` as root (through sudo when we are not), with `env` set (sudo would drop it
/// from our environment, so it goes on sudo's command line).
fn as_root(
    bin: &std::path::Path,
    args: &[String],
    env: &[(String, String)],
) -> Result<std::process::ExitStatus> {
    let status = if setup::is_root() {
        Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .status()
    } else {
        println!("xtask: {} needs root; running it with sudo", bin.display());
        Command::new("sudo")
            .arg("env")
            .args(env.iter().map(|(k, v)| format!("{k}={v}")))
            .arg(bin)
            .args(args)
            .status()
    };
    status.with_context(|| format!("run {}", bin.display()))
}

/// Runs `cargo test`, passing its output through, and ends with one summary line over every
/// test binary ("tests: N passed, M failed"), so the last line speaks for the whole suite
/// rather than for the last (often empty) binary.
fn run_tests(mut cmd: Command) -> Result<ExitCode> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run cargo test")?;
    let out = child.stdout.take().context("cargo test's stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut stdout = std::io::stdout();
    for line in BufReader::new(out).lines() {
        let line = line.context("read cargo test's output")?;
        let _ = writeln!(stdout, "{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(word), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match word {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let st = child.wait().context("wait for cargo test")?;
    println!();
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    status_code(st)
}

fn status_code(st: std::process::ExitStatus) -> Result<ExitCode> {
    match st.code() {
        Some(c) => Ok(ExitCode::from(c.clamp(0, 255) as u8)),
        None => bail!("killed by a signal: {st}"),
    }
}
