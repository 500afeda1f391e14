//! The PostgreSQL sink: source transactions applied to a PostgreSQL
//! server (the target going forward, the old source in reverse).
//!
//! This module only wires the parts together; the work is in its children:
//!
//! - [`transaction`]: batches of source transactions in one target
//!   transaction, the spilled path, the per-table seam and skipped origins;
//! - [`batch`]: the set-based path: coalesced rows, one statement per
//!   table and operation, sent pipelined;
//! - [`one`]: one change, one statement: the slow path and barriers;
//! - [`coalesce`]: merging a batch's changes per row key (pure);
//! - [`statements`]: the SQL of every statement (pure);
//! - [`pipeline`]: requests sent together and answered in order, and the
//!   `text[]` parameters that carry a column of many rows (pure);
//! - [`target`]: what the sink knows of the target's tables, and its
//!   prepared statements;
//! - [`keys`]: the check of `DEFERRABLE` keys after a batch;
//! - [`ddl`]: the source's DDL and partition truncates;
//! - [`guard`]: tables both servers write, applied only when later;
//! - [`durability`]: when an applied position is durable;
//! - [`error`]: why applying stopped.
//!
//! Progress rules (docs/architecture.md invariants 1 to 3), which everything
//! here serves:
//!
//! - **Written with the rows.** Each target transaction ends with
//!   `pg_replication_origin_xact_setup(end_lsn, commit_time)` of the last
//!   source transaction it contains, so the applied position commits
//!   atomically with the rows. On start, [`Sink::applied`] is read
//!   from the origin, and transactions ending at or before it are skipped.
//! - **Commit order.** Source transactions are applied in the order given.
//!   Several consecutive transactions may share one target transaction;
//!   their changes are coalesced per row key, which gives the same end
//!   state as applying them one by one (the last write of a key wins; a
//!   delete then insert of a key ends inserted).
//! - **Durable before acknowledged.** Target transactions commit with
//!   `synchronous_commit = off` (as PostgreSQL's own apply workers do): a
//!   batch does not wait for its WAL flush. [`Sink::durable`] is the
//!   position of the last batch whose commit record the target has
//!   flushed (`pg_current_wal_flush_lsn()`), and only that is acknowledged
//!   to the source. A target crash loses the unflushed tail and the
//!   origin's progress with it, atomically; the source still holds it.
//! - **Nothing skipped.** A change the target refuses stops with an error
//!   naming the table, the key, the LSN and the SQLSTATE. When a set-based
//!   statement fails, the batch is rolled back and replayed one change at a
//!   time, in order, to find the culprit (or to succeed, when only the
//!   order of rows within a statement mattered, as with a swapped unique
//!   value).
//! - **Unchanged TOAST** columns are never written: such rows are updated
//!   with only the columns that were sent.
//! - **Per-table seam.** A change to a table that committed before the
//!   table's `copied_at` is already in its copy and is skipped.
//! - **Routing.** With a [`Route`] (table groups, one primary each), a
//!   change to a table whose primary at its commit is not the server read
//!   is not applied: it is a stray write, which the caller finds with
//!   [`PostgresSink::routed_away`] and resolves by its policy.
//!
//! The session runs with `session_replication_role = replica`, so user
//! triggers and foreign keys do not fire on replicated rows, and with the
//! same `DateStyle`, `TimeZone` and `extra_float_digits` as the source's
//! walsender, so text values compare and convert exactly.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use tokio_postgres::{Client, Statement};

use crate::catalog::TableName;
use crate::change::{Change, Commit, SourceTransaction};
use crate::conninfo::ConnInfo;
use crate::lsn::Lsn;
use crate::sink::Sink;
pub use crate::sink::filter::{Filter, Route, RouteFn};

mod batch;
mod coalesce;
mod ddl;
mod durability;
mod error;
mod guard;
mod keys;
mod mapped;
mod one;
mod pipeline;
mod statements;
mod target;
mod transaction;

use error::session_error;
pub use error::{ApplyError, is_transient_error, resource_hint};
pub use guard::{Guard, GuardedFn, Kept, RecordFn};
use target::TargetTable;

/// Applies source transactions on one target connection.
#[derive(Debug)]
pub struct PostgresSink {
    client: Client,
    origin: String,
    progress: Lsn,
    tables: HashMap<TableName, Arc<TargetTable>>,
    statements: HashMap<String, Statement>,
    /// Which changes are applied (origins, seams, route).
    filter: Filter,
    /// Committed batches whose commit record may not be flushed yet: the
    /// target's WAL position after the commit, and the source position.
    unflushed: VecDeque<(Lsn, Lsn)>,
    /// Since when the flush position has not moved while batches wait.
    stalled_since: Option<std::time::Instant>,
    /// The source position of the last batch known flushed on the target.
    durable: Lsn,
    /// A transaction is opened but its BEGIN not sent yet: it goes out in
    /// the same round trip as the batch's first statements.
    begin_pending: bool,
    /// What to do with DDL on the source.
    ddl: crate::ddl::DdlPolicy,
    /// The tables both servers write ([`guard`]).
    guard: Option<guard::Guard>,
    /// Changes the guard left out, for the caller.
    kept: Vec<guard::Kept>,
    /// The commit time of each transaction of the batch being applied
    /// (microseconds since 2000-01-01), for the guard.
    commit_times: HashMap<Lsn, i64>,
    /// Tables written through a field mapping, by the name of the table
    /// read ([`mapped`]).
    mappings: HashMap<TableName, Arc<crate::mapping::Mapping>>,
    /// The source's column types of each mapped table, with the
    /// description they were read for.
    mapped_types: HashMap<TableName, (Arc<crate::change::Relation>, Arc<Vec<String>>)>,
}

/// How long [`PostgresSink::connect`] waits for the replication origin
/// an ended session's backend still holds, and how often it looks.
const ORIGIN_IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const ORIGIN_IN_USE_STEP: std::time::Duration = std::time::Duration::from_millis(200);

impl PostgresSink {
    /// Connects, prepares the session, and reads the applied position from
    /// the replication origin `origin` (created when missing).
    pub async fn connect(
        target: &ConnInfo,
        origin: &str,
        copied_at: HashMap<TableName, Lsn>,
        skip_origins: Vec<String>,
    ) -> Result<PostgresSink, ApplyError> {
        let client = crate::client::connect(target).await?;
        client
            .batch_execute(&format!(
                "SET session_replication_role = replica; SET synchronous_commit = off; {}",
                crate::client::text_value_settings()
            ))
            .await
            .map_err(session_error("preparing the apply session (session_replication_role = replica needs superuser or GRANT SET ON PARAMETER)"))?;
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await
            .map_err(session_error("reading replication origins"))?
            .is_some();
        if !exists {
            client
                .execute("SELECT pg_replication_origin_create($1)", &[&origin])
                .await
                .map_err(session_error(format!(
                    "creating replication origin {origin}"
                )))?;
        }
        // The backend of a session that just ended (a daemon stopped, a
        // connection cut) holds the origin until it has exited: wait for
        // it a little (55006, object in use) rather than fail a command
        // run right after.
        let mut waited = std::time::Duration::ZERO;
        loop {
            match client
                .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
                .await
            {
                Ok(_) => break,
                Err(err)
                    if err.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                        && waited < ORIGIN_IN_USE_WAIT =>
                {
                    tokio::time::sleep(ORIGIN_IN_USE_STEP).await;
                    waited += ORIGIN_IN_USE_STEP;
                }
                Err(err) => {
                    return Err(session_error(format!("using replication origin {origin}"))(
                        err,
                    ));
                }
            }
        }
        let progress: Option<String> = client
            .query_one(
                "SELECT pg_replication_origin_progress($1, true)::text",
                &[&origin],
            )
            .await
            .map_err(session_error("reading the applied position"))?
            .get(0);
        let progress = progress.and_then(|p| p.parse().ok()).unwrap_or(Lsn::ZERO);
        tracing::info!(origin, %progress, "apply session ready");
        let applier = PostgresSink {
            client,
            origin: origin.to_owned(),
            progress,
            tables: HashMap::new(),
            statements: HashMap::new(),
            filter: Filter::new(copied_at, skip_origins),
            // The progress just read may be an asynchronous commit of an
            // earlier run, not flushed yet: durable only once it is.
            unflushed: VecDeque::from([(Lsn::from_u64(u64::MAX), progress)]),
            stalled_since: None,
            durable: Lsn::default(),
            begin_pending: false,
            ddl: crate::ddl::DdlPolicy::default(),
            guard: None,
            kept: Vec::new(),
            commit_times: HashMap::new(),
            mappings: HashMap::new(),
            mapped_types: HashMap::new(),
        };
        applier.settled().await
    }

    /// Sets what the applier does with DDL on the source (`[ddl] policy`).
    pub fn set_ddl_policy(&mut self, policy: crate::ddl::DdlPolicy) {
        self.ddl = policy;
    }

    /// Writes the tables these mappings read through them (`[[map]]`),
    /// and the others as they are.
    pub fn set_mappings(&mut self, mappings: Vec<crate::mapping::Mapping>) {
        self.mappings = mappings
            .into_iter()
            .map(|m| (m.source.clone(), Arc::new(m)))
            .collect();
    }

    /// Applies only the changes `route` takes; the others are left to the
    /// caller ([`PostgresSink::routed_away`]).
    pub fn set_route(&mut self, route: Route) {
        self.filter.set_route(route);
    }

    /// Which changes this sink applies: what a sink beside it (the Kafka
    /// feed) writes too.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Whether a change to `table` committed at `commit_lsn` is applied by
    /// the table's seam (`copied_at`) and the route.
    pub(super) fn takes(&self, table: &TableName, commit_lsn: Lsn) -> bool {
        self.filter.takes(table, commit_lsn)
    }

    /// The tables of `change` that the route alone keeps from being
    /// applied: a change an application made (not one of the skipped
    /// origins) to a table whose primary is the other server. Empty when
    /// the change is applied, or skipped for another reason.
    pub fn routed_away<'c>(&self, change: &'c Change, commit_lsn: Lsn) -> Vec<&'c TableName> {
        self.filter.routed_away(change, commit_lsn)
    }

    /// The replication origin tagging applied transactions.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl Sink for PostgresSink {
    type Error = ApplyError;

    fn apply(
        &mut self,
        transactions: &[SourceTransaction],
    ) -> impl Future<Output = Result<Lsn, ApplyError>> + Send {
        self.apply_batch(transactions)
    }

    fn apply_spilled(
        &mut self,
        path: &Path,
        commit: &Commit,
        batch_rows: usize,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send {
        PostgresSink::apply_spilled(self, path, commit, batch_rows)
    }

    fn wanted(&self, change: &crate::change::Change, commit_lsn: Lsn) -> bool {
        PostgresSink::wanted(self, change, commit_lsn)
    }

    fn applied(&self) -> Lsn {
        self.progress
    }

    fn durable(&self) -> Lsn {
        self.durable
    }

    fn flush_pending(&self) -> bool {
        !self.unflushed.is_empty()
    }

    fn refresh_durable(&mut self) -> impl Future<Output = Result<Lsn, ApplyError>> + Send {
        PostgresSink::refresh_durable(self)
    }

    fn wait_durable(&mut self) -> impl Future<Output = Result<Lsn, ApplyError>> + Send {
        PostgresSink::wait_durable(self)
    }
}
