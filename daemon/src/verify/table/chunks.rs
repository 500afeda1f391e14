//! Chunks of a table with an integer key, compared by the servers: the
//! chunk's bound, the checksums of a chunk whole and in groups, and the
//! canonical text of a row the servers hash.

use cutover_conflict::fingerprint::{Fingerprint, fingerprint};
use cutover_replication::client::describe;
use cutover_replication::sql::quote_ident;
use tokio_postgres::Client;

use super::Plan;
use crate::verify::VerifyError;

/// Rows of the source per chunk of a table read in chunks.
const CHUNK_ROWS: usize = 20_000;

/// Rows per group, where keys are dense, when a chunk that differs is
/// checksummed again in groups: with one row in a thousand differing,
/// about one group in twenty is read.
const GROUP_ROWS: i64 = 50;

/// The most groups of a chunk read by listing them; a chunk with more
/// groups that differ is read whole.
pub(super) const MAX_LISTED_GROUPS: usize = 1_000;

/// Types whose text is never empty and never holds a comma, under the
/// settings a verify reads with, by their built-in OIDs (a name could be
/// a user's domain that a `search_path` puts first): `int2`, `int4`,
/// `int8`, `numeric`, `float4`, `float8`, `bool`, `date`, `time`,
/// `timetz`, `timestamp`, `timestamptz`, `interval`, `uuid`, `oid`,
/// `bytea`, `inet`, `cidr`, `macaddr`. (Not `money`, whose text groups
/// digits with commas, nor any array, composite or domain.)
const PLAIN_TYPES: &[u32] = &[
    21, 23, 20, 1700, 700, 701, 16, 1082, 1083, 1266, 1114, 1184, 1186, 2950, 26, 17, 869, 650, 829,
];

/// Whether a column of the type `type_oid` is one of [`PLAIN_TYPES`]
/// (a type modifier such as `numeric(12,2)` does not change the OID).
pub(super) fn plain_type(type_oid: u32) -> bool {
    PLAIN_TYPES.contains(&type_oid)
}

impl Plan {
    /// A row's group when a chunk is checksummed in groups: its first key
    /// column divided by `width`.
    pub(super) fn group_of(&self, width: i64) -> String {
        format!(
            "(r.{}::bigint / {width})",
            quote_ident(&self.layout.names[0])
        )
    }

    /// The group width for the chunk after `after` and up to `upto` that
    /// makes groups of about [`GROUP_ROWS`] rows where its keys are dense:
    /// from the span of its first key column, or when the chunk is the
    /// table's first or last, the width of the chunk before (`previous`).
    pub(super) fn group_width(
        &self,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        previous: Option<i64>,
    ) -> i64 {
        let first = |key: Option<&[String]>| {
            key.and_then(|k| k.first())
                .and_then(|v| v.parse::<i128>().ok())
        };
        match (first(after), first(upto)) {
            (Some(low), Some(high)) => ((high - low) * i128::from(GROUP_ROWS) / CHUNK_ROWS as i128)
                .clamp(1, i128::from(i64::MAX)) as i64,
            _ => previous.unwrap_or(GROUP_ROWS),
        }
    }

    /// The rows of the chunk of `from` after `after` and up to `upto`
    /// counted and hashed by the server in groups ([`Plan::group_of`]):
    /// one row per group that has rows, `(group, count, sum)`.
    pub(super) fn groups_sql(
        &self,
        from: &str,
        types: &[String],
        after: Option<&[String]>,
        upto: Option<&[String]>,
        width: i64,
    ) -> String {
        format!(
            "SELECT {}, count(*), sum(hashtextextended({}, 0))::text FROM {from} AS r{} GROUP BY 1",
            self.group_of(width),
            self.canonical_text(),
            self.range(types, after, upto)
        )
    }

    /// The key of the last row of the chunk after `after` on the source
    /// (the chunk's upper bound), found through the key's index.
    pub(super) fn bound_sql(&self, after: Option<&[String]>) -> String {
        let key: Vec<String> = self.layout.names[..self.layout.key.len()]
            .iter()
            .map(|n| format!("r.{}::text", quote_ident(n)))
            .collect();
        format!(
            "SELECT {} FROM {} AS r{} ORDER BY {} OFFSET {} LIMIT 1",
            key.join(", "),
            self.source_rows,
            self.range(&self.source_key_types, after, None),
            self.order().join(", "),
            CHUNK_ROWS - 1
        )
    }

    /// The rows of a chunk of `from` counted and hashed by the server,
    /// over the same text of each row as the rows read ([`Plan::copy_sql`]).
    pub(super) fn checksum_sql(
        &self,
        from: &str,
        types: &[String],
        after: Option<&[String]>,
        upto: Option<&[String]>,
    ) -> String {
        format!(
            "SELECT count(*), sum(hashtextextended({}, 0))::text FROM {from} AS r{}",
            self.canonical_text(),
            self.range(types, after, upto)
        )
    }

    /// One text of a row that tells any two different rows apart, cheap
    /// for the server to build: the byte length of every field (`-1` for
    /// NULL), then every field, comma-separated. The lengths make it
    /// unambiguous whatever the fields hold. (`ROW(...)::text` would be
    /// too, but quoting it costs the server about four times as much on
    /// long values.) The text is hashed `COLLATE "C"`, by its bytes: under
    /// a column's case-insensitive collation `hashtextextended` would hash
    /// `Bob` and `bob` alike, and two columns of different collations
    /// would leave it none to hash with. `concat_ws` takes at most 100
    /// arguments, so wider
    /// rows are joined in groups, which the lengths still make
    /// unambiguous.
    pub(super) fn canonical_text(&self) -> String {
        let fields = self.text_fields();
        let mut parts: Vec<String> = fields
            .iter()
            .zip(&self.plain)
            .filter(|(_, plain)| !**plain)
            .map(|(f, _)| format!("coalesce(octet_length({f}), -1)"))
            .collect();
        parts.extend(fields.iter().zip(&self.plain).map(|(f, plain)| {
            if *plain {
                format!("coalesce({f}, '')")
            } else {
                f.clone()
            }
        }));
        format!("{} COLLATE \"C\"", concat_ws(parts))
    }
}

/// `concat_ws(',', parts...)`, nested so that no call takes more than
/// the server's 100 arguments.
fn concat_ws(mut parts: Vec<String>) -> String {
    const MAX_ARGS: usize = 90;
    while parts.len() > MAX_ARGS {
        parts = parts
            .chunks(MAX_ARGS)
            .map(|group| format!("concat_ws(',', {})", group.join(", ")))
            .collect();
    }
    format!("concat_ws(',', {})", parts.join(", "))
}

/// The key of the last row of the chunk after `after` on the source,
/// `None` when the table ends within the chunk.
pub(super) async fn chunk_end(
    plan: &Plan,
    source: &Client,
    after: Option<&[String]>,
) -> Result<Option<Vec<String>>, VerifyError> {
    Ok(source
        .query_opt(&plan.bound_sql(after), &[])
        .await
        .map_err(|err| VerifyError::Query {
            role: "source",
            what: format!("finding the next chunk of {}", plan.table.name),
            detail: describe(&err),
        })?
        .map(|row| (0..plan.layout.key.len()).map(|i| row.get(i)).collect()))
}

/// The chunk after `after` and up to `upto` (`None`: the table's end)
/// compared by the servers: its rows and the fingerprint of its checksum
/// when both sides hold the same rows, `None` when they differ. Both
/// sides hash the same canonical text of each row
/// ([`Plan::canonical_text`]) within their snapshots.
pub(super) async fn equal_chunk(
    plan: &Plan,
    source: &Client,
    target: &Client,
    after: Option<&[String]>,
    upto: Option<&[String]>,
) -> Result<Option<(u64, Fingerprint)>, VerifyError> {
    let (on_source, on_target) = checksums(
        plan,
        source,
        target,
        &plan.checksum_sql(&plan.source_rows, &plan.source_key_types, after, upto),
        &plan.checksum_sql(&plan.target_rows, &plan.target_key_types, after, upto),
    )
    .await?;
    let sum = |rows: &[tokio_postgres::Row]| {
        rows.first()
            .map(|row| (row.get::<_, i64>(0), row.get::<_, Option<String>>(1)))
    };
    match (sum(&on_source), sum(&on_target)) {
        (Some(source), Some(target)) if source == target => {
            let (count, hash) = source;
            Ok(Some((count as u64, chunk_fingerprint(hash.as_deref()))))
        }
        _ => Ok(None),
    }
}

/// A chunk checksummed again by both servers in groups of `width`
/// ([`Plan::group_of`]): the rows and fingerprint of each group both
/// sides hold equal, and the groups that differ, in order.
pub(super) async fn split_chunk(
    plan: &Plan,
    source: &Client,
    target: &Client,
    after: Option<&[String]>,
    upto: Option<&[String]>,
    width: i64,
) -> Result<(Vec<(u64, Fingerprint)>, Vec<i64>), VerifyError> {
    let (on_source, on_target) = checksums(
        plan,
        source,
        target,
        &plan.groups_sql(
            &plan.source_rows,
            &plan.source_key_types,
            after,
            upto,
            width,
        ),
        &plan.groups_sql(
            &plan.target_rows,
            &plan.target_key_types,
            after,
            upto,
            width,
        ),
    )
    .await?;
    type Sums = std::collections::BTreeMap<i64, (i64, Option<String>)>;
    let groups = |rows: Vec<tokio_postgres::Row>| -> Sums {
        rows.into_iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect()
    };
    let (mut on_source, mut on_target) = (groups(on_source), groups(on_target));
    let mut keys: Vec<i64> = on_source.keys().chain(on_target.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let (mut equal, mut differing) = (Vec::new(), Vec::new());
    for group in keys {
        match (on_source.remove(&group), on_target.remove(&group)) {
            (Some(source), Some(target)) if source == target => {
                let (count, hash) = source;
                equal.push((count as u64, chunk_fingerprint(hash.as_deref())));
            }
            _ => differing.push(group),
        }
    }
    Ok((equal, differing))
}

/// The fingerprint of a chunk (or group) both servers checksummed equal.
fn chunk_fingerprint(hash: Option<&str>) -> Fingerprint {
    fingerprint([hash.map(str::as_bytes)])
}

/// Runs a checksum query on each side at the same time.
async fn checksums(
    plan: &Plan,
    source: &Client,
    target: &Client,
    source_sql: &str,
    target_sql: &str,
) -> Result<(Vec<tokio_postgres::Row>, Vec<tokio_postgres::Row>), VerifyError> {
    let failed = |role: &'static str| {
        move |err: tokio_postgres::Error| VerifyError::Query {
            role,
            what: format!("checksumming {}", plan.table.name),
            detail: describe(&err),
        }
    };
    tokio::try_join!(
        async {
            source
                .query(source_sql, &[])
                .await
                .map_err(failed("source"))
        },
        async {
            target
                .query(target_sql, &[])
                .await
                .map_err(failed("target"))
        },
    )
}
