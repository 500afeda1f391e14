//! What a mapping reads from and makes on the servers: `cutover.rejected`,
//! the rows rejected so far, and the resolution of every `[[map]]` against
//! both catalogs with a probe of its expressions on the server written to.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{MapSpec, Mapping, MappingError, REJECTED, problem, resolve};
use crate::catalog::{Table, TableName};

/// Creates `cutover.rejected` on the server written to, if missing.
pub async fn ensure_rejected(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(REJECTED_DDL).await
}

const REJECTED_DDL: &str = "CREATE SCHEMA IF NOT EXISTS cutover;
     CREATE TABLE IF NOT EXISTS \"cutover\".\"rejected\" (
         map text NOT NULL,
         key text[] NOT NULL,
         reason text NOT NULL,
         at timestamptz NOT NULL DEFAULT now(),
         PRIMARY KEY (map, key));";

/// Rejected rows of a mapping on the server written to: how many by
/// reason, and up to `samples` of their keys (oldest first).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    /// reason → rows.
    pub by_reason: Vec<(String, i64)>,
    /// (key, reason), the key as `(a, b)`.
    pub samples: Vec<(String, String)>,
}

impl Rejected {
    /// Rows rejected in all.
    pub fn total(&self) -> i64 {
        self.by_reason.iter().map(|(_, n)| n).sum()
    }
}

/// Reads what `mapping` rejected so far from `client` (the server written
/// to), as its current transaction sees it.
pub async fn rejected(
    client: &Client,
    mapping: &Mapping,
    samples: i64,
) -> Result<Rejected, tokio_postgres::Error> {
    if mapping.rejects.is_empty() {
        return Ok(Rejected::default());
    }
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&REJECTED])
        .await?
        .get(0);
    if !exists {
        return Ok(Rejected::default());
    }
    let map = mapping.map_name();
    let by_reason = client
        .query(
            &format!(
                "SELECT reason, count(*) FROM {REJECTED} WHERE map = $1 GROUP BY reason ORDER BY reason"
            ),
            &[&map],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let samples = client
        .query(
            &format!(
                "SELECT '(' || array_to_string(key, ', ', 'NULL') || ')', reason FROM {REJECTED}
                  WHERE map = $1 ORDER BY at, key LIMIT $2"
            ),
            &[&map, &samples],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Rejected { by_reason, samples })
}

/// Resolves every spec against the two servers (`source` read, `target`
/// written): the catalogs, which source types the target has, and a
/// probe of every expression on the target.
pub async fn resolve_all(
    specs: &[MapSpec],
    source: &Client,
    target: &Client,
) -> Result<Result<Vec<Mapping>, MappingError>, tokio_postgres::Error> {
    if specs.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let sources: HashMap<TableName, Table> = crate::catalog::tables(source)
        .await?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let targets: HashMap<TableName, Table> = crate::catalog::tables(target)
        .await?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut type_names: Vec<String> = specs
        .iter()
        .filter_map(|s| sources.get(&s.source))
        .flat_map(|t| t.columns.iter().map(|c| c.type_name.clone()))
        .collect();
    type_names.sort();
    type_names.dedup();
    let known: Vec<String> = target
        .query(
            "SELECT n FROM unnest($1::text[]) AS n WHERE to_regtype(n) IS NOT NULL",
            &[&type_names],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let has_type = |name: &str| known.iter().any(|k| k == name);
    let mut mappings = Vec::new();
    for spec in specs {
        let mapping = match resolve(
            spec,
            sources.get(&spec.source),
            targets.get(&spec.target),
            &has_type,
        ) {
            Ok(m) => m,
            Err(err) => return Ok(Err(err)),
        };
        if let Err(err) = probe(target, &mapping).await? {
            return Ok(Err(err));
        }
        mappings.push(mapping);
    }
    Ok(Ok(mappings))
}

/// Has the target parse and plan every statement of `mapping` over a
/// typed, empty row set (its expressions, conditions, key comparisons and
/// the conversions to the target's column types), in a transaction rolled
/// back: `cutover.rejected` made there for it leaves nothing behind.
async fn probe(
    target: &Client,
    mapping: &Mapping,
) -> Result<Result<(), MappingError>, tokio_postgres::Error> {
    const STAGE: &str = "cutover_probe";
    target.batch_execute("BEGIN").await?;
    let result = async {
        target.batch_execute(&mapping.stage_sql(STAGE)).await?;
        if !mapping.rejects.is_empty() {
            target.batch_execute(REJECTED_DDL).await?;
        }
        for sql in mapping.probe_sql(STAGE) {
            target.prepare(&sql).await?;
        }
        Ok::<(), tokio_postgres::Error>(())
    }
    .await;
    target.batch_execute("ROLLBACK").await?;
    match result {
        Ok(()) => Ok(Ok(())),
        Err(err) => match err.as_db_error() {
            Some(db) => Ok(Err(problem(
                format!("map[{}]", mapping.index),
                format!(
                    "the server written to refuses its expressions ({} -> {}): {}{}",
                    mapping.source,
                    mapping.target,
                    db.message(),
                    db.hint().map(|h| format!(" ({h})")).unwrap_or_default()
                ),
            ))),
            None => Err(err),
        },
    }
}
