//! The bounded queue between the reader and the applier: committed
//! transactions in memory (bounded in transactions and in bytes) or on
//! disk.

use std::path::PathBuf;
use std::sync::Arc;

use cutover_replication::Lsn;
use cutover_replication::change::{Commit, SourceTransaction};
use cutover_replication::stream::ReplicationStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::live::Status;

use super::RunError;
use super::session::stopped;

/// Work for the applier.
pub(super) enum Work {
    /// A transaction held in memory, with its share of the byte budget.
    Memory(SourceTransaction, OwnedSemaphorePermit),
    /// A streamed (or very large) transaction on disk.
    Spilled(PathBuf, Commit),
    /// Every transaction that commits before this position is queued, and
    /// none after it will be: the session was asked to stop there.
    Reached(Lsn),
}

/// A committed transaction on its way to the applier.
pub(super) enum Pending {
    /// In memory, with its approximate size.
    Memory(SourceTransaction, usize),
    /// On disk.
    Spilled(PathBuf, Commit),
}

/// The reader's end of the bounded queue to the applier.
pub(super) struct Queue {
    pub(super) work: mpsc::Sender<Work>,
    pub(super) budget: Arc<Semaphore>,
    pub(super) budget_bytes: usize,
    pub(super) status: Arc<Status>,
}

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
    pub(super) async fn push(
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

    /// Tells the applier, if the queue has room, that everything before
    /// `position` is queued; returns whether it was told.
    pub(super) fn mark(&self, position: Lsn) -> bool {
        self.work.try_send(Work::Reached(position)).is_ok()
    }

    /// Tells the applier that everything before `until` is queued and
    /// nothing after it will be.
    pub(super) async fn reached(&self, until: Lsn) -> Result<(), RunError> {
        self.work
            .send(Work::Reached(until))
            .await
            .map_err(|_| RunError::Spill("the applier stopped".into()))
    }
}

/// Approximate memory a change holds while it waits for the applier, for
/// the byte budget: its own struct, its tuples' datum slots, and the
/// message its values point into (the values, about 5 bytes of framing
/// per column, and the message and allocation headers). Counting only the
/// values undercounts a narrow row several times over, and the queue would
/// hold several times its budget.
pub(super) fn approximate_size(change: &cutover_replication::change::Change) -> usize {
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
