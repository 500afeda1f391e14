//! The applier: takes what the queue holds, batches it, hands it to the
//! sink and publishes the sink's durable position.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::change::{ChangeKind, SourceTransaction};
use cutover_replication::sink::Sink;
use tokio::sync::{mpsc, watch};

use crate::config::ApplySettings;
use crate::hold::Hold;
use crate::live::Status;

use super::RunError;
use super::queue::Work;
use super::session::stopped;

/// The applier: batches what is queued, applies, reports durability.
pub(super) async fn apply_work<S: Sink>(
    mut applier: S,
    mut work: mpsc::Receiver<Work>,
    durable: watch::Sender<Lsn>,
    settings: ApplySettings,
    shutdown: watch::Receiver<bool>,
    status: Arc<Status>,
    until_stop: Option<Lsn>,
) -> Result<(), RunError>
where
    RunError: From<S::Error>,
{
    let mut held: Option<Work> = None;
    let mut pause = status.pause_watch();
    let mut hold = status.hold.watch();
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
        // A verify's hold (see `crate::hold`): nothing new while armed;
        // with a position, what commits before it.
        let (limit, generation) = {
            let current = hold.borrow_and_update();
            let limit = match &current.0 {
                Hold::Off => None,
                Hold::Armed { .. } => Some(Lsn::ZERO),
                Hold::At { lsn, .. } => Some(*lsn),
            };
            (limit, current.1)
        };
        if limit == Some(Lsn::ZERO) {
            // Armed: nothing new, whether anything waits or not.
            let position = applier.wait_durable().await?;
            let _ = durable.send(position);
            status.hold.stopped_at(generation, position);
            tracing::info!(%position, "applier held for a verify");
            if !parked(&mut hold, &shutdown, &work).await {
                break;
            }
            continue;
        }
        let first = match held.take() {
            Some(item) => item,
            None => {
                let mut stop = shutdown.clone();
                tokio::select! {
                    biased;
                    () = stopped(&mut stop) => break,
                    // PAUSE or a hold while idle: look again before
                    // taking anything.
                    Ok(()) = pause.changed() => continue,
                    Ok(()) = hold.changed() => continue,
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
        if let Some(limit) = limit
            && beyond(&first, limit)
        {
            // Everything before the hold's position is applied: make it
            // durable, say so, and wait for the hold to change.
            if !matches!(first, Work::Reached(_)) {
                held = Some(first);
            }
            let position = applier.wait_durable().await?;
            let _ = durable.send(position);
            status.hold.stopped_at(generation, position);
            tracing::info!(%position, hold = %limit, "applier held for a verify");
            if !parked(&mut hold, &shutdown, &work).await {
                break;
            }
            continue;
        }
        match first {
            // The session was asked to stop here: what is applied is
            // flushed and reported below.
            Work::Reached(until) if until_stop == Some(until) => {
                tracing::info!(%until, applied = %applier.applied(), "reached the position asked for");
                break;
            }
            // A marker of an earlier hold: nothing to do.
            Work::Reached(_) => {}
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
                        Some(Work::Memory(tx, permit))
                            if limit.is_none_or(|l| tx.commit_lsn < l) =>
                        {
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
                    &count_changes(&batch, |change, commit| applier.wanted(change, commit)),
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
    // A drain (a switch's, a verify's catch-up) ends only once what it
    // applied is durable in every sink: a Kafka feed's last changes are not
    // visible before they are committed, and the next direction's must
    // come after them.
    let waited = if until_stop.is_some() {
        Ok(applier.wait_durable().await)
    } else {
        tokio::time::timeout(SHUTDOWN_FLUSH_WAIT, applier.wait_durable()).await
    };
    let last = match waited {
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

/// Changes of a batch by (table, op) that the sink `wanted` (a change it
/// skips, such as the other direction's own write, is not applied), for
/// the metrics. Counted per relation first (a pointer comparison per
/// change), named once per table.
pub(super) fn count_changes(
    batch: &[SourceTransaction],
    wanted: impl Fn(&cutover_replication::change::Change, cutover_replication::Lsn) -> bool,
) -> BTreeMap<(String, &'static str), u64> {
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
    for (change, _) in batch
        .iter()
        .flat_map(|tx| tx.changes.iter().map(|c| (c, tx.commit_lsn)))
        .filter(|(c, commit)| wanted(c, *commit))
    {
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

/// How often an idle applier asks the target whether its asynchronous
/// commits are flushed.
pub(super) const FLUSH_CHECK_EVERY: Duration = Duration::from_millis(20);

/// How long a stopping applier waits for the target to flush what it
/// committed before it reports only what is known durable.
pub(super) const SHUTDOWN_FLUSH_WAIT: Duration = Duration::from_secs(10);

/// Whether `work` is at or past a hold's position: a transaction that
/// commits there or later, or the reader's word that everything before it
/// is queued.
fn beyond(work: &Work, limit: Lsn) -> bool {
    match work {
        Work::Memory(tx, _) => tx.commit_lsn >= limit,
        Work::Spilled(_, commit) => commit.commit_lsn >= limit,
        Work::Reached(lsn) => *lsn >= limit,
    }
}

/// Waits, applying nothing, until the hold changes; `false` when the
/// applier must stop instead: shutdown, or the reader gone (its session
/// failed: the session is started again, and the hold's owner sees the
/// hold end... or its next step fail).
async fn parked(
    hold: &mut watch::Receiver<(Hold, u64)>,
    shutdown: &watch::Receiver<bool>,
    work: &mpsc::Receiver<Work>,
) -> bool {
    let mut stop = shutdown.clone();
    let mut look = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return false,
            _ = hold.changed() => return true,
            _ = look.tick() => {
                if work.is_closed() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use cutover_replication::change::{Change, Commit, PgTimestamp};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::direction::Direction;

    /// A sink whose writes become durable only when waited on, and slowly
    /// (a Kafka commit retried for longer than the shutdown's wait).
    struct SlowlyDurable {
        applied: Lsn,
        durable: Lsn,
    }

    impl Sink for SlowlyDurable {
        type Error = RunError;

        async fn apply(&mut self, transactions: &[SourceTransaction]) -> Result<Lsn, RunError> {
            if let Some(last) = transactions.last() {
                self.applied = last.end_lsn;
            }
            Ok(self.applied)
        }

        async fn apply_spilled(&mut self, _: &Path, _: &Commit, _: usize) -> Result<(), RunError> {
            Ok(())
        }

        fn wanted(&self, _: &Change, _: Lsn) -> bool {
            true
        }

        fn applied(&self) -> Lsn {
            self.applied
        }

        fn durable(&self) -> Lsn {
            self.durable
        }

        fn flush_pending(&self) -> bool {
            false
        }

        async fn refresh_durable(&mut self) -> Result<Lsn, RunError> {
            Ok(self.durable)
        }

        async fn wait_durable(&mut self) -> Result<Lsn, RunError> {
            tokio::time::sleep(SHUTDOWN_FLUSH_WAIT * 3).await;
            self.durable = self.applied;
            Ok(self.durable)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_only_once_what_it_applied_is_durable() {
        let settings = ApplySettings {
            batch_rows: 1000,
            batch_bytes: 1 << 20,
            batch_wait: Duration::ZERO,
            queue_transactions: 10,
            queue_bytes: 1 << 20,
            spill_bytes: 1 << 20,
        };
        let (work_tx, work_rx) = mpsc::channel(10);
        let budget = Arc::new(Semaphore::new(1 << 20));
        let txn = SourceTransaction {
            xid: 1,
            commit_lsn: Lsn::from_u64(90),
            end_lsn: Lsn::from_u64(100),
            commit_time: PgTimestamp::from_micros(0),
            changes: Vec::new(),
        };
        let permit = Arc::clone(&budget).acquire_many_owned(1).await.unwrap();
        work_tx.send(Work::Memory(txn, permit)).await.unwrap();
        let until = Lsn::from_u64(200);
        work_tx.send(Work::Reached(until)).await.unwrap();
        let (durable_tx, durable_rx) = watch::channel(Lsn::ZERO);
        let (_stop, shutdown) = watch::channel(false);
        let status = Arc::new(Status::new("cutover", Direction::Forward));
        let sink = SlowlyDurable {
            applied: Lsn::ZERO,
            durable: Lsn::ZERO,
        };
        apply_work(
            sink,
            work_rx,
            durable_tx,
            settings,
            shutdown,
            status,
            Some(until),
        )
        .await
        .unwrap();
        // A drain (a switch's) reports what it applied durable, however
        // long that takes: the next direction's changes must come after.
        assert_eq!(*durable_rx.borrow(), Lsn::from_u64(100));
    }
}
