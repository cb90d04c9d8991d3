//! Building the eBPF object and the `cr` binary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cargo;

pub const BPF_TARGET: &str = "bpfel-unknown-none";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where `build-ebpf` leaves the eBPF object.
pub fn ebpf_object() -> PathBuf {
    target_dir()
        .join(BPF_TARGET)
        .join("release")
        .join("cr-ebpf")
}

/// Builds cr-ebpf for the BPF target: the pinned toolchain with RUSTC_BOOTSTRAP=1 (for
/// `-Z build-std=core`), linked by bpf-linker with BTF so aya can relocate and aya-log works.
pub fn ebpf() -> Result<PathBuf> {
    println!("xtask: building the eBPF object (cr-ebpf, {BPF_TARGET})");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "cr-ebpf",
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
    ]);
    cmd.env("RUSTC_BOOTSTRAP", "1");
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    );
    let st = cmd.status().context("run cargo build for cr-ebpf")?;
    if !st.success() {
        bail!("building cr-ebpf failed ({st})");
    }
    let obj = ebpf_object();
    if !obj.exists() {
        bail!("cargo reported success but {} is missing", obj.display());
    }
    Ok(obj)
}

/// Builds the eBPF object and then `cr` with the object embedded. Returns the path of `cr`.
pub fn all(release: bool) -> Result<PathBuf> {
    let obj = ebpf()?;
    println!(
        "xtask: building cr ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = cargo();
    cmd.args(["build", "-p", "cr-user", "-p", "cr-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    cmd.env("CR_EBPF_OBJECT", &obj);
    let st = cmd.status().context("run cargo build for cr")?;
    if !st.success() {
        bail!("building cr failed ({st})");
    }
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("cr"))
}
