//! Plain-text tables: a row is one line, each cell padded to its column's width.

/// A column of a table: its width, and whether its cells are right-aligned (numbers).
#[derive(Debug, Clone, Copy)]
pub struct Col {
    width: usize,
    right: bool,
}

/// A left-aligned column (names, ids).
pub const fn left(width: usize) -> Col {
    Col {
        width,
        right: false,
    }
}

/// A right-aligned column (numbers).
pub const fn right(width: usize) -> Col {
    Col { width, right: true }
}

/// One row: cell `i` padded to column `i`, the cells separated by one space.
pub fn line(cols: &[Col], cells: &[&str]) -> String {
    cols.iter()
        .zip(cells)
        .map(|(c, s)| {
            if c.right {
                format!("{s:>w$}", w = c.width)
            } else {
                format!("{s:<w$}", w = c.width)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A number with `digits` decimals.
pub fn num(x: f64, digits: usize) -> String {
    format!("{x:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_padded_like_format_widths() {
        let cols = [left(6), right(8), left(3)];
        assert_eq!(
            line(&cols, &["ab", &num(1.23456, 2), "x"]),
            format!("{:<6} {:>8.2} {:<3}", "ab", 1.23456, "x")
        );
        assert_eq!(line(&cols[..1], &["toolong"]), "toolong");
    }
}
