//! The content of wl_dirty's pages, one function for both sides: the workload writes it and
//! checks it, the incremental-dump tests compute it to write a page from outside the process
//! (process_vm_writev, /proc/PID/mem) exactly as the workload would, so that its own check
//! after restore covers those writes too.

/// Bytes in a page.
pub const PAGE: usize = 4096;
/// 64-bit words in a page.
pub const WORDS: usize = PAGE / 8;

/// Word `k` of page `p` of region `id` at generation `gen` (generation 0: zeros, an untouched
/// page). Every (region, page, generation) gives a different page, so a page restored from the
/// wrong checkpoint or the wrong place shows.
pub fn word(id: u64, p: u64, gen: u64, k: u64) -> u64 {
    if gen == 0 {
        return 0;
    }
    let x = (id << 40) ^ (p << 12) ^ gen.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        .rotate_left((k % 61) as u32)
        ^ k
}

/// The whole page `p` of region `id` at generation `gen`, as bytes.
pub fn content(id: u64, p: u64, gen: u64) -> Vec<u8> {
    (0..WORDS as u64)
        .flat_map(|k| word(id, p, gen, k).to_le_bytes())
        .collect()
}
