//! `cr show DIR stats`: the timings and page counts of every image of a chain, oldest first,
//! one column each, with what the eBPF tracker saw (dirty pages, VMA events, which harvest
//! and why); and [`display`], the table `--display-stats` prints at the end of a dump.

use anyhow::Result;

use super::table::{ms, size, Table};
use crate::image::chain::ImageChain;
use crate::image::names::{DUMP_F_FOLDED, DUMP_F_PRE_DUMP};
use crate::image::pages::PAGE_SIZE;
use crate::image::pb;

/// One row per measure, one column per image (oldest first); the harvest reasons below.
pub fn render(chain: &ImageChain) -> Result<String> {
    let images: Vec<_> = chain.images().iter().rev().collect();
    let names: Vec<String> = images
        .iter()
        .map(|d| {
            d.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| d.path().display().to_string())
        })
        .collect();
    let cols: Vec<Vec<(&'static str, String)>> =
        images.iter().map(|d| rows(d.inventory())).collect();
    let mut right = vec![false];
    right.extend(std::iter::repeat_n(true, cols.len()));
    let mut t = Table::headless(&right);
    t.row(std::iter::once(String::new()).chain(names.iter().cloned()));
    for (i, (label, _)) in cols[0].iter().enumerate() {
        t.row(std::iter::once(label.to_string()).chain(cols.iter().map(|c| c[i].1.clone())));
    }
    let mut out = t.render(0);
    out.push_str("\nharvest used and why:\n");
    let mut why = Table::headless(&[false, false]);
    for (name, d) in names.iter().zip(&images) {
        let st = d.inventory().stats.clone().unwrap_or_default();
        why.row([
            format!("{name}:"),
            format!("{} ({})", or_dash(&st.harvest), or_dash(&st.harvest_reason)),
        ]);
    }
    out.push_str(&why.render(2));
    Ok(out)
}

/// `--display-stats` after a dump or pre-dump of `inv` (CRIU prints "Displaying dump stats:").
pub fn display(inv: &pb::Inventory) -> String {
    let pre = inv.flags & DUMP_F_PRE_DUMP != 0;
    let mut t = Table::headless(&[false, true]);
    // The kind is in the heading, the time is now.
    for (label, value) in rows(inv)
        .into_iter()
        .filter(|(l, _)| !matches!(*l, "Kind" | "Created"))
    {
        t.row([label.to_string(), value]);
    }
    let st = inv.stats.clone().unwrap_or_default();
    format!(
        "Displaying {} stats:\n{}  Harvest reason: {}\n",
        if pre { "pre-dump" } else { "dump" },
        t.render(2),
        or_dash(&st.harvest_reason)
    )
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The measures of one image, labelled as CRIU labels its own where it has them.
fn rows(inv: &pb::Inventory) -> Vec<(&'static str, String)> {
    let st = inv.stats.clone().unwrap_or_default();
    let pages = |n: u64| format!("{n} ({})", size(n * PAGE_SIZE as u64));
    let kind = match (
        inv.flags & DUMP_F_PRE_DUMP != 0,
        inv.flags & DUMP_F_FOLDED != 0,
    ) {
        (true, _) => "pre-dump",
        (false, true) => "dump (folded)",
        (false, false) => "dump",
    };
    let image_bytes: u64 = inv.files.iter().map(|f| f.size).sum();
    vec![
        ("Kind", kind.to_string()),
        ("Created", super::json::utc(inv.created_unix_ms)),
        ("Parent", or_dash(&inv.parent_path).to_string()),
        ("Freezing time", ms(st.freezing_us)),
        ("Frozen time", ms(st.frozen_us)),
        ("Memory dump time", ms(st.memdump_us)),
        ("Memory write time", ms(st.memwrite_us)),
        ("Harvest time", ms(st.harvest_us)),
        ("Total time", ms(st.total_us)),
        ("VMAs", st.vmas.to_string()),
        ("Memory pages scanned", pages(st.pages_scanned)),
        (
            "Memory pages skipped from parent",
            pages(st.pages_in_parent),
        ),
        ("Memory pages written", pages(st.pages_written)),
        ("Harvest", or_dash(&st.harvest).to_string()),
        ("eBPF dirty pages", st.ebpf_dirty_pages.to_string()),
        ("VMA events", st.vma_events.to_string()),
        ("New VMAs", st.new_vmas.to_string()),
        (
            "Tracker PID",
            if st.tracker_pid == 0 {
                "-".to_string()
            } else {
                st.tracker_pid.to_string()
            },
        ),
        ("Image size", size(image_bytes)),
    ]
}
