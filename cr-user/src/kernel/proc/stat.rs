//! `/proc/PID/stat` (and `/proc/PID/task/TID/stat`): the mm layout fields (start_code … env_end)
//! that restore hands to PR_SET_MM_MAP, the process-tree ids, and the task flags.
//!
//! The comm field is arbitrary text (it may hold spaces, parentheses, even ") ("), so the line
//! is split at the LAST ')' — everything after it is space-separated numbers.

use anyhow::{bail, Context, Result};

use super::{parse_dec, pid_path, read_text};

/// `PF_KTHREAD` in the `flags` field: a kernel thread (no user memory; never dumpable).
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// The fields of `/proc/PID/stat`, named as in proc(5); the number in each comment is the
/// field's position there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stat {
    /// (1)
    pub pid: i32,
    /// (2) raw comm, without the parentheses.
    pub comm: String,
    /// (3) R, S, D, Z, T, t, X, I, …
    pub state: char,
    /// (4)
    pub ppid: i32,
    /// (5)
    pub pgrp: i32,
    /// (6)
    pub session: i32,
    /// (7)
    pub tty_nr: i32,
    /// (8)
    pub tpgid: i32,
    /// (9) PF_* flags.
    pub flags: u32,
    /// (10)
    pub minflt: u64,
    /// (11)
    pub cminflt: u64,
    /// (12)
    pub majflt: u64,
    /// (13)
    pub cmajflt: u64,
    /// (14) clock ticks.
    pub utime: u64,
    /// (15) clock ticks.
    pub stime: u64,
    /// (16)
    pub cutime: i64,
    /// (17)
    pub cstime: i64,
    /// (18)
    pub priority: i64,
    /// (19)
    pub nice: i64,
    /// (20)
    pub num_threads: i64,
    /// (21) always 0 since 2.6.17.
    pub itrealvalue: i64,
    /// (22) clock ticks after boot; with pid it identifies a process across pid reuse.
    pub starttime: u64,
    /// (23) bytes.
    pub vsize: u64,
    /// (24) pages.
    pub rss: i64,
    /// (25)
    pub rsslim: u64,
    /// (26)
    pub start_code: u64,
    /// (27)
    pub end_code: u64,
    /// (28)
    pub start_stack: u64,
    /// (29)
    pub kstkesp: u64,
    /// (30)
    pub kstkeip: u64,
    /// (31) obsolete: use status SigPnd.
    pub signal: u64,
    /// (32) obsolete: use status SigBlk.
    pub blocked: u64,
    /// (33) obsolete: use status SigIgn.
    pub sigignore: u64,
    /// (34) obsolete: use status SigCgt.
    pub sigcatch: u64,
    /// (35)
    pub wchan: u64,
    /// (36)
    pub nswap: u64,
    /// (37)
    pub cnswap: u64,
    /// (38) the signal sent to the parent on exit (SIGCHLD for processes, 0/-1 for threads).
    pub exit_signal: i32,
    /// (39)
    pub processor: i32,
    /// (40)
    pub rt_priority: u32,
    /// (41)
    pub policy: u32,
    /// (42)
    pub delayacct_blkio_ticks: u64,
    /// (43)
    pub guest_time: u64,
    /// (44)
    pub cguest_time: i64,
    /// (45)
    pub start_data: u64,
    /// (46)
    pub end_data: u64,
    /// (47)
    pub start_brk: u64,
    /// (48)
    pub arg_start: u64,
    /// (49)
    pub arg_end: u64,
    /// (50)
    pub env_start: u64,
    /// (51)
    pub env_end: u64,
    /// (52)
    pub exit_code: i32,
}

impl Stat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// Number of fields after the comm on kernels since 3.5 (fields 3..=52).
const FIELDS_AFTER_COMM: usize = 50;

/// Parses the text of a stat file.
pub fn parse_stat(text: &str) -> Result<Stat> {
    let text = text.trim_end_matches('\n');
    let open = text
        .find('(')
        .with_context(|| format!("stat has no '(': {text:?}"))?;
    let close = text
        .rfind(')')
        .with_context(|| format!("stat has no ')': {text:?}"))?;
    if close < open {
        bail!("stat has ')' before '(': {text:?}");
    }
    let pid = parse_dec(&text[..open], "pid")?;
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    if f.len() < FIELDS_AFTER_COMM {
        bail!(
            "stat has {} fields after comm, want {FIELDS_AFTER_COMM}: {text:?}",
            f.len()
        );
    }
    // f[i] is proc(5) field number i + 3.
    let state = {
        let mut c = f[0].chars();
        match (c.next(), c.next()) {
            (Some(s), None) => s,
            _ => bail!("bad stat state {:?}", f[0]),
        }
    };
    macro_rules! field {
        ($n:literal) => {
            parse_dec(f[$n - 3], concat!("stat field ", $n))?
        };
    }
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: field!(4),
        pgrp: field!(5),
        session: field!(6),
        tty_nr: field!(7),
        tpgid: field!(8),
        flags: field!(9),
        minflt: field!(10),
        cminflt: field!(11),
        majflt: field!(12),
        cmajflt: field!(13),
        utime: field!(14),
        stime: field!(15),
        cutime: field!(16),
        cstime: field!(17),
        priority: field!(18),
        nice: field!(19),
        num_threads: field!(20),
        itrealvalue: field!(21),
        starttime: field!(22),
        vsize: field!(23),
        rss: field!(24),
        rsslim: field!(25),
        start_code: field!(26),
        end_code: field!(27),
        start_stack: field!(28),
        kstkesp: field!(29),
        kstkeip: field!(30),
        signal: field!(31),
        blocked: field!(32),
        sigignore: field!(33),
        sigcatch: field!(34),
        wchan: field!(35),
        nswap: field!(36),
        cnswap: field!(37),
        exit_signal: field!(38),
        processor: field!(39),
        rt_priority: field!(40),
        policy: field!(41),
        delayacct_blkio_ticks: field!(42),
        guest_time: field!(43),
        cguest_time: field!(44),
        start_data: field!(45),
        end_data: field!(46),
        start_brk: field!(47),
        arg_start: field!(48),
        arg_end: field!(49),
        env_start: field!(50),
        env_end: field!(51),
        exit_code: field!(52),
    })
}

/// Reads and parses `/proc/PID/stat`.
pub fn read_stat(pid: i32) -> Result<Stat> {
    let path = pid_path(pid, "stat");
    parse_stat(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

/// Reads and parses `/proc/PID/task/TID/stat` (per-thread state, comm and exit_signal).
pub fn read_task_stat(pid: i32, tid: i32) -> Result<Stat> {
    let path = pid_path(pid, &format!("task/{tid}/stat"));
    parse_stat(&read_text(&path)?).with_context(|| format!("parse {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAT: &str = "8226 (cat) R 8221 8221 7206 0 -1 4194304 104 0 0 0 0 0 0 0 20 0 1 0 52993 \
3133440 417 18446744073709551615 93982162276352 93982162296233 140730391331280 0 0 0 0 0 0 0 0 0 \
17 0 0 0 0 0 0 93982162312240 93982162313856 93982823796736 140730391337697 140730391337717 \
140730391337717 140730391338987 0\n";

    #[test]
    fn plain() {
        let s = parse_stat(CAT).unwrap();
        assert_eq!(s.pid, 8226);
        assert_eq!(s.comm, "cat");
        assert_eq!(s.state, 'R');
        assert_eq!(
            (s.ppid, s.pgrp, s.session, s.tty_nr, s.tpgid),
            (8221, 8221, 7206, 0, -1)
        );
        assert_eq!(s.flags, 4194304);
        assert!(!s.is_kernel_thread());
        assert_eq!(s.priority, 20);
        assert_eq!(s.num_threads, 1);
        assert_eq!(s.starttime, 52993);
        assert_eq!(s.vsize, 3133440);
        assert_eq!(s.rss, 417);
        assert_eq!(s.rsslim, u64::MAX);
        assert_eq!((s.start_code, s.end_code), (93982162276352, 93982162296233));
        assert_eq!(s.start_stack, 140730391331280);
        assert_eq!(s.exit_signal, 17);
        assert_eq!(
            (s.start_data, s.end_data, s.start_brk),
            (93982162312240, 93982162313856, 93982823796736)
        );
        assert_eq!((s.arg_start, s.arg_end), (140730391337697, 140730391337717));
        assert_eq!((s.env_start, s.env_end), (140730391337717, 140730391338987));
        assert_eq!(s.exit_code, 0);
    }

    #[test]
    fn comm_with_parens_and_spaces() {
        let line = CAT.replacen("(cat)", "(a) (b ))", 1);
        let s = parse_stat(&line).unwrap();
        assert_eq!(s.comm, "a) (b )");
        assert_eq!(s.state, 'R');
        assert_eq!(s.ppid, 8221);
        let line = CAT.replacen("(cat)", "()", 1);
        assert_eq!(parse_stat(&line).unwrap().comm, "");
    }

    #[test]
    fn kernel_thread() {
        let kt = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 3 0 0 \
18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let s = parse_stat(kt).unwrap();
        assert!(s.is_kernel_thread());
        assert_eq!(s.sigignore, 2147483647);
        assert_eq!(s.ppid, 0);
    }

    #[test]
    fn bad_input() {
        assert!(parse_stat("").is_err());
        assert!(parse_stat("12 cat R 1").is_err());
        assert!(parse_stat("12 (cat) R 1 2 3").is_err());
        assert!(parse_stat(&CAT.replacen(" R ", " RR ", 1)).is_err());
        assert!(parse_stat(&CAT.replacen(" 8221 ", " x ", 1)).is_err());
        assert!(parse_stat(") 12 (").is_err());
    }

    #[test]
    fn live_self() {
        let me = std::process::id() as i32;
        let s = read_stat(me).unwrap();
        assert_eq!(s.pid, me);
        // SAFETY: getppid/getpgrp/getsid have no preconditions.
        let (ppid, pgrp, sid) = unsafe { (libc::getppid(), libc::getpgrp(), libc::getsid(0)) };
        assert_eq!((s.ppid, s.pgrp, s.session), (ppid, pgrp, sid));
        assert!(s.num_threads >= 1);
        assert!(s.start_code > 0 && s.start_code < s.end_code);
        assert!(s.arg_start < s.arg_end && s.arg_end <= s.env_start);
        assert!(!s.is_kernel_thread());
        let t = read_task_stat(me, me).unwrap();
        assert_eq!(t.pid, me);
    }
}
