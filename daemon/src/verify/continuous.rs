//! The background verifier (`[verify] continuous = true`): while `run`
//! streams, every table in scope is compared again and again, one at a
//! time, each at a consistent position taken the way `cutover verify`
//! takes it beside a running daemon (the daemon's own applier is held in
//! process, [`crate::hold`], just long enough for the two snapshots), and
//! read at `verify.continuous_rate` source rows per second at most.
//!
//! What each table's last pass found is kept in the state store, exported
//! as `cutover_divergent_rows{table}` (with `cutover_verify_rows_total`
//! and `cutover_verify_last_pass_timestamp_seconds`), shown by the
//! console's `SHOW DIVERGENCE` and by `cutover status`, and turns
//! `/health` red past `verify.max_divergent_ratio`. With `verify.repair`
//! it makes the rows it finds differing equal to the source, the way
//! `cutover verify --repair` does beside a running daemon
//! ([`super::beside`]), logs each row it wrote and counts them in
//! `cutover_verify_repaired_rows_total`.

use std::sync::Arc;
use std::time::Duration;

use cutover_replication::catalog::TableName;
use tokio::sync::watch;

use crate::config::Config;
use crate::live::{DaemonState, Divergence, Status};
use crate::store::{Store, now_secs};

use super::beside;
use super::daemon::Holder;
use super::report::SampleKind;
use super::table::{self, Pacer, Plan};
use super::{VerifyError, plans, source_position_within, target_readers};

/// Who holds the applier while a table's position is taken.
const OWNER: &str = "the background verifier";
/// Differing rows kept per table and kind.
const SAMPLES: usize = 5;
/// How long the verifier waits after a failure before the next table.
const RETRY: Duration = Duration::from_secs(30);

/// Releases the applier when dropped: a verifier that fails or is
/// cancelled never leaves the daemon held.
struct Held<'a>(&'a Status, &'static str);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.hold.release(Some(self.1));
    }
}

/// Runs until `shutdown`, comparing while the daemon streams.
pub async fn run(
    config: Config,
    store: Store,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    // What earlier runs found stays visible until compared again.
    match store.divergences() {
        Ok(found) => {
            for (table, divergence) in found {
                status.set_divergence(&table, divergence);
            }
        }
        Err(err) => tracing::warn!(error = %err, "reading the background verifier's results"),
    }
    if let Err(err) = group_divergence(&config, &store, &status) {
        tracing::warn!(error = %err, "reading the background verifier's results");
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        if status.state() != DaemonState::Streaming {
            if wait(&mut shutdown, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        match pass(&config, &store, &status, &shutdown).await {
            Ok(true) => {
                status.metrics.verify_last_pass.set(now_secs() as f64);
                tracing::info!("the background verifier finished a pass over every table");
            }
            Ok(false) => return,
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?RETRY, "the background verifier failed");
                if wait(&mut shutdown, RETRY).await {
                    return;
                }
            }
        }
    }
}

/// Waits `time`, or less if shutdown is asked; returns whether it is.
async fn wait(shutdown: &mut watch::Receiver<bool>, time: Duration) -> bool {
    tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => true,
        () = tokio::time::sleep(time) => false,
    }
}

/// One pass over every table; `false` when shutdown interrupted it.
async fn pass(
    config: &Config,
    store: &Store,
    status: &Status,
    shutdown: &watch::Receiver<bool>,
) -> Result<bool, VerifyError> {
    let state = store.switch_state()?;
    let moved = state.moved_groups();
    for plan in plans(config, None).await? {
        if *shutdown.borrow() {
            return Ok(false);
        }
        // A moved group's primary is the target: compared from there,
        // below.
        if moved.contains(&config.groups.group_of(&plan.table().name)) {
            continue;
        }
        let divergence = compare(config, status, &plan, config.verify.repair, OWNER).await?;
        found(config, store, status, &plan, divergence)?;
    }
    // The moved groups, with the target read as the source and the
    // reverse stream (which writes the source) held.
    let reverse = config.for_direction(crate::direction::Direction::Reverse);
    for group in moved {
        let Some(beside) = status.beside() else {
            break;
        };
        if beside.state() != DaemonState::Streaming {
            continue;
        }
        for plan in plans(&reverse, Some(group)).await? {
            if *shutdown.borrow() {
                return Ok(false);
            }
            let divergence = compare(&reverse, &beside, &plan, config.verify.repair, OWNER).await?;
            found(config, store, status, &plan, divergence)?;
        }
    }
    Ok(true)
}

/// Records what a pass over one table found.
fn found(
    config: &Config,
    store: &Store,
    status: &Status,
    plan: &Plan,
    divergence: Divergence,
) -> Result<(), VerifyError> {
    let name = plan.table().name.to_string();
    if divergence.divergent_rows > 0 {
        tracing::warn!(table = %name, rows = divergence.divergent_rows, at = ?divergence.compared_at, "the background verifier found rows that differ");
    }
    status.metrics.verify_rows.inc_by(divergence.rows_checked);
    store.put_divergence(&name, &divergence)?;
    status.set_divergence(&name, divergence);
    group_divergence(config, store, status)
}

/// Sets `cutover_group_divergent_rows` of every group from what the
/// verifier last found of each table (nothing without groups).
fn group_divergence(config: &Config, store: &Store, status: &Status) -> Result<(), VerifyError> {
    if config.groups.is_empty() {
        return Ok(());
    }
    let mut sums: std::collections::HashMap<&str, u64> =
        config.groups.names().into_iter().map(|g| (g, 0)).collect();
    for (table, divergence) in store.divergences()? {
        let Some((schema, name)) = table.split_once('.') else {
            continue;
        };
        if let Ok(group) = config.groups.of(&TableName::new(schema, name))
            && let Some(sum) = sums.get_mut(group)
        {
            *sum += divergence.divergent_rows;
        }
    }
    for (group, rows) in sums {
        status
            .metrics
            .group_divergent_rows
            .with_label_values(&[group])
            .set(i64::try_from(rows).unwrap_or(i64::MAX));
    }
    Ok(())
}

/// Compares one table at a new position, holding the daemon's applier as
/// `owner`; with `repair`, makes the rows found differing equal to the
/// source ([`super::beside`]).
pub(super) async fn compare(
    config: &Config,
    status: &Status,
    plan: &Plan,
    repair: bool,
    owner: &'static str,
) -> Result<Divergence, VerifyError> {
    let holder = Holder::InProcess { status, owner };
    let guard = Held(status, owner);
    holder.arm().await?;
    let (at, mut sources) = source_position_within(config, 1).await?;
    holder.hold_at(at).await?;
    let mut targets = target_readers(config, 1).await?;
    drop(guard);
    let (Some(source), Some(target)) = (sources.pop(), targets.pop()) else {
        return Err(VerifyError::Daemon(
            "no reader for the background verifier".into(),
        ));
    };
    let pacer = Pacer::new(Some(config.verify.continuous_rate));
    let reading = table::Reading {
        samples: SAMPLES,
        repair,
        at,
        progress: None,
        pacer: &pacer,
    };
    let (report, fixes) = table::compare(plan, &source, &target, &reading).await?;
    drop((source, target));
    let mut divergent_rows = report.differing();
    if !fixes.is_empty() {
        let _guard = Held(status, owner);
        let repaired = beside::repair(config, &holder, &[(plan, fixes)]).await?;
        let rows = repaired.rows.values().flatten();
        for row in rows.clone() {
            tracing::info!(table = %plan.table().name, at = %repaired.at, "{owner} repaired: {row}");
        }
        status
            .metrics
            .verify_repaired_rows
            .inc_by(rows.count() as u64);
        // Every row found differing is now equal to the source (or was
        // made so by the stream before the repair's position).
        divergent_rows = 0;
    }
    Ok(Divergence {
        rows_checked: report.source_rows,
        divergent_rows,
        compared_at: Some(at),
        checked_at: now_secs(),
        samples: report
            .samples
            .iter()
            .map(|s| {
                let kind = match s.kind {
                    SampleKind::MissingOnTarget => "missing on target",
                    SampleKind::ExtraOnTarget => "extra on target",
                    SampleKind::Changed => "changed",
                };
                format!("{kind}: {}", s.key)
            })
            .collect(),
    })
}
