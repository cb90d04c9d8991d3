//! A directory of numbered checkpoints (`cr periodic`): `DIR/000001`, `DIR/000002`, … each a
//! complete image, most of them children of the one before; and retention: dropping the oldest
//! folds the pages its successor still takes from it into that successor.
//!
//! A fold never leaves a checkpoint unrestorable, whenever it is interrupted:
//! 1. the successor `S` is written again, self-contained, as `DIR/.fold-S`: its page files from
//!    the pages the chain resolves for it (copied), every other file hard-linked, an inventory
//!    without a parent that keeps `S`'s checkpoint id (children link to their parent by id, so
//!    they still find it) — each file temp + fsync + rename, the inventory last;
//! 2. `.fold-S` and `S` are exchanged atomically (renameat2 RENAME_EXCHANGE) and DIR fsynced;
//! 3. the oldest is renamed to `.del-NAME` (gone from the listing at once) and removed, then
//!    `.fold-S` (the old `S`).
//!
//! Leftovers of an interrupted fold (`.fold-*`, `.del-*`, incomplete numbered directories) are
//! removed by [`recover`]; until then nothing lists them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::chain::ImageChain;
use super::dir::{ImageDir, ImageWriter};
use super::file::Kind;
use super::names::{pagemap_file, pagemap_pid, pages_file, DUMP_F_FOLDED, INVENTORY};
use super::pages::PageWriter;

/// Largest piece handed to the page writer at once while a fold copies.
const PIECE: u64 = 8 << 20;

/// The directory name of checkpoint `seq`.
pub fn seq_name(seq: u64) -> String {
    format!("{seq:06}")
}

fn parse_seq(name: &str) -> Option<u64> {
    if name.len() >= 6 && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok()
    } else {
        None
    }
}

/// The complete checkpoints of `dir`, oldest first.
pub fn sequence(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = parse_seq(&name) {
            if e.path().join(INVENTORY).exists() {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Removes what an interrupted checkpoint or fold left in `dir`: numbered directories without
/// an inventory, `.fold-*` and `.del-*` directories.
pub fn recover(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(".fold-")
            || name.starts_with(".del-")
            || (parse_seq(&name).is_some() && !e.path().join(INVENTORY).exists());
        if stale && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            log::info!(
                "removing {} (left by an interrupted checkpoint or fold)",
                e.path().display()
            );
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Keeps the newest `keep` checkpoints of `dir`: each older one is folded into its successor
/// (when the successor builds on it) and removed. Returns the checkpoints that were rewritten
/// by a fold (their inventory CRC changed).
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<String>> {
    let keep = keep.max(1);
    let mut rewritten = Vec::new();
    loop {
        let seqs = sequence(dir)?;
        if seqs.len() <= keep {
            return Ok(rewritten);
        }
        let old = seq_name(seqs[0]);
        let next = seq_name(seqs[1]);
        if builds_on(&dir.join(&next), &dir.join(&old))? {
            flatten(dir, &next)?;
            rewritten.push(next);
        }
        remove(dir, &old)?;
    }
}

/// Whether image `child` names `parent` as its parent.
fn builds_on(child: &Path, parent: &Path) -> Result<bool> {
    let img = ImageDir::open(child)?;
    let rel = &img.inventory().parent_path;
    if rel.is_empty() {
        return Ok(false);
    }
    let a = std::fs::canonicalize(child.join(rel));
    let b = std::fs::canonicalize(parent)
        .with_context(|| format!("cannot resolve {}", parent.display()))?;
    Ok(a.map(|a| a == b).unwrap_or(false))
}

/// Test hook: `CR_TEST_FOLD_PAUSE=STEP` makes a fold print `FOLD STEP` on stderr and stop
/// itself (SIGSTOP) at that step, so a test can kill cr there.
fn step(what: &str) {
    if crate::tunables::get().fold_pause.as_deref() == Some(what) {
        eprintln!("FOLD {what}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}

/// Rewrites checkpoint `name` of `dir` so that it holds every page itself (steps 1 and 2).
pub fn flatten(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".fold-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
    }
    let chain = ImageChain::open(&path)?;
    let img = chain.newest();
    let w = ImageWriter::create(&tmp)?;
    let written = write_flat(&chain, &w);
    let r = written.and_then(|_| {
        step("written");
        let mut inv = img.inventory().clone();
        inv.parent_path.clear();
        inv.parent_inventory_crc = 0;
        inv.parent_checkpoint_id = 0;
        inv.flags |= DUMP_F_FOLDED;
        inv.files.clear();
        w.commit(inv)?;
        step("committed");
        exchange(&tmp, &path)?;
        super::writer::fsync_dir(dir)
    });
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("folding into {}", path.display()));
    }
    step("exchanged");
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Writes into `w` the newest image of `chain` with every page resolved.
fn write_flat(chain: &ImageChain, w: &ImageWriter) -> Result<()> {
    let img = chain.newest();
    let pids = img.pagemap_pids();
    for f in img.files() {
        let is_pages = pids.iter().any(|&p| f.name == pages_file(p));
        if pagemap_pid(&f.name).is_none() && !is_pages {
            w.link_from(img.path(), f)?;
        }
    }
    for pid in pids {
        let segs = chain.pages_for(pid)?;
        let total: u64 = segs.iter().map(|s| s.nr_pages).sum();
        let mut pw = PageWriter::create(w, pid, total)?;
        for s in &segs {
            let bytes = s.bytes();
            if bytes.len() as u64 != s.len() {
                anyhow::bail!(
                    "pid {pid}: pages at {:#x} are cut short in {}",
                    s.vaddr,
                    s.file.path().display()
                );
            }
            let mut off = 0u64;
            while off < s.len() {
                let n = (s.len() - off).min(PIECE);
                pw.write_run(s.vaddr + off, &bytes[off as usize..(off + n) as usize])?;
                off += n;
            }
        }
        let pm = pw.finish()?;
        w.write_msg(&pagemap_file(pid), Kind::PageMap, &pm)?;
    }
    Ok(())
}

/// Swaps two directory entries atomically.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE)
        .with_context(|| format!("cannot exchange {} and {}", a.display(), b.display()))
}

/// Removes checkpoint `name` (step 3): renamed out of the listing first, then deleted.
fn remove(dir: &Path, name: &str) -> Result<()> {
    let from = dir.join(name);
    let to: PathBuf = dir.join(format!(".del-{name}"));
    std::fs::rename(&from, &to)
        .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    super::writer::fsync_dir(dir)?;
    step("renamed");
    std::fs::remove_dir_all(&to).with_context(|| format!("cannot remove {}", to.display()))
}
