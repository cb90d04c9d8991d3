//! The images directory: opening and validating a committed image (the file names are
//! [`super::names`], writing is [`super::writer`]).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;

use super::file::{self, Kind};
pub use super::names::*;
use super::pages::PageFile;
use super::pb;
use super::writer::check_name;
pub use super::writer::{create_images_dir, prepare_images_dir, ImageWriter};

/// A complete image, opened for reading. Cheap to keep: descriptor files are read on demand;
/// page files are mapped once and shared (see [`ImageDir::page_file`]).
pub struct ImageDir {
    path: PathBuf,
    inventory: pb::Inventory,
    inventory_crc: u32,
    listed: BTreeMap<String, pb::ImageFile>,
    page_files: Mutex<HashMap<String, Arc<PageFile>>>,
}

impl ImageDir {
    /// Alias of [`ImageWriter::create`], so both ends start from `ImageDir`.
    pub fn create(path: &Path) -> Result<ImageWriter> {
        ImageWriter::create(path)
    }

    /// Opens a complete image: `inventory.img` must exist and be intact. The other files are
    /// checked by [`ImageDir::validate`] or when read.
    pub fn open(path: &Path) -> Result<ImageDir> {
        let inv_path = path.join(INVENTORY);
        let bytes = match std::fs::read(&inv_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !path.is_dir() {
                    bail!(
                        "{} is not an images directory (no such directory)",
                        path.display()
                    );
                }
                bail!(
                    "{} is not a complete cr image (no {INVENTORY}): the dump did not finish or this is not an images dir",
                    path.display()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", inv_path.display())),
        };
        let (_, payload) = file::unframe(&bytes, Some(Kind::Inventory))
            .map_err(|why| anyhow!("{}: {why}", inv_path.display()))?;
        let inventory: pb::Inventory = file::decode_msg(payload, Kind::Inventory, &inv_path)?;
        if inventory.format_version != file::FORMAT_VERSION {
            bail!(
                "{}: image format version {}, this cr reads version {}",
                inv_path.display(),
                inventory.format_version,
                file::FORMAT_VERSION
            );
        }
        let mut listed = BTreeMap::new();
        for f in &inventory.files {
            check_name(&f.name)
                .with_context(|| format!("{}: lists a bad file name", inv_path.display()))?;
            if listed.insert(f.name.clone(), f.clone()).is_some() {
                bail!("{}: lists {} twice", inv_path.display(), f.name);
            }
        }
        Ok(ImageDir {
            path: path.to_path_buf(),
            inventory_crc: crc32c::crc32c(&bytes),
            inventory,
            listed,
            page_files: Mutex::new(HashMap::new()),
        })
    }

    /// The images directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The inventory (root pid, parent path, flags, stats, file list).
    pub fn inventory(&self) -> &pb::Inventory {
        &self.inventory
    }

    /// CRC32C of the whole `inventory.img`: what a child image stores as `parent_inventory_crc`.
    pub fn inventory_crc(&self) -> u32 {
        self.inventory_crc
    }

    /// Whether `name` is part of this image.
    pub fn has(&self, name: &str) -> bool {
        self.listed.contains_key(name)
    }

    /// Every file of the image but the inventory, as listed there (sorted by name).
    pub fn files(&self) -> impl Iterator<Item = &pb::ImageFile> {
        self.listed.values()
    }

    /// PIDs that have a `pagemap-PID.img` in this image.
    pub fn pagemap_pids(&self) -> Vec<i32> {
        self.listed.keys().filter_map(|n| pagemap_pid(n)).collect()
    }

    fn listing(&self, name: &str) -> Result<&pb::ImageFile> {
        self.listed.get(name).ok_or_else(|| {
            anyhow!(
                "{}: not part of the image (not listed in {INVENTORY})",
                self.path.join(name).display()
            )
        })
    }

    /// Reads a listed file whole and checks it against the inventory (size, CRC).
    fn read_listed(&self, name: &str) -> Result<Vec<u8>> {
        let l = self.listing(name)?;
        let p = self.path.join(name);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "{}: listed in {INVENTORY} but missing (the image is incomplete)",
                    p.display()
                )
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read image file {}", p.display()))
            }
        };
        check_size(&p, bytes.len() as u64, l.size)?;
        if crc32c::crc32c(&bytes) != l.crc32c {
            // The frame's own CRCs usually say more precisely what is wrong.
            if let Err(why) = file::unframe(&bytes, None) {
                bail!("{}: {why}", p.display());
            }
            bail!(
                "{}: checksum differs from {INVENTORY} (file corrupted or replaced)",
                p.display()
            );
        }
        Ok(bytes)
    }

    /// Reads and decodes a descriptor file of this image, checking its frame and that it is the
    /// file the inventory lists (size and CRC).
    pub fn read_msg<M: Message + Default>(&self, name: &str, kind: Kind) -> Result<M> {
        let bytes = self.read_listed(name)?;
        let p = self.path.join(name);
        let (_, payload) =
            file::unframe(&bytes, Some(kind)).map_err(|why| anyhow!("{}: {why}", p.display()))?;
        file::decode_msg(payload, kind, &p)
    }

    /// Reads a listed descriptor file of any kind, checked (used by `cr show`).
    pub(crate) fn read_frame(&self, name: &str) -> Result<(file::Header, Vec<u8>)> {
        let mut bytes = self.read_listed(name)?;
        let p = self.path.join(name);
        let h = file::unframe(&bytes, None)
            .map_err(|why| anyhow!("{}: {why}", p.display()))?
            .0;
        bytes.drain(..file::HEADER_LEN);
        Ok((h, bytes))
    }

    /// Reads a [`Kind::Blob`] file written by [`ImageWriter::write_blob`].
    pub fn read_blob(&self, name: &str) -> Result<Vec<u8>> {
        let mut bytes = self.read_listed(name)?;
        let p = self.path.join(name);
        file::unframe(&bytes, Some(Kind::Blob)).map_err(|why| anyhow!("{}: {why}", p.display()))?;
        bytes.drain(..file::HEADER_LEN);
        Ok(bytes)
    }

    /// The page map of process `pid` (`pagemap-PID.img`).
    pub fn page_map(&self, pid: i32) -> Result<pb::PageMap> {
        self.read_msg(&pagemap_file(pid), Kind::PageMap)
    }

    /// A page file of this image, mapped read-only (once; later calls share the mapping). Its
    /// header and size are checked; its content is checked by [`ImageDir::validate`].
    pub fn page_file(&self, name: &str) -> Result<Arc<PageFile>> {
        let mut cache = self
            .page_files
            .lock()
            .map_err(|_| anyhow!("page file cache poisoned"))?;
        if let Some(pf) = cache.get(name) {
            return Ok(pf.clone());
        }
        let l = self.listing(name)?;
        let pf = Arc::new(PageFile::open(&self.path.join(name))?);
        check_size(pf.path(), pf.size(), l.size)?;
        cache.insert(name.to_string(), pf.clone());
        Ok(pf)
    }

    /// Checks every listed file: present, listed size, listed CRC32C, intact frame; for page
    /// files also every page run's CRC (in the same pass over the data, so a 1 GiB page file is
    /// read once). Errors name the file (and, for pages, the run's vaddr).
    pub fn validate(&self) -> Result<()> {
        self.check(true)
    }

    /// Only the page files of [`ImageDir::validate`] (and the page maps naming them).
    pub fn validate_pages(&self) -> Result<()> {
        self.check(false)
    }

    fn check(&self, descriptors: bool) -> Result<()> {
        // Page files are checked run by run with their page maps.
        let mut page_runs: BTreeMap<String, Vec<pb::PageRun>> = BTreeMap::new();
        for pid in self.pagemap_pids() {
            let pm = self.page_map(pid)?;
            if pm.runs.iter().any(|r| !r.in_parent) || self.has(&pm.pages_file) {
                self.listing(&pm.pages_file)
                    .with_context(|| format!("{} names a page file", pagemap_file(pid)))?;
                page_runs
                    .entry(pm.pages_file.clone())
                    .or_default()
                    .extend(pm.runs.into_iter().filter(|r| !r.in_parent));
            }
        }
        for (name, l) in &self.listed {
            let is_pages = page_runs.contains_key(name) || name.starts_with("pages-");
            if !is_pages && !descriptors {
                continue;
            }
            let p = self.path.join(name);
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!(
                        "{}: listed in {INVENTORY} but missing (the image is incomplete)",
                        p.display()
                    )
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot stat image file {}", p.display()))
                }
            };
            check_size(&p, meta.size(), l.size)?;
            if is_pages {
                let pf = self.page_file(name)?;
                let runs = page_runs.get(name).map(Vec::as_slice).unwrap_or(&[]);
                let crc = pf.verify_runs(runs)?;
                if crc != l.crc32c {
                    bail!(
                        "{}: checksum differs from {INVENTORY} (file corrupted or replaced)",
                        p.display()
                    );
                }
            } else {
                let bytes = self.read_listed(name)?;
                file::unframe(&bytes, None).map_err(|why| anyhow!("{}: {why}", p.display()))?;
            }
        }
        Ok(())
    }
}

fn check_size(p: &Path, have: u64, listed: u64) -> Result<()> {
    if have < listed {
        bail!(
            "{}: truncated: {INVENTORY} says {listed} bytes, file has {have}",
            p.display()
        );
    }
    if have != listed {
        bail!(
            "{}: {have} bytes, {INVENTORY} says {listed} (file corrupted or replaced)",
            p.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn small_image(dir: &Path) -> pb::Inventory {
        let w = ImageWriter::create(dir).unwrap();
        w.write_msg(
            PSTREE,
            Kind::PsTree,
            &pb::PsTree {
                tasks: vec![pb::PsTreeEntry {
                    pid: 5,
                    ppid: 1,
                    threads: vec![5, 6],
                    ..Default::default()
                }],
            },
        )
        .unwrap();
        w.write_msg(
            &core_file(5),
            Kind::Core,
            &pb::Core {
                tid: 5,
                comm: "w".into(),
                ..Default::default()
            },
        )
        .unwrap();
        w.write_msg(
            &core_file(6),
            Kind::Core,
            &pb::Core {
                tid: 6,
                ..Default::default()
            },
        )
        .unwrap();
        w.write_blob("blob-1.img", b"hello").unwrap();
        w.commit(pb::Inventory {
            root_pid: 5,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn write_commit_open_read() {
        let t = TempDir::new("dir-rt");
        let d = t.path().join("img");
        let inv = small_image(&d);
        assert_eq!(
            inv.files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["blob-1.img", "core-5.img", "core-6.img", "pstree.img"]
        );
        assert_eq!(inv.format_version, file::FORMAT_VERSION);

        let img = ImageDir::open(&d).unwrap();
        assert_eq!(img.inventory().root_pid, 5);
        img.validate().unwrap();
        let ps: pb::PsTree = img.read_msg(PSTREE, Kind::PsTree).unwrap();
        assert_eq!(ps.tasks[0].threads, [5, 6]);
        assert_eq!(
            img.read_msg::<pb::Core>(&core_file(5), Kind::Core)
                .unwrap()
                .comm,
            "w"
        );
        assert_eq!(img.read_blob("blob-1.img").unwrap(), b"hello");
        assert!(img.has(&core_file(6)) && !img.has(&core_file(7)));
        let e = format!(
            "{:#}",
            img.read_msg::<pb::Core>(&core_file(7), Kind::Core)
                .unwrap_err()
        );
        assert!(e.contains("core-7.img: not part of the image"), "{e}");
        // No temp files are left behind.
        let names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        assert_eq!(
            crc32c::crc32c(&std::fs::read(d.join(INVENTORY)).unwrap()),
            img.inventory_crc()
        );
    }

    #[test]
    fn permissions_are_private() {
        let t = TempDir::new("dir-perm");
        let d = t.path().join("img");
        small_image(&d);
        assert_eq!(mode(&d), 0o700);
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
    }

    #[test]
    fn existing_dirs() {
        let t = TempDir::new("dir-exist");
        // Existing and empty, or holding only a log: fine.
        create_images_dir(t.path()).unwrap();
        std::fs::write(t.path().join("dump.log"), "x").unwrap();
        create_images_dir(t.path()).unwrap();
        let d = t.path().join("img");
        small_image(&d);
        let e = format!("{:#}", create_images_dir(&d).unwrap_err());
        assert!(e.contains("already holds a complete image"), "{e}");
        assert!(ImageWriter::create(&d).is_err());
        // Overwriting makes it incomplete first.
        let w = ImageWriter::create_overwriting(&d).unwrap();
        assert!(ImageDir::open(&d).is_err());
        w.commit(pb::Inventory::default()).unwrap();
        assert!(ImageDir::open(&d).unwrap().inventory().files.is_empty());
        // A file in the way.
        let f = t.path().join("plain");
        std::fs::write(&f, "").unwrap();
        assert!(format!("{:#}", create_images_dir(&f).unwrap_err()).contains("not a directory"));
        // Writing a name twice, or a bad name.
        let w = ImageWriter::create(&t.path().join("img2")).unwrap();
        w.write_msg(PSTREE, Kind::PsTree, &pb::PsTree::default())
            .unwrap();
        assert!(format!(
            "{:#}",
            w.write_msg(PSTREE, Kind::PsTree, &pb::PsTree::default())
                .unwrap_err()
        )
        .contains("twice"));
        assert!(w
            .write_msg("../x.img", Kind::PsTree, &pb::PsTree::default())
            .is_err());
        assert!(w
            .write_msg(INVENTORY, Kind::PsTree, &pb::PsTree::default())
            .is_err());
    }

    #[test]
    fn read_only_dir_is_a_clear_error() {
        // root bypasses mode bits, so use a read-only bind... simpler: a read-only filesystem
        // is not available in a unit test; /proc is one that refuses writes.
        let e = format!("{:#}", create_images_dir(Path::new("/proc/1")).unwrap_err());
        assert!(e.contains("/proc/1") && e.contains("not writable"), "{e}");
    }

    #[test]
    fn incomplete_dir_is_refused() {
        let t = TempDir::new("dir-noinv");
        let w = ImageWriter::create(t.path()).unwrap();
        w.write_msg(&core_file(1), Kind::Core, &pb::Core::default())
            .unwrap();
        drop(w); // the dump failed before commit
        let e = format!("{:#}", ImageDir::open(t.path()).err().unwrap());
        assert!(
            e.contains("is not a complete cr image (no inventory.img): the dump did not finish"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            ImageDir::open(&t.path().join("nope")).err().unwrap()
        );
        assert!(e.contains("no such directory"), "{e}");
    }

    #[test]
    fn validate_names_the_bad_file() {
        let t = TempDir::new("dir-val");
        let d = t.path().join("img");
        small_image(&d);

        let p = d.join(core_file(6));
        let good = std::fs::read(&p).unwrap();
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        let e = format!("{:#}", ImageDir::open(&d).unwrap().validate().unwrap_err());
        assert!(
            e.contains("core-6.img: checksum mismatch (file corrupted)"),
            "{e}"
        );

        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        let e = format!("{:#}", ImageDir::open(&d).unwrap().validate().unwrap_err());
        assert!(e.contains("core-6.img: truncated"), "{e}");

        std::fs::remove_file(&p).unwrap();
        let e = format!("{:#}", ImageDir::open(&d).unwrap().validate().unwrap_err());
        assert!(
            e.contains("core-6.img: listed in inventory.img but missing"),
            "{e}"
        );

        // A valid frame that is not the file the inventory lists (replaced).
        std::fs::write(
            &p,
            file::frame(
                Kind::Core,
                &pb::Core {
                    tid: 9,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        )
        .unwrap();
        let img = ImageDir::open(&d).unwrap();
        assert!(img.validate().is_err());
        assert!(img.read_msg::<pb::Core>(&core_file(6), Kind::Core).is_err());

        // A corrupt inventory.
        let inv = d.join(INVENTORY);
        let mut b = std::fs::read(&inv).unwrap();
        let n = b.len() - 2;
        b[n] ^= 0x10;
        std::fs::write(&inv, &b).unwrap();
        let e = format!("{:#}", ImageDir::open(&d).err().unwrap());
        assert!(e.contains("inventory.img: checksum mismatch"), "{e}");
    }
}
