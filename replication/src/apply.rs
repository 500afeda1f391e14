//! Applying source transactions to the target.
//!
//! Progress rules (DESIGN.md invariants 1 to 3), which everything here
//! serves:
//!
//! - **Written with the rows.** Each target transaction ends with
//!   `pg_replication_origin_xact_setup(end_lsn, commit_time)` of the last
//!   source transaction it contains, so the applied position commits
//!   atomically with the rows. On start, [`Applier::progress`] is read from
//!   the origin, and transactions ending at or before it are skipped.
//! - **Commit order.** Source transactions are applied in the order given.
//!   Several consecutive transactions may share one target transaction;
//!   their changes are coalesced per row key, which gives the same end
//!   state as applying them one by one (the last write of a key wins; a
//!   delete then insert of a key ends inserted).
//! - **Durable before acknowledged.** Target transactions commit with
//!   `synchronous_commit = off` (as PostgreSQL's own apply workers do): a
//!   batch does not wait for its WAL flush. [`Applier::durable`] is the
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
//!
//! The session runs with `session_replication_role = replica`, so user
//! triggers and foreign keys do not fire on replicated rows, and with the
//! same `DateStyle`, `TimeZone` and `extra_float_digits` as the source's
//! walsender, so text values compare and convert exactly.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::types::ArrayDimension;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Statement};

use crate::catalog::{TableName, quote_ident};
use crate::client::{ConnectError, describe};
use crate::conninfo::ConnInfo;
use crate::lsn::Lsn;
use crate::pgoutput::{Change, ChangeKind, Datum, PgTimestamp, Relation, Tuple};

/// A committed source transaction, ready to apply.
#[derive(Debug, Clone)]
pub struct SourceTransaction {
    /// Transaction id on the source.
    pub xid: u32,
    /// Its commit record's LSN.
    pub commit_lsn: Lsn,
    /// The end of its commit record: the position recorded once applied.
    pub end_lsn: Lsn,
    /// When it committed on the source.
    pub commit_time: PgTimestamp,
    /// Its changes, in order.
    pub changes: Vec<Change>,
}

/// Why applying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Could not connect to the target.
    #[error("target: {0}")]
    Connect(#[from] ConnectError),
    /// The target refused a change.
    #[error(
        "target refused {op} on {table} key {key} at source LSN {lsn}: {detail} (SQLSTATE {sqlstate})"
    )]
    Refused {
        /// insert, update, delete, truncate.
        op: &'static str,
        /// The table.
        table: TableName,
        /// The row's key (or whole old row), as `col=value` pairs.
        key: String,
        /// The change's position on the source.
        lsn: Lsn,
        /// The server's message.
        detail: String,
        /// The SQLSTATE.
        sqlstate: String,
    },
    /// A row to update was not on the target: it diverged.
    #[error(
        "target: {op} on {table} found no row for key {key} (source LSN {lsn}): the target diverged from the source; run cutover verify"
    )]
    RowMissing {
        /// update or delete.
        op: &'static str,
        /// The table.
        table: TableName,
        /// The key.
        key: String,
        /// The change's position.
        lsn: Lsn,
    },
    /// After a batch, the target holds two rows under one `DEFERRABLE`
    /// key: it had a row the source does not.
    #[error(
        "target: {table} holds more than one row with {key} after the source's changes up to LSN {lsn}: \
         the target has a row the source does not (it diverged); PostgreSQL does not check a DEFERRABLE key \
         for cutover's apply session, so cutover checked it and rolled the batch back: run cutover verify \
         to find the difference, repair it on the target, and restart"
    )]
    DuplicateKey {
        /// The table.
        table: TableName,
        /// The key's columns and values, `(a, b)=(1, x)`.
        key: String,
        /// The last change of the batch.
        lsn: Lsn,
    },
    /// DDL on the source that the target does not follow (see
    /// [`crate::ddl`]).
    #[error("source DDL at LSN {lsn} on {table} ({statement}): {problem}; fix: {fix}")]
    Ddl {
        /// The table.
        table: TableName,
        /// Where the statement is in the stream.
        lsn: Lsn,
        /// The statement as the source's client sent it.
        statement: String,
        /// What the target lacks, or what was destroyed.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// The target lacks a table or column the source sends.
    #[error("target: {0}")]
    Schema(String),
    /// A statement outside a specific change failed.
    #[error("target: {what}: {detail}")]
    Session {
        /// What was being done.
        what: String,
        /// The error.
        detail: String,
        /// Whether retrying may help (connection lost, server restarting).
        transient: bool,
    },
}

impl ApplyError {
    /// Whether reconnecting and retrying may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Connect(err) => err.failure.is_transient(),
            ApplyError::Session { transient, .. } => *transient,
            ApplyError::Refused { sqlstate, .. } => is_transient_sqlstate(sqlstate),
            ApplyError::RowMissing { .. }
            | ApplyError::DuplicateKey { .. }
            | ApplyError::Ddl { .. }
            | ApplyError::Schema(_) => false,
        }
    }

    /// Whether the target may have refused because its tables changed
    /// since the applier described them (a column widened, added or
    /// dropped by an operator): a data exception (class 22), a syntax or
    /// access rule (class 42, such as a type mismatch or a missing
    /// column), or a statement the target would not prepare.
    pub fn may_be_stale_description(&self) -> bool {
        match self {
            ApplyError::Refused { sqlstate, .. } => {
                sqlstate.starts_with("22") || sqlstate.starts_with("42")
            }
            ApplyError::Schema(_) => true,
            _ => false,
        }
    }

    /// A short stable name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ApplyError::Connect(_) => "target_connect",
            ApplyError::Refused { .. } => "apply_refused",
            ApplyError::RowMissing { .. } => "row_missing",
            ApplyError::DuplicateKey { .. } => "duplicate_key",
            ApplyError::Ddl { .. } => "source_ddl",
            ApplyError::Schema(_) => "target_schema",
            ApplyError::Session { .. } => "target_session",
        }
    }
}

fn is_transient_sqlstate(code: &str) -> bool {
    // Connection exceptions, operator intervention, lock/serialization.
    code.starts_with("08")
        || code.starts_with("57")
        || code == "40001"
        || code == "40P01"
        || code == "55006"
}

fn session_error(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    let what = what.into();
    move |err| {
        let transient = err.is_closed()
            || err.as_db_error().is_none()
            || err.code().is_some_and(|c| is_transient_sqlstate(c.code()));
        ApplyError::Session {
            what,
            detail: describe(&err),
            transient,
        }
    }
}

/// How long the target's flush position may stand still below a committed
/// batch before the applier makes it flush (a few `wal_writer_delay`s).
const FORCE_FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(600);

/// A target table as the applier needs it.
#[derive(Debug, Clone)]
struct TargetTable {
    /// The source's description it was read for: a new one (the source
    /// changed the table) is described again.
    relation: Arc<Relation>,
    /// Column name → `format_type()`.
    types: HashMap<String, String>,
    /// Primary key columns on the target.
    primary_key: Vec<String>,
    /// The primary key is `DEFERRABLE`: it cannot arbitrate `ON CONFLICT`,
    /// and a source transaction may have permuted its values, so rows of a
    /// `REPLICA IDENTITY FULL` table are located by their whole old value.
    key_deferrable: bool,
    /// `GENERATED ALWAYS AS IDENTITY` columns: written with `OVERRIDING
    /// SYSTEM VALUE`, and never by an UPDATE (PostgreSQL refuses it), so a
    /// row whose such column changes is replaced.
    identity_always: Vec<String>,
    /// `DEFERRABLE` unique and primary keys, by columns. Under
    /// `session_replication_role = replica` PostgreSQL never checks them
    /// (the recheck is a trigger), so the applier does (invariant 12).
    deferrable_keys: Vec<Vec<String>>,
    /// A partitioned table: `TRUNCATE` cannot take `ONLY`.
    partitioned: bool,
    /// Columns whose target type may not hold every value of the type the
    /// source now sends (built-in types only): column, source type,
    /// target type. Named in the error when the target refuses a value.
    narrower: Vec<(String, String, String)>,
}

impl TargetTable {
    /// The table's own rows in a statement: `ONLY` it, so that rows of
    /// tables inheriting from it are never touched (a partitioned table's
    /// rows are all in its partitions, where ONLY would find none).
    fn only(&self, table: &TableName) -> String {
        crate::catalog::own_rows(table, self.partitioned)
    }

    /// ` OVERRIDING SYSTEM VALUE` when an INSERT of `names` writes a
    /// `GENERATED ALWAYS` identity column.
    fn overriding(&self, names: &[&str]) -> &'static str {
        if names
            .iter()
            .any(|n| self.identity_always.iter().any(|a| a == n))
        {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    }

    /// Whether rows are deleted by key and inserted again instead of
    /// upserted: when writing `names` under `keys` would UPDATE a
    /// `GENERATED ALWAYS` identity column, or the key is deferrable.
    fn replaces(&self, names: &[&str], keys: &[&str]) -> bool {
        // A deferrable key cannot arbitrate ON CONFLICT either.
        self.key_deferrable
            || names
                .iter()
                .any(|n| !keys.contains(n) && self.identity_always.iter().any(|a| a == n))
    }
}

/// How rows of a relation are identified: the indexes of its key columns,
/// or `None` for a keyless table (matched on the whole old row).
type KeySpec = Option<Vec<usize>>;

/// The key of a relation: its replica identity key; for REPLICA IDENTITY
/// FULL (where pgoutput flags every column) the target's primary key.
fn key_spec(relation: &Relation, target: &TargetTable) -> KeySpec {
    if relation.replica_identity == 'f' {
        // A deferrable key may hold duplicates inside a source transaction
        // (a swap, a shift): only the whole old row says which row moved.
        if target.primary_key.is_empty() || target.key_deferrable {
            return None;
        }
        let indexes: Option<Vec<usize>> = target
            .primary_key
            .iter()
            .map(|k| relation.columns.iter().position(|c| &c.name == k))
            .collect();
        return indexes;
    }
    let indexes: Vec<usize> = relation.key_indexes().collect();
    (!indexes.is_empty()).then_some(indexes)
}

/// What to do with one row key at the end of a batch. Rows borrow the
/// batch's changes; only a merge of two partial rows makes a new one.
#[derive(Debug, Clone)]
enum RowOp<'a> {
    /// Write the whole row (insert or replace).
    Upsert(Cow<'a, [Datum]>),
    /// Update only the columns sent (some were unchanged TOAST).
    Patch(Cow<'a, [Datum]>),
    /// Remove the row.
    Delete,
}

/// The final operation on one key of a batch.
#[derive(Debug)]
struct RowEntry<'a> {
    /// The key's values, borrowed from the change that first named it.
    key: RowKey<'a>,
    op: RowOp<'a>,
    lsn: Lsn,
}

/// Coalesced changes of one table, in the order keys first appeared:
/// `rows` in that order, `index` from each key to its entry, so a change
/// costs one hash lookup and copies no value.
#[derive(Debug)]
struct TableBatch<'a> {
    relation: Arc<Relation>,
    key: Vec<usize>,
    rows: Vec<RowEntry<'a>>,
    /// Hashed with foldhash, seeded per batch: the default SipHash was about
    /// a sixth of the daemon's samples in a catch-up (`perf`, apply-100).
    index: HashMap<RowKey<'a>, usize, foldhash::fast::RandomState>,
}

/// A row's key values as the source sent them, borrowed from the change.
type RowKey<'a> = Vec<Option<&'a [u8]>>;

/// Rows a batch wrote to a table with `DEFERRABLE` keys, to check that
/// they hold no key twice: PostgreSQL does not under the apply session's
/// `session_replication_role = replica` (invariant 12).
#[derive(Debug)]
struct KeyCheck<'a> {
    relation: Arc<Relation>,
    target: Arc<TargetTable>,
    /// The rows written; `None`: check the whole table.
    rows: Option<Vec<&'a Tuple>>,
    /// The last change that wrote one.
    lsn: Lsn,
}

impl KeyCheck<'_> {
    /// The same check over the whole table.
    fn whole(self) -> KeyCheck<'static> {
        KeyCheck {
            relation: self.relation,
            target: self.target,
            rows: None,
            lsn: self.lsn,
        }
    }
}

/// What the fast path needs of a relation, looked up once per batch and
/// relation instead of once per change.
#[derive(Debug)]
struct KnownTable {
    relation: Arc<Relation>,
    key: KeySpec,
}

/// One column of a set-based statement: the values of many rows, sent as
/// a single `text[]` parameter and cast to the column's type by the
/// statement. Written straight from the decoded values into the array's
/// binary form: no per-value allocation, and bytes that are not valid in
/// the target's encoding are refused by the server instead of being
/// replaced on the way.
#[derive(Debug)]
struct TextColumn<'a>(Vec<Option<&'a [u8]>>);

impl ToSql for TextColumn<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let dimension = ArrayDimension {
            len: i32::try_from(self.0.len())?,
            lower_bound: 1,
        };
        postgres_protocol::types::array_to_sql(
            Some(dimension),
            Type::TEXT.oid(),
            self.0.iter(),
            |value, buf| match value {
                Some(bytes) => {
                    buf.put_slice(bytes);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            out,
        )?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

/// The bytes of a value, `None` for NULL and unchanged TOAST.
fn datum_bytes(datum: &Datum) -> Option<&Bytes> {
    match datum {
        Datum::Text(bytes) | Datum::Binary(bytes) => Some(bytes),
        Datum::Null | Datum::UnchangedToast => None,
    }
}

/// The columns `columns` of `rows`, one [`TextColumn`] each.
fn text_columns<'a>(
    rows: &[&'a [Datum]],
    columns: impl IntoIterator<Item = usize>,
) -> Vec<TextColumn<'a>> {
    columns
        .into_iter()
        .map(|i| {
            TextColumn(
                rows.iter()
                    .map(|r| r.get(i).and_then(datum_bytes).map(|b| &b[..]))
                    .collect(),
            )
        })
        .collect()
}

/// One set-based statement of a batch, prepared, with its parameters.
struct TableOp<'a> {
    statement: Statement,
    params: Vec<TextColumn<'a>>,
    /// What it does to `table`, for errors.
    what: &'static str,
    table: &'a TableName,
    /// Rows it must find (partial rows update rows that must exist).
    expect: Option<usize>,
}

/// The answer to one request of a pipeline.
enum Reply {
    Done,
    Count(u64),
    Row(tokio_postgres::Row),
}

/// A pipeline ended before the reply to `what`.
fn missing_reply(what: &str) -> ApplyError {
    ApplyError::Session {
        what: what.into(),
        detail: "no reply".into(),
        transient: true,
    }
}

/// A request of a pipeline.
type Request<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Reply, tokio_postgres::Error>> + Send + 'a>,
>;

/// Runs `requests` as one pipeline and returns their results in order.
///
/// tokio-postgres sends a request when its future is first polled and
/// answers requests in the order sent; this polls every future in order,
/// so the server receives them in that order (`join_all` does not
/// promise an order when there are many).
async fn in_order<T>(
    mut requests: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) -> Vec<T> {
    let mut results: Vec<Option<T>> = requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (request, result) in requests.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match request.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *result = Some(value),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// Applies source transactions on one target connection.
#[derive(Debug)]
pub struct Applier {
    client: Client,
    origin: String,
    progress: Lsn,
    tables: HashMap<TableName, Arc<TargetTable>>,
    statements: HashMap<String, Statement>,
    copied_at: HashMap<TableName, Lsn>,
    skip_origins: Vec<String>,
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
}

impl Applier {
    /// Connects, prepares the session, and reads the applied position from
    /// the replication origin `origin` (created when missing).
    pub async fn connect(
        target: &ConnInfo,
        origin: &str,
        copied_at: HashMap<TableName, Lsn>,
        skip_origins: Vec<String>,
    ) -> Result<Applier, ApplyError> {
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
        client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map_err(session_error(format!("using replication origin {origin}")))?;
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
        let applier = Applier {
            client,
            origin: origin.to_owned(),
            progress,
            tables: HashMap::new(),
            statements: HashMap::new(),
            copied_at,
            skip_origins,
            // The progress just read may be an asynchronous commit of an
            // earlier run, not flushed yet: durable only once it is.
            unflushed: VecDeque::from([(Lsn::from_u64(u64::MAX), progress)]),
            stalled_since: None,
            durable: Lsn::default(),
            begin_pending: false,
            ddl: crate::ddl::DdlPolicy::default(),
        };
        applier.settled().await
    }

    /// Waits until the target flushed its WAL up to where it is now, so
    /// that the progress read at connect is durable.
    async fn settled(mut self) -> Result<Applier, ApplyError> {
        let insert: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(session_error("reading the target's WAL position"))?
            .get(0);
        if let Some(first) = self.unflushed.front_mut() {
            first.0 = insert.parse().unwrap_or_default();
        }
        self.wait_durable().await?;
        Ok(self)
    }

    /// The end LSN of the last source transaction applied and flushed on
    /// the target: the most that may be acknowledged to the source.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// Whether committed batches wait for the target's WAL flush.
    pub fn flush_pending(&self) -> bool {
        !self.unflushed.is_empty()
    }

    /// Asks the target how far its WAL is flushed and moves
    /// [`Applier::durable`] accordingly.
    pub async fn refresh_durable(&mut self) -> Result<Lsn, ApplyError> {
        if self.unflushed.is_empty() {
            return Ok(self.durable);
        }
        let flushed: String = self
            .client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(session_error("reading the target's WAL flush position"))?
            .get(0);
        let before = self.unflushed.len();
        tracing::trace!(flushed, waiting = ?self.unflushed.front(), "target flush position");
        self.flushed_up_to(flushed.parse().unwrap_or_default());
        if self.unflushed.is_empty() || self.unflushed.len() < before {
            self.stalled_since = None;
        } else {
            let since = *self
                .stalled_since
                .get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= FORCE_FLUSH_AFTER {
                self.force_flush().await?;
                self.stalled_since = None;
            }
        }
        Ok(self.durable)
    }

    /// Makes the target flush its WAL up to its current end.
    ///
    /// The WAL writer flushes asynchronous commits, but WAL written after
    /// the last of them by something else (page pruning by a read query,
    /// a running-transactions record) waits for a full page or a
    /// checkpoint; a batch whose recorded position lies past such a record
    /// (an empty batch, whose COMMIT writes nothing, or a record inserted
    /// between COMMIT and the position query) would then wait minutes to
    /// be acknowledged, and a shutdown with it.
    ///
    /// A synchronous commit flushes everything before it, but only a
    /// transaction that wrote WAL commits synchronously (`xact.c`,
    /// `RecordTransactionCommit`): an xid alone (`txid_current()`) is not
    /// enough, as a test with `wal_writer_delay = 10s` showed. A
    /// transactional logical message is the smallest WAL record any role
    /// may write (it carries our origin like every transaction of this
    /// session, and cutover's applier ignores logical messages).
    async fn force_flush(&self) -> Result<(), ApplyError> {
        tracing::debug!("the target's WAL flush is stalled: forcing it");
        self.client
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on; \
                 SELECT pg_logical_emit_message(true, 'cutover.flush', ''); COMMIT",
            )
            .await
            .map_err(session_error("flushing the target's WAL"))
    }

    fn flushed_up_to(&mut self, flushed: Lsn) {
        while let Some(&(local, source)) = self.unflushed.front() {
            if local > flushed {
                break;
            }
            self.durable = self.durable.max(source);
            self.unflushed.pop_front();
        }
    }

    /// Waits until every committed batch is flushed on the target (the WAL
    /// writer flushes asynchronous commits within `wal_writer_delay`).
    pub async fn wait_durable(&mut self) -> Result<Lsn, ApplyError> {
        while self.flush_pending() {
            self.refresh_durable().await?;
            if self.flush_pending() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        Ok(self.durable)
    }

    /// The end LSN of the last source transaction applied (committed on
    /// the target, perhaps not flushed yet: see [`Applier::durable`]).
    pub fn progress(&self) -> Lsn {
        self.progress
    }

    /// Sets what the applier does with DDL on the source (`[ddl] policy`).
    pub fn set_ddl_policy(&mut self, policy: crate::ddl::DdlPolicy) {
        self.ddl = policy;
    }

    /// The replication origin tagging applied transactions.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Applies consecutive source transactions in one target transaction
    /// and returns the new durable position. Transactions at or before
    /// the current position are skipped (already applied).
    pub async fn apply_batch(
        &mut self,
        transactions: &[SourceTransaction],
    ) -> Result<Lsn, ApplyError> {
        let pending: Vec<&SourceTransaction> = transactions
            .iter()
            .filter(|t| t.end_lsn > self.progress)
            .collect();
        let Some(last) = pending.last() else {
            return Ok(self.progress);
        };
        let (end_lsn, commit_time) = (last.end_lsn, last.commit_time);
        let changes: Vec<(&Change, Lsn)> = pending
            .iter()
            .flat_map(|t| t.changes.iter().map(move |c| (c, t.commit_lsn)))
            .collect();
        self.apply_changes(&changes, end_lsn, commit_time).await?;
        Ok(self.progress)
    }

    /// Applies changes as one target transaction ending at `end_lsn`.
    /// The fast path coalesces and runs set-based statements; if it fails,
    /// the transaction is replayed change by change.
    pub async fn apply_changes(
        &mut self,
        changes: &[(&Change, Lsn)],
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), ApplyError> {
        match self.apply_changes_once(changes, end_lsn, commit_time).await {
            Err(err) if self.progress < end_lsn && err.may_be_stale_description() => {
                tracing::info!(error = %err, "the target refused a change: describing its tables again and retrying the batch once");
                self.forget_descriptions();
                self.apply_changes_once(changes, end_lsn, commit_time)
                    .await
                    .map_err(|err| self.explained(err))
            }
            other => other,
        }
    }

    /// A refused value, with the columns of its table whose target type is
    /// narrower than the source's and the statement that widens them.
    fn explained(&self, err: ApplyError) -> ApplyError {
        let ApplyError::Refused {
            op,
            table,
            key,
            lsn,
            detail,
            sqlstate,
        } = err
        else {
            return err;
        };
        let narrower = self
            .tables
            .get(&table)
            .map(|t| t.narrower.clone())
            .unwrap_or_default();
        let detail = if narrower.is_empty() || !sqlstate.starts_with("22") {
            detail
        } else {
            let columns: Vec<String> = narrower
                .iter()
                .map(|(c, source, target)| {
                    format!("{c} is {target} on the target but {source} on the source")
                })
                .collect();
            let fixes: Vec<String> = narrower
                .iter()
                .map(|(c, source, _)| {
                    format!(
                        "ALTER TABLE {} ALTER COLUMN {} TYPE {source};",
                        table.quoted(),
                        quote_ident(c)
                    )
                })
                .collect();
            format!(
                "{detail}; {}: widen on the target ({}) and restart",
                columns.join(", "),
                fixes.join(" ")
            )
        };
        ApplyError::Refused {
            op,
            table,
            key,
            lsn,
            detail,
            sqlstate,
        }
    }

    /// Forgets what the applier knows of the target's tables (an operator
    /// may have changed them): they are described again on next use.
    fn forget_descriptions(&mut self) {
        self.tables.clear();
        self.statements.clear();
    }

    async fn apply_changes_once(
        &mut self,
        changes: &[(&Change, Lsn)],
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), ApplyError> {
        let wanted: Vec<(&Change, Lsn)> = changes
            .iter()
            .copied()
            .filter(|(c, commit)| self.wanted(c, *commit))
            .collect();
        // BEGIN, the statements and the commit go out together: a batch
        // without barriers (truncates, keyless tables) or partial rows
        // costs one round trip.
        self.begin_pending = true;
        match self.apply_fast(&wanted, Some((end_lsn, commit_time))).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // Committed, then the WAL positions could not be read: never
            // replay what is committed.
            Err(err) if self.progress >= end_lsn => return Err(err),
            Err(fast) => {
                tracing::debug!(error = %fast, "set-based apply failed; replaying change by change");
                self.rollback().await?;
                self.begin().await?;
                if let Err(err) = self.apply_slow(&wanted).await {
                    let _ = self.rollback().await;
                    return Err(err);
                }
            }
        }
        self.commit(end_lsn, commit_time).await
    }

    /// Applies a streamed transaction from its spill file, in one target
    /// transaction, `batch` changes at a time (memory stays bounded).
    pub async fn apply_spilled(
        &mut self,
        path: &std::path::Path,
        commit: &crate::pgoutput::Commit,
        batch: usize,
    ) -> Result<(), ApplyError> {
        match self.apply_spilled_once(path, commit, batch).await {
            Err(err) if self.progress < commit.end_lsn && err.may_be_stale_description() => {
                tracing::info!(error = %err, "the target refused a change: describing its tables again and retrying the transaction once");
                self.forget_descriptions();
                self.apply_spilled_once(path, commit, batch)
                    .await
                    .map_err(|err| self.explained(err))
            }
            other => other,
        }
    }

    async fn apply_spilled_once(
        &mut self,
        path: &std::path::Path,
        commit: &crate::pgoutput::Commit,
        batch: usize,
    ) -> Result<(), ApplyError> {
        if commit.end_lsn <= self.progress {
            return Ok(());
        }
        let spill = |e: crate::spill::SpillError| ApplyError::Session {
            what: "reading a streamed transaction from disk".into(),
            detail: e.to_string(),
            transient: false,
        };
        self.begin().await?;
        // Tables with DEFERRABLE keys that the transaction wrote: checked
        // whole at its end (keys may stand duplicated until then).
        let mut touched: Vec<KeyCheck<'static>> = Vec::new();
        let fast: Result<(), ApplyError> = async {
            let mut reader = crate::spill::SpillReader::open(path).map_err(spill)?;
            loop {
                let changes = reader.next_batch(batch).map_err(spill)?;
                if changes.is_empty() {
                    return self.check_keys(&touched).await;
                }
                let wanted: Vec<(&Change, Lsn)> = changes
                    .iter()
                    .map(|c| (c, commit.commit_lsn))
                    .filter(|(c, lsn)| self.wanted(c, *lsn))
                    .collect();
                self.apply_fast(&wanted, None).await?;
                for check in self.key_checks(&wanted).await? {
                    if !touched
                        .iter()
                        .any(|t| t.relation.name == check.relation.name)
                    {
                        touched.push(check.whole());
                    }
                }
            }
        }
        .await;
        if let Err(fast) = fast {
            tracing::debug!(error = %fast, "set-based apply of a streamed transaction failed; replaying change by change");
            self.rollback().await?;
            self.begin().await?;
            let slow: Result<(), ApplyError> = async {
                let mut reader = crate::spill::SpillReader::open(path).map_err(spill)?;
                loop {
                    let changes = reader.next_batch(batch).map_err(spill)?;
                    if changes.is_empty() {
                        return self.check_keys(&touched).await;
                    }
                    for change in &changes {
                        if self.wanted(change, commit.commit_lsn) {
                            self.apply_one(change, commit.commit_lsn).await?;
                        }
                    }
                    let applied: Vec<(&Change, Lsn)> =
                        changes.iter().map(|c| (c, commit.commit_lsn)).collect();
                    for check in self.key_checks(&applied).await? {
                        if !touched
                            .iter()
                            .any(|t| t.relation.name == check.relation.name)
                        {
                            touched.push(check.whole());
                        }
                    }
                }
            }
            .await;
            if let Err(err) = slow {
                let _ = self.rollback().await;
                return Err(err);
            }
        }
        self.commit(commit.end_lsn, commit.commit_time).await
    }

    fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool {
        if let Some(origin) = &change.origin
            && self.skip_origins.iter().any(|o| o.as_str() == &**origin)
        {
            return false;
        }
        let first = match &change.kind {
            ChangeKind::Insert { relation, .. }
            | ChangeKind::Update { relation, .. }
            | ChangeKind::Delete { relation, .. } => &relation.name,
            // A truncate is applied when any of its tables wants it; the
            // tables copied later are empty on the source at their snapshot
            // only if the truncate came before, so honour it per table.
            ChangeKind::Truncate { relations, .. } => {
                return relations.iter().any(|r| {
                    self.copied_at
                        .get(&r.name)
                        .is_none_or(|at| commit_lsn >= *at)
                });
            }
            ChangeKind::TruncatePartition(truncate) => &truncate.root,
            // DDL on a table out of scope is not ours; on a table copied
            // after it, it is in the copy.
            ChangeKind::Ddl(ddl) => {
                return ddl.in_scope
                    && self
                        .copied_at
                        .get(&ddl.table)
                        .is_none_or(|at| commit_lsn >= *at);
            }
        };
        self.copied_at.get(first).is_none_or(|at| commit_lsn >= *at)
    }

    async fn begin(&mut self) -> Result<(), ApplyError> {
        self.begin_pending = false;
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(session_error("BEGIN"))
    }

    /// Sends the BEGIN of the open transaction if it is still pending.
    async fn begun(&mut self) -> Result<(), ApplyError> {
        if self.begin_pending {
            self.begin().await?;
        }
        Ok(())
    }

    async fn rollback(&mut self) -> Result<(), ApplyError> {
        // A pipeline that failed may have ended the transaction already
        // (its COMMIT rolled back): ROLLBACK then only warns.
        self.begin_pending = false;
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(session_error("ROLLBACK"))
    }

    async fn commit(&mut self, end_lsn: Lsn, commit_time: PgTimestamp) -> Result<(), ApplyError> {
        self.flush(&mut Vec::new(), Some((end_lsn, commit_time)))
            .await
            .map(|_| ())
    }

    /// The statements that end a batch: the origin's position, COMMIT, and
    /// the target's WAL positions after it.
    async fn commit_statements(&mut self) -> Result<(Statement, Statement), ApplyError> {
        let setup = self
            .statement("SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2)")
            .await?;
        // The WAL insert position after COMMIT is at or past the commit
        // record: once the flush position passes it, the batch is durable.
        let positions = self
            .statement("SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text")
            .await?;
        Ok((setup, positions))
    }

    /// Records a committed batch: applied, and durable once the target's
    /// flush position passes `local`.
    fn committed(&mut self, end_lsn: Lsn, local: Lsn, flushed: Lsn) {
        self.progress = self.progress.max(end_lsn);
        self.unflushed.push_back((local, self.progress));
        self.flushed_up_to(flushed);
    }

    /// Coalesce per key, then one statement per (table, operation, column
    /// set). Barriers (truncate, keyless tables, key-changing updates with
    /// unchanged TOAST) flush what is pending and run on their own, in order.
    ///
    /// With `commit`, the last statements and the commit share one round
    /// trip; returns whether the batch is committed (not when partial rows
    /// must first be counted).
    async fn apply_fast<'a>(
        &mut self,
        changes: &[(&'a Change, Lsn)],
        commit: Option<(Lsn, PgTimestamp)>,
    ) -> Result<bool, ApplyError> {
        let mut pending: Vec<TableBatch<'a>> = Vec::new();
        let mut known: Vec<KnownTable> = Vec::new();
        for &(change, commit_lsn) in changes {
            let relation = match &change.kind {
                ChangeKind::Truncate { .. }
                | ChangeKind::TruncatePartition(_)
                | ChangeKind::Ddl(_) => {
                    self.flush(&mut pending, None).await?;
                    self.apply_one(change, commit_lsn).await?;
                    continue;
                }
                ChangeKind::Insert { relation, .. }
                | ChangeKind::Update { relation, .. }
                | ChangeKind::Delete { relation, .. } => relation,
            };
            // A relation is one `Arc` until the source describes it again.
            let spec = match known.iter().find(|k| Arc::ptr_eq(&k.relation, relation)) {
                Some(k) => k.key.clone(),
                None => {
                    let target = self.target_table(relation).await?;
                    let key = key_spec(relation, &target);
                    known.push(KnownTable {
                        relation: Arc::clone(relation),
                        key: key.clone(),
                    });
                    key
                }
            };
            let Some(key) = spec else {
                self.flush(&mut pending, None).await?;
                self.apply_one(change, commit_lsn).await?;
                continue;
            };
            if let ChangeKind::Update {
                old: Some(old),
                new,
                ..
            } = &change.kind
                && key_of(&key, old.tuple()) != key_of(&key, new)
                && new.0.contains(&Datum::UnchangedToast)
            {
                // A key change that keeps a TOASTed value: move the row in
                // place, the value cannot be rewritten from the change.
                self.flush(&mut pending, None).await?;
                self.apply_one(change, commit_lsn).await?;
                continue;
            }
            coalesce(&mut pending, change, relation, &key);
        }
        // Inside a spilled transaction (no commit here) keys may stand
        // duplicated until its end: checked then, by the caller.
        // Inside a spilled transaction (no commit here) the caller checks.
        if commit.is_none() {
            return self.flush(&mut pending, commit).await;
        }
        let checks = self.key_checks(changes).await?;
        if checks.is_empty() {
            return self.flush(&mut pending, commit).await;
        }
        self.flush(&mut pending, None).await?;
        self.check_keys(&checks).await?;
        self.flush(&mut Vec::new(), commit).await
    }

    async fn apply_slow(&mut self, changes: &[(&Change, Lsn)]) -> Result<(), ApplyError> {
        for (change, commit_lsn) in changes {
            self.apply_one(change, *commit_lsn).await?;
        }
        let checks = self.key_checks(changes).await?;
        self.check_keys(&checks).await
    }

    /// The rows `changes` wrote to tables with `DEFERRABLE` keys, by table.
    async fn key_checks<'a>(
        &mut self,
        changes: &[(&'a Change, Lsn)],
    ) -> Result<Vec<KeyCheck<'a>>, ApplyError> {
        let mut checks: Vec<KeyCheck<'a>> = Vec::new();
        // Relations seen in this batch whose table has no deferrable key.
        let mut plain: Vec<&Arc<Relation>> = Vec::new();
        for (change, _) in changes {
            let (relation, row) = match &change.kind {
                ChangeKind::Insert { relation, new } | ChangeKind::Update { relation, new, .. } => {
                    (relation, new)
                }
                ChangeKind::Delete { .. }
                | ChangeKind::Truncate { .. }
                | ChangeKind::TruncatePartition(_)
                | ChangeKind::Ddl(_) => continue,
            };
            if plain.iter().any(|p| Arc::ptr_eq(p, relation)) {
                continue;
            }
            if let Some(check) = checks.iter_mut().find(|c| c.relation.name == relation.name) {
                if let Some(rows) = &mut check.rows {
                    rows.push(row);
                }
                check.lsn = check.lsn.max(change.lsn);
                continue;
            }
            // Described again if DDL in the batch made the applier forget
            // it: a check is never skipped for want of a description.
            let target = self.target_table(relation).await?;
            if target.deferrable_keys.is_empty() {
                plain.push(relation);
                continue;
            }
            checks.push(KeyCheck {
                relation: Arc::clone(relation),
                target,
                rows: Some(vec![row]),
                lsn: change.lsn,
            });
        }
        Ok(checks)
    }

    /// Fails when a table of `checks` holds a `DEFERRABLE` key twice among
    /// the rows written (or anywhere, for a check without rows). Runs at a
    /// source commit, where the source's own check has passed.
    async fn check_keys(&mut self, checks: &[KeyCheck<'_>]) -> Result<(), ApplyError> {
        for check in checks {
            let relation = &check.relation;
            for key in &check.target.deferrable_keys {
                let positions: Option<Vec<usize>> = key
                    .iter()
                    .map(|k| relation.columns.iter().position(|c| &c.name == k))
                    .collect();
                let cols: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
                let names: Vec<&str> = key.iter().map(String::as_str).collect();
                let not_null: Vec<String> =
                    cols.iter().map(|c| format!("{c} IS NOT NULL")).collect();
                let (filter, params) = match (&check.rows, positions) {
                    (Some(rows), Some(positions)) => {
                        let tuples: Vec<&[Datum]> = rows.iter().map(|t| &t.0[..]).collect();
                        (
                            format!(
                                "({}) IN ({})",
                                cols.join(", "),
                                unnest_select(&names, &check.target, 1)
                            ),
                            text_columns(&tuples, positions),
                        )
                    }
                    // A column the source does not send, or no rows: the
                    // whole table.
                    _ => (not_null.join(" AND "), Vec::new()),
                };
                let sql = format!(
                    "SELECT ROW({cols})::text FROM {} WHERE {filter} GROUP BY {cols} HAVING count(*) > 1 LIMIT 1",
                    check.target.only(&relation.name),
                    cols = cols.join(", "),
                );
                let statement = self.statement(&sql).await?;
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                let duplicate =
                    self.client
                        .query_opt(&statement, &params)
                        .await
                        .map_err(session_error(format!(
                            "checking the DEFERRABLE key ({}) of {}",
                            key.join(", "),
                            relation.name
                        )))?;
                if let Some(row) = duplicate {
                    return Err(ApplyError::DuplicateKey {
                        table: relation.name.clone(),
                        key: format!("({})={}", key.join(", "), row.get::<_, String>(0)),
                        lsn: check.lsn,
                    });
                }
            }
        }
        Ok(())
    }

    /// Runs the statements of `pending` (and the pending BEGIN, and with
    /// `commit` the commit) pipelined: sent together, answered in order, in
    /// one round trip. Returns whether it committed: not when a statement
    /// updates partial rows, whose count must be checked before COMMIT.
    ///
    /// On a statement's failure the transaction is aborted (and a
    /// pipelined COMMIT rolled it back); the first error is returned.
    async fn flush(
        &mut self,
        pending: &mut Vec<TableBatch<'_>>,
        commit: Option<(Lsn, PgTimestamp)>,
    ) -> Result<bool, ApplyError> {
        let batches = std::mem::take(pending);
        let mut ops: Vec<TableOp> = Vec::new();
        for batch in &batches {
            self.table_ops(batch, &mut ops).await?;
        }
        let commit = commit.filter(|_| ops.iter().all(|op| op.expect.is_none()));
        if ops.is_empty() && commit.is_none() {
            return Ok(false);
        }
        let ends = match commit {
            Some((end_lsn, time)) => Some((self.commit_statements().await?, end_lsn, time)),
            None => None,
        };
        let begin = std::mem::take(&mut self.begin_pending);
        let client = &self.client;
        let mut requests: Vec<Request> = Vec::new();
        if begin {
            requests.push(Box::pin(async move {
                client.batch_execute("BEGIN").await.map(|()| Reply::Done)
            }));
        }
        for op in &ops {
            requests.push(Box::pin(async move {
                let params: Vec<&(dyn ToSql + Sync)> =
                    op.params.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                client
                    .execute(&op.statement, &params)
                    .await
                    .map(Reply::Count)
            }));
        }
        if let Some(((setup, positions), end_lsn, time)) = &ends {
            let lsn = end_lsn.to_string();
            let time = time.to_system_time();
            requests.push(Box::pin(async move {
                client
                    .execute(setup, &[&lsn, &time])
                    .await
                    .map(|_| Reply::Done)
            }));
            requests.push(Box::pin(async move {
                client.batch_execute("COMMIT").await.map(|()| Reply::Done)
            }));
            requests.push(Box::pin(async move {
                client.query_one(positions, &[]).await.map(Reply::Row)
            }));
        }
        let mut replies = in_order(requests).await.into_iter();
        // BEGIN fails only with its session; the statements behind it then
        // fail too (and keyed writes are idempotent anyway).
        if begin && let Some(Err(err)) = replies.next() {
            return Err(session_error("BEGIN")(err));
        }
        for op in &ops {
            let Some(reply) = replies.next() else {
                break;
            };
            let what = || format!("{} {}", op.what, op.table);
            let count = match reply.map_err(|err| session_error(what())(err))? {
                Reply::Count(n) => n,
                _ => 0,
            };
            if let Some(expected) = op.expect
                && count as usize != expected
            {
                // Let the slow path name the missing row.
                return Err(ApplyError::Session {
                    what: what(),
                    detail: format!("{count} of {expected} rows found"),
                    transient: false,
                });
            }
        }
        let Some((_, end_lsn, _)) = ends else {
            return Ok(false);
        };
        const SETUP: &str = "recording the applied position";
        const POSITIONS: &str = "reading the target's WAL positions";
        match replies.next() {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(session_error(SETUP)(err)),
            None => return Err(missing_reply(SETUP)),
        }
        match replies.next() {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(session_error("COMMIT")(err)),
            None => return Err(missing_reply("COMMIT")),
        }
        // Committed: from here on nothing may be replayed.
        self.progress = self.progress.max(end_lsn);
        let row = match replies.next() {
            Some(Ok(Reply::Row(row))) => row,
            Some(Err(err)) => return Err(session_error(POSITIONS)(err)),
            _ => return Err(missing_reply(POSITIONS)),
        };
        let local: Lsn = row.get::<_, String>(0).parse().unwrap_or_default();
        let flushed: Lsn = row.get::<_, String>(1).parse().unwrap_or_default();
        self.committed(end_lsn, local, flushed);
        Ok(true)
    }

    /// The statements for one table of a batch, prepared: deletes first,
    /// then full rows, then partial rows. Keys are distinct within a
    /// batch, so this order cannot change the result.
    async fn table_ops<'b>(
        &mut self,
        batch: &'b TableBatch<'_>,
        ops: &mut Vec<TableOp<'b>>,
    ) -> Result<(), ApplyError> {
        let relation = &batch.relation;
        let target = self.target_table(relation).await?;
        let key_cols: &[usize] = &batch.key;
        let mut deletes: Vec<&RowKey> = Vec::new();
        let mut upserts: Vec<&[Datum]> = Vec::new();
        let mut patches: HashMap<Vec<bool>, Vec<&[Datum]>> = HashMap::new();
        for entry in &batch.rows {
            match &entry.op {
                RowOp::Delete => deletes.push(&entry.key),
                RowOp::Upsert(row) => upserts.push(row),
                RowOp::Patch(row) => {
                    let present: Vec<bool> =
                        row.iter().map(|d| *d != Datum::UnchangedToast).collect();
                    patches.entry(present).or_default().push(row);
                }
            }
        }
        let keys: Vec<&str> = key_cols
            .iter()
            .map(|i| relation.columns[*i].name.as_str())
            .collect();
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        // An UPDATE cannot write a GENERATED ALWAYS identity column: rows
        // are deleted by key and inserted again instead.
        let replace = target.replaces(&names, &keys);
        let replaced: Vec<RowKey> = if replace {
            upserts
                .iter()
                .map(|row| key_of_row(key_cols, row))
                .collect()
        } else {
            Vec::new()
        };
        if !deletes.is_empty() || !replaced.is_empty() {
            let sql = delete_sql(&relation.name, &keys, &target);
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: (0..keys.len())
                    .map(|j| {
                        TextColumn(
                            deletes
                                .iter()
                                .map(|k| k[j])
                                .chain(replaced.iter().map(|k| k[j]))
                                .collect(),
                        )
                    })
                    .collect(),
                what: "deleting from",
                table: &relation.name,
                expect: None,
            });
        }
        if !upserts.is_empty() {
            let sql = if replace {
                insert_sql(&relation.name, &names, &target)
            } else {
                upsert_sql(&relation.name, &names, &keys, &target)
            };
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&upserts, 0..names.len()),
                what: "writing rows of",
                table: &relation.name,
                expect: None,
            });
        }
        for (present, rows) in patches {
            let set_cols: Vec<usize> = (0..relation.columns.len())
                .filter(|i| present[*i] && !key_cols.contains(i))
                .collect();
            let set: Vec<&str> = set_cols
                .iter()
                .map(|i| relation.columns[*i].name.as_str())
                .collect();
            let mut order: Vec<usize> = key_cols.to_vec();
            order.extend(set_cols.iter().copied());
            let sql = if replace {
                move_sql(&relation.name, relation, &keys, &set, &target)
            } else {
                patch_sql(&relation.name, &keys, &set, &target)
            };
            ops.push(TableOp {
                statement: self.statement(&sql).await?,
                params: text_columns(&rows, order.iter().copied()),
                what: "updating",
                table: &relation.name,
                expect: Some(rows.len()),
            });
        }
        Ok(())
    }

    /// One change, one statement: the slow path, and barriers.
    /// `commit_lsn` is the commit of the change's transaction (a change
    /// read back from disk does not carry it).
    async fn apply_one(&mut self, change: &Change, commit_lsn: Lsn) -> Result<(), ApplyError> {
        self.begun().await?;
        let refused = |relation: &Relation, key: String| {
            let table = relation.name.clone();
            let op = change.kind.op();
            let lsn = change.lsn;
            move |err: tokio_postgres::Error| match err.as_db_error() {
                Some(db) => ApplyError::Refused {
                    op,
                    table,
                    key,
                    lsn,
                    detail: db.message().to_owned(),
                    sqlstate: db.code().code().to_owned(),
                },
                None => session_error(format!("applying {op} on {table}"))(err),
            }
        };
        match &change.kind {
            ChangeKind::Truncate {
                relations,
                restart_identity,
                ..
            } => {
                let mut names: Vec<String> = Vec::new();
                for relation in relations {
                    if self
                        .copied_at
                        .get(&relation.name)
                        .is_some_and(|at| commit_lsn < *at)
                    {
                        continue;
                    }
                    let target = self.target_table(relation).await?;
                    names.push(crate::catalog::own_rows(&relation.name, target.partitioned));
                }
                if names.is_empty() {
                    return Ok(());
                }
                // Without CASCADE: like PostgreSQL's own apply, only the
                // published tables listed are emptied on the target; and
                // each with ONLY: the source lists the inheritance
                // children its TRUNCATE reached (a TRUNCATE ONLY of a
                // parent reaches none).
                let sql = format!(
                    "TRUNCATE {}{}",
                    names.join(", "),
                    if *restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    }
                );
                self.client
                    .batch_execute(&sql)
                    .await
                    .map_err(refused(&relations[0], format!("({})", names.join(", "))))?;
            }
            ChangeKind::Ddl(ddl) => self.apply_ddl(ddl, change.lsn).await?,
            ChangeKind::TruncatePartition(truncate) => {
                if self
                    .copied_at
                    .get(&truncate.root)
                    .is_some_and(|at| commit_lsn < *at)
                {
                    return Ok(());
                }
                self.truncate_partition(truncate, change.lsn).await?;
            }
            ChangeKind::Insert { relation, new } => {
                let target = self.target_table(relation).await?;
                let spec = key_spec(relation, &target);
                self.write_row(relation, &target, &spec, new, new)
                    .await
                    .map_err(refused(relation, show_key(relation, &spec, new)))?;
            }
            ChangeKind::Update { relation, old, new } => {
                let target = self.target_table(relation).await?;
                let spec = key_spec(relation, &target);
                let located = match old {
                    Some(old) => old.tuple(),
                    None => new,
                };
                if let Some(key) = &spec
                    && !new.0.contains(&Datum::UnchangedToast)
                    && key_of(key, located) == key_of(key, new)
                {
                    // A full row under an unchanged key: written whole.
                    self.write_row(relation, &target, &spec, located, new)
                        .await
                        .map_err(refused(relation, show_key(relation, &spec, new)))?;
                    return Ok(());
                }
                // Locate the old row (by key, or by the whole old row) and
                // set the columns sent; an UPDATE cannot write a GENERATED
                // ALWAYS identity column, so such a row is moved instead.
                let (match_cols, match_values) = locator(relation, &spec, located);
                let set: Vec<usize> = (0..relation.columns.len())
                    .filter(|i| new.0[*i] != Datum::UnchangedToast)
                    .collect();
                let moves = set.iter().any(|i| {
                    target
                        .identity_always
                        .iter()
                        .any(|a| *a == relation.columns[*i].name)
                });
                let sql = if moves {
                    move_one_sql(
                        &relation.name,
                        relation,
                        &match_cols,
                        &set,
                        &target,
                        spec.is_some(),
                    )
                } else {
                    update_one_sql(
                        &relation.name,
                        relation,
                        &match_cols,
                        &set,
                        &target,
                        spec.is_some(),
                    )
                };
                let statement = self.statement(&sql).await?;
                let mut values: Vec<Option<String>> =
                    set.iter().map(|i| datum_text(&new.0[*i])).collect();
                values.extend(match_values);
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let key = show_key(relation, &spec, located);
                let updated = self
                    .client
                    .execute(&statement, &params)
                    .await
                    .map_err(refused(relation, key.clone()))?;
                if updated == 0 {
                    return Err(ApplyError::RowMissing {
                        op: "update",
                        table: relation.name.clone(),
                        key,
                        lsn: change.lsn,
                    });
                }
            }
            ChangeKind::Delete { relation, old } => {
                let target = self.target_table(relation).await?;
                let spec = key_spec(relation, &target);
                let (match_cols, match_values) = locator(relation, &spec, old.tuple());
                let sql = delete_one_sql(
                    &relation.name,
                    relation,
                    &match_cols,
                    &target,
                    spec.is_some(),
                );
                let statement = self.statement(&sql).await?;
                let params: Vec<&(dyn ToSql + Sync)> = match_values
                    .iter()
                    .map(|v| v as &(dyn ToSql + Sync))
                    .collect();
                let key = show_key(relation, &spec, old.tuple());
                let deleted = self
                    .client
                    .execute(&statement, &params)
                    .await
                    .map_err(refused(relation, key.clone()))?;
                if deleted == 0 && spec.is_none() {
                    // Keyless rows are matched on their whole value: a
                    // missing one means the target diverged.
                    return Err(ApplyError::RowMissing {
                        op: "delete",
                        table: relation.name.clone(),
                        key,
                        lsn: change.lsn,
                    });
                }
            }
        }
        Ok(())
    }

    /// Follows DDL on a source table in scope at its place in the stream:
    /// checks that the target has every column the source now has, of a
    /// type that holds its values, and with the `additive` policy adds or
    /// widens what it lacks, inside the apply transaction. Anything else
    /// stops with the statement and the fix (see [`crate::ddl`]).
    async fn apply_ddl(&mut self, ddl: &crate::ddl::DdlChange, lsn: Lsn) -> Result<(), ApplyError> {
        use crate::catalog::{TypeFit, type_fit};
        tracing::debug!(?ddl, "DDL on the source");
        let quoted = ddl.table.quoted();
        let stop = |problem: String, fix: String| ApplyError::Ddl {
            table: ddl.table.clone(),
            lsn,
            statement: ddl.statement.trim().to_owned(),
            problem,
            fix,
        };
        if let Some(column) = &ddl.dropped_column {
            let has: bool = self
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute
                                     WHERE attrelid = to_regclass($1) AND attname = $2
                                       AND attnum > 0 AND NOT attisdropped)",
                    &[&quoted, column],
                )
                .await
                .map_err(session_error(format!(
                    "reading the columns of {}",
                    ddl.table
                )))?
                .get(0);
            if !has {
                return Ok(());
            }
            return Err(stop(
                format!(
                    "the source dropped column {column}; cutover never drops a column on the target"
                ),
                format!(
                    "drop it on the target if it should go (ALTER TABLE {quoted} DROP COLUMN {};), then restart",
                    quote_ident(column)
                ),
            ));
        }
        let Some(columns) = &ddl.columns else {
            // A table the target never had (a partition of a tree out of
            // scope, a table created and dropped on the source alone):
            // nothing of it to keep or drop.
            let exists = self.target_has(&ddl.table).await?;
            if !exists {
                return Ok(());
            }
            return Err(stop(
                "the source dropped the table; cutover never drops a table on the target".into(),
                format!(
                    "drop it on the target if it should go (DROP TABLE {quoted};), take it out of replication.tables, and restart"
                ),
            ));
        };
        if ddl.tag != "ALTER TABLE" && ddl.tag != "CREATE TABLE" {
            return Err(stop(
                format!(
                    "a {} in scope: the rows it wrote were written before cutover's trigger could publish the table, and are not in the stream",
                    ddl.tag
                ),
                "create the table on the target and copy its rows (or copy the whole migration again), take care that the publication holds it, check with cutover verify, and restart".into(),
            ));
        }
        if ddl.tag == "CREATE TABLE" {
            if ddl.published.is_none() {
                return Err(stop(
                    "a new table in scope without a primary key, which replication.keyless does not let cutover publish as it is".into(),
                    format!(
                        "give it a primary key, or REPLICA IDENTITY FULL, on the source and add it to the publication (ALTER PUBLICATION ... ADD TABLE ONLY {quoted};), create it on the target, and restart"
                    ),
                ));
            }
            let exists = self.target_has(&ddl.table).await?;
            if !exists {
                let create = create_table_sql(&ddl.table, columns, ddl.primary_key.as_deref());
                if self.ddl != crate::ddl::DdlPolicy::Additive {
                    return Err(stop(
                        "a new table in scope that the target does not have".into(),
                        format!(
                            "{create} on the target, then restart (or set ddl.policy = \"additive\" to let cutover create it)"
                        ),
                    ));
                }
                tracing::info!(table = %ddl.table, "following DDL on the source: creating a new table in scope");
                self.client.batch_execute(&create).await.map_err(|err| {
                    stop(
                        format!("the target refused {create}: {}", describe(&err)),
                        "create the table on the target by hand, then restart".into(),
                    )
                })?;
                self.forget_table(&ddl.table);
                return Ok(());
            }
        }
        let exists = self.target_has(&ddl.table).await?;
        if !exists {
            return Err(stop(
                "the target has no table of this name (renamed on the source?)".into(),
                format!("create or rename it on the target to {quoted}, then restart"),
            ));
        }
        let target: HashMap<String, String> = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&quoted],
            )
            .await
            .map_err(session_error(format!(
                "reading the columns of {}",
                ddl.table
            )))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Columns the source had before the statement (as it last described
        // the table) and has no more: dropped on the source.
        if let Some(known) = self.tables.get(&ddl.table) {
            let dropped: Vec<&str> = known
                .relation
                .columns
                .iter()
                .filter(|c| !columns.iter().any(|d| d.name == c.name))
                .map(|c| c.name.as_str())
                .filter(|c| target.contains_key(*c))
                .collect();
            if !dropped.is_empty() {
                return Err(stop(
                    format!(
                        "the source dropped column(s) {}; cutover never drops a column on the target",
                        dropped.join(", ")
                    ),
                    format!(
                        "drop them on the target if they should go ({}), then restart",
                        dropped
                            .iter()
                            .map(|c| format!(
                                "ALTER TABLE {quoted} DROP COLUMN {};",
                                quote_ident(c)
                            ))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                ));
            }
        }
        // A rename looks like a column dropped and another added: following
        // it as an addition would leave the renamed column's values behind.
        let lowered = ddl.statement.to_ascii_lowercase();
        if ddl.tag == "ALTER TABLE" && lowered.contains(" rename ") {
            let renamed = columns
                .iter()
                .any(|c| !c.generated && !target.contains_key(&c.name));
            if renamed {
                return Err(stop(
                    "a rename on the source; the target has no column or table of the new name"
                        .into(),
                    "rename it the same way on the target, then restart".into(),
                ));
            }
        }
        let mut statements: Vec<String> = Vec::new();
        let mut lacking: Vec<String> = Vec::new();
        for column in columns.iter().filter(|c| !c.generated) {
            let name = quote_ident(&column.name);
            match target.get(&column.name) {
                Some(current) => match type_fit(&column.type_name, current) {
                    TypeFit::Same | TypeFit::Widens => {}
                    TypeFit::Incompatible => {
                        let widen = format!(
                            "ALTER TABLE {quoted} ALTER COLUMN {name} TYPE {};",
                            column.type_name
                        );
                        let using = ddl.statement.to_ascii_lowercase().contains(" using ");
                        if using {
                            return Err(stop(
                                format!(
                                    "column {} changed type with USING: the source rewrote its values, and the rewritten values are not in the stream",
                                    column.name
                                ),
                                format!(
                                    "change it the same way on the target ({widen} with the same USING), check with cutover verify, and restart"
                                ),
                            ));
                        }
                        if type_fit(current, &column.type_name) != TypeFit::Widens {
                            return Err(stop(
                                format!(
                                    "column {} is now {} on the source, which the target's {current} cannot hold, and which is not a widening of it",
                                    column.name, column.type_name
                                ),
                                format!(
                                    "change it on the target ({widen}), check its values with cutover verify, and restart"
                                ),
                            ));
                        }
                        lacking.push(format!(
                            "column {} widened to {}",
                            column.name, column.type_name
                        ));
                        statements.push(widen);
                    }
                },
                None => {
                    if column.default.is_some() && column.missing.is_none() {
                        return Err(stop(
                            format!(
                                "column {} was added with a default that PostgreSQL computed row by row (a volatile default): the source rewrote the table, and those values are not in the stream",
                                column.name
                            ),
                            "add the column on the target and copy its values (or copy the table again), check with cutover verify, and restart".to_owned(),
                        ));
                    }
                    let mut add = format!(
                        "ALTER TABLE {quoted} ADD COLUMN {name} {}",
                        column.type_name
                    );
                    if let Some(missing) = &column.missing {
                        // The value the source's existing rows read: a
                        // constant, so the target stores it once too.
                        add.push_str(&format!(
                            " DEFAULT ({}::{}[])[1]",
                            crate::catalog::quote_literal(missing),
                            column.type_name
                        ));
                        if column.not_null {
                            add.push_str(" NOT NULL");
                        }
                    }
                    add.push(';');
                    if column.missing.is_some() {
                        add.push_str(&format!(
                            " ALTER TABLE {quoted} ALTER COLUMN {name} DROP DEFAULT;"
                        ));
                    }
                    lacking.push(format!("column {} ({})", column.name, column.type_name));
                    statements.push(add);
                }
            }
        }
        if statements.is_empty() {
            self.forget_table(&ddl.table);
            return Ok(());
        }
        if self.ddl != crate::ddl::DdlPolicy::Additive {
            return Err(stop(
                format!("the target lacks {}", lacking.join(", ")),
                format!(
                    "{} on the target, then restart (or set ddl.policy = \"additive\" to let cutover make additive changes)",
                    statements.join(" ")
                ),
            ));
        }
        tracing::info!(table = %ddl.table, statement = %ddl.statement.trim(), changes = %lacking.join(", "), "following DDL on the source");
        self.client
            .batch_execute(&statements.join(" "))
            .await
            .map_err(|err| {
                stop(
                    format!(
                        "the target refused {}: {}",
                        statements.join(" "),
                        describe(&err)
                    ),
                    "make the change on the target by hand, then restart".into(),
                )
            })?;
        self.forget_table(&ddl.table);
        Ok(())
    }

    /// Whether the target has a table of this name.
    async fn target_has(&self, table: &TableName) -> Result<bool, ApplyError> {
        Ok(self
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await
            .map_err(session_error(format!("looking up {table} on the target")))?
            .get(0))
    }

    /// Forgets the description of one table (its statements too).
    fn forget_table(&mut self, table: &TableName) {
        if self.tables.remove(table).is_some() {
            self.statements.clear();
        }
    }

    /// Empties on the target the rows of a partition the source truncated:
    /// the same partition where the target has it (same name and bound,
    /// under a parent and root of the same names), else the rows of the
    /// root that the partition's constraint holds.
    async fn truncate_partition(
        &mut self,
        truncate: &crate::partition::PartitionTruncate,
        lsn: Lsn,
    ) -> Result<(), ApplyError> {
        let same: Option<bool> = self
            .client
            .query_opt(
                "SELECT c.relkind = 'p'
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_inherits i ON i.inhrelid = c.oid
                   JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
                   JOIN pg_class r ON r.oid = pg_partition_root(c.oid) JOIN pg_namespace rn ON rn.oid = r.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relispartition
                    AND pg_get_expr(c.relpartbound, c.oid) = $3
                    AND pn.nspname = $4 AND p.relname = $5 AND rn.nspname = $6 AND r.relname = $7",
                &[
                    &truncate.partition.schema,
                    &truncate.partition.name,
                    &truncate.bound,
                    &truncate.parent.schema,
                    &truncate.parent.name,
                    &truncate.root.schema,
                    &truncate.root.name,
                ],
            )
            .await
            .map_err(session_error(format!(
                "looking up partition {} on the target",
                truncate.partition
            )))?
            .map(|row| row.get(0));
        let sql = match same {
            Some(partitioned) => format!(
                "TRUNCATE {}",
                crate::catalog::own_rows(&truncate.partition, partitioned)
            ),
            None if truncate.hashed() => {
                return Err(ApplyError::Schema(format!(
                    "the source truncated hash partition {} ({}) of {}, and the target has no partition of that name and bound under {}: \
                     the rows of a hash partition cannot be told apart on a table partitioned differently. \
                     Empty them by hand on the target (they are the source's {} rows, gone from the source), \
                     or partition the target's {} like the source's, then run cutover verify and restart",
                    truncate.partition,
                    truncate.bound,
                    truncate.root,
                    truncate.parent,
                    truncate.partition,
                    truncate.root
                )));
            }
            // The constraint is the source's own rendering of the
            // partition's bounds over the root's columns (no value of a
            // row is built into it).
            None => format!(
                "DELETE FROM {} WHERE {}",
                truncate.root.quoted(),
                truncate.constraint
            ),
        };
        // One statement, by the extended protocol.
        self.client
            .execute(sql.as_str(), &[])
            .await
            .map(|_| ())
            .map_err(|err| match err.as_db_error() {
                Some(db) => ApplyError::Refused {
                    op: "truncate",
                    table: truncate.partition.clone(),
                    key: format!("(partition of {})", truncate.root),
                    lsn,
                    detail: db.message().to_owned(),
                    sqlstate: db.code().code().to_owned(),
                },
                None => session_error(format!("emptying partition {}", truncate.partition))(err),
            })
    }

    /// Writes one whole row `new` that replaces the row found at `old`'s
    /// key (an insert, or an update that keeps its key): an upsert on the
    /// key; a plain insert for a table matched on whole rows; and where
    /// the row holds a `GENERATED ALWAYS` identity column beside its key,
    /// a delete of the key and an insert.
    async fn write_row(
        &mut self,
        relation: &Relation,
        target: &TargetTable,
        spec: &KeySpec,
        old: &Tuple,
        new: &Tuple,
    ) -> Result<u64, tokio_postgres::Error> {
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        let columns: Vec<Vec<Option<String>>> = new.0.iter().map(|d| vec![datum_text(d)]).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let sql = match spec {
            Some(key) => {
                let keys: Vec<&str> = key
                    .iter()
                    .map(|i| relation.columns[*i].name.as_str())
                    .collect();
                if target.replaces(&names, &keys) {
                    let sql = delete_sql(&relation.name, &keys, target);
                    let statement = self.prepared(&sql).await?;
                    let old_key: Vec<Vec<Option<String>>> =
                        key.iter().map(|i| vec![datum_text(&old.0[*i])]).collect();
                    let key_params: Vec<&(dyn ToSql + Sync)> =
                        old_key.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                    self.client.execute(&statement, &key_params).await?;
                    insert_sql(&relation.name, &names, target)
                } else {
                    upsert_sql(&relation.name, &names, &keys, target)
                }
            }
            None => insert_sql(&relation.name, &names, target),
        };
        let statement = self.prepared(&sql).await?;
        self.client.execute(&statement, &params).await
    }

    /// [`Applier::statement`] for callers that report a failed statement
    /// as the change's refusal.
    async fn prepared(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    async fn statement(&mut self, sql: &str) -> Result<Statement, ApplyError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self
            .client
            .prepare(sql)
            .await
            .map_err(|err| match err.as_db_error() {
                // A server going away (57P01 and the like) is not the
                // statement's fault: retry.
                Some(db) if !is_transient_sqlstate(db.code().code()) => {
                    ApplyError::Schema(format!("{} (preparing: {sql})", db.message()))
                }
                _ => session_error("preparing a statement")(err),
            })?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    async fn target_table(
        &mut self,
        relation: &Arc<Relation>,
    ) -> Result<Arc<TargetTable>, ApplyError> {
        if let Some(table) = self.tables.get(&relation.name) {
            if Arc::ptr_eq(&table.relation, relation) {
                return Ok(Arc::clone(table));
            }
            if *table.relation == **relation {
                // The same description read again (a spilled transaction):
                // remember this copy, compared by pointer from now on.
                let mut same = (**table).clone();
                same.relation = Arc::clone(relation);
                let same = Arc::new(same);
                self.tables.insert(relation.name.clone(), Arc::clone(&same));
                return Ok(same);
            }
        }
        // First use, or the source described the table again (a column
        // added, dropped or of another type): read the target again.
        let mut described = self.describe_target(relation).await?;
        described.relation = Arc::clone(relation);
        let table = Arc::new(described);
        self.tables
            .insert(relation.name.clone(), Arc::clone(&table));
        Ok(table)
    }

    /// Reads what the applier needs of a target table.
    async fn describe_target(&self, relation: &Relation) -> Result<TargetTable, ApplyError> {
        let name = relation.name.quoted();
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attidentity = 'a',
                        a.attgenerated <> ''
                   FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&name],
            )
            .await
            .map_err(|err| match err.as_db_error() {
                Some(db) if !is_transient_sqlstate(db.code().code()) => ApplyError::Schema(format!(
                    "table {} is missing on the target ({}): create it with the source's definition",
                    relation.name,
                    db.message()
                )),
                _ => session_error(format!("reading the columns of {}", relation.name))(err),
            })?;
        let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let identity_always: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get(0))
            .collect();
        let generated: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, bool>(3))
            .map(|r| r.get(0))
            .collect();
        let row = self
            .client
            .query_one(
                "SELECT c.relkind = 'p',
                        (SELECT array_agg(a.attname::text ORDER BY k.ord)
                           FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                          WHERE i.indrelid = c.oid AND i.indisprimary),
                        coalesce((SELECT NOT i.indimmediate FROM pg_index i
                                   WHERE i.indrelid = c.oid AND i.indisprimary), false),
                        (SELECT array_agg(array_to_string(ARRAY(
                                  SELECT quote_ident(a.attname) FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord)
                                    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum
                                   ORDER BY u.ord), ','))
                           FROM pg_constraint k
                          WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u') AND k.condeferrable)
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&name],
            )
            .await
            .map_err(session_error(format!("reading the keys of {}", relation.name)))?;
        let missing: Vec<&str> = relation
            .columns
            .iter()
            .filter(|c| !types.contains_key(&c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(ApplyError::Schema(format!(
                "table {} on the target lacks column(s) {} that the source sends: add them (ALTER TABLE ... ADD COLUMN) and restart",
                relation.name,
                missing.join(", ")
            )));
        }
        let computed: Vec<&str> = relation
            .columns
            .iter()
            .filter(|c| generated.contains(&c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !computed.is_empty() {
            return Err(ApplyError::Schema(format!(
                "column(s) {} of {} are generated on the target but plain on the source, which sends their values: \
                 make them plain columns on the target (ALTER TABLE ... ALTER COLUMN ... DROP EXPRESSION) \
                 or generated on the source too, and restart",
                computed.join(", "),
                relation.name
            )));
        }
        // Built-in types have the same OIDs everywhere: the target spells
        // the source's types, and they are compared with its own.
        let oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = relation.columns.iter().map(|c| c.type_modifier).collect();
        let spelled: Vec<Option<String>> = self
            .client
            .query(
                "SELECT CASE WHEN t.oid < 16384 THEN format_type(t.oid, t.typmod) END
                   FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, n) ORDER BY t.n",
                &[&oids, &mods],
            )
            .await
            .map_err(session_error(format!("reading the types of {}", relation.name)))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let narrower = relation
            .columns
            .iter()
            .zip(spelled)
            .filter_map(|(column, source)| {
                let source = source?;
                let target = types.get(&column.name)?;
                (crate::catalog::type_fit(&source, target) == crate::catalog::TypeFit::Incompatible)
                    .then(|| (column.name.clone(), source, target.clone()))
            })
            .collect();
        Ok(TargetTable {
            narrower,
            relation: Arc::new(relation.clone()),
            types,
            primary_key: row.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
            key_deferrable: row.get(2),
            identity_always,
            deferrable_keys: row
                .get::<_, Option<Vec<String>>>(3)
                .unwrap_or_default()
                .iter()
                .map(|list| crate::catalog::split_quoted_list(list))
                .collect(),
            partitioned: row.get(0),
        })
    }
}

/// `CREATE TABLE` for a table new on the source: its columns with their
/// types, `NOT NULL` and generation expressions, and its primary key.
/// Defaults, other constraints and indexes are the operator's to add.
fn create_table_sql(
    table: &TableName,
    columns: &[crate::ddl::DdlColumn],
    primary_key: Option<&[String]>,
) -> String {
    let mut parts: Vec<String> = columns
        .iter()
        .map(|c| {
            let mut part = format!("{} {}", quote_ident(&c.name), c.type_name);
            match (&c.default, c.generated) {
                (Some(expression), true) => {
                    part.push_str(&format!(" GENERATED ALWAYS AS ({expression}) STORED"))
                }
                _ if c.not_null => part.push_str(" NOT NULL"),
                _ => {}
            }
            part
        })
        .collect();
    if let Some(key) = primary_key {
        parts.push(format!(
            "PRIMARY KEY ({})",
            key.iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    format!("CREATE TABLE {} ({});", table.quoted(), parts.join(", "))
}

fn key_of<'a>(key: &[usize], tuple: &'a Tuple) -> RowKey<'a> {
    key_of_row(key, &tuple.0)
}

fn key_of_row<'a>(key: &[usize], row: &'a [Datum]) -> RowKey<'a> {
    key.iter()
        .map(|i| row.get(*i).and_then(datum_bytes).map(|b| &b[..]))
        .collect()
}

fn datum_text(datum: &Datum) -> Option<String> {
    match datum {
        Datum::Text(bytes) | Datum::Binary(bytes) => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        Datum::Null | Datum::UnchangedToast => None,
    }
}

fn show_key(relation: &Relation, spec: &KeySpec, tuple: &Tuple) -> String {
    let pairs: Vec<String> = relation
        .columns
        .iter()
        .enumerate()
        .zip(&tuple.0)
        .filter(|((i, _), _)| spec.as_ref().is_none_or(|k| k.contains(i)))
        .map(|((_, c), d)| {
            let value = match d {
                Datum::Null => "NULL".to_owned(),
                Datum::UnchangedToast => "(unchanged)".to_owned(),
                other => {
                    let text = datum_text(other).unwrap_or_default();
                    if text.len() > 64 {
                        format!("{}...", &text[..text.floor_char_boundary(64)])
                    } else {
                        text
                    }
                }
            };
            format!("{}={value}", c.name)
        })
        .collect();
    format!("({})", pairs.join(", "))
}

/// Merges a change into the pending batch of its table.
fn coalesce<'a>(
    pending: &mut Vec<TableBatch<'a>>,
    change: &'a Change,
    relation: &Arc<Relation>,
    key_cols: &[usize],
) {
    let (key, op, old_key) = match &change.kind {
        ChangeKind::Insert { new, .. } => (
            key_of(key_cols, new),
            RowOp::Upsert(Cow::Borrowed(&new.0[..])),
            None,
        ),
        ChangeKind::Update { old, new, .. } => {
            let key = key_of(key_cols, new);
            let old_key = old
                .as_ref()
                .map(|o| key_of(key_cols, o.tuple()))
                .filter(|k| *k != key);
            let op = if new.0.contains(&Datum::UnchangedToast) {
                RowOp::Patch(Cow::Borrowed(&new.0[..]))
            } else {
                RowOp::Upsert(Cow::Borrowed(&new.0[..]))
            };
            (key, op, old_key)
        }
        ChangeKind::Delete { old, .. } => (key_of(key_cols, old.tuple()), RowOp::Delete, None),
        ChangeKind::Truncate { .. } | ChangeKind::TruncatePartition(_) | ChangeKind::Ddl(_) => {
            unreachable!("truncates and DDL are barriers")
        }
    };
    let index = match pending
        .iter()
        .position(|b| Arc::ptr_eq(&b.relation, relation))
    {
        Some(i) => i,
        None => {
            pending.push(TableBatch {
                relation: relation.clone(),
                key: key_cols.to_vec(),
                rows: Vec::new(),
                index: HashMap::default(),
            });
            pending.len() - 1
        }
    };
    let batch = &mut pending[index];
    if let Some(old_key) = old_key {
        // A key change: the old key is deleted, the new one written.
        put(batch, old_key, RowOp::Delete, change.lsn);
    }
    put(batch, key, op, change.lsn);
}

fn put<'a>(batch: &mut TableBatch<'a>, key: RowKey<'a>, op: RowOp<'a>, lsn: Lsn) {
    let at = match batch.index.entry(key) {
        Entry::Vacant(vacant) => {
            let key = vacant.key().clone();
            vacant.insert(batch.rows.len());
            batch.rows.push(RowEntry { key, op, lsn });
            return;
        }
        Entry::Occupied(occupied) => *occupied.get(),
    };
    let entry = &mut batch.rows[at];
    let before = std::mem::replace(&mut entry.op, RowOp::Delete);
    entry.op = match (before, op) {
        // A partial update on top of a full row in this batch: fill the
        // unchanged columns from that row.
        (RowOp::Upsert(before), RowOp::Patch(after)) => RowOp::Upsert(merge(&before, &after)),
        (RowOp::Patch(before), RowOp::Patch(after)) => RowOp::Patch(merge(&before, &after)),
        // A partial update of a row deleted earlier in the batch cannot
        // happen on a consistent source; keep the patch so the row-missing
        // check reports it.
        (_, op) => op,
    };
    entry.lsn = lsn;
}

fn merge<'a>(before: &[Datum], after: &[Datum]) -> Cow<'a, [Datum]> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| {
            if *a == Datum::UnchangedToast {
                b.clone()
            } else {
                a.clone()
            }
        })
        .collect::<Vec<Datum>>()
        .into()
}

fn cast(target: &TargetTable, column: &str) -> String {
    target
        .types
        .get(column)
        .cloned()
        .unwrap_or_else(|| "text".to_owned())
}

/// `SELECT u.a::type_a, ... FROM unnest($1::text[], ...) AS u(a, ...)`.
fn unnest_select(names: &[&str], target: &TargetTable, first_param: usize) -> String {
    let casts: Vec<String> = names
        .iter()
        .map(|n| format!("u.{}::{}", quote_ident(n), cast(target, n)))
        .collect();
    let params: Vec<String> = (0..names.len())
        .map(|i| format!("${}::text[]", first_param + i))
        .collect();
    let aliases: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
    format!(
        "SELECT {} FROM unnest({}) AS u({})",
        casts.join(", "),
        params.join(", "),
        aliases.join(", ")
    )
}

fn upsert_sql(table: &TableName, names: &[&str], keys: &[&str], target: &TargetTable) -> String {
    let cols: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
    let key_cols: Vec<String> = keys.iter().map(|n| quote_ident(n)).collect();
    let updates: Vec<String> = names
        .iter()
        .filter(|n| !keys.contains(n))
        .map(|n| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
        .collect();
    let action = if updates.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {} ({}){} {} ON CONFLICT ({}) {action}",
        table.quoted(),
        cols.join(", "),
        target.overriding(names),
        unnest_select(names, target, 1),
        key_cols.join(", ")
    )
}

fn insert_sql(table: &TableName, names: &[&str], target: &TargetTable) -> String {
    let cols: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
    format!(
        "INSERT INTO {} ({}){} {}",
        table.quoted(),
        cols.join(", "),
        target.overriding(names),
        unnest_select(names, target, 1)
    )
}

/// Replaces existing rows by key with partial new rows (some columns
/// unchanged TOAST), for tables whose UPDATE cannot write a `GENERATED
/// ALWAYS` identity column: each old row is deleted and inserted again
/// with the columns sent (`present`, key first as in `patch_sql`) and the
/// others taken from the deleted row. Counts the rows written.
fn move_sql(
    table: &TableName,
    relation: &Relation,
    keys: &[&str],
    present: &[&str],
    target: &TargetTable,
) -> String {
    let mut names: Vec<&str> = keys.to_vec();
    names.extend_from_slice(present);
    let all: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    let values: Vec<String> = all
        .iter()
        .map(|n| {
            if names.contains(n) {
                format!("s.{}", quote_ident(n))
            } else {
                format!("d.{}", quote_ident(n))
            }
        })
        .collect();
    let joins: Vec<String> = keys
        .iter()
        .map(|n| format!("t.{0} = s.{0}", quote_ident(n)))
        .collect();
    let on: Vec<String> = keys
        .iter()
        .map(|n| format!("d.{0} = s.{0}", quote_ident(n)))
        .collect();
    let cols: Vec<String> = all.iter().map(|n| quote_ident(n)).collect();
    format!(
        "WITH s AS ({}), \
              d AS (DELETE FROM {only} AS t USING s WHERE {} RETURNING t.*) \
         INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM s JOIN d ON {}",
        typed_rows(&names, target),
        joins.join(" AND "),
        cols.join(", "),
        values.join(", "),
        on.join(" AND "),
        table = table.quoted(),
        only = target.only(table),
    )
}

/// The one-row form of [`move_sql`] for the change-by-change path: the
/// row found by `match_cols` (as in `update_one_sql`) is deleted and
/// inserted again with the columns `set` ($1...) and the rest unchanged.
fn move_one_sql(
    table: &TableName,
    relation: &Relation,
    match_cols: &[usize],
    set: &[usize],
    target: &TargetTable,
    keyed: bool,
) -> String {
    let values: Vec<String> = (0..relation.columns.len())
        .map(|i| {
            let name = &relation.columns[i].name;
            match set.iter().position(|s| *s == i) {
                Some(p) => format!("${}::text::{}", p + 1, cast(target, name)),
                None => format!("d.{}", quote_ident(name)),
            }
        })
        .collect();
    let cols: Vec<String> = relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let condition = match_condition(relation, match_cols, target, set.len() + 1, keyed);
    format!(
        "WITH d AS (DELETE FROM {only} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {only} WHERE {condition} LIMIT 1) RETURNING *) \
         INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM d",
        cols.join(", "),
        values.join(", "),
        table = table.quoted(),
        only = target.only(table),
    )
}

fn delete_sql(table: &TableName, keys: &[&str], target: &TargetTable) -> String {
    let cols: Vec<String> = keys.iter().map(|n| quote_ident(n)).collect();
    format!(
        "DELETE FROM {} WHERE ({}) IN ({})",
        target.only(table),
        cols.join(", "),
        unnest_select(keys, target, 1)
    )
}

/// `SELECT u.a::type_a AS a, ... FROM unnest($1::text[], ...) AS u(a, ...)`:
/// the rows of a batch, typed as the target's columns and named after them.
fn typed_rows(names: &[&str], target: &TargetTable) -> String {
    let select: Vec<String> = names
        .iter()
        .map(|n| format!("u.{0}::{1} AS {0}", quote_ident(n), cast(target, n)))
        .collect();
    let params: Vec<String> = (0..names.len())
        .map(|i| format!("${}::text[]", i + 1))
        .collect();
    let aliases: Vec<String> = names.iter().map(|n| quote_ident(n)).collect();
    format!(
        "SELECT {} FROM unnest({}) AS u({})",
        select.join(", "),
        params.join(", "),
        aliases.join(", ")
    )
}

fn patch_sql(table: &TableName, keys: &[&str], set: &[&str], target: &TargetTable) -> String {
    let mut names: Vec<&str> = keys.to_vec();
    names.extend_from_slice(set);
    let sets: Vec<String> = set
        .iter()
        .map(|n| format!("{0} = s.{0}", quote_ident(n)))
        .collect();
    let matches: Vec<String> = keys
        .iter()
        .map(|n| format!("t.{0} = s.{0}", quote_ident(n)))
        .collect();
    format!(
        "UPDATE {} AS t SET {} FROM ({}) AS s WHERE {}",
        target.only(table),
        sets.join(", "),
        typed_rows(&names, target),
        matches.join(" AND ")
    )
}

/// The columns and values that find the old row: its key, or for keyless
/// tables the whole old row (columns sent as unchanged are left out).
fn locator(
    relation: &Relation,
    spec: &KeySpec,
    tuple: &Tuple,
) -> (Vec<usize>, Vec<Option<String>>) {
    let cols: Vec<usize> = match spec {
        Some(key) => key.clone(),
        None => (0..relation.columns.len())
            .filter(|i| tuple.0[*i] != Datum::UnchangedToast)
            .collect(),
    };
    let values = cols.iter().map(|i| datum_text(&tuple.0[*i])).collect();
    (cols, values)
}

/// `UPDATE t SET a = $1::ta, ... WHERE <match>` for one row. Keyless tables
/// match one row whose every column's text equals the old row's (text
/// comparison works for every type, json included).
fn update_one_sql(
    table: &TableName,
    relation: &Relation,
    match_cols: &[usize],
    set: &[usize],
    target: &TargetTable,
    keyed: bool,
) -> String {
    let sets: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(p, i)| {
            let name = &relation.columns[*i].name;
            format!(
                "{} = ${}::text::{}",
                quote_ident(name),
                p + 1,
                cast(target, name)
            )
        })
        .collect();
    let condition = match_condition(relation, match_cols, target, set.len() + 1, keyed);
    if keyed {
        format!(
            "UPDATE {} SET {} WHERE {condition}",
            target.only(table),
            sets.join(", ")
        )
    } else {
        // A ctid is unique only within one table: a partitioned target (or
        // a parent with children) needs the tableoid too.
        format!(
            "UPDATE {0} SET {1} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {0} WHERE {condition} LIMIT 1)",
            target.only(table),
            sets.join(", ")
        )
    }
}

fn delete_one_sql(
    table: &TableName,
    relation: &Relation,
    match_cols: &[usize],
    target: &TargetTable,
    keyed: bool,
) -> String {
    let condition = match_condition(relation, match_cols, target, 1, keyed);
    if keyed {
        format!("DELETE FROM {} WHERE {condition}", target.only(table))
    } else {
        format!(
            "DELETE FROM {0} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {0} WHERE {condition} LIMIT 1)",
            target.only(table)
        )
    }
}

fn match_condition(
    relation: &Relation,
    match_cols: &[usize],
    target: &TargetTable,
    first: usize,
    keyed: bool,
) -> String {
    let parts: Vec<String> = match_cols
        .iter()
        .enumerate()
        .map(|(p, i)| {
            let name = &relation.columns[*i].name;
            if keyed {
                format!(
                    "{} = ${}::text::{}",
                    quote_ident(name),
                    first + p,
                    cast(target, name)
                )
            } else {
                format!(
                    "{}::text IS NOT DISTINCT FROM ${}::text",
                    quote_ident(name),
                    first + p
                )
            }
        })
        .collect();
    if parts.is_empty() {
        "true".to_owned()
    } else {
        parts.join(" AND ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{OldRow, RelationColumn, Tuple};

    fn relation() -> Arc<Relation> {
        let column = |name: &str, key: bool| RelationColumn {
            name: name.to_owned(),
            type_oid: 25,
            type_modifier: -1,
            key,
        };
        Arc::new(Relation {
            oid: 16_400,
            name: TableName::new("public", "t"),
            replica_identity: 'd',
            columns: vec![
                column("id", true),
                column("v", false),
                column("body", false),
            ],
        })
    }

    fn text(value: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    /// A row; `body: None` is an unchanged TOAST value.
    fn row(id: &str, v: &str, body: Option<&str>) -> Tuple {
        Tuple(vec![
            text(id),
            text(v),
            body.map_or(Datum::UnchangedToast, text),
        ])
    }

    fn key(id: &str) -> Tuple {
        Tuple(vec![text(id), Datum::Null, Datum::Null])
    }

    fn change(lsn: u64, kind: ChangeKind) -> Change {
        Change {
            xid: 1,
            subxid: 1,
            commit_lsn: None,
            lsn: Lsn::from_u64(lsn),
            ordinal: lsn,
            origin: None,
            kind,
        }
    }

    fn insert(r: &Arc<Relation>, lsn: u64, new: Tuple) -> Change {
        change(
            lsn,
            ChangeKind::Insert {
                relation: r.clone(),
                new,
            },
        )
    }

    fn update(r: &Arc<Relation>, lsn: u64, old: Option<Tuple>, new: Tuple) -> Change {
        change(
            lsn,
            ChangeKind::Update {
                relation: r.clone(),
                old: old.map(OldRow::Key),
                new,
            },
        )
    }

    fn delete(r: &Arc<Relation>, lsn: u64, old: Tuple) -> Change {
        change(
            lsn,
            ChangeKind::Delete {
                relation: r.clone(),
                old: OldRow::Key(old),
            },
        )
    }

    /// The batch as (key, final operation) in first-seen key order.
    fn coalesced(changes: &[Change]) -> Vec<(String, String)> {
        let mut pending = Vec::new();
        for c in changes {
            let relation = match &c.kind {
                ChangeKind::Insert { relation, .. }
                | ChangeKind::Update { relation, .. }
                | ChangeKind::Delete { relation, .. } => relation,
                ChangeKind::Truncate { .. }
                | ChangeKind::TruncatePartition(_)
                | ChangeKind::Ddl(_) => unreachable!(),
            };
            coalesce(&mut pending, c, relation, &[0]);
        }
        let show = |d: &Datum| match d {
            Datum::Text(b) => String::from_utf8_lossy(b).into_owned(),
            Datum::UnchangedToast => "(unchanged)".to_owned(),
            Datum::Null => "NULL".to_owned(),
            Datum::Binary(_) => "(binary)".to_owned(),
        };
        let batch = &pending[0];
        batch
            .rows
            .iter()
            .filter_map(|entry| {
                let id = String::from_utf8_lossy(entry.key[0]?).into_owned();
                let op = match &entry.op {
                    RowOp::Upsert(d) => format!(
                        "upsert {}",
                        d.iter().map(show).collect::<Vec<_>>().join(",")
                    ),
                    RowOp::Patch(d) => {
                        format!("patch {}", d.iter().map(show).collect::<Vec<_>>().join(","))
                    }
                    RowOp::Delete => "delete".to_owned(),
                };
                Some((id, op))
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, o)| ((*k).to_owned(), (*o).to_owned()))
            .collect()
    }

    #[test]
    fn a_key_changed_twice_ends_with_its_last_value() {
        let r = relation();
        let got = coalesced(&[
            insert(&r, 1, row("1", "a", Some("x"))),
            update(&r, 2, None, row("1", "b", Some("x"))),
            update(&r, 3, None, row("1", "c", Some("y"))),
        ]);
        assert_eq!(got, pairs(&[("1", "upsert 1,c,y")]));
    }

    #[test]
    fn a_key_deleted_and_inserted_again_ends_inserted_and_the_reverse_ends_deleted() {
        let r = relation();
        let got = coalesced(&[
            delete(&r, 1, key("1")),
            insert(&r, 2, row("1", "again", Some("x"))),
            insert(&r, 3, row("2", "short-lived", Some("x"))),
            delete(&r, 4, key("2")),
        ]);
        assert_eq!(got, pairs(&[("1", "upsert 1,again,x"), ("2", "delete")]));
    }

    #[test]
    fn a_key_update_deletes_the_old_key_and_writes_the_new() {
        let r = relation();
        let got = coalesced(&[
            insert(&r, 1, row("1", "a", Some("x"))),
            update(&r, 2, Some(key("1")), row("5", "a", Some("x"))),
        ]);
        assert_eq!(got, pairs(&[("1", "delete"), ("5", "upsert 5,a,x")]));
    }

    #[test]
    fn an_unchanged_toast_value_is_filled_from_the_batch_or_left_alone() {
        let r = relation();
        // After a full row in the same batch: the value is known.
        let got = coalesced(&[
            insert(&r, 1, row("1", "a", Some("big"))),
            update(&r, 2, None, row("1", "b", None)),
        ]);
        assert_eq!(got, pairs(&[("1", "upsert 1,b,big")]));
        // Without one: a patch that leaves the column as it is on the target,
        // two patches merged.
        let got = coalesced(&[
            update(&r, 1, None, row("2", "b", None)),
            update(&r, 2, None, row("2", "c", None)),
        ]);
        assert_eq!(got, pairs(&[("2", "patch 2,c,(unchanged)")]));
    }
}
