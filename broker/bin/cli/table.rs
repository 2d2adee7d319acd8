//! Plain-text tables for the admin CLI: columns sized to their widest cell, numbers
//! right-aligned, no colour (output is often piped).

use std::fmt::Write as _;

/// A table under construction.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers; a header starting with `>` is right-aligned
    /// (the `>` is not printed).
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table as text, one line per row after the header line.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (i, c) in cells.enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let pad = widths[i].saturating_sub(c.chars().count());
                if self.right[i] {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(c);
                } else {
                    text.push_str(c);
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            let _ = writeln!(out, "{}", text.trim_end());
        };
        line(&mut self.headers.iter().copied());
        for row in &self.rows {
            line(&mut row.iter().map(String::as_str));
        }
        out
    }
}

/// A count with thousands separators: `1234567` -> `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A duration in ms as a short human figure: `850ms`, `12.3s`, `4m05s`, `2h10m`.
pub fn age(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

/// A rate with one decimal.
pub fn rate(r: f64) -> String {
    format!("{r:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_numbers() {
        let mut t = Table::new(&["NAME", ">COUNT"]);
        t.row(vec!["a".into(), "5".into()]);
        t.row(vec!["longer".into(), "1,000".into()]);
        assert_eq!(t.render(), "NAME    COUNT\na           5\nlonger  1,000\n");
    }

    #[test]
    fn formats_counts_and_ages() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_340), "12.3s");
        assert_eq!(age(245_000), "4m05s");
        assert_eq!(age(7_800_000), "2h10m");
    }
}
