//! Why the PostgreSQL sink stopped, and which failures are worth a retry.

use crate::catalog::TableName;
use crate::client::{ConnectError, describe};
use crate::lsn::Lsn;

/// Why applying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Could not connect to the target.
    #[error("target: {0}")]
    Connect(#[from] ConnectError),
    /// The target refused a change.
    #[error(
        "target refused {op} on {table} key {key} at source LSN {lsn}: {detail} (SQLSTATE {sqlstate}){}",
        resource_hint(sqlstate).map(|h| format!("; {h}")).unwrap_or_default()
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

/// What to do when the target runs out of a resource (SQLSTATE class 53):
/// found by the code, never by the server's message.
pub fn resource_hint(sqlstate: &str) -> Option<&'static str> {
    match sqlstate {
        // disk_full
        "53100" => Some(
            "the target's disk is full: free space there (or move the table to a tablespace with room), then start cutover again: it resumes after the last transaction the target committed, and nothing is lost",
        ),
        // out_of_memory
        "53200" => Some(
            "the target ran out of memory: lower apply.batch_rows or give the server more, then start cutover again; nothing is lost",
        ),
        // too_many_connections, configuration_limit_exceeded
        "53300" | "53400" => Some(
            "the target hit a configured limit (connections, locks): raise it or lower copy.workers, then start cutover again; nothing is lost",
        ),
        _ => None,
    }
}

pub(super) fn is_transient_sqlstate(code: &str) -> bool {
    // Connection exceptions, operator intervention, lock/serialization.
    code.starts_with("08")
        || code.starts_with("57")
        || code == "40001"
        || code == "40P01"
        || code == "55006"
}

/// Whether a statement's failure may pass by reconnecting and trying
/// again: the connection was lost (closed, reset, timed out by TCP), or
/// the server answered with a connection, shutdown or serialization
/// SQLSTATE. A full disk or any other refusal is not.
pub fn is_transient_error(err: &tokio_postgres::Error) -> bool {
    err.is_closed()
        || err.as_db_error().is_none()
        || err.code().is_some_and(|c| is_transient_sqlstate(c.code()))
}

pub(super) fn session_error(
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
    let what = what.into();
    move |err| {
        let transient = is_transient_error(&err);
        ApplyError::Session {
            what,
            detail: describe(&err),
            transient,
        }
    }
}

/// A pipeline ended before the reply to `what`.
pub(super) fn missing_reply(what: &str) -> ApplyError {
    ApplyError::Session {
        what: what.into(),
        detail: "no reply".into(),
        transient: true,
    }
}
