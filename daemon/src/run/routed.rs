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

use cutover_conflict::policy::Policy;
use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::change::{
    Change, ChangeKind, Commit, Datum, Relation, SourceTransaction, Tuple,
};
use cutover_replication::sink::Sink;
use cutover_replication::sink::kafka::KafkaSink;
use cutover_replication::sink::postgres::{Filter, Guard, Kept, PostgresSink, Route};
use prometheus::IntCounterVec;

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
        let group = groups.group_of(table);
        // Both servers take a bidirectional group's writes: both streams
        // apply them.
        groups.policy(group) == Policy::Bidirectional
            || state.group_primary_at(group, read, lsn) == read
    }))
}

/// The guard of the bidirectional groups' tables, for the stream that
/// reads `side` in `direction`: cutover's own rows, and those the copy
/// wrote before `copied_at` (microseconds since 2000-01-01), never block a
/// change; at equal commit times the source's row wins. What it leaves
/// out is recorded in `store` before the batch commits.
fn guard(
    store: &Store,
    groups: &Groups,
    names: [&str; 2],
    direction: Direction,
    copied_at: i64,
) -> Guard {
    let tables = groups.clone();
    let mut own_origins = Vec::new();
    for name in names {
        for origin in [
            Direction::Forward.origin(name),
            Direction::Reverse.origin(name),
            Direction::repair_origin(name),
            Direction::repair_origin(&Direction::Reverse.slot(name)),
        ] {
            if !own_origins.contains(&origin) {
                own_origins.push(origin);
            }
        }
    }
    let (store, groups) = (store.clone(), groups.clone());
    let side = read_by(direction);
    Guard {
        tables: std::sync::Arc::new(move |table: &TableName| {
            tables.policy(tables.group_of(table)) == Policy::Bidirectional
        }),
        own_origins,
        incoming_wins_ties: direction == Direction::Forward,
        clear_until: copied_at,
        record: std::sync::Arc::new(move |kept: &[Kept]| {
            for k in kept {
                store
                    .put_conflict_now(&kept_record(&groups, side, k))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }),
    }
}

/// The record of a change the guard left out, read from `side`.
fn kept_record(groups: &Groups, side: Server, k: &Kept) -> ConflictRecord {
    ConflictRecord {
        id: 0,
        kind: "conflict".into(),
        side: side.name().into(),
        group: groups.group_of(&k.table).to_owned(),
        table: k.table.to_string(),
        op: k.op.into(),
        key: k.key.clone(),
        lsn: k.commit_lsn,
        ordinal: k.ordinal,
        committed_at: crate::console::timestamp(
            u64::try_from(k.incoming_us / 1_000_000 + 946_684_800).unwrap_or(0),
        ),
        resolution: format!("kept_{}", side.other().name()),
        resolved_at: None,
        at: now_secs(),
    }
}

/// The sink of every stream: with groups configured, it routes; with
/// `[kafka]`, the same changes go to the feed beside the PostgreSQL
/// sink, and the stream acknowledges only what both hold durably.
pub(super) struct Routed {
    inner: PostgresSink,
    feed: Option<KafkaSink>,
    store: Store,
    groups: Groups,
    /// The server this stream reads: where its stray writes were made.
    side: Server,
    conflicts: IntCounterVec,
    /// Groups are configured: changes are routed, and strays recorded.
    routes: bool,
}

/// What [`Routed::new`] needs beside the sink.
pub(super) struct Routing<'a> {
    pub(super) store: Store,
    pub(super) groups: Groups,
    pub(super) state: &'a SwitchState,
    pub(super) direction: Direction,
    /// The migration's name and the configured slot's, which cutover's
    /// origins carry.
    pub(super) migration: &'a str,
    pub(super) configured: &'a str,
    /// `cutover_conflicts_total`.
    pub(super) conflicts: IntCounterVec,
}

impl Routed {
    pub(super) fn new(mut inner: PostgresSink, routing: Routing<'_>) -> Result<Routed, RunError> {
        let side = read_by(routing.direction);
        // No group: every change is applied, none is stray.
        let routes = !routing.groups.is_empty();
        if routes {
            inner.set_route(route(&routing.groups, routing.state, side));
        }
        if routing.groups.any_bidirectional() {
            // When the copy finished, in PostgreSQL's microseconds.
            let copied_at = routing.store.copy_run()?.map_or(i64::MAX, |run| {
                match (run.target_finished_us, run.finished_at) {
                    (Some(us), _) => us,
                    // An earlier version's record: whole seconds, rounded
                    // up (the copy's last commits are within that second).
                    (None, Some(secs)) => (secs as i64 + 1 - 946_684_800).saturating_mul(1_000_000),
                    (None, None) => i64::MAX,
                }
            });
            inner.set_guard(guard(
                &routing.store,
                &routing.groups,
                [routing.migration, routing.configured],
                routing.direction,
                copied_at,
            ));
        }
        Ok(Routed {
            inner,
            feed: None,
            store: routing.store,
            groups: routing.groups,
            side,
            conflicts: routing.conflicts,
            routes,
        })
    }

    /// Which changes the stream writes, routing included: what the feed
    /// publishes too.
    pub(super) fn filter(&self) -> &Filter {
        self.inner.filter()
    }

    /// Publishes the stream's changes to `feed` as well.
    pub(super) fn set_feed(&mut self, feed: KafkaSink) {
        self.feed = Some(feed);
    }

    /// Writes `transactions` to the PostgreSQL sink and the feed at once.
    async fn apply_both(&mut self, transactions: &[SourceTransaction]) -> Result<Lsn, RunError> {
        let (applied, fed) = match &mut self.feed {
            Some(feed) => {
                let (applied, fed) =
                    tokio::join!(self.inner.apply(transactions), feed.apply(transactions));
                (applied, Some(fed))
            }
            None => (self.inner.apply(transactions).await, None),
        };
        self.record_kept();
        applied?;
        if let Some(fed) = fed {
            fed?;
        }
        Ok(self.applied())
    }

    /// Logs and counts the changes the guard left out (recorded in the
    /// store before their batch committed): conflicts the row on the
    /// server written won, as the later write, or its delete.
    fn record_kept(&mut self) {
        let written = self.side.other();
        for k in self.inner.take_kept() {
            let record = kept_record(&self.groups, self.side, &k);
            match k.local_us {
                Some(local_us) => tracing::warn!(
                    table = %record.table,
                    op = %record.op,
                    key = %record.key,
                    at = %record.lsn,
                    "a conflict on a bidirectional group: the {}'s row is later than this change from the {} ({} us after it), and is kept; it travels to the {} in its own stream",
                    written.name(),
                    self.side.name(),
                    local_us - k.incoming_us,
                    self.side.name()
                ),
                None => tracing::warn!(
                    table = %record.table,
                    op = %record.op,
                    key = %record.key,
                    at = %record.lsn,
                    "a conflict on a bidirectional group: the {} deleted the row this change from the {} updates; the delete wins on both servers",
                    written.name(),
                    self.side.name()
                ),
            }
            self.conflicts
                .with_label_values(&[record.table.as_str(), &record.resolution])
                .inc();
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
        if !self.routes {
            return self.apply_both(transactions).await;
        }
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
        self.apply_both(transactions).await
    }

    async fn apply_spilled(
        &mut self,
        path: &Path,
        commit: &Commit,
        batch_rows: usize,
    ) -> Result<(), RunError> {
        if self.routes && commit.end_lsn > self.inner.applied() {
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
        let applied = self.inner.apply_spilled(path, commit, batch_rows).await;
        self.record_kept();
        applied?;
        if let Some(feed) = &mut self.feed {
            feed.apply_spilled(path, commit, batch_rows).await?;
        }
        Ok(())
    }

    fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool {
        self.inner.wanted(change, commit_lsn)
    }

    fn applied(&self) -> Lsn {
        let applied = self.inner.applied();
        self.feed
            .as_ref()
            .map_or(applied, |f| applied.min(f.applied()))
    }

    fn durable(&self) -> Lsn {
        let durable = self.inner.durable();
        self.feed
            .as_ref()
            .map_or(durable, |f| durable.min(f.durable()))
    }

    fn flush_pending(&self) -> bool {
        self.inner.flush_pending() || self.feed.as_ref().is_some_and(Sink::flush_pending)
    }

    async fn refresh_durable(&mut self) -> Result<Lsn, RunError> {
        if self.inner.flush_pending() {
            self.inner.refresh_durable().await?;
        }
        if let Some(feed) = &mut self.feed {
            feed.refresh_durable().await?;
        }
        Ok(self.durable())
    }

    async fn wait_durable(&mut self) -> Result<Lsn, RunError> {
        self.inner.wait_durable().await?;
        if let Some(feed) = &mut self.feed {
            feed.wait_durable().await?;
        }
        Ok(self.durable())
    }
}
