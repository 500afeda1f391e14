//! The snapshot copy: the initial bulk load, exact and resumable.
//!
//! # The seam
//!
//! The publication is made (or completed) first, then the slot is created
//! with an exported snapshot, and every copy worker imports that snapshot
//! before the exporting session runs another command. The copy then holds
//! exactly the transactions that committed before the slot's consistent
//! point; the stream carries every later one (docs/architecture.md invariant 4).
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
//!
//! # Layout
//!
//! This module only wires the parts together and holds the types the rest
//! of the daemon uses; the work is in its children: [`orchestration`]
//! (the copy from start to end), [`source`] (what is set up on the
//! source), [`scheduler`] (which worker loads what), [`worker`] (one
//! worker), [`rebuild`] (dropping and rebuilding indexes and constraints),
//! [`statements`] (the SQL of those drops and rebuilds) and [`report`]
//! (the reconciliation table).

use std::collections::HashMap;

use cutover_replication::catalog::TableName;
use cutover_replication::client::ConnectError;
use cutover_replication::error::ReplicationError;
use cutover_replication::{Lsn, slot};

use crate::store::{StoreError, TableCopy};

mod feed;
mod orchestration;
mod rebuild;
mod report;
mod scheduler;
mod source;
mod statements;
mod worker;

pub use orchestration::{run, tables_in_scope};
pub use report::reconciliation;
pub use source::{ensure_publications, install_partition_triggers, publications};

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
    /// The config has no target (a Kafka feed alone).
    #[error(transparent)]
    NoTarget(#[from] crate::config::NoTarget),
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
        /// The connection was lost (or the server is restarting): trying
        /// again may succeed.
        transient: bool,
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
        /// The connection was lost (or the server is restarting): trying
        /// again may succeed.
        transient: bool,
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
    /// A `[[map]]` cannot work against these servers.
    #[error("{0}")]
    Mapping(#[from] cutover_replication::mapping::MappingError),
    /// No table is in scope.
    #[error("source: no table is in scope (replication.tables = {0:?}); run cutover check")]
    NoTables(Vec<String>),
}

/// Whether a statement of the copy failed because its connection was
/// lost (closed, reset, timed out by TCP), its server is shutting down or
/// has no connection to spare yet: the copy starts again after a wait.
/// Not a cancel (57014: a `statement_timeout` would cancel every attempt
/// again), not a dropped database (57P04), not a refusal, not a reply
/// cutover could not read.
pub(crate) fn lost_connection(err: &tokio_postgres::Error) -> bool {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        return code != "57014"
            && code != "57P04"
            && (code.starts_with("08") || code.starts_with("57") || code == "53300");
    }
    err.is_closed()
        || std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                !matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                )
            })
}

impl CopyError {
    /// Whether the copy may succeed when started again after a wait: a
    /// server that did not answer, a connection lost to the network or
    /// to a restart. Never a refusal (a full disk, a constraint) or a
    /// state to fix.
    pub fn is_transient(&self) -> bool {
        match self {
            CopyError::Connect { source, .. } => source.failure.is_transient(),
            CopyError::Replication { err } => err.is_transient(),
            CopyError::Query { transient, .. } | CopyError::Chunk { transient, .. } => *transient,
            _ => false,
        }
    }

    /// Whether the target failed (rather than the source).
    pub fn on_target(&self) -> bool {
        match self {
            CopyError::Connect { role, .. } | CopyError::Query { role, .. } => *role == "target",
            CopyError::Chunk { detail, .. } => detail.starts_with("target"),
            _ => false,
        }
    }
}

/// The config's `[[map]]`s checked against `source` (read) and `target`
/// (written), and `cutover.rejected` made on the target when one of them
/// can reject a row. `config` is the direction's (for the reverse: the
/// inverses, the servers swapped).
pub async fn mappings(
    config: &crate::config::Config,
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
) -> Result<Vec<cutover_replication::mapping::Mapping>, CopyError> {
    if config.mappings.is_empty() {
        return Ok(Vec::new());
    }
    let in_scope: Vec<cutover_replication::catalog::TableName> =
        cutover_replication::catalog::tables(source)
            .await
            .map_err(orchestration::query("source", "listing tables"))?
            .into_iter()
            .map(|t| t.name)
            .filter(|name| config.scope.contains(name))
            .collect();
    if let Some((index, table)) =
        crate::config::maps::written_twice(&config.mappings, |t| in_scope.contains(t))
    {
        return Err(CopyError::Mapping(
            cutover_replication::mapping::MappingError {
                key: format!("map[{index}].target"),
                message: format!(
                    "{table} is also a table in scope on the source, copied under its own name: both would write it; take it out of scope (replication.exclude) or map to another table"
                ),
            },
        ));
    }
    let mappings = cutover_replication::mapping::resolve_all(&config.mappings, source, target)
        .await
        .map_err(orchestration::query("target", "checking the [[map]]s"))??;
    for mapping in &mappings {
        if !config.scope.contains(&mapping.source) {
            return Err(CopyError::Mapping(
                cutover_replication::mapping::MappingError {
                    key: format!("map[{}].source", mapping.index),
                    message: format!(
                        "{} is not in scope (replication.tables and exclude): a mapping reads a table in scope",
                        mapping.source
                    ),
                },
            ));
        }
    }
    if mappings.iter().any(|m| !m.rejects.is_empty()) {
        cutover_replication::mapping::ensure_rejected(target)
            .await
            .map_err(orchestration::query("target", "creating cutover.rejected"))?;
    }
    Ok(mappings)
}

/// What the copy leaves for the stream.
#[derive(Debug, Clone)]
pub struct CopyOutcome {
    /// The slot to stream from.
    pub slot: String,
    /// The name the migration's replication origins are made from: the
    /// copy's slot (a switch's slots are named after it).
    pub migration: String,
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
