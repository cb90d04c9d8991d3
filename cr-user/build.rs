//! Compiles the image schemas (proto/*.proto, with prost) and embeds the eBPF object that
//! `cargo xtask build-ebpf` produced (CR_EBPF_OBJECT), so `cr` is one self-contained binary.

use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let proto = root.join("proto/cr.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let mut cfg = prost_build::Config::new();
    cfg.type_attribute(".", "#[derive(serde::Serialize)]");
    cfg.compile_protos(&[&proto], &[root.join("proto")])
        .expect("compile proto/cr.proto (is protoc installed? `cargo xtask setup`)");

    println!("cargo:rerun-if-env-changed=CR_EBPF_OBJECT");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("cr-ebpf.o");
    let src = std::env::var_os("CR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bpfel-unknown-none/release/cr-ebpf"));
    println!("cargo:rerun-if-changed={}", src.display());
    match std::fs::read(&src) {
        Ok(bytes) => std::fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!("cargo:warning=no eBPF object at {}: this cr cannot track (build with `cargo xtask build`)", src.display());
            std::fs::write(&out, b"").unwrap();
        }
    }
}
