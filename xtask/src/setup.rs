//! Prerequisites: checked before every command, installed when missing, each step printed.
//!
//! - Debian packages: LLVM 22 (bpf-linker links against it; rustc 1.98 ships LLVM 22),
//!   protoc (prost-build), iproute2 and nftables (network tests), and redis-server,
//!   redis-tools and nginx-light for the real-program tests, installed without starting their
//!   system services (the tests run their own instances on loopback).
//! - The pinned toolchain's rust-src component (`-Z build-std=core` for the BPF target).
//!   The toolchain itself is installed by rustup from rust-toolchain.toml before xtask runs.
//! - bpf-linker, built from crates.io against LLVM 22.
//! - tracefs at /sys/kernel/tracing and bpffs at /sys/fs/bpf (cr mounts them too; tests and
//!   tools expect them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const LLVM_MAJOR: &str = "22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "protobuf-compiler",
    "iproute2",
    "nftables",
];
/// Services the tests run themselves (tests/src/services.rs): the packages' own system
/// services must not start, nor stay enabled, on a developer's or CI's machine.
const SERVICE_PACKAGES: &[&str] = &["redis-server", "redis-tools", "nginx-light"];
/// Their system services, by the names Debian gives them.
const SYSTEM_SERVICES: &[&str] = &["redis-server", "nginx"];
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const TOOLCHAIN: &str = "1.98.0";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn llvm_bin() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}/bin"))
}

fn cargo_home_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    home.join("bin")
}

/// PATH with LLVM 22 and cargo's bin dir first, for builds that need bpf-linker.
pub fn tool_path() -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    format!(
        "{}:{}:{old}",
        llvm_bin().display(),
        cargo_home_bin().display()
    )
}

/// Checks everything; installs what is missing. `verbose` also reports what was already there.
pub fn ensure(verbose: bool) -> Result<()> {
    apt(verbose)?;
    rust_src(verbose)?;
    bpf_linker(verbose)?;
    mounts(verbose)?;
    if verbose {
        println!("xtask: setup complete");
    }
    Ok(())
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    println!("xtask: setup: {what}");
    let st = cmd.status().with_context(|| format!("start: {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn sudo(cmd: &str) -> Command {
    if is_root() {
        Command::new(cmd)
    } else {
        let mut c = Command::new("sudo");
        c.arg(cmd);
        c
    }
}

fn apt(verbose: bool) -> Result<()> {
    let all: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(SERVICE_PACKAGES)
        .copied()
        .collect();
    let missing: Vec<&str> = all.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        if verbose {
            println!("xtask: setup: Debian packages present ({})", all.join(" "));
        }
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing packages {} and no apt-get to install them",
            missing.join(" ")
        );
    }
    let services = missing.iter().any(|p| SERVICE_PACKAGES.contains(p));
    // invoke-rc.d asks policy-rc.d before starting a package's service: 101 means "no".
    let _policy = if services {
        Some(NoServiceStarts::install()?)
    } else {
        None
    };
    run("apt-get update", sudo("apt-get").args(["update", "-qq"]))?;
    run(
        &format!("apt-get install {}", missing.join(" ")),
        sudo("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing),
    )?;
    if services && Path::new("/run/systemd/system").exists() {
        // Under systemd the packages enable their units: disable (and stop) them.
        run(
            &format!("systemctl disable --now {}", SYSTEM_SERVICES.join(" ")),
            sudo("systemctl")
                .args(["disable", "--now"])
                .args(SYSTEM_SERVICES),
        )?;
    }
    Ok(())
}

/// A policy-rc.d that refuses every service start, in place while packages install, removed
/// afterwards; an existing policy-rc.d (a container's, say) is left as it is.
struct NoServiceStarts {
    ours: bool,
}

impl NoServiceStarts {
    fn install() -> Result<NoServiceStarts> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(NoServiceStarts { ours: false });
        }
        println!("xtask: setup: {POLICY_RC_D} (exit 101) while the service packages install");
        let script =
            "#!/bin/sh\n# cargo xtask setup: no service starts while packages install\nexit 101\n";
        let tmp = std::env::temp_dir().join(format!("policy-rc.d.{}", std::process::id()));
        std::fs::write(&tmp, script).with_context(|| format!("write {}", tmp.display()))?;
        run(
            &format!("install {POLICY_RC_D}"),
            sudo("install")
                .args(["-m", "0755"])
                .arg(&tmp)
                .arg(POLICY_RC_D),
        )?;
        let _ = std::fs::remove_file(&tmp);
        Ok(NoServiceStarts { ours: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.ours {
            let _ = sudo("rm").args(["-f", POLICY_RC_D]).status();
        }
    }
}

fn rust_src(verbose: bool) -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .context("run rustup (is rustup installed?)")?;
    let list = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        run(
            &format!("rustup toolchain install {TOOLCHAIN}"),
            Command::new("rustup").args([
                "toolchain",
                "install",
                TOOLCHAIN,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
        )?;
    } else if !list.lines().any(|l| l.starts_with("rust-src")) {
        run(
            &format!("rustup component add rust-src --toolchain {TOOLCHAIN}"),
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]),
        )?;
    } else if verbose {
        println!("xtask: setup: toolchain {TOOLCHAIN} with rust-src present");
    }
    Ok(())
}

/// bpf-linker must link against the same LLVM major as rustc's (22 for 1.98).
fn bpf_linker_ok(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    Command::new("ldd")
        .arg(path)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("libLLVM.so.{LLVM_MAJOR}")))
        .unwrap_or(false)
}

fn bpf_linker(verbose: bool) -> Result<()> {
    let path = cargo_home_bin().join("bpf-linker");
    if bpf_linker_ok(&path) {
        if verbose {
            println!(
                "xtask: setup: bpf-linker present ({}, LLVM {LLVM_MAJOR})",
                path.display()
            );
        }
        return Ok(());
    }
    run(
        &format!("cargo install bpf-linker (against LLVM {LLVM_MAJOR}; takes about a minute)"),
        Command::new("rustup")
            .env("PATH", tool_path())
            .args([
                "run",
                TOOLCHAIN,
                "cargo",
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .current_dir("/"),
    )?;
    if !bpf_linker_ok(&path) {
        bail!(
            "bpf-linker installed at {} does not link LLVM {LLVM_MAJOR}",
            path.display()
        );
    }
    Ok(())
}

fn mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[1] == path && f[2] == fstype
            })
        })
        .unwrap_or(false)
}

fn mounts(verbose: bool) -> Result<()> {
    for (path, fstype) in [("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")] {
        if mounted(path, fstype) {
            if verbose {
                println!("xtask: setup: {fstype} mounted at {path}");
            }
            continue;
        }
        if !is_root() {
            println!("xtask: setup: {fstype} is not mounted at {path}; cr will mount it when run as root");
            continue;
        }
        run(
            &format!("mount -t {fstype} {fstype} {path}"),
            Command::new("mount").args(["-t", fstype, fstype, path]),
        )?;
    }
    Ok(())
}
