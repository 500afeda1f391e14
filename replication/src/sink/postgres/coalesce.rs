//! Coalescing a batch's changes per row key: the last write of a key wins,
//! a delete then an insert of a key ends inserted, and a partial row
//! (unchanged TOAST) is merged into the full row before it. Pure: no I/O.

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use super::pipeline::datum_bytes;
use super::target::KeySpec;
use crate::change::{Change, ChangeKind, Datum, Relation, Tuple};
use crate::lsn::Lsn;

/// What to do with one row key at the end of a batch. Rows borrow the
/// batch's changes; only a merge of two partial rows makes a new one.
#[derive(Debug, Clone)]
pub(super) enum RowOp<'a> {
    /// Write a whole row the batch inserted first: on a consistent target
    /// its key is free, so a plain INSERT writes it (an `ON CONFLICT`
    /// costs an index probe and a WAL record more per row).
    Insert(Cow<'a, [Datum]>),
    /// Write a whole row the batch updated under its key: a plain UPDATE
    /// (an upsert locks each row first, another WAL record), which
    /// inserts the row if the target lacks it.
    Update(Cow<'a, [Datum]>),
    /// Write the whole row, whether its key exists or not.
    Upsert(Cow<'a, [Datum]>),
    /// Update only the columns sent (some were unchanged TOAST).
    Patch(Cow<'a, [Datum]>),
    /// Remove the row.
    Delete,
}

/// The final operation on one key of a batch.
#[derive(Debug)]
pub(super) struct RowEntry<'a> {
    /// The key's values, borrowed from the change that first named it.
    pub(super) key: RowKey<'a>,
    pub(super) op: RowOp<'a>,
    pub(super) lsn: Lsn,
    /// The key's hash in `TableBatch::index`.
    hash: u64,
}

/// Coalesced changes of one table, in the order keys first appeared:
/// `rows` in that order, `index` from each key to its entry, so a change
/// costs one hash lookup and copies no value.
#[derive(Debug)]
pub(super) struct TableBatch<'a> {
    pub(super) relation: Arc<Relation>,
    pub(super) key: Vec<usize>,
    pub(super) rows: Vec<RowEntry<'a>>,
    /// The position in `rows` of each key, found by the key's hash. A
    /// table of positions rather than a map from keys: each key is held
    /// once (in its entry) and hashed once, its hash kept in the entry for
    /// when the table grows (rehashing the keys of a growing map was about
    /// a tenth of the daemon's samples in a catch-up, `perf`, apply-100).
    index: HashTable<usize>,
    /// foldhash, seeded per batch: the default SipHash was about a sixth
    /// of the daemon's samples in a catch-up (`perf`, apply-100).
    hasher: foldhash::fast::RandomState,
}

/// A row's key values as the source sent them, borrowed from the change.
pub(super) type RowKey<'a> = Vec<Option<&'a [u8]>>;

/// What the fast path needs of a relation, looked up once per batch and
/// relation instead of once per change.
#[derive(Debug)]
pub(super) struct KnownTable {
    pub(super) relation: Arc<Relation>,
    pub(super) key: KeySpec,
    /// Its changes in the batch, from the first: what its rows come to at
    /// most (a key change adds one), to size its batch at once.
    pub(super) rows: usize,
}

/// Merges a change into the pending batch of its table. `rows_hint`: how
/// many rows a new batch of the table may come to.
pub(super) fn coalesce<'a>(
    pending: &mut Vec<TableBatch<'a>>,
    change: &'a Change,
    relation: &Arc<Relation>,
    key_cols: &[usize],
    rows_hint: usize,
) {
    let (key, op, old_key) = match &change.kind {
        ChangeKind::Insert { new, .. } => (
            key_of(key_cols, new),
            RowOp::Insert(Cow::Borrowed(&new.0[..])),
            None,
        ),
        ChangeKind::Update { old, new, .. } => {
            let key = key_of(key_cols, new);
            let old_key = old
                .as_ref()
                .map(|o| key_of(key_cols, o.tuple()))
                .filter(|k| *k != key);
            let op = if new.0.contains(&Datum::UnchangedToast) {
                RowOp::Patch(Cow::Borrowed(&new.0[..]))
            } else if old_key.is_some() {
                // Moved to a key that another row of the batch may have
                // held until now (keys swapped).
                RowOp::Upsert(Cow::Borrowed(&new.0[..]))
            } else {
                RowOp::Update(Cow::Borrowed(&new.0[..]))
            };
            (key, op, old_key)
        }
        ChangeKind::Delete { old, .. } => (key_of(key_cols, old.tuple()), RowOp::Delete, None),
        ChangeKind::Truncate { .. } | ChangeKind::TruncatePartition(_) | ChangeKind::Ddl(_) => {
            unreachable!("truncates and DDL are barriers")
        }
    };
    let batch = batch_for(pending, relation, key_cols, rows_hint);
    if let Some(old_key) = old_key {
        // A key change: the old key is deleted, the new one written.
        put(batch, old_key, RowOp::Delete, change.lsn);
    }
    put(batch, key, op, change.lsn);
}

/// The pending batch of `relation`, made when it has none yet, sized for
/// `rows_hint` rows: grown by doubling, a batch of thousands of rows is
/// copied again and again (the index's control bytes are written at once,
/// one per slot; the rows' capacity only when used).
pub(super) fn batch_for<'a, 'p>(
    pending: &'p mut Vec<TableBatch<'a>>,
    relation: &Arc<Relation>,
    key_cols: &[usize],
    rows_hint: usize,
) -> &'p mut TableBatch<'a> {
    let index = match pending
        .iter()
        .position(|b| Arc::ptr_eq(&b.relation, relation))
    {
        Some(i) => i,
        None => {
            pending.push(TableBatch {
                relation: relation.clone(),
                key: key_cols.to_vec(),
                rows: Vec::with_capacity(rows_hint),
                index: HashTable::with_capacity(rows_hint),
                hasher: foldhash::fast::RandomState::default(),
            });
            pending.len() - 1
        }
    };
    &mut pending[index]
}

pub(super) fn put<'a>(batch: &mut TableBatch<'a>, key: RowKey<'a>, op: RowOp<'a>, lsn: Lsn) {
    let hash = batch.hasher.hash_one(&key);
    let rows = &batch.rows;
    let found = batch
        .index
        .entry(hash, |&at| rows[at].key == key, |&at| rows[at].hash);
    let at = match found {
        Entry::Vacant(vacant) => {
            vacant.insert(rows.len());
            batch.rows.push(RowEntry { key, op, lsn, hash });
            return;
        }
        Entry::Occupied(occupied) => *occupied.get(),
    };
    let entry = &mut batch.rows[at];
    let before = std::mem::replace(&mut entry.op, RowOp::Delete);
    entry.op = match (before, op) {
        // A partial update on top of a full row in this batch: fill the
        // unchanged columns from that row, which keeps its kind.
        (RowOp::Insert(before), RowOp::Patch(after)) => RowOp::Insert(merge(&before, &after)),
        (RowOp::Update(before), RowOp::Patch(after)) => RowOp::Update(merge(&before, &after)),
        (RowOp::Upsert(before), RowOp::Patch(after)) => RowOp::Upsert(merge(&before, &after)),
        (RowOp::Patch(before), RowOp::Patch(after)) => RowOp::Patch(merge(&before, &after)),
        // Inserted in this batch, then updated: still a new row.
        (RowOp::Insert(_), RowOp::Update(after)) => RowOp::Insert(after),
        (RowOp::Update(_), RowOp::Update(after)) => RowOp::Update(after),
        (RowOp::Upsert(_), RowOp::Update(after)) => RowOp::Upsert(after),
        // Any other full row after an earlier operation on the key (a
        // delete then an insert, say): the key's state before the batch
        // is not known here.
        (_, RowOp::Insert(after) | RowOp::Update(after)) => RowOp::Upsert(after),
        // A partial update of a row deleted earlier in the batch cannot
        // happen on a consistent source; keep the patch so the row-missing
        // check reports it.
        (_, op) => op,
    };
    entry.lsn = lsn;
}

pub(super) fn merge<'a>(before: &[Datum], after: &[Datum]) -> Cow<'a, [Datum]> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| {
            if *a == Datum::UnchangedToast {
                b.clone()
            } else {
                a.clone()
            }
        })
        .collect::<Vec<Datum>>()
        .into()
}

pub(super) fn key_of<'a>(key: &[usize], tuple: &'a Tuple) -> RowKey<'a> {
    key_of_row(key, &tuple.0)
}

pub(super) fn key_of_row<'a>(key: &[usize], row: &'a [Datum]) -> RowKey<'a> {
    key.iter()
        .map(|i| row.get(*i).and_then(datum_bytes).map(|b| &b[..]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::catalog::TableName;
    use crate::change::{OldRow, RelationColumn};

    fn relation() -> Arc<Relation> {
        let column = |name: &str, key: bool| RelationColumn {
            name: name.to_owned(),
            type_oid: 25,
            type_modifier: -1,
            key,
        };
        Arc::new(Relation {
            oid: 16_400,
            name: TableName::new("public", "t"),
            replica_identity: 'd',
            columns: vec![
                column("id", true),
                column("v", false),
                column("body", false),
            ],
        })
    }

    fn text(value: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    /// A row; `body: None` is an unchanged TOAST value.
    fn row(id: &str, v: &str, body: Option<&str>) -> Tuple {
        Tuple(vec![
            text(id),
            text(v),
            body.map_or(Datum::UnchangedToast, text),
        ])
    }

    fn key(id: &str) -> Tuple {
        Tuple(vec![text(id), Datum::Null, Datum::Null])
    }

    fn change(lsn: u64, kind: ChangeKind) -> Change {
        Change {
            xid: 1,
            subxid: 1,
            commit_lsn: None,
            lsn: Lsn::from_u64(lsn),
            ordinal: lsn,
            origin: None,
            kind,
        }
    }

    fn insert(r: &Arc<Relation>, lsn: u64, new: Tuple) -> Change {
        change(
            lsn,
            ChangeKind::Insert {
                relation: r.clone(),
                new,
            },
        )
    }

    fn update(r: &Arc<Relation>, lsn: u64, old: Option<Tuple>, new: Tuple) -> Change {
        change(
            lsn,
            ChangeKind::Update {
                relation: r.clone(),
                old: old.map(OldRow::Key),
                new,
            },
        )
    }

    fn delete(r: &Arc<Relation>, lsn: u64, old: Tuple) -> Change {
        change(
            lsn,
            ChangeKind::Delete {
                relation: r.clone(),
                old: OldRow::Key(old),
            },
        )
    }

    /// The batch as (key, final operation) in first-seen key order.
    fn coalesced(changes: &[Change]) -> Vec<(String, String)> {
        let mut pending = Vec::new();
        for c in changes {
            let relation = match &c.kind {
                ChangeKind::Insert { relation, .. }
                | ChangeKind::Update { relation, .. }
                | ChangeKind::Delete { relation, .. } => relation,
                ChangeKind::Truncate { .. }
                | ChangeKind::TruncatePartition(_)
                | ChangeKind::Ddl(_) => unreachable!(),
            };
            coalesce(&mut pending, c, relation, &[0], 0);
        }
        let show = |d: &Datum| match d {
            Datum::Text(b) => String::from_utf8_lossy(b).into_owned(),
            Datum::UnchangedToast => "(unchanged)".to_owned(),
            Datum::Null => "NULL".to_owned(),
            Datum::Binary(_) => "(binary)".to_owned(),
        };
        let batch = &pending[0];
        batch
            .rows
            .iter()
            .filter_map(|entry| {
                let id = String::from_utf8_lossy(entry.key[0]?).into_owned();
                let op = match &entry.op {
                    RowOp::Upsert(d) => format!(
                        "upsert {}",
                        d.iter().map(show).collect::<Vec<_>>().join(",")
                    ),
                    RowOp::Insert(d) => format!(
                        "insert {}",
                        d.iter().map(show).collect::<Vec<_>>().join(",")
                    ),
                    RowOp::Update(d) => format!(
                        "update {}",
                        d.iter().map(show).collect::<Vec<_>>().join(",")
                    ),
                    RowOp::Patch(d) => {
                        format!("patch {}", d.iter().map(show).collect::<Vec<_>>().join(","))
                    }
                    RowOp::Delete => "delete".to_owned(),
                };
                Some((id, op))
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, o)| ((*k).to_owned(), (*o).to_owned()))
            .collect()
    }

    #[test]
    fn keys_are_found_again_after_the_index_grew() {
        // Sized for no rows: the index grows many times under these
        // inserts, and every key must still be found by its update.
        let r = relation();
        let ids: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let mut changes: Vec<Change> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| insert(&r, i as u64, row(id, "a", Some("x"))))
            .collect();
        changes.extend(
            ids.iter()
                .enumerate()
                .map(|(i, id)| update(&r, 1000 + i as u64, None, row(id, "b", Some("y")))),
        );
        let got = coalesced(&changes);
        let expected: Vec<(String, String)> = ids
            .iter()
            .map(|id| (id.clone(), format!("insert {id},b,y")))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_key_changed_twice_ends_with_its_last_value() {
        let r = relation();
        let got = coalesced(&[
            insert(&r, 1, row("1", "a", Some("x"))),
            update(&r, 2, None, row("1", "b", Some("x"))),
            update(&r, 3, None, row("1", "c", Some("y"))),
        ]);
        assert_eq!(got, pairs(&[("1", "insert 1,c,y")]));
        // Updated only: an update; moved to another key: an upsert there.
        let got = coalesced(&[
            update(&r, 1, None, row("2", "b", Some("x"))),
            update(&r, 2, None, row("2", "c", Some("x"))),
            update(&r, 3, Some(key("3")), row("4", "d", Some("x"))),
        ]);
        assert_eq!(
            got,
            pairs(&[
                ("2", "update 2,c,x"),
                ("3", "delete"),
                ("4", "upsert 4,d,x")
            ])
        );
    }

    #[test]
    fn a_key_deleted_and_inserted_again_ends_inserted_and_the_reverse_ends_deleted() {
        let r = relation();
        let got = coalesced(&[
            delete(&r, 1, key("1")),
            insert(&r, 2, row("1", "again", Some("x"))),
            insert(&r, 3, row("2", "short-lived", Some("x"))),
            delete(&r, 4, key("2")),
        ]);
        assert_eq!(got, pairs(&[("1", "upsert 1,again,x"), ("2", "delete")]));
    }

    #[test]
    fn a_key_update_deletes_the_old_key_and_writes_the_new() {
        let r = relation();
        let got = coalesced(&[
            insert(&r, 1, row("1", "a", Some("x"))),
            update(&r, 2, Some(key("1")), row("5", "a", Some("x"))),
        ]);
        assert_eq!(got, pairs(&[("1", "delete"), ("5", "upsert 5,a,x")]));
        // A key deleted, then inserted or updated again: an upsert.
        let got = coalesced(&[
            delete(&r, 1, key("7")),
            update(&r, 2, None, row("7", "b", Some("x"))),
        ]);
        assert_eq!(got, pairs(&[("7", "upsert 7,b,x")]));
    }

    #[test]
    fn an_unchanged_toast_value_is_filled_from_the_batch_or_left_alone() {
        let r = relation();
        // After a full row in the same batch: the value is known.
        let got = coalesced(&[
            insert(&r, 1, row("1", "a", Some("big"))),
            update(&r, 2, None, row("1", "b", None)),
        ]);
        assert_eq!(got, pairs(&[("1", "insert 1,b,big")]));
        // Without one: a patch that leaves the column as it is on the target,
        // two patches merged.
        let got = coalesced(&[
            update(&r, 1, None, row("2", "b", None)),
            update(&r, 2, None, row("2", "c", None)),
        ]);
        assert_eq!(got, pairs(&[("2", "patch 2,c,(unchanged)")]));
    }
}
