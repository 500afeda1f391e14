//! The background sampler: lag in bytes and seconds, the slot's retained
//! WAL, and the writes to keyless tables that do not stream, recorded in
//! the store and exported.

use std::sync::Arc;

use cutover_replication::catalog::TableName;
use cutover_replication::client::describe;
use cutover_replication::events;
use cutover_replication::slot;

use crate::config::Config;
use crate::copy::{self};
use crate::live::Status;
use crate::store::{LagSample, RunStatus, Store, now_millis, now_secs};

/// Samples lag every `state.lag_sample_seconds`: bytes from the source's
/// WAL position against the last applied commit (before the first, during
/// the copy, against the slot's confirmed position), seconds from the
/// oldest pending commit, and the slot's retained WAL. Stored (a week of
/// samples) and exported. A source that cannot be asked, or a slot not yet
/// created, leaves `bytes` unknown.
pub(super) async fn sample_lag(config: Config, store: Store, status: Arc<Status>, slot: String) {
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
                if let Some(fed) = status.kafka_position() {
                    status
                        .metrics
                        .kafka_lag_bytes
                        .with_label_values(&[status.direction().as_str()])
                        .set(i64::try_from(current.bytes_since(fed)).unwrap_or(i64::MAX));
                }
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
pub(super) async fn watch_new_keyless(
    client: &tokio_postgres::Client,
    store: &Store,
    config: &Config,
) {
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
pub(super) async fn watch_unstreamed(
    client: &tokio_postgres::Client,
    store: &Store,
    status: &Status,
) {
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
