//! The initial copy's rows as `r` events (`[kafka] snapshot = true`).
//!
//! They are read from the target once the copy is done and before the
//! first streamed change is applied there: the target then holds each
//! table exactly as the source held it at the table's snapshot, and the
//! stream's changes follow from there. Read in the text forms pgoutput
//! uses (the apply session's settings), so a row published from the
//! snapshot and a change streamed later look alike.
//!
//! Each table (a partitioned one whole, under its root's name, as the
//! stream names it) is read in ranges of heap blocks (a TID range scan),
//! each range one Kafka transaction whose progress record says where the
//! next range starts: a feed stopped in the middle goes on from there, and
//! no row is published twice. The target is not written meanwhile, so its
//! rows do not move between blocks.

use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::catalog::TableName;
use crate::change::{Change, ChangeKind, Datum, Relation, RelationColumn, Tuple};
use crate::lsn::Lsn;
use crate::sink::envelope::{self, Origin, SnapshotMark};
use crate::sql::quote_ident;

use super::{FeedError, KafkaSink};

/// Heap blocks per Kafka transaction: 8 MB of a table's heap at most.
const BLOCKS: u64 = 1024;

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

    /// Publishes the rows of `tables` as `target` holds them, as of `at`
    /// (the stream's first position), from where an earlier session
    /// stopped.
    pub async fn publish_snapshot(
        &mut self,
        target: &Client,
        tables: &[TableName],
        at: Lsn,
    ) -> Result<(), FeedError> {
        // A partition's rows stream under its root's name.
        let mut tables = roots(target, tables).await?;
        tables.sort();
        tables.dedup();
        let (resume_table, resume_block) = match &self.snapshot {
            Some(SnapshotMark::Done) => return Ok(()),
            Some(SnapshotMark::At { table, block }) => (Some(table.clone()), *block),
            None => (None, 0),
        };
        let mut rows = 0_u64;
        for table in tables {
            let name = table.to_string();
            let first = match &resume_table {
                Some(resume) if name < *resume => continue,
                Some(resume) if name == *resume => resume_block,
                _ => 0,
            };
            let relation = Arc::new(describe(target, &table).await?);
            let blocks = blocks_of(target, &table).await?;
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
                    table.quoted()
                );
                let read = target
                    .simple_query(&sql)
                    .await
                    .map_err(|e| read_error(&table, &e))?;
                let mut messages = Vec::new();
                let origin = Origin {
                    server: self.feed.server,
                    database: &self.feed.database,
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
                    messages.extend(envelope::messages(&change, &origin, origin.commit_ms, true));
                }
                self.snapshot = Some(SnapshotMark::At {
                    table: name.clone(),
                    block: end,
                });
                self.publish(&messages, at).await?;
                block = end;
            }
            tracing::info!(table = %name, "snapshot published to Kafka");
        }
        self.snapshot = Some(SnapshotMark::Done);
        self.publish(&[], at).await?;
        tracing::info!(rows, "the snapshot is in Kafka");
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn read_error(table: &TableName, err: &tokio_postgres::Error) -> FeedError {
    FeedError::transient(
        format!("reading {table} on the target for the snapshot"),
        crate::client::describe(err),
    )
}

/// The table's columns as the stream describes them: those pgoutput
/// sends (not dropped, not generated), the primary key's flagged.
async fn describe(target: &Client, table: &TableName) -> Result<Relation, FeedError> {
    let rows = target
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod,
                    coalesce(a.attnum = ANY(i.indkey::int2[]), false),
                    c.relreplident::text, c.oid::int8
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
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

/// Heap blocks of the table, or of its largest partition.
async fn blocks_of(target: &Client, table: &TableName) -> Result<u64, FeedError> {
    let row = target
        .query_one(
            // pg_partition_tree lists nothing for a table that is not
            // partitioned.
            "SELECT (coalesce((SELECT max(pg_relation_size(relid))
                                 FROM pg_partition_tree($1::text::regclass) WHERE isleaf),
                              pg_relation_size($1::text::regclass))
                     / current_setting('block_size')::int8)::int8",
            &[&table.quoted()],
        )
        .await
        .map_err(|e| read_error(table, &e))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Each table's partition root (itself when not a partition).
async fn roots(target: &Client, tables: &[TableName]) -> Result<Vec<TableName>, FeedError> {
    let mut roots = Vec::with_capacity(tables.len());
    for table in tables {
        let row = target
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
    Ok(roots)
}
