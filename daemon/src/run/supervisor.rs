//! The daemon's life: the copy (started again when a table was rewritten
//! under it), then stream sessions, started again with exponential backoff
//! after a transient failure; the background sampler beside them; the
//! last state recorded in the store.

use std::sync::Arc;
use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::sink::postgres::ApplyError;
use tokio::sync::watch;

use crate::config::Config;
use crate::copy::{self, CopyError, CopyMode, CopyOutcome};
use crate::direction::Direction;
use crate::live::{DaemonState, ErrorKind, Status};
use crate::store::{DeadLetter, RunStatus, Store, now_millis, now_secs};

use super::RunError;
use super::sampler::sample_lag;
use super::session::{stopped, stream_once};

/// How many times the copy starts again when a table is truncated just
/// after its snapshot.
pub(super) const COPY_ATTEMPTS: u32 = 10;

/// First wait after a transient failure; doubles up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

pub(super) async fn run_inner(
    config: &Config,
    store: &Store,
    shutdown: watch::Receiver<bool>,
    status: &Arc<Status>,
) -> Result<(), RunError> {
    // After a switch (reverse) or a rollback (forward again), the
    // direction streams from the slot the switch made, with no copy.
    let direction = status.direction();
    if store.switch_state()?.stream(direction).is_some() || direction == Direction::Reverse {
        let plan = stream_plan(config, store, direction, &status.metrics).await?;
        let config = config.for_direction(direction);
        let _sampler = AbortOnDrop(tokio::spawn(sample_lag(
            config.clone(),
            store.clone(),
            Arc::clone(status),
            plan.slot.clone(),
        )));
        tracing::info!(%direction, slot = %plan.slot, start = %plan.start, "streaming from the slot the last switch made");
        let watched = watching(&config, store, &shutdown, status);
        let streamed = stream_with_retries(&config, store, &plan, shutdown, status, None);
        return with_watcher(streamed, watched).await;
    }
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
    let mut backoff = FIRST_BACKOFF;
    let outcome = loop {
        let started = tokio::time::Instant::now();
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
            // A connection lost to the network or a restart: the same
            // resume rule, after a wait, for as long as it takes.
            Err(err) if err.is_transient() => {
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                let kind = if err.on_target() {
                    ErrorKind::TargetTransient
                } else {
                    ErrorKind::SourceTransient
                };
                status.error(kind, &err.to_string());
                tracing::warn!(error = %err, retry_in = ?backoff, "the copy lost a connection: it starts again after the wait, keeping the tables already copied");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopped(&mut stop) => {
                        tracing::info!("shutdown during the copy: it resumes on the next start");
                        return Ok(());
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => break other?,
        }
    };
    tracing::info!(slot = %outcome.slot, start = %outcome.start, "snapshot copied; streaming changes");
    if outcome.slot != config.slot {
        // A copy begun under another slot name streams from that slot.
        _sampler = sampler(&outcome.slot);
    }
    let watched = watching(config, store, &shutdown, status);
    let streamed = stream_with_retries(config, store, &outcome, shutdown, status, None);
    with_watcher(streamed, watched).await
}

/// The stray-write watcher ([`super::watch`]) beside the forward stream,
/// when `[[group]]`s are configured.
fn watching(
    config: &Config,
    store: &Store,
    shutdown: &watch::Receiver<bool>,
    status: &Arc<Status>,
) -> Option<tokio::task::JoinHandle<Result<(), RunError>>> {
    (!config.groups.is_empty() && status.direction() == Direction::Forward).then(|| {
        let mut reverse = Status::new(&Direction::Reverse.slot(&config.slot), Direction::Reverse);
        // Its conflicts are counted in the daemon's exported family.
        reverse.metrics.conflicts = status.metrics.conflicts.clone();
        reverse.metrics.verify_repaired_rows = status.metrics.verify_repaired_rows.clone();
        // So is its Kafka feed's.
        reverse.metrics.kafka_messages = status.metrics.kafka_messages.clone();
        reverse.metrics.kafka_bytes = status.metrics.kafka_bytes.clone();
        reverse.metrics.kafka_transactions = status.metrics.kafka_transactions.clone();
        reverse.metrics.kafka_commit_seconds = status.metrics.kafka_commit_seconds.clone();
        reverse.metrics.kafka_lag_bytes = status.metrics.kafka_lag_bytes.clone();
        let reverse = Arc::new(reverse);
        status.set_beside(Some(Arc::clone(&reverse)));
        let (config, store, shutdown, forward) = (
            config.clone(),
            store.clone(),
            shutdown.clone(),
            Arc::clone(status),
        );
        tokio::spawn(async move {
            // `HOLD REVERSE` finds no stream once this one ends.
            let _cleared = ClearBeside(Arc::clone(&forward));
            // The reverse stream and the resolver: the first to fail
            // stops both.
            tokio::try_join!(
                super::watch::watch(
                    config.clone(),
                    store.clone(),
                    shutdown.clone(),
                    Arc::clone(&forward),
                    Arc::clone(&reverse),
                ),
                super::watch::resolve(config, store, shutdown, Arc::clone(&forward), reverse),
            )
            .map(|_| ())
        })
    })
}

/// Forgets the stream beside `0` when dropped (ended or aborted).
struct ClearBeside(Arc<Status>);

impl Drop for ClearBeside {
    fn drop(&mut self) {
        self.0.set_beside(None);
    }
}

/// Runs the stream until it ends; a watcher that fails stops it with its
/// error (a stray write must not go unanswered), and one that ends is
/// stopped with it.
async fn with_watcher(
    streamed: impl std::future::Future<Output = Result<(), RunError>>,
    watched: Option<tokio::task::JoinHandle<Result<(), RunError>>>,
) -> Result<(), RunError> {
    let Some(mut watcher) = watched else {
        return streamed.await;
    };
    tokio::pin!(streamed);
    let mut watching = true;
    loop {
        tokio::select! {
            result = &mut streamed => {
                watcher.abort();
                return result;
            }
            ended = &mut watcher, if watching => {
                watching = false;
                match ended {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return Err(err),
                    Err(join) if join.is_cancelled() => {}
                    Err(join) => {
                        return Err(RunError::Strays {
                            message: format!("it stopped: {join}"),
                            transient: false,
                        });
                    }
                }
            }
        }
    }
}

/// Streams sessions one after another, started again with exponential
/// backoff after a transient failure, until the shutdown, a definite
/// failure, or (with `until`) the target holds what the source held there.
pub(super) async fn stream_with_retries(
    config: &Config,
    store: &Store,
    outcome: &CopyOutcome,
    shutdown: watch::Receiver<bool>,
    status: &Arc<Status>,
    until: Option<Lsn>,
) -> Result<(), RunError> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        match stream_once(config, store, outcome, shutdown.clone(), status, until).await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() => {
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                let kind = match &err {
                    RunError::Apply(_) => ErrorKind::TargetTransient,
                    RunError::Copy(copy) if copy.on_target() => ErrorKind::TargetTransient,
                    RunError::Kafka(_) => ErrorKind::KafkaTransient,
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

/// Where `direction` streams from: the slot the last switch or rollback
/// made for it, or, for the forward direction before any, the copy's (the
/// copy must be done). `config` is the migration's, not swapped.
pub async fn stream_plan(
    config: &Config,
    store: &Store,
    direction: Direction,
    metrics: &crate::metrics::Metrics,
) -> Result<CopyOutcome, RunError> {
    let state = store.switch_state()?;
    match state.stream(direction) {
        Some(start) => Ok(CopyOutcome {
            slot: start.slot.clone(),
            migration: store
                .copy_run()?
                .map_or_else(|| config.slot.clone(), |run| run.slot),
            start: start.start,
            copied_at: std::collections::HashMap::new(),
            tables: Vec::new(),
            publications: start.publications.clone(),
        }),
        None if direction == Direction::Forward => {
            Ok(copy::run(config, store, CopyMode::BeforeStreaming, metrics).await?)
        }
        // With groups, the way back streams beside the forward direction
        // from the target's own slot.
        None if !config.groups.is_empty() => super::watch::reverse_plan(config, store).await,
        None => Err(RunError::NoStream(direction)),
    }
}

/// Applies what the source committed before `until` and nothing after it,
/// then stops: the target holds exactly what the source held at `until`.
/// For `cutover verify` when no daemon runs; the copy must be done.
pub async fn catch_up(
    config: &Config,
    store: &Store,
    status: &Arc<Status>,
    until: Lsn,
) -> Result<(), RunError> {
    let plan = stream_plan(config, store, Direction::Forward, &status.metrics).await?;
    drain(config, store, status, &plan, until).await
}

/// Streams `plan` with `config` (already swapped for the reverse
/// direction) until the server written holds exactly what the server read
/// held at `until`: the switch's last catch-up and its drain to the fence.
pub async fn drain(
    config: &Config,
    store: &Store,
    status: &Arc<Status>,
    plan: &CopyOutcome,
    until: Lsn,
) -> Result<(), RunError> {
    // Never stopped from outside: the session ends at `until`.
    let (_keep, shutdown) = watch::channel(false);
    stream_with_retries(config, store, plan, shutdown, status, Some(until)).await
}

/// Aborts a background task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
