//! `cr show DIR mems`: each process's memory areas (as `crit x DIR mems`), with their size,
//! protection and sharing, what backs them, and how many of their pages this image stores
//! and how many its parents do (runs marked `in_parent`).

use anyhow::Result;

use super::table::{size, Table};
use crate::image::dir::{mm_file, ImageDir};
use crate::image::file::Kind;
use crate::image::pages::PAGE_SIZE;
use crate::image::{pb, vma};

pub fn render(dir: &ImageDir) -> Result<String> {
    let mut out = String::new();
    for pid in dir.pagemap_pids() {
        let mm: pb::Mm = dir.read_msg(&mm_file(pid), Kind::Mm)?;
        let pm = dir.page_map(pid)?;
        let mut t = Table::new(&[
            "START", "END", ">SIZE", "PROT", "FLAGS", "BACKING", ">HERE", ">PARENTS",
        ]);
        let (mut total, mut here_all, mut parent_all) = (0u64, 0u64, 0u64);
        for v in &mm.vmas {
            let (here, parents) = stored(&pm.runs, v.start, v.end);
            total += v.end - v.start;
            here_all += here;
            parent_all += parents;
            t.row([
                format!("{:x}", v.start),
                format!("{:x}", v.end),
                size(v.end - v.start),
                prot(v),
                flags(v),
                backing(v),
                here.to_string(),
                parents.to_string(),
            ]);
        }
        t.row([
            String::new(),
            "total".into(),
            size(total),
            String::new(),
            String::new(),
            String::new(),
            here_all.to_string(),
            parent_all.to_string(),
        ]);
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!(
            "PID {pid}: {} VMAs, {} mapped; pages stored here {here_all} ({}), in parents {parent_all} ({})\n",
            mm.vmas.len(),
            size(total),
            size(here_all * PAGE_SIZE as u64),
            size(parent_all * PAGE_SIZE as u64)
        ));
        out.push_str(&t.render(2));
    }
    Ok(out)
}

/// Pages of `[start, end)` the page map stores in this image and in its parents.
fn stored(runs: &[pb::PageRun], start: u64, end: u64) -> (u64, u64) {
    let (mut here, mut parents) = (0, 0);
    for r in runs {
        let rs = r.vaddr;
        let re = r.vaddr + u64::from(r.nr_pages) * PAGE_SIZE as u64;
        let (a, b) = (rs.max(start), re.min(end));
        if a < b {
            let n = (b - a) / PAGE_SIZE as u64;
            if r.in_parent {
                parents += n;
            } else {
                here += n;
            }
        }
    }
    (here, parents)
}

/// `rwxp` as /proc/PID/maps writes it.
fn prot(v: &pb::Vma) -> String {
    let bit = |b: u32, c: char| if v.prot & b != 0 { c } else { '-' };
    let shared = v.flags & libc::MAP_SHARED as u32 != 0;
    format!(
        "{}{}{}{}",
        bit(libc::PROT_READ as u32, 'r'),
        bit(libc::PROT_WRITE as u32, 'w'),
        bit(libc::PROT_EXEC as u32, 'x'),
        if shared { 's' } else { 'p' }
    )
}

/// Mapping flags and remembered advice worth knowing.
fn flags(v: &pb::Vma) -> String {
    let mut f = Vec::new();
    if v.flags & libc::MAP_ANONYMOUS as u32 != 0 {
        f.push("anon");
    }
    if v.flags & libc::MAP_GROWSDOWN as u32 != 0 {
        f.push("growsdown");
    }
    if v.locked {
        f.push("locked");
    }
    for (bit, name) in [
        (vma::MADV_DONTFORK, "dontfork"),
        (vma::MADV_WIPEONFORK, "wipeonfork"),
        (vma::MADV_HUGEPAGE, "hugepage"),
        (vma::MADV_NOHUGEPAGE, "nohugepage"),
        (vma::MADV_MERGEABLE, "mergeable"),
        (vma::MADV_DONTDUMP, "dontdump"),
    ] {
        if v.madv & bit != 0 {
            f.push(name);
        }
    }
    f.join(",")
}

/// The file (with its offset), the name of an anonymous area, or what kind it is.
fn backing(v: &pb::Vma) -> String {
    if !v.path.is_empty() {
        let mut s = v.path.clone();
        if v.pgoff != 0 {
            s.push_str(&format!(" @{:#x}", v.pgoff));
        }
        if v.deleted {
            s.push_str(" (deleted)");
        }
        if v.file_id != 0 {
            s.push_str(&format!(" (file id {})", v.file_id));
        }
        return s;
    }
    let name = if !v.name.is_empty() {
        v.name.clone()
    } else {
        match v.kind {
            vma::KIND_VDSO => "[vdso]".into(),
            vma::KIND_VVAR | vma::KIND_VVAR_VCLOCK => "[vvar]".into(),
            vma::KIND_VSYSCALL => "[vsyscall]".into(),
            vma::KIND_HEAP => "[heap]".into(),
            vma::KIND_STACK => "[stack]".into(),
            vma::KIND_UPROBES => "[uprobes]".into(),
            _ => "anonymous".into(),
        }
    };
    if v.kind == vma::KIND_SHMEM_ANON {
        format!("{name} (shared, id {:#x})", v.shmid)
    } else {
        name
    }
}

#[cfg(test)]
#[test]
fn pages_counted_per_vma() {
    let run = |vaddr, nr_pages, in_parent| pb::PageRun {
        vaddr,
        nr_pages,
        in_parent,
        ..Default::default()
    };
    let runs = [
        run(0x1000, 2, false),
        run(0x3000, 4, true),
        run(0x9000, 1, false),
    ];
    assert_eq!(stored(&runs, 0x1000, 0x5000), (2, 2));
    assert_eq!(stored(&runs, 0x5000, 0xa000), (1, 2));
    assert_eq!(stored(&runs, 0xa000, 0xb000), (0, 0));
}
