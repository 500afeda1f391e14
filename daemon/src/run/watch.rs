//! The stray-write watcher: with `[[group]]`s configured, while the source
//! is the primary, `run` also streams the target's changes and writes the
//! source's rows back over every row an application wrote there (the
//! groups' policy, `primary_wins`). Each such stray write is recorded in
//! the state store with what was done, counted in
//! `cutover_conflicts_total{table,resolution}` and shown by `status`.
//!
//! The watcher reads the reverse direction's own slot and publications
//! on the target (`<slot>_reverse`), made when it first starts: a switch
//! adopts them as they are, and streams from where the watcher stopped.
//! It runs the stream's reader and applier with a sink of its own
//! ([`WriteBack`]) that writes nothing of the target's changes to the
//! source: it skips cutover's own writes (the forward stream's and the
//! repairs' origins) and hands every other row to
//! [`crate::verify::strays::write_back`]. Its position is recorded in the
//! state store once the rows are written back; a crash before that makes
//! it read them again, and a row already equal is left alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::change::{
    Change, ChangeKind, Commit, Datum, Relation, SourceTransaction, Tuple,
};
use cutover_replication::session::{PgOutputOptions, Session, SnapshotAction};
use cutover_replication::sink::Sink;
use cutover_replication::slot;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::Config;
use crate::copy::{self};
use crate::direction::Direction;
use crate::live::{DaemonState, Status};
use crate::store::{ConflictRecord, Store, now_secs};
use crate::verify::strays::{self, Stray};

use super::RunError;
use super::applier::apply_work;
use super::queue::{Queue, Work};
use super::reader::read_stream;
use super::session::stopped;
use super::supervisor::{FIRST_BACKOFF, MAX_BACKOFF};

/// Watches the target for stray writes until `shutdown`, while `forward`
/// (the daemon's forward stream) runs.
pub(super) async fn watch(
    config: Config,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
    forward: Arc<Status>,
) -> Result<(), RunError> {
    // Write-backs hold the forward applier: it must be streaming.
    loop {
        if forward.state() == DaemonState::Streaming {
            break;
        }
        tokio::select! {
            () = stopped(&mut shutdown) => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let reverse = config.for_direction(Direction::Reverse);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        match watch_once(&config, &reverse, &store, shutdown.clone(), &forward).await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() => {
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(error = %err, retry_in = ?backoff, "the stray-write watcher stopped; it starts again");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(err) => return Err(err),
        }
    }
}

/// One session of the watcher.
async fn watch_once(
    config: &Config,
    reverse: &Config,
    store: &Store,
    shutdown: watch::Receiver<bool>,
    forward: &Arc<Status>,
) -> Result<(), RunError> {
    let (slot, start, publications) = prepare(reverse, store).await?;
    // What the target's slot keeps, beside the source slot's figures.
    let _sampled = super::supervisor::AbortOnDrop(tokio::spawn(sample_slot(
        reverse.clone(),
        slot.clone(),
        Arc::clone(forward),
    )));
    let sink = WriteBack {
        config: config.clone(),
        forward: Arc::clone(forward),
        store: store.clone(),
        skipped: {
            // The repairs' origin is named after the configured slot (it
            // may differ from the migration's, under which the copy ran).
            let mut skipped = Direction::Reverse.skipped_origins(&migration(config, store)?);
            skipped.push(Direction::repair_origin(&config.slot));
            skipped
        },
        applied: start,
    };
    let session = Session::connect(&reverse.source.conninfo).await?;
    let options = PgOutputOptions::for_server(session.server_version_num(), publications);
    let stream = session.start_replication(&slot, start, &options).await?;
    tracing::info!(%slot, %start, "watching the target for stray writes");
    // The reader and applier keep their own state: none of it is the
    // daemon's forward stream's.
    let status = Arc::new(Status::new(&slot, Direction::Reverse));
    status.start_at(start);
    status.set_state(DaemonState::Streaming);
    let settings = config.apply.clone();
    let (work_tx, work_rx) = mpsc::channel::<Work>(settings.queue_transactions);
    let (durable_tx, durable_rx) = watch::channel(start);
    let queue = Queue {
        work: work_tx,
        budget: Arc::new(Semaphore::new(settings.queue_bytes)),
        budget_bytes: settings.queue_bytes,
        status: Arc::clone(&status),
    };
    let reader = tokio::spawn(read_stream(
        stream,
        store.dir().join("spill-strays"),
        settings.clone(),
        queue,
        durable_rx,
        shutdown.clone(),
        None,
    ));
    let applied = apply_work(sink, work_rx, durable_tx, settings, shutdown, status, None).await;
    match applied {
        Ok(()) => reader.await.unwrap_or_else(|e| {
            Err(RunError::Spill(format!(
                "the stray-write watcher's reader stopped: {e}"
            )))
        }),
        Err(err) => {
            reader.abort();
            Err(err)
        }
    }
}

/// Every `lag_sample_interval`: how much WAL the target's slot retains
/// and its `wal_status`, in the same families as the source slot's
/// (`cutover_slot_retained_bytes{slot}`, `cutover_slot_wal_status`), so
/// that the same alerts watch it.
async fn sample_slot(reverse: Config, slot: String, forward: Arc<Status>) {
    let mut ticker = tokio::time::interval(reverse.lag_sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        ticker.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = cutover_replication::client::connect(&reverse.source.conninfo)
                .await
                .ok();
        }
        let Some(c) = &client else { continue };
        let Ok(Some(state)) = slot::slot_state(c, &slot).await else {
            continue;
        };
        if let Some(bytes) = state.retained_bytes {
            forward
                .metrics
                .slot_retained_bytes
                .with_label_values(&[&slot])
                .set(bytes.max(0));
        }
        if let Some(current) = state.wal_status.as_deref() {
            for status in crate::metrics::WAL_STATUSES {
                forward
                    .metrics
                    .slot_wal_status
                    .with_label_values(&[slot.as_str(), status])
                    .set(i64::from(*status == current));
            }
        }
    }
}

/// The migration's name, which its origins carry.
fn migration(config: &Config, store: &Store) -> Result<String, RunError> {
    Ok(store
        .copy_run()?
        .map_or_else(|| config.slot.clone(), |run| run.slot))
}

/// The reverse direction's publications and slot on the target, made if
/// missing, and where to start: after what the watcher handled, or where
/// the slot stands.
async fn prepare(reverse: &Config, store: &Store) -> Result<(String, Lsn, Vec<String>), RunError> {
    let target = cutover_replication::client::connect(&reverse.source.conninfo)
        .await
        .map_err(|e| strays_error(format!("connecting to the target: {e}"), true))?;
    // A server that does not answer may answer later; anything else it
    // says is for the operator to fix.
    let failed = |e: copy::CopyError| {
        let transient = matches!(
            e,
            copy::CopyError::Connect { .. }
                | copy::CopyError::Query { .. }
                | copy::CopyError::Replication { .. }
        );
        strays_error(
            format!("preparing the target's slot and publications: {e}"),
            transient,
        )
    };
    let tables = copy::tables_in_scope(&target, reverse)
        .await
        .map_err(failed)?;
    copy::ensure_publications(&target, store, reverse, &tables)
        .await
        .map_err(failed)?;
    let publications = copy::publications(&target, reverse).await.map_err(failed)?;
    let name = reverse.slot.clone();
    let existing = slot::slot_state(&target, &name)
        .await
        .map_err(|e| strays_error(format!("reading the target's replication slots: {e}"), true))?;
    let from_slot = match existing {
        Some(state) if state.wal_status.as_deref() == Some("lost") => {
            return Err(strays_error(
                format!(
                    "the target's slot {name} lost WAL it needed while cutover was down: stray writes made meanwhile were not seen; drop it (SELECT pg_drop_replication_slot('{name}');), start cutover again, and run `cutover verify --repair`"
                ),
                false,
            ));
        }
        Some(state) => state.confirmed_flush.ok_or_else(|| {
            strays_error(
                format!(
                    "the target's slot {name} cannot be streamed from (plugin {:?}, wal_status {:?}): drop it (SELECT pg_drop_replication_slot('{name}');) and start cutover again",
                    state.plugin, state.wal_status
                ),
                false,
            )
        })?,
        None => {
            let mut session = Session::connect(&reverse.source.conninfo).await?;
            let created = session
                .create_slot(&name, false, SnapshotAction::Nothing)
                .await?;
            tracing::info!(slot = %name, at = %created.consistent_point, "made the target's slot: stray writes are watched from here");
            created.consistent_point
        }
    };
    let start = store
        .stray_position()?
        .map_or(from_slot, |at| at.max(from_slot));
    Ok((name, start, publications))
}

fn strays_error(message: String, transient: bool) -> RunError {
    RunError::Strays { message, transient }
}

/// The watcher's sink: writes the source's rows back over stray writes.
struct WriteBack {
    config: Config,
    /// The daemon's forward stream, held while rows are written back.
    forward: Arc<Status>,
    store: Store,
    /// cutover's own origins on the target.
    skipped: Vec<String>,
    applied: Lsn,
}

/// A stray change as recorded.
struct Seen {
    table: TableName,
    op: &'static str,
    end_lsn: Lsn,
    ordinal: u64,
    committed_at: String,
    /// Its rows' indexes in the write-back's list (an update that moved a
    /// key has two: the old key and the new).
    rows: Vec<usize>,
    /// For a change with no row: what it is, and what was done.
    whole: Option<(String, &'static str)>,
}

impl WriteBack {
    /// Adds the stray writes of `changes` (of the transaction `commit`).
    fn collect<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
        commit: &Commit,
        strays: &mut Vec<Stray>,
        truncated: &mut Vec<TableName>,
        seen: &mut Vec<Seen>,
    ) -> Result<(), RunError> {
        let committed_at = crate::console::timestamp(
            commit
                .commit_time
                .to_system_time()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        for change in changes {
            if !self.wanted(change, commit.commit_lsn) {
                continue;
            }
            let mut record =
                |table: &TableName, rows: Vec<usize>, whole: Option<(String, &'static str)>| {
                    seen.push(Seen {
                        table: table.clone(),
                        op: change.kind.op(),
                        end_lsn: commit.end_lsn,
                        ordinal: change.ordinal,
                        committed_at: committed_at.clone(),
                        rows,
                        whole,
                    });
                };
            match &change.kind {
                ChangeKind::Insert { relation, new } => {
                    strays.push(stray(relation, new));
                    record(&relation.name, vec![strays.len() - 1], None);
                }
                ChangeKind::Update { relation, old, new } => {
                    strays.push(stray(relation, new));
                    let mut rows = vec![strays.len() - 1];
                    if let Some(old) = old {
                        strays.push(stray(relation, old.tuple()));
                        rows.push(strays.len() - 1);
                    }
                    record(&relation.name, rows, None);
                }
                ChangeKind::Delete { relation, old } => {
                    strays.push(stray(relation, old.tuple()));
                    record(&relation.name, vec![strays.len() - 1], None);
                }
                ChangeKind::Truncate { relations, .. } => {
                    for relation in relations {
                        if !truncated.contains(&relation.name) {
                            truncated.push(relation.name.clone());
                        }
                        let whole = ("(the whole table)".to_owned(), "written_back");
                        record(&relation.name, Vec::new(), Some(whole));
                    }
                }
                ChangeKind::TruncatePartition(truncate) => {
                    if !truncated.contains(&truncate.root) {
                        truncated.push(truncate.root.clone());
                    }
                    let whole = (
                        format!("(partition {})", truncate.partition),
                        "written_back",
                    );
                    record(&truncate.root, Vec::new(), Some(whole));
                }
                // A schema change on the target: reported, as it cannot be
                // written back (one outside the migration's scope, such as
                // a temporary table's, is none of its business).
                ChangeKind::Ddl(ddl) if ddl.in_scope => {
                    let statement: String = ddl.statement.chars().take(200).collect();
                    record(&ddl.table, Vec::new(), Some((statement, "reported")));
                }
                ChangeKind::Ddl(_) => {}
            }
        }
        Ok(())
    }

    /// Writes back what was collected, records it, and moves the watcher's
    /// position to `end`.
    async fn settle(
        &mut self,
        strays: Vec<Stray>,
        truncated: Vec<TableName>,
        seen: Vec<Seen>,
        end: Lsn,
    ) -> Result<(), RunError> {
        let handled = !seen.is_empty();
        if handled {
            let done = strays::write_back(&self.config, &self.forward, &strays, &truncated)
                .await
                .map_err(|e| {
                    let transient = e.is_transient();
                    strays_error(format!("writing the source's rows back: {e}"), transient)
                })?;
            for change in seen {
                let (key, resolution) = match change.whole {
                    Some((what, resolution)) => (what, resolution),
                    None => {
                        let written = change
                            .rows
                            .iter()
                            .any(|i| done.rows.get(*i).is_some_and(|(_, w)| *w));
                        let key = change
                            .rows
                            .first()
                            .and_then(|i| done.rows.get(*i))
                            .map_or_else(String::new, |(key, _)| key.clone());
                        (key, if written { "written_back" } else { "equal" })
                    }
                };
                let table = change.table.to_string();
                let record = ConflictRecord {
                    kind: "stray_write".into(),
                    side: "target".into(),
                    group: self
                        .config
                        .groups
                        .of(&change.table)
                        .map_or_else(|_| "?".to_owned(), str::to_owned),
                    table: table.clone(),
                    op: change.op.into(),
                    key,
                    lsn: change.end_lsn,
                    ordinal: change.ordinal,
                    committed_at: change.committed_at,
                    resolution: resolution.into(),
                    resolved_at: done.at,
                    at: now_secs(),
                };
                tracing::warn!(
                    table = %table,
                    op = record.op,
                    key = %record.key,
                    at = %record.lsn,
                    resolution,
                    "a stray write on the target (the source is the primary): {}",
                    match resolution {
                        "written_back" => "the source's rows are written back over it",
                        "equal" => "the row was equal to the source's again",
                        _ => "a schema change cutover cannot write back: look at it, and bring the target's table back to the source's",
                    }
                );
                self.store.put_conflict(&record)?;
                self.forward
                    .metrics
                    .conflicts
                    .with_label_values(&[&table, resolution])
                    .inc();
            }
        }
        if end > self.applied {
            // The records reach the disk before the slot hears of the
            // position. With nothing handled the slot's own position is
            // enough (the watcher starts from the later of the two): no
            // flush for each batch of cutover's own writes.
            if handled {
                self.store.put_stray_position(end).await?;
            }
            self.applied = end;
        }
        Ok(())
    }
}

/// The columns a change carried, as text.
fn stray(relation: &Relation, tuple: &Tuple) -> Stray {
    Stray {
        table: relation.name.clone(),
        fields: relation
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
            .collect(),
    }
}

impl Sink for WriteBack {
    type Error = RunError;

    async fn apply(&mut self, transactions: &[SourceTransaction]) -> Result<Lsn, RunError> {
        let (mut strays, mut truncated, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        let mut end = self.applied;
        for txn in transactions.iter().filter(|t| t.end_lsn > self.applied) {
            let commit = Commit {
                xid: txn.xid,
                commit_lsn: txn.commit_lsn,
                end_lsn: txn.end_lsn,
                commit_time: txn.commit_time,
            };
            self.collect(
                &txn.changes,
                &commit,
                &mut strays,
                &mut truncated,
                &mut seen,
            )?;
            end = txn.end_lsn;
        }
        self.settle(strays, truncated, seen, end).await?;
        Ok(self.applied)
    }

    async fn apply_spilled(
        &mut self,
        path: &Path,
        commit: &Commit,
        batch_rows: usize,
    ) -> Result<(), RunError> {
        if commit.end_lsn <= self.applied {
            return Ok(());
        }
        let spill = |e: cutover_replication::spill::SpillError| {
            strays_error(
                format!("reading a large target transaction from disk: {e}"),
                false,
            )
        };
        let (mut strays, mut truncated, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        let mut reader = cutover_replication::spill::SpillReader::open(path).map_err(spill)?;
        loop {
            let changes = reader.next_batch(batch_rows).map_err(spill)?;
            if changes.is_empty() {
                break;
            }
            self.collect(&changes, commit, &mut strays, &mut truncated, &mut seen)?;
        }
        self.settle(strays, truncated, seen, commit.end_lsn).await
    }

    fn wanted(&self, change: &Change, _commit_lsn: Lsn) -> bool {
        change
            .origin
            .as_deref()
            .is_none_or(|origin| !self.skipped.iter().any(|s| s == origin))
    }

    fn applied(&self) -> Lsn {
        self.applied
    }

    fn durable(&self) -> Lsn {
        self.applied
    }

    fn flush_pending(&self) -> bool {
        false
    }

    async fn refresh_durable(&mut self) -> Result<Lsn, RunError> {
        Ok(self.applied)
    }

    async fn wait_durable(&mut self) -> Result<Lsn, RunError> {
        Ok(self.applied)
    }
}
