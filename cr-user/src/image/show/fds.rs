//! `cr show DIR fds`: each process's fd table, fd -> what it is (as `crit x DIR fds`), with its
//! cwd and root.
//!
//! A description is shown from its JSON form (the `serde::Serialize` of `pb::FileEntry`'s
//! kind), by the name of its kind: the kinds cr knows get a line of their own, and a kind added
//! later still shows as its name and its scalar fields, without a change here.

use std::collections::HashMap;

use anyhow::Result;
use serde_json::Value;

use super::table::Table;
use crate::image::dir::{core_file, fds_file, ImageDir, FILES, PSTREE};
use crate::image::file::Kind;
use crate::image::pb;

pub fn render(dir: &ImageDir) -> Result<String> {
    let tree: pb::PsTree = dir.read_msg(PSTREE, Kind::PsTree)?;
    let files: pb::Files = dir.read_msg(FILES, Kind::Files)?;
    let by_id: HashMap<u32, &pb::FileEntry> = files.files.iter().map(|f| (f.id, f)).collect();
    let mut out = String::new();
    for (e, _) in super::ps::tree_order(&tree.tasks) {
        if e.zombie {
            continue;
        }
        let core: pb::Core = dir.read_msg(&core_file(e.pid), Kind::Core)?;
        let fds: pb::Fds = dir.read_msg(&fds_file(e.pid), Kind::Fds)?;
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!(
            "PID {} ({}): {} fds\n",
            e.pid,
            core.comm,
            fds.fds.len()
        ));
        let mut t = Table::new(&[">FD", "TYPE", "MODE", "WHAT"]);
        for fd in &fds.fds {
            let (kind, mode, what) = match by_id.get(&fd.file_id) {
                Some(f) => describe(f),
                None => (
                    "?".into(),
                    String::new(),
                    format!("file id {} is not in files.img", fd.file_id),
                ),
            };
            let mode = if fd.cloexec {
                format!("{mode},cloexec")
                    .trim_start_matches(',')
                    .to_string()
            } else {
                mode
            };
            t.row([fd.fd.to_string(), kind, mode, what]);
        }
        if let Some(st) = &core.task {
            t.row(["cwd".into(), "dir".into(), String::new(), st.cwd.clone()]);
            if !st.root.is_empty() {
                t.row(["root".into(), "dir".into(), String::new(), st.root.clone()]);
            }
        }
        out.push_str(&t.render(2));
    }
    Ok(out)
}

/// The kind's name, the access mode and flags, and what it is.
pub fn describe(f: &pb::FileEntry) -> (String, String, String) {
    let mode = mode(f.flags);
    let Some(kind) = &f.kind else {
        return ("?".into(), mode, "no kind recorded".into());
    };
    let v = serde_json::to_value(kind).unwrap_or(Value::Null);
    let Some((name, fields)) = v
        .as_object()
        .and_then(|o| o.iter().next())
        .and_then(|(n, f)| Some((n, f.as_object()?)))
    else {
        return ("?".into(), mode, String::new());
    };
    let s = |k: &str| {
        fields
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let n = |k: &str| fields.get(k).and_then(Value::as_u64).unwrap_or(0);
    let b = |k: &str| fields.get(k).and_then(Value::as_bool).unwrap_or(false);
    let bytes = |k: &str| fields.get(k).and_then(Value::as_array).map_or(0, Vec::len);
    let unread = |k: &str| match bytes(k) {
        0 => String::new(),
        l => format!(", {l} bytes unread"),
    };
    let what = match name.as_str() {
        "Reg" => {
            let mut w = s("path");
            if b("unlinked") {
                w.push_str(" (deleted; content saved)");
            }
            format!("{w}  pos {}", f.pos)
        }
        "Pipe" => format!("pipe:[{}]{}", n("pipe_id"), unread("data")),
        "Fifo" => format!("{} (pipe:[{}]){}", s("path"), n("pipe_id"), unread("data")),
        "Chr" => format!(
            "{} ({}:{})",
            s("path"),
            dev_major(n("rdev")),
            dev_minor(n("rdev"))
        ),
        "Tty" => format!("{} (restored as cr's terminal)", s("path")),
        "Memfd" => format!("memfd:{}  size {}", s("name"), n("size")),
        "Tcp" => tcp(fields),
        _ => generic(fields),
    };
    (name.to_lowercase(), mode, what)
}

/// r, w or rw, then the flags that matter to a reader (append, nonblock, …).
fn mode(flags: u32) -> String {
    let flags = flags as i32;
    let mut m = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "r",
        libc::O_WRONLY => "w",
        _ => "rw",
    }
    .to_string();
    for (bit, name) in [
        (libc::O_APPEND, "append"),
        (libc::O_NONBLOCK, "nonblock"),
        (libc::O_DIRECT, "direct"),
        (libc::O_PATH, "path"),
        (libc::O_SYNC, "sync"),
    ] {
        if flags & bit == bit {
            m.push(',');
            m.push_str(name);
        }
    }
    m
}

fn dev_major(rdev: u64) -> u64 {
    ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)
}

fn dev_minor(rdev: u64) -> u64 {
    (rdev & 0xff) | ((rdev >> 12) & !0xff)
}

/// An address as the image holds it (4 or 16 bytes, as a JSON array of numbers).
fn addr(v: Option<&Value>, port: u64) -> String {
    let b: Vec<u8> = v
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u8)
                .collect()
        })
        .unwrap_or_default();
    match b.len() {
        4 => format!("{}:{port}", std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3])),
        16 => {
            let a: [u8; 16] = b.try_into().unwrap_or([0; 16]);
            format!("[{}]:{port}", std::net::Ipv6Addr::from(a))
        }
        _ => format!("?:{port}"),
    }
}

fn tcp(f: &serde_json::Map<String, Value>) -> String {
    let n = |k: &str| f.get(k).and_then(Value::as_u64).unwrap_or(0);
    let src = addr(f.get("src_addr"), n("src_port"));
    match n("state") {
        10 => format!("listening on {src}"),
        1 => {
            let q = |k: &str| f.get(k).and_then(Value::as_array).map_or(0, Vec::len);
            format!(
                "{src} -> {}  established, {} bytes in, {} bytes out queued",
                addr(f.get("dst_addr"), n("dst_port")),
                q("inq"),
                q("outq")
            )
        }
        s => format!("{src}  state {s}"),
    }
}

/// A kind this view has no line for: its path if it has one, then its scalar fields that are
/// set (`name=value`), byte strings by length.
fn generic(f: &serde_json::Map<String, Value>) -> String {
    let mut parts = Vec::new();
    if let Some(p) = f.get("path").and_then(Value::as_str) {
        parts.push(p.to_string());
    }
    for (k, v) in f {
        if k == "path" {
            continue;
        }
        let shown = match v {
            Value::Bool(true) => Some(k.clone()),
            Value::Number(x) if x.as_f64() != Some(0.0) => Some(format!("{k}={x}")),
            Value::String(s) if !s.is_empty() => Some(format!("{k}={s}")),
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
                Some(format!("{k}=<{} bytes>", a.len()))
            }
            Value::Array(a) if !a.is_empty() => Some(format!("{k}=<{} items>", a.len())),
            _ => None,
        };
        parts.extend(shown);
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_kinds() {
        let reg = pb::FileEntry {
            id: 1,
            flags: (libc::O_WRONLY | libc::O_APPEND) as u32,
            pos: 7,
            kind: Some(pb::file_entry::Kind::Reg(pb::RegFile {
                path: "/tmp/log".into(),
                ..Default::default()
            })),
        };
        assert_eq!(
            describe(&reg),
            ("reg".into(), "w,append".into(), "/tmp/log  pos 7".into())
        );
        let pipe = pb::FileEntry {
            id: 2,
            kind: Some(pb::file_entry::Kind::Pipe(pb::PipeFile {
                pipe_id: 99,
                data: b"abc".to_vec(),
                capacity: 4096,
            })),
            ..Default::default()
        };
        assert_eq!(describe(&pipe).2, "pipe:[99], 3 bytes unread");
        let mut m = serde_json::Map::new();
        m.insert("count".into(), 3.into());
        m.insert("flags".into(), 0.into());
        m.insert("semaphore".into(), true.into());
        assert_eq!(generic(&m), "count=3 semaphore");
    }
}
