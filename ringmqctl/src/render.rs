//! Turns API answers into what an operator reads at a terminal: aligned
//! tables and `key: value` blocks, times in UTC.

/// A table with a header row; columns are as wide as their widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: &[String]| -> String {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            padded.join("  ").trim_end().to_owned() + "\n"
        };
        let mut out = line(&self.header);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        if self.rows.is_empty() {
            out.push_str("(none)\n");
        }
        out
    }
}

/// A value as a table cell: strings bare, absent values as `-`, rates
/// with one decimal.
pub trait Cell {
    fn cell(&self) -> String;
}

impl Cell for str {
    fn cell(&self) -> String {
        self.to_owned()
    }
}

impl Cell for String {
    fn cell(&self) -> String {
        self.clone()
    }
}

impl Cell for f64 {
    fn cell(&self) -> String {
        format!("{self:.1}")
    }
}

macro_rules! display_cells {
    ($($t:ty),*) => { $(impl Cell for $t {
        fn cell(&self) -> String {
            self.to_string()
        }
    })* };
}
display_cells!(u8, i32, i64, u64, usize, bool);

impl<T: Cell> Cell for Option<T> {
    fn cell(&self) -> String {
        self.as_ref().map_or_else(|| "-".to_owned(), Cell::cell)
    }
}

/// `v` as a table cell.
pub fn cell(v: &(impl Cell + ?Sized)) -> String {
    v.cell()
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time(ms: impl Into<Option<u64>>) -> String {
    let Some(ms) = ms.into() else {
        return "-".to_owned();
    };
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `key: value` lines, keys aligned.
pub fn block(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$} {v}\n", format!("{k}:")))
        .collect()
}

/// The "nodes that did not answer" warning of a cluster-wide answer.
pub fn missing(nodes: &[String]) -> String {
    if nodes.is_empty() {
        return String::new();
    }
    format!(
        "warning: no answer from {}; their part is missing\n",
        nodes.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_795_305_600_000), "2026-11-22 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn cells_show_absent_values_as_a_dash_and_rates_with_one_decimal() {
        assert_eq!(cell(&None::<u64>), "-");
        assert_eq!(cell(&Some(3_u64)), "3");
        assert_eq!(cell(&2.25_f64), "2.2");
        assert_eq!(cell("x"), "x");
        assert_eq!(missing(&[]), "");
        assert_eq!(
            missing(&["n1".into(), "n2".into()]),
            "warning: no answer from n1, n2; their part is missing\n"
        );
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["NAME", "N"]);
        t.row(vec!["a".into(), "1000".into()]);
        t.row(vec!["longer".into(), "2".into()]);
        assert_eq!(t.render(), "NAME    N\na       1000\nlonger  2\n");
        assert_eq!(Table::new(&["X"]).render(), "X\n(none)\n");
    }
}
