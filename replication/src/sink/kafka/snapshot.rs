//! The initial copy's rows as `r` events (`[kafka] snapshot = true`).
//!
//! They are read from the target once the copy is done and before the
//! first streamed change is applied there: the target then holds each
//! table exactly as the source held it at the table's snapshot, and the
//! stream's changes follow from there. Read in the text forms pgoutput
//! uses (the apply session's settings), so a row published from the
//! snapshot and a change streamed later look alike. Each table is
//! described from the source's catalog, as the stream describes it: its
//! columns in the source's order, and the key of its replica identity, so
//! that a row's `r` event lands under the same key, in the same partition,
//! as its later changes.
//!
//! A table is published under its (source) root's name, and read on the
//! target table by table: each of the target's partitions of it (the
//! target may be partitioned otherwise, or not at all) in ranges of heap
//! blocks (TID range scans). Each range is one Kafka transaction whose
//! progress record says where the next starts, so a feed stopped in the
//! middle goes on from there and no row is published twice. The target is
//! not written meanwhile, so its rows do not move between blocks.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::catalog::TableName;
use crate::change::{Change, ChangeKind, Datum, Relation, RelationColumn, Tuple};
use crate::lsn::Lsn;
use crate::sink::envelope::{Batch, Origin, SnapshotMark};
use crate::sql::quote_ident;

use super::{FeedError, KafkaSink};

/// Heap blocks per Kafka transaction: 2 MB of a table's heap (its TOASTed
/// values besides).
const BLOCKS: u64 = 256;

impl KafkaSink {
    /// Whether the snapshot is still to publish (or to finish).
    pub fn snapshot_pending(&self) -> bool {
        self.snapshot != Some(SnapshotMark::Done)
    }

    /// Whether the feed has published changes without a snapshot: one
    /// published now would come after them.
    pub fn fed_without_snapshot(&self) -> bool {
        self.resumed && self.snapshot.is_none()
    }

    /// Publishes the rows of `tables` (source names, as the copy recorded
    /// them) as `target` holds them, described from `source`'s catalog,
    /// as of `at` (the stream's first position), from where an earlier
    /// session stopped.
    pub async fn publish_snapshot(
        &mut self,
        source: &Client,
        target: &Client,
        tables: &[TableName],
        at: Lsn,
    ) -> Result<(), FeedError> {
        let resume = match &self.snapshot {
            Some(SnapshotMark::Done) => return Ok(()),
            Some(SnapshotMark::At { table, block }) => Some((table.clone(), *block)),
            None => None,
        };
        // Every table the target reads for a published root, in name
        // order: the order a stopped feed resumes in.
        let mut parts: Vec<(TableName, TableName)> = Vec::new();
        for root in roots(source, tables).await? {
            for part in leaves(target, &root).await? {
                parts.push((part, root.clone()));
            }
        }
        parts.sort();
        parts.dedup();
        let mut relations: HashMap<TableName, Arc<Relation>> = HashMap::new();
        let mut rows = 0_u64;
        for (part, root) in parts {
            let first = match &resume {
                Some((table, _)) if part < *table => continue,
                Some((table, block)) if part == *table => *block,
                _ => 0,
            };
            let relation = match relations.get(&root) {
                Some(relation) => Arc::clone(relation),
                None => {
                    let relation = Arc::new(describe(source, &root).await?);
                    relations.insert(root.clone(), Arc::clone(&relation));
                    relation
                }
            };
            let blocks = blocks_of(target, &part).await?;
            let columns: Vec<String> = relation
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect();
            let mut block = first;
            while block < blocks {
                let end = (block + BLOCKS).min(blocks);
                let sql = format!(
                    "SELECT {} FROM {} WHERE ctid >= '({block},0)'::tid AND ctid < '({end},0)'::tid",
                    columns.join(", "),
                    part.quoted()
                );
                let read = target
                    .simple_query(&sql)
                    .await
                    .map_err(|e| read_error(&part, &e))?;
                let mut batch = Batch::default();
                let origin = Origin {
                    direction: self.feed.direction,
                    xid: 0,
                    commit_ms: now_ms(),
                };
                for message in read {
                    let SimpleQueryMessage::Row(row) = message else {
                        continue;
                    };
                    let tuple = Tuple(
                        (0..relation.columns.len())
                            .map(|i| {
                                row.get(i).map_or(Datum::Null, |text| {
                                    Datum::Text(Bytes::copy_from_slice(text.as_bytes()))
                                })
                            })
                            .collect(),
                    );
                    let change = Change {
                        xid: 0,
                        subxid: 0,
                        commit_lsn: Some(at),
                        lsn: at,
                        ordinal: rows,
                        origin: None,
                        kind: ChangeKind::Insert {
                            relation: Arc::clone(&relation),
                            new: tuple,
                        },
                    };
                    rows += 1;
                    self.encoder
                        .encode(&change, &origin, origin.commit_ms, true, &mut batch);
                }
                self.snapshot = Some(SnapshotMark::At {
                    table: part.clone(),
                    block: end,
                });
                self.publish(&batch, at).await?;
                failpoint("kafka:snapshot:range");
                block = end;
            }
            tracing::info!(table = %root, part = %part, "snapshot published to Kafka");
        }
        self.snapshot = Some(SnapshotMark::Done);
        self.publish(&Batch::default(), at).await?;
        tracing::info!(rows, "the snapshot is in Kafka");
        Ok(())
    }
}

/// Dies here when `CUTOVER_FAILPOINT` names this place (after a range of
/// the snapshot is committed), so that a test stops the feed in the
/// middle of its snapshot. Off unless set.
fn failpoint(here: &str) {
    if std::env::var("CUTOVER_FAILPOINT").is_ok_and(|wanted| wanted == here) {
        eprintln!("failpoint {here}: aborting");
        std::process::abort();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn read_error(table: &TableName, err: &tokio_postgres::Error) -> FeedError {
    FeedError::transient(
        format!("reading {table} for the snapshot"),
        crate::client::describe(err),
    )
}

/// The table's columns as the stream describes them, from the source's
/// catalog: those pgoutput sends (not dropped, not generated), in order,
/// those of its replica identity's key flagged.
async fn describe(source: &Client, table: &TableName) -> Result<Relation, FeedError> {
    let rows = source
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod,
                    coalesce(a.attnum = ANY(i.indkey::int2[]), c.relreplident = 'f'),
                    c.relreplident::text, c.oid::int8
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               LEFT JOIN pg_index i ON i.indrelid = c.oid
                    AND ((c.relreplident = 'd' AND i.indisprimary)
                      OR (c.relreplident = 'i' AND i.indisreplident))
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0
                AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| read_error(table, &e))?;
    let first = rows
        .first()
        .ok_or_else(|| FeedError::transient(format!("describing {table}"), "it has no column"))?;
    Ok(Relation {
        oid: u32::try_from(first.get::<_, i64>(5)).unwrap_or(0),
        name: table.clone(),
        replica_identity: first.get::<_, String>(4).chars().next().unwrap_or('d'),
        columns: rows
            .iter()
            .map(|r| RelationColumn {
                name: r.get(0),
                type_oid: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                type_modifier: r.get(2),
                key: r.get(3),
            })
            .collect(),
    })
}

/// Heap blocks of `table`.
async fn blocks_of(target: &Client, table: &TableName) -> Result<u64, FeedError> {
    let row = target
        .query_one(
            "SELECT (pg_relation_size($1::text::regclass)
                     / current_setting('block_size')::int8)::int8",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| read_error(table, &e))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Each table's partition root on the source (itself when not a
/// partition): the name its rows stream under.
async fn roots(source: &Client, tables: &[TableName]) -> Result<Vec<TableName>, FeedError> {
    let mut roots = Vec::with_capacity(tables.len());
    for table in tables {
        let row = source
            .query_one(
                "SELECT n.nspname::text, c.relname::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = coalesce(pg_partition_root($1::text::regclass), $1::text::regclass)",
                &[&table.quoted()],
            )
            .await
            .map_err(|e| read_error(table, &e))?;
        roots.push(TableName::new(
            row.get::<_, String>(0),
            row.get::<_, String>(1),
        ));
    }
    roots.sort();
    roots.dedup();
    Ok(roots)
}

/// The tables of `root` on the target that hold rows: its leaf
/// partitions, or itself when it is not partitioned there.
async fn leaves(target: &Client, root: &TableName) -> Result<Vec<TableName>, FeedError> {
    let rows = target
        .query(
            // pg_partition_tree lists nothing for a table that is not
            // partitioned.
            "SELECT n.nspname::text, c.relname::text
               FROM pg_partition_tree($1::text::regclass) t
               JOIN pg_class c ON c.oid = t.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.isleaf",
            &[&root.quoted()],
        )
        .await
        .map_err(|e| read_error(root, &e))?;
    if rows.is_empty() {
        return Ok(vec![root.clone()]);
    }
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}
