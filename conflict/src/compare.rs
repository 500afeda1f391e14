//! The merge of two sides' rows into differences.
//!
//! Both servers return a table's rows ordered by its key (the fields
//! [`Layout::key`] names, first in each row), and [`Merge`] walks the two
//! orders side by side, as a merge join: a key on the source only is
//! missing on the target, a key on the target only is extra there, and a
//! key on both with another field differing is changed, with the fields
//! named. A table without a key is compared as a multiset: every field is
//! part of the key, so equal rows pair off one by one and a row held twice
//! on one side and once on the other shows as one missing or extra copy.
//!
//! The order the daemon asks the servers for must be the order
//! [`compare_keys`] computes: integers by value, everything else by its
//! bytes (`COLLATE "C"` on both servers, whatever their own collation), and
//! NULL after every value (`NULLS LAST`, PostgreSQL's default).

use std::cmp::Ordering;
use std::collections::VecDeque;

use crate::row::{Row, unescape};

/// How one key field is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// An integer column (`smallint`, `integer`, `bigint`): by value.
    Integer,
    /// Anything else, read as text: by its bytes, as `COLLATE "C"` orders.
    Bytes,
}

/// Which fields of a row are its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The kinds of the first `key.len()` fields, which form the key.
    pub key: Vec<KeyKind>,
    /// The names of every field, for reports.
    pub names: Vec<String>,
}

impl Layout {
    /// A keyed table: `key` kinds for its first fields, then the others.
    pub fn keyed(key: Vec<KeyKind>, names: Vec<String>) -> Layout {
        Layout { key, names }
    }

    /// A table without a key: compared as a multiset of whole rows.
    pub fn keyless(names: Vec<String>) -> Layout {
        Layout {
            key: vec![KeyKind::Bytes; names.len()],
            names,
        }
    }

    /// Whether rows are matched on their whole value.
    pub fn is_keyless(&self) -> bool {
        self.key.len() == self.names.len()
    }
}

/// One of the two servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source: what the target must hold.
    Source,
    /// The target.
    Target,
}

/// A row that is not the same on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    /// On the source only.
    Missing {
        /// The source's row.
        source: Row,
    },
    /// On the target only.
    Extra {
        /// The target's row.
        target: Row,
    },
    /// Under one key on both, with other values.
    Changed {
        /// The source's row.
        source: Row,
        /// The target's row.
        target: Row,
        /// The indexes of the fields that differ.
        fields: Vec<usize>,
    },
}

/// What a comparison found, in counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Rows read from the source.
    pub source_rows: u64,
    /// Rows read from the target.
    pub target_rows: u64,
    /// Rows equal on both sides.
    pub equal: u64,
    /// Rows on the source only.
    pub missing: u64,
    /// Rows on the target only.
    pub extra: u64,
    /// Keys on both sides with other values.
    pub changed: u64,
}

impl Tally {
    /// Rows that differ, whichever way.
    pub fn differing(&self) -> u64 {
        self.missing + self.extra + self.changed
    }

    /// Adds another tally (of another chunk or table).
    pub fn merge(&mut self, other: &Tally) {
        self.source_rows += other.source_rows;
        self.target_rows += other.target_rows;
        self.equal += other.equal;
        self.missing += other.missing;
        self.extra += other.extra;
        self.changed += other.changed;
    }
}

/// Compares two rows' keys as the servers ordered them.
pub fn compare_keys(layout: &Layout, a: &Row, b: &Row) -> Ordering {
    for (i, kind) in layout.key.iter().enumerate() {
        let ordering = match (a.field(i), b.field(i)) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => compare_field(*kind, x, y),
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    Ordering::Equal
}

fn compare_field(kind: KeyKind, a: &[u8], b: &[u8]) -> Ordering {
    if kind == KeyKind::Integer
        && let (Some(x), Some(y)) = (integer(a), integer(b))
    {
        return x.cmp(&y);
    }
    // The servers order the values, not their escaped text: a tab sorts
    // before a letter, its escape `\t` after.
    if a.contains(&b'\\') || b.contains(&b'\\') {
        unescape(a).cmp(&unescape(b))
    } else {
        a.cmp(b)
    }
}

fn integer(bytes: &[u8]) -> Option<i128> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// The merge of one table's (or chunk's) rows from both sides.
///
/// Rows are pushed as they are read; [`Merge::wants`] says which side to
/// read next, so that neither side runs far ahead and memory stays at a
/// few rows. Differences accumulate until taken with [`Merge::take`].
#[derive(Debug)]
pub struct Merge {
    layout: Layout,
    source: VecDeque<Row>,
    target: VecDeque<Row>,
    source_done: bool,
    target_done: bool,
    tally: Tally,
    differences: Vec<Difference>,
}

impl Merge {
    /// A merge of rows laid out as `layout`.
    pub fn new(layout: Layout) -> Merge {
        Merge {
            layout,
            source: VecDeque::new(),
            target: VecDeque::new(),
            source_done: false,
            target_done: false,
            tally: Tally::default(),
            differences: Vec::new(),
        }
    }

    /// The layout compared.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A row read from `side`, in its key order.
    pub fn push(&mut self, side: Side, row: Row) {
        match side {
            Side::Source => {
                self.tally.source_rows += 1;
                self.source.push_back(row);
            }
            Side::Target => {
                self.tally.target_rows += 1;
                self.target.push_back(row);
            }
        }
        self.advance();
    }

    /// `side` has no more rows.
    pub fn finish(&mut self, side: Side) {
        match side {
            Side::Source => self.source_done = true,
            Side::Target => self.target_done = true,
        }
        self.advance();
    }

    /// The side to read from next, or `None` when both are done.
    pub fn wants(&self) -> Option<Side> {
        match (self.source_done, self.target_done) {
            (true, true) => None,
            (false, true) => Some(Side::Source),
            (true, false) => Some(Side::Target),
            (false, false) if self.source.is_empty() => Some(Side::Source),
            (false, false) => Some(Side::Target),
        }
    }

    /// The counts so far.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// Whether every row pushed so far is resolved (equal or taken as a
    /// difference) and none waits for the other side. After a push, this
    /// holds only when the row just pushed matched the other side's, so
    /// that both sides have been read exactly up to one key: a place to
    /// resume from.
    pub fn is_idle(&self) -> bool {
        self.source.is_empty() && self.target.is_empty() && self.differences.is_empty()
    }

    /// The differences found since the last call.
    pub fn take(&mut self) -> Vec<Difference> {
        std::mem::take(&mut self.differences)
    }

    fn advance(&mut self) {
        loop {
            match (self.source.front(), self.target.front()) {
                (Some(source), Some(target)) => match compare_keys(&self.layout, source, target) {
                    Ordering::Less => self.missing(),
                    Ordering::Greater => self.extra(),
                    Ordering::Equal => {
                        let (Some(source), Some(target)) =
                            (self.source.pop_front(), self.target.pop_front())
                        else {
                            return;
                        };
                        let fields: Vec<usize> = (self.layout.key.len()..source.len())
                            .filter(|i| *i >= target.len() || source.field(*i) != target.field(*i))
                            .collect();
                        if fields.is_empty() && source.len() == target.len() {
                            self.tally.equal += 1;
                        } else {
                            self.tally.changed += 1;
                            self.differences.push(Difference::Changed {
                                source,
                                target,
                                fields,
                            });
                        }
                    }
                },
                (Some(_), None) if self.target_done => self.missing(),
                (None, Some(_)) if self.source_done => self.extra(),
                _ => return,
            }
        }
    }

    fn missing(&mut self) {
        if let Some(source) = self.source.pop_front() {
            self.tally.missing += 1;
            self.differences.push(Difference::Missing { source });
        }
    }

    fn extra(&mut self) {
        if let Some(target) = self.target.pop_front() {
            self.tally.extra += 1;
            self.differences.push(Difference::Extra { target });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(lines: &[&str]) -> Vec<Row> {
        lines.iter().map(|l| Row::parse(l.as_bytes())).collect()
    }

    /// Feeds both sides the way the daemon does (following `wants`).
    fn run(layout: Layout, source: &[&str], target: &[&str]) -> (Tally, Vec<Difference>) {
        let mut merge = Merge::new(layout);
        let mut source = rows(source).into_iter();
        let mut target = rows(target).into_iter();
        while let Some(side) = merge.wants() {
            let next = match side {
                Side::Source => source.next(),
                Side::Target => target.next(),
            };
            match next {
                Some(row) => merge.push(side, row),
                None => merge.finish(side),
            }
        }
        (merge.tally(), merge.take())
    }

    fn keyed() -> Layout {
        Layout::keyed(
            vec![KeyKind::Integer],
            vec!["id".into(), "a".into(), "b".into()],
        )
    }

    #[test]
    fn the_merge_is_idle_only_where_both_sides_were_read_up_to_one_key() {
        let mut merge = Merge::new(keyed());
        let row = |line: &str| Row::parse(line.as_bytes());
        merge.push(Side::Source, row("1\tx\ty"));
        assert!(!merge.is_idle(), "the source's 1 waits for the target");
        merge.push(Side::Target, row("1\tx\ty"));
        assert!(merge.is_idle(), "both read up to 1");
        merge.push(Side::Source, row("3\tx\ty"));
        merge.push(Side::Target, row("2\tx\ty"));
        assert!(!merge.is_idle(), "2 is extra but 3 waits");
        assert_eq!(merge.take().len(), 1);
        assert!(!merge.is_idle(), "3 still waits");
        merge.push(Side::Target, row("3\tz\ty"));
        assert!(!merge.is_idle(), "a difference not yet taken");
        assert_eq!(merge.take().len(), 1);
        assert!(merge.is_idle());
    }

    #[test]
    fn missing_extra_and_changed_rows_are_found_with_their_fields() {
        let (tally, differences) = run(
            keyed(),
            &["1\tx\ty", "2\tx\ty", "9\tx\ty", "10\tx\ty"],
            &["1\tx\ty", "3\tx\ty", "9\tx\t\\N", "10\tx\ty"],
        );
        assert_eq!(
            tally,
            Tally {
                source_rows: 4,
                target_rows: 4,
                equal: 2,
                missing: 1,
                extra: 1,
                changed: 1,
            }
        );
        assert!(
            matches!(&differences[0], Difference::Missing { source } if source.value(0).as_deref() == Some("2"))
        );
        assert!(
            matches!(&differences[1], Difference::Extra { target } if target.value(0).as_deref() == Some("3"))
        );
        assert!(
            matches!(&differences[2], Difference::Changed { fields, .. } if fields == &vec![2])
        );
    }

    #[test]
    fn integer_keys_compare_by_value_not_by_text() {
        // "10" sorts before "9" as text; the servers sent 9 first.
        let (tally, differences) = run(keyed(), &["9\ta\tb", "10\ta\tb"], &["9\ta\tb", "10\ta\tb"]);
        assert_eq!(tally.equal, 2);
        assert!(differences.is_empty());
    }

    #[test]
    fn one_side_empty_makes_every_row_a_difference() {
        let (tally, _) = run(keyed(), &["1\ta\tb", "2\ta\tb"], &[]);
        assert_eq!((tally.missing, tally.extra), (2, 0));
        let (tally, _) = run(keyed(), &[], &["1\ta\tb"]);
        assert_eq!((tally.missing, tally.extra), (0, 1));
    }

    #[test]
    fn keyless_rows_pair_off_as_a_multiset() {
        let layout = Layout::keyless(vec!["a".into(), "b".into()]);
        let (tally, differences) = run(
            layout,
            &["a\t1", "a\t1", "a\t1", "b\t\\N"],
            &["a\t1", "a\t1", "b\t\\N", "c\t2"],
        );
        assert_eq!(tally.equal, 3);
        assert_eq!((tally.missing, tally.extra, tally.changed), (1, 1, 0));
        assert!(
            matches!(&differences[0], Difference::Missing { source } if source.value(0).as_deref() == Some("a"))
        );
        assert!(
            matches!(&differences[1], Difference::Extra { target } if target.value(0).as_deref() == Some("c"))
        );
    }

    #[test]
    fn text_keys_are_ordered_by_their_values_bytes_and_null_last() {
        let layout = Layout::keyed(vec![KeyKind::Bytes], vec!["k".into(), "v".into()]);
        let a = Row::parse(b"a\\tb\t1");
        let b = Row::parse(b"aa\t1");
        // A tab (0x09) sorts before 'a'; its escape would not.
        assert_eq!(compare_keys(&layout, &a, &b), Ordering::Less);
        let null = Row::parse(b"\\N\t1");
        assert_eq!(compare_keys(&layout, &null, &b), Ordering::Greater);
        assert_eq!(compare_keys(&layout, &b, &b.clone()), Ordering::Equal);
    }

    #[test]
    fn tallies_add_up() {
        let mut total = Tally::default();
        let (a, _) = run(keyed(), &["1\ta\tb"], &["2\ta\tb"]);
        total.merge(&a);
        total.merge(&a);
        assert_eq!(total.differing(), 4);
        assert_eq!(total.source_rows, 2);
    }
}
