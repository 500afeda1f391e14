//! `cutover verify --repair`: the differing target rows made equal to the
//! source as of the compared position, through the stream's own apply
//! (the PostgreSQL sink, with the forward direction's replication origin,
//! so that the reverse direction never sends the repairs back).
//!
//! The repair is one target transaction recorded at the compared
//! position, while nothing else writes the target: with no daemon, the
//! verify holds the state store and writes in the forward origin, so the
//! next stream starts there (no change is applied twice, none is missed);
//! beside a running daemon, [`super::beside`] holds the daemon's applier
//! at a fresh position while the repair is made there, in an origin of
//! its own.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cutover_conflict::repair::Fix;
use cutover_conflict::row::{Row, unescape};
use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::change::{
    Change, ChangeKind, Datum, OldRow, Relation, RelationColumn, Tuple,
};
use cutover_replication::sink::postgres::PostgresSink;

use crate::config::Config;
use crate::direction::Direction;

use super::VerifyError;
use super::table::Plan;

/// A table's rows as the sink takes them: the fields of a verify row that
/// the sink writes (generated columns are the target's to compute).
struct Shape {
    relation: Arc<Relation>,
    /// Indexes into a verify row, one per relation column.
    fields: Vec<usize>,
    keyless: bool,
}

fn shape(plan: &Plan) -> Shape {
    let layout = plan.layout();
    let table = plan.table();
    let keyless = layout.is_keyless();
    let mut columns = Vec::new();
    let mut fields = Vec::new();
    for (i, name) in layout.names.iter().enumerate() {
        let Some(column) = table.columns.iter().find(|c| &c.name == name) else {
            continue;
        };
        if column.generated {
            continue;
        }
        columns.push(RelationColumn {
            name: name.clone(),
            type_oid: column.type_oid,
            type_modifier: -1,
            key: !keyless && i < layout.key.len(),
        });
        fields.push(i);
    }
    Shape {
        relation: Arc::new(Relation {
            oid: table.oid,
            name: table.name.clone(),
            replica_identity: if keyless { 'f' } else { 'd' },
            columns,
        }),
        fields,
        keyless,
    }
}

impl Shape {
    /// The row's values; with `key_only`, NULL outside the key.
    fn tuple(&self, row: &Row, key_only: bool) -> Tuple {
        Tuple(
            self.fields
                .iter()
                .zip(&self.relation.columns)
                .map(|(i, column)| match row.field(*i) {
                    Some(_) if key_only && !column.key => Datum::Null,
                    Some(bytes) => Datum::Text(Bytes::from(unescape(bytes))),
                    None => Datum::Null,
                })
                .collect(),
        )
    }

    fn change(&self, fix: &Fix, at: Lsn) -> Change {
        let relation = Arc::clone(&self.relation);
        let kind = match fix {
            Fix::Insert(row) => ChangeKind::Insert {
                relation,
                new: self.tuple(row, false),
            },
            Fix::Update(row) => ChangeKind::Update {
                relation,
                old: None,
                new: self.tuple(row, false),
            },
            Fix::Delete(row) if self.keyless => ChangeKind::Delete {
                relation,
                old: OldRow::Full(self.tuple(row, false)),
            },
            Fix::Delete(row) => ChangeKind::Delete {
                relation,
                old: OldRow::Key(self.tuple(row, true)),
            },
        };
        Change {
            xid: 0,
            subxid: 0,
            commit_lsn: Some(at),
            lsn: at,
            ordinal: 0,
            origin: None,
            kind,
        }
    }
}

/// Writes every fix on the target in one transaction recorded at `at` in
/// the replication origin `origin`; returns, per table, what was written
/// (`inserted (id=1)`).
pub(super) async fn repair(
    config: &Config,
    origin: &str,
    copied_at: HashMap<TableName, Lsn>,
    at: Lsn,
    work: &[(&Plan, Vec<Fix>)],
) -> Result<HashMap<String, Vec<String>>, VerifyError> {
    let mut written: HashMap<String, Vec<String>> = HashMap::new();
    // Every delete before every write: a value under a unique key may
    // have moved between two rows (a swap), which one row written over
    // another cannot do. An update is a delete and an insert here; the
    // sink replays them one by one in this order when a set-based
    // statement meets such a swap.
    let mut deletes = Vec::new();
    let mut writes = Vec::new();
    for (plan, fixes) in work {
        let shape = shape(plan);
        for fix in fixes {
            match fix {
                Fix::Delete(_) => deletes.push(shape.change(fix, at)),
                Fix::Insert(_) => writes.push(shape.change(fix, at)),
                Fix::Update(row) if !shape.keyless => {
                    deletes.push(shape.change(&Fix::Delete(row.clone()), at));
                    writes.push(shape.change(&Fix::Insert(row.clone()), at));
                }
                Fix::Update(_) => writes.push(shape.change(fix, at)),
            }
            written
                .entry(plan.table().name.to_string())
                .or_default()
                .push(format!("{} {}", fix.verb(), plan.key_text(fix.row())));
        }
    }
    let mut changes: Vec<Change> = deletes.into_iter().chain(writes).collect();
    for (ordinal, change) in changes.iter_mut().enumerate() {
        change.ordinal = ordinal as u64;
    }
    if changes.is_empty() {
        return Ok(written);
    }
    let mut sink = PostgresSink::connect(
        &config.target()?.conninfo,
        origin,
        copied_at,
        Direction::Forward.skipped_origins(&config.slot),
    )
    .await
    .map_err(|e| VerifyError::Repair(e.to_string()))?;
    sink.set_ddl_policy(config.ddl);
    sink.apply_at(&changes, at)
        .await
        .map_err(|e| VerifyError::Repair(e.to_string()))?;
    tracing::info!(rows = changes.len(), %at, "target repaired");
    Ok(written)
}
