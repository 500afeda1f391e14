//! `cutover verify`: proves that the target holds exactly what the source
//! held at one source position, while the application keeps writing.
//!
//! # One position on both sides (docs/architecture.md invariant 10)
//!
//! 1. A temporary logical slot is created on the source with an exported
//!    snapshot: its consistent point `L` is the compared position, and the
//!    snapshot holds exactly the transactions that committed before `L`.
//!    Every source reader imports it before anything else happens.
//! 2. The target is brought to `L` and no further: the forward stream
//!    applies every transaction whose commit record is before `L` and
//!    stops at the first one after it ([`crate::run::catch_up`]).
//! 3. A target snapshot is taken there and shared by every target reader;
//!    the stream may go on from then on without changing what is compared.
//! 4. Each table is read on both sides, ordered by its key, and merged row
//!    by row ([`table`]); the result is a [`report::Report`].
//!
//! A change in flight can never show as a difference: both sides are read
//! in snapshots of the same position. With no daemon running, verify does
//! the catch-up itself (holding the state store, so that no daemon starts
//! meanwhile); beside a running daemon it holds the daemon's applier at
//! the position through the admin console ([`crate::hold`]) just long
//! enough to take the target's snapshot.
//!
//! # Layout
//!
//! This module only wires the parts together: [`continuous`] (the
//! background verifier inside the daemon), [`daemon`] (holding a
//! running daemon), [`table`] (one table read and compared),
//! [`integrity`] (orphans of foreign keys on the target), [`repair`]
//! (`--repair`) and [`report`] (what is shown and written).

use std::collections::HashMap;
use std::sync::Arc;

use cutover_conflict::repair::Fix;
use cutover_replication::catalog::{self, TableName};
use cutover_replication::client::{self, ConnectError, describe};
use cutover_replication::error::ReplicationError;
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::{Lsn, snapshot};
use tokio_postgres::Client;

use crate::config::Config;
use crate::copy::{self, CopyError};
use crate::direction::Direction;
use crate::live::Status;
use crate::run::{self, RunError};
use crate::store::{Store, StoreError};

mod beside;
pub mod continuous;
mod daemon;
mod integrity;
mod mapped;
mod progress;
mod repair;
mod report;
pub mod resync;
pub mod strays;
mod table;

pub use report::{Report, Verdict};

/// Where the validation report is written, in the state directory.
pub const REPORT_FILE: &str = "validation_report.json";

/// Why a verify could not finish. A difference found is not an error: it
/// is in the [`Report`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The config has no target (a Kafka feed alone).
    #[error(transparent)]
    NoTarget(#[from] crate::config::NoTarget),
    /// The state store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The running daemon could not be held at the compared position.
    #[error("the running daemon: {0}")]
    Daemon(String),
    /// `cutover run --resync` cannot start, or cannot make its slot.
    #[error("--resync: {0}")]
    Resync(String),
    /// The snapshot copy has not finished.
    #[error(
        "the snapshot copy has not finished (state.dir {0}): run `cutover run` until it streams, then verify"
    )]
    NotCopied(String),
    /// The target is primary: the source is no longer the reference.
    #[error(
        "the target is the primary since the switch: verify compares the target to the source as the source was, which the reverse stream now follows; `cutover rollback` makes the source primary again"
    )]
    Switched,
    /// `--group` names no group.
    #[error("there is no group {name:?}: the groups are {known}")]
    UnknownGroup {
        /// The name given.
        name: String,
        /// The groups configured, and `default`.
        known: String,
    },
    /// Two groups claim a table.
    #[error("{0}")]
    Groups(#[from] crate::config::TwoGroups),
    /// `--group` names a group with no table in scope.
    #[error("group {0:?} has no table in scope: see `cutover check` for the tables of each group")]
    EmptyGroup(String),
    /// A table in scope is missing on the target.
    #[error("table {0} is in scope but missing on the target: create it, or take it out of scope")]
    MissingTable(TableName),
    /// A connection failed.
    #[error("{role}: {source}")]
    Connect {
        /// `source` or `target`.
        role: &'static str,
        /// The error.
        source: ConnectError,
    },
    /// A query failed.
    #[error("{role}: {what}: {detail}")]
    Query {
        /// `source` or `target`.
        role: &'static str,
        /// What was being done.
        what: String,
        /// The server's message.
        detail: String,
    },
    /// The temporary slot could not be created.
    #[error("source: creating the verify's temporary slot: {0}")]
    Slot(#[from] ReplicationError),
    /// Bringing the target to the compared position failed.
    #[error("bringing the target to the compared position: {0}")]
    CatchUp(#[from] RunError),
    /// The copy's record of the tables could not be read.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// A table differs in more rows than a repair holds.
    #[error(
        "{table} differs in more than {limit} rows: too many to repair row by row; copy it again (empty it on the target and restart the copy) instead"
    )]
    TooManyToRepair {
        /// The table.
        table: String,
        /// The most rows one table's repair holds.
        limit: usize,
    },
    /// The repair's writes failed (nothing was written: one transaction).
    #[error("repairing the target (nothing was written): {0}")]
    Repair(String),
    /// The report could not be written.
    #[error("writing {path}: {detail}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
}

fn query(role: &'static str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let what = what.to_owned();
    move |err| VerifyError::Query {
        role,
        what,
        detail: describe(&err),
    }
}

async fn connect(config: &Config, role: &'static str) -> Result<Client, VerifyError> {
    let server = if role == "source" {
        &config.source
    } else {
        config.target()?
    };
    let client = client::connect(&server.conninfo)
        .await
        .map_err(|source| VerifyError::Connect { role, source })?;
    client
        .batch_execute(&client::text_value_settings())
        .await
        .map_err(query(role, "setting the session's date and number formats"))?;
    Ok(client)
}

/// How the target is brought to the compared position.
enum CatchUp {
    /// No daemon runs: the verify streams itself, holding the state store
    /// so that no daemon starts meanwhile.
    Own(Store),
    /// A daemon streams: it is held through its console.
    Daemon(Client),
}

/// The stray writes and conflicts recorded, for the report: from the
/// store, or through the running daemon's console.
async fn conflicts(catch_up: &CatchUp) -> Result<report::Conflicts, VerifyError> {
    let mut found = report::Conflicts::default();
    match catch_up {
        CatchUp::Own(store) => {
            for c in store.conflicts()? {
                found.add(c.id, &c.side, &c.table, &c.op, &c.key, &c.resolution);
            }
        }
        CatchUp::Daemon(console) => {
            let rows = crate::status::rows(console, "SHOW CONFLICTS")
                .await
                .map_err(VerifyError::Daemon)?;
            for row in &rows {
                let text = |name| crate::status::text(row, name).unwrap_or_default();
                found.add(
                    text("id").parse().unwrap_or(0),
                    &text("side"),
                    &text("table"),
                    &text("op"),
                    &text("key"),
                    &text("resolution"),
                );
            }
        }
    }
    Ok(found)
}

/// The tables in scope, planned for reading on both sides.
async fn plans(config: &Config, group: Option<&str>) -> Result<Vec<table::Plan>, VerifyError> {
    let source = connect(config, "source").await?;
    let target = connect(config, "target").await?;
    let mut tables = copy::tables_in_scope(&source, config).await?;
    if let Some(group) = group {
        let mut kept = Vec::with_capacity(tables.len());
        for table in tables {
            if config.groups.of(&table.name)? == group {
                kept.push(table);
            }
        }
        if kept.is_empty() {
            return Err(VerifyError::EmptyGroup(group.to_owned()));
        }
        tables = kept;
    }
    let targets = catalog::tables(&target)
        .await
        .map_err(query("target", "listing tables"))?;
    let mut plans = Vec::with_capacity(tables.len());
    for table in tables {
        // Compared through its mapping (`mapped`), not by name.
        if mapped::is_mapped(config, &table.name) {
            continue;
        }
        let Some(on_target) = targets.iter().find(|t| t.name == table.name) else {
            return Err(VerifyError::MissingTable(table.name));
        };
        plans.push(table::Plan::new(table.clone(), on_target));
    }
    Ok(plans)
}

/// A new compared position: a temporary slot's consistent point, and
/// `workers` source readers in its exported snapshot.
async fn source_position(
    config: &Config,
    workers: usize,
) -> Result<(Lsn, Vec<Client>), VerifyError> {
    let mut session = Session::connect(&config.source.conninfo).await?;
    // Unique per position: a temporary slot lives until its session's
    // backend has exited, which may be after the next one is created.
    static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let slot = format!("cutover_verify_{}_{n}", std::process::id());
    let created = session
        .create_slot(&slot, true, SnapshotAction::Export)
        .await?;
    let at = created.consistent_point;
    let sources = snapshot_readers(config, workers, &created.snapshot.unwrap_or_default()).await?;
    // Every source reader holds the snapshot: the temporary slot may go.
    drop(session);
    Ok((at, sources))
}

/// `workers` source readers in the exported snapshot `name` (valid while
/// the session that made it stays open).
async fn snapshot_readers(
    config: &Config,
    workers: usize,
    name: &str,
) -> Result<Vec<Client>, VerifyError> {
    let mut sources = Vec::with_capacity(workers);
    for _ in 0..workers {
        let client = connect(config, "source").await?;
        snapshot::open_snapshot(&client, name)
            .await
            .map_err(query("source", "importing the slot's snapshot"))?;
        sources.push(client);
    }
    Ok(sources)
}

/// How long a daemon stays held while the verify's slot is created. The
/// slot waits for the transactions open on the source; a long one would
/// keep the daemon's applier parked (and, where the daemon is a
/// synchronous standby of the source, would wait for commits that wait
/// for it).
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// [`source_position`] while a daemon is held: given up after
/// [`SLOT_WAIT`], with the reason.
async fn source_position_within(
    config: &Config,
    workers: usize,
) -> Result<(Lsn, Vec<Client>), VerifyError> {
    tokio::time::timeout(SLOT_WAIT, source_position(config, workers))
        .await
        .map_err(|_| {
            VerifyError::Daemon(format!(
                "the verify's slot waited over {SLOT_WAIT:?} for transactions open on the source, and the daemon was held meanwhile; it was released. End the long transaction (see pg_stat_activity) or stop the daemon and verify without it"
            ))
        })?
}

/// `workers` target readers in one snapshot of the target as it is now.
async fn target_readers(config: &Config, workers: usize) -> Result<Vec<Client>, VerifyError> {
    let mut targets = Vec::with_capacity(workers);
    let first = connect(config, "target").await?;
    first
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(query("target", "starting the verify's snapshot"))?;
    let exported: String = first
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(query("target", "exporting a snapshot"))?
        .get(0);
    targets.push(first);
    for _ in 1..workers {
        let client = connect(config, "target").await?;
        snapshot::open_snapshot(&client, &exported)
            .await
            .map_err(query("target", "importing the verify's snapshot"))?;
        targets.push(client);
    }
    Ok(targets)
}

/// Verifies every table in scope, with `repair` makes the differing target
/// rows equal to the source, and writes the report to the state directory.
pub async fn run(
    config: &Config,
    repair: bool,
    group: Option<&str>,
) -> Result<Report, VerifyError> {
    if let Some(name) = group
        && !config.groups.knows(name)
    {
        return Err(VerifyError::UnknownGroup {
            name: name.to_owned(),
            known: config.groups.names().join(", "),
        });
    }
    match Store::open(&config.state_dir) {
        Ok(store) => run_with_store(config, store, repair, group).await,
        Err(StoreError::Locked { .. }) => {
            let (console, moved) = daemon::connect(config).await?;
            compare(config, CatchUp::Daemon(console), repair, group, &moved).await
        }
        Err(err) => Err(err.into()),
    }
}

/// [`run()`] by a command that holds the state store already (`cutover
/// switch --verify`): no daemon runs.
pub async fn run_with_store(
    config: &Config,
    store: Store,
    repair: bool,
    group: Option<&str>,
) -> Result<Report, VerifyError> {
    let copied = store.copy_run()?.is_some_and(|r| r.finished);
    if !copied {
        return Err(VerifyError::NotCopied(
            config.state_dir.display().to_string(),
        ));
    }
    let state = store.switch_state()?;
    if state.primary != crate::switch::journal::Server::Source {
        return Err(VerifyError::Switched);
    }
    let moved: Vec<String> = state
        .moved_groups()
        .into_iter()
        .map(str::to_owned)
        .collect();
    compare(config, CatchUp::Own(store), repair, group, &moved).await
}

async fn compare(
    migration: &Config,
    catch_up: CatchUp,
    repair: bool,
    group: Option<&str>,
    moved: &[String],
) -> Result<Report, VerifyError> {
    // A group moved to the target is compared from its primary: the
    // target read as the source, the source as the target, the reverse
    // stream held or caught up, the source repaired.
    let reverse = group.is_some_and(|g| moved.iter().any(|m| m == g));
    let swapped;
    let config = if reverse {
        swapped = migration.for_direction(Direction::Reverse);
        &swapped
    } else {
        migration
    };
    let mut plans = plans(config, group).await?;
    let mut mapped_tables = {
        let source = connect(config, "source").await?;
        let tables = copy::tables_in_scope(&source, config).await?;
        mapped::mapped_tables(config, &tables).await?
    };
    if let Some(group) = group {
        mapped_tables.retain(|(m, _)| config.groups.group_of(&m.source) == group);
    }
    // A moved group's rows are the target's: a verify of every table
    // compares the target to the source, and would repair the primary's
    // rows.
    if !moved.is_empty() && group.is_none() {
        plans.retain(|p| {
            let of = config.groups.group_of(&p.table().name);
            !moved.iter().any(|m| m == of)
        });
        tracing::warn!(groups = %moved.join(", "), "not compared: their primary is the target (switch --group)");
    }
    let workers = config.verify.workers.min(plans.len()).max(1);

    // A running daemon applies nothing new from here: all it applied
    // committed before the position about to be taken.
    if let CatchUp::Daemon(console) = &catch_up {
        let parked = daemon::arm(console, reverse).await?;
        tracing::info!(applied = %parked, "the daemon holds while the compared position is taken");
    }

    // 1. The compared position, and the source's snapshot of it (not for
    // long while a daemon is held).
    let (at, sources) = match &catch_up {
        CatchUp::Own(_) => source_position(config, workers).await?,
        CatchUp::Daemon(_) => source_position_within(config, workers).await?,
    };
    tracing::info!(lsn = %at, tables = plans.len(), "comparing both sides as of this source position");

    // 2. The target at exactly that position.
    match &catch_up {
        CatchUp::Own(store) if reverse => {
            let status = Arc::new(Status::new(&config.slot, Direction::Reverse));
            let plan =
                run::stream_plan(migration, store, Direction::Reverse, &status.metrics).await?;
            run::drain(config, store, &status, &plan, at).await?;
        }
        CatchUp::Own(store) => {
            let status = Arc::new(Status::new(&config.slot, Direction::Forward));
            run::catch_up(config, store, &status, at).await?;
        }
        CatchUp::Daemon(console) => {
            let reached = daemon::hold_at(console, at, reverse).await?;
            tracing::info!(%reached, "the daemon holds at the compared position");
        }
    }

    // 3. The target's snapshot there, shared by every target reader.
    let targets = target_readers(config, workers).await?;
    // The target readers hold the snapshot: the daemon may go on.
    if let CatchUp::Daemon(console) = &catch_up {
        daemon::release(console, reverse).await?;
    }

    // 4. Foreign keys on the target, then every table, `workers` at a
    // time.
    let names: Vec<TableName> = plans
        .iter()
        .map(|p| p.table().name.clone())
        .chain(mapped_tables.iter().map(|(m, _)| m.target.clone()))
        .collect();
    let integrity = integrity::check(&targets[0], &names).await?;
    // Mapped tables, one after the other, on the first source reader
    // (before the others start: a reader runs one statement at a time).
    let mut mapped_reports = Vec::with_capacity(mapped_tables.len());
    if !mapped_tables.is_empty() {
        let exported: String = targets[0]
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(query("target", "exporting the verify's snapshot"))?
            .get(0);
        for (mapping, table) in &mapped_tables {
            mapped_reports
                .push(mapped::compare(config, mapping, table, &sources[0], &exported, at).await?);
        }
    }
    // A repair writes what this run found: it starts afresh.
    let progress = Arc::new(progress::ProgressFile::open(&config.state_dir, repair)?);
    let compared = compare_all(
        plans,
        sources,
        targets,
        config,
        repair,
        at,
        Arc::clone(&progress),
    )
    .await?;

    // 5. The repair, where asked: at the compared position with no
    // daemon; beside one, at a fresh position it is held at.
    let mut repaired = HashMap::new();
    let mut repaired_at = None;
    let work: Vec<(&table::Plan, Vec<Fix>)> = compared
        .iter()
        .map(|(plan, _, fixes)| (plan, fixes.clone()))
        .filter(|(_, fixes)| !fixes.is_empty())
        .collect();
    if repair {
        match &catch_up {
            CatchUp::Own(_) if reverse => {
                // In the reverse stream's origin, which it drained to `at`.
                let origin = Direction::Reverse.origin(&migration.slot);
                repaired = repair::repair(config, &origin, HashMap::new(), at, &work).await?;
                repaired_at = Some(at);
            }
            CatchUp::Own(store) => {
                let copied_at = store
                    .table_copies()?
                    .into_iter()
                    .map(|t| (t.name, t.copied_at))
                    .collect();
                let origin = Direction::Forward.origin(&config.slot);
                repaired = repair::repair(config, &origin, copied_at, at, &work).await?;
                repaired_at = Some(at);
            }
            CatchUp::Daemon(_) if work.is_empty() => repaired_at = Some(at),
            CatchUp::Daemon(console) => {
                let holder = daemon::Holder::Console(console, reverse);
                let done = beside::repair(config, &holder, &work).await?;
                repaired = done.rows;
                repaired_at = Some(done.at);
            }
        }
    }
    let reports = compared
        .into_iter()
        .map(|(plan, mut report, _)| {
            if let Some(rows) = repaired.remove(&plan.table().name.to_string()) {
                report.repaired = rows;
            }
            report
        })
        .chain(mapped_reports)
        .collect();
    let date = crate::console::timestamp(crate::store::now_secs());
    let mut report = Report::new(
        config.slot.clone(),
        date,
        at,
        reports,
        integrity,
        repaired_at,
    );
    report.group = group.map(str::to_owned);
    if reverse {
        report.compared_from = Some("target");
    }
    if group.is_none() {
        report.groups_not_compared = moved.to_vec();
    }
    if !config.groups.is_empty() {
        report.conflicts = Some(conflicts(&catch_up).await?);
    }
    // What this verify found replaces what the daemon's background
    // verifier last recorded (after a repair: nothing left to show).
    if let CatchUp::Own(store) = &catch_up {
        record_divergence(store, config, &report)?;
    }
    let path = config.state_dir.join(REPORT_FILE);
    let json = serde_json::to_vec_pretty(&report).map_err(|e| VerifyError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    std::fs::write(&path, json).map_err(|e| VerifyError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    if let Ok(progress) = Arc::try_unwrap(progress) {
        progress.finish();
    }
    Ok(report)
}

impl VerifyError {
    /// Whether trying again later may succeed: a lost connection, a query
    /// that failed, the daemon's applier held by another.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            VerifyError::Daemon(_)
                | VerifyError::Connect { .. }
                | VerifyError::Query { .. }
                | VerifyError::Repair(_)
        )
    }
}

/// Records each table's result where the background verifier keeps its
/// own, and forgets tables no longer in scope.
fn record_divergence(store: &Store, config: &Config, report: &Report) -> Result<(), VerifyError> {
    // A table that left the scope has no divergence any more; a verify of
    // one group says nothing of the others'.
    let compared = |table: &str| match &report.group {
        None => true,
        Some(group) => table.split_once('.').is_some_and(|(schema, name)| {
            config.groups.of(&TableName::new(schema, name)).ok() == Some(group.as_str())
        }),
    };
    for (table, _) in store.divergences()? {
        if compared(&table) && !report.tables.iter().any(|t| t.table == table) {
            store.remove_divergence(&table)?;
        }
    }
    for t in &report.tables {
        let divergence = crate::live::Divergence {
            rows_checked: t.source_rows,
            divergent_rows: t.differing().saturating_sub(t.repaired.len() as u64),
            compared_at: t.compared_at.last().copied(),
            checked_at: crate::store::now_secs(),
            samples: Vec::new(),
        };
        store.put_divergence(&t.table, &divergence)?;
    }
    Ok(())
}

/// Compares `plans` on pairs of readers, one table per pair at a time;
/// with `repair`, keeps the fix of every difference.
async fn compare_all(
    plans: Vec<table::Plan>,
    sources: Vec<Client>,
    targets: Vec<Client>,
    config: &Config,
    repair: bool,
    at: Lsn,
    progress: Arc<progress::ProgressFile>,
) -> Result<Vec<(table::Plan, report::TableReport, Vec<Fix>)>, VerifyError> {
    let pacer = Arc::new(table::Pacer::new(config.verify.rate));
    let samples = config.verify.samples;
    let plans = Arc::new(std::sync::Mutex::new(plans));
    let mut tasks = tokio::task::JoinSet::new();
    for (source, target) in sources.into_iter().zip(targets) {
        let plans = Arc::clone(&plans);
        let progress = Arc::clone(&progress);
        let pacer = Arc::clone(&pacer);
        tasks.spawn(async move {
            let reading = table::Reading {
                samples,
                repair,
                at,
                progress: Some(&progress),
                pacer: &pacer,
            };
            let mut reports = Vec::new();
            loop {
                let plan = plans.lock().ok().and_then(|mut p| p.pop());
                let Some(plan) = plan else {
                    return Ok::<_, VerifyError>(reports);
                };
                let (report, fixes) = table::compare(&plan, &source, &target, &reading).await?;
                reports.push((plan, report, fixes));
            }
        });
    }
    let mut reports = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let worker = done.map_err(|e| VerifyError::Query {
            role: "target",
            what: "a verify worker".into(),
            detail: e.to_string(),
        })?;
        reports.extend(worker?);
    }
    Ok(reports)
}
