//! The snapshot copy: the initial bulk load, exact and resumable.
//!
//! # The seam
//!
//! The publication is made (or completed) first, then the slot is created
//! with an exported snapshot, and every copy worker imports that snapshot
//! before the exporting session runs another command. The copy then holds
//! exactly the transactions that committed before the slot's consistent
//! point; the stream carries every later one (DESIGN.md invariant 4).
//!
//! # Resuming
//!
//! An exported snapshot dies with the transactions holding it, so a copy
//! interrupted by a crash cannot continue in the same snapshot. The rule,
//! which stays exact:
//!
//! - A table whose copy finished keeps its rows and its `copied_at` (the
//!   consistent point of the snapshot it came from).
//! - Every other table is truncated on the target and copied again from a
//!   new snapshot, exported by a temporary slot created for the purpose;
//!   its `copied_at` is that slot's consistent point.
//! - The stream, which starts at the main slot's consistent point (the
//!   oldest), skips changes to a table that committed before the table's
//!   `copied_at`: those are already in its copy. This is how PostgreSQL's
//!   own table synchronisation works.
//!
//! Chunks commit one by one on the target, so a crash loses at most the
//! unfinished tables' work, never correctness.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cutover_replication::catalog::{self, Table, TableName};
use cutover_replication::client::{self, ConnectError, describe};
use cutover_replication::error::ReplicationError;
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::snapshot::{self, Chunk, ChunkError, CopyFormat};
use cutover_replication::sql::quote_ident;
use cutover_replication::{Lsn, ddl, partition, slot};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::config::Config;
use crate::coverage;
use crate::metrics::Metrics;
use crate::progress::CopyProgress;
use crate::store::{CopyRun, DroppedIndex, Store, StoreError, TableCopy, TableCopyState, now_secs};

/// Whether the copy prepares streaming or stands alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// `cutover run`: the slot persists and streams after the copy.
    BeforeStreaming,
    /// `cutover copy`: only the load; the slot is temporary.
    Standalone,
}

/// Why the copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A connection could not be opened.
    #[error("{role}: {source}")]
    Connect {
        /// `source` or `target`.
        role: &'static str,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// The replication session failed.
    #[error("source: {err}{}", err.hint().map(|h| format!(" ({h})")).unwrap_or_default())]
    Replication {
        /// The error.
        err: ReplicationError,
    },
    /// A query failed.
    #[error("{role}: {what}: {detail}")]
    Query {
        /// `source` or `target`.
        role: &'static str,
        /// What was being done.
        what: String,
        /// The server's error.
        detail: String,
    },
    /// A chunk failed.
    #[error("copying {table} (chunk {index}): {detail}")]
    Chunk {
        /// The table.
        table: TableName,
        /// The chunk.
        index: usize,
        /// The error.
        detail: String,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The target cannot receive the tables as they are.
    #[error("target: {0}")]
    Schema(String),
    /// A fresh copy found rows on the target.
    #[error(
        "target: these tables already hold rows: {0}; a fresh copy needs them empty: TRUNCATE them, or set copy.truncate_target = true to let cutover do it"
    )]
    NotEmpty(String),
    /// The state refers to a slot that is gone.
    #[error(
        "source: the copy in progress was made for replication slot {0:?}, which no longer exists: the changes since then are lost to cutover. Start over: empty the target tables, move the state directory aside, and run again"
    )]
    SlotGone(String),
    /// A slot of the configured name exists that this state knows nothing of.
    #[error(
        "source: replication slot {0:?} already exists but the state directory has no record of it: drop it (SELECT pg_drop_replication_slot('{0}')) or point state.dir at the directory that created it"
    )]
    ForeignSlot(String),
    /// The reconciliation found a difference.
    #[error("reconciliation failed: {0}")]
    Variance(String),
    /// `run` found a finished standalone copy, whose temporary slot is gone.
    #[error(
        "the state directory holds a finished `cutover copy` load, made from a temporary slot that is gone: streaming cannot continue from it. To migrate with streaming, empty the target tables, move the state directory aside and start with `cutover run`"
    )]
    StandaloneDone,
    /// An existing publication of the configured name would not send
    /// every change.
    #[error(
        "source: publication {name:?} exists but would not send every change ({gaps}); fix: {}", slot::publication_gaps_fix(name).replace('\n', " ")
    )]
    PublicationGaps {
        /// The publication.
        name: String,
        /// What it leaves out.
        gaps: String,
    },
    /// A table was truncated or rewritten between the snapshot and the
    /// copy's locks: copying it under that snapshot would find it empty.
    #[error(
        "source: {0} was truncated or rewritten just after the copy's snapshot was taken: the copy starts again from a new snapshot"
    )]
    Rewritten(String),
    /// `replication.keyless = "refuse"` and such tables are in scope.
    #[error(
        "source: {0}: neither a primary key nor a replica identity identifies their rows, and replication.keyless = \"refuse\". Add a primary key, or set replication.keyless = \"append_only\" (inserts stream; updates and deletes keep working on the source and are reported, not streamed) or \"replica_identity_full\" (cutover sets REPLICA IDENTITY FULL on the source), or exclude them in replication.exclude"
    )]
    Keyless(String),
    /// No table is in scope.
    #[error("source: no table is in scope (replication.tables = {0:?}); run cutover check")]
    NoTables(Vec<String>),
}

fn query(
    role: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    let what = what.into();
    move |err| CopyError::Query {
        role,
        what,
        detail: describe(&err),
    }
}

/// What the copy leaves for the stream.
#[derive(Debug, Clone)]
pub struct CopyOutcome {
    /// The slot to stream from.
    pub slot: String,
    /// Where streaming starts: the slot's consistent point.
    pub start: Lsn,
    /// Each table's `copied_at`: changes committed before it are skipped.
    pub copied_at: HashMap<TableName, Lsn>,
    /// The per-table records, for the reconciliation report.
    pub tables: Vec<TableCopy>,
    /// The publications to stream: `replication.publication`, and the one
    /// of tables whose inserts only stream, if it exists.
    pub publications: Vec<String>,
}

/// The tables in scope on the source, biggest first.
pub async fn tables_in_scope(source: &Client, config: &Config) -> Result<Vec<Table>, CopyError> {
    let mut tables: Vec<Table> = catalog::tables(source)
        .await
        .map_err(query("source", "listing tables"))?
        .into_iter()
        .filter(|t| config.scope.contains(&t.name))
        .collect();
    if tables.is_empty() {
        return Err(CopyError::NoTables(config.include_patterns.clone()));
    }
    tables.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.name.cmp(&b.name)));
    Ok(tables)
}

/// One table's copy plan: columns in order and the format.
#[derive(Debug, Clone)]
struct TablePlan {
    table: Table,
    columns: Vec<String>,
    format: CopyFormat,
}

fn plan_tables(
    sources: &[Table],
    targets: &HashMap<TableName, Table>,
) -> Result<Vec<TablePlan>, CopyError> {
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    for table in sources {
        let Some(target) = targets.get(&table.name) else {
            problems.push(format!("{} is missing", table.name));
            continue;
        };
        // A deferrable key's values may be permuted inside a source
        // transaction: applied on a target whose key is immediate, the
        // intermediate states would collide (or, coalesced, diverge).
        for key in &table.deferrable_keys {
            if !target.deferrable_keys.contains(key) {
                problems.push(format!(
                    "{}'s key ({}) is DEFERRABLE on the source but not on the target: declare it DEFERRABLE there too",
                    table.name,
                    key.join(", ")
                ));
            }
        }
        // Generated columns are computed on the target, never copied.
        let columns: Vec<&catalog::Column> =
            table.columns.iter().filter(|c| !c.generated).collect();
        let missing: Vec<&str> = columns
            .iter()
            .filter(|c| target.column(&c.name).is_none())
            .map(|c| c.name.as_str())
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "{} lacks column(s) {}",
                table.name,
                missing.join(", ")
            ));
            continue;
        }
        let source_types: Vec<String> = columns.iter().map(|c| c.type_name.clone()).collect();
        let target_types: Vec<String> = columns
            .iter()
            .map(|c| {
                target
                    .column(&c.name)
                    .map(|t| t.type_name.clone())
                    .unwrap_or_default()
            })
            .collect();
        let typed: Vec<(String, u32)> = columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        plans.push(TablePlan {
            table: table.clone(),
            columns: columns.iter().map(|c| c.name.clone()).collect(),
            format: CopyFormat::choose(&typed, &target_types, &source_types),
        });
    }
    if problems.is_empty() {
        Ok(plans)
    } else {
        Err(CopyError::Schema(format!(
            "{}; create the schema on the target first (cutover check lists the fixes)",
            problems.join("; ")
        )))
    }
}

/// Runs the copy (or finishes an interrupted one) and returns where the
/// stream must start.
pub async fn run(
    config: &Config,
    store: &Store,
    mode: CopyMode,
    metrics: &Metrics,
) -> Result<CopyOutcome, CopyError> {
    let source = client::connect(&config.source.conninfo)
        .await
        .map_err(|source| CopyError::Connect {
            role: "source",
            source,
        })?;
    let target = client::connect(&config.target.conninfo)
        .await
        .map_err(|source| CopyError::Connect {
            role: "target",
            source,
        })?;
    let tables = tables_in_scope(&source, config).await?;
    let targets: HashMap<TableName, Table> = catalog::tables(&target)
        .await
        .map_err(query("target", "listing tables"))?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let plans = plan_tables(&tables, &targets)?;
    let names: Vec<TableName> = plans.iter().map(|p| p.table.name.clone()).collect();

    let mut run = store.copy_run()?;
    if let Some(existing) = &run
        && existing.finished
    {
        if existing.standalone && mode == CopyMode::BeforeStreaming {
            return Err(CopyError::StandaloneDone);
        }
        tracing::info!(slot = %existing.slot, "the copy is already done");
        let mut done = outcome(store, existing)?;
        done.publications = publications(&source, config).await?;
        install_partition_triggers(&source, config).await?;
        install_ddl_capture(&source, config).await?;
        return Ok(done);
    }
    if mode == CopyMode::BeforeStreaming {
        ensure_publications(&source, store, config, &tables).await?;
    }

    // Which tables to copy now, and from which snapshot.
    let mut session = Session::connect(&config.source.conninfo)
        .await
        .map_err(|err| CopyError::Replication { err })?;
    let (snapshot_name, copied_at, to_copy): (String, Lsn, Vec<TablePlan>) = match run.as_mut() {
        Some(existing) if existing.consistent_point.is_some() => {
            if !existing.standalone
                && slot::slot_state(&source, &existing.slot)
                    .await
                    .map_err(query("source", "reading the slot"))?
                    .is_none()
            {
                return Err(CopyError::SlotGone(existing.slot.clone()));
            }
            let done: Vec<TableName> = store
                .table_copies()?
                .into_iter()
                .filter(|t| t.state == TableCopyState::Copied)
                .map(|t| t.name)
                .collect();
            let done = keep_unreferenced(&target, done, &plans).await?;
            let to_copy: Vec<TablePlan> = plans
                .into_iter()
                .filter(|p| !done.contains(&p.table.name))
                .collect();
            let temp = format!("cutover_resnap_{}", std::process::id());
            let created = session
                .create_slot(&temp, true, SnapshotAction::Export)
                .await
                .map_err(|err| CopyError::Replication { err })?;
            tracing::info!(
                kept = done.len(),
                again = to_copy.len(),
                snapshot_at = %created.consistent_point,
                "resuming the copy: finished tables are kept, the others are copied again from a new snapshot"
            );
            let list = to_copy
                .iter()
                .map(|p| own_rows_on(&targets, &p.table.name))
                .collect::<Vec<_>>()
                .join(", ");
            if !list.is_empty() {
                target
                    .batch_execute(&format!("TRUNCATE {list}"))
                    .await
                    .map_err(query("target", "emptying unfinished tables"))?;
            }
            (
                created.snapshot.unwrap_or_default(),
                created.consistent_point,
                to_copy,
            )
        }
        _ => {
            check_empty(&target, &targets, &names, config.copy.truncate_target).await?;
            let standalone = mode == CopyMode::Standalone;
            let slot_name = if standalone {
                format!("cutover_copy_{}", std::process::id())
            } else {
                config.slot.clone()
            };
            if !standalone
                && let Some(state) = slot::slot_state(&source, &slot_name)
                    .await
                    .map_err(query("source", "reading the slot"))?
            {
                // A slot recorded but without its consistent point: an
                // interrupted start before anything was copied; start over.
                match &run {
                    Some(r) if r.slot == slot_name && !state.active => {
                        session
                            .drop_slot(&slot_name, false)
                            .await
                            .map_err(|err| CopyError::Replication { err })?;
                    }
                    _ => return Err(CopyError::ForeignSlot(slot_name)),
                }
            }
            let mut record = CopyRun {
                slot: slot_name.clone(),
                standalone,
                consistent_point: None,
                finished: false,
                started_at: now_secs(),
                finished_at: None,
            };
            store.put_copy_run(&record)?;
            store.flush().await?;
            let created = session
                .create_slot(&slot_name, standalone, SnapshotAction::Export)
                .await
                .map_err(|err| CopyError::Replication { err })?;
            record.consistent_point = Some(created.consistent_point);
            store.put_copy_run(&record)?;
            for plan in &plans {
                store.put_table_copy(&TableCopy::pending(
                    plan.table.name.clone(),
                    created.consistent_point,
                ))?;
            }
            store.flush().await?;
            tracing::info!(slot = %slot_name, consistent_point = %created.consistent_point, tables = plans.len(), "slot created; copying its snapshot");
            run = Some(record);
            (
                created.snapshot.unwrap_or_default(),
                created.consistent_point,
                plans,
            )
        }
    };
    let run = run.expect("the run is recorded above");

    // Import the snapshot on every worker before the session does anything else.
    let worker_count = config.copy.workers.max(1);
    let mut sources = Vec::with_capacity(worker_count);
    let mut sinks = Vec::with_capacity(worker_count);
    for _ in 0..worker_count {
        let s = client::connect(&config.source.conninfo)
            .await
            .map_err(|source| CopyError::Connect {
                role: "source",
                source,
            })?;
        s.batch_execute(&client::text_value_settings())
            .await
            .map_err(query(
                "source",
                "setting the session's date and number formats",
            ))?;
        snapshot::open_snapshot(&s, &snapshot_name)
            .await
            .map_err(query("source", "importing the snapshot"))?;
        sources.push(s);
        let t = client::connect(&config.target.conninfo)
            .await
            .map_err(|source| CopyError::Connect {
                role: "target",
                source,
            })?;
        t.batch_execute(&format!(
            "SET session_replication_role = replica; {}",
            client::text_value_settings()
        ))
            .await
            .map_err(query("target", "setting session_replication_role = replica (needs superuser or GRANT SET ON PARAMETER)"))?;
        sinks.push(t);
    }
    // Every worker holds the snapshot now: the session may go. A temporary
    // slot disappears with it; the main slot stays.
    drop(session);

    let copying: Vec<TableName> = to_copy.iter().map(|p| p.table.name.clone()).collect();
    match copy_tables(
        config, store, &source, &target, to_copy, copied_at, sources, sinks, metrics,
    )
    .await
    {
        Ok(()) => {}
        Err(err @ CopyError::Rewritten(_)) => {
            // Nothing of this round is trusted: copied again, from a new
            // snapshot, by the resume rule.
            for table in &copying {
                store.put_table_copy(&TableCopy::pending(table.clone(), copied_at))?;
            }
            store.flush().await?;
            return Err(err);
        }
        Err(err) => return Err(err),
    }

    let mut finished = run.clone();
    finished.finished = true;
    finished.finished_at = Some(now_secs());
    store.put_copy_run(&finished)?;
    store.flush().await?;
    let mut result = outcome(store, &finished)?;
    result.publications = publications(&source, config).await?;
    let failures: Vec<String> = result
        .tables
        .iter()
        .filter(|t| t.variance() != Some(0) || t.source_count != Some(t.rows_copied as i64))
        .map(|t| {
            format!(
                "{}: source {} rows, copied {}, target {}",
                t.name,
                t.source_count.map(|c| c.to_string()).unwrap_or("?".into()),
                t.rows_copied,
                t.target_count.map(|c| c.to_string()).unwrap_or("?".into())
            )
        })
        .collect();
    if !failures.is_empty() {
        let mut unfinished = finished;
        unfinished.finished = false;
        store.put_copy_run(&unfinished)?;
        store.flush().await?;
        return Err(CopyError::Variance(failures.join("; ")));
    }
    Ok(result)
}

/// Fails with [`CopyError::Rewritten`] when one of `tables`, just read
/// under the snapshot, was rewritten after it: checked after each read,
/// before the read is reported, so that no such table is ever recorded as
/// copied (the worker holds the table's lock from its read on: no rewrite
/// commits after the check either).
async fn unrewritten(source: &Client, tables: &[&TableName]) -> Result<(), CopyError> {
    let rewritten = rewritten_since_snapshot(source, tables).await?;
    if rewritten.is_empty() {
        Ok(())
    } else {
        Err(CopyError::Rewritten(rewritten.join(", ")))
    }
}

/// Which of `tables` were rewritten (truncated, clustered, altered) after
/// the snapshot `source` holds: their file is no longer the one the
/// snapshot knows, and a read under the snapshot finds them empty.
///
/// TRUNCATE is not MVCC-safe: a TRUNCATE that committed after the copy's
/// snapshot was taken, but before a worker's COPY locked the table, leaves
/// the copy without the rows the snapshot had, and the changes streamed
/// after the snapshot then miss their rows. Such a copy is taken again
/// from a new snapshot instead of being trusted.
async fn rewritten_since_snapshot(
    source: &Client,
    tables: &[&TableName],
) -> Result<Vec<String>, CopyError> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    Ok(source
        .query(
            "SELECT r.name FROM unnest($1::text[]) AS r(name)
              WHERE EXISTS (SELECT 1 FROM pg_class c
                             WHERE (c.oid = r.name::regclass
                                    OR c.oid IN (SELECT relid FROM pg_partition_tree(r.name::regclass)))
                               AND c.relkind IN ('r', 'm') AND c.relfilenode <> pg_relation_filenode(c.oid))
              ORDER BY 1",
            &[&names],
        )
        .await
        .map_err(query("source", "checking the copied tables for rewrites"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The finished tables that may keep their rows when the others are
/// emptied and copied again: not those that reference (by a foreign key
/// on the target) a table copied again, directly or through others.
/// `TRUNCATE` refuses to empty a referenced table while a referencing one
/// keeps rows, and `CASCADE` would empty tables without recording it; so
/// such tables are copied again as well, from the same new snapshot.
async fn keep_unreferenced(
    target: &Client,
    mut done: Vec<TableName>,
    plans: &[TablePlan],
) -> Result<Vec<TableName>, CopyError> {
    let mut again: Vec<String> = plans
        .iter()
        .filter(|p| !done.contains(&p.table.name))
        .map(|p| p.table.name.quoted())
        .collect();
    loop {
        if again.is_empty() || done.is_empty() {
            return Ok(done);
        }
        let referencing: Vec<TableName> = target
            .query(
                "SELECT DISTINCT n.nspname::text, c.relname::text
                   FROM pg_constraint k
                   JOIN pg_class c ON c.oid = k.conrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE k.contype = 'f' AND k.confrelid = ANY($1::text[]::regclass[])",
                &[&again],
            )
            .await
            .map_err(query("target", "reading foreign keys"))?
            .iter()
            .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let (moved, kept): (Vec<TableName>, Vec<TableName>) =
            done.into_iter().partition(|t| referencing.contains(t));
        done = kept;
        if moved.is_empty() {
            return Ok(done);
        }
        for table in &moved {
            tracing::info!(%table, "copied again: it references a table that is copied again");
        }
        again = moved.iter().map(TableName::quoted).collect();
    }
}

fn outcome(store: &Store, run: &CopyRun) -> Result<CopyOutcome, CopyError> {
    let tables = store.table_copies()?;
    Ok(CopyOutcome {
        slot: run.slot.clone(),
        start: run.consistent_point.unwrap_or(Lsn::ZERO),
        copied_at: tables
            .iter()
            .map(|t| (t.name.clone(), t.copied_at))
            .collect(),
        tables,
        publications: Vec::new(),
    })
}

/// The publications to stream from: the configured one, and the one of
/// tables whose inserts only stream when it exists (a migration begun
/// before it was made has none).
async fn publications(source: &Client, config: &Config) -> Result<Vec<String>, CopyError> {
    let inserts = coverage::inserts_publication(&config.publication);
    let mut names = vec![config.publication.clone()];
    if slot::publication_exists(source, &inserts)
        .await
        .map_err(query("source", "reading publications"))?
    {
        names.push(inserts);
    }
    Ok(names)
}

/// Sets up what the stream needs on the source: `replication.publication`
/// for the tables whose every change streams, its `_inserts` twin for the
/// keyless tables whose inserts only stream (their UPDATEs and DELETEs
/// must keep working on the source), `REPLICA IDENTITY FULL` where
/// `replication.keyless` asks for it, and a watch on every table whose
/// changes do not all stream (see [`coverage`]).
async fn ensure_publications(
    source: &Client,
    store: &Store,
    config: &Config,
    tables: &[Table],
) -> Result<(), CopyError> {
    let plan = coverage::Plan::new(tables, config.keyless);
    if !plan.refused.is_empty() {
        return Err(CopyError::Keyless(
            plan.refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    coverage::make_full(source, &plan.make_full)
        .await
        .map_err(query(
            "source",
            "setting REPLICA IDENTITY FULL (replication.keyless = \"replica_identity_full\"; needs ownership of the tables)",
        ))?;
    ensure_publication(source, &config.publication, &plan.full, PUBLISH_ALL).await?;
    let inserts = coverage::inserts_publication(&config.publication);
    // Made even while empty under append_only: a keyless table created
    // later joins it (see `ddl`).
    if !plan.inserts_only.is_empty()
        || config.keyless == crate::config::KeylessPolicy::AppendOnly
        || slot::publication_exists(source, &inserts)
            .await
            .map_err(query("source", "reading publications"))?
    {
        ensure_publication(source, &inserts, &plan.inserts_only, PUBLISH_INSERTS).await?;
    }
    // A table moved between the two (its key dropped or added since a
    // previous start) must not stay where UPDATE and DELETE fail or are
    // lost.
    for (publication, keep) in [
        (&config.publication, &plan.full),
        (&inserts, &plan.inserts_only),
    ] {
        if !slot::publication_exists(source, publication)
            .await
            .map_err(query("source", "reading publications"))?
        {
            continue;
        }
        let stray: Vec<TableName> = slot::publication_tables(source, publication)
            .await
            .map_err(query(
                "source",
                format!("reading publication {publication}"),
            ))?
            .into_iter()
            .filter(|t| config.scope.contains(t) && !keep.contains(t))
            .collect();
        slot::drop_publication_tables(source, publication, &stray)
            .await
            .map_err(query(
                "source",
                format!("taking tables out of publication {publication}"),
            ))?;
    }
    install_partition_triggers(source, config).await?;
    install_ddl_capture(source, config).await?;
    let partial: Vec<(&TableName, coverage::Coverage)> = plan.partial().collect();
    if !partial.is_empty() {
        let names: Vec<&TableName> = partial.iter().map(|(t, _)| *t).collect();
        let counts = coverage::write_counts(source, &names)
            .await
            .map_err(query("source", "reading table statistics"))?;
        for (table, coverage) in partial {
            tracing::warn!(%table, coverage = coverage.name(), "{}", coverage::explain(coverage));
            if store.watch(table)?.is_none() {
                let counted = counts.get(table).copied().unwrap_or_default();
                store.put_watch(&coverage::Watch::new(table.clone(), coverage, counted))?;
            }
        }
    }
    Ok(())
}

/// Puts cutover's TRUNCATE trigger on every partition of the published
/// partitioned tables that lacks it (see
/// [`cutover_replication::partition`]).
pub async fn install_partition_triggers(source: &Client, config: &Config) -> Result<(), CopyError> {
    let names = vec![
        config.publication.clone(),
        coverage::inserts_publication(&config.publication),
    ];
    let covered = partition::install_for_publications(source, &names)
        .await
        .map_err(query(
            "source",
            "adding cutover's TRUNCATE trigger to partitions (needs the TRIGGER privilege on them, or ownership, and CREATE on the database for the cutover schema)",
        ))?;
    if !covered.is_empty() {
        tracing::info!(
            partitions = covered.len(),
            "TRUNCATE trigger added to partitions: a TRUNCATE of one partition, which pgoutput does not send, reaches the target"
        );
    }
    Ok(())
}

/// Installs the event triggers that report DDL on the source in the stream
/// (see [`cutover_replication::ddl`]); without superuser, says what is not
/// captured.
async fn install_ddl_capture(source: &Client, config: &Config) -> Result<(), CopyError> {
    let capture = ddl::Capture {
        scope_condition: config.scope.sql_condition("t.s", "t.n"),
        publication: config.publication.clone(),
        inserts_publication: (config.keyless == crate::config::KeylessPolicy::AppendOnly)
            .then(|| coverage::inserts_publication(&config.publication)),
    };
    let installed = ddl::install(source, &capture)
        .await
        .map_err(query("source", "installing cutover's DDL event triggers"))?;
    if !installed {
        tracing::warn!(
            "the source role is not a superuser: DDL on the source is not captured in the stream (event triggers need superuser); a column added or widened on the source is followed once its rows arrive, when the target has it, and anything else stops the stream when a change does not fit"
        );
    }
    Ok(())
}

/// What `replication.publication` publishes.
const PUBLISH_ALL: &str = "insert, update, delete, truncate";

/// What the `_inserts` publication publishes.
const PUBLISH_INSERTS: &str = "insert, truncate";

async fn ensure_publication(
    source: &Client,
    name: &str,
    tables: &[TableName],
    publish: &str,
) -> Result<(), CopyError> {
    if slot::publication_exists(source, name)
        .await
        .map_err(query("source", "reading publications"))?
    {
        // Reused only if it sends every change it should: a filtered
        // publication would leave the target silently behind.
        let gaps = slot::publication_gaps(source, name)
            .await
            .map_err(query("source", format!("reading publication {name}")))?;
        let gaps: Vec<String> = if publish == PUBLISH_INSERTS {
            gaps.into_iter()
                .filter(|g| g != "it does not publish update, delete")
                .collect()
        } else {
            gaps
        };
        if !gaps.is_empty() {
            return Err(CopyError::PublicationGaps {
                name: name.to_owned(),
                gaps: gaps.join("; "),
            });
        }
        let added = slot::add_publication_tables(source, name, tables)
            .await
            .map_err(query(
                "source",
                format!("adding tables to publication {name}"),
            ))?;
        if !added.is_empty() {
            tracing::info!(
                publication = name,
                added = added.len(),
                "publication extended to the tables in scope"
            );
        }
    } else {
        slot::create_publication(source, name, tables, publish)
            .await
            .map_err(query(
                "source",
                format!(
                    "creating publication {name} (needs ownership of the tables, or superuser)"
                ),
            ))?;
        tracing::info!(
            publication = name,
            tables = tables.len(),
            publish,
            "publication created"
        );
    }
    Ok(())
}

/// `ONLY "s"."t"`, or the table itself if it is partitioned on the target:
/// the table's own rows, without those of tables inheriting from it.
fn own_rows_on(targets: &HashMap<TableName, Table>, table: &TableName) -> String {
    catalog::own_rows(table, targets.get(table).is_some_and(|t| t.partitioned))
}

async fn check_empty(
    target: &Client,
    targets: &HashMap<TableName, Table>,
    tables: &[TableName],
    truncate: bool,
) -> Result<(), CopyError> {
    let mut non_empty = Vec::new();
    for table in tables {
        let has_rows: bool = target
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {})",
                    own_rows_on(targets, table)
                ),
                &[],
            )
            .await
            .map_err(query("target", format!("reading {table}")))?
            .get(0);
        if has_rows {
            non_empty.push(table.clone());
        }
    }
    if non_empty.is_empty() {
        return Ok(());
    }
    if !truncate {
        return Err(CopyError::NotEmpty(
            non_empty
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    let list = non_empty
        .iter()
        .map(|t| own_rows_on(targets, t))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::warn!(tables = %list, "copy.truncate_target: emptying target tables before the copy");
    target
        .batch_execute(&format!("TRUNCATE {list}"))
        .await
        .map_err(query("target", "emptying tables"))
}

/// A table is small when it fits in one chunk of at most this part of
/// `copy.chunk_mb`.
const SMALL_TABLE_PART: u64 = 8;

/// At most this many small tables share a target transaction.
const BUNDLE_TABLES: usize = 256;

/// A unit of work for a copy worker.
#[derive(Debug)]
enum Task {
    /// One chunk of a table, in its own target transaction.
    Chunk { plan: usize, chunk: Chunk },
    /// A table's count in the snapshot, after its chunks.
    Count { plan: usize },
    /// Small tables, each in one chunk, copied and counted in one target
    /// transaction.
    Bundle(Vec<(usize, Chunk)>),
    /// A key, index or CHECK constraint dropped for the load, put back
    /// once the table is loaded.
    Rebuild { plan: usize, item: Rebuild },
    /// Once the table is loaded and its indexes built: its keys attached
    /// to their indexes, VACUUM (ANALYZE) when a foreign key dropped for
    /// the load joins it to another table (else ANALYZE, when configured),
    /// and the count on the target.
    Finalize {
        plan: usize,
        keys: Vec<DroppedIndex>,
        vacuum: bool,
    },
    /// A foreign key dropped for the load, added back and validated once
    /// both its tables are copied ([`ForeignKeys`]).
    ForeignKey {
        table: TableName,
        constraint: DroppedIndex,
    },
}

impl Task {
    /// What the task does, for the progress display and the log.
    fn describe(&self, plans: &[TablePlan]) -> String {
        let name = |plan: &usize| plans[*plan].table.name.to_string();
        match self {
            Task::Chunk { plan, chunk } => format!("{} chunk {}", name(plan), chunk.index + 1),
            Task::Count { plan } => format!("{} counting", name(plan)),
            Task::Bundle(items) => format!("{} small tables", items.len()),
            Task::Rebuild { plan, item } => {
                let piece = match item {
                    Rebuild::Key(d) | Rebuild::Index(d) | Rebuild::Check(d) => &d.name,
                };
                format!("{} rebuilding {piece}", name(plan))
            }
            Task::Finalize { plan, keys, .. } if keys.is_empty() => {
                format!("{} counting on the target", name(plan))
            }
            Task::Finalize { plan, .. } => {
                format!("{} attaching keys, counting on the target", name(plan))
            }
            Task::ForeignKey { table, constraint } => {
                format!("{table} validating {}", constraint.name)
            }
        }
    }
}

/// What `copy.drop_indexes` dropped from a table, one piece.
#[derive(Debug, Clone)]
enum Rebuild {
    Key(DroppedIndex),
    Index(DroppedIndex),
    Check(DroppedIndex),
}

/// A chunk's progress callback: its bytes and rows go to the coordinator
/// as they flow, and `streamed` keeps the rows reported.
fn streaming<'a>(
    tx: &'a mpsc::UnboundedSender<Report>,
    plan: usize,
    streamed: &'a mut u64,
) -> impl FnMut(u64, u64) + 'a {
    move |bytes, rows| {
        *streamed += rows;
        let _ = tx.send(Report::Bytes { plan, bytes, rows });
    }
}

/// What a worker reports.
#[derive(Debug)]
enum Report {
    ChunkDone {
        plan: usize,
        rows: u64,
        bytes: u64,
        /// Rows already shown by `Bytes` reports while the chunk flowed.
        streamed: u64,
    },
    Counted {
        plan: usize,
        rows: i64,
    },
    /// Data on its way, with the rows it holds (for progress only).
    Bytes {
        plan: usize,
        bytes: u64,
        rows: u64,
    },
    Rebuilt {
        plan: usize,
        item: Rebuild,
    },
    Finalized {
        plan: usize,
        target_rows: i64,
    },
    ForeignKeyRestored {
        table: TableName,
        name: String,
        left: Option<Unvalidated>,
    },
}

/// The workers' queue. Tasks are added while the copy runs (a loaded
/// table's rebuilds go to the front, so that it finishes soon), so an
/// idle worker waits for more until the queue is closed.
///
/// A worker takes the first task that does not load a table another
/// worker is loading, and shares a table only when nothing else is left.
/// Two loaders of one table contend on its indexes (each inserting into
/// the same btree pages, one of them in the middle of the other's key
/// range): `bench --scenario copy` showed a 1M-row table's chunk taking
/// 5.5 s beside its sibling against 2.6 s alone.
struct WorkQueue {
    tasks: Mutex<VecDeque<Task>>,
    /// Chunks being loaded, per table plan.
    loading: Mutex<HashMap<usize, usize>>,
    more: Notify,
    closed: AtomicBool,
}

impl WorkQueue {
    fn new(tasks: VecDeque<Task>) -> WorkQueue {
        WorkQueue {
            tasks: Mutex::new(tasks),
            loading: Mutex::new(HashMap::new()),
            more: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Task>> {
        self.tasks.lock().expect("the queue lock is never poisoned")
    }

    /// Adds tasks ahead of those waiting.
    fn push_front(&self, tasks: Vec<Task>) {
        let mut queue = self.lock();
        for task in tasks.into_iter().rev() {
            queue.push_front(task);
        }
        drop(queue);
        self.more.notify_waiters();
    }

    /// The next task: the first that loads no table being loaded, else
    /// the first.
    fn take(&self) -> Option<Task> {
        let mut tasks = self.lock();
        let mut loading = self
            .loading
            .lock()
            .expect("the queue lock is never poisoned");
        let free = |task: &Task| match task {
            Task::Chunk { plan, .. } => loading.get(plan).is_none_or(|n| *n == 0),
            _ => true,
        };
        let index = tasks.iter().position(free).unwrap_or(0);
        let task = tasks.remove(index)?;
        if let Task::Chunk { plan, .. } = &task {
            *loading.entry(*plan).or_default() += 1;
        }
        Some(task)
    }

    /// A chunk of `plan` is loaded.
    fn loaded(&self, plan: usize) {
        let mut loading = self
            .loading
            .lock()
            .expect("the queue lock is never poisoned");
        if let Some(n) = loading.get_mut(&plan) {
            *n = n.saturating_sub(1);
        }
    }

    /// No task will be added: idle workers stop.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.more.notify_waiters();
    }

    async fn next(&self) -> Option<Task> {
        loop {
            let more = self.more.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            if let Some(task) = self.take() {
                return Some(task);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            more.await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_tables(
    config: &Config,
    store: &Store,
    source: &Client,
    target: &Client,
    plans: Vec<TablePlan>,
    copied_at: Lsn,
    sources: Vec<Client>,
    sinks: Vec<Client>,
    metrics: &Metrics,
) -> Result<(), CopyError> {
    let mut records: Vec<TableCopy> = Vec::with_capacity(plans.len());
    let mut remaining: Vec<u64> = Vec::with_capacity(plans.len());
    let mut chunks_of: Vec<Vec<Chunk>> = Vec::with_capacity(plans.len());
    let mut index_work: Vec<u64> = Vec::with_capacity(plans.len());
    for plan in &plans {
        index_work.push(index_work_of(target, &plan.table).await?);
        let chunks = snapshot::plan_chunks(
            source,
            &plan.table.name,
            plan.table.partitioned,
            config.copy.pages_per_chunk,
        )
        .await
        .map_err(query("source", format!("sizing {}", plan.table.name)))?;
        let mut record = store
            .table_copy(&plan.table.name)?
            .unwrap_or_else(|| TableCopy::pending(plan.table.name.clone(), copied_at));
        record.state = TableCopyState::Copying;
        record.copied_at = copied_at;
        record.chunks_total = chunks.len() as u64;
        record.chunks_done = 0;
        record.rows_copied = 0;
        record.bytes_copied = 0;
        record.source_count = None;
        record.target_count = None;
        record.format = Some(plan.format);
        if config.copy.drop_indexes {
            drop_load_constraints(target, &mut record, store).await?;
        }
        store.put_table_copy(&record)?;
        remaining.push(chunks.len() as u64);
        records.push(record);
        chunks_of.push(chunks);
    }
    let small = |chunks: &[Chunk]| {
        chunks.len() == 1
            && chunks[0].pages <= u64::from(config.copy.pages_per_chunk) / SMALL_TABLE_PART
    };
    if config.copy.drop_indexes {
        // Every foreign key in scope is gone now: the keys they referenced
        // may go too. A small table keeps its own: rebuilding them would
        // cost more than the load saves.
        for (record, chunks) in records.iter_mut().zip(&chunks_of) {
            if !small(chunks) {
                drop_indexes_and_keys(target, record, store).await?;
            }
        }
    }
    store.flush().await?;

    // Each table's chunks, then its count in the snapshot: a table is
    // finished (and kept by a resume) as soon as it can be, not at the end
    // of the whole copy. Small tables (one chunk of at most 1/8 of
    // `copy.chunk_mb`) go several to a task, copied and counted in one
    // target transaction: a commit, a flush and a round of the queue per
    // table would cost more than their rows.
    let mut queue = VecDeque::new();
    let mut bundle: Vec<(usize, Chunk)> = Vec::new();
    let mut bundle_pages = 0;
    let order = load_order(&index_work);
    let mut chunks_of: Vec<Option<Vec<Chunk>>> = chunks_of.into_iter().map(Some).collect();
    for i in order {
        let chunks = chunks_of[i].take().expect("each table once");
        if small(&chunks) {
            let chunk = chunks.into_iter().next().expect("one chunk");
            bundle_pages += chunk.pages;
            bundle.push((i, chunk));
            if bundle_pages >= u64::from(config.copy.pages_per_chunk)
                || bundle.len() >= BUNDLE_TABLES
            {
                queue.push_back(Task::Bundle(std::mem::take(&mut bundle)));
                bundle_pages = 0;
            }
            continue;
        }
        queue.extend(
            chunks
                .into_iter()
                .map(|chunk| Task::Chunk { plan: i, chunk }),
        );
        queue.push_back(Task::Count { plan: i });
    }
    if !bundle.is_empty() {
        queue.push_back(Task::Bundle(bundle));
    }

    let progress = CopyProgress::new(
        plans
            .iter()
            .map(|p| {
                (
                    p.table.name.to_string(),
                    p.table.row_estimate.unwrap_or(0).max(0) as u64,
                )
            })
            .collect(),
        sources.len(),
    );
    let queue = Arc::new(WorkQueue::new(queue));
    let plans = Arc::new(plans);
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let mut workers = JoinSet::new();
    for (id, (source, target)) in sources.into_iter().zip(sinks).enumerate() {
        let queue = Arc::clone(&queue);
        let plans = Arc::clone(&plans);
        let tx = tx.clone();
        let progress = progress.clone();
        let analyze = config.copy.analyze;
        workers.spawn(async move {
            worker(id, source, target, &queue, plans, tx, progress, analyze).await
        });
    }
    drop(tx);

    let joined = foreign_key_tables(&records);
    let mut counted: Vec<Option<i64>> = vec![None; plans.len()];
    // Rebuild steps still running per table; `None` until they are queued.
    let mut rebuilding: Vec<Option<usize>> = vec![None; plans.len()];
    let mut finished = 0;
    let mut foreign_keys = ForeignKeys::default();
    if plans.is_empty() {
        foreign_keys.queue_rest(store, target, &queue).await?;
    }
    let mut failure: Option<CopyError> = None;
    loop {
        tokio::select! {
            report = rx.recv() => {
                let Some(report) = report else { break };
                let plan = match report {
                    Report::Bytes { plan, bytes, rows } => {
                        progress.bytes(plan, bytes);
                        progress.rows(plan, rows);
                        metrics
                            .copy_bytes
                            .with_label_values(&[&records[plan].name.to_string()])
                            .inc_by(bytes);
                        continue;
                    }
                    Report::ChunkDone { plan, rows, bytes, streamed } => {
                        let record = &mut records[plan];
                        record.chunks_done += 1;
                        record.rows_copied += rows;
                        record.bytes_copied += bytes;
                        remaining[plan] -= 1;
                        // The exact count from the target settles the
                        // estimate shown while the chunk flowed.
                        progress.rows(plan, rows.saturating_sub(streamed));
                        metrics
                            .copy_rows
                            .with_label_values(&[&record.name.to_string()])
                            .inc_by(rows);
                        store.put_table_copy(record)?;
                        plan
                    }
                    Report::Counted { plan, rows } => {
                        counted[plan] = Some(rows);
                        plan
                    }
                    Report::Rebuilt { plan, item } => {
                        let record = &mut records[plan];
                        match &item {
                            // Its index only: the key is attached by Finalize.
                            Rebuild::Key(_) => {}
                            Rebuild::Index(d) => record.dropped_indexes.retain(|x| x.name != d.name),
                            Rebuild::Check(d) => record.dropped_constraints.retain(|x| x.name != d.name),
                        }
                        store.put_table_copy(record)?;
                        let left = rebuilding[plan].as_mut().expect("rebuilds are queued first");
                        *left -= 1;
                        if *left == 0 {
                            queue.push_front(vec![finalize(record, plan, &joined)]);
                        }
                        continue;
                    }
                    Report::Finalized { plan, target_rows } => {
                        let record = &mut records[plan];
                        // Finalize attached them.
                        record.dropped_keys.clear();
                        record.target_count = Some(target_rows);
                        record.state = TableCopyState::Copied;
                        store.put_table_copy(record)?;
                        store.flush().await?;
                        tracing::info!(
                            table = %record.name,
                            rows = record.rows_copied,
                            bytes = record.bytes_copied,
                            copied_at = %record.copied_at,
                            format = record.format.map(|f| f.name()).unwrap_or("?"),
                            "table copied"
                        );
                        progress.table_done(plan);
                        finished += 1;
                        queue.push_front(foreign_keys.ready(&records));
                        if finished == plans.len() {
                            foreign_keys.queue_rest(store, target, &queue).await?;
                        }
                        continue;
                    }
                    Report::ForeignKeyRestored { table, name, left } => {
                        if let Some(left) = left {
                            tracing::warn!(
                                %table,
                                constraint = %name,
                                error = %left.error,
                                "a foreign key stays NOT VALID: its referenced rows are not all on the target (a referenced table out of scope?); once they are, run: {}",
                                left.statement
                            );
                        }
                        match records.iter_mut().find(|r| r.name == table) {
                            Some(record) => {
                                record.dropped_constraints.retain(|d| d.name != name);
                                store.put_table_copy(record)?;
                            }
                            None => {
                                if let Some(mut record) = store.table_copy(&table)? {
                                    record.dropped_constraints.retain(|d| d.name != name);
                                    store.put_table_copy(&record)?;
                                }
                            }
                        }
                        if foreign_keys.restored() {
                            store.flush().await?;
                            queue.close();
                        }
                        continue;
                    }
                };
                if remaining[plan] == 0 && rebuilding[plan].is_none() && let Some(count) = counted[plan] {
                    let record = &mut records[plan];
                    record.source_count = Some(count);
                    store.put_table_copy(record)?;
                    let steps = rebuild_steps(record, plan);
                    rebuilding[plan] = Some(steps.len());
                    queue.push_front(if steps.is_empty() {
                        vec![finalize(record, plan, &joined)]
                    } else {
                        steps
                    });
                }
            }
            Some(joined) = workers.join_next() => {
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => { failure = Some(err); break; }
                    Err(join) => {
                        failure = Some(CopyError::Schema(format!("a copy worker stopped unexpectedly: {join}")));
                        break;
                    }
                }
            }
        }
    }
    progress.finish();
    if let Some(err) = failure {
        queue.close();
        workers.abort_all();
        return Err(err);
    }
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        if let Ok(Err(err)) = joined {
            // A rewrite found by any worker wins: the round is copied again.
            if failure.is_none() || matches!(err, CopyError::Rewritten(_)) {
                failure = Some(err);
            }
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    debug_assert_eq!(finished, plans.len());
    Ok(())
}

/// The steps that put back what `copy.drop_indexes` dropped from a loaded
/// table, but for its foreign keys (those wait for every table): its keys,
/// indexes and CHECK constraints, each its own task so that several
/// workers build them at once.
fn rebuild_steps(record: &TableCopy, plan: usize) -> Vec<Task> {
    let keys = record.dropped_keys.iter().cloned().map(Rebuild::Key);
    let indexes = record.dropped_indexes.iter().cloned().map(Rebuild::Index);
    let checks = record
        .dropped_constraints
        .iter()
        .filter(|c| !c.definition.starts_with("FOREIGN KEY"))
        .cloned()
        .map(Rebuild::Check);
    keys.chain(indexes)
        .chain(checks)
        .map(|item| Task::Rebuild { plan, item })
        .collect()
}

/// How much index work loading a table costs on the target, for the load
/// order: its rows times its indexes and CHECK and FOREIGN KEY
/// constraints, maintained row by row during the load or (with
/// `copy.drop_indexes`) built and validated after it. Rows from the
/// source's statistics, or from its size where it has none (never
/// analyzed).
async fn index_work_of(target: &Client, table: &Table) -> Result<u64, CopyError> {
    let pieces: i64 = target
        .query_one(
            "SELECT (SELECT count(*) FROM pg_index WHERE indrelid = $1::text::regclass)
                  + (SELECT count(*) FROM pg_constraint
                      WHERE conrelid = $1::text::regclass AND contype IN ('c', 'f'))",
            &[&table.name.quoted()],
        )
        .await
        .map_err(query(
            "target",
            format!("counting the indexes of {}", table.name),
        ))?
        .get(0);
    let rows = match table.row_estimate {
        Some(rows) if rows >= 0 => rows as u64,
        _ => table.total_bytes.max(0) as u64 / 128,
    };
    Ok(rows * pieces.max(0) as u64)
}

/// The order in which tables are loaded: most index work first
/// ([`index_work_of`]), then biggest first. Where the target maintains
/// indexes during the load, a table's cost follows its rows and indexes
/// far more than its bytes (in `bench --scenario copy`, 25 MB with two
/// random-order indexes took 3.7 s where 42 MB of TOASTed text with one
/// took 1.5 s), and such a table in one chunk, left for last, is a tail
/// no other worker can share. With `copy.drop_indexes`, the same tables
/// leave the most to rebuild and validate: loaded first, their builds run
/// beside the loads of the others instead of alone at the end (1.2 s of
/// rebuilds and validation with one worker idle, before). Tables with
/// little index work, split in chunks, fill the gaps at the end.
fn load_order(index_work: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..index_work.len()).collect();
    // Stable: ties keep the biggest-first order of the plans.
    order.sort_by_key(|&i| std::cmp::Reverse(index_work[i]));
    order
}

/// The last step of a loaded table: its keys attached (their indexes are
/// built), the table vacuumed and analyzed when it is in `joined`, then
/// its count.
fn finalize(record: &TableCopy, plan: usize, joined: &HashSet<TableName>) -> Task {
    Task::Finalize {
        plan,
        keys: record.dropped_keys.clone(),
        vacuum: joined.contains(&record.name),
    }
}

/// The tables at either end of a foreign key dropped for the load: each is
/// vacuumed and analyzed once loaded, before the key is validated.
///
/// Why: validating a foreign key runs an anti-join of the two tables
/// (`RI_Initial_Check`) planned like any query. On freshly loaded tables
/// the planner has no statistics and no visibility map, so it hashes the
/// whole referenced table in `maintenance_work_mem` (seen: 550-630 ms for
/// 500k rows against 1M on the benchmark's dataset). Vacuumed and
/// analyzed, both sides are read as index-only scans merged in key order
/// (130-150 ms); the VACUUM ANALYZE of both tables cost about 300 ms, and
/// leaves the tables with statistics, hint bits and a visibility map,
/// which the target would otherwise build under its first queries.
fn foreign_key_tables(records: &[TableCopy]) -> HashSet<TableName> {
    let mut tables = HashSet::new();
    for record in records {
        for constraint in &record.dropped_constraints {
            if let Some(referenced) = &constraint.references {
                tables.insert(record.name.clone());
                tables.insert(referenced.clone());
            }
        }
    }
    tables
}

/// The foreign keys dropped for the load, on their way back. One is added
/// back and validated as soon as both its tables are copied (loaded, their
/// keys and indexes back), beside the loads of the others: validation
/// reads both tables whole, and waiting for every table would leave it
/// alone at the end of the copy. The rest (those of tables not copied now,
/// those referencing a table not copied now, and any recorded before their
/// referenced table was) go once every table is copied.
#[derive(Debug, Default)]
struct ForeignKeys {
    /// (table, constraint) of those queued.
    queued: std::collections::HashSet<(TableName, String)>,
    /// Queued and not yet back.
    outstanding: usize,
    /// Every one is queued: the queue closes when the last is back.
    all_queued: bool,
}

impl ForeignKeys {
    /// The tasks of the foreign keys whose two tables are now copied.
    fn ready(&mut self, records: &[TableCopy]) -> Vec<Task> {
        let copied = |name: &TableName| {
            records
                .iter()
                .any(|r| &r.name == name && r.state == TableCopyState::Copied)
        };
        let mut tasks = Vec::new();
        for record in records.iter().filter(|r| r.state == TableCopyState::Copied) {
            for constraint in &record.dropped_constraints {
                let Some(referenced) = &constraint.references else {
                    continue;
                };
                if copied(referenced)
                    && self
                        .queued
                        .insert((record.name.clone(), constraint.name.clone()))
                {
                    tasks.push(Task::ForeignKey {
                        table: record.name.clone(),
                        constraint: constraint.clone(),
                    });
                }
            }
        }
        self.outstanding += tasks.len();
        tasks
    }

    /// Once every table is copied: queues the foreign keys not queued yet,
    /// on every table of the store (a table finished before a crash keeps
    /// its pending ones until here), after putting back anything else a
    /// crash left dropped on a table not copied now. Closes the queue when
    /// nothing is left to wait for.
    async fn queue_rest(
        &mut self,
        store: &Store,
        target: &Client,
        queue: &WorkQueue,
    ) -> Result<(), CopyError> {
        let mut tasks = Vec::new();
        for mut record in store.table_copies()? {
            if !record.dropped_keys.is_empty() || !record.dropped_indexes.is_empty() {
                rebuild_indexes(target, &mut record).await?;
                store.put_table_copy(&record)?;
            }
            for constraint in &record.dropped_constraints {
                if self
                    .queued
                    .insert((record.name.clone(), constraint.name.clone()))
                {
                    tasks.push(Task::ForeignKey {
                        table: record.name.clone(),
                        constraint: constraint.clone(),
                    });
                }
            }
        }
        store.flush().await?;
        self.outstanding += tasks.len();
        self.all_queued = true;
        if self.outstanding == 0 {
            queue.close();
        } else {
            queue.push_front(tasks);
        }
        Ok(())
    }

    /// One is back; true when it was the last.
    fn restored(&mut self) -> bool {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.all_queued && self.outstanding == 0
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    id: usize,
    source: Client,
    mut target: Client,
    queue: &WorkQueue,
    plans: Arc<Vec<TablePlan>>,
    tx: mpsc::UnboundedSender<Report>,
    progress: CopyProgress,
    analyze: bool,
) -> Result<(), CopyError> {
    loop {
        let Some(task) = queue.next().await else {
            break;
        };
        let started = std::time::Instant::now();
        let what = task.describe(&plans);
        progress.worker(id, &what);
        match task {
            Task::Rebuild { plan, item } => {
                let p = &plans[plan];
                match &item {
                    Rebuild::Key(key) => build_key_index(&target, &p.table.name, key).await?,
                    Rebuild::Index(index) => rebuild_index(&target, index).await?,
                    Rebuild::Check(check) => {
                        // A CHECK constraint that fails is an error (never `Some`).
                        restore_constraint(&target, &p.table.name, check).await?;
                    }
                }
                let _ = tx.send(Report::Rebuilt { plan, item });
            }
            Task::Finalize { plan, keys, vacuum } => {
                let name = &plans[plan].table.name;
                for key in &keys {
                    rebuild_key(&target, name, key).await?;
                }
                if vacuum {
                    target
                        .batch_execute(&format!("VACUUM (ANALYZE) {}", name.quoted()))
                        .await
                        .map_err(query("target", format!("vacuuming {name}")))?;
                } else if analyze {
                    target
                        .batch_execute(&format!("ANALYZE {}", name.quoted()))
                        .await
                        .map_err(query("target", format!("analyzing {name}")))?;
                }
                let target_rows = catalog::count_rows(&target, name)
                    .await
                    .map_err(query("target", format!("counting {name}")))?;
                let _ = tx.send(Report::Finalized { plan, target_rows });
            }
            Task::ForeignKey { table, constraint } => {
                let left = restore_constraint(&target, &table, &constraint).await?;
                let _ = tx.send(Report::ForeignKeyRestored {
                    table,
                    name: constraint.name,
                    left,
                });
            }
            Task::Chunk { plan, chunk } => {
                let p = &plans[plan];
                let mut streamed = 0;
                let stats = snapshot::copy_chunk(
                    &source,
                    &mut target,
                    &chunk,
                    &p.columns,
                    p.format,
                    streaming(&tx, plan, &mut streamed),
                )
                .await
                .map_err(|err| chunk_error(&p.table.name, chunk.index, &err))?;
                unrewritten(&source, &[&p.table.name]).await?;
                queue.loaded(plan);
                let _ = tx.send(Report::ChunkDone {
                    plan,
                    rows: stats.rows,
                    bytes: stats.bytes,
                    streamed,
                });
            }
            Task::Count { plan } => {
                let p = &plans[plan];
                let rows = count_in_snapshot(&source, &p.table.name).await?;
                unrewritten(&source, &[&p.table.name]).await?;
                let _ = tx.send(Report::Counted { plan, rows });
            }
            Task::Bundle(items) => {
                let transaction = target
                    .transaction()
                    .await
                    .map_err(query("target", "opening a transaction for small tables"))?;
                let mut done = Vec::with_capacity(items.len());
                for (plan, chunk) in &items {
                    let (plan, p) = (*plan, &plans[*plan]);
                    let mut streamed = 0;
                    let stats = snapshot::copy_chunk_in(
                        &source,
                        &transaction,
                        chunk,
                        &p.columns,
                        p.format,
                        streaming(&tx, plan, &mut streamed),
                    )
                    .await
                    .map_err(|err| chunk_error(&p.table.name, chunk.index, &err))?;
                    let rows = count_in_snapshot(&source, &p.table.name).await?;
                    done.push((plan, stats, rows, streamed));
                }
                let names: Vec<&TableName> = items
                    .iter()
                    .map(|(plan, _)| &plans[*plan].table.name)
                    .collect();
                unrewritten(&source, &names).await?;
                transaction.commit().await.map_err(query(
                    "target",
                    format!("committing {} small tables", items.len()),
                ))?;
                for (plan, stats, rows, streamed) in done {
                    let _ = tx.send(Report::ChunkDone {
                        plan,
                        rows: stats.rows,
                        bytes: stats.bytes,
                        streamed,
                    });
                    let _ = tx.send(Report::Counted { plan, rows });
                }
            }
        }
        tracing::debug!(worker = id, task = %what, ms = started.elapsed().as_millis() as u64, "copy task done");
    }
    progress.worker(id, "done");
    // Leave the snapshot transaction cleanly.
    let _ = source.batch_execute("COMMIT").await;
    Ok(())
}

fn chunk_error(table: &TableName, index: usize, err: &ChunkError) -> CopyError {
    let (side, source) = match err {
        ChunkError::Source { source, .. } => ("source", source),
        ChunkError::Target { source, .. } => ("target", source),
    };
    CopyError::Chunk {
        table: table.clone(),
        index,
        detail: format!("{side}: {}", describe(source)),
    }
}

/// A table's rows in the snapshot the worker's source connection holds.
async fn count_in_snapshot(source: &Client, table: &TableName) -> Result<i64, CopyError> {
    catalog::count_rows(source, table)
        .await
        .map_err(query("source", format!("counting {table} in the snapshot")))
}

/// CHECK and FOREIGN KEY constraints: checked row by row during a load,
/// cheaper to validate once after it.
const LOAD_CONSTRAINTS_SQL: &str = "
SELECT c.conname::text, pg_get_constraintdef(c.oid), NULL::text, NULL::text,
       rn.nspname::text, r.relname::text
  FROM pg_constraint c
  LEFT JOIN pg_class r ON r.oid = c.confrelid
  LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
 WHERE c.conrelid = $1::text::regclass AND c.contype IN ('c', 'f') AND c.conparentid = 0
 ORDER BY 1";

/// PRIMARY KEY and UNIQUE constraints: a B-tree built once by a sort after
/// the load costs a fraction of a million inserts into it. Kept: those a
/// foreign key still depends on (one from a table out of scope: the
/// in-scope ones are dropped first), the replica identity index (dropping
/// it would change what the table logs), and those inherited from a
/// partitioned parent (they go with the parent's).
const KEY_CONSTRAINTS_SQL: &str = "
SELECT c.conname::text, pg_get_constraintdef(c.oid),
       CASE WHEN t.relkind <> 'p' THEN pg_get_indexdef(c.conindid) END,
       CASE WHEN t.relkind <> 'p' THEN x.relname::text END,
       NULL::text, NULL::text
  FROM pg_constraint c JOIN pg_index i ON i.indexrelid = c.conindid
  JOIN pg_class t ON t.oid = c.conrelid JOIN pg_class x ON x.oid = c.conindid
 WHERE c.conrelid = $1::text::regclass AND c.contype IN ('p', 'u') AND c.conparentid = 0
   AND NOT i.indisreplident
   AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = c.conindid)
 ORDER BY 1";

/// Indexes not backing a constraint, other than the replica identity index,
/// the partitions of a partitioned index (dropped with their parent) and
/// the indexes of keys already recorded as dropped (`$2`: a key's index
/// built but not yet attached when the daemon stopped; dropped as such).
const SECONDARY_INDEXES_SQL: &str = "
SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), NULL::text, NULL::text,
       NULL::text, NULL::text
  FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
 WHERE i.indrelid = $1::text::regclass AND NOT i.indisprimary AND NOT i.indisreplident
   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
   AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
   AND NOT x.relname = ANY($2::text[])
 ORDER BY 1";

/// Adds the rows of `sql` not yet in `list`. Every query above returns
/// the same columns: name, definition, a key's index definition and index
/// name, and a foreign key's referenced table (schema, name).
async fn record_definitions(
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
async fn drop_load_constraints(
    target: &Client,
    record: &mut TableCopy,
    store: &Store,
) -> Result<(), CopyError> {
    record_definitions(
        target,
        LOAD_CONSTRAINTS_SQL,
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

async fn drop_constraint(target: &Client, table: &TableName, name: &str) -> Result<(), CopyError> {
    target
        .batch_execute(&format!(
            "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
            table.quoted(),
            quote_ident(name)
        ))
        .await
        .map_err(query("target", format!("dropping constraint {name}")))
}

/// Second step of `copy.drop_indexes`: drops the table's secondary indexes
/// and the primary key and unique constraints nothing else needs,
/// recorded first like the constraints. A key recorded by an earlier,
/// interrupted load whose index was built but not yet attached loses that
/// index again (it is rebuilt with the key, not as an index of its own).
async fn drop_indexes_and_keys(
    target: &Client,
    record: &mut TableCopy,
    store: &Store,
) -> Result<(), CopyError> {
    let table = record.name.quoted();
    record_definitions(
        target,
        KEY_CONSTRAINTS_SQL,
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
        SECONDARY_INDEXES_SQL,
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
            .batch_execute(&format!("DROP INDEX IF EXISTS {}", index.name))
            .await
            .map_err(query("target", format!("dropping index {}", index.name)))?;
    }
    for key in &record.dropped_keys {
        drop_constraint(target, &record.name, &key.name).await?;
        if let Some((_, index)) = &key.index {
            target
                .batch_execute(&format!(
                    "DROP INDEX IF EXISTS {}.{}",
                    quote_ident(&record.name.schema),
                    quote_ident(index)
                ))
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
async fn build_key_index(
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

async fn create_key_index(
    target: &Client,
    key: &DroppedIndex,
    definition: &str,
) -> Result<(), CopyError> {
    let build = definition.replacen(
        "CREATE UNIQUE INDEX ",
        "CREATE UNIQUE INDEX IF NOT EXISTS ",
        1,
    );
    target.batch_execute(&build).await.map_err(query(
        "target",
        format!("building the index of key {}", key.name),
    ))
}

/// Puts a key dropped for the load back: its unique index (unless
/// [`build_key_index`] built it already), then the constraint on it
/// (`USING INDEX`, no second build). Where that cannot be done (a
/// partitioned table, an index `USING INDEX` refuses) the constraint is
/// added as it was defined. Idempotent.
async fn rebuild_key(
    target: &Client,
    table: &TableName,
    key: &DroppedIndex,
) -> Result<(), CopyError> {
    if constraint_exists(target, table, &key.name).await? {
        return Ok(());
    }
    if let Some((definition, index)) = &key.index {
        create_key_index(target, key, definition).await?;
        let kind = if key.definition.starts_with("PRIMARY KEY") {
            "PRIMARY KEY"
        } else {
            "UNIQUE"
        };
        let deferral = if key.definition.contains("INITIALLY DEFERRED") {
            " DEFERRABLE INITIALLY DEFERRED"
        } else if key.definition.contains("DEFERRABLE") {
            " DEFERRABLE"
        } else {
            ""
        };
        let attach = format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {kind} USING INDEX {}{deferral}",
            table.quoted(),
            quote_ident(&key.name),
            quote_ident(index)
        );
        match target.batch_execute(&attach).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::debug!(key = %key.name, error = %describe(&err), "USING INDEX refused; adding the key as defined");
                target
                    .batch_execute(&format!(
                        "DROP INDEX IF EXISTS {}.{}",
                        quote_ident(&table.schema),
                        quote_ident(index)
                    ))
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
async fn rebuild_index(target: &Client, index: &DroppedIndex) -> Result<(), CopyError> {
    let sql = index
        .definition
        .replacen(" ON ONLY ", " ON ", 1)
        .replacen("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1)
        .replacen(
            "CREATE UNIQUE INDEX ",
            "CREATE UNIQUE INDEX IF NOT EXISTS ",
            1,
        );
    target
        .batch_execute(&sql)
        .await
        .map_err(query("target", format!("rebuilding index {}", index.name)))
}

/// Puts back, one after another, the keys, indexes and CHECK constraints
/// a crash left dropped on a table that is not copied again (the copy
/// itself rebuilds them as worker tasks).
async fn rebuild_indexes(target: &Client, record: &mut TableCopy) -> Result<(), CopyError> {
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

async fn constraint_exists(
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
async fn restore_constraint(
    target: &Client,
    table: &TableName,
    constraint: &DroppedIndex,
) -> Result<Option<Unvalidated>, CopyError> {
    let exists = constraint_exists(target, table, &constraint.name).await?;
    let validated = constraint.definition.starts_with("CHECK")
        || constraint.definition.starts_with("FOREIGN KEY");
    let was_valid = !constraint.definition.ends_with("NOT VALID");
    if !exists {
        let not_valid = if validated && was_valid {
            " NOT VALID"
        } else {
            ""
        };
        target
            .batch_execute(&format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {}{not_valid}",
                table.quoted(),
                quote_ident(&constraint.name),
                constraint.definition
            ))
            .await
            .map_err(query(
                "target",
                format!("adding back constraint {}", constraint.name),
            ))?;
    }
    if validated && was_valid {
        let validate = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            table.quoted(),
            quote_ident(&constraint.name)
        );
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
struct Unvalidated {
    statement: String,
    error: String,
}

/// The reconciliation table, as printed at the end of the copy.
pub fn reconciliation(tables: &[TableCopy]) -> String {
    let mut rows: BTreeMap<String, &TableCopy> = BTreeMap::new();
    for t in tables {
        rows.insert(t.name.to_string(), t);
    }
    let width = rows.keys().map(String::len).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>12}  {:>12}  {:>12}  {:>8}  {:>6}  {:>12}",
        "table", "source rows", "copied", "target rows", "variance", "chunks", "snapshot"
    );
    for (name, t) in rows {
        let show = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        let _ = writeln!(
            out,
            "{name:<width$}  {:>12}  {:>12}  {:>12}  {:>8}  {:>6}  {:>12}",
            show(t.source_count),
            t.rows_copied,
            show(t.target_count),
            show(t.variance()),
            t.chunks_total,
            t.copied_at.to_string()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(plan: usize, index: usize) -> Task {
        let table = TableName::new("public", format!("t{plan}"));
        Task::Chunk {
            plan,
            chunk: Chunk {
                table: table.clone(),
                source: table,
                first_page: 0,
                end_page: None,
                index,
                pages: 1,
            },
        }
    }

    fn taken(queue: &WorkQueue) -> (usize, usize) {
        match queue.take() {
            Some(Task::Chunk { plan, chunk }) => (plan, chunk.index),
            Some(_) => panic!("not a chunk"),
            None => panic!("the queue is empty"),
        }
    }

    #[test]
    fn workers_load_different_tables_and_share_one_only_when_nothing_else_is_left() {
        let queue = WorkQueue::new(VecDeque::from([
            chunk(0, 0),
            chunk(0, 1),
            chunk(0, 2),
            chunk(1, 0),
        ]));
        assert_eq!(taken(&queue), (0, 0));
        // Table 0 is being loaded: the next worker takes table 1.
        assert_eq!(taken(&queue), (1, 0));
        // Both tables busy: table 0's next chunk rather than nothing.
        assert_eq!(taken(&queue), (0, 1));
        queue.loaded(0);
        queue.loaded(1);
        queue.loaded(0);
        assert_eq!(taken(&queue), (0, 2));
        assert!(queue.take().is_none());
    }
}
