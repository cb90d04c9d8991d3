//! What /proc/self/fdinfo says about the workloads' own fds: the kernel's view of an epoll
//! interest list, an inotify instance's watches, a timerfd or an eventfd, which the workloads
//! record before the checkpoint and compare after it (their own view, read the kernel's way).

/// The text of /proc/self/fdinfo/FD (empty when the fd is not open).
pub fn text(fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default()
}

/// The value of the line `NAME: value` (or `NAME:\tvalue`) of fd's fdinfo, trimmed.
pub fn field(fd: i32, name: &str) -> Option<String> {
    let t = text(fd);
    t.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

/// The `flags:` field (octal in fdinfo): the file's status flags as open(2) numbers them.
pub fn flags(fd: i32) -> Option<i32> {
    i32::from_str_radix(&field(fd, "flags")?, 8).ok()
}

/// `key:value` pairs of one fdinfo line (`tfd: 5 events: 19 data: 2a pos:0 ...` or
/// `inotify wd:1 ino:... mask:...`), values as written.
fn pairs(line: &str) -> Vec<(String, String)> {
    // "tfd:       12 events:       19" has spaces after the colon: join each key with the
    // next word when the key's value is empty.
    let mut out = Vec::new();
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if let Some((k, v)) = w.split_once(':') {
            if v.is_empty() {
                if let Some(next) = words.next_if(|n| !n.contains(':')) {
                    out.push((k.to_string(), next.to_string()));
                    continue;
                }
            }
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

/// One entry of an epoll interest list as fdinfo shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EpollEntry {
    /// The fd number the entry was registered with (which may have been closed since).
    pub tfd: i32,
    /// The registered events (EPOLLERR|EPOLLHUP always added; only the private bits left once
    /// a one-shot entry has fired).
    pub events: u32,
    pub data: u64,
}

/// The interest list of epoll fd `fd`, sorted.
pub fn epoll_entries(fd: i32) -> Vec<EpollEntry> {
    let mut v: Vec<EpollEntry> = text(fd)
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let p = pairs(l);
            Some(EpollEntry {
                tfd: get(&p, "tfd")?.parse().ok()?,
                events: u32::from_str_radix(get(&p, "events")?, 16).ok()?,
                data: u64::from_str_radix(get(&p, "data")?, 16).ok()?,
            })
        })
        .collect();
    v.sort();
    v
}

/// One watch of an inotify instance as fdinfo shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InotifyWatch {
    pub wd: i32,
    /// Inode and device (as the kernel's s_dev, hex) of the watched file.
    pub ino: u64,
    pub sdev: u64,
    /// The mask as fdinfo shows it (events plus IN_ONESHOT / IN_EXCL_UNLINK, kept by the
    /// kernel; IN_ONLYDIR, IN_DONT_FOLLOW and IN_MASK_CREATE/ADD are not).
    pub mask: u32,
    pub ignored_mask: u32,
}

/// The watches of inotify fd `fd`, sorted by wd.
pub fn inotify_watches(fd: i32) -> Vec<InotifyWatch> {
    let mut v: Vec<InotifyWatch> = text(fd)
        .lines()
        .filter_map(|l| l.strip_prefix("inotify "))
        .filter_map(|l| {
            let p = pairs(l);
            let hex = |k: &str| u64::from_str_radix(get(&p, k)?, 16).ok();
            Some(InotifyWatch {
                wd: get(&p, "wd")?.parse().ok()?,
                ino: hex("ino")?,
                sdev: hex("sdev")?,
                mask: hex("mask")? as u32,
                ignored_mask: hex("ignored_mask")? as u32,
            })
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::pairs;

    #[test]
    fn pairs_join_spaced_values() {
        let p =
            pairs("tfd:       12 events:       19 data:               2a  pos:0 ino:40e sdev:10");
        let keys: Vec<_> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            keys,
            [
                "tfd=12",
                "events=19",
                "data=2a",
                "pos=0",
                "ino=40e",
                "sdev=10"
            ]
        );
        let p = pairs("wd:3 ino:98e0ff sdev:fe00000 mask:4000fff ignored_mask:0 fhandle-bytes:8");
        assert_eq!(p[0], ("wd".to_string(), "3".to_string()));
        assert_eq!(p[3], ("mask".to_string(), "4000fff".to_string()));
    }
}
