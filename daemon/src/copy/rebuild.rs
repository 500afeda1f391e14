//! The copy's drop and rebuild of indexes and constraints on the target:
//! recorded in the store before anything is dropped, rebuilt after the
//! load, and foreign keys restored `NOT VALID` and validated. The
//! statements themselves are in [`super::statements`].

use cutover_replication::catalog::TableName;
use cutover_replication::client::describe;
use tokio_postgres::Client;

use crate::store::{DroppedIndex, Store, TableCopy};

use super::CopyError;
use super::orchestration::query;
use super::statements;

/// Adds the rows of `sql` not yet in `list`. Every query above returns
/// the same columns: name, definition, a key's index definition and index
/// name, and a foreign key's referenced table (schema, name).
pub(super) async fn record_definitions(
    target: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    table: &TableName,
    what: &str,
    list: &mut Vec<DroppedIndex>,
) -> Result<(), CopyError> {
    let rows = target
        .query(sql, params)
        .await
        .map_err(query("target", format!("listing {what} of {table}")))?;
    for row in rows {
        let name: String = row.get(0);
        if !list.iter().any(|d| d.name == name) {
            let pair = |a: usize, b: usize| {
                row.get::<_, Option<String>>(a)
                    .zip(row.get::<_, Option<String>>(b))
            };
            list.push(DroppedIndex {
                name,
                definition: row.get(1),
                index: pair(2, 3),
                references: pair(4, 5).map(|(schema, name)| TableName::new(schema, name)),
            });
        }
    }
    Ok(())
}

/// First step of `copy.drop_indexes`, for every table before any index:
/// drops the target table's CHECK and FOREIGN KEY constraints, recording
/// their definitions first so that a crash can never lose one. The foreign
/// keys go first so that the keys they reference can go too.
pub(super) async fn drop_load_constraints(
    target: &Client,
    record: &mut TableCopy,
    store: &Store,
) -> Result<(), CopyError> {
    record_definitions(
        target,
        statements::LOAD_CONSTRAINTS,
        &[&record.name.quoted()],
        &record.name,
        "constraints",
        &mut record.dropped_constraints,
    )
    .await?;
    store.put_table_copy(record)?;
    store.flush().await?;
    for constraint in &record.dropped_constraints {
        drop_constraint(target, &record.name, &constraint.name).await?;
    }
    if !record.dropped_constraints.is_empty() {
        tracing::info!(table = %record.name, constraints = record.dropped_constraints.len(), "CHECK and FOREIGN KEY constraints dropped for the load");
    }
    Ok(())
}

pub(super) async fn drop_constraint(
    target: &Client,
    table: &TableName,
    name: &str,
) -> Result<(), CopyError> {
    target
        .batch_execute(&statements::drop_constraint(table, name))
        .await
        .map_err(query("target", format!("dropping constraint {name}")))
}

/// Second step of `copy.drop_indexes`: drops the table's secondary indexes
/// and the primary key and unique constraints nothing else needs,
/// recorded first like the constraints. A key recorded by an earlier,
/// interrupted load whose index was built but not yet attached loses that
/// index again (it is rebuilt with the key, not as an index of its own).
pub(super) async fn drop_indexes_and_keys(
    target: &Client,
    record: &mut TableCopy,
    store: &Store,
) -> Result<(), CopyError> {
    let table = record.name.quoted();
    record_definitions(
        target,
        statements::KEY_CONSTRAINTS,
        &[&table],
        &record.name,
        "keys",
        &mut record.dropped_keys,
    )
    .await?;
    let key_indexes: Vec<String> = record
        .dropped_keys
        .iter()
        .filter_map(|k| k.index.as_ref().map(|(_, name)| name.clone()))
        .collect();
    record_definitions(
        target,
        statements::SECONDARY_INDEXES,
        &[&table, &key_indexes],
        &record.name,
        "indexes",
        &mut record.dropped_indexes,
    )
    .await?;
    store.put_table_copy(record)?;
    store.flush().await?;
    for index in &record.dropped_indexes {
        target
            .batch_execute(&statements::drop_index(&index.name))
            .await
            .map_err(query("target", format!("dropping index {}", index.name)))?;
    }
    for key in &record.dropped_keys {
        drop_constraint(target, &record.name, &key.name).await?;
        if let Some((_, index)) = &key.index {
            target
                .batch_execute(&statements::drop_index_in(&record.name.schema, index))
                .await
                .map_err(query("target", format!("dropping index {index}")))?;
        }
    }
    if !record.dropped_indexes.is_empty() || !record.dropped_keys.is_empty() {
        tracing::info!(table = %record.name, indexes = record.dropped_indexes.len(), keys = record.dropped_keys.len(), "indexes and keys dropped for the load");
    }
    Ok(())
}

/// The first half of putting a key back: its unique index, built on its
/// own (a SHARE lock, so the table's other indexes build at the same
/// time). The key is attached to it by [`rebuild_key`] once every build of
/// the table is done: attaching takes an ACCESS EXCLUSIVE lock, which
/// would wait for the other builds and hold a worker idle meanwhile.
/// Idempotent; nothing to do for a key without a separate index (on a
/// partitioned table) or one already in place.
pub(super) async fn build_key_index(
    target: &Client,
    table: &TableName,
    key: &DroppedIndex,
) -> Result<(), CopyError> {
    match &key.index {
        Some((definition, _)) if !constraint_exists(target, table, &key.name).await? => {
            create_key_index(target, key, definition).await
        }
        _ => Ok(()),
    }
}

pub(super) async fn create_key_index(
    target: &Client,
    key: &DroppedIndex,
    definition: &str,
) -> Result<(), CopyError> {
    target
        .batch_execute(&statements::build_index(definition))
        .await
        .map_err(query(
            "target",
            format!("building the index of key {}", key.name),
        ))
}

/// Puts a key dropped for the load back: its unique index (unless
/// [`build_key_index`] built it already), then the constraint on it
/// (`USING INDEX`, no second build). Where that cannot be done (a
/// partitioned table, an index `USING INDEX` refuses) the constraint is
/// added as it was defined. Idempotent.
pub(super) async fn rebuild_key(
    target: &Client,
    table: &TableName,
    key: &DroppedIndex,
) -> Result<(), CopyError> {
    if constraint_exists(target, table, &key.name).await? {
        return Ok(());
    }
    if let Some((definition, index)) = &key.index {
        create_key_index(target, key, definition).await?;
        let attach = statements::attach_key(table, &key.name, &key.definition, index);
        match target.batch_execute(&attach).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::debug!(key = %key.name, error = %describe(&err), "USING INDEX refused; adding the key as defined");
                target
                    .batch_execute(&statements::drop_index_in(&table.schema, index))
                    .await
                    .map_err(query(
                        "target",
                        format!("dropping the index of key {}", key.name),
                    ))?;
            }
        }
    }
    restore_constraint(target, table, key).await.map(|_| ())
}

/// Rebuilds an index dropped for the load. The definition comes from
/// pg_get_indexdef on the same server; IF NOT EXISTS makes a rebuild after
/// a crash idempotent. The index of a partitioned table is defined `ON
/// ONLY` the parent (its partitions' indexes were attached one by one):
/// rebuilt without `ONLY`, it builds them again too.
pub(super) async fn rebuild_index(target: &Client, index: &DroppedIndex) -> Result<(), CopyError> {
    target
        .batch_execute(&statements::build_index(&index.definition))
        .await
        .map_err(query("target", format!("rebuilding index {}", index.name)))
}

/// Puts back, one after another, the keys, indexes and CHECK constraints
/// a crash left dropped on a table that is not copied again (the copy
/// itself rebuilds them as worker tasks).
pub(super) async fn rebuild_indexes(
    target: &Client,
    record: &mut TableCopy,
) -> Result<(), CopyError> {
    for key in std::mem::take(&mut record.dropped_keys) {
        rebuild_key(target, &record.name, &key).await?;
    }
    for index in std::mem::take(&mut record.dropped_indexes) {
        rebuild_index(target, &index).await?;
    }
    let (foreign, checks): (Vec<DroppedIndex>, Vec<DroppedIndex>) =
        std::mem::take(&mut record.dropped_constraints)
            .into_iter()
            .partition(|c| c.definition.starts_with("FOREIGN KEY"));
    for check in checks {
        // A CHECK constraint that fails is an error (never `Some`).
        restore_constraint(target, &record.name, &check).await?;
    }
    record.dropped_constraints = foreign;
    Ok(())
}

pub(super) async fn constraint_exists(
    target: &Client,
    table: &TableName,
    name: &str,
) -> Result<bool, CopyError> {
    Ok(target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::text::regclass AND conname = $2)",
            &[&table.quoted(), &name],
        )
        .await
        .map_err(query("target", format!("looking up constraint {name}")))?
        .get(0))
}

/// Adds a constraint dropped for the load back. A key is added as it was
/// (its index built by one sort). A CHECK or FOREIGN KEY constraint is
/// added `NOT VALID` first (no scan under the strong lock), then
/// validated; one that was NOT VALID before stays so. A foreign key whose
/// referenced rows are not there (a referenced table out of scope) stays
/// NOT VALID: the validation failure is returned, for a warning; the rows
/// themselves came from a snapshot where the source enforced it.
pub(super) async fn restore_constraint(
    target: &Client,
    table: &TableName,
    constraint: &DroppedIndex,
) -> Result<Option<Unvalidated>, CopyError> {
    let exists = constraint_exists(target, table, &constraint.name).await?;
    let validated = constraint.definition.starts_with("CHECK")
        || constraint.definition.starts_with("FOREIGN KEY");
    let was_valid = !constraint.definition.ends_with("NOT VALID");
    if !exists {
        target
            .batch_execute(&statements::add_constraint(
                table,
                &constraint.name,
                &constraint.definition,
                validated && was_valid,
            ))
            .await
            .map_err(query(
                "target",
                format!("adding back constraint {}", constraint.name),
            ))?;
    }
    if validated && was_valid {
        let validate = statements::validate_constraint(table, &constraint.name);
        if let Err(err) = target.batch_execute(&validate).await {
            if constraint.definition.starts_with("FOREIGN KEY") {
                return Ok(Some(Unvalidated {
                    statement: validate,
                    error: describe(&err),
                }));
            }
            return Err(query(
                "target",
                format!("validating constraint {}", constraint.name),
            )(err));
        }
    }
    Ok(None)
}

/// A foreign key left `NOT VALID`: the statement that validates it, and
/// why it failed now.
#[derive(Debug)]
pub(super) struct Unvalidated {
    pub(super) statement: String,
    pub(super) error: String,
}
