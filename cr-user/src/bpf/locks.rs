//! The maps of the tracker's file-lock table (cr-ebpf/src/locks.rs), and the tracepoint layouts
//! its programs depend on. Only the tracker process holds them: dumps ask it for the table
//! ([`crate::locks::table`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use cr_common::lock::{lock_off, names, LockEvent, LockInode};

use super::loader::BpfObject;
use super::tracefs;
use crate::kernel::proc::locks::InodeId;

/// The kernel's key for an inode in CR_LOCK_INODES.
fn lock_inode(id: InodeId) -> LockInode {
    LockInode {
        ino: id.ino,
        dev: id.kernel_dev(),
        _pad: 0,
    }
}

/// The fields of a `filelock_lock` record the programs read: (name, offset, size).
const LOCK_FIELDS: [(&str, u32, u32); 9] = [
    ("i_ino", lock_off::INO, 8),
    ("s_dev", lock_off::DEV, 4),
    ("owner", lock_off::OWNER, 8),
    ("pid", lock_off::PID, 4),
    ("flags", lock_off::FLAGS, 4),
    ("type", lock_off::TYPE, 1),
    ("fl_start", lock_off::START, 8),
    ("fl_end", lock_off::END, 8),
    ("ret", lock_off::RET, 4),
];
const LEASE_FIELDS: [(&str, u32, u32); 5] = [
    ("i_ino", lock_off::LEASE_INO, 8),
    ("s_dev", lock_off::LEASE_DEV, 4),
    ("owner", lock_off::LEASE_OWNER, 8),
    ("flags", lock_off::LEASE_FLAGS, 4),
    ("type", lock_off::LEASE_TYPE, 1),
];
/// The flag and type values the model relies on, as the print format spells them.
const LOCK_SYMBOLS: [&str; 8] = [
    "{ 1, \"FL_POSIX\" }",
    "{ 2, \"FL_FLOCK\" }",
    "{ 8, \"FL_ACCESS\" }",
    "{ 64, \"FL_CLOSE\" }",
    "{ 1024, \"FL_OFDLCK\" }",
    "{ 0, \"F_RDLCK\" }",
    "{ 1, \"F_WRLCK\" }",
    "{ 2, \"F_UNLCK\" }",
];

/// Checks that a tracepoint's format has each field at the offset and of the size cr-ebpf
/// reads, and (for the lock events) the flag values the model uses.
pub fn check_format(
    event: &str,
    text: &str,
    fields: &[(&str, u32, u32)],
    symbols: &[&str],
) -> Result<()> {
    let have = tracefs::parse_format(text);
    for &(name, offset, size) in fields {
        match have.iter().find(|f| f.name == name) {
            Some(f) if f.offset == offset && f.size == size => {}
            Some(f) => bail!(
                "tracepoint {event}: field `{name}` is {} bytes at offset {}, cr-ebpf reads {size} at {offset}",
                f.size,
                f.offset
            ),
            None => bail!("tracepoint {event} has no field `{name}`"),
        }
    }
    for s in symbols {
        if !text.contains(s) {
            bail!("tracepoint {event}: its print format lacks {s}: the kernel's lock flags differ from cr's");
        }
    }
    Ok(())
}

/// Every tracepoint the lock programs read, checked against tracefs.
fn check_layouts() -> Result<()> {
    for name in ["posix_lock_inode", "flock_lock_inode"] {
        let text = tracefs::read_format("filelock", name)?;
        check_format(
            &format!("filelock:{name}"),
            &text,
            &LOCK_FIELDS,
            &LOCK_SYMBOLS,
        )?;
    }
    let text = tracefs::read_format("filelock", "generic_add_lease")?;
    check_format("filelock:generic_add_lease", &text, &LEASE_FIELDS, &[])?;
    let text = tracefs::read_format("sched", "sched_process_fork")?;
    check_format(
        "sched:sched_process_fork",
        &text,
        &[("child_pid", lock_off::FORK_CHILD_PID, 4)],
        &[],
    )?;
    let text = tracefs::read_format("sched", "sched_process_exit")?;
    check_format(
        "sched:sched_process_exit",
        &text,
        &[("group_dead", lock_off::EXIT_GROUP_DEAD, 1)],
        &[],
    )?;
    Ok(())
}

struct Maps {
    events: RingBuf<MapData>,
    tree: BpfHashMap<MapData, u32, u32>,
    inodes: BpfHashMap<MapData, LockInode, u32>,
    stats: PerCpuArray<MapData, u64>,
}

/// The lock table's maps, in the tracker process. Dumps get no fds: they ask the tracker.
/// A kernel whose lock tracepoints cr cannot read leaves the table disabled (with the reason),
/// never the tracker: memory tracking does not depend on it.
pub struct LockMaps {
    maps: Option<Maps>,
    disabled: Option<String>,
}

impl LockMaps {
    /// How many map fds [`LockMaps::fds`] hands over.
    pub const FDS: usize = 0;

    /// Takes the maps out of a freshly loaded object (before its programs are attached).
    pub fn take(obj: &mut BpfObject) -> Result<LockMaps> {
        let maps = (|| -> Result<Maps> {
            Ok(Maps {
                events: obj.take_map(names::EVENTS)?,
                tree: obj.take_map(names::TREE)?,
                inodes: obj.take_map(names::INODES)?,
                stats: obj.take_map(names::STATS)?,
            })
        })();
        Ok(match maps {
            Ok(m) => LockMaps {
                maps: Some(m),
                disabled: None,
            },
            Err(e) => LockMaps {
                maps: None,
                disabled: Some(format!("{e:#}")),
            },
        })
    }

    /// Checks the tracepoint layouts and attaches the programs; a failure disables the table.
    pub fn attach(&mut self, obj: &mut BpfObject) -> Result<()> {
        if self.maps.is_none() {
            return Ok(());
        }
        let r = check_layouts().and_then(|_| {
            for (prog, category, name) in names::PROGS {
                obj.attach_tracepoint(prog, category, name)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            log::warn!("the file-lock table is off (dumps read /proc/locks): {e:#}");
            self.disabled = Some(format!("{e:#}"));
            self.maps = None;
        }
        Ok(())
    }

    /// Duplicates of the map fds, in the order [`LockMaps::from_fds`] expects.
    pub fn fds(&self) -> Result<Vec<OwnedFd>> {
        Ok(Vec::new())
    }

    /// The maps from `FDS` fds sent by the tracker (none: a dump asks the tracker instead).
    pub fn from_fds(_fds: Vec<OwnedFd>) -> Result<LockMaps> {
        Ok(LockMaps {
            maps: None,
            disabled: Some("the lock table lives in the tracker process".into()),
        })
    }

    /// Why the table is off (None: it is on).
    pub fn disabled(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    /// The event ring's fd (readable when events wait), if the table is on.
    pub fn ring_fd(&self) -> Option<BorrowedFd<'_>> {
        self.maps.as_ref().map(|m| m.events.as_fd())
    }

    fn maps(&mut self) -> Result<&mut Maps> {
        match (&mut self.maps, &self.disabled) {
            (Some(m), _) => Ok(m),
            (None, Some(why)) => bail!("the lock table is off: {why}"),
            (None, None) => bail!("the lock table is off"),
        }
    }

    /// Takes every queued event, in order.
    pub fn drain(&mut self, out: &mut Vec<LockEvent>) {
        let Some(m) = self.maps.as_mut() else { return };
        while let Some(item) = m.events.next() {
            if item.len() >= std::mem::size_of::<LockEvent>() {
                // SAFETY: the record was written by cr-ebpf as a LockEvent (repr(C), integers
                // only); read_unaligned copes with any alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const LockEvent) });
            }
        }
    }

    pub fn stat(&self, i: u32) -> Result<u64> {
        let m = self.maps.as_ref().context("the lock table is off")?;
        let v = m
            .stats
            .get(&i, 0)
            .with_context(|| format!("read counter {i} of {}", names::STATS))?;
        Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// Follows `root` and its descendants: their lock requests are queued from now on, and
    /// their new tasks join the tree as they are made. Each process is recorded before its
    /// children are listed, so a child forked meanwhile is caught one way or the other.
    /// Returns the processes found.
    pub fn follow_tree(&mut self, root: i32) -> Result<Vec<i32>> {
        let m = self.maps()?;
        crate::kernel::proc::task::walk_tree(root, |p| {
            m.tree
                .insert(&(p as u32), &1, 0)
                .with_context(|| format!("add PID {p} to {}", names::TREE))
        })
    }

    /// Whether `pid` is followed.
    pub fn follows(&self, pid: i32) -> bool {
        self.maps
            .as_ref()
            .is_some_and(|m| m.tree.get(&(pid as u32), 0).is_ok())
    }

    pub fn add_inode(&mut self, id: InodeId) -> Result<()> {
        let m = self.maps()?;
        m.inodes
            .insert(&lock_inode(id), &1, 0)
            .with_context(|| format!("add inode {id} to {}", names::INODES))
    }

    pub fn remove_inode(&mut self, id: InodeId) {
        if let Some(m) = self.maps.as_mut() {
            let _ = m.inodes.remove(&lock_inode(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSIX_FORMAT: &str = "name: posix_lock_inode
ID: 1128
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:struct file_lock * fl;	offset:8;	size:8;	signed:0;
	field:unsigned long i_ino;	offset:16;	size:8;	signed:0;
	field:dev_t s_dev;	offset:24;	size:4;	signed:0;
	field:struct file_lock_core * blocker;	offset:32;	size:8;	signed:0;
	field:fl_owner_t owner;	offset:40;	size:8;	signed:0;
	field:unsigned int pid;	offset:48;	size:4;	signed:0;
	field:unsigned int flags;	offset:52;	size:4;	signed:0;
	field:unsigned char type;	offset:56;	size:1;	signed:0;
	field:loff_t fl_start;	offset:64;	size:8;	signed:1;
	field:loff_t fl_end;	offset:72;	size:8;	signed:1;
	field:int ret;	offset:80;	size:4;	signed:1;

print fmt: \"fl=%p dev=0x%x:0x%x ino=0x%lx fl_blocker=%p fl_owner=%p fl_pid=%u fl_flags=%s fl_type=%s fl_start=%lld fl_end=%lld ret=%d\", REC->fl, ((unsigned int) ((REC->s_dev) >> 20)), ((unsigned int) ((REC->s_dev) & ((1U << 20) - 1))), REC->i_ino, REC->blocker, REC->owner, REC->pid, __print_flags(REC->flags, \"|\", { 1, \"FL_POSIX\" }, { 2, \"FL_FLOCK\" }, { 4, \"FL_DELEG\" }, { 8, \"FL_ACCESS\" }, { 16, \"FL_EXISTS\" }, { 32, \"FL_LEASE\" }, { 64, \"FL_CLOSE\" }, { 128, \"FL_SLEEP\" }, { 256, \"FL_DOWNGRADE_PENDING\" }, { 512, \"FL_UNLOCK_PENDING\" }, { 1024, \"FL_OFDLCK\" }, { 4096, \"FL_RECLAIM\"}), __print_symbolic(REC->type, { 0, \"F_RDLCK\" }, { 1, \"F_WRLCK\" }, { 2, \"F_UNLCK\" }), REC->fl_start, REC->fl_end, REC->ret
";

    #[test]
    fn lock_record_layout() {
        check_format(
            "filelock:posix_lock_inode",
            POSIX_FORMAT,
            &LOCK_FIELDS,
            &LOCK_SYMBOLS,
        )
        .unwrap();
        let moved = POSIX_FORMAT.replace("offset:48;", "offset:44;");
        assert!(check_format("x", &moved, &LOCK_FIELDS, &LOCK_SYMBOLS).is_err());
        let flags = POSIX_FORMAT.replace("{ 1024, \"FL_OFDLCK\" }", "{ 2048, \"FL_OFDLCK\" }");
        assert!(check_format("x", &flags, &LOCK_FIELDS, &LOCK_SYMBOLS).is_err());
    }
}
