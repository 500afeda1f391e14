//! When an applied position is durable: batches commit asynchronously, and
//! a position is durable once the target's WAL flush passes its commit.

use super::PostgresSink;
use super::error::{ApplyError, session_error};
use crate::lsn::Lsn;
use crate::sink::Sink;

/// How long the target's flush position may stand still below a committed
/// batch before the applier makes it flush (a few `wal_writer_delay`s).
pub(super) const FORCE_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(600);

impl PostgresSink {
    /// Waits until the target flushed its WAL up to where it is now, so
    /// that the progress read at connect is durable.
    pub(super) async fn settled(mut self) -> Result<PostgresSink, ApplyError> {
        let insert: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(session_error("reading the target's WAL position"))?
            .get(0);
        if let Some(first) = self.unflushed.front_mut() {
            first.0 = insert.parse().unwrap_or_default();
        }
        self.wait_durable().await?;
        Ok(self)
    }

    /// Asks the target how far its WAL is flushed and moves
    /// [`Sink::durable`] accordingly.
    pub(super) async fn refresh_durable(&mut self) -> Result<Lsn, ApplyError> {
        if self.unflushed.is_empty() {
            return Ok(self.durable);
        }
        let flushed: String = self
            .client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(session_error("reading the target's WAL flush position"))?
            .get(0);
        let before = self.unflushed.len();
        tracing::trace!(flushed, waiting = ?self.unflushed.front(), "target flush position");
        self.flushed_up_to(flushed.parse().unwrap_or_default());
        if self.unflushed.is_empty() || self.unflushed.len() < before {
            self.stalled_since = None;
        } else {
            let since = *self
                .stalled_since
                .get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= FORCE_FLUSH_AFTER {
                self.force_flush().await?;
                self.stalled_since = None;
            }
        }
        Ok(self.durable)
    }

    /// Makes the target flush its WAL up to its current end.
    ///
    /// The WAL writer flushes asynchronous commits, but WAL written after
    /// the last of them by something else (page pruning by a read query,
    /// a running-transactions record) waits for a full page or a
    /// checkpoint; a batch whose recorded position lies past such a record
    /// (an empty batch, whose COMMIT writes nothing, or a record inserted
    /// between COMMIT and the position query) would then wait minutes to
    /// be acknowledged, and a shutdown with it.
    ///
    /// A synchronous commit flushes everything before it, but only a
    /// transaction that wrote WAL commits synchronously (`xact.c`,
    /// `RecordTransactionCommit`): an xid alone (`txid_current()`) is not
    /// enough, as a test with `wal_writer_delay = 10s` showed. A
    /// transactional logical message is the smallest WAL record any role
    /// may write (it carries our origin like every transaction of this
    /// session, and cutover's applier ignores logical messages).
    pub(super) async fn force_flush(&self) -> Result<(), ApplyError> {
        tracing::debug!("the target's WAL flush is stalled: forcing it");
        self.client
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on; \
                 SELECT pg_logical_emit_message(true, 'cutover.flush', ''); COMMIT",
            )
            .await
            .map_err(session_error("flushing the target's WAL"))
    }

    pub(super) fn flushed_up_to(&mut self, flushed: Lsn) {
        while let Some(&(local, source)) = self.unflushed.front() {
            if local > flushed {
                break;
            }
            self.durable = self.durable.max(source);
            self.unflushed.pop_front();
        }
    }

    /// Waits until every committed batch is flushed on the target (the WAL
    /// writer flushes asynchronous commits within `wal_writer_delay`).
    ///
    /// Whoever waits (a stopping daemon, a verify's hold, a switch's drain,
    /// inside its write-unavailability window) waits for this: when the
    /// flush is not there at the first look, the target is made to flush
    /// at once rather than after the WAL writer's next rounds (400 ms
    /// measured with the default `wal_writer_delay`).
    pub(super) async fn wait_durable(&mut self) -> Result<Lsn, ApplyError> {
        let mut forced = false;
        while self.flush_pending() {
            self.refresh_durable().await?;
            if self.flush_pending() {
                if !forced {
                    self.force_flush().await?;
                    forced = true;
                    continue;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        Ok(self.durable)
    }

    /// Records a committed batch: applied, and durable once the target's
    /// flush position passes `local`.
    pub(super) fn committed(&mut self, end_lsn: Lsn, local: Lsn, flushed: Lsn) {
        self.progress = self.progress.max(end_lsn);
        self.unflushed.push_back((local, self.progress));
        self.flushed_up_to(flushed);
    }
}
