//! What the stream carries of each table in scope, and what it cannot.
//!
//! Logical decoding sees a table's changes only if the table is logged,
//! and a publication that publishes UPDATE and DELETE for a table makes
//! those statements fail on the source unless the table has a replica
//! identity (a primary key, `USING INDEX` or `FULL`). cutover never makes
//! the source's own statements fail unless the config asks for it
//! (docs/architecture.md invariant 9), so each table gets one of three coverages:
//!
//! - [`Coverage::Full`]: every change streams, through
//!   `replication.publication`.
//! - [`Coverage::InsertsOnly`]: a table without a key or replica identity,
//!   with `replication.keyless = "append_only"`: its INSERTs and TRUNCATEs
//!   stream through a second publication that publishes only those
//!   ([`inserts_publication`]); its UPDATEs and DELETEs keep working on
//!   the source and do not stream.
//! - [`Coverage::SnapshotOnly`]: an UNLOGGED table, which no publication
//!   can hold: copied at the snapshot, nothing after.
//!
//! What does not stream must still never be lost in silence: the source's
//! own statistics (`pg_stat_user_tables`) count the rows each statement
//! inserted, updated and deleted, so the daemon records those counters
//! when it sets the publications up (before the snapshot: a write in
//! between is counted although the copy holds it, never the other way)
//! and reports every row written since that the stream did not carry, per
//! table, as `cutover_unstreamed_rows`, in `/health` and in `status`.

use std::collections::BTreeMap;

use cutover_replication::catalog::{ReplicaIdentity, Table, TableName};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::KeylessPolicy;

/// What the stream carries of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coverage {
    /// Every change.
    Full,
    /// INSERTs and TRUNCATEs; not UPDATEs and DELETEs.
    InsertsOnly,
    /// Nothing after the snapshot copy.
    SnapshotOnly,
}

impl Coverage {
    /// The name used in `check`, `status` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Coverage::Full => "full",
            Coverage::InsertsOnly => "inserts_only",
            Coverage::SnapshotOnly => "snapshot_only",
        }
    }
}

/// Whether the source's UPDATEs and DELETEs of `table` carry a row key in
/// the WAL. A `DEFERRABLE` primary key is no replica identity.
pub fn identified(table: &Table) -> bool {
    !matches!(table.replica_identity, ReplicaIdentity::Nothing)
        && table.identity_columns().is_some()
}

/// The coverage `policy` gives `table`; `None` when the policy refuses it.
pub fn coverage(table: &Table, policy: KeylessPolicy) -> Option<Coverage> {
    if table.unlogged {
        return Some(Coverage::SnapshotOnly);
    }
    if identified(table) {
        return Some(Coverage::Full);
    }
    match policy {
        KeylessPolicy::AppendOnly => Some(Coverage::InsertsOnly),
        // `run` sets REPLICA IDENTITY FULL first.
        KeylessPolicy::ReplicaIdentityFull => Some(Coverage::Full),
        KeylessPolicy::Refuse => None,
    }
}

/// The publication of the tables whose INSERTs and TRUNCATEs only are
/// streamed: `<publication>_inserts`, cut to PostgreSQL's 63 bytes.
pub fn inserts_publication(publication: &str) -> String {
    const SUFFIX: &str = "_inserts";
    let mut end = publication.len().min(63 - SUFFIX.len());
    while !publication.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{SUFFIX}", &publication[..end])
}

/// What a coverage means for the operator, for logs and `check`.
pub fn explain(coverage: Coverage) -> &'static str {
    match coverage {
        Coverage::Full => "every change streams",
        Coverage::InsertsOnly => {
            "no primary key or replica identity (replication.keyless = \"append_only\"): its inserts and truncates stream; its updates and deletes keep working on the source but do not stream, and are reported as unstreamed rows (cutover_unstreamed_rows)"
        }
        Coverage::SnapshotOnly => {
            "an UNLOGGED table, which logical decoding never sees: copied at the snapshot; later writes do not stream and are reported as unstreamed rows (cutover_unstreamed_rows)"
        }
    }
}

/// The tables in scope sorted by what they get.
#[derive(Debug, Default)]
pub struct Plan {
    /// Published for every change.
    pub full: Vec<TableName>,
    /// Published for INSERT and TRUNCATE only.
    pub inserts_only: Vec<TableName>,
    /// Copied only.
    pub snapshot_only: Vec<TableName>,
    /// Without a key or replica identity, to be given `REPLICA IDENTITY
    /// FULL` on the source first (`replication.keyless =
    /// "replica_identity_full"`); also in `full`.
    pub make_full: Vec<TableName>,
    /// Refused by `replication.keyless = "refuse"`.
    pub refused: Vec<TableName>,
}

impl Plan {
    /// Sorts `tables` by the coverage `policy` gives them.
    pub fn new(tables: &[Table], policy: KeylessPolicy) -> Plan {
        let mut plan = Plan::default();
        for table in tables {
            let name = table.name.clone();
            match coverage(table, policy) {
                Some(Coverage::Full) => {
                    if !identified(table) {
                        plan.make_full.push(name.clone());
                    }
                    plan.full.push(name);
                }
                Some(Coverage::InsertsOnly) => plan.inserts_only.push(name),
                Some(Coverage::SnapshotOnly) => plan.snapshot_only.push(name),
                None => plan.refused.push(name),
            }
        }
        plan
    }

    /// The tables whose changes do not all stream, with their coverage.
    pub fn partial(&self) -> impl Iterator<Item = (&TableName, Coverage)> {
        self.inserts_only
            .iter()
            .map(|t| (t, Coverage::InsertsOnly))
            .chain(
                self.snapshot_only
                    .iter()
                    .map(|t| (t, Coverage::SnapshotOnly)),
            )
    }
}

/// The rows a table's statements inserted, updated and deleted, as the
/// source's statistics count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCounts {
    /// `n_tup_ins`.
    pub inserted: i64,
    /// `n_tup_upd`.
    pub updated: i64,
    /// `n_tup_del`.
    pub deleted: i64,
}

impl WriteCounts {
    /// The rows of these counts that `coverage` does not stream.
    fn unstreamed(self, coverage: Coverage) -> i64 {
        match coverage {
            Coverage::Full => 0,
            Coverage::InsertsOnly => self.updated + self.deleted,
            Coverage::SnapshotOnly => self.inserted + self.updated + self.deleted,
        }
    }

    fn since(self, earlier: WriteCounts) -> Option<WriteCounts> {
        let delta = WriteCounts {
            inserted: self.inserted - earlier.inserted,
            updated: self.updated - earlier.updated,
            deleted: self.deleted - earlier.deleted,
        };
        // Counters only fall when the statistics were reset.
        (delta.inserted >= 0 && delta.updated >= 0 && delta.deleted >= 0).then_some(delta)
    }
}

/// A table whose changes do not all stream, watched through the source's
/// statistics. Kept in the state store; never moves backward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    /// The table.
    pub table: TableName,
    /// What streams of it.
    pub coverage: Coverage,
    /// The counters when counting (re)started.
    pub baseline: WriteCounts,
    /// Unstreamed rows counted before the statistics were last reset.
    pub carried: i64,
    /// Unstreamed rows counted so far (at the last observation).
    #[serde(default)]
    pub counted: i64,
}

impl Watch {
    /// A watch starting at `counts`.
    pub fn new(table: TableName, coverage: Coverage, counts: WriteCounts) -> Watch {
        Watch {
            table,
            coverage,
            baseline: counts,
            carried: 0,
            counted: 0,
        }
    }

    /// Takes the counters read now; returns the unstreamed rows so far.
    /// After a statistics reset (a counter fell) counting restarts from
    /// the new counters, keeping what was counted before.
    pub fn observe(&mut self, now: WriteCounts) -> i64 {
        match now.since(self.baseline) {
            Some(delta) => self.counted = self.carried + delta.unstreamed(self.coverage),
            None => {
                tracing::warn!(table = %self.table, "the source's statistics were reset: rows changed between the last sample and the reset are not counted; run cutover verify");
                self.baseline = now;
                self.carried = self.counted;
            }
        }
        self.counted
    }
}

/// The source's write counters of `tables`.
pub async fn write_counts(
    client: &Client,
    tables: &[&TableName],
) -> Result<BTreeMap<TableName, WriteCounts>, tokio_postgres::Error> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text,
                    coalesce(pg_stat_get_tuples_inserted(c.oid), 0),
                    coalesce(pg_stat_get_tuples_updated(c.oid), 0),
                    coalesce(pg_stat_get_tuples_deleted(c.oid), 0)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = ANY($1::text[]::regclass[])",
            &[&names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                WriteCounts {
                    inserted: r.get(2),
                    updated: r.get(3),
                    deleted: r.get(4),
                },
            )
        })
        .collect())
}

/// `ALTER TABLE ... REPLICA IDENTITY FULL` for each table, as
/// `replication.keyless = "replica_identity_full"` asks.
pub async fn make_full(client: &Client, tables: &[TableName]) -> Result<(), tokio_postgres::Error> {
    for table in tables {
        tracing::warn!(%table, "replication.keyless = \"replica_identity_full\": setting REPLICA IDENTITY FULL on the source");
        cutover_replication::client::with_short_lock(
            client,
            &format!("ALTER TABLE {} REPLICA IDENTITY FULL", table.quoted()),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(inserted: i64, updated: i64, deleted: i64) -> WriteCounts {
        WriteCounts {
            inserted,
            updated,
            deleted,
        }
    }

    #[test]
    fn only_what_does_not_stream_is_counted_and_a_reset_keeps_the_count() {
        let name = TableName::new("public", "log");
        let mut watch = Watch::new(name.clone(), Coverage::InsertsOnly, counts(10, 1, 0));
        assert_eq!(watch.observe(counts(50, 1, 0)), 0, "inserts stream");
        assert_eq!(watch.observe(counts(50, 4, 2)), 5);
        // pg_stat_reset(): counters start again from zero.
        assert_eq!(watch.observe(counts(0, 0, 0)), 5);
        assert_eq!(watch.observe(counts(0, 1, 0)), 6);
        let mut unlogged = Watch::new(name, Coverage::SnapshotOnly, counts(0, 0, 0));
        assert_eq!(unlogged.observe(counts(3, 2, 1)), 6);
    }

    #[test]
    fn the_inserts_publication_name_fits_postgres() {
        assert_eq!(inserts_publication("cutover"), "cutover_inserts");
        let long = "p".repeat(63);
        assert_eq!(inserts_publication(&long).len(), 63);
    }
}
