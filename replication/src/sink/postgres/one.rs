//! One change, one statement: the slow path that finds the change a
//! set-based statement failed on, and the barriers (truncates, keyless
//! tables, key changes that keep a TOASTed value).

use tokio_postgres::types::ToSql;

use super::PostgresSink;
use super::coalesce::key_of;
use super::error::{ApplyError, session_error};
use super::statements::{
    delete_one_sql, delete_sql, insert_sql, move_one_sql, update_one_sql, upsert_sql,
};
use super::target::{KeySpec, TargetTable, key_spec};
use crate::change::{Change, ChangeKind, Datum, Relation, Tuple};
use crate::lsn::Lsn;

/// The columns and values that find the old row: its key, or for keyless
/// tables the whole old row (columns sent as unchanged are left out).
pub(super) fn locator(
    relation: &Relation,
    spec: &KeySpec,
    tuple: &Tuple,
) -> (Vec<usize>, Vec<Option<String>>) {
    let cols: Vec<usize> = match spec {
        Some(key) => key.clone(),
        None => (0..relation.columns.len())
            .filter(|i| tuple.0[*i] != Datum::UnchangedToast)
            .collect(),
    };
    let values = cols.iter().map(|i| datum_text(&tuple.0[*i])).collect();
    (cols, values)
}

pub(super) fn datum_text(datum: &Datum) -> Option<String> {
    match datum {
        Datum::Text(bytes) | Datum::Binary(bytes) => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        Datum::Null | Datum::UnchangedToast => None,
    }
}

pub(super) fn show_key(relation: &Relation, spec: &KeySpec, tuple: &Tuple) -> String {
    let pairs: Vec<String> = relation
        .columns
        .iter()
        .enumerate()
        .zip(&tuple.0)
        .filter(|((i, _), _)| spec.as_ref().is_none_or(|k| k.contains(i)))
        .map(|((_, c), d)| {
            let value = match d {
                Datum::Null => "NULL".to_owned(),
                Datum::UnchangedToast => "(unchanged)".to_owned(),
                other => {
                    let text = datum_text(other).unwrap_or_default();
                    if text.len() > 64 {
                        format!("{}...", &text[..text.floor_char_boundary(64)])
                    } else {
                        text
                    }
                }
            };
            format!("{}={value}", c.name)
        })
        .collect();
    format!("({})", pairs.join(", "))
}

impl PostgresSink {
    pub(super) async fn apply_slow(
        &mut self,
        changes: &[(&Change, Lsn)],
    ) -> Result<(), ApplyError> {
        for (change, commit_lsn) in changes {
            self.apply_one(change, *commit_lsn).await?;
        }
        let checks = self.key_checks(changes).await?;
        self.check_keys(&checks).await
    }

    /// One change, one statement: the slow path, and barriers.
    /// `commit_lsn` is the commit of the change's transaction (a change
    /// read back from disk does not carry it).
    pub(super) async fn apply_one(
        &mut self,
        change: &Change,
        commit_lsn: Lsn,
    ) -> Result<(), ApplyError> {
        self.begun().await?;
        let refused = |relation: &Relation, key: String| {
            let table = relation.name.clone();
            let op = change.kind.op();
            let lsn = change.lsn;
            move |err: tokio_postgres::Error| match err.as_db_error() {
                Some(db) => ApplyError::Refused {
                    op,
                    table,
                    key,
                    lsn,
                    detail: db.message().to_owned(),
                    sqlstate: db.code().code().to_owned(),
                },
                None => session_error(format!("applying {op} on {table}"))(err),
            }
        };
        match &change.kind {
            ChangeKind::Truncate {
                relations,
                restart_identity,
                ..
            } => {
                let mut names: Vec<String> = Vec::new();
                let mut forget: Vec<String> = Vec::new();
                for relation in relations {
                    if !self.takes(&relation.name, commit_lsn) {
                        continue;
                    }
                    if let Some(mapping) = self.mapping_of(relation) {
                        names.push(crate::catalog::own_rows(
                            &mapping.target,
                            mapping.target_partitioned,
                        ));
                        forget.extend(mapping.forget_all_sql());
                        continue;
                    }
                    let target = self.target_table(relation).await?;
                    names.push(crate::catalog::own_rows(&relation.name, target.partitioned));
                }
                if names.is_empty() {
                    return Ok(());
                }
                // Without CASCADE: like PostgreSQL's own apply, only the
                // published tables listed are emptied on the target; and
                // each with ONLY: the source lists the inheritance
                // children its TRUNCATE reached (a TRUNCATE ONLY of a
                // parent reaches none).
                let sql = format!(
                    "TRUNCATE {}{}",
                    names.join(", "),
                    if *restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    }
                );
                self.client
                    .batch_execute(&sql)
                    .await
                    .map_err(refused(&relations[0], format!("({})", names.join(", "))))?;
                for sql in forget {
                    self.client
                        .batch_execute(&sql)
                        .await
                        .map_err(refused(&relations[0], format!("({})", names.join(", "))))?;
                }
            }
            ChangeKind::Ddl(ddl) => match self.mappings.get(&ddl.table).cloned() {
                Some(mapping) => self.mapped_ddl(ddl, &mapping, change.lsn).map_err(|e| *e)?,
                None => self.apply_ddl(ddl, change.lsn).await?,
            },
            ChangeKind::TruncatePartition(truncate) => {
                if !self.takes(&truncate.root, commit_lsn) {
                    return Ok(());
                }
                if let Some(mapping) = self.mappings.get(&truncate.root) {
                    // Which target rows came from that partition is not
                    // known on the target.
                    return Err(ApplyError::Schema(format!(
                        "a partition of {} was truncated at {} on the source, and the table is written through a mapping (map[{}]) to {}, which cannot tell that partition's rows apart: stop the daemon, drop its replication slot on the source and run `cutover run --resync`, which loads mapped tables again",
                        truncate.root, change.lsn, mapping.index, mapping.target
                    )));
                }
                self.truncate_partition(truncate, change.lsn).await?;
            }
            ChangeKind::Insert { relation, .. }
            | ChangeKind::Update { relation, .. }
            | ChangeKind::Delete { relation, .. }
                if self.mappings.contains_key(&relation.name) =>
            {
                let mapping = self.mapping_of(relation).expect("checked above");
                self.apply_one_mapped(change, relation, &mapping).await?;
            }
            ChangeKind::Insert { relation, new } => {
                let target = self.target_table(relation).await?;
                let spec = key_spec(relation, &target);
                self.write_row(relation, &target, &spec, new, new)
                    .await
                    .map_err(refused(relation, show_key(relation, &spec, new)))?;
            }
            ChangeKind::Update { relation, old, new } => {
                let target = self.target_table(relation).await?;
                let spec = key_spec(relation, &target);
                let located = match old {
                    Some(old) => old.tuple(),
                    None => new,
                };
                if let Some(key) = &spec
                    && !new.0.contains(&Datum::UnchangedToast)
                    && key_of(key, located) == key_of(key, new)
                {
                    // A full row under an unchanged key: written whole.
                    self.write_row(relation, &target, &spec, located, new)
                        .await
                        .map_err(refused(relation, show_key(relation, &spec, new)))?;
                    return Ok(());
                }
                // Locate the old row (by key, or by the whole old row) and
                // set the columns sent; an UPDATE cannot write a GENERATED
                // ALWAYS identity column, so such a row is moved instead.
                let (match_cols, match_values) = locator(relation, &spec, located);
                let set: Vec<usize> = (0..relation.columns.len())
                    .filter(|i| new.0[*i] != Datum::UnchangedToast)
                    .collect();
                let moves = set.iter().any(|i| {
                    target
                        .identity_always
                        .iter()
                        .any(|a| *a == relation.columns[*i].name)
                });
                let build = if moves { move_one_sql } else { update_one_sql };
                let sql = build(
                    &relation.name,
                    relation,
                    &match_cols,
                    &set,
                    &target,
                    spec.is_some(),
                );
                let statement = self.statement(&sql).await?;
                let mut values: Vec<Option<String>> =
                    set.iter().map(|i| datum_text(&new.0[*i])).collect();
                values.extend(match_values);
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let key = show_key(relation, &spec, located);
                let updated = self
                    .client
                    .execute(&statement, &params)
                    .await
                    .map_err(refused(relation, key.clone()))?;
                if updated == 0 {
                    return Err(ApplyError::RowMissing {
                        op: "update",
                        table: relation.name.clone(),
                        key,
                        lsn: change.lsn,
                    });
                }
            }
            ChangeKind::Delete { relation, old } => {
                let target = self.target_table(relation).await?;
                let spec = key_spec(relation, &target);
                let (match_cols, match_values) = locator(relation, &spec, old.tuple());
                let sql = delete_one_sql(
                    &relation.name,
                    relation,
                    &match_cols,
                    &target,
                    spec.is_some(),
                );
                let statement = self.statement(&sql).await?;
                let params: Vec<&(dyn ToSql + Sync)> = match_values
                    .iter()
                    .map(|v| v as &(dyn ToSql + Sync))
                    .collect();
                let key = show_key(relation, &spec, old.tuple());
                let deleted = self
                    .client
                    .execute(&statement, &params)
                    .await
                    .map_err(refused(relation, key.clone()))?;
                if deleted == 0 && spec.is_none() {
                    // Keyless rows are matched on their whole value: a
                    // missing one means the target diverged.
                    return Err(ApplyError::RowMissing {
                        op: "delete",
                        table: relation.name.clone(),
                        key,
                        lsn: change.lsn,
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes one whole row `new` that replaces the row found at `old`'s
    /// key (an insert, or an update that keeps its key): an upsert on the
    /// key; a plain insert for a table matched on whole rows; and where
    /// the row holds a `GENERATED ALWAYS` identity column beside its key,
    /// a delete of the key and an insert.
    pub(super) async fn write_row(
        &mut self,
        relation: &Relation,
        target: &TargetTable,
        spec: &KeySpec,
        old: &Tuple,
        new: &Tuple,
    ) -> Result<u64, tokio_postgres::Error> {
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        let columns: Vec<Vec<Option<String>>> = new.0.iter().map(|d| vec![datum_text(d)]).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let sql = match spec {
            Some(key) => {
                let keys: Vec<&str> = key
                    .iter()
                    .map(|i| relation.columns[*i].name.as_str())
                    .collect();
                if target.replaces(&names, &keys) {
                    let sql = delete_sql(&relation.name, &keys, target);
                    let statement = self.prepared(&sql).await?;
                    let old_key: Vec<Vec<Option<String>>> =
                        key.iter().map(|i| vec![datum_text(&old.0[*i])]).collect();
                    let key_params: Vec<&(dyn ToSql + Sync)> =
                        old_key.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                    self.client.execute(&statement, &key_params).await?;
                    insert_sql(&relation.name, &names, target)
                } else {
                    upsert_sql(&relation.name, &names, &keys, target)
                }
            }
            None => insert_sql(&relation.name, &names, target),
        };
        let statement = self.prepared(&sql).await?;
        self.client.execute(&statement, &params).await
    }
}
