//! `cargo xtask lint`: the layering of cr-user (see docs/architecture.md), then `cargo fmt
//! --check` and `cargo clippy --all-targets -- -D warnings`.
//!
//! The layering check reads every file of cr-user/src, takes its `use crate::…`, `super::…`
//! and inline `crate::…` paths as edges between top-level modules, and fails on an edge the
//! layer table forbids, on an import cycle between top-level modules, and on `unsafe` outside
//! `kernel/` and `bpf/`. Comments and string literals are blanked out first, so a path in a
//! doc comment is no edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The layers, bottom first. A module may import support modules and layers below its own
/// (see [`allowed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Small modules anyone may use; they import nothing of the crate but each other.
    Support,
    /// Thin wrappers over syscalls, /proc parsers, ptrace: the only `unsafe` (with bpf).
    Kernel,
    /// The eBPF object, tracefs layouts, map access.
    Bpf,
    /// The image directory's files.
    Image,
    /// The tracker process's protocol and client.
    Tracker,
    /// One module per resource (collect, dump, restore); they may use each other, acyclically.
    Resource,
    /// The command line; only commands see it.
    Cli,
    /// The commands: sequencing only; nothing imports them.
    Cmd,
}

/// Every top-level module of cr-user and its layer. A new module needs a line here.
pub const MODULES: &[(&str, Layer)] = &[
    ("logging", Layer::Support),
    ("tunables", Layer::Support),
    ("refusal", Layer::Support),
    ("ranges", Layer::Support),
    ("progress", Layer::Support),
    // refusal.rs's macros, exported at the crate root.
    ("refuse", Layer::Support),
    ("bad_input", Layer::Support),
    ("kernel", Layer::Kernel),
    ("bpf", Layer::Bpf),
    ("image", Layer::Image),
    ("tracker", Layer::Tracker),
    ("tree", Layer::Resource),
    ("task", Layer::Resource),
    ("mem", Layer::Resource),
    ("files", Layer::Resource),
    ("locks", Layer::Resource),
    ("tcp", Layer::Resource),
    ("cli", Layer::Cli),
    ("cmd", Layer::Cmd),
];

/// Modules whose files may hold `unsafe`.
const UNSAFE_OK: &[&str] = &["kernel", "bpf"];

/// Whether a module of layer `from` may import one of layer `to` (a different module).
pub fn allowed(from: Layer, to: Layer) -> bool {
    use Layer::*;
    match (from, to) {
        (_, Support) => true,
        (_, Cmd) => false,
        (Cmd, _) => true,
        (_, Cli) => false,
        (Support | Kernel | Cli, _) => false,
        (Bpf | Image, Kernel) => true,
        (Tracker, Kernel | Bpf | Image) => true,
        (Resource, Kernel | Bpf | Image | Tracker | Resource) => true,
        _ => false,
    }
}

fn layer_of(module: &str) -> Option<Layer> {
    MODULES.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// One `crate::` path found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    /// The file's top-level module.
    pub from: String,
    /// The top-level module the path names.
    pub to: String,
    pub file: String,
    pub line: usize,
}

/// Replaces comments and the contents of string and char literals by spaces, keeping every
/// newline (so line numbers stay right).
pub fn blank(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let keep_nl = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(keep_nl(b[i]));
                    i += 1;
                }
            }
            continue;
        }
        let ident_before = i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_');
        // Raw strings: r"…", r#"…"#, br"…", cr#"…"#.
        if !ident_before && (c == 'r' || ((c == 'b' || c == 'c') && next == Some('r'))) {
            let start = if c == 'r' { i + 1 } else { i + 2 };
            let mut j = start;
            while b.get(j) == Some(&'#') {
                j += 1;
            }
            if b.get(j) == Some(&'"') {
                let hashes = j - start;
                for &ch in &b[i..=j] {
                    out.push(ch);
                }
                i = j + 1;
                loop {
                    if i >= b.len() {
                        break;
                    }
                    if b[i] == '"'
                        && b[i + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|&&h| h == '#')
                            .count()
                            == hashes
                    {
                        out.push('"');
                        out.extend(std::iter::repeat_n('#', hashes));
                        i += 1 + hashes;
                        break;
                    }
                    out.push(keep_nl(b[i]));
                    i += 1;
                }
                continue;
            }
        }
        if c == '"' {
            out.push('"');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                    if i < b.len() {
                        out.push(keep_nl(b[i]));
                        i += 1;
                    }
                    continue;
                }
                out.push(keep_nl(b[i]));
                i += 1;
            }
            out.push('"');
            i += 1;
            continue;
        }
        if c == '\'' {
            // A char literal ('a', '\n', '\u{1F600}', '"'), or a lifetime ('a, 'static).
            let is_char = match next {
                Some('\\') => true,
                Some(_) => b.get(i + 2) == Some(&'\''),
                None => false,
            };
            if is_char {
                out.push('\'');
                i += 1;
                while i < b.len() && b[i] != '\'' {
                    if b[i] == '\\' {
                        out.push(' ');
                        i += 1;
                    }
                    if i < b.len() {
                        out.push(' ');
                        i += 1;
                    }
                }
                out.push('\'');
                i += 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

/// Tokens with their line numbers (of blanked source).
fn tokens(src: &str) -> Vec<(Tok, usize)> {
    let b: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            let mut word: String = b[s..i].iter().collect();
            // r#ident
            if word == "r" && b.get(i) == Some(&'#') {
                let s2 = i + 1;
                let mut j = s2;
                while j < b.len() && (b[j].is_alphanumeric() || b[j] == '_') {
                    j += 1;
                }
                if j > s2 {
                    word = b[s2..j].iter().collect();
                    i = j;
                }
            }
            out.push((Tok::Ident(word), line));
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// The paths of one `use` tree starting at `toks[i]`, each as its segments; returns them and
/// the index after the tree.
fn use_tree(toks: &[(Tok, usize)], mut i: usize, prefix: &[String]) -> (Vec<Vec<String>>, usize) {
    let mut path: Vec<String> = prefix.to_vec();
    let mut out = Vec::new();
    if toks.get(i).map(|t| &t.0) == Some(&Tok::Path) {
        i += 1; // a leading `::` (extern crate path)
        path.push("::".into());
    }
    loop {
        match toks.get(i).map(|t| &t.0) {
            Some(Tok::Ident(w)) => {
                path.push(w.clone());
                i += 1;
                match toks.get(i).map(|t| &t.0) {
                    Some(Tok::Path) => {
                        i += 1;
                        continue;
                    }
                    Some(Tok::Ident(a)) if a == "as" => i += 2, // `as name`
                    _ => {}
                }
                out.push(path.clone());
                return (out, i);
            }
            Some(Tok::Punct('*')) => {
                out.push(path.clone());
                return (out, i + 1);
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match toks.get(i).map(|t| &t.0) {
                        Some(Tok::Punct('}')) => return (out, i + 1),
                        Some(Tok::Punct(',')) => i += 1,
                        None => return (out, i),
                        _ => {
                            let (sub, j) = use_tree(toks, i, &path);
                            out.extend(sub);
                            if j == i {
                                i += 1;
                            } else {
                                i = j;
                            }
                        }
                    }
                }
            }
            _ => {
                if path.len() > prefix.len() {
                    out.push(path.clone());
                }
                return (out, i);
            }
        }
    }
}

/// The module path of a file under `src/` (`files/pipe.rs` → `[files, pipe]`, `files/mod.rs`
/// → `[files]`, `lib.rs` → `[]`).
pub fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" && stem != "lib" && stem != "main" {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// Resolves a path written in module `here` to the module path it names, if it is a path
/// into the crate (`crate::`, `super::`, `self::`).
fn resolve(here: &[String], path: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    let mut base: Vec<String>;
    let mut rest = &path[1..];
    match first.as_str() {
        "crate" => base = Vec::new(),
        "self" => base = here.to_vec(),
        "super" => {
            base = here.to_vec();
            base.pop()?;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    base.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(base)
}

/// What one file holds: its paths into the crate (module path, line) and its `unsafe` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileFacts {
    pub paths: Vec<(Vec<String>, usize)>,
    /// Lines of `paths` inside a `mod tests { … }` (test code may use a sibling file's API).
    pub test_lines: Vec<usize>,
    pub unsafe_lines: Vec<usize>,
}

/// Parses one file of module `here`.
pub fn scan(here: &[String], src: &str) -> FileFacts {
    let toks = tokens(&blank(src));
    let mut f = FileFacts::default();
    // Inline modules (`mod tests { … }`) change what `super` means: (module, brace depth
    // inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let (t, line) = (&toks[i].0, toks[i].1);
        let mut here_now = here.to_vec();
        here_now.extend(inline.iter().map(|(m, _)| m.clone()));
        let here = here_now.as_slice();
        let in_tests = inline.iter().any(|(m, _)| m == "tests");
        let before = f.paths.len();
        match t {
            Tok::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(w)
                if w == "mod"
                    && matches!(toks.get(i + 1).map(|t| &t.0), Some(Tok::Ident(_)))
                    && toks.get(i + 2).map(|t| &t.0) == Some(&Tok::Punct('{')) =>
            {
                if let Some(Tok::Ident(name)) = toks.get(i + 1).map(|t| &t.0) {
                    depth += 1;
                    inline.push((name.clone(), depth));
                }
                i += 3;
            }
            Tok::Ident(w) if w == "unsafe" => {
                f.unsafe_lines.push(line);
                i += 1;
            }
            Tok::Ident(w) if w == "use" => {
                let (paths, j) = use_tree(&toks, i + 1, &[]);
                for p in paths {
                    if let Some(m) = resolve(here, &p) {
                        f.paths.push((m, line));
                    }
                }
                i = j.max(i + 1);
            }
            Tok::Ident(w) if w == "crate" || w == "super" => {
                // `$crate` in a macro is the macro's crate, not a path of this file.
                let dollar = i > 0 && toks[i - 1].0 == Tok::Punct('$');
                let after_path = i > 0 && toks[i - 1].0 == Tok::Path;
                if dollar || after_path || toks.get(i + 1).map(|t| &t.0) != Some(&Tok::Path) {
                    i += 1;
                    continue;
                }
                let mut p = vec![w.clone()];
                let mut j = i + 1;
                while toks.get(j).map(|t| &t.0) == Some(&Tok::Path) {
                    match toks.get(j + 1).map(|t| &t.0) {
                        Some(Tok::Ident(s)) => {
                            p.push(s.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                // `pub(crate)`, `pub(super)` have no `::` and were skipped above; a macro
                // (`crate::refuse!`) lives at the crate root.
                let is_macro = toks.get(j).map(|t| &t.0) == Some(&Tok::Punct('!'));
                if let Some(m) = resolve(here, &p).filter(|_| !is_macro) {
                    f.paths.push((m, line));
                }
                i = j;
            }
            _ => i += 1,
        }
        if in_tests {
            let new: Vec<usize> = f.paths[before..].iter().map(|(_, l)| *l).collect();
            f.test_lines.extend(new);
        }
    }
    f
}

/// The facts of every file of `src`, by path relative to it.
fn scan_tree(src: &Path) -> Result<BTreeMap<PathBuf, FileFacts>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(src)?.to_path_buf();
                if rel == Path::new("main.rs") {
                    continue; // the binary: it uses the library as `cr::`, from outside
                }
                let text =
                    std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
                out.insert(rel.clone(), scan(&module_of(&rel), &text));
            }
        }
    }
    Ok(out)
}

/// What the layering check found.
#[derive(Debug, Default)]
pub struct Report {
    pub edges: Vec<Edge>,
    /// `unsafe` outside kernel/ and bpf/: (file, line).
    pub stray_unsafe: Vec<(String, usize)>,
    pub unsafe_total: usize,
    /// Cycles between top-level modules (each an SCC, sorted).
    pub cycles: Vec<Vec<String>>,
    /// The same between files, test code aside (for the record; not a failure).
    pub file_cycles: Vec<Vec<String>>,
    pub problems: Vec<String>,
}

/// Strongly connected components with more than one module.
pub fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for (a, b) in edges {
                if *a == n && seen.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
        seen
    };
    let r: BTreeMap<&String, BTreeSet<String>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for n in &nodes {
        if !r[n].contains(*n) {
            continue;
        }
        let mut scc: Vec<String> = nodes
            .iter()
            .filter(|m| r[n].contains(**m) && r[*m].contains(*n))
            .map(|m| (*m).clone())
            .collect();
        scc.sort();
        if scc.len() > 1 && !out.contains(&scc) {
            out.push(scc);
        }
    }
    out
}

/// Runs the layering check on the crate sources in `src` (cr-user/src).
pub fn check_layers(src: &Path) -> Result<Report> {
    let facts = scan_tree(src)?;
    let mut rep = Report::default();
    let mut graph = BTreeSet::new();
    for (rel, f) in &facts {
        let from = module_of(rel).first().cloned().unwrap_or_default();
        let file = rel.display().to_string();
        rep.unsafe_total += f.unsafe_lines.len();
        if !UNSAFE_OK.contains(&from.as_str()) {
            rep.stray_unsafe
                .extend(f.unsafe_lines.iter().map(|l| (file.clone(), *l)));
        }
        if from.is_empty() {
            continue; // lib.rs: declares the modules
        }
        for (path, line) in &f.paths {
            let Some(to) = path.first() else { continue };
            if *to == from {
                continue;
            }
            graph.insert((from.clone(), to.clone()));
            rep.edges.push(Edge {
                from: from.clone(),
                to: to.clone(),
                file: file.clone(),
                line: *line,
            });
        }
    }
    let mut unknown = BTreeSet::new();
    for e in &rep.edges {
        for m in [&e.from, &e.to] {
            if layer_of(m).is_none() && unknown.insert(m.clone()) {
                rep.problems.push(format!(
                    "module `{m}` has no layer: add it to MODULES in xtask/src/lint.rs"
                ));
            }
        }
        if let (Some(a), Some(b)) = (layer_of(&e.from), layer_of(&e.to)) {
            if !allowed(a, b) {
                rep.problems.push(format!(
                    "{}:{}: `{}` ({a:?}) must not import `{}` ({b:?})",
                    e.file, e.line, e.from, e.to
                ));
            }
        }
    }
    rep.cycles = cycles(&graph);
    // The same at the level of files (a path names the deepest file module it reaches).
    let files: BTreeSet<Vec<String>> = facts.keys().map(|r| module_of(r)).collect();
    let mut file_graph = BTreeSet::new();
    for (rel, f) in &facts {
        let from = module_of(rel);
        for (path, line) in &f.paths {
            if f.test_lines.contains(line) {
                continue;
            }
            let to = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| files.contains(p))
                .unwrap_or_default();
            if to != from && !to.is_empty() && !from.is_empty() {
                file_graph.insert((from.join("::"), to.join("::")));
            }
        }
    }
    rep.file_cycles = cycles(&file_graph);
    for c in &rep.cycles {
        let example: Vec<String> = rep
            .edges
            .iter()
            .filter(|e| c.contains(&e.from) && c.contains(&e.to))
            .map(|e| format!("{} -> {} ({}:{})", e.from, e.to, e.file, e.line))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .take(6)
            .collect();
        rep.problems.push(format!(
            "import cycle between {}: {}",
            c.join(", "),
            example.join("; ")
        ));
    }
    for (file, line) in &rep.stray_unsafe {
        rep.problems.push(format!(
            "{file}:{line}: `unsafe` outside kernel/ and bpf/ (put a safe wrapper in kernel/)"
        ));
    }
    Ok(rep)
}

/// `cargo xtask lint`.
pub fn run(root: &Path, report: bool) -> Result<()> {
    let src = root.join("cr-user/src");
    let rep = check_layers(&src)?;
    if report {
        let graph: BTreeSet<(&String, &String)> =
            rep.edges.iter().map(|e| (&e.from, &e.to)).collect();
        println!("edges between top-level modules:");
        for (a, b) in graph {
            println!("  {a} -> {b}");
        }
        println!(
            "unsafe: {} in all, {} outside kernel/ and bpf/",
            rep.unsafe_total,
            rep.stray_unsafe.len()
        );
        println!("import cycles between top-level modules: {:?}", rep.cycles);
        println!("import cycles between files: {:?}", rep.file_cycles);
    }
    if !rep.problems.is_empty() {
        for p in &rep.problems {
            eprintln!("lint: {p}");
        }
        bail!(
            "the layering check failed ({} problems)",
            rep.problems.len()
        );
    }
    println!(
        "xtask: layering ok ({} edges, {} unsafe, all in kernel/ and bpf/)",
        rep.edges.len(),
        rep.unsafe_total
    );
    if report {
        return Ok(());
    }
    let st = crate::cargo()
        .args(["fmt", "--all", "--check"])
        .status()
        .context("run cargo fmt")?;
    if !st.success() {
        bail!("cargo fmt --check: the tree is not formatted (run cargo fmt)");
    }
    println!("xtask: cargo fmt --check ok");
    let obj = crate::build::ebpf()?;
    let st = crate::cargo()
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("CR_EBPF_OBJECT", &obj)
        .status()
        .context("run cargo clippy")?;
    if !st.success() {
        bail!("cargo clippy --all-targets -- -D warnings failed");
    }
    println!("xtask: clippy ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Vec<String> {
        s.split("::")
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect()
    }

    fn paths(here: &str, src: &str) -> Vec<String> {
        scan(&m(here), src)
            .paths
            .into_iter()
            .map(|(p, _)| p.join("::"))
            .collect()
    }

    #[test]
    fn use_trees_and_inline_paths() {
        let src = r#"
use std::fmt;
use crate::kernel::{self, sys::{pidfd, vm as v}, proc::*};
pub(crate) use super::pipe::Pipe;
use self::inner::X;
fn f() -> crate::image::pb::Fds { let x = crate::tcp::socket::restore(); super::super::bpf::x() }
pub(crate) fn g() {}
pub(super) fn h() {}
"#;
        assert_eq!(
            paths("files::kinds", src),
            [
                "kernel",
                "kernel::sys::pidfd",
                "kernel::sys::vm",
                "kernel::proc",
                "files::pipe::Pipe",
                "files::kinds::inner::X",
                "image::pb::Fds",
                "tcp::socket::restore",
                "bpf::x",
            ]
        );
    }

    #[test]
    fn comments_and_strings_are_no_paths() {
        let src = r####"
// use crate::cmd::dump;
/* crate::cmd /* nested */ crate::cmd */
/// [`crate::cmd::x`] and `unsafe`
fn f<'a>(s: &'a str) -> char {
    let _ = "crate::cmd::y \" unsafe";
    let _ = r#"crate::cmd "unsafe" "#;
    let _ = b"unsafe";
    let c = '"';
    let _ = '\'';
    let _ = crate::image::x;
    'x'
}
"####;
        let f = scan(&m("mem"), src);
        assert_eq!(f.paths, vec![(m("image::x"), 11)], "{:?}", blank(src));
        assert!(f.unsafe_lines.is_empty());
        let f = scan(
            &m("mem"),
            "fn f() {\n  unsafe { g() }\n}\nunsafe impl Send for X {}\n",
        );
        assert_eq!(f.unsafe_lines, vec![2, 4]);
    }

    #[test]
    fn inline_modules_move_super() {
        let src =
            "mod tests {\n use super::super::stat::read; fn f() { if x { } }\n}\nuse super::y;\n";
        assert_eq!(paths("proc::status", src), ["proc::stat::read", "proc::y"]);
    }

    #[test]
    fn macros_and_visibility_are_skipped() {
        let src = "macro_rules! m { () => { $crate::x::y() } }\npub(crate) struct S;\n\
                   fn f() { crate::refuse!(None, \"x\") }\n";
        assert!(paths("tcp", src).is_empty());
    }

    #[test]
    fn module_paths_of_files() {
        assert_eq!(module_of(Path::new("files/pipe.rs")), m("files::pipe"));
        assert_eq!(module_of(Path::new("files/mod.rs")), m("files"));
        assert_eq!(module_of(Path::new("lib.rs")), Vec::<String>::new());
        assert_eq!(
            resolve(&m("files"), &m("super::image::pb")),
            Some(m("image::pb"))
        );
        assert_eq!(resolve(&m("files"), &m("std::fmt")), None);
    }

    #[test]
    fn layer_rules() {
        use Layer::*;
        assert!(allowed(Resource, Kernel) && allowed(Resource, Resource));
        assert!(allowed(Cmd, Resource) && allowed(Cmd, Cli));
        assert!(!allowed(Kernel, Image) && !allowed(Image, Bpf) && !allowed(Bpf, Image));
        assert!(!allowed(Resource, Cmd) && !allowed(Resource, Cli));
        assert!(!allowed(Support, Kernel) && allowed(Kernel, Support));
        assert!(!allowed(Tracker, Resource) && allowed(Tracker, Bpf));
    }

    #[test]
    fn finds_cycles() {
        let e: BTreeSet<(String, String)> = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
            .iter()
            .map(|(x, y)| (x.to_string(), y.to_string()))
            .collect();
        assert_eq!(
            cycles(&e),
            vec![vec!["a".to_string(), "b".into(), "c".into()]]
        );
    }
}
