//! The pipeline's own types: what a direction carries from its source to
//! its sinks.
//!
//! The decoder ([`crate::pgoutput`]) produces these and every consumer (the
//! sinks, the spill files, the daemon's reader) takes them; none of them
//! depends on the wire format. Position rules:
//!
//! - Every [`Change`] carries its top-level transaction's xid, its own WAL
//!   position and its ordinal within the transaction.
//! - A non-streamed transaction's changes carry its commit LSN; a streamed
//!   transaction's carry `None` until its commit is known.
//! - A [`SourceTransaction`] is whole and committed: a sink applies it all
//!   or not at all, in commit order (docs/architecture.md invariants 2, 3).
//!
//! Column values are kept as sent (text or binary, with the column's type
//! OID in the [`Relation`]), so nothing is lost; [`crate::value`] gives
//! typed views where needed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::catalog::TableName;
use crate::lsn::Lsn;

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// A timestamp as PostgreSQL sends it: microseconds since 2000-01-01 UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(i64);

impl PgTimestamp {
    /// Wraps the wire value.
    pub const fn from_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros)
    }

    /// The wire value.
    pub const fn micros(self) -> i64 {
        self.0
    }

    /// Now, in the same representation.
    pub fn now() -> PgTimestamp {
        PgTimestamp::from_system_time(SystemTime::now())
    }

    /// Converts a system time.
    pub fn from_system_time(time: SystemTime) -> PgTimestamp {
        let unix = match time.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_micros() as i64,
            Err(e) => -(e.duration().as_micros() as i64),
        };
        PgTimestamp(unix - (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000)
    }

    /// Converts to a system time.
    pub fn to_system_time(self) -> SystemTime {
        let unix_micros = self.0 + (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000;
        if unix_micros >= 0 {
            UNIX_EPOCH + Duration::from_micros(unix_micros as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(unix_micros.unsigned_abs())
        }
    }
}

/// A column as a Relation message describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RelationColumn {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub key: bool,
}

/// A relation as of its last Relation message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Relation {
    /// OID on the source.
    pub oid: u32,
    /// Schema-qualified name.
    pub name: TableName,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Columns in order; dropped and generated columns are not sent.
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// Indexes of the key columns.
    pub fn key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
    }
}

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change: no value was sent, and the
    /// target's current value must be kept.
    UnchangedToast,
    /// The value in its type's text form.
    Text(Bytes),
    /// The value in its type's binary form.
    Binary(Bytes),
}

/// The column values of a row, in the relation's column order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Datum>);

/// The old row of an UPDATE or DELETE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldRow {
    /// Only the replica identity key columns are meaningful (others null).
    Key(Tuple),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldRow {
    /// The tuple, whichever kind.
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldRow::Key(t) | OldRow::Full(t) => t,
        }
    }
}

/// What a change does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new row.
    Insert {
        /// The table.
        relation: Arc<Relation>,
        /// The row.
        new: Tuple,
    },
    /// A changed row. `old` is present when the key changed or the table
    /// has REPLICA IDENTITY FULL.
    Update {
        /// The table.
        relation: Arc<Relation>,
        /// The old key or row, if sent.
        old: Option<OldRow>,
        /// The new row (unchanged TOAST columns marked).
        new: Tuple,
    },
    /// A removed row.
    Delete {
        /// The table.
        relation: Arc<Relation>,
        /// The old key or row.
        old: OldRow,
    },
    /// TRUNCATE of one or more tables.
    Truncate {
        /// The tables.
        relations: Vec<Arc<Relation>>,
        /// `CASCADE` was given.
        cascade: bool,
        /// `RESTART IDENTITY` was given.
        restart_identity: bool,
    },
    /// TRUNCATE of one partition of a tree published through its root,
    /// which pgoutput does not send: cutover's trigger on the source
    /// reports it in a logical message (see [`crate::partition`]).
    TruncatePartition(Arc<crate::partition::PartitionTruncate>),
    /// DDL on a table of the source, reported by cutover's event trigger
    /// in a logical message (see [`crate::ddl`]).
    Ddl(Arc<crate::ddl::DdlChange>),
}

impl ChangeKind {
    /// `insert`, `update`, `delete` or `truncate`.
    pub fn op(&self) -> &'static str {
        match self {
            ChangeKind::Insert { .. } => "insert",
            ChangeKind::Update { .. } => "update",
            ChangeKind::Delete { .. } => "delete",
            ChangeKind::Truncate { .. } | ChangeKind::TruncatePartition(_) => "truncate",
            ChangeKind::Ddl(_) => "ddl",
        }
    }
}

/// A row change with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Top-level transaction id.
    pub xid: u32,
    /// The (sub)transaction the change belongs to, for streamed
    /// transactions; equal to `xid` otherwise.
    pub subxid: u32,
    /// The transaction's commit LSN; `None` for a streamed transaction
    /// until its Stream Commit.
    pub commit_lsn: Option<Lsn>,
    /// This change's own WAL position.
    pub lsn: Lsn,
    /// Position within the transaction, from 0.
    pub ordinal: u64,
    /// The replication origin of the transaction, if it has one.
    pub origin: Option<Arc<str>>,
    /// What it does.
    pub kind: ChangeKind,
}

/// A transaction boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Transaction id.
    pub xid: u32,
    /// The commit record's LSN.
    pub commit_lsn: Lsn,
    /// The end of the commit record: where to resume after it.
    pub end_lsn: Lsn,
    /// When it committed on the source.
    pub commit_time: PgTimestamp,
}

/// A committed source transaction, ready to apply.
#[derive(Debug, Clone)]
pub struct SourceTransaction {
    /// Transaction id on the source.
    pub xid: u32,
    /// Its commit record's LSN.
    pub commit_lsn: Lsn,
    /// The end of its commit record: the position recorded once applied.
    pub end_lsn: Lsn,
    /// When it committed on the source.
    pub commit_time: PgTimestamp,
    /// Its changes, in order.
    pub changes: Vec<Change>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_convert_both_ways() {
        let t = PgTimestamp::from_micros(0);
        assert_eq!(
            t.to_system_time()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            PG_EPOCH_OFFSET_SECS
        );
        let now = SystemTime::now();
        let back = PgTimestamp::from_system_time(now).to_system_time();
        let diff = now.duration_since(back).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_micros(2));
    }
}
