//! Tracepoint record layouts from tracefs (`events/CATEGORY/NAME/format`).
//!
//! Rust eBPF has no CO-RE, so cr-ebpf reads tracepoint fields at fixed offsets. Those offsets
//! are a kernel ABI in practice, but not a promise: before loading, the user side reads the
//! kernel's own description of each record, refuses a layout it cannot handle, and patches the
//! offsets into the object (globals) when they differ from the compiled-in defaults.

use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use aya::EbpfLoader;
use cr_common::sock::{names, SockLayout};

use crate::kernel::sys::mounts::TRACEFS;

/// One `field:` line of a tracefs format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

/// Parses the `field:` lines of a tracefs format file. Lines that do not parse are skipped
/// (newer kernels may add attributes; a field we need and cannot read is reported by the
/// caller as missing).
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines().filter_map(parse_field_line).collect()
}

fn parse_field_line(line: &str) -> Option<Field> {
    let line = line.trim();
    let decl = line.strip_prefix("field:")?;
    let mut parts = decl.split(';').map(str::trim);
    let decl = parts.next()?;
    // "unsigned long address" or "char comm[16]" or "__data_loc char[] name".
    let last = decl.split_whitespace().last()?;
    let name = last.split('[').next()?.to_string();
    let (mut offset, mut size, mut signed) = (None, None, false);
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = v.trim().parse().ok();
        } else if let Some(v) = p.strip_prefix("size:") {
            size = v.trim().parse().ok();
        } else if let Some(v) = p.strip_prefix("signed:") {
            signed = v.trim() == "1";
        }
    }
    Some(Field {
        name,
        offset: offset?,
        size: size?,
        signed,
    })
}

/// Offsets of the fields cr-ebpf's fault tracker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultLayout {
    pub address: u32,
    pub error_code: u32,
}

/// Finds `address` and `error_code` in the format text of an `exceptions:page_fault_*` event.
/// Both must be 8-byte fields: the program reads them as u64.
pub fn fault_layout(event: &str, text: &str) -> Result<FaultLayout> {
    let fields = parse_format(text);
    let get = |name: &str| -> Result<u32> {
        let Some(f) = fields.iter().find(|f| f.name == name) else {
            bail!("tracepoint {event} has no field `{name}` in its tracefs format: cr-ebpf cannot read this kernel's page-fault records");
        };
        if f.size != 8 {
            bail!(
                "tracepoint {event}: field `{name}` is {} bytes, cr-ebpf reads 8",
                f.size
            );
        }
        Ok(f.offset)
    };
    Ok(FaultLayout {
        address: get("address")?,
        error_code: get("error_code")?,
    })
}

/// Checks that a `syscalls:sys_enter_*` record has its arguments where cr-ebpf reads them:
/// `__syscall_nr` at 8, then every argument 8 bytes wide at SYSCALL_ARG0_OFFSET + 8*i.
pub fn check_syscall_args(event: &str, text: &str) -> Result<()> {
    let fields = parse_format(text);
    let Some(nr) = fields.iter().position(|f| f.name == "__syscall_nr") else {
        bail!("tracepoint syscalls:{event} has no __syscall_nr field");
    };
    if fields[nr].offset != 8 {
        bail!(
            "tracepoint syscalls:{event}: __syscall_nr at offset {}, cr-ebpf reads 8",
            fields[nr].offset
        );
    }
    for (i, f) in fields[nr + 1..].iter().enumerate() {
        let want = cr_common::SYSCALL_ARG0_OFFSET + 8 * i as u32;
        if f.offset != want || f.size != 8 {
            bail!(
                "tracepoint syscalls:{event}: argument {i} ({}) is {} bytes at offset {}, cr-ebpf reads 8 at {want}",
                f.name,
                f.size,
                f.offset
            );
        }
    }
    Ok(())
}

/// Offset of `child_pid` (a 4-byte pid_t) in a `sched:sched_process_fork` record.
pub fn fork_child_pid_offset(text: &str) -> Result<u32> {
    let fields = parse_format(text);
    match fields.iter().find(|f| f.name == "child_pid") {
        Some(f) if f.size == 4 => Ok(f.offset),
        Some(f) => bail!(
            "sched:sched_process_fork: child_pid is {} bytes, cr-ebpf reads 4",
            f.size
        ),
        None => bail!("sched:sched_process_fork has no child_pid field"),
    }
}

/// Reads a tracepoint's format file from tracefs.
pub fn read_format(category: &str, name: &str) -> Result<String> {
    let path = format!("{TRACEFS}/events/{category}/{name}/format");
    std::fs::read_to_string(&path).with_context(|| {
        format!("read {path}: tracepoint {category}:{name} is not available (kernel without it, or tracefs not mounted)")
    })
}

/// The layout of exceptions:page_fault_user and page_fault_kernel, which must agree: one pair
/// of offsets serves both programs.
pub fn read_fault_layout() -> Result<FaultLayout> {
    let user = fault_layout(
        "exceptions:page_fault_user",
        &read_format("exceptions", "page_fault_user")?,
    )?;
    let kernel = fault_layout(
        "exceptions:page_fault_kernel",
        &read_format("exceptions", "page_fault_kernel")?,
    )?;
    if user != kernel {
        bail!("exceptions:page_fault_user ({user:?}) and page_fault_kernel ({kernel:?}) disagree on their layout; cr-ebpf needs them equal");
    }
    Ok(user)
}

/// The record layout of sock:inet_sock_set_state (the socket table's), read from tracefs once per process (the loader patches it into the
/// object; `SockMaps::attach` refuses to attach without it).
static LAYOUT: OnceLock<std::result::Result<SockLayout, String>> = OnceLock::new();

pub fn sock_layout() -> Result<SockLayout> {
    LAYOUT
        .get_or_init(|| read_sock_layout().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Patches the record layout into the object being loaded, when this kernel's differs from
/// the compiled-in defaults (called by `BpfObject::load_sized`).
pub fn patch_sock_layout(loader: &mut EbpfLoader<'_>) {
    if let Ok(l) = LAYOUT.get_or_init(|| read_sock_layout().map_err(|e| format!("{e:#}"))) {
        if *l != SockLayout::DEFAULT {
            log::debug!("sock:inet_sock_set_state layout differs from cr-ebpf's defaults: {l:?}");
        }
        // Not must_exist: an object built before the table existed still loads.
        loader.override_global(names::GLOBAL_LAYOUT, l, false);
    }
}

fn read_sock_layout() -> Result<SockLayout> {
    let sock = read_format("sock", "inet_sock_set_state")?;
    let fork = read_format("sched", "sched_process_fork")?;
    parse_sock_layout(&sock, &fork)
}

/// The offsets cr_sock_state reads, from the tracefs format texts of sock:inet_sock_set_state
/// and sched:sched_process_fork. Every field must have the size the program reads.
pub fn parse_sock_layout(sock_format: &str, fork_format: &str) -> Result<SockLayout> {
    let fields = parse_format(sock_format);
    let get = |name: &str, size: u32| -> Result<u32> {
        match fields.iter().find(|f| f.name == name) {
            Some(f) if f.size == size => Ok(f.offset),
            Some(f) => bail!("sock:inet_sock_set_state: field `{name}` is {} bytes, cr-ebpf reads {size}", f.size),
            None => bail!("sock:inet_sock_set_state has no field `{name}`: cr-ebpf cannot read this kernel's records"),
        }
    };
    Ok(SockLayout {
        skaddr: get("skaddr", 8)?,
        oldstate: get("oldstate", 4)?,
        newstate: get("newstate", 4)?,
        sport: get("sport", 2)?,
        dport: get("dport", 2)?,
        family: get("family", 2)?,
        protocol: get("protocol", 2)?,
        saddr: get("saddr", 4)?,
        daddr: get("daddr", 4)?,
        saddr_v6: get("saddr_v6", 16)?,
        daddr_v6: get("daddr_v6", 16)?,
        fork_child_pid: fork_child_pid_offset(fork_format)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PF_USER: &str = "name: page_fault_user
ID: 190
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long ip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long error_code;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"address=%ps ip=%ps error_code=0x%lx\", (void *)REC->address, (void *)REC->ip, REC->error_code
";

    #[test]
    fn parses_fields() {
        let f = parse_format(PF_USER);
        assert_eq!(f.len(), 7);
        assert_eq!(
            f[3],
            Field {
                name: "common_pid".into(),
                offset: 4,
                size: 4,
                signed: true
            }
        );
        assert_eq!(
            f[6],
            Field {
                name: "error_code".into(),
                offset: 24,
                size: 8,
                signed: false
            }
        );
    }

    #[test]
    fn parses_arrays_and_data_loc() {
        let f = parse_format("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n");
        assert_eq!(f[0].name, "comm");
        assert_eq!(f[0].size, 16);
        assert_eq!(f[1].name, "name");
    }

    #[test]
    fn finds_the_fault_layout() {
        let l = fault_layout("x", PF_USER).unwrap();
        assert_eq!(
            l,
            FaultLayout {
                address: 8,
                error_code: 24
            }
        );
        // A kernel with another layout is followed, not refused.
        let moved = PF_USER.replace("error_code;\toffset:24", "error_code;\toffset:32");
        assert_eq!(fault_layout("x", &moved).unwrap().error_code, 32);
    }

    #[test]
    fn checks_syscall_argument_layout() {
        let f = "name: sys_enter_munmap
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:unsigned long addr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:size_t len;\toffset:24;\tsize:8;\tsigned:0;
";
        check_syscall_args("sys_enter_munmap", f).unwrap();
        let moved = f.replace("len;\toffset:24", "len;\toffset:32");
        let e = check_syscall_args("sys_enter_munmap", &moved)
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument 1 (len)"), "{e}");
        let e = check_syscall_args("x", "field:int a;\toffset:8;\tsize:4;")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no __syscall_nr"), "{e}");
    }

    #[test]
    fn finds_the_fork_child_pid() {
        let f = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(fork_child_pid_offset(f).unwrap(), 20);
        // Older kernels: inline comm arrays.
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(fork_child_pid_offset(old).unwrap(), 44);
        assert!(fork_child_pid_offset("").is_err());
    }

    #[test]
    fn refuses_missing_or_narrow_fields() {
        let missing = PF_USER.replace("error_code;", "err;");
        let e = fault_layout("exceptions:page_fault_user", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no field `error_code`"), "{e}");
        let narrow = PF_USER.replace("address;\toffset:8;\tsize:8", "address;\toffset:8;\tsize:4");
        let e = fault_layout("x", &narrow).unwrap_err().to_string();
        assert!(e.contains("is 4 bytes"), "{e}");
    }

    const SOCK_FORMAT: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s\", REC->family, REC->protocol
";
    const FORK_FORMAT: &str = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";

    #[test]
    fn the_layout_of_this_kernel_generation_is_the_default() {
        assert_eq!(
            parse_sock_layout(SOCK_FORMAT, FORK_FORMAT).unwrap(),
            SockLayout::DEFAULT
        );
    }

    #[test]
    fn a_moved_field_is_followed_and_a_resized_one_refused() {
        let moved = SOCK_FORMAT.replace("daddr_v6[16];\toffset:56", "daddr_v6[16];\toffset:64");
        assert_eq!(parse_sock_layout(&moved, FORK_FORMAT).unwrap().daddr_v6, 64);
        let narrow =
            SOCK_FORMAT.replace("sport;\toffset:24;\tsize:2", "sport;\toffset:24;\tsize:4");
        let e = parse_sock_layout(&narrow, FORK_FORMAT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sport` is 4 bytes"), "{e}");
        let missing = SOCK_FORMAT.replace("protocol;", "proto;");
        let e = parse_sock_layout(&missing, FORK_FORMAT)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no field `protocol`"), "{e}");
        assert!(parse_sock_layout(SOCK_FORMAT, "").is_err());
    }
}
