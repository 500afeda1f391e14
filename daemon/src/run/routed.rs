//! Routing by table group: with `[[group]]`s configured, each stream
//! applies only the changes to tables whose group's primary is the server
//! it reads, at the change's commit position (`switch --group` moves a
//! group at an exact position of each server's WAL:
//! [`crate::switch::journal::Flip`]). A change an application made to a
//! table whose primary is the other server is a stray write: it is not
//! applied, and it is recorded in the state store as pending, durably,
//! before the stream's position moves past it. The resolver
//! ([`super::watch::resolve`]) then makes the two servers' rows equal to
//! the primary's, by the group's policy (`primary_wins`).
//!
//! The forward stream reads the source and the reverse stream the target;
//! both use this sink around the [`PostgresSink`] that applies.

use std::path::Path;

use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::change::{
    Change, ChangeKind, Commit, Datum, Relation, SourceTransaction, Tuple,
};
use cutover_replication::sink::Sink;
use cutover_replication::sink::postgres::{PostgresSink, Route};

use crate::config::Groups;
use crate::direction::Direction;
use crate::store::{ConflictRecord, PendingStray, Store, now_secs};
use crate::switch::journal::{Server, SwitchState};

use super::RunError;

/// The server `direction` reads.
pub(crate) const fn read_by(direction: Direction) -> Server {
    match direction {
        Direction::Forward => Server::Source,
        Direction::Reverse => Server::Target,
    }
}

/// The route of the stream reading `read`: a change to a table is applied
/// when its group's primary at the change's position is `read`.
pub(super) fn route(groups: &Groups, state: &SwitchState, read: Server) -> Route {
    let groups = groups.clone();
    let state = state.clone();
    Route(std::sync::Arc::new(move |table: &TableName, lsn: Lsn| {
        state.group_primary_at(groups.group_of(table), read, lsn) == read
    }))
}

/// The sink of a stream when groups are configured.
pub(super) struct Routed {
    inner: PostgresSink,
    store: Store,
    groups: Groups,
    /// The server this stream reads: where its stray writes were made.
    side: Server,
}

impl Routed {
    pub(super) fn new(
        mut inner: PostgresSink,
        store: Store,
        groups: Groups,
        state: &SwitchState,
        direction: Direction,
    ) -> Routed {
        let side = read_by(direction);
        inner.set_route(route(&groups, state, side));
        Routed {
            inner,
            store,
            groups,
            side,
        }
    }

    /// Adds the stray writes among `changes` (of the transaction `commit`).
    fn collect<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
        commit: &Commit,
        out: &mut Vec<PendingStray>,
    ) {
        let mut committed_at = None;
        for change in changes {
            let tables = self.inner.routed_away(change, commit.commit_lsn);
            if tables.is_empty() {
                continue;
            }
            let committed_at = committed_at
                .get_or_insert_with(|| {
                    crate::console::timestamp(
                        commit
                            .commit_time
                            .to_system_time()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    )
                })
                .clone();
            for table in tables {
                let (rows, whole, key, resolution): (_, _, String, &str) = match &change.kind {
                    ChangeKind::Insert { relation, new } => (
                        vec![fields(relation, new)],
                        false,
                        key(relation, new),
                        "pending",
                    ),
                    ChangeKind::Update { relation, old, new } => {
                        let mut rows = vec![fields(relation, new)];
                        if let Some(old) = old {
                            rows.push(fields(relation, old.tuple()));
                        }
                        (rows, false, key(relation, new), "pending")
                    }
                    ChangeKind::Delete { relation, old } => (
                        vec![fields(relation, old.tuple())],
                        false,
                        key(relation, old.tuple()),
                        "pending",
                    ),
                    ChangeKind::Truncate { .. } => {
                        (Vec::new(), true, "(the whole table)".to_owned(), "pending")
                    }
                    ChangeKind::TruncatePartition(truncate) => (
                        Vec::new(),
                        true,
                        format!("(partition {})", truncate.partition),
                        "pending",
                    ),
                    // A schema change: no row to write back; the resolver
                    // reports it.
                    ChangeKind::Ddl(ddl) => (
                        Vec::new(),
                        false,
                        ddl.statement.chars().take(200).collect(),
                        "pending",
                    ),
                };
                out.push(PendingStray {
                    record: ConflictRecord {
                        id: 0,
                        kind: "stray_write".into(),
                        side: self.side.name().into(),
                        group: self.groups.group_of(table).to_owned(),
                        table: table.to_string(),
                        op: change.kind.op().into(),
                        key,
                        lsn: commit.end_lsn,
                        ordinal: change.ordinal,
                        committed_at: committed_at.clone(),
                        resolution: resolution.into(),
                        resolved_at: None,
                        at: now_secs(),
                    },
                    table: table.clone(),
                    rows,
                    whole,
                    committed_us: commit.commit_time.micros(),
                    use_side: None,
                });
            }
        }
    }

    /// Records `strays` durably: the stream acknowledges them after.
    async fn record(&self, strays: Vec<PendingStray>) -> Result<(), RunError> {
        if strays.is_empty() {
            return Ok(());
        }
        for stray in &strays {
            tracing::warn!(
                table = %stray.record.table,
                op = %stray.record.op,
                key = %stray.record.key,
                at = %stray.record.lsn,
                "a stray write on the {} (the {} is the group's primary): recorded, to be resolved",
                self.side.name(),
                self.side.other().name()
            );
        }
        self.store.put_pending_strays(&strays).await?;
        Ok(())
    }
}

/// The columns a change carried, by name, as text; an unchanged TOASTed
/// value is left out.
fn fields(relation: &Relation, tuple: &Tuple) -> Vec<(String, Option<Vec<u8>>)> {
    relation
        .columns
        .iter()
        .zip(&tuple.0)
        .filter_map(|(column, datum)| {
            let value = match datum {
                Datum::Null => None,
                Datum::Text(bytes) => Some(bytes.to_vec()),
                Datum::UnchangedToast | Datum::Binary(_) => return None,
            };
            Some((column.name.clone(), value))
        })
        .collect()
}

/// The row's key as reports show it: `(id=1)`, or every column of a table
/// without one.
fn key(relation: &Relation, tuple: &Tuple) -> String {
    let keyed = relation.columns.iter().any(|c| c.key);
    let parts: Vec<String> = relation
        .columns
        .iter()
        .zip(&tuple.0)
        .filter(|(c, _)| c.key || !keyed)
        .map(|(c, datum)| match datum {
            Datum::Text(bytes) => format!("{}={}", c.name, String::from_utf8_lossy(bytes)),
            Datum::Null => format!("{}=NULL", c.name),
            Datum::UnchangedToast | Datum::Binary(_) => format!("{}=?", c.name),
        })
        .collect();
    format!("({})", parts.join(", "))
}

impl Sink for Routed {
    type Error = RunError;

    async fn apply(&mut self, transactions: &[SourceTransaction]) -> Result<Lsn, RunError> {
        let applied = self.inner.applied();
        let mut strays = Vec::new();
        for txn in transactions.iter().filter(|t| t.end_lsn > applied) {
            let commit = Commit {
                xid: txn.xid,
                commit_lsn: txn.commit_lsn,
                end_lsn: txn.end_lsn,
                commit_time: txn.commit_time,
            };
            self.collect(&txn.changes, &commit, &mut strays);
        }
        // Recorded before the changes around them commit: the position
        // acknowledged never passes a stray write not recorded.
        self.record(strays).await?;
        Ok(self.inner.apply(transactions).await?)
    }

    async fn apply_spilled(
        &mut self,
        path: &Path,
        commit: &Commit,
        batch_rows: usize,
    ) -> Result<(), RunError> {
        if commit.end_lsn > self.inner.applied() {
            let spill = |e: cutover_replication::spill::SpillError| {
                RunError::Spill(format!("reading a large transaction from disk: {e}"))
            };
            let mut reader = cutover_replication::spill::SpillReader::open(path).map_err(spill)?;
            loop {
                let changes = reader.next_batch(batch_rows).map_err(spill)?;
                if changes.is_empty() {
                    break;
                }
                let mut strays = Vec::new();
                self.collect(&changes, commit, &mut strays);
                self.record(strays).await?;
            }
        }
        Ok(self.inner.apply_spilled(path, commit, batch_rows).await?)
    }

    fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool {
        self.inner.wanted(change, commit_lsn)
    }

    fn applied(&self) -> Lsn {
        self.inner.applied()
    }

    fn durable(&self) -> Lsn {
        self.inner.durable()
    }

    fn flush_pending(&self) -> bool {
        self.inner.flush_pending()
    }

    async fn refresh_durable(&mut self) -> Result<Lsn, RunError> {
        Ok(self.inner.refresh_durable().await?)
    }

    async fn wait_durable(&mut self) -> Result<Lsn, RunError> {
        Ok(self.inner.wait_durable().await?)
    }
}
