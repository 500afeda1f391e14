//! The check of `DEFERRABLE` keys after a batch: under the apply session's
//! `session_replication_role = replica` PostgreSQL does not check them
//! (their recheck is a trigger), so the sink does (docs/architecture.md
//! invariant 12).

use std::sync::Arc;

use tokio_postgres::types::ToSql;

use super::PostgresSink;
use super::error::{ApplyError, session_error};
use super::pipeline::text_columns;
use super::statements::unnest_select;
use super::target::TargetTable;
use crate::change::{Change, ChangeKind, Datum, Relation, Tuple};
use crate::lsn::Lsn;
use crate::sql::quote_ident;

/// Rows a batch wrote to a table with `DEFERRABLE` keys, to check that
/// they hold no key twice: PostgreSQL does not under the apply session's
/// `session_replication_role = replica` (invariant 12).
#[derive(Debug)]
pub(super) struct KeyCheck<'a> {
    pub(super) relation: Arc<Relation>,
    pub(super) target: Arc<TargetTable>,
    /// The rows written; `None`: check the whole table.
    pub(super) rows: Option<Vec<&'a Tuple>>,
    /// The last change that wrote one.
    pub(super) lsn: Lsn,
}

impl KeyCheck<'_> {
    /// The same check over the whole table.
    pub(super) fn whole(self) -> KeyCheck<'static> {
        KeyCheck {
            relation: self.relation,
            target: self.target,
            rows: None,
            lsn: self.lsn,
        }
    }
}

impl PostgresSink {
    /// The rows `changes` wrote to tables with `DEFERRABLE` keys, by table.
    pub(super) async fn key_checks<'a>(
        &mut self,
        changes: &[(&'a Change, Lsn)],
    ) -> Result<Vec<KeyCheck<'a>>, ApplyError> {
        let mut checks: Vec<KeyCheck<'a>> = Vec::new();
        // Relations seen in this batch whose table has no deferrable key.
        let mut plain: Vec<&Arc<Relation>> = Vec::new();
        for (change, _) in changes {
            let (relation, row) = match &change.kind {
                ChangeKind::Insert { relation, new } | ChangeKind::Update { relation, new, .. } => {
                    (relation, new)
                }
                ChangeKind::Delete { .. }
                | ChangeKind::Truncate { .. }
                | ChangeKind::TruncatePartition(_)
                | ChangeKind::Ddl(_) => continue,
            };
            if plain.iter().any(|p| Arc::ptr_eq(p, relation)) {
                continue;
            }
            if let Some(check) = checks.iter_mut().find(|c| c.relation.name == relation.name) {
                if let Some(rows) = &mut check.rows {
                    rows.push(row);
                }
                check.lsn = check.lsn.max(change.lsn);
                continue;
            }
            // Described again if DDL in the batch made the applier forget
            // it: a check is never skipped for want of a description.
            if self.mapping_of(relation).is_some() {
                // Written by the target's key through the mapping's
                // upsert, which checks it.
                plain.push(relation);
                continue;
            }
            let target = self.target_table(relation).await?;
            if target.deferrable_keys.is_empty() {
                plain.push(relation);
                continue;
            }
            checks.push(KeyCheck {
                relation: Arc::clone(relation),
                target,
                rows: Some(vec![row]),
                lsn: change.lsn,
            });
        }
        Ok(checks)
    }

    /// Fails when a table of `checks` holds a `DEFERRABLE` key twice among
    /// the rows written (or anywhere, for a check without rows). Runs at a
    /// source commit, where the source's own check has passed.
    pub(super) async fn check_keys(&mut self, checks: &[KeyCheck<'_>]) -> Result<(), ApplyError> {
        for check in checks {
            let relation = &check.relation;
            for key in &check.target.deferrable_keys {
                let positions: Option<Vec<usize>> = key
                    .iter()
                    .map(|k| relation.columns.iter().position(|c| &c.name == k))
                    .collect();
                let cols: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
                let names: Vec<&str> = key.iter().map(String::as_str).collect();
                let not_null: Vec<String> =
                    cols.iter().map(|c| format!("{c} IS NOT NULL")).collect();
                let (filter, params) = match (&check.rows, positions) {
                    (Some(rows), Some(positions)) => {
                        let tuples: Vec<&[Datum]> = rows.iter().map(|t| &t.0[..]).collect();
                        (
                            format!(
                                "({}) IN ({})",
                                cols.join(", "),
                                unnest_select(&names, &check.target, 1)
                            ),
                            text_columns(&tuples, positions),
                        )
                    }
                    // A column the source does not send, or no rows: the
                    // whole table.
                    _ => (not_null.join(" AND "), Vec::new()),
                };
                let sql = format!(
                    "SELECT ROW({cols})::text FROM {} WHERE {filter} GROUP BY {cols} HAVING count(*) > 1 LIMIT 1",
                    check.target.only(&relation.name),
                    cols = cols.join(", "),
                );
                let statement = self.statement(&sql).await?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                let duplicate =
                    self.client
                        .query_opt(&statement, &params)
                        .await
                        .map_err(session_error(format!(
                            "checking the DEFERRABLE key ({}) of {}",
                            key.join(", "),
                            relation.name
                        )))?;
                if let Some(row) = duplicate {
                    return Err(ApplyError::DuplicateKey {
                        table: relation.name.clone(),
                        key: format!("({})={}", key.join(", "), row.get::<_, String>(0)),
                        lsn: check.lsn,
                    });
                }
            }
        }
        Ok(())
    }
}
