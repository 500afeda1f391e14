//! One stream session: connect the sink and the source, then run the
//! reader and the applier until a failure or the shutdown.

use std::sync::Arc;

use cutover_replication::Lsn;
use cutover_replication::session::{PgOutputOptions, Session};
use cutover_replication::sink::Sink;
use cutover_replication::sink::filter::Filter;
use cutover_replication::sink::kafka::{Committed, FeedError, FeedId, KafkaSettings, KafkaSink};
use cutover_replication::sink::postgres::PostgresSink;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::Config;
use crate::copy::CopyOutcome;
use crate::direction::Direction;
use crate::live::{DaemonState, Status};
use crate::store::Store;

use super::RunError;
use super::applier::apply_work;
use super::queue::{Queue, Work};
use super::reader::read_stream;
use super::routed::{Routed, Routing, read_by};

/// One session: connect both sides, stream and apply until a failure, the
/// shutdown, or (with `until`) the target holds exactly what the source
/// held at that position.
pub(super) async fn stream_once(
    config: &Config,
    store: &Store,
    outcome: &CopyOutcome,
    shutdown: watch::Receiver<bool>,
    status: &Arc<Status>,
    until: Option<Lsn>,
) -> Result<(), RunError> {
    // This direction's writes carry its origin; changes that the other
    // direction wrote are not sent back (invariant 5).
    let direction = status.direction();
    let origin = direction.origin(&outcome.migration);
    let mut skipped = direction.skipped_origins(&outcome.migration);
    // The repairs of stray writes are written under an origin named after
    // the configured slot, which may differ from the migration's (the
    // slot the copy ran under).
    let configured = match direction {
        crate::direction::Direction::Forward => config.slot.as_str(),
        crate::direction::Direction::Reverse => config
            .slot
            .strip_suffix("_reverse")
            .unwrap_or(config.slot.as_str()),
    };
    for origin in direction.skipped_origins(configured) {
        if !skipped.contains(&origin) {
            skipped.push(origin);
        }
    }
    let Some(target) = &config.target else {
        // A Kafka feed alone: the stream's changes go to Kafka only.
        let settings = config.kafka.as_ref().ok_or(crate::config::NoTarget)?;
        let filter = Filter::new(outcome.copied_at.clone(), skipped);
        let feed = feed(settings, config, outcome, filter, status).await?;
        let start = feed.applied().max(outcome.start);
        return run_session(feed, start, config, store, outcome, shutdown, status, until).await;
    };
    let mut applier = PostgresSink::connect(
        &target.conninfo,
        &origin,
        outcome.copied_at.clone(),
        skipped,
    )
    .await?;
    applier.set_ddl_policy(config.ddl);
    if !config.mappings.is_empty() {
        applier.set_mappings(stream_mappings(config, target).await?);
    }
    // With groups, each table goes by its group's primary (`switch
    // --group`); without, the routing sink passes everything through.
    let state = store.switch_state()?;
    let mut routed = Routed::new(
        applier,
        Routing {
            store: store.clone(),
            groups: config.groups.clone(),
            state: &state,
            direction,
            migration: &outcome.migration,
            configured,
            conflicts: status.metrics.conflicts.clone(),
        },
    )?;
    if let Some(settings) = &config.kafka {
        let mut feed = feed(settings, config, outcome, routed.filter().clone(), status).await?;
        if settings.snapshot && direction == Direction::Forward && feed.snapshot_pending() {
            snapshot(&mut feed, config, outcome, routed.applied()).await?;
        }
        routed.set_feed(feed);
    }
    let start = routed.applied().max(outcome.start);
    run_session(
        routed, start, config, store, outcome, shutdown, status, until,
    )
    .await
}

/// The direction's `[[map]]`s, checked against its two servers.
async fn stream_mappings(
    config: &Config,
    target: &crate::config::Server,
) -> Result<Vec<cutover_replication::mapping::Mapping>, RunError> {
    let connect = |conninfo, role| async move {
        cutover_replication::client::connect(conninfo)
            .await
            .map_err(|source| RunError::Copy(crate::copy::CopyError::Connect { role, source }))
    };
    let source = connect(&config.source.conninfo, "source").await?;
    let written = connect(&target.conninfo, "target").await?;
    Ok(crate::copy::mappings(config, &source, &written).await?)
}

/// Streams the slot from `start` into `sink` until a failure, the
/// shutdown, or (with `until`) that position.
#[allow(clippy::too_many_arguments)]
async fn run_session<S: Sink>(
    sink: S,
    start: Lsn,
    config: &Config,
    store: &Store,
    outcome: &CopyOutcome,
    shutdown: watch::Receiver<bool>,
    status: &Arc<Status>,
    until: Option<Lsn>,
) -> Result<(), RunError>
where
    RunError: From<S::Error>,
{
    let origin = status.direction().origin(&outcome.migration);
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
        until,
    ));
    let applied = apply_work(
        sink,
        work_rx,
        durable_tx,
        settings,
        shutdown,
        Arc::clone(status),
        until,
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

/// The stream's Kafka feed: the changes `filter` takes (those the target
/// is given, beside a target), published from the feed's last committed
/// position (or the stream's first).
async fn feed(
    settings: &KafkaSettings,
    config: &Config,
    outcome: &CopyOutcome,
    filter: Filter,
    status: &Arc<Status>,
) -> Result<KafkaSink, RunError> {
    let direction = status.direction();
    let id = FeedId {
        migration: outcome.migration.clone(),
        direction: direction.as_str(),
        server: read_by(direction).name(),
        database: config
            .source
            .conninfo
            .dbname()
            .unwrap_or_default()
            .to_owned(),
    };
    let mut feed = KafkaSink::connect(settings.clone(), id, filter, outcome.start).await?;
    status.kafka_committed(feed.committed());
    // Both series exist from the feed's start (the lag is sampled next).
    status
        .metrics
        .kafka_lag_bytes
        .with_label_values(&[direction.as_str()]);
    status
        .metrics
        .kafka_transactions
        .with_label_values(&[direction.as_str()]);
    let status = Arc::clone(status);
    feed.on_commit(Arc::new(move |committed: &Committed| {
        let metrics = &status.metrics;
        for (topic, (messages, bytes)) in &committed.topics {
            metrics
                .kafka_messages
                .with_label_values(&[topic])
                .inc_by(*messages);
            metrics
                .kafka_bytes
                .with_label_values(&[topic])
                .inc_by(*bytes);
        }
        metrics
            .kafka_transactions
            .with_label_values(&[status.direction().as_str()])
            .inc();
        metrics
            .kafka_commit_seconds
            .observe(committed.commit_seconds);
        status.kafka_committed(committed.end);
    }));
    Ok(feed)
}

/// Publishes the copy's rows to the feed (`[kafka] snapshot`), read from
/// the target before the stream applies anything there.
async fn snapshot(
    feed: &mut KafkaSink,
    config: &Config,
    outcome: &CopyOutcome,
    applied: Lsn,
) -> Result<(), RunError> {
    let refuse = |detail: &str, fix: &'static str| {
        RunError::Kafka(FeedError {
            what: "publishing the snapshot".into(),
            detail: detail.into(),
            fix: Some(fix),
            transient: false,
        })
    };
    if feed.fed_without_snapshot() {
        return Err(refuse(
            "the feed already carries changes, published without a snapshot",
            "a snapshot now would come after them: remove kafka.snapshot, or publish a new feed under another kafka.topic_prefix",
        ));
    }
    if applied > outcome.start {
        return Err(refuse(
            &format!(
                "the target has applied changes up to {applied} since the copy, so it no longer holds the copy's rows"
            ),
            "kafka.snapshot must be set before the first `cutover run`: remove it (the feed starts with the changes), or start the migration over",
        ));
    }
    let target = cutover_replication::client::connect(&config.target()?.conninfo)
        .await
        .map_err(|e| RunError::Apply(Box::new(e.into())))?;
    target
        .batch_execute(&cutover_replication::client::text_value_settings())
        .await
        .map_err(|e| {
            refuse(
                &cutover_replication::client::describe(&e),
                "check the target",
            )
        })?;
    let tables: Vec<_> = outcome.copied_at.keys().cloned().collect();
    tracing::info!(tables = tables.len(), "publishing the copy's rows to Kafka");
    // The tables are described as the source's catalog says, as the
    // stream describes them.
    let source = cutover_replication::client::connect(&config.source.conninfo)
        .await
        .map_err(|e| RunError::Source { err: e.into() })?;
    feed.publish_snapshot(&source, &target, &tables, outcome.start)
        .await?;
    Ok(())
}

/// Resolves once shutdown is requested (never holds the watch lock).
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
