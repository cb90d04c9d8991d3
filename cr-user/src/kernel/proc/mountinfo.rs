//! `/proc/self/mountinfo`: which mount points show a filesystem (by its device), to open a
//! file handle of it (open_by_handle_at needs an fd on the filesystem).

use anyhow::{Context, Result};

use super::read_text;

/// One mount: the device (major, minor) of its filesystem and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mount_point: String,
}

/// Undoes the octal escapes (`\040` for a space) mountinfo writes in paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Result<Vec<Mount>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (dev, mp) = match (f.get(2), f.get(4)) {
                (Some(d), Some(m)) => (*d, *m),
                _ => anyhow::bail!("mountinfo line with too few fields: {l:?}"),
            };
            let (ma, mi) = dev
                .split_once(':')
                .with_context(|| format!("mountinfo device {dev:?}"))?;
            Ok(Mount {
                major: ma
                    .parse()
                    .with_context(|| format!("mountinfo device {dev:?}"))?,
                minor: mi
                    .parse()
                    .with_context(|| format!("mountinfo device {dev:?}"))?,
                mount_point: unescape(mp),
            })
        })
        .collect()
}

/// The mounts cr sees.
pub fn read_own_mounts() -> Result<Vec<Mount>> {
    parse_mountinfo(&read_text(std::path::Path::new("/proc/self/mountinfo"))?)
        .context("parse /proc/self/mountinfo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts() {
        let t = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/root rw\n\
35 22 0:33 / /tmp/a\\040b rw - tmpfs tmpfs rw\n";
        let m = parse_mountinfo(t).unwrap();
        assert_eq!(m[1].mount_point, "/tmp/a b");
        assert_eq!((m[1].major, m[1].minor), (0, 33));
        assert!(parse_mountinfo("1 2\n").is_err());
    }
}
