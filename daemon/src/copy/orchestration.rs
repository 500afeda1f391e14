//! The copy from start to end: the tables in scope and their plan, the
//! slot and its snapshot, the workers, and the outcome the stream starts
//! from; the checks that a table was not rewritten or emptied under it.

use std::collections::HashMap;

use cutover_replication::catalog::{self, Table, TableName};
use cutover_replication::client::{self, describe};
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::snapshot::{self, CopyFormat};
use cutover_replication::{Lsn, slot};
use std::sync::Arc;

use cutover_replication::mapping::Mapping;
use tokio_postgres::Client;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{CopyRun, Store, TableCopy, TableCopyState, now_secs};

use super::scheduler::copy_tables;
use super::source::{
    ensure_publications, install_ddl_capture, install_partition_triggers, publications,
};
use super::{CopyError, CopyMode, CopyOutcome};

pub(super) fn query(
    role: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    let what = what.into();
    move |err| CopyError::Query {
        role,
        what,
        detail: describe(&err),
        transient: super::lost_connection(&err),
    }
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

/// Rejected keys kept as samples in the reconciliation.
pub(crate) const SAMPLES: i64 = 5;

/// One table's copy plan: columns in order and the format.
#[derive(Debug, Clone)]
pub(super) struct TablePlan {
    pub(super) table: Table,
    pub(super) columns: Vec<String>,
    pub(super) format: CopyFormat,
    /// Written through this mapping (`[[map]]`) to another table.
    pub(super) mapping: Option<Arc<Mapping>>,
}

impl TablePlan {
    /// The table written on the target.
    pub(super) fn target_name(&self) -> &TableName {
        self.mapping
            .as_ref()
            .map_or(&self.table.name, |m| &m.target)
    }
}

pub(super) fn plan_tables(
    sources: &[Table],
    targets: &HashMap<TableName, Table>,
    mappings: &[Mapping],
) -> Result<Vec<TablePlan>, CopyError> {
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    for table in sources {
        if let Some(mapping) = mappings.iter().find(|m| m.source == table.name) {
            // Loaded through a temporary table typed as the source's
            // columns: text, which any such type reads.
            plans.push(TablePlan {
                table: table.clone(),
                columns: mapping
                    .source_names()
                    .iter()
                    .map(|c| (*c).to_owned())
                    .collect(),
                format: CopyFormat::Text,
                mapping: Some(Arc::new(mapping.clone())),
            });
            continue;
        }
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
            mapping: None,
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
    if config.target.is_none() {
        return super::feed::prepare(config, store).await;
    }
    let source = connect(&config.source.conninfo, "source").await?;
    let target = connect(&config.target()?.conninfo, "target").await?;
    let tables = tables_in_scope(&source, config).await?;
    let targets: HashMap<TableName, Table> = catalog::tables(&target)
        .await
        .map_err(query("target", "listing tables"))?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mappings = super::mappings(config, &source, &target).await?;
    let plans = plan_tables(&tables, &targets, &mappings)?;
    let names: Vec<TableName> = plans.iter().map(|p| p.target_name().clone()).collect();

    let mut run = store.copy_run()?;
    if let Some(existing) = &run
        && existing.finished
    {
        if existing.standalone && mode == CopyMode::BeforeStreaming {
            return Err(CopyError::StandaloneDone);
        }
        tracing::info!(slot = %existing.slot, "the copy is already done");
        let mut done = outcome(store, existing)?;
        // A load with nothing to stream: none of the streaming's objects
        // are there to read or install.
        if mode == CopyMode::Standalone {
            return Ok(done);
        }
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
            // A name of its own per attempt: the session of an attempt
            // that lost its network may hold its temporary slot until the
            // server notices.
            static ATTEMPT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let temp = format!(
                "cutover_resnap_{}_{}",
                std::process::id(),
                ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
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
                .map(|p| own_rows_on(&targets, p.target_name()))
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
            let (record, created) = new_slot(
                &source,
                &mut session,
                store,
                run.as_ref(),
                &slot_name,
                standalone,
                SnapshotAction::Export,
            )
            .await?;
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
    // The records of rows rejected by an earlier attempt go with its rows.
    for mapping in to_copy.iter().filter_map(|p| p.mapping.as_ref()) {
        if let Some(sql) = mapping.forget_all_sql() {
            target.batch_execute(&sql).await.map_err(query(
                "target",
                format!("emptying the rejected rows of {}", mapping.source),
            ))?;
        }
    }

    // Import the snapshot on every worker before the session does anything else.
    let worker_count = config.copy.workers.max(1);
    let mut sources = Vec::with_capacity(worker_count);
    let mut sinks = Vec::with_capacity(worker_count);
    for _ in 0..worker_count {
        let s = connect(&config.source.conninfo, "source").await?;
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
        let t = connect(&config.target()?.conninfo, "target").await?;
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
    let mapped: Vec<Arc<Mapping>> = to_copy.iter().filter_map(|p| p.mapping.clone()).collect();
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
    // What each mapping rejected, for the reconciliation.
    for mapping in &mapped {
        let rejected = cutover_replication::mapping::rejected(&target, mapping, SAMPLES)
            .await
            .map_err(query(
                "target",
                format!("reading the rows {} rejected", mapping.source),
            ))?;
        if !mapping.rejects.is_empty() {
            let reasons: Vec<String> = rejected
                .by_reason
                .iter()
                .map(|(reason, n)| format!("{reason}: {n}"))
                .collect();
            tracing::info!(table = %mapping.source, target = %mapping.target, rejected = rejected.total(),
                reasons = %reasons.join(", "), "copied through its mapping; rows rejected by reason are in cutover.rejected on the target");
        }
        if let Some(mut record) = store.table_copy(&mapping.source)? {
            record.target = Some(mapping.target.clone());
            record.rejected = (!mapping.rejects.is_empty()).then_some(rejected);
            store.put_table_copy(&record)?;
        }
    }

    let mut finished = run.clone();
    finished.finished = true;
    finished.finished_at = Some(now_secs());
    // In the target's own clock, which its commit times are read in
    // (a bidirectional group's guard counts the copy's rows as cutover's).
    finished.target_finished_us = target
        .query_one(
            "SELECT ((extract(epoch FROM clock_timestamp()) - 946684800) * 1000000)::bigint",
            &[],
        )
        .await
        .map_err(query("target", "reading its clock"))?
        .try_get(0)
        .map_err(query("target", "reading its clock"))?;
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
pub(super) async fn unrewritten(source: &Client, tables: &[&TableName]) -> Result<(), CopyError> {
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
pub(super) async fn rewritten_since_snapshot(
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
pub(super) async fn keep_unreferenced(
    target: &Client,
    mut done: Vec<TableName>,
    plans: &[TablePlan],
) -> Result<Vec<TableName>, CopyError> {
    let mut again: Vec<String> = plans
        .iter()
        .filter(|p| !done.contains(&p.table.name))
        .map(|p| p.target_name().quoted())
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
            // A mapped table is known on the target by the table it writes.
            .map(|written| {
                plans
                    .iter()
                    .find(|p| *p.target_name() == written)
                    .map_or(written, |p| p.table.name.clone())
            })
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
        again = moved
            .iter()
            .map(|t| {
                plans
                    .iter()
                    .find(|p| p.table.name == *t)
                    .map_or_else(|| t.quoted(), |p| p.target_name().quoted())
            })
            .collect();
    }
}

/// A connection to the server `role` names, its failure a copy error.
pub(super) async fn connect(
    conninfo: &cutover_replication::conninfo::ConnInfo,
    role: &'static str,
) -> Result<Client, CopyError> {
    client::connect(conninfo)
        .await
        .map_err(|source| CopyError::Connect { role, source })
}

/// Makes the slot `slot_name` (a persistent one dropped first when `run`
/// recorded it and an interrupted start left it unused; another's
/// refused), recording the run as begun before it exists and with its
/// consistent point after.
pub(super) async fn new_slot(
    source: &Client,
    session: &mut Session,
    store: &Store,
    run: Option<&CopyRun>,
    slot_name: &str,
    standalone: bool,
    action: SnapshotAction,
) -> Result<(CopyRun, cutover_replication::session::CreatedSlot), CopyError> {
    if !standalone
        && let Some(state) = slot::slot_state(source, slot_name)
            .await
            .map_err(query("source", "reading the slot"))?
    {
        // A slot recorded but without its consistent point: an
        // interrupted start before anything was copied; start over.
        match run {
            Some(r) if r.slot == slot_name && !state.active => {
                session
                    .drop_slot(slot_name, false)
                    .await
                    .map_err(|err| CopyError::Replication { err })?;
            }
            _ => return Err(CopyError::ForeignSlot(slot_name.to_owned())),
        }
    }
    let mut record = CopyRun {
        slot: slot_name.to_owned(),
        standalone,
        consistent_point: None,
        finished: false,
        started_at: now_secs(),
        finished_at: None,
        target_finished_us: None,
    };
    store.put_copy_run(&record)?;
    store.flush().await?;
    let created = session
        .create_slot(slot_name, standalone, action)
        .await
        .map_err(|err| CopyError::Replication { err })?;
    record.consistent_point = Some(created.consistent_point);
    Ok((record, created))
}

pub(super) fn outcome(store: &Store, run: &CopyRun) -> Result<CopyOutcome, CopyError> {
    let tables = store.table_copies()?;
    Ok(CopyOutcome {
        slot: run.slot.clone(),
        migration: run.slot.clone(),
        start: run.consistent_point.unwrap_or(Lsn::ZERO),
        copied_at: tables
            .iter()
            .map(|t| (t.name.clone(), t.copied_at))
            .collect(),
        tables,
        publications: Vec::new(),
    })
}

/// `ONLY "s"."t"`, or the table itself if it is partitioned on the target:
/// the table's own rows, without those of tables inheriting from it.
pub(super) fn own_rows_on(targets: &HashMap<TableName, Table>, table: &TableName) -> String {
    catalog::own_rows(table, targets.get(table).is_some_and(|t| t.partitioned))
}

pub(super) async fn check_empty(
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
