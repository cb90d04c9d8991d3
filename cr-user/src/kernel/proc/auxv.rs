//! `/proc/PID/auxv`: the ELF auxiliary vector, saved so that restore can hand it back with
//! PR_SET_MM_MAP (AT_SYSINFO_EHDR must then point at the moved vDSO, AT_RANDOM at the old
//! bytes, …).
//!
//! The file is the kernel's saved_auxv array: native-endian `u64` key/value pairs ending with
//! an AT_NULL pair (the kernel may pad with more zeros).

use anyhow::{bail, Result};

use super::{pid_path, read_bytes};

/// Decodes the raw words. The length must be a multiple of 8.
pub fn parse_auxv_raw(bytes: &[u8]) -> Result<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        bail!("auxv length {} is not a multiple of 8", bytes.len());
    }
    let (words, _) = bytes.as_chunks::<8>();
    Ok(words.iter().map(|w| u64::from_ne_bytes(*w)).collect())
}

/// Decodes the (key, value) pairs up to, not including, AT_NULL.
pub fn parse_auxv(bytes: &[u8]) -> Result<Vec<(u64, u64)>> {
    let words = parse_auxv_raw(bytes)?;
    if !words.len().is_multiple_of(2) {
        bail!("auxv has an odd number of words ({})", words.len());
    }
    let (pairs, _) = words.as_chunks::<2>();
    Ok(pairs
        .iter()
        .map(|p| (p[0], p[1]))
        .take_while(|(k, _)| *k != libc::AT_NULL)
        .collect())
}

/// Looks up one key, e.g. `lookup(&v, libc::AT_SYSINFO_EHDR)`.
pub fn lookup(auxv: &[(u64, u64)], key: u64) -> Option<u64> {
    auxv.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Reads and parses `/proc/PID/auxv` into pairs.
pub fn read_auxv(pid: i32) -> Result<Vec<(u64, u64)>> {
    parse_auxv(&read_bytes(&pid_path(pid, "auxv"))?)
}

/// Reads `/proc/PID/auxv` as raw words, terminator and padding included (what PR_SET_MM_AUXV
/// and PR_SET_MM_MAP take back).
pub fn read_auxv_raw(pid: i32) -> Result<Vec<u64>> {
    parse_auxv_raw(&read_bytes(&pid_path(pid, "auxv"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn sample() {
        let b = bytes(&[
            33,
            0x7ffd_6b7f_c000,
            16,
            0x178bfbff,
            6,
            4096,
            25,
            0x7ffd_1234_5678,
            0,
            0,
            0,
            0,
        ]);
        let v = parse_auxv(&b).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(lookup(&v, libc::AT_SYSINFO_EHDR), Some(0x7ffd_6b7f_c000));
        assert_eq!(lookup(&v, libc::AT_PAGESZ), Some(4096));
        assert_eq!(lookup(&v, libc::AT_RANDOM), Some(0x7ffd_1234_5678));
        assert_eq!(lookup(&v, libc::AT_ENTRY), None);
        assert_eq!(parse_auxv_raw(&b).unwrap().len(), 12);
    }

    #[test]
    fn bad_input() {
        assert!(parse_auxv(&[0; 7]).is_err());
        assert!(parse_auxv(&[0; 8]).is_err());
        assert!(parse_auxv(&[]).unwrap().is_empty());
    }

    #[test]
    fn live_self() {
        let v = read_auxv(std::process::id() as i32).unwrap();
        // SAFETY: getauxval has no preconditions.
        let (pagesz, ehdr) = unsafe {
            (
                libc::getauxval(libc::AT_PAGESZ),
                libc::getauxval(libc::AT_SYSINFO_EHDR),
            )
        };
        assert_eq!(lookup(&v, libc::AT_PAGESZ), Some(pagesz));
        assert_eq!(lookup(&v, libc::AT_SYSINFO_EHDR), Some(ehdr));
        let raw = read_auxv_raw(std::process::id() as i32).unwrap();
        assert!(raw.len() >= v.len() * 2 + 2);
    }
}
