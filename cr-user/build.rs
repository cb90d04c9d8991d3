//! Compiles the image schemas (proto/*.proto, with prost) and embeds the eBPF object that
//! `cargo xtask build-ebpf` produced (CR_EBPF_OBJECT, else its default place), so `cr` is one
//! self-contained binary. Without the object the build fails, saying how to make it.

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
        Ok(bytes) if !bytes.is_empty() => std::fs::write(&out, bytes).unwrap(),
        _ => {
            // A cr without its eBPF object could not track anything: refuse to build one.
            eprintln!(
                "error: no eBPF object at {}: build it first with `cargo xtask build-ebpf` \
                 (`cargo xtask build` builds it and cr), or set CR_EBPF_OBJECT to one",
                src.display()
            );
            std::process::exit(1);
        }
    }
}
