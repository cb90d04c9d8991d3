//! Aligned text tables for the human views of `cr show` and `--display-stats`.

/// A table: a header row (optional), then rows of cells; columns padded to their widest cell,
/// two spaces apart, numbers right-aligned where the column says so.
pub struct Table {
    head: Option<Vec<String>>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers; a header written `>NAME` is right-aligned (numbers).
    pub fn new(cols: &[&str]) -> Table {
        Table {
            head: Some(
                cols.iter()
                    .map(|c| c.trim_start_matches('>').to_string())
                    .collect(),
            ),
            right: cols.iter().map(|c| c.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// A table without a header row; `right[i]`: column i is right-aligned.
    pub fn headless(right: &[bool]) -> Table {
        Table {
            head: None,
            right: right.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The text, each line indented by `indent` spaces and ended by a newline.
    pub fn render(&self, indent: usize) -> String {
        let all: Vec<&Vec<String>> = self.head.iter().chain(self.rows.iter()).collect();
        let ncols = all.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut width = vec![0usize; ncols];
        for r in &all {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &all {
            let mut line = " ".repeat(indent);
            for (i, c) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(width[i] - c.chars().count());
                if self.right.get(i).copied().unwrap_or(false) {
                    line.push_str(&pad);
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    line.push_str(&pad);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Milliseconds with a fixed precision, from microseconds.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1e3)
}

/// A size in bytes the way people read it (B, KiB, MiB, GiB), one decimal above bytes.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let mut t = Table::new(&[">PID", "COMM"]);
        t.row(["1", "init"]);
        t.row(["12345", "a"]);
        assert_eq!(t.render(0), "  PID  COMM\n    1  init\n12345  a\n");
        let mut t = Table::headless(&[false, true]);
        t.row(["Frozen time", "1.00 ms"]);
        t.row(["Pages", "7"]);
        assert_eq!(
            t.render(2),
            "  Frozen time  1.00 ms\n  Pages              7\n"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(size(10), "10 B");
        assert_eq!(size(4096), "4.0 KiB");
        assert_eq!(size(3 << 20), "3.0 MiB");
        assert_eq!(size(5 << 30), "5.0 GiB");
        assert_eq!(ms(1500), "1.50 ms");
    }
}
