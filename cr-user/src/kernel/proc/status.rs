//! `/proc/PID/status` (and `/proc/PID/task/TID/status`): credentials, capabilities, signal
//! masks, namespace pids, seccomp and the other per-task state a dump must carry.
//!
//! Lines are `Key:\tvalue`. Fields this module does not name stay available in
//! [`Status::fields`], so a new kernel field never breaks parsing.

use anyhow::{bail, Context, Result};

use super::{parse_dec, parse_hex, pid_path, read_text};

/// Parsed `/proc/PID/status`. Fields missing from the file (older kernels, kernel threads)
/// keep their defaults; the ones whose absence matters are `Option`s.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// `Name:`, unescaped (the kernel escapes '\n' and '\\' here; stat's comm is raw).
    pub name: String,
    /// `Umask:` (absent on kernels before 4.7).
    pub umask: Option<u32>,
    /// First letter of `State:` (R, S, D, T, t, Z, X, I).
    pub state: char,
    pub tgid: i32,
    pub ngid: i32,
    pub pid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// Real, effective, saved, filesystem.
    pub gid: [u32; 4],
    pub fd_size: u32,
    /// Supplementary groups (may be empty: the line is then `Groups:\t`).
    pub groups: Vec<u32>,
    /// Thread group id in each pid namespace, outermost first.
    pub ns_tgid: Vec<i32>,
    pub ns_pid: Vec<i32>,
    pub ns_pgid: Vec<i32>,
    pub ns_sid: Vec<i32>,
    /// `Kthread:` (6.x).
    pub kthread: Option<bool>,
    pub threads: u32,
    /// `SigQ:` queued/limit.
    pub sig_q: (u64, u64),
    pub sig_pnd: u64,
    pub shd_pnd: u64,
    pub sig_blk: u64,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// 0 disabled, 1 strict, 2 filter.
    pub seccomp: u32,
    pub seccomp_filters: Option<u32>,
    /// `THP_enabled:` (prctl PR_SET_THP_DISABLE clears it).
    pub thp_enabled: Option<bool>,
    pub core_dumping: Option<bool>,
    /// `VmRSS:` etc. in bytes, when present.
    pub vm_rss: Option<u64>,
    pub vm_size: Option<u64>,
    /// Every `Key: value` line in file order, value trimmed.
    pub fields: Vec<(String, String)>,
}

impl Status {
    /// The raw value of any line, e.g. `get("Cpus_allowed_list")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Undoes the escaping of `Name:` (`\n` → newline, `\\` → backslash).
fn unescape_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some(o) => {
                out.push('\\');
                out.push(o);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn ids<T: std::str::FromStr>(v: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    v.split_ascii_whitespace()
        .map(|x| parse_dec(x, what))
        .collect()
}

fn four(v: &str, what: &str) -> Result<[u32; 4]> {
    let x: Vec<u32> = ids(v, what)?;
    match x.as_slice() {
        [a, b, c, d] => Ok([*a, *b, *c, *d]),
        _ => bail!("bad {what} {v:?}: want 4 values"),
    }
}

fn flag(v: &str, what: &str) -> Result<bool> {
    Ok(parse_dec::<u32>(v, what)? != 0)
}

fn kb(v: &str, what: &str) -> Result<u64> {
    let n = v.trim().strip_suffix("kB").unwrap_or(v);
    Ok(parse_dec::<u64>(n, what)? * 1024)
}

/// Parses the text of a status file.
pub fn parse_status(text: &str) -> Result<Status> {
    let mut s = Status::default();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let (key, raw) = line
            .split_once(':')
            .with_context(|| format!("status line without ':': {line:?}"))?;
        // Name keeps its inner spacing; only the separator tab is dropped.
        let value = if key == "Name" {
            raw.strip_prefix('\t').unwrap_or(raw)
        } else {
            raw.trim()
        };
        let ctx = || format!("status line {line:?}");
        match key {
            "Name" => s.name = unescape_name(value),
            "Umask" => s.umask = Some(super::parse_oct(value, "Umask")? as u32),
            "State" => s.state = value.chars().next().with_context(ctx)?,
            "Tgid" => s.tgid = parse_dec(value, key)?,
            "Ngid" => s.ngid = parse_dec(value, key)?,
            "Pid" => s.pid = parse_dec(value, key)?,
            "PPid" => s.ppid = parse_dec(value, key)?,
            "TracerPid" => s.tracer_pid = parse_dec(value, key)?,
            "Uid" => s.uid = four(value, key)?,
            "Gid" => s.gid = four(value, key)?,
            "FDSize" => s.fd_size = parse_dec(value, key)?,
            "Groups" => s.groups = ids(value, key)?,
            "NStgid" => s.ns_tgid = ids(value, key)?,
            "NSpid" => s.ns_pid = ids(value, key)?,
            "NSpgid" => s.ns_pgid = ids(value, key)?,
            "NSsid" => s.ns_sid = ids(value, key)?,
            "Kthread" => s.kthread = Some(flag(value, key)?),
            "Threads" => s.threads = parse_dec(value, key)?,
            "SigQ" => {
                let (a, b) = value.split_once('/').with_context(ctx)?;
                s.sig_q = (parse_dec(a, key)?, parse_dec(b, key)?);
            }
            "SigPnd" => s.sig_pnd = parse_hex(value, key)?,
            "ShdPnd" => s.shd_pnd = parse_hex(value, key)?,
            "SigBlk" => s.sig_blk = parse_hex(value, key)?,
            "SigIgn" => s.sig_ign = parse_hex(value, key)?,
            "SigCgt" => s.sig_cgt = parse_hex(value, key)?,
            "CapInh" => s.cap_inh = parse_hex(value, key)?,
            "CapPrm" => s.cap_prm = parse_hex(value, key)?,
            "CapEff" => s.cap_eff = parse_hex(value, key)?,
            "CapBnd" => s.cap_bnd = parse_hex(value, key)?,
            "CapAmb" => s.cap_amb = parse_hex(value, key)?,
            "NoNewPrivs" => s.no_new_privs = flag(value, key)?,
            "Seccomp" => s.seccomp = parse_dec(value, key)?,
            "Seccomp_filters" => s.seccomp_filters = Some(parse_dec(value, key)?),
            "THP_enabled" => s.thp_enabled = Some(flag(value, key)?),
            "CoreDumping" => s.core_dumping = Some(flag(value, key)?),
            "VmRSS" => s.vm_rss = Some(kb(value, key)?),
            "VmSize" => s.vm_size = Some(kb(value, key)?),
            _ => {}
        }
        s.fields.push((key.to_string(), value.to_string()));
    }
    if s.pid == 0 && s.tgid == 0 {
        bail!("status has no Pid/Tgid");
    }
    Ok(s)
}

/// Reads and parses `/proc/PID/status`.
pub fn read_status(pid: i32) -> Result<Status> {
    let path = pid_path(pid, "status");
    parse_status(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

/// Reads and parses `/proc/PID/task/TID/status` (per-thread masks and credentials).
pub fn read_task_status(pid: i32, tid: i32) -> Result<Status> {
    let path = pid_path(pid, &format!("task/{tid}/status"));
    parse_status(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\tmy worker\\n\\\\x
Umask:\t0027
State:\tS (sleeping)
Tgid:\t8225
Ngid:\t0
Pid:\t8227
PPid:\t8221
TracerPid:\t0
Uid:\t1000\t1001\t1002\t1003
Gid:\t100\t101\t102\t103
FDSize:\t256
Groups:\t4 24 27 
NStgid:\t8225\t1
NSpid:\t8227\t3
NSpgid:\t8221\t0
NSsid:\t7206\t0
Kthread:\t0
VmPeak:\t    3060 kB
VmSize:\t    3060 kB
VmRSS:\t    1600 kB
CoreDumping:\t0
THP_enabled:\t1
untag_mask:\t0xffffffffffffffff
Threads:\t3
SigQ:\t2/96365
SigPnd:\t0000000000000100
ShdPnd:\t0000000000004000
SigBlk:\t0000000000010000
SigIgn:\t0000000000001000
SigCgt:\t0000000180000002
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
CapAmb:\t0000000000000400
NoNewPrivs:\t1
Seccomp:\t2
Seccomp_filters:\t1
Speculation_Store_Bypass:\tvulnerable
Cpus_allowed_list:\t0-1
voluntary_ctxt_switches:\t5
";

    #[test]
    fn sample() {
        let s = parse_status(SAMPLE).unwrap();
        assert_eq!(s.name, "my worker\n\\x");
        assert_eq!(s.umask, Some(0o027));
        assert_eq!(s.state, 'S');
        assert_eq!((s.tgid, s.pid, s.ppid, s.tracer_pid), (8225, 8227, 8221, 0));
        assert_eq!(s.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(s.gid, [100, 101, 102, 103]);
        assert_eq!(s.groups, vec![4, 24, 27]);
        assert_eq!(s.ns_tgid, vec![8225, 1]);
        assert_eq!(s.ns_pid, vec![8227, 3]);
        assert_eq!(s.ns_pgid, vec![8221, 0]);
        assert_eq!(s.kthread, Some(false));
        assert_eq!(s.threads, 3);
        assert_eq!(s.sig_q, (2, 96365));
        assert_eq!(s.sig_pnd, 0x100);
        assert_eq!(s.shd_pnd, 0x4000);
        assert_eq!(s.sig_blk, 0x10000);
        assert_eq!(s.sig_ign, 0x1000);
        assert_eq!(s.sig_cgt, 0x1_8000_0002);
        assert_eq!(s.cap_eff, 0x1fffeffffff);
        assert_eq!(s.cap_amb, 0x400);
        assert!(s.no_new_privs);
        assert_eq!((s.seccomp, s.seccomp_filters), (2, Some(1)));
        assert_eq!(s.thp_enabled, Some(true));
        assert_eq!(s.core_dumping, Some(false));
        assert_eq!(s.vm_rss, Some(1600 * 1024));
        assert_eq!(s.get("Cpus_allowed_list"), Some("0-1"));
        assert_eq!(s.get("untag_mask"), Some("0xffffffffffffffff"));
    }

    #[test]
    fn empty_groups_and_missing_optional_lines() {
        let text = "Name:\tkthreadd\nState:\tS (sleeping)\nTgid:\t2\nPid:\t2\nPPid:\t0\n\
Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t \nThreads:\t1\n";
        let s = parse_status(text).unwrap();
        assert!(s.groups.is_empty());
        assert_eq!(s.umask, None);
        assert_eq!(s.thp_enabled, None);
        assert_eq!(s.name, "kthreadd");
    }

    #[test]
    fn bad_input() {
        assert!(parse_status("").is_err());
        assert!(parse_status("Pid:\tx\n").is_err());
        assert!(parse_status("Pid:\t1\nUid:\t0\t0\t0\n").is_err());
        assert!(parse_status("Pid:\t1\nSigBlk:\tzz\n").is_err());
        assert!(parse_status("Pid:\t1\nno colon\n").is_err());
        assert!(parse_status("Pid:\t1\nSigQ:\t5\n").is_err());
    }

    #[test]
    fn live_self_agrees_with_stat() {
        let me = std::process::id() as i32;
        let s = read_status(me).unwrap();
        let st = super::super::stat::read_stat(me).unwrap();
        assert_eq!(s.tgid, me);
        assert_eq!(s.pid, me);
        assert_eq!(s.ppid, st.ppid);
        // The last NStgid entry is the pid in the task's own namespace: what getpid() says.
        assert_eq!(s.ns_tgid.last(), Some(&me));
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(s.uid[0], uid);
        assert_eq!(s.gid[0], gid);
        assert!(s.threads >= 1);
        assert!(s.umask.is_some());
    }
}
