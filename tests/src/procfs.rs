//! What /proc says about a process, read the way the tests ask it: whether a dump left it
//! traced, whether it still runs, which session and group it is in, how much CPU it used.

/// The fields of /proc/PID/stat after the comm (which may hold spaces and parentheses, hence
/// the split at the last ')'): index 0 is field 3 (state) as proc(5) numbers them.
fn stat_rest(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Numeric field `n` (4 or more, numbered as in proc(5): 5 is the process group, 6 the
/// session, 14 utime, …) of /proc/PID/stat; None when the process is gone.
pub fn stat_field(pid: i32, n: usize) -> Option<i64> {
    assert!(n >= 4, "field {n} of /proc/PID/stat is not a number");
    stat_rest(pid)?.get(n - 3)?.parse().ok()
}

/// The state letter of `pid` (R, S, D, Z, …); None when the process is gone.
pub fn state(pid: i32) -> Option<char> {
    stat_rest(pid)?.first()?.chars().next()
}

/// Whether `pid` exists and is not a zombie (nor dead): it still runs, or could.
pub fn running(pid: i32) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// TracerPid of `pid` (0 when nobody traces it): a dump must leave its target untraced, failed
/// or not. Panics when the process is gone, as every caller expects it to be there.
pub fn tracer_of(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no TracerPid in /proc/{pid}/status"))
}

/// Live trackers of `pid` (processes running `cr __tracker --pid PID`).
pub fn trackers(pid: i32) -> Vec<i32> {
    let want = format!("__tracker\0--pid\0{pid}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&want))
                .unwrap_or(false)
                && running(*p)
        })
        .collect()
}
