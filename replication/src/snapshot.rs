//! The snapshot copy's data path: chunk planning and one chunk's transfer.
//!
//! Why these choices:
//!
//! - **Exact seam.** Every source read runs in a REPEATABLE READ READ ONLY
//!   transaction that imported the snapshot exported by the slot's creation
//!   ([`open_snapshot`]). Rows committed before the slot's consistent point
//!   are in the copy; later ones arrive through the stream.
//! - **Chunks by physical position.** A table is split into ranges of heap
//!   pages (`ctid` ranges, scanned with TID range scans on 14+). Inside one
//!   snapshot these ranges partition the visible rows exactly, whatever the
//!   key type, and a table without a key splits as well as any other. The
//!   last range is open-ended, so rows on pages added since the size was
//!   read are not missed. Partitioned tables are read leaf by leaf and
//!   written through the target's root, which routes them.
//! - **No staging.** `COPY (SELECT ...) TO STDOUT` on the source is piped
//!   into `COPY ... FROM STDIN` on the target through bounded buffers: the
//!   memory used is a few protocol buffers whatever the table's size.
//!   Binary when every column has the same built-in type on both sides,
//!   text otherwise (text converts, for example `integer` into `bigint`).

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{Client, Transaction};

use crate::catalog::TableName;
use crate::mapping::Mapping;
use crate::sql::{quote_ident, quote_literal};

/// COPY data is forwarded to the target in messages of about this size.
/// The source sends one CopyData message per row; forwarding each on its
/// own costs a wake-up and a socket write per row, which on a small
/// machine takes the CPU the servers need. Batching bounds memory at one
/// buffer per worker.
const FORWARD_BYTES: usize = 256 * 1024;

/// User-defined types start at this OID; their binary form may embed OIDs
/// that differ between servers (arrays of enums), so they copy as text.
const FIRST_NORMAL_OID: u32 = 16384;

/// The COPY format of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyFormat {
    /// PostgreSQL's binary COPY format.
    Binary,
    /// The text format.
    Text,
}

impl CopyFormat {
    /// Binary when every source column has a built-in type spelled the same
    /// on the target; text otherwise.
    pub fn choose(
        source: &[(String, u32)],
        target_types: &[String],
        source_types: &[String],
    ) -> CopyFormat {
        let same = source_types == target_types;
        let builtin = source.iter().all(|(_, oid)| *oid < FIRST_NORMAL_OID);
        if same && builtin {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        }
    }

    /// `binary` or `text`.
    pub fn name(self) -> &'static str {
        match self {
            CopyFormat::Binary => "binary",
            CopyFormat::Text => "text",
        }
    }

    fn option(self) -> &'static str {
        match self {
            CopyFormat::Binary => "(FORMAT binary)",
            CopyFormat::Text => "(FORMAT text)",
        }
    }
}

/// One piece of a table's copy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    /// The table written on the target (the root for partitions).
    pub table: TableName,
    /// The relation read on the source (the table, or one leaf partition).
    pub source: TableName,
    /// First heap page (inclusive).
    pub first_page: u64,
    /// Last heap page (exclusive); `None` for "to the end".
    pub end_page: Option<u64>,
    /// Position among the table's chunks, from 0.
    pub index: usize,
    /// Pages of data (heap and TOAST) it is expected to read, for
    /// scheduling.
    #[serde(default)]
    pub pages: u64,
}

/// How much a chunk moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Rows written to the target.
    pub rows: u64,
    /// Bytes of COPY data moved.
    pub bytes: u64,
}

/// Opens the snapshot on a source connection: every later read on it sees
/// exactly the data as of the slot's consistent point. Must run before the
/// exporting session runs another command.
pub async fn open_snapshot(client: &Client, snapshot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
}

/// Splits a table into chunks of about `pages_per_chunk` pages of data.
///
/// Chunks are ranges of heap pages (`ctid`), but the data of a page is not
/// only on the page: TOASTed values live in the TOAST table. A table of
/// large text values has few heap pages and most of its bytes out of line,
/// so the step is scaled by the table's total size (heap and TOAST, from
/// `pg_table_size`) over its heap size: every chunk carries about the same
/// number of bytes, and a TOAST-heavy table is shared by several workers.
pub async fn plan_chunks(
    client: &Client,
    table: &TableName,
    partitioned: bool,
    pages_per_chunk: u32,
) -> Result<Vec<Chunk>, tokio_postgres::Error> {
    const SIZES: &str = "pg_relation_size(c.oid) / current_setting('block_size')::int8,
                         pg_table_size(c.oid) / current_setting('block_size')::int8";
    let sources: Vec<(TableName, i64, i64)> = if partitioned {
        client
            .query(
                &format!(
                    "SELECT n.nspname::text, c.relname::text, {SIZES}
                       FROM pg_partition_tree($1::text::regclass) t
                       JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE t.isleaf ORDER BY 1, 2"
                ),
                &[&table.quoted()],
            )
            .await?
            .iter()
            .map(|r| {
                (
                    TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                    r.get(2),
                    r.get(3),
                )
            })
            .collect()
    } else {
        let row = client
            .query_one(
                &format!("SELECT {SIZES} FROM pg_class c WHERE c.oid = $1::text::regclass"),
                &[&table.quoted()],
            )
            .await?;
        vec![(table.clone(), row.get(0), row.get(1))]
    };
    let mut chunks = Vec::new();
    for (source, pages, total_pages) in sources {
        let pages = pages.max(0) as u64;
        let step = chunk_step(pages, total_pages.max(0) as u64, pages_per_chunk);
        let total_pages = (total_pages.max(0) as u64).max(pages);
        let mut first = 0;
        loop {
            let end = first + step;
            let last = end >= pages;
            let heap = end.min(pages).saturating_sub(first);
            chunks.push(Chunk {
                table: table.clone(),
                source: source.clone(),
                first_page: first,
                end_page: (!last).then_some(end),
                index: chunks.len(),
                pages: (heap * total_pages).checked_div(pages).unwrap_or(0),
            });
            if last {
                break;
            }
            first = end;
        }
    }
    Ok(chunks)
}

/// Heap pages per chunk so that a chunk holds about `pages_per_chunk`
/// pages of data, TOAST included: `heap_pages` of the table's
/// `total_pages` are on the heap.
fn chunk_step(heap_pages: u64, total_pages: u64, pages_per_chunk: u32) -> u64 {
    let per_chunk = u64::from(pages_per_chunk.max(1));
    if total_pages <= heap_pages || heap_pages == 0 {
        return per_chunk;
    }
    // per_chunk × heap / total, rounded up, at least one page.
    (per_chunk.saturating_mul(heap_pages))
        .div_ceil(total_pages)
        .max(1)
}

/// The source query of a chunk.
pub fn source_sql(chunk: &Chunk, columns: &[String], format: CopyFormat) -> String {
    let list = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut filter = Vec::new();
    if chunk.first_page > 0 {
        filter.push(format!("ctid >= '({},0)'::tid", chunk.first_page));
    }
    if let Some(end) = chunk.end_page {
        filter.push(format!("ctid < '({end},0)'::tid"));
    }
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", filter.join(" AND "))
    };
    format!(
        "COPY (SELECT {list} FROM ONLY {}{filter}) TO STDOUT {}",
        chunk.source.quoted(),
        format.option()
    )
}

/// The target statement of a chunk.
pub fn target_sql(chunk: &Chunk, columns: &[String], format: CopyFormat) -> String {
    let list = columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "COPY {} ({list}) FROM STDIN {}",
        chunk.table.quoted(),
        format.option()
    )
}

/// Which side of a chunk's transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// Reading from the source.
    #[error("reading {table} from the source: {source}")]
    Source {
        /// The relation read.
        table: TableName,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Writing to the target.
    #[error("writing {table} to the target: {source}")]
    Target {
        /// The table written.
        table: TableName,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Moves one chunk in one target transaction: either all its rows are
/// committed, or none. The source connection must be inside the snapshot
/// ([`open_snapshot`]); `on_progress(bytes, rows)` is called as data
/// flows, for progress (rows as counted by [`rows_in_message`]: exact
/// only in the returned [`CopyStats`]).
pub async fn copy_chunk(
    source: &Client,
    target: &mut Client,
    chunk: &Chunk,
    columns: &[String],
    format: CopyFormat,
    on_progress: impl FnMut(u64, u64),
) -> Result<CopyStats, ChunkError> {
    let target_err = |source| ChunkError::Target {
        table: chunk.table.clone(),
        source,
    };
    let transaction = target.transaction().await.map_err(target_err)?;
    let stats = copy_chunk_in(source, &transaction, chunk, columns, format, on_progress).await?;
    transaction.commit().await.map_err(target_err)?;
    Ok(stats)
}

/// Moves one chunk inside the caller's target transaction, which commits
/// it (with others: small tables are copied several to a transaction).
pub async fn copy_chunk_in(
    source: &Client,
    transaction: &Transaction<'_>,
    chunk: &Chunk,
    columns: &[String],
    format: CopyFormat,
    on_progress: impl FnMut(u64, u64),
) -> Result<CopyStats, ChunkError> {
    pipe(
        source,
        transaction,
        chunk,
        &source_sql(chunk, columns, format),
        &target_sql(chunk, columns, format),
        format,
        on_progress,
    )
    .await
}

/// Moves one chunk of a mapped table inside the caller's target
/// transaction: its rows are loaded into a temporary table typed as the
/// source's columns, then written through the mapping
/// ([`Mapping::write_sql`]): passing rows upserted, rejected ones recorded.
/// The stats count the source rows read.
pub async fn copy_chunk_mapped_in(
    source: &Client,
    transaction: &Transaction<'_>,
    chunk: &Chunk,
    mapping: &Mapping,
    on_progress: impl FnMut(u64, u64),
) -> Result<CopyStats, ChunkError> {
    let target_err = |source| ChunkError::Target {
        table: mapping.target.clone(),
        source,
    };
    let stage = format!("cutover_stage_{}", mapping.index);
    let columns: Vec<String> = mapping
        .source_names()
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    transaction
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS pg_temp.{}; {}",
            quote_ident(&stage),
            mapping.stage_sql(&stage)
        ))
        .await
        .map_err(target_err)?;
    let load = format!(
        "COPY {} ({}) FROM STDIN",
        quote_ident(&stage),
        crate::sql::idents(&columns)
    );
    let stats = pipe(
        source,
        transaction,
        chunk,
        &source_sql(chunk, &columns, CopyFormat::Text),
        &load,
        CopyFormat::Text,
        on_progress,
    )
    .await?;
    transaction
        .execute(
            &mapping.write_sql(&format!("SELECT * FROM {}", quote_ident(&stage))),
            &[],
        )
        .await
        .map_err(target_err)?;
    transaction
        .batch_execute(&format!("DROP TABLE {}", quote_ident(&stage)))
        .await
        .map_err(target_err)?;
    Ok(stats)
}

/// Pipes `COPY ... TO STDOUT` on the source (`source_sql`) into `COPY
/// ... FROM STDIN` on the target (`target_sql`) in `transaction`: what a
/// chunk does, for callers that load elsewhere (a verify's temporary
/// table). `chunk` names the tables in errors.
pub async fn pipe(
    source: &Client,
    transaction: &Transaction<'_>,
    chunk: &Chunk,
    source_sql: &str,
    target_sql: &str,
    format: CopyFormat,
    mut on_progress: impl FnMut(u64, u64),
) -> Result<CopyStats, ChunkError> {
    let source_err = |source| ChunkError::Source {
        table: chunk.source.clone(),
        source,
    };
    let target_err = |source| ChunkError::Target {
        table: chunk.table.clone(),
        source,
    };
    let sink = transaction
        .copy_in::<_, Bytes>(target_sql)
        .await
        .map_err(target_err)?;
    let stream = source.copy_out(source_sql).await.map_err(source_err)?;
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut bytes = 0u64;
    let mut rows = 0u64;
    let mut buffer = BytesMut::with_capacity(FORWARD_BYTES);
    while let Some(data) = stream.next().await {
        let data = data.map_err(source_err)?;
        bytes += data.len() as u64;
        rows += rows_in_message(format, &data);
        buffer.extend_from_slice(&data);
        if buffer.len() >= FORWARD_BYTES {
            on_progress(buffer.len() as u64, std::mem::take(&mut rows));
            let full = std::mem::replace(&mut buffer, BytesMut::with_capacity(FORWARD_BYTES));
            sink.send(full.freeze()).await.map_err(target_err)?;
        }
    }
    if !buffer.is_empty() {
        on_progress(buffer.len() as u64, rows);
        sink.send(buffer.freeze()).await.map_err(target_err)?;
    }
    let rows = sink.finish().await.map_err(target_err)?;
    Ok(CopyStats { rows, bytes })
}

/// The signature, flags and header extension length that open binary
/// COPY data.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Rows in one CopyData message of `COPY ... TO STDOUT`, for progress while
/// a chunk flows: the server sends "always one per row" (the protocol's
/// description of copy-out). In binary format the header travels with the
/// first row, and the trailer (a field count of -1) comes alone, or with
/// the header when there are no rows. The count the target returns at the
/// end stays the exact one.
pub fn rows_in_message(format: CopyFormat, data: &[u8]) -> u64 {
    const TRAILER: &[u8] = &[0xff, 0xff];
    match format {
        CopyFormat::Text => 1,
        CopyFormat::Binary if data == TRAILER => 0,
        CopyFormat::Binary
            if data.len() == BINARY_HEADER.len() + TRAILER.len()
                && data.starts_with(BINARY_HEADER)
                && data.ends_with(TRAILER) =>
        {
            0
        }
        CopyFormat::Binary => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first: u64, end: Option<u64>) -> Chunk {
        Chunk {
            table: TableName::new("public", "T"),
            source: TableName::new("public", "T_p1"),
            first_page: first,
            end_page: end,
            index: 0,
            pages: 0,
        }
    }

    #[test]
    fn rows_are_counted_per_message_without_the_binary_header_and_trailer() {
        let mut first = BINARY_HEADER.to_vec();
        first.extend_from_slice(&[0, 1, 0, 0, 0, 1, b'x']);
        assert_eq!(rows_in_message(CopyFormat::Binary, &first), 1);
        assert_eq!(
            rows_in_message(CopyFormat::Binary, &[0, 1, 0, 0, 0, 1, b'y']),
            1
        );
        // A row of a table without columns is a field count of zero.
        assert_eq!(rows_in_message(CopyFormat::Binary, &[0, 0]), 1);
        assert_eq!(rows_in_message(CopyFormat::Binary, &[0xff, 0xff]), 0);
        let mut empty = BINARY_HEADER.to_vec();
        empty.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(rows_in_message(CopyFormat::Binary, &empty), 0);
        // A row whose last value ends in 0xffff is still a row.
        assert_eq!(
            rows_in_message(CopyFormat::Binary, &[0, 1, 0, 0, 0, 2, 0xff, 0xff]),
            1
        );
        assert_eq!(rows_in_message(CopyFormat::Text, b"1\tx\n"), 1);
    }

    #[test]
    fn toast_heavy_tables_get_more_chunks() {
        // Plain table: the step is the configured pages.
        assert_eq!(chunk_step(10_000, 10_000, 8192), 8192);
        // 700 heap pages carrying 27,000 pages of TOASTed data: about
        // 27,000 / 8192 = 4 chunks of 213 heap pages each.
        let step = chunk_step(700, 27_000, 8192);
        assert_eq!(step, 213);
        assert_eq!(700_u64.div_ceil(step), 4);
        // Never zero, whatever the ratio.
        assert_eq!(chunk_step(1, 1_000_000, 8), 1);
        assert_eq!(chunk_step(0, 5, 8192), 8192);
    }

    #[test]
    fn chunk_statements_quote_and_bound_by_ctid() {
        let cols = vec!["id".to_owned(), "Name".to_owned()];
        assert_eq!(
            source_sql(&chunk(0, None), &cols, CopyFormat::Binary),
            "COPY (SELECT \"id\", \"Name\" FROM ONLY \"public\".\"T_p1\") TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            source_sql(&chunk(10, Some(20)), &cols, CopyFormat::Text),
            "COPY (SELECT \"id\", \"Name\" FROM ONLY \"public\".\"T_p1\" WHERE ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid) TO STDOUT (FORMAT text)"
        );
        assert_eq!(
            target_sql(&chunk(0, None), &cols, CopyFormat::Text),
            "COPY \"public\".\"T\" (\"id\", \"Name\") FROM STDIN (FORMAT text)"
        );
    }

    #[test]
    fn binary_only_for_identical_built_in_types() {
        let cols = vec![("id".to_owned(), 23u32)];
        let same = vec!["integer".to_owned()];
        assert_eq!(CopyFormat::choose(&cols, &same, &same), CopyFormat::Binary);
        assert_eq!(
            CopyFormat::choose(&cols, &["bigint".to_owned()], &same),
            CopyFormat::Text
        );
        let enum_col = vec![("mood".to_owned(), 16500u32)];
        let mood = vec!["mood".to_owned()];
        assert_eq!(
            CopyFormat::choose(&enum_col, &mood, &mood),
            CopyFormat::Text
        );
    }
}
