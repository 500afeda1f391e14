//! Committed transactions from decoded events.
//!
//! A transaction is held in memory until its commit, or moved to a spill
//! file when it grows past `apply.spill_bytes`; a streamed transaction
//! (protocol v2) goes to its own spill file block by block and is kept or
//! discarded at its Stream Commit or Stream Abort. Only committed
//! transactions leave, in commit order, so the applier never sees a change
//! that might still abort.
//!
//! cutover's own events on the source arrive as inserts into
//! `cutover.events` (see [`cutover_replication::events`]): each one stands
//! for the change it records, at its place in its transaction.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;

use cutover_replication::Lsn;
use cutover_replication::change::{Change, ChangeKind, SourceTransaction};
use cutover_replication::events;
use cutover_replication::pgoutput::Event;
use cutover_replication::spill::SpillWriter;

use super::RunError;
use super::queue::{Pending, approximate_size};

/// The transactions being assembled by one reader.
#[derive(Debug)]
pub(super) struct Assembly {
    spill_dir: PathBuf,
    /// A transaction bigger than this in memory goes to disk.
    spill_bytes: usize,
    /// The transaction being read, with its approximate size.
    current: Option<(SourceTransaction, usize)>,
    /// The current transaction, once moved to disk.
    big: Option<SpillWriter>,
    /// Streamed transactions not committed yet, by xid.
    streamed: HashMap<u32, SpillWriter>,
    /// The end of the last transaction handed on.
    forwarded: Lsn,
}

fn spill_error(err: impl std::fmt::Display) -> RunError {
    RunError::Spill(err.to_string())
}

impl Assembly {
    /// Nothing assembled yet; everything up to `forwarded` was handed on.
    pub(super) fn new(spill_dir: PathBuf, spill_bytes: usize, forwarded: Lsn) -> Assembly {
        Assembly {
            spill_dir,
            spill_bytes,
            current: None,
            big: None,
            streamed: HashMap::new(),
            forwarded,
        }
    }

    /// The end of the last transaction handed on.
    pub(super) fn forwarded(&self) -> Lsn {
        self.forwarded
    }

    /// Whether a transaction is being assembled (in memory, on disk, or
    /// streamed).
    pub(super) fn in_flight(&self) -> bool {
        self.current.is_some() || self.big.is_some() || !self.streamed.is_empty()
    }

    /// Takes one decoded event; returns the transaction it committed, if
    /// it committed one.
    pub(super) fn take(&mut self, event: Event) -> Result<Option<Pending>, RunError> {
        let event = match event {
            Event::Change(change) => match own_event(change)? {
                Some(change) => Event::Change(change),
                None => return Ok(None),
            },
            other => other,
        };
        match event {
            Event::Begin {
                xid,
                final_lsn,
                commit_time,
            } => {
                let tx = SourceTransaction {
                    xid,
                    commit_lsn: final_lsn,
                    end_lsn: final_lsn,
                    commit_time,
                    changes: Vec::new(),
                };
                self.current = Some((tx, 0));
                Ok(None)
            }
            Event::Change(change) if change.commit_lsn.is_none() => {
                // Part of a streamed transaction: to disk until it commits.
                let writer = match self.streamed.entry(change.xid) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(
                        SpillWriter::create(&self.spill_dir, change.xid).map_err(spill_error)?,
                    ),
                };
                writer.push(&change).map_err(spill_error)?;
                Ok(None)
            }
            Event::Change(change) => {
                if let Some(writer) = self.big.as_mut() {
                    writer.push(&change).map_err(spill_error)?;
                } else if let Some((tx, size)) = self.current.as_mut() {
                    *size += approximate_size(&change);
                    tx.changes.push(change);
                    if *size > self.spill_bytes {
                        // Too big for memory (no server-side streaming):
                        // move it to disk.
                        let mut writer =
                            SpillWriter::create(&self.spill_dir, tx.xid).map_err(spill_error)?;
                        for change in tx.changes.drain(..) {
                            writer.push(&change).map_err(spill_error)?;
                        }
                        self.big = Some(writer);
                    }
                }
                Ok(None)
            }
            Event::Commit(commit) => {
                let Some((mut tx, size)) = self.current.take() else {
                    return Ok(None);
                };
                self.forwarded = commit.end_lsn;
                if let Some(writer) = self.big.take() {
                    let path = writer.finish().map_err(spill_error)?;
                    return Ok(Some(Pending::Spilled(path, commit)));
                }
                tx.end_lsn = commit.end_lsn;
                tx.commit_time = commit.commit_time;
                // A vector grown by doubling holds up to twice its
                // changes' slots (four for a one-row transaction).
                tx.changes.shrink_to_fit();
                Ok(Some(Pending::Memory(tx, size)))
            }
            Event::StreamCommit(commit) => {
                self.forwarded = commit.end_lsn;
                match self.streamed.remove(&commit.xid) {
                    Some(writer) => {
                        let path = writer.finish().map_err(spill_error)?;
                        Ok(Some(Pending::Spilled(path, commit)))
                    }
                    // A streamed transaction without rows in scope: still
                    // record its position.
                    None => Ok(Some(Pending::Memory(
                        SourceTransaction {
                            xid: commit.xid,
                            commit_lsn: commit.commit_lsn,
                            end_lsn: commit.end_lsn,
                            commit_time: commit.commit_time,
                            changes: Vec::new(),
                        },
                        1,
                    ))),
                }
            }
            Event::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    if let Some(writer) = self.streamed.remove(&xid) {
                        writer.discard();
                    }
                } else if let Some(writer) = self.streamed.get_mut(&xid) {
                    writer.abort_subtransaction(subxid).map_err(spill_error)?;
                }
                Ok(None)
            }
            Event::Origin { .. }
            | Event::Relation(_)
            | Event::Type(_)
            | Event::Message(_)
            | Event::StreamStart { .. }
            | Event::StreamStop { .. } => Ok(None),
        }
    }

    /// Removes the spill files of streamed transactions that did not
    /// commit before the reader stopped: the source sends them again.
    pub(super) fn discard(self) {
        for (_, writer) in self.streamed {
            writer.discard();
        }
    }
}

/// A change as the pipeline sees it: an insert into `cutover.events` is
/// the change it records; anything else done to that table is not the
/// application's and is dropped (`None`).
fn own_event(change: Change) -> Result<Option<Change>, RunError> {
    let kind = match &change.kind {
        ChangeKind::Insert { relation, new } if events::is_events(relation) => {
            events::from_row(relation, new, change.lsn)
                .map_err(|e| RunError::Message(e.to_string()))?
        }
        ChangeKind::Insert { relation, .. }
        | ChangeKind::Update { relation, .. }
        | ChangeKind::Delete { relation, .. }
            if events::is_events(relation) =>
        {
            return Ok(None);
        }
        ChangeKind::Truncate {
            relations,
            cascade,
            restart_identity,
        } if relations.iter().any(|r| events::is_events(r)) => {
            let relations: Vec<_> = relations
                .iter()
                .filter(|r| !events::is_events(r))
                .cloned()
                .collect();
            if relations.is_empty() {
                return Ok(None);
            }
            ChangeKind::Truncate {
                relations,
                cascade: *cascade,
                restart_identity: *restart_identity,
            }
        }
        _ => return Ok(Some(change)),
    };
    Ok(Some(Change { kind, ..change }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use cutover_replication::catalog::TableName;
    use cutover_replication::change::{
        Commit, Datum, PgTimestamp, Relation, RelationColumn, Tuple,
    };

    use super::*;

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            name: TableName::new("public", "t"),
            replica_identity: 'd',
            columns: vec![RelationColumn {
                name: "id".into(),
                type_oid: 25,
                type_modifier: -1,
                key: true,
            }],
        })
    }

    fn insert(xid: u32, commit_lsn: Option<u64>, lsn: u64, value: &str) -> Event {
        Event::Change(Change {
            xid,
            subxid: xid,
            commit_lsn: commit_lsn.map(Lsn::from_u64),
            lsn: Lsn::from_u64(lsn),
            ordinal: 0,
            origin: None,
            kind: ChangeKind::Insert {
                relation: relation(),
                new: Tuple(vec![Datum::Text(Bytes::copy_from_slice(value.as_bytes()))]),
            },
        })
    }

    fn commit(xid: u32, end: u64) -> Commit {
        Commit {
            xid,
            commit_lsn: Lsn::from_u64(end - 8),
            end_lsn: Lsn::from_u64(end),
            commit_time: PgTimestamp::from_micros(0),
        }
    }

    fn begin(xid: u32, final_lsn: u64) -> Event {
        Event::Begin {
            xid,
            final_lsn: Lsn::from_u64(final_lsn),
            commit_time: PgTimestamp::from_micros(0),
        }
    }

    #[test]
    fn a_transaction_leaves_whole_at_its_commit_with_its_end_position() {
        let dir = tempfile::tempdir().unwrap();
        let mut assembly = Assembly::new(dir.path().to_owned(), 1 << 20, Lsn::ZERO);
        assert!(assembly.take(begin(7, 100)).unwrap().is_none());
        assert!(
            assembly
                .take(insert(7, Some(100), 50, "a"))
                .unwrap()
                .is_none()
        );
        assert!(
            assembly
                .take(insert(7, Some(100), 60, "b"))
                .unwrap()
                .is_none()
        );
        assert!(assembly.in_flight());
        match assembly.take(Event::Commit(commit(7, 108))).unwrap() {
            Some(Pending::Memory(tx, _)) => {
                assert_eq!(tx.changes.len(), 2);
                assert_eq!(tx.end_lsn, Lsn::from_u64(108));
            }
            _ => panic!("expected the transaction in memory"),
        }
        assert!(!assembly.in_flight());
        assert_eq!(assembly.forwarded(), Lsn::from_u64(108));
    }

    #[test]
    fn a_transaction_over_the_memory_bound_leaves_as_a_spill_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut assembly = Assembly::new(dir.path().to_owned(), 1, Lsn::ZERO);
        assembly.take(begin(8, 200)).unwrap();
        assembly.take(insert(8, Some(200), 150, "a")).unwrap();
        assembly.take(insert(8, Some(200), 160, "b")).unwrap();
        match assembly.take(Event::Commit(commit(8, 208))).unwrap() {
            Some(Pending::Spilled(path, commit)) => {
                assert!(path.exists());
                assert_eq!(commit.end_lsn, Lsn::from_u64(208));
                let mut reader = cutover_replication::spill::SpillReader::open(&path).unwrap();
                assert_eq!(reader.next_batch(10).unwrap().len(), 2);
            }
            _ => panic!("expected a spill file"),
        }
    }

    #[test]
    fn an_aborted_streamed_transaction_leaves_nothing_and_a_committed_one_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut assembly = Assembly::new(dir.path().to_owned(), 1 << 20, Lsn::ZERO);
        assembly.take(insert(9, None, 300, "a")).unwrap();
        assembly.take(insert(10, None, 310, "b")).unwrap();
        assert!(assembly.in_flight());
        let aborted = assembly
            .take(Event::StreamAbort { xid: 9, subxid: 9 })
            .unwrap();
        assert!(aborted.is_none());
        match assembly.take(Event::StreamCommit(commit(10, 408))).unwrap() {
            Some(Pending::Spilled(_, commit)) => assert_eq!(commit.xid, 10),
            _ => panic!("expected the streamed transaction's file"),
        }
        assert!(!assembly.in_flight());
        // Only the committed transaction's file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
