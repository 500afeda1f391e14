//! Tables written through a field mapping ([`crate::mapping`]): changes
//! coalesced per source key like any other, then written by the mapping's
//! statements, which compute the target row, apply its filter and record
//! its rejection in one statement per batch and table.
//!
//! A mapped row is always written whole: an UPDATE whose new row leaves a
//! TOASTed value unchanged takes it from the old row when the source sends
//! that (`REPLICA IDENTITY FULL`); when a column the mapping needs is
//! still missing, the apply stops and says so, rather than compute a
//! target value from part of the row.

use std::borrow::Cow;
use std::sync::Arc;

use tokio_postgres::types::ToSql;

use super::PostgresSink;
use super::batch::TableOp;
use super::coalesce::{RowKey, RowOp, TableBatch, batch_for, key_of, put};
use super::error::{ApplyError, session_error};
use super::one::show_key;
use super::pipeline::{TextColumn, text_columns};
use crate::change::{Change, ChangeKind, Datum, OldRow, Relation, Tuple};
use crate::lsn::Lsn;
use crate::mapping::Mapping;

/// The positions of the mapping's source key in `relation`.
/// Errors of the pure steps here are the text of an [`ApplyError::Schema`].
pub(super) fn mapped_key(mapping: &Mapping, relation: &Relation) -> Result<Vec<usize>, String> {
    mapping
        .source_key
        .iter()
        .map(|k| {
            relation.columns.iter().position(|c| c.name == *k).ok_or_else(|| {
                format!(
                    "{} no longer has column {k}, the key its mapping (map[{}]) finds rows by: restore it, or change the mapping and restart",
                    relation.name, mapping.index
                )
            })
        })
        .collect()
}

/// What to write for the new row of an insert or update: the whole row
/// (unchanged TOAST values taken from a whole old row when the source
/// sent one); a patch when the values still missing only feed target
/// columns that copy them as they are (left alone on the target); an
/// error when the mapping needs a value the change does not carry.
fn new_row<'a>(
    mapping: &Mapping,
    relation: &Relation,
    new: &'a Tuple,
    old: Option<&OldRow>,
    lsn: Lsn,
) -> Result<RowOp<'a>, String> {
    // Only a whole old row (REPLICA IDENTITY FULL) carries the other
    // columns' values: an old key's other columns are NULL placeholders.
    let old = match old {
        Some(OldRow::Full(tuple)) => Some(tuple),
        _ => None,
    };
    if !new.0.contains(&Datum::UnchangedToast) {
        return Ok(RowOp::Upsert(Cow::Borrowed(&new.0[..])));
    }
    let filled: Vec<Datum> = new
        .0
        .iter()
        .enumerate()
        .map(|(i, d)| match (d, old.and_then(|o| o.0.get(i))) {
            (Datum::UnchangedToast, Some(before)) if *before != Datum::UnchangedToast => {
                before.clone()
            }
            (d, _) => d.clone(),
        })
        .collect();
    let missing = mapping.missing(|name| {
        relation
            .columns
            .iter()
            .position(|c| c.name == name)
            .is_some_and(|i| filled.get(i).is_some_and(|d| *d != Datum::UnchangedToast))
    });
    if missing.is_empty() {
        return Ok(RowOp::Upsert(Cow::Owned(filled)));
    }
    if mapping.patchable(&missing) {
        return Ok(RowOp::Patch(Cow::Owned(filled)));
    }
    Err(format!(
        "an UPDATE of {} at {lsn} left column(s) {} unchanged (a TOASTed value the source does not send), and the mapping (map[{}]) computes the target row from them: \
         run ALTER TABLE {} REPLICA IDENTITY FULL on the source so that later changes carry them; to get past this one, stop the daemon, drop its replication slot on the source and run `cutover run --resync`, which loads mapped tables again",
        relation.name,
        missing.join(", "),
        mapping.index,
        relation.name.quoted()
    ))
}

impl PostgresSink {
    /// The mapping of `relation`'s table, if it has one.
    pub(super) fn mapping_of(&self, relation: &Relation) -> Option<Arc<Mapping>> {
        // Asked for every change: no hash of the name when nothing is mapped.
        if self.mappings.is_empty() {
            return None;
        }
        self.mappings.get(&relation.name).cloned()
    }

    /// Merges a change to a mapped table into the pending batch.
    pub(super) fn coalesce_mapped<'a>(
        &self,
        pending: &mut Vec<TableBatch<'a>>,
        change: &'a Change,
        relation: &Arc<Relation>,
        mapping: &Mapping,
    ) -> Result<(), String> {
        let key_cols = mapped_key(mapping, relation)?;
        let batch = batch_for(pending, relation, &key_cols, 0);
        match &change.kind {
            ChangeKind::Insert { new, .. } => {
                let row = new_row(mapping, relation, new, None, change.lsn)?;
                put(batch, key_of(&key_cols, new), row, change.lsn);
            }
            ChangeKind::Update { old, new, .. } => {
                let key = key_of(&key_cols, new);
                let row = new_row(mapping, relation, new, old.as_ref(), change.lsn)?;
                if let Some(old) = old {
                    let old_key: RowKey = key_of(&key_cols, old.tuple());
                    if old_key != key {
                        if matches!(row, RowOp::Patch(_)) {
                            // The row moves to another key: it is written
                            // whole there, and a value it keeps is not sent.
                            return Err(format!(
                                "an UPDATE of {} at {} changes a row's key and leaves a large (TOASTed) value unchanged, which the source does not send: the row cannot be written under its new key through the mapping (map[{}]). \
                                 Run ALTER TABLE {} REPLICA IDENTITY FULL on the source so that later changes carry such values; to get past this one, stop the daemon, drop its replication slot on the source and run `cutover run --resync`, which loads mapped tables again",
                                relation.name,
                                change.lsn,
                                mapping.index,
                                relation.name.quoted()
                            ));
                        }
                        put(batch, old_key, RowOp::Delete, change.lsn);
                    }
                }
                put(batch, key, row, change.lsn);
            }
            ChangeKind::Delete { old, .. } => {
                put(
                    batch,
                    key_of(&key_cols, old.tuple()),
                    RowOp::Delete,
                    change.lsn,
                );
            }
            ChangeKind::Truncate { .. } | ChangeKind::TruncatePartition(_) | ChangeKind::Ddl(_) => {
                unreachable!("truncates and DDL are barriers")
            }
        }
        Ok(())
    }

    /// The statements for one mapped table of a batch: its deletes by
    /// source key, then its rows written through the mapping.
    pub(super) async fn mapped_ops<'b>(
        &mut self,
        batch: &'b TableBatch<'_>,
        mapping: &Mapping,
        ops: &mut Vec<TableOp<'b>>,
    ) -> Result<(), ApplyError> {
        let relation = &batch.relation;
        let types = self.source_types(relation, mapping).await?;
        let type_of = |i: usize| types[i].as_str();
        let mut deletes: Vec<&RowKey> = Vec::new();
        let mut rows: Vec<&[Datum]> = Vec::new();
        let mut patches: std::collections::BTreeMap<Vec<usize>, Vec<&[Datum]>> =
            std::collections::BTreeMap::new();
        for entry in &batch.rows {
            match &entry.op {
                RowOp::Delete => deletes.push(&entry.key),
                RowOp::Upsert(row) | RowOp::Insert(row) | RowOp::Update(row) => rows.push(row),
                RowOp::Patch(row) => {
                    let missing: Vec<usize> = row
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| **d == Datum::UnchangedToast)
                        .map(|(i, _)| i)
                        .collect();
                    patches.entry(missing).or_default().push(row);
                }
            }
        }
        if !deletes.is_empty() {
            let keys: Vec<&str> = batch
                .key
                .iter()
                .map(|i| relation.columns[*i].name.as_str())
                .collect();
            let key_types: Vec<&str> = batch.key.iter().map(|i| type_of(*i)).collect();
            let sql = mapping.delete_sql(&mapping.typed_rows(&keys, &key_types, 1));
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: (0..keys.len())
                    .map(|j| TextColumn(deletes.iter().map(|k| k[j]).collect()))
                    .collect(),
                what: "deleting (mapped) from",
                table: &relation.name,
                expect: None,
            });
        }
        if !rows.is_empty() {
            let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
            let all: Vec<&str> = (0..names.len()).map(type_of).collect();
            let sql = mapping.write_sql(&mapping.typed_rows(&names, &all, 1));
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&rows, 0..names.len()),
                what: "writing (mapped) rows of",
                table: &relation.name,
                expect: None,
            });
        }
        for (missing, rows) in patches {
            let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
            let absent: Vec<&str> = missing.iter().map(|i| names[*i]).collect();
            let all: Vec<&str> = (0..names.len()).map(type_of).collect();
            let sql = mapping.patch_sql(&mapping.typed_rows(&names, &all, 1), &absent);
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&rows, 0..names.len()),
                what: "updating (mapped, a TOASTed value unchanged) rows of",
                table: &relation.name,
                // Passing rows the target lacks: none may be.
                expect: Some(0),
            });
        }
        Ok(())
    }

    /// The types the columns of `relation` are read as: the source's, as
    /// its stream describes them now (built-in types, spelled by the
    /// target, which numbers them the same), else as `check` resolved
    /// them. Asked once per description of the table.
    async fn source_types(
        &mut self,
        relation: &Arc<Relation>,
        mapping: &Mapping,
    ) -> Result<Arc<Vec<String>>, ApplyError> {
        if let Some((known, types)) = self.mapped_types.get(&relation.name)
            && (Arc::ptr_eq(known, relation) || **known == **relation)
        {
            return Ok(Arc::clone(types));
        }
        let spelled = self.spelled_types(relation).await?;
        let types: Vec<String> = relation
            .columns
            .iter()
            .zip(spelled)
            .map(|(c, spelled)| spelled.unwrap_or_else(|| mapping.source_type(&c.name).to_owned()))
            .collect();
        let types = Arc::new(types);
        self.mapped_types.insert(
            relation.name.clone(),
            (Arc::clone(relation), Arc::clone(&types)),
        );
        Ok(types)
    }

    /// One change to a mapped table, on its own (the slow path): its
    /// statements run one by one, a refusal naming the change.
    pub(super) async fn apply_one_mapped(
        &mut self,
        change: &Change,
        relation: &Arc<Relation>,
        mapping: &Mapping,
    ) -> Result<(), ApplyError> {
        let mut pending = Vec::new();
        self.coalesce_mapped(&mut pending, change, relation, mapping)
            .map_err(ApplyError::Schema)?;
        let mut ops = Vec::new();
        for batch in &pending {
            self.mapped_ops(batch, mapping, &mut ops).await?;
        }
        let key_cols = mapped_key(mapping, relation).map_err(ApplyError::Schema)?;
        let spec = Some(key_cols);
        let shown = match &change.kind {
            ChangeKind::Insert { new, .. } | ChangeKind::Update { new, .. } => {
                show_key(relation, &spec, new)
            }
            ChangeKind::Delete { old, .. } => show_key(relation, &spec, old.tuple()),
            _ => String::new(),
        };
        for op in &ops {
            let params: Vec<&(dyn ToSql + Sync)> =
                op.params.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            let count =
                self.client
                    .execute(&op.statement, &params)
                    .await
                    .map_err(|err| match err.as_db_error() {
                        Some(db) => ApplyError::Refused {
                            op: change.kind.op(),
                            table: relation.name.clone(),
                            key: shown.clone(),
                            lsn: change.lsn,
                            detail: format!(
                                "{} (through the mapping to {}, map[{}])",
                                db.message(),
                                mapping.target,
                                mapping.index
                            ),
                            sqlstate: db.code().code().to_owned(),
                        },
                        None => session_error(format!(
                            "applying {} on {}",
                            change.kind.op(),
                            relation.name
                        ))(err),
                    })?;
            if op.expect.is_some_and(|e| e as u64 != count) {
                return Err(ApplyError::Schema(format!(
                    "an UPDATE of {} at {} {shown} makes a row pass the mapping (map[{}]) that it rejected until now, and leaves a TOASTed value unchanged, which the source does not send: the row cannot be built on the target. \
                     Run ALTER TABLE {} REPLICA IDENTITY FULL on the source so that later changes carry such values; to get past this one, stop the daemon, drop its replication slot on the source and run `cutover run --resync`, which loads mapped tables again",
                    relation.name,
                    change.lsn,
                    mapping.index,
                    relation.name.quoted()
                )));
            }
        }
        Ok(())
    }

    /// Follows DDL on a mapped source table: it goes on as long as every
    /// column the mapping uses is still there (a new column is left out
    /// by the mapping); otherwise it stops, naming the mapping.
    pub(super) fn mapped_ddl(
        &self,
        ddl: &crate::ddl::DdlChange,
        mapping: &Mapping,
        lsn: Lsn,
    ) -> Result<(), Box<ApplyError>> {
        let stop = |problem: String| {
            Box::new(ApplyError::Ddl {
                table: ddl.table.clone(),
                lsn,
                statement: ddl.statement.trim().to_owned(),
                problem,
                fix: format!(
                    "change {} and map[{}] to match, then restart",
                    mapping.target, mapping.index
                ),
            })
        };
        let Some(columns) = &ddl.columns else {
            return Err(stop(format!(
                "the source table is dropped; it is mapped to {}",
                mapping.target
            )));
        };
        let mut needed: Vec<&str> = mapping.uses.iter().map(|s| s.as_str()).collect();
        needed.extend(mapping.source_key.iter().map(|s| s.as_str()));
        let gone: Vec<&str> = needed
            .into_iter()
            .filter(|n| !columns.iter().any(|c| c.name == *n))
            .collect();
        if !gone.is_empty() {
            return Err(stop(format!(
                "column(s) {} that the mapping to {} uses are gone",
                gone.join(", "),
                mapping.target
            )));
        }
        tracing::warn!(table = %ddl.table, target = %mapping.target, statement = %ddl.statement.trim(),
            "DDL on a mapped table: the mapping still finds every column it uses; a new source column is left out unless [map.columns] names it");
        Ok(())
    }
}
