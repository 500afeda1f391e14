//! What makes the target equal to the source again, row by row.
//!
//! A repair writes the source's row where the target lacks it or holds
//! other values, and removes the target's row where the source has none.
//! It never touches a row that is equal, and never the source. For a table
//! without a key, a row held once too often on the target is removed once,
//! and one held too few times is written once more.

use crate::compare::Difference;
use crate::row::Row;

/// One write to the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Write this source row (the target lacks it).
    Insert(Row),
    /// Write this source row over the target's row under its key.
    Update(Row),
    /// Remove this target row (the source has no such row).
    Delete(Row),
}

impl Fix {
    /// `inserted`, `updated` or `deleted`, for reports.
    pub fn verb(&self) -> &'static str {
        match self {
            Fix::Insert(_) => "inserted",
            Fix::Update(_) => "updated",
            Fix::Delete(_) => "deleted",
        }
    }

    /// The row the fix is about (the source's, or the deleted target's).
    pub fn row(&self) -> &Row {
        match self {
            Fix::Insert(row) | Fix::Update(row) | Fix::Delete(row) => row,
        }
    }
}

/// The fix of one difference.
pub fn fix(difference: Difference) -> Fix {
    match difference {
        Difference::Missing { source } => Fix::Insert(source),
        Difference::Extra { target } => Fix::Delete(target),
        Difference::Changed { source, .. } => Fix::Update(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_difference_has_the_fix_that_undoes_it() {
        let row = |line: &str| Row::parse(line.as_bytes());
        assert_eq!(
            fix(Difference::Missing {
                source: row("1\ta")
            }),
            Fix::Insert(row("1\ta"))
        );
        assert_eq!(
            fix(Difference::Extra {
                target: row("2\tb")
            }),
            Fix::Delete(row("2\tb"))
        );
        let changed = fix(Difference::Changed {
            source: row("3\tsource"),
            target: row("3\ttarget"),
            fields: vec![1],
        });
        assert_eq!(changed, Fix::Update(row("3\tsource")));
        assert_eq!(changed.verb(), "updated");
        assert_eq!(changed.row().value(1).as_deref(), Some("source"));
    }
}
