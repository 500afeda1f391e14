//! `cutover run`: copy the snapshot if it is not copied, then stream
//! changes to the target until stopped.
//!
//! ```text
//! stream (reader task) ──decode──> transactions ──bounded queue──> applier
//!        ^                          (items + bytes)                   │
//!        └──────────── durable LSN (watch) <── target COMMIT ─────────┘
//! ```
//!
//! The reader owns the replication stream and the decoder. It buffers each
//! transaction until its commit, spills streamed transactions to disk, and
//! hands committed transactions to the applier through a queue bounded in
//! transactions and in bytes: a slow or paused target shows as lag, never
//! as memory growth. The flush position reported to the source is only
//! ever what the applier reports as committed on the target.
//!
//! Transient failures (either server restarting, a network cut) end the
//! session; it is started again with exponential backoff and resumes from
//! the position recorded on the target. Definite failures stop the daemon
//! with the error.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::change::{Change, ChangeKind, Commit, SourceTransaction};
use cutover_replication::client::describe;
use cutover_replication::error::ReplicationError;
use cutover_replication::events;
use cutover_replication::pgoutput::{Decoder, Event};
use cutover_replication::session::{PgOutputOptions, Session};
use cutover_replication::sink::Sink;
use cutover_replication::sink::postgres::{ApplyError, PostgresSink};
use cutover_replication::slot;
use cutover_replication::spill::SpillWriter;
use cutover_replication::stream::{ReplicationStream, StreamMessage};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::config::{ApplySettings, Config};
use crate::copy::{self, CopyError, CopyMode, CopyOutcome};
use crate::live::{DaemonState, ErrorKind, Status};
use crate::store::{DeadLetter, LagSample, RunStatus, Store, now_millis, now_secs};

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The copy failed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// The source stream failed.
    #[error("source: {err}{}", err.hint().map(|h| format!(" ({h})")).unwrap_or_default())]
    Source {
        /// The error.
        err: ReplicationError,
    },
    /// Applying failed.
    #[error("{0}")]
    Apply(Box<ApplyError>),
    /// A streamed transaction could not be written to disk.
    #[error("{0}")]
    Spill(String),
    /// A logical message of cutover's own could not be read.
    #[error("source: {0}")]
    Message(String),
}

impl RunError {
    fn is_transient(&self) -> bool {
        match self {
            RunError::Copy(_) | RunError::Spill(_) | RunError::Message(_) => false,
            RunError::Source { err } => err.is_transient(),
            RunError::Apply(err) => err.is_transient(),
        }
    }
}

impl From<ApplyError> for RunError {
    fn from(err: ApplyError) -> Self {
        RunError::Apply(Box::new(err))
    }
}

impl From<ReplicationError> for RunError {
    fn from(err: ReplicationError) -> RunError {
        RunError::Source { err }
    }
}

/// How many times the copy starts again when a table is truncated just
/// after its snapshot.
const COPY_ATTEMPTS: u32 = 10;

/// First wait after a transient failure; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Copies if needed, then streams until `shutdown` turns true.
pub async fn run(
    config: &Config,
    store: &Store,
    shutdown: watch::Receiver<bool>,
    status: Arc<Status>,
) -> Result<(), RunError> {
    let result = run_inner(config, store, shutdown, &status).await;
    let (state, last_error) = match &result {
        Ok(()) => (DaemonState::Stopped, None),
        Err(err) => {
            status.error(ErrorKind::Definite, &err.to_string());
            if let RunError::Apply(apply) = err
                && let ApplyError::Refused {
                    op,
                    table,
                    key,
                    lsn,
                    detail,
                    sqlstate,
                } = apply.as_ref()
            {
                let letter = DeadLetter {
                    at_ms: now_millis(),
                    op: (*op).to_owned(),
                    table: table.to_string(),
                    key: key.clone(),
                    lsn: *lsn,
                    sqlstate: sqlstate.clone(),
                    detail: detail.clone(),
                };
                if let Err(e) = store.put_dead_letter(status.direction(), &letter) {
                    tracing::warn!(error = %e, "could not record the refused change");
                }
            }
            (DaemonState::Failed, Some(err.to_string()))
        }
    };
    status.set_state(state);
    let record = RunStatus {
        state: state.name().to_owned(),
        applied_lsn: status.applied_lsn(),
        at: now_secs(),
        last_error,
    };
    if store.put_run_status(status.direction(), &record).is_ok() {
        let _ = store.flush().await;
    }
    result
}

async fn run_inner(
    config: &Config,
    store: &Store,
    shutdown: watch::Receiver<bool>,
    status: &Arc<Status>,
) -> Result<(), RunError> {
    status.set_state(DaemonState::Copying);
    // Lag and the slot's retained WAL are sampled from the start: during a
    // long copy the slot holds back WAL, which an operator must see.
    let sampler = |slot: &str| {
        AbortOnDrop(tokio::spawn(sample_lag(
            config.clone(),
            store.clone(),
            Arc::clone(status),
            slot.to_owned(),
        )))
    };
    let mut _sampler = sampler(&config.slot);
    // SIGTERM during the copy stops it at once: the chunks in flight roll
    // back with their connections, and the next start resumes by the copy's
    // rule (finished tables kept, the others copied again).
    let mut stop = shutdown.clone();
    let mut attempts = 0;
    let outcome = loop {
        let copied = tokio::select! {
            outcome = copy::run(config, store, CopyMode::BeforeStreaming, &status.metrics) => outcome,
            () = stopped(&mut stop) => {
                tracing::info!("shutdown during the copy: it resumes on the next start");
                return Ok(());
            }
        };
        match copied {
            // The resume rule takes a new snapshot for what is not copied.
            Err(CopyError::Rewritten(tables)) if attempts < COPY_ATTEMPTS => {
                attempts += 1;
                tracing::warn!(%tables, attempt = attempts, "a table was truncated or rewritten just after the copy's snapshot: copying it again from a new snapshot");
            }
            other => break other?,
        }
    };
    tracing::info!(slot = %outcome.slot, start = %outcome.start, "snapshot copied; streaming changes");
    if outcome.slot != config.slot {
        // A copy begun under another slot name streams from that slot.
        _sampler = sampler(&outcome.slot);
    }
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        match stream_once(config, store, &outcome, shutdown.clone(), status).await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() => {
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                let kind = match err {
                    RunError::Apply(_) => ErrorKind::TargetTransient,
                    _ => ErrorKind::SourceTransient,
                };
                status.error(kind, &err.to_string());
                status.set_state(DaemonState::Reconnecting);
                tracing::warn!(error = %err, retry_in = ?backoff, "transient failure; reconnecting");
                let mut shutdown = shutdown.clone();
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

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Samples lag every `state.lag_sample_seconds`: bytes from the source's
/// WAL position against the last applied commit (before the first, during
/// the copy, against the slot's confirmed position), seconds from the
/// oldest pending commit, and the slot's retained WAL. Stored (a week of
/// samples) and exported. A source that cannot be asked, or a slot not yet
/// created, leaves `bytes` unknown.
async fn sample_lag(config: Config, store: Store, status: Arc<Status>, slot: String) {
    let keep = (7 * 24 * 3600 / config.lag_sample_interval.as_secs().max(1)) as usize;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut ticker = tokio::time::interval(config.lag_sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = cutover_replication::client::connect(&config.source.conninfo)
                .await
                .ok();
        }
        let mut lag = crate::live::Lag {
            seconds: status.lag_seconds(),
            sampled_at: Some(now_secs()),
            ..Default::default()
        };
        if let Some(c) = &client {
            let state = slot::slot_state(c, &slot).await.ok().flatten();
            if let Ok(current) = slot::current_wal_lsn(c).await {
                lag.source_lsn = Some(current.to_string());
                let applied = match (
                    status.caught_up_lsn(),
                    state.as_ref().and_then(|s| s.confirmed_flush),
                ) {
                    (Some(applied), confirmed) => {
                        Some(confirmed.map_or(applied, |c| applied.max(c)))
                    }
                    (None, confirmed) => confirmed,
                };
                lag.bytes = applied.map(|applied| current.bytes_since(applied));
            }
            if let Some(state) = state {
                lag.slot_retained_bytes = state.retained_bytes.map(|b| b.max(0) as u64);
                lag.wal_status = state.wal_status;
                lag.slot_safe_wal_bytes = state.safe_wal_size;
            }
        }
        let sample = LagSample {
            at_ms: now_millis(),
            bytes: lag.bytes,
            seconds: lag.seconds,
            retained_bytes: lag.slot_retained_bytes,
            wal_status: lag.wal_status.clone(),
        };
        status.set_lag(lag);
        if let Some(c) = &client {
            watch_new_keyless(c, &store, &config).await;
            watch_unstreamed(c, &store, &status).await;
            // The events are in the WAL once written: their rows can go.
            if let Err(err) = events::prune(c).await {
                tracing::debug!(error = %describe(&err), "could not prune cutover.events");
            }
            // Partitions created since the start get the TRUNCATE trigger.
            if let Err(err) = copy::install_partition_triggers(c, &config).await {
                tracing::warn!(error = %err, "could not add cutover's TRUNCATE trigger to new partitions");
            }
        }
        if let Err(err) = store.put_lag_sample(status.direction(), &sample, keep) {
            tracing::warn!(error = %err, "could not store a lag sample");
        }
        let record = RunStatus {
            state: status.state().name().to_owned(),
            applied_lsn: status.applied_lsn(),
            at: now_secs(),
            last_error: status.view().last_error.map(|e| e.message),
        };
        let _ = store.put_run_status(status.direction(), &record);
    }
}

/// Keyless tables that joined the `_inserts` publication while streaming
/// (created on the source, published by cutover's DDL trigger) are watched
/// from their creation on: their counters started at zero then.
async fn watch_new_keyless(client: &tokio_postgres::Client, store: &Store, config: &Config) {
    let inserts = crate::coverage::inserts_publication(&config.publication);
    let Ok(published) = slot::publication_tables(client, &inserts).await else {
        return;
    };
    let known: Vec<TableName> = store
        .watches()
        .map(|w| w.into_iter().map(|w| w.table).collect())
        .unwrap_or_default();
    for table in published.into_iter().filter(|t| !known.contains(t)) {
        tracing::warn!(%table, "{}", crate::coverage::explain(crate::coverage::Coverage::InsertsOnly));
        let watch = crate::coverage::Watch::new(
            table,
            crate::coverage::Coverage::InsertsOnly,
            crate::coverage::WriteCounts::default(),
        );
        if let Err(err) = store.put_watch(&watch) {
            tracing::warn!(error = %err, "could not store a watched table");
        }
    }
}

/// Counts, for each table whose changes do not all stream, the rows the
/// source changed since the watch began that the stream did not carry
/// (see [`crate::coverage`]), and reports them. A new count is logged
/// once as a warning.
async fn watch_unstreamed(client: &tokio_postgres::Client, store: &Store, status: &Status) {
    let watches = match store.watches() {
        Ok(watches) if !watches.is_empty() => watches,
        Ok(_) => return,
        Err(err) => {
            tracing::warn!(error = %err, "could not read the watched tables");
            return;
        }
    };
    let names: Vec<&TableName> = watches.iter().map(|w| &w.table).collect();
    let counts = match crate::coverage::write_counts(client, &names).await {
        Ok(counts) => counts,
        Err(err) => {
            tracing::warn!(error = %describe(&err), "could not read the source's table statistics");
            return;
        }
    };
    for mut watch in watches {
        let Some(now) = counts.get(&watch.table) else {
            continue;
        };
        let before = watch.counted;
        let rows = watch.observe(*now);
        if rows > before {
            tracing::warn!(
                table = %watch.table,
                rows,
                coverage = watch.coverage.name(),
                "rows changed on the source that the stream does not carry: the target differs from the source for them; run cutover verify"
            );
        }
        status.set_unstreamed(&watch.table.to_string(), rows);
        if let Err(err) = store.put_watch(&watch) {
            tracing::warn!(error = %err, "could not store a watched table's count");
        }
    }
}

/// Work for the applier.
enum Work {
    /// A transaction held in memory, with its share of the byte budget.
    Memory(SourceTransaction, OwnedSemaphorePermit),
    /// A streamed (or very large) transaction on disk.
    Spilled(PathBuf, Commit),
}

/// One session: connect both sides, stream and apply until a failure or
/// the shutdown.
async fn stream_once(
    config: &Config,
    store: &Store,
    outcome: &CopyOutcome,
    shutdown: watch::Receiver<bool>,
    status: &Arc<Status>,
) -> Result<(), RunError> {
    // This direction's writes carry its origin; changes that the other
    // direction wrote are not sent back (invariant 5).
    let direction = status.direction();
    let origin = direction.origin(&outcome.slot);
    let mut applier = PostgresSink::connect(
        &config.target.conninfo,
        &origin,
        outcome.copied_at.clone(),
        vec![direction.opposite().origin(&outcome.slot)],
    )
    .await?;
    applier.set_ddl_policy(config.ddl);
    let start = applier.applied().max(outcome.start);
    let session = Session::connect(&config.source.conninfo).await?;
    let publications = if outcome.publications.is_empty() {
        vec![config.publication.clone()]
    } else {
        outcome.publications.clone()
    };
    let options = PgOutputOptions::for_server(session.server_version_num(), publications);
    let stream = session
        .start_replication(&outcome.slot, start, &options)
        .await?;
    tracing::info!(slot = %outcome.slot, %start, origin, "streaming");
    status.start_at(start);

    let settings = config.apply.clone();
    let (work_tx, work_rx) = mpsc::channel::<Work>(settings.queue_transactions);
    let budget = Arc::new(Semaphore::new(settings.queue_bytes));
    let (durable_tx, durable_rx) = watch::channel(start);
    let spill_dir = store.dir().join("spill");
    let queue = Queue {
        work: work_tx,
        budget,
        budget_bytes: settings.queue_bytes,
        status: Arc::clone(status),
    };
    status.reset_pending();
    status.set_state(if status.paused() {
        DaemonState::Paused
    } else {
        DaemonState::Streaming
    });
    let reader = tokio::spawn(read_stream(
        stream,
        spill_dir,
        settings.clone(),
        queue,
        durable_rx,
        shutdown.clone(),
    ));
    let applied = apply_work(
        applier,
        work_rx,
        durable_tx,
        settings,
        shutdown,
        Arc::clone(status),
    )
    .await;
    match applied {
        Ok(()) => reader
            .await
            .unwrap_or_else(|e| Err(RunError::Spill(format!("the stream reader stopped: {e}")))),
        Err(err) => {
            reader.abort();
            Err(err)
        }
    }
}

/// The reader: stream → decoder → committed transactions on the queue.
async fn read_stream(
    mut stream: ReplicationStream,
    spill_dir: PathBuf,
    settings: ApplySettings,
    queue: Queue,
    mut durable: watch::Receiver<Lsn>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let mut decoder = Decoder::new();
    let mut current: Option<(SourceTransaction, usize)> = None;
    let mut big: Option<SpillWriter> = None;
    let mut streamed: HashMap<u32, SpillWriter> = HashMap::new();
    // The transaction of the stream block being read, if in one.
    let mut forwarded = *durable.borrow();
    // Acknowledgements are sent at most every FEEDBACK_EVERY: each one that
    // moves the slot makes the walsender save (and fsync) the slot's state
    // file, and one per applied batch would stall the stream it feeds.
    let mut feedback = tokio::time::interval(FEEDBACK_EVERY);
    feedback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acknowledged = forwarded;
    loop {
        // What one read brought is decoded in one go; the duties below
        // (shutdown, durability, acknowledgements) are looked at between
        // reads, not per message: polling them costs more than decoding.
        let message = match stream.next_buffered()? {
            Some(message) => Some(message),
            None => tokio::select! {
                biased;
                // Stop reading; the applier finishes its batch and reports.
                () = stopped(&mut shutdown) => break,
                // Durable on the target: the flush position may move up to
                // here (invariant 1), reported with the next tick.
                changed = durable.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let lsn = *durable.borrow_and_update();
                    stream.set_flushed(lsn);
                    continue;
                }
                _ = feedback.tick() => {
                    let lsn = *durable.borrow();
                    if lsn > acknowledged {
                        stream.set_flushed(lsn);
                        stream.send_status().await?;
                        acknowledged = lsn;
                    }
                    continue;
                }
                message = stream.next() => message?,
            },
        };
        let Some(message) = message else {
            // The server ended the stream (shutting down): reconnect.
            if !*shutdown.borrow() {
                return Err(stream.ended_by_server().into());
            }
            break;
        };
        let (lsn, data) = match message {
            StreamMessage::XLogData {
                wal_start, data, ..
            } => (wal_start, data),
            StreamMessage::Keepalive { wal_end, .. } => {
                // Nothing in flight and everything forwarded is durable:
                // the source may forget up to here (as PostgreSQL's own
                // apply does), or an idle database would retain WAL.
                let idle = current.is_none()
                    && big.is_none()
                    && streamed.is_empty()
                    && !decoder.in_transaction();
                if idle && *durable.borrow() >= forwarded {
                    stream.set_flushed(wal_end);
                    queue.status.caught_up(wal_end);
                }
                continue;
            }
        };
        let event = decoder
            .decode(lsn, data)
            .map_err(|source| ReplicationError::Decode {
                endpoint: stream.endpoint().to_owned(),
                lsn,
                source,
            })?;
        let event = match event {
            // cutover's own events on the source (see `events`): an insert
            // stands for the change it records, at its place; anything
            // else done to the table is not the application's.
            Event::Change(change) => match &change.kind {
                ChangeKind::Insert { relation, new } if events::is_events(relation) => {
                    let kind = events::from_row(relation, new, change.lsn)
                        .map_err(|e| RunError::Message(e.to_string()))?;
                    Event::Change(Change { kind, ..change })
                }
                ChangeKind::Insert { relation, .. }
                | ChangeKind::Update { relation, .. }
                | ChangeKind::Delete { relation, .. }
                    if events::is_events(relation) =>
                {
                    continue;
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
                        continue;
                    }
                    let kind = ChangeKind::Truncate {
                        relations,
                        cascade: *cascade,
                        restart_identity: *restart_identity,
                    };
                    Event::Change(Change { kind, ..change })
                }
                _ => Event::Change(change),
            },
            other => other,
        };
        match event {
            Event::Begin {
                xid,
                final_lsn,
                commit_time,
            } => {
                current = Some((
                    SourceTransaction {
                        xid,
                        commit_lsn: final_lsn,
                        end_lsn: final_lsn,
                        commit_time,
                        changes: Vec::new(),
                    },
                    0,
                ));
            }
            Event::Change(change) if change.commit_lsn.is_none() => {
                // Part of a streamed transaction: to disk until it commits.
                let writer = match streamed.entry(change.xid) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(
                        SpillWriter::create(&spill_dir, change.xid)
                            .map_err(|e| RunError::Spill(e.to_string()))?,
                    ),
                };
                writer
                    .push(&change)
                    .map_err(|e| RunError::Spill(e.to_string()))?;
            }
            Event::Change(change) => {
                if let Some(writer) = big.as_mut() {
                    writer
                        .push(&change)
                        .map_err(|e| RunError::Spill(e.to_string()))?;
                } else if let Some((tx, size)) = current.as_mut() {
                    *size += approximate_size(&change);
                    tx.changes.push(change);
                    if *size > settings.spill_bytes {
                        // Too big for memory (no server-side streaming):
                        // move it to disk.
                        let mut writer = SpillWriter::create(&spill_dir, tx.xid)
                            .map_err(|e| RunError::Spill(e.to_string()))?;
                        for change in tx.changes.drain(..) {
                            writer
                                .push(&change)
                                .map_err(|e| RunError::Spill(e.to_string()))?;
                        }
                        big = Some(writer);
                    }
                }
            }
            Event::Commit(commit) => {
                let Some((mut tx, size)) = current.take() else {
                    continue;
                };
                forwarded = commit.end_lsn;
                let item = if let Some(writer) = big.take() {
                    let path = writer
                        .finish()
                        .map_err(|e| RunError::Spill(e.to_string()))?;
                    Pending::Spilled(path, commit)
                } else {
                    tx.end_lsn = commit.end_lsn;
                    tx.commit_time = commit.commit_time;
                    // A vector grown by doubling holds up to twice its
                    // changes' slots (four for a one-row transaction).
                    tx.changes.shrink_to_fit();
                    Pending::Memory(tx, size)
                };
                if !queue
                    .push(&mut stream, &durable, &mut shutdown, item)
                    .await?
                {
                    break;
                }
            }
            Event::StreamCommit(commit) => {
                forwarded = commit.end_lsn;
                match streamed.remove(&commit.xid) {
                    Some(writer) => {
                        let path = writer
                            .finish()
                            .map_err(|e| RunError::Spill(e.to_string()))?;
                        if !queue
                            .push(
                                &mut stream,
                                &durable,
                                &mut shutdown,
                                Pending::Spilled(path, commit),
                            )
                            .await?
                        {
                            break;
                        }
                    }
                    None => {
                        // A streamed transaction without rows in scope:
                        // still record its position.
                        let tx = SourceTransaction {
                            xid: commit.xid,
                            commit_lsn: commit.commit_lsn,
                            end_lsn: commit.end_lsn,
                            commit_time: commit.commit_time,
                            changes: Vec::new(),
                        };
                        if !queue
                            .push(&mut stream, &durable, &mut shutdown, Pending::Memory(tx, 1))
                            .await?
                        {
                            break;
                        }
                    }
                }
            }
            Event::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    if let Some(writer) = streamed.remove(&xid) {
                        writer.discard();
                    }
                } else if let Some(writer) = streamed.get_mut(&xid) {
                    writer
                        .abort_subtransaction(subxid)
                        .map_err(|e| RunError::Spill(e.to_string()))?;
                }
            }
            Event::Origin { .. }
            | Event::Relation(_)
            | Event::Type(_)
            | Event::Message(_)
            | Event::StreamStart { .. }
            | Event::StreamStop { .. } => {}
        }
    }
    // Shutdown: wait for the applier's last word, report it, stop cleanly.
    tracing::debug!("stream reader stopping: waiting for the applier's last durable position");
    drop(queue);
    while durable.changed().await.is_ok() {}
    tracing::debug!(flushed = %*durable.borrow(), "stopping the stream");
    let last = *durable.borrow();
    stream.set_flushed(last);
    match stream.stop().await {
        Ok(_) => {}
        // The final position went out before CopyDone: closing the
        // connection without the server's answer loses nothing.
        Err(ReplicationError::Timeout { .. }) => {
            tracing::warn!(flushed = %last, "the source did not confirm the end of the stream in time; closing the connection");
        }
        Err(err) => return Err(err.into()),
    }
    for (_, writer) in streamed {
        writer.discard();
    }
    tracing::info!(flushed = %last, "stream stopped");
    Ok(())
}

/// Resolves once shutdown is requested (never holds the watch lock).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A committed transaction on its way to the applier.
enum Pending {
    /// In memory, with its approximate size.
    Memory(SourceTransaction, usize),
    /// On disk.
    Spilled(PathBuf, Commit),
}

/// The reader's end of the bounded queue to the applier.
struct Queue {
    work: mpsc::Sender<Work>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    status: Arc<Status>,
}

/// How often an idle applier asks the target whether its asynchronous
/// commits are flushed.
const FLUSH_CHECK_EVERY: Duration = Duration::from_millis(20);

/// How long a stopping applier waits for the target to flush what it
/// committed before it reports only what is known durable.
const SHUTDOWN_FLUSH_WAIT: Duration = Duration::from_secs(10);

/// How often the durable position is acknowledged to the source.
const FEEDBACK_EVERY: Duration = Duration::from_millis(200);

impl Queue {
    /// Queues `item`, waiting for room (items and bytes) while keeping the
    /// stream alive with status updates: while the queue is full (a slow
    /// or paused applier) the reader still reports to the source at the
    /// stream's status interval (`wal_sender_timeout / 3`), so that the
    /// server never cuts a connection that is merely waiting.
    ///
    /// Returns `false`, without queueing, when shutdown is requested while
    /// waiting: the item was never acknowledged, so the source sends it
    /// again on the next start.
    async fn push(
        &self,
        stream: &mut ReplicationStream,
        durable: &watch::Receiver<Lsn>,
        shutdown: &mut watch::Receiver<bool>,
        item: Pending,
    ) -> Result<bool, RunError> {
        let waiting_status_every = stream.status_interval();
        let (end_lsn, commit_time) = match &item {
            Pending::Memory(tx, _) => (tx.end_lsn, tx.commit_time),
            Pending::Spilled(_, commit) => (commit.end_lsn, commit.commit_time),
        };
        self.status.received(end_lsn, commit_time.to_system_time());
        let permits = match &item {
            Pending::Memory(_, size) => (*size).clamp(1, self.budget_bytes),
            Pending::Spilled(..) => 1,
        } as u32;
        let permit = loop {
            tokio::select! {
                biased;
                () = stopped(shutdown) => return Ok(false),
                permit = Arc::clone(&self.budget).acquire_many_owned(permits) => {
                    break permit.map_err(|_| RunError::Spill("the byte budget closed".into()))?;
                }
                () = tokio::time::sleep(waiting_status_every) => {
                    stream.set_flushed(*durable.borrow());
                    stream.send_status().await?;
                }
            }
        };
        let slot = loop {
            tokio::select! {
                biased;
                () = stopped(shutdown) => return Ok(false),
                slot = self.work.reserve() => {
                    break slot.map_err(|_| RunError::Spill("the applier stopped".into()))?;
                }
                () = tokio::time::sleep(waiting_status_every) => {
                    stream.set_flushed(*durable.borrow());
                    stream.send_status().await?;
                }
            }
        };
        slot.send(match item {
            Pending::Memory(tx, _) => Work::Memory(tx, permit),
            Pending::Spilled(path, commit) => {
                drop(permit);
                Work::Spilled(path, commit)
            }
        });
        Ok(true)
    }
}

/// Changes of a batch by (table, op), for the metrics. Counted per
/// relation first (a pointer comparison per change), named once per table.
fn count_changes(batch: &[SourceTransaction]) -> BTreeMap<(String, &'static str), u64> {
    use cutover_replication::change::Relation;
    fn count<'a>(
        tally: &mut Vec<(&'a Arc<Relation>, &'static str, u64)>,
        relation: &'a Arc<Relation>,
        op: &'static str,
    ) {
        match tally
            .iter_mut()
            .find(|(r, o, _)| *o == op && Arc::ptr_eq(r, relation))
        {
            Some((_, _, n)) => *n += 1,
            None => tally.push((relation, op, 1)),
        }
    }
    let mut tally = Vec::new();
    let mut partitions = Vec::new();
    for change in batch.iter().flat_map(|tx| &tx.changes) {
        let op = change.kind.op();
        match &change.kind {
            ChangeKind::Insert { relation, .. }
            | ChangeKind::Update { relation, .. }
            | ChangeKind::Delete { relation, .. } => count(&mut tally, relation, op),
            ChangeKind::Truncate { relations, .. } => {
                for relation in relations {
                    count(&mut tally, relation, op);
                }
            }
            ChangeKind::TruncatePartition(truncate) => partitions.push(&truncate.root),
            ChangeKind::Ddl(_) => {}
        }
    }
    let mut counts = BTreeMap::new();
    for root in partitions {
        *counts.entry((root.to_string(), "truncate")).or_insert(0) += 1;
    }
    for (relation, op, n) in tally {
        *counts.entry((relation.name.to_string(), op)).or_insert(0) += n;
    }
    counts
}

/// Approximate memory a change holds while it waits for the applier, for
/// the byte budget: its own struct, its tuples' datum slots, and the
/// message its values point into (the values, about 5 bytes of framing
/// per column, and the message and allocation headers). Counting only the
/// values undercounts a narrow row several times over, and the queue would
/// hold several times its budget.
fn approximate_size(change: &cutover_replication::change::Change) -> usize {
    use cutover_replication::change::{Change, ChangeKind, Datum, Tuple};
    use std::mem::size_of;
    const MESSAGE_OVERHEAD: usize = 64;
    let tuple = |t: &Tuple| -> usize {
        t.0.capacity() * size_of::<Datum>()
            + t.0
                .iter()
                .map(|d| match d {
                    Datum::Text(b) | Datum::Binary(b) => b.len() + 5,
                    _ => 5,
                })
                .sum::<usize>()
    };
    size_of::<Change>()
        + MESSAGE_OVERHEAD
        + match &change.kind {
            ChangeKind::Insert { new, .. } => tuple(new),
            ChangeKind::Update { old, new, .. } => {
                tuple(new) + old.as_ref().map(|o| tuple(o.tuple())).unwrap_or(0)
            }
            ChangeKind::Delete { old, .. } => tuple(old.tuple()),
            ChangeKind::Truncate { relations, .. } => relations.len() * 8,
            ChangeKind::TruncatePartition(truncate) => {
                size_of::<cutover_replication::partition::PartitionTruncate>()
                    + truncate.constraint.len()
                    + truncate.bound.len()
            }
            ChangeKind::Ddl(ddl) => {
                size_of::<cutover_replication::ddl::DdlChange>()
                    + ddl.statement.len()
                    + ddl.columns.as_ref().map_or(0, |c| c.len() * 128)
            }
        }
}

/// The applier: batches what is queued, applies, reports durability.
async fn apply_work<S: Sink>(
    mut applier: S,
    mut work: mpsc::Receiver<Work>,
    durable: watch::Sender<Lsn>,
    settings: ApplySettings,
    shutdown: watch::Receiver<bool>,
    status: Arc<Status>,
) -> Result<(), RunError>
where
    RunError: From<S::Error>,
{
    let mut held: Option<Work> = None;
    let mut pause = status.pause_watch();
    loop {
        if *shutdown.borrow() {
            break;
        }
        if *pause.borrow_and_update() {
            // Paused by an operator: take nothing; the queue fills and the
            // reader holds the stream's position.
            let _ = durable.send(applier.wait_durable().await?);
            tracing::info!(position = %applier.applied(), "applier paused");
            let mut stop = shutdown.clone();
            tokio::select! {
                () = stopped(&mut stop) => break,
                _ = pause.wait_for(|paused| !*paused) => {}
            }
            tracing::info!("applier resumed");
            continue;
        }
        let first = match held.take() {
            Some(item) => item,
            None => {
                let mut stop = shutdown.clone();
                tokio::select! {
                    biased;
                    () = stopped(&mut stop) => break,
                    // PAUSE while idle: look again before taking anything.
                    Ok(()) = pause.changed() => continue,
                    // Batches committed asynchronously: report them durable
                    // once the target flushed them.
                    () = tokio::time::sleep(FLUSH_CHECK_EVERY), if applier.flush_pending() => {
                        let _ = durable.send(applier.refresh_durable().await?);
                        continue;
                    }
                    item = work.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                }
            }
        };
        match first {
            Work::Spilled(path, commit) => {
                applier
                    .apply_spilled(&path, &commit, settings.batch_rows)
                    .await?;
                let _ = std::fs::remove_file(&path);
                status.applied(applier.applied(), 1, &BTreeMap::new());
            }
            Work::Memory(tx, permit) => {
                // Take what is already waiting, up to the batch bounds, and
                // for at most `batch_ms` what arrives next: low latency
                // when idle, big batches under load.
                let mut rows = tx.changes.len();
                let mut bytes = permit.num_permits();
                let mut batch = vec![tx];
                let mut permits = vec![permit];
                let deadline = tokio::time::Instant::now() + settings.batch_wait;
                let mut stop = shutdown.clone();
                while rows < settings.batch_rows && bytes < settings.batch_bytes {
                    let next = match work.try_recv() {
                        Ok(item) => Some(item),
                        Err(_) if settings.batch_wait.is_zero() => None,
                        Err(_) => tokio::select! {
                            biased;
                            // Stopping: apply what the batch holds.
                            () = stopped(&mut stop) => None,
                            () = tokio::time::sleep_until(deadline) => None,
                            item = work.recv() => item,
                        },
                    };
                    match next {
                        Some(Work::Memory(tx, permit)) => {
                            rows += tx.changes.len();
                            bytes += permit.num_permits();
                            batch.push(tx);
                            permits.push(permit);
                        }
                        Some(other) => {
                            held = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                let started = std::time::Instant::now();
                applier.apply(&batch).await?;
                status.applied(
                    applier.applied(),
                    batch.len() as u64,
                    &count_changes(&batch),
                );
                tracing::debug!(
                    transactions = batch.len(),
                    rows,
                    ms = started.elapsed().as_millis() as u64,
                    position = %applier.applied(),
                    "batch applied"
                );
                drop(permits);
            }
        }
        let _ = durable.send(applier.durable());
    }
    // Everything applied is flushed before the last acknowledgement;
    // dropping the sender tells the reader the last durable position.
    tracing::debug!(applied = %applier.applied(), "applier stopping: waiting for the target to flush");
    let last = match tokio::time::timeout(SHUTDOWN_FLUSH_WAIT, applier.wait_durable()).await {
        Ok(result) => result?,
        Err(_) => {
            // Acknowledging less than was applied is always safe: the
            // source sends the rest again and the origin skips it.
            tracing::warn!(
                applied = %applier.applied(),
                durable = %applier.durable(),
                "the target did not confirm its WAL flush in time; acknowledging only what it confirmed"
            );
            applier.durable()
        }
    };
    let _ = durable.send(last);
    tracing::debug!(durable = %last, "applier stopped");
    Ok(())
}
