//! The set-based path: a batch's changes coalesced per key, then one
//! statement per table, operation and column set, sent pipelined with the
//! BEGIN and the COMMIT.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::PostgresSink;
use super::coalesce::{KnownTable, RowKey, RowOp, TableBatch, coalesce, key_of, key_of_row};
use super::error::{ApplyError, missing_reply, session_error};
use super::pipeline::{Reply, Request, TextColumn, in_order, text_columns};
use super::statements::{delete_sql, insert_sql, move_sql, patch_sql, update_sql, upsert_sql};
use super::target::key_spec;
use crate::catalog::TableName;
use crate::change::{Change, ChangeKind, Datum, PgTimestamp, Relation};
use crate::lsn::Lsn;

/// One set-based statement of a batch, prepared, with its parameters.
pub(super) struct TableOp<'a> {
    pub(super) statement: Statement,
    pub(super) params: Vec<TextColumn<'a>>,
    /// What it does to `table`, for errors.
    pub(super) what: &'static str,
    pub(super) table: &'a TableName,
    /// Rows it must find (partial rows update rows that must exist).
    pub(super) expect: Option<usize>,
}

impl PostgresSink {
    /// Coalesce per key, then one statement per (table, operation, column
    /// set). Barriers (truncate, keyless tables, key-changing updates with
    /// unchanged TOAST) flush what is pending and run on their own, in order.
    ///
    /// With `commit`, the last statements and the commit share one round
    /// trip; returns whether the batch is committed (not when partial rows
    /// must first be counted).
    pub(super) async fn apply_fast<'a>(
        &mut self,
        changes: &[(&'a Change, Lsn)],
        commit: Option<(Lsn, PgTimestamp)>,
    ) -> Result<bool, ApplyError> {
        let mut pending: Vec<TableBatch<'a>> = Vec::new();
        let mut known: Vec<KnownTable> = Vec::new();
        for (at, &(change, commit_lsn)) in changes.iter().enumerate() {
            let relation = match &change.kind {
                ChangeKind::Truncate { .. }
                | ChangeKind::TruncatePartition(_)
                | ChangeKind::Ddl(_) => {
                    self.flush(&mut pending, None).await?;
                    self.apply_one(change, commit_lsn).await?;
                    continue;
                }
                ChangeKind::Insert { relation, .. }
                | ChangeKind::Update { relation, .. }
                | ChangeKind::Delete { relation, .. } => relation,
            };
            if let Some(mapping) = self.mapping_of(relation) {
                self.coalesce_mapped(&mut pending, change, relation, &mapping)
                    .map_err(ApplyError::Schema)?;
                continue;
            }
            // A relation is one `Arc` until the source describes it again.
            let table = match known
                .iter()
                .position(|k| Arc::ptr_eq(&k.relation, relation))
            {
                Some(table) => &known[table],
                None => {
                    let target = self.target_table(relation).await?;
                    let rows = changes[at..]
                        .iter()
                        .filter(|(c, _)| relation_of(c).is_some_and(|r| Arc::ptr_eq(r, relation)))
                        .count();
                    known.push(KnownTable {
                        relation: Arc::clone(relation),
                        key: key_spec(relation, &target),
                        rows,
                    });
                    &known[known.len() - 1]
                }
            };
            let Some(key) = &table.key else {
                self.flush(&mut pending, None).await?;
                self.apply_one(change, commit_lsn).await?;
                continue;
            };
            if let ChangeKind::Update {
                old: Some(old),
                new,
                ..
            } = &change.kind
                && key_of(key, old.tuple()) != key_of(key, new)
                && new.0.contains(&Datum::UnchangedToast)
            {
                // A key change that keeps a TOASTed value: move the row in
                // place, the value cannot be rewritten from the change.
                self.flush(&mut pending, None).await?;
                self.apply_one(change, commit_lsn).await?;
                continue;
            }
            coalesce(&mut pending, change, relation, key, table.rows);
        }
        // Inside a spilled transaction (no commit here) keys may stand
        // duplicated until its end: checked then, by the caller.
        if commit.is_none() {
            return self.flush(&mut pending, commit).await;
        }
        let checks = self.key_checks(changes).await?;
        if checks.is_empty() {
            return self.flush(&mut pending, commit).await;
        }
        self.flush(&mut pending, None).await?;
        self.check_keys(&checks).await?;
        self.flush(&mut Vec::new(), commit).await
    }

    /// Runs the statements of `pending` (and the pending BEGIN, and with
    /// `commit` the commit) pipelined: sent together, answered in order, in
    /// one round trip. Returns whether it committed: not when a statement
    /// updates partial rows, whose count must be checked before COMMIT.
    ///
    /// On a statement's failure the transaction is aborted (and a
    /// pipelined COMMIT rolled it back); the first error is returned.
    pub(super) async fn flush(
        &mut self,
        pending: &mut Vec<TableBatch<'_>>,
        commit: Option<(Lsn, PgTimestamp)>,
    ) -> Result<bool, ApplyError> {
        let batches = std::mem::take(pending);
        let mut ops: Vec<TableOp> = Vec::new();
        for batch in &batches {
            self.table_ops(batch, &mut ops).await?;
        }
        let commit = commit.filter(|_| ops.iter().all(|op| op.expect.is_none()));
        if ops.is_empty() && commit.is_none() {
            return Ok(false);
        }
        let ends = match commit {
            Some((end_lsn, time)) => Some((self.commit_statements().await?, end_lsn, time)),
            None => None,
        };
        let begin = std::mem::take(&mut self.begin_pending);
        let client = &self.client;
        let mut requests: Vec<Request> = Vec::new();
        if begin {
            requests.push(Box::pin(async move {
                client.batch_execute("BEGIN").await.map(|()| Reply::Done)
            }));
        }
        for op in &ops {
            requests.push(Box::pin(async move {
                let params: Vec<&(dyn ToSql + Sync)> =
                    op.params.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                client
                    .execute(&op.statement, &params)
                    .await
                    .map(Reply::Count)
            }));
        }
        if let Some(((setup, positions), end_lsn, time)) = &ends {
            let lsn = end_lsn.to_string();
            let time = time.to_system_time();
            requests.push(Box::pin(async move {
                client
                    .execute(setup, &[&lsn, &time])
                    .await
                    .map(|_| Reply::Done)
            }));
            requests.push(Box::pin(async move {
                client.batch_execute("COMMIT").await.map(|()| Reply::Done)
            }));
            requests.push(Box::pin(async move {
                client.query_one(positions, &[]).await.map(Reply::Row)
            }));
        }
        let mut replies = in_order(requests).await.into_iter();
        // BEGIN fails only with its session; the statements behind it then
        // fail too (and keyed writes are idempotent anyway).
        if begin && let Some(Err(err)) = replies.next() {
            return Err(session_error("BEGIN")(err));
        }
        for op in &ops {
            let Some(reply) = replies.next() else {
                break;
            };
            let what = || format!("{} {}", op.what, op.table);
            let count = match reply.map_err(|err| session_error(what())(err))? {
                Reply::Count(n) => n,
                _ => 0,
            };
            if let Some(expected) = op.expect
                && count as usize != expected
            {
                // Let the slow path name the missing row.
                return Err(ApplyError::Session {
                    what: what(),
                    detail: format!("{count} of {expected} rows found"),
                    transient: false,
                });
            }
        }
        let Some((_, end_lsn, _)) = ends else {
            return Ok(false);
        };
        const SETUP: &str = "recording the applied position";
        const POSITIONS: &str = "reading the target's WAL positions";
        match replies.next() {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(session_error(SETUP)(err)),
            None => return Err(missing_reply(SETUP)),
        }
        match replies.next() {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(session_error("COMMIT")(err)),
            None => return Err(missing_reply("COMMIT")),
        }
        // Committed: from here on nothing may be replayed.
        self.progress = self.progress.max(end_lsn);
        let row = match replies.next() {
            Some(Ok(Reply::Row(row))) => row,
            Some(Err(err)) => return Err(session_error(POSITIONS)(err)),
            _ => return Err(missing_reply(POSITIONS)),
        };
        let local: Lsn = row.get::<_, String>(0).parse().unwrap_or_default();
        let flushed: Lsn = row.get::<_, String>(1).parse().unwrap_or_default();
        self.committed(end_lsn, local, flushed);
        Ok(true)
    }

    /// The statements for one table of a batch, prepared: deletes first,
    /// then full rows, then partial rows. Keys are distinct within a
    /// batch, so this order cannot change the result.
    pub(super) async fn table_ops<'b>(
        &mut self,
        batch: &'b TableBatch<'_>,
        ops: &mut Vec<TableOp<'b>>,
    ) -> Result<(), ApplyError> {
        let relation = &batch.relation;
        if let Some(mapping) = self.mapping_of(relation) {
            return self.mapped_ops(batch, &mapping, ops).await;
        }
        let target = self.target_table(relation).await?;
        let key_cols: &[usize] = &batch.key;
        let keys: Vec<&str> = key_cols
            .iter()
            .map(|i| relation.columns[*i].name.as_str())
            .collect();
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        // An UPDATE cannot write a GENERATED ALWAYS identity column: rows
        // are deleted by key and inserted again instead.
        let replace = target.replaces(&names, &keys);
        // Sized at once for the most any can hold (a batch's table often
        // has thousands of rows): growing by doubling copies again and
        // again, and capacity never written costs no memory.
        let most = batch.rows.len();
        let mut deletes: Vec<&RowKey> = Vec::with_capacity(most);
        let mut upserts: Vec<&[Datum]> = Vec::with_capacity(most);
        let mut inserts: Vec<&[Datum]> = Vec::with_capacity(most);
        let mut updates: Vec<&[Datum]> = Vec::with_capacity(most);
        let mut patches: HashMap<Vec<bool>, Vec<&[Datum]>> = HashMap::new();
        for entry in &batch.rows {
            match &entry.op {
                RowOp::Delete => deletes.push(&entry.key),
                RowOp::Upsert(row) => upserts.push(row),
                // Replaced rows go through the delete and insert below.
                RowOp::Insert(row) | RowOp::Update(row) if replace => upserts.push(row),
                RowOp::Insert(row) => inserts.push(row),
                RowOp::Update(row) => updates.push(row),
                RowOp::Patch(row) => {
                    let present: Vec<bool> =
                        row.iter().map(|d| *d != Datum::UnchangedToast).collect();
                    patches.entry(present).or_default().push(row);
                }
            }
        }
        let replaced: Vec<RowKey> = if replace {
            upserts
                .iter()
                .map(|row| key_of_row(key_cols, row))
                .collect()
        } else {
            Vec::new()
        };
        if !deletes.is_empty() || !replaced.is_empty() {
            let sql = delete_sql(&relation.name, &keys, &target);
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: (0..keys.len())
                    .map(|j| {
                        TextColumn(
                            deletes
                                .iter()
                                .map(|k| k[j])
                                .chain(replaced.iter().map(|k| k[j]))
                                .collect(),
                        )
                    })
                    .collect(),
                what: "deleting from",
                table: &relation.name,
                expect: None,
            });
        }
        if !upserts.is_empty() {
            let sql = if replace {
                insert_sql(&relation.name, &names, &target)
            } else {
                upsert_sql(&relation.name, &names, &keys, &target)
            };
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&upserts, 0..names.len()),
                what: "writing rows of",
                table: &relation.name,
                expect: None,
            });
        }
        if !inserts.is_empty() {
            // A key the target holds already (it diverged) fails the
            // batch, which is then replayed change by change as upserts.
            let sql = insert_sql(&relation.name, &names, &target);
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&inserts, 0..names.len()),
                what: "inserting rows of",
                table: &relation.name,
                expect: None,
            });
        }
        if !updates.is_empty() {
            let sql = update_sql(&relation.name, &names, &keys, &target);
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&updates, 0..names.len()),
                what: "updating rows of",
                table: &relation.name,
                expect: None,
            });
        }
        for (present, rows) in patches {
            let set_cols: Vec<usize> = (0..relation.columns.len())
                .filter(|i| present[*i] && !key_cols.contains(i))
                .collect();
            let set: Vec<&str> = set_cols
                .iter()
                .map(|i| relation.columns[*i].name.as_str())
                .collect();
            let mut order: Vec<usize> = key_cols.to_vec();
            order.extend(set_cols.iter().copied());
            let sql = if replace {
                move_sql(&relation.name, relation, &keys, &set, &target)
            } else {
                patch_sql(&relation.name, &keys, &set, &target)
            };
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&rows, order.iter().copied()),
                what: "updating",
                table: &relation.name,
                expect: Some(rows.len()),
            });
        }
        Ok(())
    }
}

/// The relation a row change is of; `None` for truncates and DDL.
fn relation_of(change: &Change) -> Option<&Arc<Relation>> {
    match &change.kind {
        ChangeKind::Insert { relation, .. }
        | ChangeKind::Update { relation, .. }
        | ChangeKind::Delete { relation, .. } => Some(relation),
        ChangeKind::Truncate { .. } | ChangeKind::TruncatePartition(_) | ChangeKind::Ddl(_) => None,
    }
}
