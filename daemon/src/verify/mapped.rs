//! A mapped table (`[[map]]`) compared through its mapping: the source's
//! rows, read in the verify's source snapshot, are loaded into a temporary
//! table on a target connection that holds the verify's target snapshot;
//! the target then computes each row's target form (its expressions and
//! lookups as of that snapshot) and compares it with the target table,
//! row by row on the target's key. The same connection counts the
//! rejected rows by reason and checks them against the records in
//! `cutover.rejected`: the reconciliation a migration team signs.

use cutover_replication::catalog::{Table, TableName};
use cutover_replication::mapping::Mapping;
use cutover_replication::snapshot::{self, Chunk, CopyFormat};
use cutover_replication::sql::{idents, quote_ident, quote_literal};
use cutover_replication::{Lsn, client};
use tokio_postgres::Client;

use super::report::{Reconciliation, Sample, SampleKind, TableReport};
use super::{VerifyError, query};
use crate::config::Config;

const STAGE: &str = "cutover_verify_stage";
const REASONS: &str = "cutover_verify_rows";
const DIFF: &str = "cutover_verify_diff";
const EXPECTED: &str = "cutover_verify_expected";

/// Compares `table` (mapped by `mapping`) as of `at`: `source` holds the
/// source snapshot, `snapshot` names the target's exported snapshot.
pub(super) async fn compare(
    config: &Config,
    mapping: &Mapping,
    table: &Table,
    source: &Client,
    snapshot_name: &str,
    at: Lsn,
) -> Result<TableReport, VerifyError> {
    let mut target = target_session(config, "").await?;
    let name = mapping.source.to_string();
    let tx = target
        .transaction()
        .await
        .map_err(query("target", "opening the mapped comparison"))?;
    tx.batch_execute(&format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {}; {}",
        quote_literal(snapshot_name),
        mapping.stage_sql(STAGE)
    ))
    .await
    .map_err(query("target", "importing the verify's snapshot"))?;
    let moved_rows = load_stage(mapping, table, source, &tx).await?;
    tx.batch_execute(&format!(
        "{}; {}; CREATE TEMPORARY TABLE {} ON COMMIT DROP AS {}",
        mapping.reasons_table_sql(STAGE, REASONS),
        mapping.expected_sql(REASONS, EXPECTED),
        quote_ident(DIFF),
        mapping.diff_sql(EXPECTED)
    ))
    .await
    .map_err(query(
        "target",
        &format!("comparing {name} through its mapping"),
    ))?;
    let rejected: Vec<(String, i64)> = tx
        .query(&mapping.rejected_in_sql(REASONS), &[])
        .await
        .map_err(query(
            "target",
            &format!("counting the rows {name} rejects"),
        ))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rejected_samples: Vec<String> = tx
        .query(
            &mapping.rejected_samples_sql(REASONS),
            &[&(config.verify.samples as i64)],
        )
        .await
        .map_err(query("target", &format!("reading rows {name} rejects")))?
        .iter()
        .map(|r| format!("{} ({})", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let records_off: i64 = if mapping.rejects.is_empty() {
        0
    } else {
        tx.query_one(&mapping.records_off_sql(REASONS), &[])
            .await
            .map_err(query("target", "reading cutover.rejected"))?
            .get(0)
    };
    let target_rows: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM {}",
                cutover_replication::catalog::own_rows(&mapping.target, mapping.target_partitioned)
            ),
            &[],
        )
        .await
        .map_err(query("target", &format!("counting {}", mapping.target)))?
        .get(0);
    let kinds = tx
        .query(
            &format!(
                "SELECT kind, count(*) FROM {} GROUP BY 1",
                quote_ident(DIFF)
            ),
            &[],
        )
        .await
        .map_err(query("target", "counting the differences"))?;
    let count = |kind: &str| -> u64 {
        kinds
            .iter()
            .find(|r| r.get::<_, &str>(0) == kind)
            .map_or(0, |r| r.get::<_, i64>(1).max(0) as u64)
    };
    let samples = tx
        .query(
            &format!(
                "SELECT kind, key, columns FROM (SELECT *, row_number() OVER (PARTITION BY kind ORDER BY key) AS n FROM {}) d \
                  WHERE n <= $1 ORDER BY kind, key",
                quote_ident(DIFF)
            ),
            &[&(config.verify.samples as i64)],
        )
        .await
        .map_err(query("target", "reading sample differences"))?;
    tx.rollback()
        .await
        .map_err(query("target", "ending the mapped comparison"))?;

    let source_rows = moved_rows;
    let rejected_total: i64 = rejected.iter().map(|(_, n)| n).sum();
    let expected = source_rows as i64 - rejected_total;
    let (missing, extra, changed) = (count("missing"), count("extra"), count("changed"));
    let mut report = TableReport::new(name, Vec::new());
    report.source_rows = expected.max(0) as u64;
    report.target_rows = target_rows.max(0) as u64;
    report.missing = missing;
    report.extra = extra;
    report.changed = changed;
    report.equal = (expected.max(0) as u64).saturating_sub(missing + changed);
    report.compared_at = vec![at];
    for row in &samples {
        let kind = match row.get::<_, &str>(0) {
            "missing" => SampleKind::MissingOnTarget,
            "extra" => SampleKind::ExtraOnTarget,
            _ => SampleKind::Changed,
        };
        let columns: Vec<String> = row.get(2);
        report.samples.push(Sample {
            kind,
            key: row.get(1),
            columns: if kind == SampleKind::Changed {
                columns
            } else {
                Vec::new()
            },
        });
    }
    report.mapped = Some(Reconciliation {
        written_to: mapping.target.to_string(),
        source_rows,
        rejected,
        rejected_samples,
        expected,
        target_rows,
        variance: target_rows - expected,
        records_off: records_off.max(0) as u64,
    });
    Ok(report)
}

/// The mapped tables among `tables`, resolved against both servers.
pub(super) async fn mapped_tables(
    config: &Config,
    tables: &[Table],
) -> Result<Vec<(Mapping, Table)>, VerifyError> {
    if config.mappings.is_empty() {
        return Ok(Vec::new());
    }
    let source = super::connect(config, "source").await?;
    let target = super::connect(config, "target").await?;
    let mappings = crate::copy::mappings(config, &source, &target).await?;
    Ok(mappings
        .into_iter()
        .filter_map(|m| {
            let table = tables.iter().find(|t| t.name == m.source)?.clone();
            Some((m, table))
        })
        .collect())
}

/// Whether `name` is read through a mapping.
pub(super) fn is_mapped(config: &Config, name: &TableName) -> bool {
    config.mappings.iter().any(|m| m.source == *name)
}

/// Loads `table` again through its mapping on the target, as it is in the
/// snapshot `source` holds (`cutover run --resync`): the target table
/// emptied with its records of rejection, then every source row written
/// through the mapping, in one transaction. Returns the source rows read.
pub(super) async fn reload(
    config: &Config,
    mapping: &Mapping,
    table: &Table,
    source: &Client,
) -> Result<u64, VerifyError> {
    let mut target = target_session(config, "SET session_replication_role = replica; ").await?;
    let name = mapping.source.to_string();
    let tx = target
        .transaction()
        .await
        .map_err(query("target", "opening the reload"))?;
    tx.batch_execute(&format!(
        "{}; {}",
        mapping.truncate_sql(false),
        mapping.stage_sql(STAGE)
    ))
    .await
    .map_err(query("target", &format!("emptying {}", mapping.target)))?;
    let moved_rows = load_stage(mapping, table, source, &tx).await?;
    tx.execute(
        &mapping.write_sql(&format!("SELECT * FROM {}", quote_ident(STAGE))),
        &[],
    )
    .await
    .map_err(query(
        "target",
        &format!("writing {name} through its mapping"),
    ))?;
    tx.commit()
        .await
        .map_err(query("target", &format!("committing the reload of {name}")))?;
    tracing::info!(table = %name, target = %mapping.target, rows = moved_rows, "mapped table loaded again through its mapping");
    Ok(moved_rows)
}

/// A target connection for a mapped table's work, with the session
/// settings of the copy and the verify (`extra` first).
async fn target_session(config: &Config, extra: &str) -> Result<Client, VerifyError> {
    let target = client::connect(&config.target()?.conninfo)
        .await
        .map_err(|source| VerifyError::Connect {
            role: "target",
            source,
        })?;
    target
        .batch_execute(&format!("{extra}{}", client::text_value_settings()))
        .await
        .map_err(query("target", "preparing the session"))?;
    Ok(target)
}

/// Loads every row of `table` that `source` sees into [`STAGE`] (made
/// already in `tx`), and returns how many.
async fn load_stage(
    mapping: &Mapping,
    table: &Table,
    source: &Client,
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<u64, VerifyError> {
    let columns: Vec<&str> = mapping.source_names();
    let chunk = Chunk {
        table: mapping.target.clone(),
        source: mapping.source.clone(),
        first_page: 0,
        end_page: None,
        index: 0,
        pages: 0,
    };
    let read = format!(
        "COPY (SELECT {} FROM {}) TO STDOUT",
        idents(&columns),
        cutover_replication::catalog::own_rows(&table.name, table.partitioned)
    );
    let load = format!(
        "COPY {} ({}) FROM STDIN",
        quote_ident(STAGE),
        idents(&columns)
    );
    let moved = snapshot::pipe(
        source,
        tx,
        &chunk,
        &read,
        &load,
        CopyFormat::Text,
        |_, _| {},
    )
    .await
    .map_err(|e| VerifyError::Query {
        role: "target",
        what: format!("loading {} through its mapping", mapping.source),
        detail: e.to_string(),
    })?;
    Ok(moved.rows)
}
