//! The kernel filesystems cr needs mounted: tracefs (tracepoint ids and record layouts for the
//! eBPF trackers) and bpffs (pins that outlive one `cr` run, e.g. the network lock).
//!
//! Most systems mount both at boot; minimal containers and fresh VMs often do not. cr mounts
//! them at their standard places when they are missing and says so at info level, because a
//! mount is a visible change to the machine.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};

/// Where cr expects tracefs.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where cr expects bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";

/// True if `mounts` (the text of /proc/self/mounts) has a filesystem of type `fstype` mounted
/// at `target`. Pure, so it can be tested on literal samples.
pub fn is_mounted_in(mounts: &str, target: &str, fstype: &str) -> bool {
    mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_src, dir, ty) = (f.next(), f.next(), f.next());
        dir.map(unescape_mount_path).as_deref() == Some(target) && ty == Some(fstype)
    })
}

/// /proc/self/mounts escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True if a filesystem of type `fstype` is mounted at `target` in this mount namespace.
pub fn is_mounted(target: &str, fstype: &str) -> Result<bool> {
    let text = std::fs::read_to_string("/proc/self/mounts")
        .context("read /proc/self/mounts to see what is mounted")?;
    Ok(is_mounted_in(&text, target, fstype))
}

/// True if this kernel knows filesystem type `fstype` (/proc/filesystems).
pub fn kernel_has_fs(fstype: &str) -> Result<bool> {
    let text = std::fs::read_to_string("/proc/filesystems").context("read /proc/filesystems")?;
    Ok(text
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype)))
}

/// Mounts tracefs at /sys/kernel/tracing unless it is there. Returns true if it mounted it.
pub fn ensure_tracefs() -> Result<bool> {
    ensure(
        TRACEFS,
        "tracefs",
        "tracepoint ids and record layouts for its eBPF trackers",
    )
}

/// Mounts bpffs at /sys/fs/bpf unless it is there. Returns true if it mounted it.
pub fn ensure_bpffs() -> Result<bool> {
    ensure(BPFFS, "bpf", "pinned eBPF objects that outlive one cr run")
}

fn ensure(target: &str, fstype: &str, why: &str) -> Result<bool> {
    if is_mounted(target, fstype)? {
        return Ok(false);
    }
    // The mount point is normally provided by sysfs; create it only if it is really absent.
    if !Path::new(target).is_dir() {
        std::fs::create_dir_all(target)
            .with_context(|| format!("create mount point {target} for {fstype}"))?;
    }
    mount_fs(fstype, Path::new(target))?;
    let name = if fstype == "bpf" { "bpffs" } else { fstype };
    log::info!("mounted {name} at {target} (cr needs it for {why})");
    Ok(true)
}

/// Mounts a fresh instance of `fstype` (source name = type) at `target`, nosuid/nodev/noexec.
pub fn mount_fs(fstype: &str, target: &Path) -> Result<()> {
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mount {fstype} at {} (needs CAP_SYS_ADMIN)",
            target.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tracefs /sys/kernel/tracing tracefs rw,nosuid,nodev,noexec,relatime 0 0
none /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
tmpfs /mnt/with\\040space tmpfs rw 0 0
debugfs /sys/kernel/debug debugfs rw 0 0
";

    #[test]
    fn finds_mounts_by_point_and_type() {
        assert!(is_mounted_in(SAMPLE, "/sys/kernel/tracing", "tracefs"));
        assert!(is_mounted_in(SAMPLE, "/sys/fs/bpf", "bpf"));
        assert!(!is_mounted_in(SAMPLE, "/sys/fs/bpf", "tmpfs"));
        assert!(!is_mounted_in(
            SAMPLE,
            "/sys/kernel/debug/tracing",
            "tracefs"
        ));
        assert!(!is_mounted_in("", "/sys/fs/bpf", "bpf"));
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert!(is_mounted_in(SAMPLE, "/mnt/with space", "tmpfs"));
        assert_eq!(unescape_mount_path("a\\134b"), "a\\b");
        assert_eq!(unescape_mount_path("trailing\\04"), "trailing\\04");
    }
}
