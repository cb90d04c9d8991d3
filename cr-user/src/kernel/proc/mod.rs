//! Readers of `/proc`.
//!
//! Every file format has a pure parser (text or bytes in, values out) that is unit-tested with
//! literal samples, and a thin `read_*` function that reads the live file and calls it. Parsing
//! is kept apart from reading so that the formats can be tested without a live process and so
//! that a dump can re-parse what it saved. Read errors name the file ("read /proc/123/smaps: …"),
//! parse errors name the line.

pub mod auxv;
pub mod fdinfo;
pub mod locks;
pub mod maps;
pub mod mountinfo;
pub mod stat;
pub mod status;
pub mod task;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `/proc/PID/NAME`.
pub fn pid_path(pid: i32, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

/// Reads a whole `/proc` file as text. Non-UTF-8 bytes (possible in file names) are replaced,
/// which only matters for paths, and those are re-opened through `map_files`/`fd` links anyway.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Reads a whole `/proc` file as bytes, with the file named in the error.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// Parses a decimal field, naming it in the error.
pub(crate) fn parse_dec<T: std::str::FromStr>(s: &str, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.trim()
        .parse::<T>()
        .map_err(|e| anyhow::anyhow!("bad {what} {s:?}: {e}"))
}

/// Parses a hexadecimal field (an optional `0x` prefix is allowed), naming it in the error.
pub(crate) fn parse_hex(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(t, 16).map_err(|e| anyhow::anyhow!("bad {what} {s:?}: {e}"))
}

/// Parses an octal field (as `flags:` in fdinfo), naming it in the error.
pub(crate) fn parse_oct(s: &str, what: &str) -> Result<u64> {
    u64::from_str_radix(s.trim(), 8).map_err(|e| anyhow::anyhow!("bad {what} {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_helpers() {
        assert_eq!(parse_dec::<i32>(" -12 ", "x").unwrap(), -12);
        assert_eq!(parse_hex("0x1f", "x").unwrap(), 31);
        assert_eq!(parse_hex("ffffffffffffffff", "x").unwrap(), u64::MAX);
        assert_eq!(parse_oct("0100002", "x").unwrap(), 0o100002);
        assert!(parse_dec::<u32>("z", "x").is_err());
        assert!(parse_oct("9", "x").is_err());
    }

    #[test]
    fn read_error_names_the_file() {
        let err = read_text(&pid_path(i32::MAX, "smaps")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("read /proc/{}/smaps: ", i32::MAX)),
            "{msg}"
        );
    }
}
