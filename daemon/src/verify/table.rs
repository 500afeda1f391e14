//! One table compared: the same query on both servers, each in the
//! snapshot of the compared position, read as `COPY` text and merged row
//! by row ([`cutover_conflict::compare::Merge`]).
//!
//! Every column is read as `::text`, so that equal values read equal
//! whatever their type on each side (an `int` source column into a
//! `bigint` target column, `varchar(n)` into `text`), under the same
//! session settings on both servers (`client::text_value_settings`).
//! Rows come ordered by the key: integer keys by value, which the primary
//! key's index serves; any other key by its text `COLLATE "C"`, which no
//! server's own collation changes. A table without a key is ordered by
//! every column's text and compared as a multiset.

use bytes::{Buf, BytesMut};
use cutover_conflict::compare::{Difference, KeyKind, Layout, Merge, Side, Tally};
use cutover_conflict::fingerprint::Digest;
use cutover_conflict::repair::{Fix, fix};
use cutover_conflict::row::Row;
use cutover_replication::Lsn;
use cutover_replication::catalog::{self, Table};
use cutover_replication::client::describe;
use cutover_replication::sql::{quote_ident, quote_literal};
use futures_util::StreamExt;
use tokio_postgres::{Client, CopyOutStream};

use super::VerifyError;
use super::progress::{ProgressFile, TableProgress};
use super::report::{Sample, SampleKind, TableReport};

mod chunks;

use chunks::{MAX_LISTED_GROUPS, chunk_end, equal_chunk, plain_type, split_chunk};

/// The column types compared by value: the servers order them
/// numerically, and so does [`Layout`].
const INTEGER_TYPES: &[&str] = &["smallint", "integer", "bigint"];

/// How a table is read on both sides.
#[derive(Debug)]
pub(super) struct Plan {
    table: Table,
    /// `ONLY t`, or `t` when partitioned: the table's own rows.
    source_rows: String,
    target_rows: String,
    layout: Layout,
    /// Columns of the source that the target lacks: reported, not read.
    missing_columns: Vec<String>,
    /// The key columns' types on each side, for the chunks' bounds.
    source_key_types: Vec<String>,
    target_key_types: Vec<String>,
    /// Per column of `layout`: whether its text on both sides is never
    /// empty and never holds a comma (by its type, [`plain_type`]).
    plain: Vec<bool>,
}

impl Plan {
    /// The plan for `table` of the source, read from `target` on the
    /// other side.
    pub(super) fn new(table: Table, target: &Table) -> Plan {
        let on_target = |name: &str| target.columns.iter().any(|c| c.name == name);
        let missing_columns: Vec<String> = table
            .columns
            .iter()
            .filter(|c| !on_target(&c.name))
            .map(|c| c.name.clone())
            .collect();
        // A key the target lacks a column of is no key there: such a
        // table is compared as a multiset of the columns both sides have.
        let key: Vec<String> = table
            .primary_key
            .clone()
            .filter(|key| key.iter().all(|k| on_target(k)))
            .unwrap_or_default();
        let mut names = key.clone();
        names.extend(
            table
                .columns
                .iter()
                .filter(|c| on_target(&c.name) && !key.contains(&c.name))
                .map(|c| c.name.clone()),
        );
        let layout = if key.is_empty() {
            Layout::keyless(names)
        } else {
            let kinds = key
                .iter()
                .map(|k| {
                    // Ordered by value only when both sides order it so.
                    let integer = |t: &Table| {
                        t.columns
                            .iter()
                            .find(|c| &c.name == k)
                            .is_some_and(|c| INTEGER_TYPES.contains(&c.type_name.as_str()))
                    };
                    if integer(&table) && integer(target) {
                        KeyKind::Integer
                    } else {
                        KeyKind::Bytes
                    }
                })
                .collect();
            Layout::keyed(kinds, names)
        };
        let types = |t: &Table| -> Vec<String> {
            key.iter()
                .map(|k| {
                    t.columns
                        .iter()
                        .find(|c| &c.name == k)
                        .map(|c| c.type_name.clone())
                        .unwrap_or_default()
                })
                .collect()
        };
        let plain_in = |t: &Table, name: &str| {
            t.columns
                .iter()
                .find(|c| c.name == name)
                .is_some_and(|c| plain_type(c.type_oid))
        };
        let plain = layout
            .names
            .iter()
            .map(|n| plain_in(&table, n) && plain_in(target, n))
            .collect();
        Plan {
            plain,
            source_rows: catalog::own_rows(&table.name, table.partitioned),
            target_rows: catalog::own_rows(&target.name, target.partitioned),
            source_key_types: types(&table),
            target_key_types: types(target),
            table,
            layout,
            missing_columns,
        }
    }

    /// The table compared, as the source describes it.
    pub(super) fn table(&self) -> &Table {
        &self.table
    }

    /// How its rows are laid out and ordered.
    pub(super) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A row's key as `(col=value, ...)`; the whole row for a table
    /// without a key.
    pub(super) fn key_text(&self, row: &Row) -> String {
        let pairs: Vec<String> = (0..self.layout.key.len())
            .map(|i| {
                let value = row.value(i).unwrap_or_else(|| "NULL".to_owned());
                format!("{}={}", self.layout.names[i], shorten(&value))
            })
            .collect();
        format!("({})", pairs.join(", "))
    }

    /// Whether the table is read in chunks of keys: when its key is all
    /// integers, which its index reads in ranges. Other tables are read
    /// whole (a range of text keys `COLLATE "C"` would sort the table for
    /// every chunk).
    fn chunked(&self) -> bool {
        self.resumable() && self.layout.key.iter().all(|k| *k == KeyKind::Integer)
    }

    /// Whether an interrupted comparison can go on after the last key
    /// compared: when the table has a key (a table without one may hold
    /// more copies of the last row compared, which `> row` would skip).
    /// A table read whole records where it stands every [`CHECKPOINT_ROWS`]
    /// rows or so, at a row both sides hold.
    fn resumable(&self) -> bool {
        !self.layout.is_keyless()
    }

    /// The `COPY` of the rows of `from` (whose key columns have `types`),
    /// key first, in key order: those after `after` and up to `upto` (key
    /// values as text), and with `groups`, only those of the groups
    /// listed ([`Plan::group_of`] of that width).
    fn copy_sql(
        &self,
        from: &str,
        types: &[String],
        after: Option<&[String]>,
        upto: Option<&[String]>,
        groups: Option<&(i64, Vec<i64>)>,
    ) -> String {
        let mut filter = self.range(types, after, upto);
        if let Some((width, groups)) = groups {
            let listed: Vec<String> = groups.iter().map(i64::to_string).collect();
            filter.push_str(if filter.is_empty() {
                " WHERE "
            } else {
                " AND "
            });
            filter.push_str(&format!(
                "{} IN ({})",
                self.group_of(*width),
                listed.join(", ")
            ));
        }
        self.copy_where(from, &filter)
    }

    /// ` WHERE` the key is after `after` and up to `upto`, or nothing.
    fn range(&self, types: &[String], after: Option<&[String]>, upto: Option<&[String]>) -> String {
        // Bounds are the key's own values, compared as the key is
        // ordered: an integer as its type, so that the index serves it
        // (`(k1, k2) > ('1'::bigint, ...)`), any other key as its text
        // `COLLATE "C"`, which the ordered expression carries.
        let bound = |values: &[String]| -> String {
            let literals: Vec<String> = values
                .iter()
                .zip(types)
                .zip(&self.layout.key)
                .map(|((v, t), kind)| match kind {
                    KeyKind::Integer => format!("{}::{t}", quote_literal(v)),
                    KeyKind::Bytes => quote_literal(v),
                })
                .collect();
            format!("({})", literals.join(", "))
        };
        let key = format!("({})", self.order().join(", "));
        let mut conditions = Vec::new();
        if let Some(after) = after {
            conditions.push(format!("{key} > {}", bound(after)));
        }
        if let Some(upto) = upto {
            conditions.push(format!("{key} <= {}", bound(upto)));
        }
        if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        }
    }

    /// The key's expressions, as rows are ordered. Qualified: a bare name
    /// in ORDER BY would be the output column of that name, which is the
    /// `::text` of the key, in text order.
    fn order(&self) -> Vec<String> {
        self.layout
            .key
            .iter()
            .zip(&self.layout.names)
            .map(|(kind, name)| match kind {
                KeyKind::Integer => format!("r.{}", quote_ident(name)),
                KeyKind::Bytes => format!("r.{}::text COLLATE \"C\"", quote_ident(name)),
            })
            .collect()
    }

    /// The `COPY` of the rows of `from` that `filter` keeps, every field as
    /// text, key first, in key order.
    fn copy_where(&self, from: &str, filter: &str) -> String {
        format!(
            "COPY (SELECT {} FROM {from} AS r{filter} ORDER BY {}) TO STDOUT",
            self.text_fields().join(", "),
            self.order().join(", ")
        )
    }

    /// Every field read, as text.
    fn text_fields(&self) -> Vec<String> {
        self.layout
            .names
            .iter()
            .map(|n| format!("r.{}::text", quote_ident(n)))
            .collect()
    }

    /// The `COPY` of the rows of `from` (whose key columns have `types`)
    /// that hold the key of one of `rows`, or for a table without a key,
    /// the whole value of one.
    fn copy_of(&self, from: &str, types: &[String], rows: &[&Row]) -> String {
        let literal =
            |value: Option<String>| value.map_or_else(|| "NULL".to_owned(), |v| quote_literal(&v));
        let filter = if self.layout.is_keyless() {
            // Every field as text, NULL matching NULL.
            let fields = format!("ROW({})", self.text_fields().join(", "));
            let alternatives: Vec<String> = rows
                .iter()
                .map(|row| {
                    let values: Vec<String> = (0..self.layout.names.len())
                        .map(|i| literal(row.value(i)))
                        .collect();
                    format!("{fields} IS NOT DISTINCT FROM ROW({})", values.join(", "))
                })
                .collect();
            alternatives.join(" OR ")
        } else {
            // The key's own values as the key's type, which its index
            // serves.
            let key: Vec<String> = self.layout.names[..self.layout.key.len()]
                .iter()
                .map(|n| format!("r.{}", quote_ident(n)))
                .collect();
            let tuples: Vec<String> = rows
                .iter()
                .map(|row| {
                    let values: Vec<String> = types
                        .iter()
                        .enumerate()
                        .map(|(i, t)| format!("{}::{t}", literal(row.value(i))))
                        .collect();
                    format!("ROW({})", values.join(", "))
                })
                .collect();
            format!("ROW({}) IN ({})", key.join(", "), tuples.join(", "))
        };
        self.copy_where(from, &format!(" WHERE {filter}"))
    }

    /// A query of the source's rows under the keys of `rows` (a keyed
    /// table): each found row's position in `rows` (from 1), then when it
    /// was last committed, in microseconds since 2000-01-01 (`NULL` when
    /// the server does not know). Rows are matched by the key's own type
    /// (its text may differ: `char(n)`, `citext`).
    pub(super) fn commit_times_sql(&self, rows: &[&Row]) -> String {
        let literal =
            |value: Option<String>| value.map_or_else(|| "NULL".to_owned(), |v| quote_literal(&v));
        let names: Vec<String> = self.layout.names[..self.layout.key.len()]
            .iter()
            .map(|n| quote_ident(n))
            .collect();
        let values: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(ord, row)| {
                let key: Vec<String> = self
                    .source_key_types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("{}::{t}", literal(row.value(i))))
                    .collect();
                format!("({}, {})", ord + 1, key.join(", "))
            })
            .collect();
        let joins: Vec<String> = names.iter().map(|n| format!("r.{n} = u.{n}")).collect();
        format!(
            "SELECT u.ord::int8, (extract(epoch FROM pg_xact_commit_timestamp(r.xmin)) * 1000000)::bigint - 946684800000000 \
               FROM (VALUES {}) AS u(ord, {}) JOIN {} AS r ON {}",
            values.join(", "),
            names.join(", "),
            self.source_rows,
            joins.join(" AND ")
        )
    }

    /// The key of a row read by [`Plan::copy_sql`], as text.
    fn key_of(&self, row: &Row) -> Vec<String> {
        (0..self.layout.key.len())
            .map(|i| row.value(i).unwrap_or_default())
            .collect()
    }
}

/// Lines of a `COPY ... TO STDOUT` in text format, one row at a time.
struct Lines {
    stream: std::pin::Pin<Box<CopyOutStream>>,
    buffer: BytesMut,
    /// Bytes at the start of `buffer` known to hold no line end.
    scanned: usize,
    done: bool,
}

impl Lines {
    async fn open(client: &Client, sql: &str) -> Result<Lines, tokio_postgres::Error> {
        Ok(Lines {
            stream: Box::pin(client.copy_out(sql).await?),
            buffer: BytesMut::new(),
            scanned: 0,
            done: false,
        })
    }

    /// The next row, or `None` at the end.
    async fn next(&mut self) -> Result<Option<Row>, tokio_postgres::Error> {
        loop {
            // Only the bytes that arrived since the last look are searched:
            // a value of many megabytes arrives in many pieces.
            if let Some(at) = self.buffer[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + at;
                let row = Row::parse(&self.buffer[..end]);
                self.buffer.advance(end + 1);
                self.scanned = 0;
                return Ok(Some(row));
            }
            self.scanned = self.buffer.len();
            if self.done {
                return Ok(None);
            }
            match self.stream.next().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    // PostgreSQL sends each row in a message of its own:
                    // such a message is parsed where it is, not copied
                    // into the buffer first.
                    if self.buffer.is_empty()
                        && let Some((b'\n', line)) = chunk.split_last()
                        && !line.contains(&b'\n')
                    {
                        return Ok(Some(Row::parse(line)));
                    }
                    self.buffer.extend_from_slice(&chunk);
                }
                None => self.done = true,
            }
        }
    }
}

/// A limit on source rows read per second, shared by every worker of a
/// verify, so that a verify in business hours does not load the source.
#[derive(Debug)]
pub(super) struct Pacer {
    rate: Option<u64>,
    started: std::time::Instant,
    rows: std::sync::atomic::AtomicU64,
}

impl Pacer {
    /// At most `rate` rows per second (`None`: no limit).
    pub(super) fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate,
            started: std::time::Instant::now(),
            rows: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `rows` more were read: waits as long as the rate asks.
    async fn read(&self, rows: u64) {
        let Some(rate) = self.rate else {
            return;
        };
        let total = self
            .rows
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed)
            + rows;
        let due = std::time::Duration::from_secs_f64(total as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Source rows between two looks at the rate.
const PACE_EVERY: u64 = 500;

/// How the tables of one verify are compared.
#[derive(Debug)]
pub(super) struct Reading<'a> {
    /// Differing rows kept per table and kind.
    pub(super) samples: usize,
    /// Keep the fix of every difference.
    pub(super) repair: bool,
    /// The source position of the snapshots read.
    pub(super) at: Lsn,
    /// Where an interrupted verify resumes, if it may.
    pub(super) progress: Option<&'a ProgressFile>,
    /// The rate limit.
    pub(super) pacer: &'a Pacer,
}

/// Source rows between two records of where a table read whole stands.
const CHECKPOINT_ROWS: u64 = 5_000;

/// Compares one table on `source` and `target` (each inside the snapshot
/// of the position `at`), keeping up to `samples` differences of each
/// kind, and with `repair` the fix of every difference. Resumes after what
/// `progress` says an earlier run compared, and records each chunk there.
pub(super) async fn compare(
    plan: &Plan,
    source: &Client,
    target: &Client,
    reading: &Reading<'_>,
) -> Result<(TableReport, Vec<Fix>), VerifyError> {
    let name = plan.table.name.to_string();
    let Reading {
        samples,
        repair,
        at,
        progress,
        pacer,
    } = *reading;
    let prior = progress.and_then(|p| p.table(&name));
    if let Some(prior) = &prior
        && prior.done
    {
        return Ok((prior.report.clone(), Vec::new()));
    }
    let read_error = |role: &'static str| {
        let name = name.clone();
        move |err: tokio_postgres::Error| VerifyError::Query {
            role,
            what: format!("reading {name}"),
            detail: describe(&err),
        }
    };
    let (mut report, mut after, mut source_digest, mut target_digest) = match prior {
        Some(prior) if plan.resumable() => (
            prior.report,
            prior.after,
            Digest::from_hex(&prior.source_digest).unwrap_or_default(),
            Digest::from_hex(&prior.target_digest).unwrap_or_default(),
        ),
        _ => (
            TableReport::new(name.clone(), plan.missing_columns.clone()),
            None,
            Digest::default(),
            Digest::default(),
        ),
    };
    report.compared_at.push(at);
    let mut fixes = Vec::new();
    // Chunks of an integer key are compared by the servers' checksums
    // first, the chunk whole. A chunk that differs is checksummed again in
    // groups of about GROUP_ROWS keys, and only the groups that differ are
    // read row by row; after a chunk that differed, the next is checksummed
    // in groups at once. So a table that differs here and there costs
    // little more than its checksums, and most rows of a table that
    // differs everywhere are still never sent.
    let mut split_next = false;
    let mut width = None;
    loop {
        // The chunk's last key on the source (its index finds it), or the
        // table's end: the whole table when it is not read in chunks.
        let upto = if plan.chunked() {
            chunk_end(plan, source, after.as_deref()).await?
        } else {
            None
        };
        let mut only_groups = None;
        let mut read_whole = false;
        if plan.chunked() {
            let whole = if split_next {
                None
            } else {
                equal_chunk(plan, source, target, after.as_deref(), upto.as_deref()).await?
            };
            let equal = match whole {
                Some(chunk) => vec![chunk],
                None => {
                    let w = plan.group_width(after.as_deref(), upto.as_deref(), width);
                    width = Some(w);
                    let (mut equal, differing) =
                        split_chunk(plan, source, target, after.as_deref(), upto.as_deref(), w)
                            .await?;
                    split_next = !differing.is_empty();
                    if differing.len() > MAX_LISTED_GROUPS {
                        // Too many to list (keys far apart): the chunk is
                        // read whole, its equal groups with it.
                        equal.clear();
                        read_whole = true;
                    } else if split_next {
                        only_groups = Some((w, differing));
                    }
                    equal
                }
            };
            let rows = equal.iter().map(|(rows, _)| rows).sum();
            pacer.read(rows).await;
            report.add_tally(Tally {
                source_rows: rows,
                target_rows: rows,
                equal: rows,
                ..Tally::default()
            });
            for (rows, chunk) in &equal {
                source_digest.add_chunk(chunk, *rows);
                target_digest.add_chunk(chunk, *rows);
            }
            if only_groups.is_none() && !read_whole {
                let digests = [&source_digest, &target_digest];
                if chunk_done(progress, &name, &mut report, &mut after, upto, digests)? {
                    return Ok((report, fixes));
                }
                continue;
            }
        }
        // Both sides' rows of the chunk, read at the same time.
        let (mut source_rows, mut target_rows) = tokio::try_join!(
            async {
                Lines::open(
                    source,
                    &plan.copy_sql(
                        &plan.source_rows,
                        &plan.source_key_types,
                        after.as_deref(),
                        upto.as_deref(),
                        only_groups.as_ref(),
                    ),
                )
                .await
                .map_err(read_error("source"))
            },
            async {
                Lines::open(
                    target,
                    &plan.copy_sql(
                        &plan.target_rows,
                        &plan.target_key_types,
                        after.as_deref(),
                        upto.as_deref(),
                        only_groups.as_ref(),
                    ),
                )
                .await
                .map_err(read_error("target"))
            },
        )?;
        let mut merge = Merge::new(plan.layout.clone());
        // A table read whole records where it stands now and then: the key
        // of the source row pushed once a checkpoint is due, kept until the
        // merge is idle there.
        let mut checkpoint_due = CHECKPOINT_ROWS;
        let mut pushed_key: Option<Vec<String>> = None;
        while let Some(side) = merge.wants() {
            let row = match side {
                Side::Source => {
                    let row = source_rows.next().await.map_err(read_error("source"))?;
                    if merge.tally().source_rows % PACE_EVERY == PACE_EVERY - 1 {
                        pacer.read(PACE_EVERY).await;
                    }
                    row
                }
                Side::Target => target_rows.next().await.map_err(read_error("target"))?,
            };
            match row {
                Some(row) => {
                    let digest = match side {
                        Side::Source => &mut source_digest,
                        Side::Target => &mut target_digest,
                    };
                    digest.add(&row.fingerprint());
                    if !plan.chunked() && side == Side::Source {
                        pushed_key = (merge.tally().source_rows >= checkpoint_due)
                            .then(|| plan.key_of(&row));
                    }
                    merge.push(side, row);
                }
                None => merge.finish(side),
            }
            for difference in merge.take() {
                report.add_sample(sample(plan, &difference), samples);
                if repair {
                    if fixes.len() >= MAX_FIXES {
                        return Err(VerifyError::TooManyToRepair {
                            table: name.clone(),
                            limit: MAX_FIXES,
                        });
                    }
                    fixes.push(fix(difference));
                }
            }
            if let Some(progress) = progress
                && plan.resumable()
                && merge.is_idle()
                && let Some(key) = pushed_key.take()
            {
                checkpoint_due = merge.tally().source_rows + CHECKPOINT_ROWS;
                let mut so_far = report.clone();
                so_far.add_tally(merge.tally());
                so_far.set_checksums(source_digest.hex(), target_digest.hex());
                let digests = [&source_digest, &target_digest];
                record(Some(progress), &name, false, &Some(key), &so_far, digests)?;
            }
        }
        report.add_tally(merge.tally());
        let digests = [&source_digest, &target_digest];
        if chunk_done(progress, &name, &mut report, &mut after, upto, digests)? {
            return Ok((report, fixes));
        }
    }
}

/// A chunk compared up to `upto` (`None`: the table's end): the report
/// takes both sides' digests, `after` moves on, and where the table
/// stands is recorded. Whether it was the table's last chunk.
fn chunk_done(
    progress: Option<&ProgressFile>,
    name: &str,
    report: &mut TableReport,
    after: &mut Option<Vec<String>>,
    upto: Option<Vec<String>>,
    [source, target]: [&Digest; 2],
) -> Result<bool, VerifyError> {
    report.set_checksums(source.hex(), target.hex());
    let done = upto.is_none();
    *after = upto;
    record(progress, name, done, after, report, [source, target])?;
    Ok(done)
}

/// Records where the table stands (compared up to `after`, or `done`), for
/// an interrupted verify to go on from.
fn record(
    progress: Option<&ProgressFile>,
    name: &str,
    done: bool,
    after: &Option<Vec<String>>,
    report: &TableReport,
    [source, target]: [&Digest; 2],
) -> Result<(), VerifyError> {
    if let Some(progress) = progress {
        progress.save(
            name,
            TableProgress {
                done,
                after: after.clone(),
                report: report.clone(),
                source_digest: source.hex(),
                target_digest: target.hex(),
            },
        )?;
    }
    Ok(())
}

/// Rows looked up per query by [`recheck`].
const RECHECK_ROWS: usize = 500;

/// Reads again on `source` and `target` the rows that `fixes` (found at an
/// earlier position) would write, by key (by whole value for a table
/// without a key), and returns the fixes of those that differ now: a row
/// the stream made equal since is left alone.
pub(super) async fn recheck(
    plan: &Plan,
    source: &Client,
    target: &Client,
    fixes: &[Fix],
) -> Result<Vec<Fix>, VerifyError> {
    let name = plan.table.name.to_string();
    let read_error = |role: &'static str| {
        let name = name.clone();
        move |err: tokio_postgres::Error| VerifyError::Query {
            role,
            what: format!("reading again the differing rows of {name}"),
            detail: describe(&err),
        }
    };
    // Each key (or value) once: all the copies of a value come back from
    // the one query that names it.
    let mut seen = std::collections::HashSet::new();
    let rows: Vec<&Row> = fixes
        .iter()
        .map(Fix::row)
        .filter(|row| {
            let key: Vec<Option<String>> =
                (0..plan.layout.key.len()).map(|i| row.value(i)).collect();
            seen.insert(key)
        })
        .collect();
    let mut fresh = Vec::new();
    for batch in rows.chunks(RECHECK_ROWS) {
        let mut source_rows = Lines::open(
            source,
            &plan.copy_of(&plan.source_rows, &plan.source_key_types, batch),
        )
        .await
        .map_err(read_error("source"))?;
        let mut target_rows = Lines::open(
            target,
            &plan.copy_of(&plan.target_rows, &plan.target_key_types, batch),
        )
        .await
        .map_err(read_error("target"))?;
        let mut merge = Merge::new(plan.layout.clone());
        while let Some(side) = merge.wants() {
            let row = match side {
                Side::Source => source_rows.next().await.map_err(read_error("source"))?,
                Side::Target => target_rows.next().await.map_err(read_error("target"))?,
            };
            match row {
                Some(row) => merge.push(side, row),
                None => merge.finish(side),
            }
            fresh.extend(merge.take().into_iter().map(fix));
        }
    }
    Ok(fresh)
}

/// The most differing rows one table's repair holds in memory. A table
/// that far apart is better copied again.
const MAX_FIXES: usize = 1_000_000;

/// A difference as a report shows it: its key (or whole row, for a table
/// without a key) and the columns that differ.
fn sample(plan: &Plan, difference: &Difference) -> Sample {
    match difference {
        Difference::Missing { source } => Sample {
            kind: SampleKind::MissingOnTarget,
            key: plan.key_text(source),
            columns: Vec::new(),
        },
        Difference::Extra { target } => Sample {
            kind: SampleKind::ExtraOnTarget,
            key: plan.key_text(target),
            columns: Vec::new(),
        },
        Difference::Changed { source, fields, .. } => Sample {
            kind: SampleKind::Changed,
            key: plan.key_text(source),
            columns: fields
                .iter()
                .filter_map(|i| plan.layout.names.get(*i).cloned())
                .collect(),
        },
    }
}

/// A value cut to a readable length.
fn shorten(value: &str) -> String {
    const MAX: usize = 64;
    if value.len() > MAX {
        format!("{}...", &value[..value.floor_char_boundary(MAX)])
    } else {
        value.to_owned()
    }
}
