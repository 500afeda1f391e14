//! Batches of source transactions in one target transaction: the fast
//! path first, replayed change by change when it fails; the spilled
//! path; the per-table seam and the origins that are skipped.

use tokio_postgres::Statement;

use super::PostgresSink;
use super::error::{ApplyError, session_error};
use super::keys::KeyCheck;
use crate::change::{Change, PgTimestamp, SourceTransaction};
use crate::lsn::Lsn;

impl PostgresSink {
    /// Applies consecutive source transactions in one target transaction
    /// and returns the new durable position. Transactions at or before
    /// the current position are skipped (already applied).
    pub(super) async fn apply_batch(
        &mut self,
        transactions: &[SourceTransaction],
    ) -> Result<Lsn, ApplyError> {
        let pending: Vec<&SourceTransaction> = transactions
            .iter()
            .filter(|t| t.end_lsn > self.progress)
            .collect();
        let Some(last) = pending.last() else {
            return Ok(self.progress);
        };
        let (end_lsn, commit_time) = (last.end_lsn, last.commit_time);
        if self.guard.is_some() {
            self.commit_times = pending
                .iter()
                .map(|t| (t.commit_lsn, t.commit_time.micros()))
                .collect();
        }
        let changes: Vec<(&Change, Lsn)> = pending
            .iter()
            .flat_map(|t| t.changes.iter().map(move |c| (c, t.commit_lsn)))
            .collect();
        self.apply_changes(&changes, end_lsn, commit_time).await?;
        Ok(self.progress)
    }

    /// Applies `changes` as one target transaction recorded at `at`, even
    /// when the applied position is `at` already: the repair of `cutover
    /// verify`, which makes the target equal to the source as of `at`
    /// through the statements (and the origin) of the stream. Refused when
    /// the target has applied past `at`: the repair would undo changes.
    pub async fn apply_at(&mut self, changes: &[Change], at: Lsn) -> Result<(), ApplyError> {
        if self.progress > at {
            return Err(ApplyError::Session {
                what: format!("repairing the target as of {at}"),
                detail: format!(
                    "the target has applied the source up to {}, past that position",
                    self.progress
                ),
                transient: false,
            });
        }
        let pairs: Vec<(&Change, Lsn)> = changes.iter().map(|c| (c, at)).collect();
        self.apply_changes(&pairs, at, PgTimestamp::now()).await
    }

    /// Applies changes as one target transaction ending at `end_lsn`.
    /// The fast path coalesces and runs set-based statements; if it fails,
    /// the transaction is replayed change by change.
    pub(super) async fn apply_changes(
        &mut self,
        changes: &[(&Change, Lsn)],
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), ApplyError> {
        match self.apply_changes_once(changes, end_lsn, commit_time).await {
            Err(err) if self.progress < end_lsn && err.may_be_stale_description() => {
                tracing::info!(error = %err, "the target refused a change: describing its tables again and retrying the batch once");
                self.forget_descriptions();
                self.apply_changes_once(changes, end_lsn, commit_time)
                    .await
                    .map_err(|err| self.explained(err))
            }
            other => other,
        }
    }

    pub(super) async fn apply_changes_once(
        &mut self,
        changes: &[(&Change, Lsn)],
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), ApplyError> {
        let wanted: Vec<(&Change, Lsn)> = changes
            .iter()
            .copied()
            .filter(|(c, commit)| self.wanted(c, *commit))
            .collect();
        // BEGIN, the statements and the commit go out together: a batch
        // without barriers (truncates, keyless tables) or partial rows
        // costs one round trip.
        self.begin_pending = true;
        let all = wanted.clone();
        let (wanted, mut kept) = match self.guarded(wanted).await {
            Ok(guarded) => guarded,
            Err(err) => {
                let _ = self.rollback().await;
                return Err(err);
            }
        };
        match self.apply_fast(&wanted, Some((end_lsn, commit_time))).await {
            Ok(true) => {
                self.kept.append(&mut kept);
                return Ok(());
            }
            Ok(false) => {}
            // Committed, then the WAL positions could not be read: never
            // replay what is committed.
            Err(err) if self.progress >= end_lsn => {
                self.kept.append(&mut kept);
                return Err(err);
            }
            Err(fast) => {
                tracing::debug!(error = %fast, "set-based apply failed; replaying change by change");
                self.rollback().await?;
                self.begin().await?;
                // The rows are locked and read again in this transaction.
                let replayed = async {
                    let (wanted, again) = self.guarded(all).await?;
                    kept = again;
                    self.apply_slow(&wanted).await
                }
                .await;
                if let Err(err) = replayed {
                    let _ = self.rollback().await;
                    return Err(err);
                }
            }
        }
        self.commit(end_lsn, commit_time).await?;
        self.kept.append(&mut kept);
        Ok(())
    }

    /// Applies a streamed transaction from its spill file, in one target
    /// transaction, `batch` changes at a time (memory stays bounded).
    pub(super) async fn apply_spilled(
        &mut self,
        path: &std::path::Path,
        commit: &crate::change::Commit,
        batch: usize,
    ) -> Result<(), ApplyError> {
        match self.apply_spilled_once(path, commit, batch).await {
            Err(err) if self.progress < commit.end_lsn && err.may_be_stale_description() => {
                tracing::info!(error = %err, "the target refused a change: describing its tables again and retrying the transaction once");
                self.forget_descriptions();
                self.apply_spilled_once(path, commit, batch)
                    .await
                    .map_err(|err| self.explained(err))
            }
            other => other,
        }
    }

    pub(super) async fn apply_spilled_once(
        &mut self,
        path: &std::path::Path,
        commit: &crate::change::Commit,
        batch: usize,
    ) -> Result<(), ApplyError> {
        if commit.end_lsn <= self.progress {
            return Ok(());
        }
        let spill = |e: crate::spill::SpillError| ApplyError::Session {
            what: "reading a streamed transaction from disk".into(),
            detail: e.to_string(),
            transient: false,
        };
        self.begin().await?;
        if self.guard.is_some() {
            self.commit_times =
                std::collections::HashMap::from([(commit.commit_lsn, commit.commit_time.micros())]);
        }
        let mut kept = Vec::new();
        // Tables with DEFERRABLE keys that the transaction wrote: checked
        // whole at its end (keys may stand duplicated until then).
        let mut touched: Vec<KeyCheck<'static>> = Vec::new();
        let fast: Result<(), ApplyError> = async {
            let mut reader = crate::spill::SpillReader::open(path).map_err(spill)?;
            loop {
                let changes = reader.next_batch(batch).map_err(spill)?;
                if changes.is_empty() {
                    return self.check_keys(&touched).await;
                }
                let wanted = self.wanted_of(&changes, commit.commit_lsn);
                let (wanted, mut lost) = self.guarded(wanted).await?;
                kept.append(&mut lost);
                self.apply_fast(&wanted, None).await?;
                for check in self.key_checks(&wanted).await? {
                    if !touched
                        .iter()
                        .any(|t| t.relation.name == check.relation.name)
                    {
                        touched.push(check.whole());
                    }
                }
            }
        }
        .await;
        if let Err(fast) = fast {
            tracing::debug!(error = %fast, "set-based apply of a streamed transaction failed; replaying change by change");
            self.rollback().await?;
            self.begin().await?;
            kept.clear();
            let slow: Result<(), ApplyError> = async {
                let mut reader = crate::spill::SpillReader::open(path).map_err(spill)?;
                loop {
                    let changes = reader.next_batch(batch).map_err(spill)?;
                    if changes.is_empty() {
                        return self.check_keys(&touched).await;
                    }
                    let wanted = self.wanted_of(&changes, commit.commit_lsn);
                    let (wanted, mut lost) = self.guarded(wanted).await?;
                    kept.append(&mut lost);
                    for (change, lsn) in wanted {
                        self.apply_one(change, lsn).await?;
                    }
                    let applied: Vec<(&Change, Lsn)> =
                        changes.iter().map(|c| (c, commit.commit_lsn)).collect();
                    for check in self.key_checks(&applied).await? {
                        if !touched
                            .iter()
                            .any(|t| t.relation.name == check.relation.name)
                        {
                            touched.push(check.whole());
                        }
                    }
                }
            }
            .await;
            if let Err(err) = slow {
                let _ = self.rollback().await;
                return Err(err);
            }
        }
        self.commit(commit.end_lsn, commit.commit_time).await?;
        self.kept.append(&mut kept);
        Ok(())
    }

    /// The changes of one transaction (committed at `commit_lsn`) this
    /// sink applies.
    fn wanted_of<'a>(&self, changes: &'a [Change], commit_lsn: Lsn) -> Vec<(&'a Change, Lsn)> {
        changes
            .iter()
            .map(|c| (c, commit_lsn))
            .filter(|(c, lsn)| self.wanted(c, *lsn))
            .collect()
    }

    pub(super) fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool {
        self.filter.wanted(change, commit_lsn)
    }

    pub(super) async fn begin(&mut self) -> Result<(), ApplyError> {
        self.begin_pending = false;
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(session_error("BEGIN"))
    }

    /// Sends the BEGIN of the open transaction if it is still pending.
    pub(super) async fn begun(&mut self) -> Result<(), ApplyError> {
        if self.begin_pending {
            self.begin().await?;
        }
        Ok(())
    }

    pub(super) async fn rollback(&mut self) -> Result<(), ApplyError> {
        // A pipeline that failed may have ended the transaction already
        // (its COMMIT rolled back): ROLLBACK then only warns.
        self.begin_pending = false;
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(session_error("ROLLBACK"))
    }

    pub(super) async fn commit(
        &mut self,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), ApplyError> {
        self.flush(&mut Vec::new(), Some((end_lsn, commit_time)))
            .await
            .map(|_| ())
    }

    /// The statements that end a batch: the origin's position, COMMIT, and
    /// the target's WAL positions after it.
    pub(super) async fn commit_statements(&mut self) -> Result<(Statement, Statement), ApplyError> {
        let setup = self
            .statement("SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2)")
            .await?;
        // The WAL insert position after COMMIT is at or past the commit
        // record: once the flush position passes it, the batch is durable.
        let positions = self
            .statement("SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text")
            .await?;
        Ok((setup, positions))
    }
}
