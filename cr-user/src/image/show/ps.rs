//! `cr show DIR ps`: the process tree of an image, parents before their children, each
//! command name indented under its parent's (as `crit x DIR ps` and `ps -H` show it).

use std::collections::{HashMap, HashSet};

use anyhow::Result;

use super::table::Table;
use crate::image::dir::{core_file, ImageDir, PSTREE};
use crate::image::file::Kind;
use crate::image::pb;

pub fn render(dir: &ImageDir) -> Result<String> {
    let tree: pb::PsTree = dir.read_msg(PSTREE, Kind::PsTree)?;
    let mut t = Table::new(&[">PID", ">PPID", ">PGID", ">SID", ">THREADS", "COMM"]);
    for (e, depth) in tree_order(&tree.tasks) {
        let comm = if e.zombie {
            let st = e.exit_status;
            if st & 0x7f == 0 {
                format!("<zombie, exited {}>", (st >> 8) & 0xff)
            } else {
                format!("<zombie, killed by signal {}>", st & 0x7f)
            }
        } else {
            comm(dir, e.pid)?
        };
        t.row([
            e.pid.to_string(),
            e.ppid.to_string(),
            e.pgid.to_string(),
            e.sid.to_string(),
            e.threads.len().to_string(),
            format!("{}{comm}", "  ".repeat(depth)),
        ]);
    }
    Ok(t.render(0))
}

/// The command name the main thread's core records.
pub(super) fn comm(dir: &ImageDir, pid: i32) -> Result<String> {
    let core: pb::Core = dir.read_msg(&core_file(pid), Kind::Core)?;
    Ok(core.comm)
}

/// The tasks depth first from each task whose parent is not in the tree (the root), children
/// in image order, with their depth.
pub(super) fn tree_order(tasks: &[pb::PsTreeEntry]) -> Vec<(&pb::PsTreeEntry, usize)> {
    let pids: HashSet<i32> = tasks.iter().map(|e| e.pid).collect();
    let mut children: HashMap<i32, Vec<&pb::PsTreeEntry>> = HashMap::new();
    for e in tasks {
        children.entry(e.ppid).or_default().push(e);
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut stack: Vec<(&pb::PsTreeEntry, usize)> = tasks
        .iter()
        .filter(|e| !pids.contains(&e.ppid))
        .rev()
        .map(|e| (e, 0))
        .collect();
    let mut seen = HashSet::new();
    while let Some((e, d)) = stack.pop() {
        if !seen.insert(e.pid) {
            continue;
        }
        out.push((e, d));
        if let Some(c) = children.get(&e.pid) {
            stack.extend(c.iter().rev().map(|c| (*c, d + 1)));
        }
    }
    // A task in a parent cycle (a corrupt image) is still shown.
    out.extend(
        tasks
            .iter()
            .filter(|e| !seen.contains(&e.pid))
            .map(|e| (e, 0)),
    );
    out
}

#[cfg(test)]
#[test]
fn depth_first_with_depths() {
    let e = |pid, ppid| pb::PsTreeEntry {
        pid,
        ppid,
        ..Default::default()
    };
    let tasks = [e(10, 1), e(11, 10), e(12, 10), e(13, 11)];
    let order: Vec<(i32, usize)> = tree_order(&tasks)
        .into_iter()
        .map(|(e, d)| (e.pid, d))
        .collect();
    assert_eq!(order, [(10, 0), (11, 1), (13, 2), (12, 1)]);
}
