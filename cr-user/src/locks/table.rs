//! The tracker's file-lock table (DESIGN §5, §7): the [`LockModel`] of the tracked tree's
//! locks, fed by the lock programs' ring, which the tracker drains as it fills and every quarter
//! second ([`LockTable::pump`]). A dump asks for it (`Locks`, [`LockTable::view`]) while the
//! tree is frozen; with no lock held it reads nothing else at all ([`super::dump`]). The table
//! seeds itself from a survey of the running tree when the tracker starts, and takes a dump's
//! exact survey back when it could not tell ([`LockTable::reseed`]).

use anyhow::{bail, Result};
use cr_common::lock::{lock_stat, LockEvent};

use super::model::LockModel;
use crate::bpf::locks::LockMaps;
use crate::tracker::locks::{SeedSet, TableView};

/// Loss counters that make the table unusable when they move.
const LOSSES: [(u32, &str); 3] = [
    (lock_stat::LOST, "lock events lost (ring full)"),
    (
        lock_stat::TREE_LOST,
        "new tasks of the tree not followed (map full)",
    ),
    (
        lock_stat::INODES_LOST,
        "locked inodes not followed (map full)",
    ),
];

/// The tracker's lock table: the model, fed from the maps, and whether it can be trusted.
pub struct LockTable {
    model: LockModel,
    root: i32,
    /// Why the table cannot be used at all, or until the next seed.
    broken: Option<String>,
    /// Loss counters at the last seed.
    baseline: [u64; 3],
    events: u64,
    scratch: Vec<LockEvent>,
}

impl LockTable {
    /// Starts the table for the tree of `root` (running): follows it, surveys its locks and
    /// seeds the model. Never fails: a table that cannot start says why when asked.
    pub fn start(maps: &mut LockMaps, root: i32) -> LockTable {
        let mut t = LockTable {
            model: LockModel::new(),
            root,
            broken: maps.disabled().map(str::to_string),
            baseline: [0; 3],
            events: 0,
            scratch: Vec::new(),
        };
        if t.broken.is_none() {
            let t0 = std::time::Instant::now();
            match t.seed_running(maps) {
                Ok(n) => log::info!(
                    "lock table of PID {root}: seeded with {n} locks in {:?}",
                    t0.elapsed()
                ),
                Err(e) => {
                    log::warn!("lock table of PID {root}: no seed ({e:#}); dumps read /proc/locks");
                    t.broken = Some(format!("seeding it failed: {e:#}"));
                }
            }
        }
        t
    }

    fn seed_running(&mut self, maps: &mut LockMaps) -> Result<usize> {
        let tree = maps.follow_tree(self.root)?;
        self.pump(maps)?;
        let survey = crate::locks::dump::survey_running(&tree)?;
        let seed = crate::locks::dump::seed_of(&survey, &tree, &self.model.inodes());
        self.apply_seed(maps, &seed)?;
        self.pump(maps)?;
        Ok(seed.locks.len())
    }

    fn apply_seed(&mut self, maps: &mut LockMaps, seed: &SeedSet) -> Result<()> {
        for (i, _) in LOSSES {
            self.baseline[i as usize] = maps.stat(i)?;
        }
        self.model.reseed(seed);
        for id in seed
            .inodes
            .iter()
            .chain(seed.unknown.iter().map(|(i, _)| i))
        {
            if self.model.has(id) {
                maps.add_inode(*id)?;
            }
        }
        Ok(())
    }

    /// Drains the ring into the model, then forgets the inodes left without locks (and takes
    /// them out of CR_LOCK_INODES, putting back any an event came for meanwhile). Returns the
    /// number of events.
    pub fn pump(&mut self, maps: &mut LockMaps) -> Result<usize> {
        let mut n = self.drain(maps);
        let empty = self.model.prune();
        self.model.take_touched();
        if empty.is_empty() {
            return Ok(n);
        }
        for id in &empty {
            maps.remove_inode(*id);
        }
        n += self.drain(maps);
        for id in self.model.take_touched() {
            if self.model.has(&id) && empty.contains(&id) {
                maps.add_inode(id)?;
            }
        }
        Ok(n)
    }

    fn drain(&mut self, maps: &mut LockMaps) -> usize {
        let mut evs = std::mem::take(&mut self.scratch);
        evs.clear();
        maps.drain(&mut evs);
        for ev in &evs {
            self.model.apply(ev);
        }
        let n = evs.len();
        self.events += n as u64;
        self.scratch = evs;
        n
    }

    /// The table now, for a dump of the (frozen) processes `tree`.
    pub fn view(&mut self, maps: &mut LockMaps, tree: &[i32]) -> TableView {
        let pumped = self.pump(maps);
        let why = match (&self.broken, pumped) {
            (Some(b), _) => Some(b.clone()),
            (None, Err(e)) => Some(format!("{e:#}")),
            (None, Ok(_)) => self.loss(maps).or_else(|| {
                tree.iter()
                    .find(|p| !maps.follows(**p))
                    .map(|p| format!("PID {p} of the tree is not followed by the lock programs"))
            }),
        };
        TableView {
            usable: why.is_none(),
            why: why.unwrap_or_default(),
            locks: self.model.locks(),
            unknown: self.model.unknown(),
            events: self.events,
        }
    }

    fn loss(&self, maps: &LockMaps) -> Option<String> {
        let mut why = Vec::new();
        for (i, what) in LOSSES {
            match maps.stat(i) {
                Ok(v) if v != self.baseline[i as usize] => why.push(format!(
                    "{} {what}",
                    v.wrapping_sub(self.baseline[i as usize])
                )),
                Ok(_) => {}
                Err(e) => why.push(format!("{e:#}")),
            }
        }
        (!why.is_empty()).then(|| format!("{} since the last exact survey", why.join(", ")))
    }

    /// A dump's exact survey of the frozen tree: the table describes those inodes exactly
    /// again, and losses before it no longer matter.
    pub fn reseed(&mut self, maps: &mut LockMaps, seed: &SeedSet) -> Result<()> {
        if let Some(m) = maps.disabled() {
            bail!("the lock table is off: {m}");
        }
        self.drain(maps);
        self.apply_seed(maps, seed)?;
        self.broken = None;
        self.pump(maps)?;
        Ok(())
    }
}
