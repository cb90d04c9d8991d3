//! Image chains (`--prev-images-dir`): an image whose page runs are marked `in_parent` gets
//! those bytes from its parent, which may in turn defer to its own parent.
//!
//! [`ImageChain::open`] loads the whole chain up front (following `Inventory.parent_path`,
//! relative to the child's directory), so a broken link, a replaced parent or a cycle is
//! reported before restore touches anything. [`ImageChain::pages_for`] resolves, for one
//! process, every page of the newest image to the page file and offset that holds it; a range
//! the chain does not have is an error, never zeros.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::dir::{pagemap_file, ImageDir};
use super::pages::{run_end, PageFile, PAGE_SIZE};
use super::pb;

/// Longest chain accepted (resolution recurses once per level).
const MAX_CHAIN: usize = 1024;

/// A contiguous stretch of a process's memory and where its bytes are.
#[derive(Clone)]
pub struct PageSegment {
    /// First address.
    pub vaddr: u64,
    pub nr_pages: u64,
    /// Which image of the chain holds the bytes (0 = the newest).
    pub image: usize,
    /// The page file holding them (mapped), and the byte offset of `vaddr`'s page in it.
    pub file: Arc<PageFile>,
    pub offset: u64,
}

impl PageSegment {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE as u64
    }

    /// Never true for a segment from [`ImageChain::pages_for`].
    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }

    /// The bytes, straight from the read-only mapping of the page file.
    pub fn bytes(&self) -> &[u8] {
        // The range was checked against the file when the segment was made.
        self.file.bytes(self.offset, self.len()).unwrap_or(&[])
    }
}

impl std::fmt::Debug for PageSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:#x}+{}p@{}:{}+{:#x}",
            self.vaddr,
            self.nr_pages,
            self.image,
            self.file.path().display(),
            self.offset
        )
    }
}

/// An image and all its parents, newest first.
pub struct ImageChain {
    images: Vec<ImageDir>,
}

/// One level's page map for one pid: runs sorted and checked, and its page file.
struct LevelMap {
    runs: Vec<pb::PageRun>,
    file: Option<Arc<PageFile>>,
}

impl ImageChain {
    /// Opens the image at `path` and every parent it names. A missing or incomplete parent,
    /// a parent whose inventory changed since the child was dumped, or a cycle is an error
    /// ("parent image P of D: ...").
    pub fn open(path: &Path) -> Result<ImageChain> {
        let first = ImageDir::open(path)?;
        let canon = |p: &Path| {
            std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
        };
        let mut seen: Vec<PathBuf> = vec![canon(path)?];
        let mut images = vec![first];
        while let Some(child) = images.last() {
            let rel = child.inventory().parent_path.clone();
            if rel.is_empty() {
                break;
            }
            let ppath = child.path().join(&rel);
            let what = || format!("parent image {rel} of {}", child.path().display());
            let c = canon(&ppath).with_context(what)?;
            if let Some(i) = seen.iter().position(|s| *s == c) {
                bail!(
                    "image chain has a cycle: {} is image {} of the chain again",
                    what(),
                    i
                );
            }
            if images.len() >= MAX_CHAIN {
                bail!(
                    "image chain of {} is longer than {MAX_CHAIN} images",
                    path.display()
                );
            }
            let parent = ImageDir::open(&ppath).with_context(what)?;
            let want = child.inventory().parent_inventory_crc;
            let want_id = child.inventory().parent_checkpoint_id;
            if want_id != 0 {
                if parent.inventory().checkpoint_id != want_id {
                    bail!(
                        "{}: it is checkpoint {:#018x}, the child was dumped on top of {want_id:#018x}: the parent was replaced or re-dumped",
                        what(),
                        parent.inventory().checkpoint_id
                    );
                }
            } else if parent.inventory_crc() != want {
                bail!(
                    "{}: its inventory.img has CRC {:#010x}, the child recorded {want:#010x}: the parent was replaced or re-dumped",
                    what(),
                    parent.inventory_crc()
                );
            }
            seen.push(c);
            images.push(parent);
        }
        Ok(ImageChain { images })
    }

    /// The image that was opened (the newest of the chain).
    pub fn newest(&self) -> &ImageDir {
        &self.images[0]
    }

    /// Every image, newest first.
    pub fn images(&self) -> &[ImageDir] {
        &self.images
    }

    /// Checks everything restore will read: every file of every image of the chain (size, CRC,
    /// frame; every page run's CRC), and that every page of the newest image resolves.
    pub fn validate(&self) -> Result<()> {
        for img in &self.images {
            img.validate()?;
        }
        self.validate_resolution()
    }

    /// Only the page side of [`ImageChain::validate`]: every page run's CRC32C in every image
    /// of the chain (errors name file and vaddr), and that every page of the newest image
    /// resolves.
    pub fn validate_pages(&self) -> Result<()> {
        for img in &self.images {
            img.validate_pages()?;
        }
        self.validate_resolution()
    }

    fn validate_resolution(&self) -> Result<()> {
        for pid in self.newest().pagemap_pids() {
            self.pages_for(pid)?;
        }
        Ok(())
    }

    /// Where the memory of process `pid` comes from: one segment per stretch of pages held in
    /// one page file, sorted by address, `in_parent` runs resolved through the chain (a child
    /// run may take pieces of several parent runs). Addresses not covered hold no saved data.
    pub fn pages_for(&self, pid: i32) -> Result<Vec<PageSegment>> {
        let mut levels: Vec<Option<Rc<LevelMap>>> = vec![None; self.images.len()];
        let top = self.level_map(0, pid, &mut levels)?;
        let mut out = Vec::new();
        for r in &top.runs {
            if r.in_parent {
                self.resolve(1, pid, r.vaddr, run_end(r), &mut levels, &mut out)?;
            } else {
                self.push_segment(&mut out, 0, &top, r, r.vaddr, run_end(r))?;
            }
        }
        Ok(out)
    }

    fn level_map(
        &self,
        level: usize,
        pid: i32,
        levels: &mut [Option<Rc<LevelMap>>],
    ) -> Result<Rc<LevelMap>> {
        if let Some(Some(m)) = levels.get(level) {
            return Ok(m.clone());
        }
        let img = &self.images[level];
        let pm = img.page_map(pid)?;
        let mut runs = pm.runs;
        runs.sort_by_key(|r| r.vaddr);
        let name = img.path().join(pagemap_file(pid));
        let mut prev_end = 0u64;
        for r in &runs {
            let len = u64::from(r.nr_pages) * PAGE_SIZE as u64;
            if !r.vaddr.is_multiple_of(PAGE_SIZE as u64)
                || r.nr_pages == 0
                || r.vaddr.checked_add(len).is_none()
            {
                bail!(
                    "{}: bad page run at vaddr {:#x} ({} pages)",
                    name.display(),
                    r.vaddr,
                    r.nr_pages
                );
            }
            if r.vaddr < prev_end {
                bail!(
                    "{}: page runs overlap at vaddr {:#x} (image corrupted)",
                    name.display(),
                    r.vaddr
                );
            }
            prev_end = run_end(r);
        }
        let file = if runs.iter().any(|r| !r.in_parent) {
            Some(img.page_file(&pm.pages_file)?)
        } else {
            None
        };
        let m = Rc::new(LevelMap { runs, file });
        levels[level] = Some(m.clone());
        Ok(m)
    }

    /// Resolves [start, end) of `pid` at chain level `level` (the parent of level - 1).
    fn resolve(
        &self,
        level: usize,
        pid: i32,
        start: u64,
        end: u64,
        levels: &mut [Option<Rc<LevelMap>>],
        out: &mut Vec<PageSegment>,
    ) -> Result<()> {
        let child = self.images[level - 1].path();
        if level >= self.images.len() {
            bail!(
                "pid {pid}: pages {start:#x}..{end:#x} are marked in_parent in {}, which has no parent image",
                child.display()
            );
        }
        let parent = self.images[level].path();
        let m = self.level_map(level, pid, levels).with_context(|| {
            format!(
                "pid {pid}: pages {start:#x}..{end:#x} are in_parent in {}",
                child.display()
            )
        })?;
        let mut i = m.runs.partition_point(|r| run_end(r) <= start);
        let mut cur = start;
        while cur < end {
            let r = match m.runs.get(i) {
                Some(r) if r.vaddr <= cur => r,
                next => {
                    let gap_end = next.map_or(end, |n| n.vaddr.min(end));
                    bail!(
                        "pid {pid}: pages {cur:#x}..{gap_end:#x} are marked in_parent in {} but parent image {} does not have them",
                        child.display(),
                        parent.display()
                    );
                }
            };
            let e = end.min(run_end(r));
            if r.in_parent {
                self.resolve(level + 1, pid, cur, e, levels, out)?;
            } else {
                self.push_segment(out, level, &m, r, cur, e)?;
            }
            cur = e;
            i += 1;
        }
        Ok(())
    }

    /// Adds [from, to) of run `r` (a run with data at `level`), merging with the previous
    /// segment when it continues it in the same file.
    fn push_segment(
        &self,
        out: &mut Vec<PageSegment>,
        level: usize,
        m: &LevelMap,
        r: &pb::PageRun,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let Some(file) = &m.file else {
            bail!("internal: no page file for a data run at {:#x}", r.vaddr);
        };
        let offset = r.offset + (from - r.vaddr);
        let nr_pages = (to - from) / PAGE_SIZE as u64;
        file.bytes(offset, to - from)
            .with_context(|| format!("page run at vaddr {:#x}", r.vaddr))?;
        if let Some(last) = out.last_mut() {
            if last.image == level
                && Arc::ptr_eq(&last.file, file)
                && last.vaddr + last.len() == from
                && last.offset + last.len() == offset
            {
                last.nr_pages += nr_pages;
                return Ok(());
            }
        }
        out.push(PageSegment {
            vaddr: from,
            nr_pages,
            image: level,
            file: file.clone(),
            offset,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::dir::ImageWriter;
    use crate::image::file::Kind;
    use crate::image::pages::PageWriter;
    use crate::image::testutil::TempDir;

    const P: u64 = PAGE_SIZE as u64;
    const PID: i32 = 77;

    /// A page whose every byte says which image wrote it and which page it is.
    fn page(tag: u8, vaddr: u64) -> Vec<u8> {
        let mut v = vec![tag; PAGE_SIZE];
        v[..8].copy_from_slice(&vaddr.to_le_bytes());
        v
    }

    enum R {
        Data(u64, u64),
        Parent(u64, u64),
    }

    /// Writes an image at `dir` with runs in page units; `parent` is (relative path, its dir).
    fn write_image(dir: &Path, tag: u8, runs: &[R], parent: Option<(&str, &Path)>) {
        let w = ImageWriter::create(dir).unwrap();
        let mut pw = PageWriter::create(&w, PID, 0).unwrap();
        for r in runs {
            match *r {
                R::Data(first, n) => {
                    let bytes: Vec<u8> =
                        (first..first + n).flat_map(|p| page(tag, p * P)).collect();
                    pw.write_run(first * P, &bytes).unwrap();
                }
                R::Parent(first, n) => pw.add_parent_run(first * P, n).unwrap(),
            }
        }
        let pm = pw.finish().unwrap();
        w.write_msg(&pagemap_file(PID), Kind::PageMap, &pm).unwrap();
        let mut inv = pb::Inventory {
            root_pid: PID,
            ..Default::default()
        };
        if let Some((rel, pdir)) = parent {
            inv.parent_path = rel.to_string();
            inv.parent_inventory_crc = ImageDir::open(pdir).unwrap().inventory_crc();
        }
        w.commit(inv).unwrap();
    }

    /// Which image's tag each page 0..n of the process resolves to (0 = no data).
    fn resolved_tags(chain: &ImageChain, n: u64) -> Vec<u8> {
        let mut tags = vec![0u8; n as usize];
        for s in chain.pages_for(PID).unwrap() {
            let b = s.bytes();
            assert_eq!(b.len() as u64, s.len());
            for i in 0..s.nr_pages {
                let pg = &b[(i * P) as usize..((i + 1) * P) as usize];
                let vaddr = s.vaddr + i * P;
                assert_eq!(
                    u64::from_le_bytes(pg[..8].try_into().unwrap()),
                    vaddr,
                    "{s:?}"
                );
                tags[(vaddr / P) as usize] = pg[100];
            }
        }
        tags
    }

    #[test]
    fn three_images_with_split_runs() {
        let t = TempDir::new("chain3");
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        // a: pages 0..10 and 20..24.
        write_image(&a, 1, &[R::Data(0, 10), R::Data(20, 4)], None);
        // b: 0..3 from a, 3..5 new, 5..12 from a... but a lacks 10..12: keep b valid: 5..10.
        write_image(
            &b,
            2,
            &[
                R::Parent(0, 3),
                R::Data(3, 2),
                R::Parent(5, 5),
                R::Data(12, 2),
                R::Parent(20, 4),
            ],
            Some(("../a", &a)),
        );
        // c: one parent run 1..14 spanning b's parent run, b's data, b's parent run (split in a),
        // a gap-free stretch... 10..12 is missing in b, so stop at 10; then 12..14 from b.
        write_image(
            &c,
            3,
            &[
                R::Data(0, 1),
                R::Parent(1, 9),
                R::Data(10, 2),
                R::Parent(12, 2),
                R::Parent(21, 2),
            ],
            Some(("../b", &b)),
        );
        let chain = ImageChain::open(&c).unwrap();
        assert_eq!(chain.images().len(), 3);
        chain.validate().unwrap();
        let tags = resolved_tags(&chain, 24);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![3, 1, 1, 2, 2, 1, 1, 1, 1, 1, 3, 3, 2, 2, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0];
        assert_eq!(tags, want);
        // Segments merge where they continue each other in one file: a's pages 5..10 are one.
        let segs = chain.pages_for(PID).unwrap();
        let shape: Vec<_> = segs
            .iter()
            .map(|s| (s.vaddr / P, s.nr_pages, s.image))
            .collect();
        assert_eq!(
            shape,
            [
                (0, 1, 0),
                (1, 2, 2),
                (3, 2, 1),
                (5, 5, 2),
                (10, 2, 0),
                (12, 2, 1),
                (21, 2, 2)
            ]
        );
        // A relative path is relative to the child's directory, not to the cwd.
        assert!(chain.images()[1].path().ends_with("../b"));
    }

    #[test]
    fn range_missing_in_parent_is_an_error() {
        let t = TempDir::new("chain-miss");
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        write_image(&a, 1, &[R::Data(0, 4), R::Data(6, 2)], None);
        write_image(&b, 2, &[R::Parent(2, 5)], Some(("../a", &a)));
        let chain = ImageChain::open(&b).unwrap();
        let e = format!("{:#}", chain.pages_for(PID).unwrap_err());
        assert!(
            e.contains("pages 0x4000..0x6000 are marked in_parent")
                && e.contains("does not have them"),
            "{e}"
        );
        assert!(chain.validate().is_err());

        // in_parent with no parent at all.
        let c = t.path().join("c");
        write_image(&c, 3, &[R::Parent(0, 1)], None);
        let e = format!(
            "{:#}",
            ImageChain::open(&c).unwrap().pages_for(PID).unwrap_err()
        );
        assert!(e.contains("which has no parent image"), "{e}");
    }

    #[test]
    fn broken_links() {
        let t = TempDir::new("chain-broken");
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        write_image(&a, 1, &[R::Data(0, 1)], None);
        write_image(&b, 2, &[R::Parent(0, 1)], Some(("../a", &a)));
        ImageChain::open(&b).unwrap().validate().unwrap();

        // Parent replaced by another dump: detected by the inventory CRC.
        std::fs::remove_dir_all(&a).unwrap();
        write_image(&a, 9, &[R::Data(0, 1)], None);
        let e = format!("{:#}", ImageChain::open(&b).err().unwrap());
        assert!(
            e.contains("parent image ../a of") && e.contains("the parent was replaced"),
            "{e}"
        );

        // Parent incomplete (no inventory).
        std::fs::remove_file(a.join("inventory.img")).unwrap();
        let e = format!("{:#}", ImageChain::open(&b).err().unwrap());
        assert!(
            e.contains("parent image ../a of") && e.contains("is not a complete cr image"),
            "{e}"
        );

        // Parent gone.
        std::fs::remove_dir_all(&a).unwrap();
        let e = format!("{:#}", ImageChain::open(&b).err().unwrap());
        assert!(e.contains("parent image ../a of"), "{e}");
    }

    #[test]
    fn cycles_are_detected() {
        let t = TempDir::new("chain-cycle");
        let a = t.path().join("a");
        // An image naming itself as parent (its own CRC cannot be known before writing, so the
        // cycle check must come first).
        write_image(&a, 1, &[R::Data(0, 1)], None);
        let w = ImageWriter::create_overwriting(&a).unwrap();
        w.commit(pb::Inventory {
            parent_path: ".".into(),
            ..Default::default()
        })
        .unwrap();
        let e = format!("{:#}", ImageChain::open(&a).err().unwrap());
        assert!(e.contains("cycle"), "{e}");
    }

    #[test]
    fn flipped_byte_in_a_parent_page_fails_validation() {
        let t = TempDir::new("chain-crc");
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        write_image(&a, 1, &[R::Data(0, 4)], None);
        write_image(&b, 2, &[R::Parent(0, 2), R::Data(2, 1)], Some(("../a", &a)));
        let p = a.join("pages-77.img");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[PAGE_SIZE + 2 * PAGE_SIZE + 5] ^= 0x80;
        std::fs::write(&p, &bytes).unwrap();
        let chain = ImageChain::open(&b).unwrap();
        let e = format!("{:#}", chain.validate_pages().unwrap_err());
        assert!(
            e.contains("a/pages-77.img: page run at vaddr 0x0") && e.contains("checksum mismatch"),
            "{e}"
        );
        assert!(chain.validate().is_err());
    }
}
