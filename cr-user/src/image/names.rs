//! The names of an image's files, and the inventory's flag bits (part of the format).

/// `inventory.img`: written last; its presence makes the directory a complete image.
pub const INVENTORY: &str = "inventory.img";
/// `pstree.img`: the process tree.
pub const PSTREE: &str = "pstree.img";
/// `files.img`: every open file description of the tree.
pub const FILES: &str = "files.img";
/// File locks (--file-locks).
pub const LOCKS: &str = "locks.img";

/// Inventory flag bits (`pb::Inventory::flags`).
pub const DUMP_F_PRE_DUMP: u64 = 1;
pub const DUMP_F_TCP: u64 = 2;
pub const DUMP_F_SHELL_JOB: u64 = 4;
pub const DUMP_F_FILE_LOCKS: u64 = 8;
/// The image's parent was folded into it (`cr periodic --keep`): it holds every page itself.
pub const DUMP_F_FOLDED: u64 = 16;

/// `core-TID.img`: one thread's registers and per-task state.
pub fn core_file(tid: i32) -> String {
    format!("core-{tid}.img")
}
/// `mm-PID.img`: a process's VMAs and mm fields.
pub fn mm_file(pid: i32) -> String {
    format!("mm-{pid}.img")
}
/// `pagemap-PID.img`: which page runs a process has and where they are.
pub fn pagemap_file(pid: i32) -> String {
    format!("pagemap-{pid}.img")
}
/// `pages-PID.img`: a process's raw pages.
pub fn pages_file(pid: i32) -> String {
    format!("pages-{pid}.img")
}
/// `fds-PID.img`: a process's fd table.
pub fn fds_file(pid: i32) -> String {
    format!("fds-{pid}.img")
}

/// The PID in a `pagemap-PID.img` name.
pub(crate) fn pagemap_pid(name: &str) -> Option<i32> {
    name.strip_prefix("pagemap-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}
