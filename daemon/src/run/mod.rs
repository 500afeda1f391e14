//! `cutover run`: copy the snapshot if it is not copied, then stream
//! changes to the target until stopped.
//!
//! ```text
//! stream (reader task) ──decode──> transactions ──bounded queue──> applier
//!        ^                          (items + bytes)                   │
//!        └──────────── durable LSN (watch) <── target COMMIT ─────────┘
//! ```
//!
//! The reader owns the replication stream and the decoder. It buffers each
//! transaction until its commit, spills streamed transactions to disk, and
//! hands committed transactions to the applier through a queue bounded in
//! transactions and in bytes: a slow or paused target shows as lag, never
//! as memory growth. The flush position reported to the source is only
//! ever what the applier reports as committed on the target.
//!
//! Transient failures (either server restarting, a network cut) end the
//! session; it is started again with exponential backoff and resumes from
//! the position recorded on the target. Definite failures stop the daemon
//! with the error.
//!
//! # Layout
//!
//! This module only wires the parts together and holds the error type:
//! [`supervisor`] (the daemon's life: copy, sessions, retries),
//! [`session`] (one stream session), [`reader`] (stream and decoder),
//! [`assembly`] (committed transactions from decoded events),
//! [`queue`] (the bounded queue), [`applier`] (batches to the sink) and
//! [`sampler`] (lag and coverage in the background).

use cutover_replication::error::ReplicationError;
use cutover_replication::sink::postgres::ApplyError;

use crate::copy::CopyError;

mod applier;
mod assembly;
mod queue;
mod reader;
mod routed;
mod sampler;
mod session;
mod supervisor;
mod watch;

pub use supervisor::{catch_up, drain, run, stream_plan};

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config has no target (a Kafka feed alone).
    #[error(transparent)]
    NoTarget(#[from] crate::config::NoTarget),
    /// The copy failed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// The source stream failed.
    #[error("source: {err}{}", err.hint().map(|h| format!(" ({h})")).unwrap_or_default())]
    Source {
        /// The error.
        err: ReplicationError,
    },
    /// Applying failed.
    #[error("{0}")]
    Apply(Box<ApplyError>),
    /// The Kafka feed failed.
    #[error(transparent)]
    Kafka(#[from] cutover_replication::sink::kafka::FeedError),
    /// A streamed transaction could not be written to disk.
    #[error("{0}")]
    Spill(String),
    /// A logical message of cutover's own could not be read.
    #[error("source: {0}")]
    Message(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The direction asked for has no slot to stream from.
    #[error(
        "the {0} direction has no slot yet: it is made by `cutover switch` (reverse) or `cutover rollback` (forward)"
    )]
    NoStream(crate::direction::Direction),
    /// The stray-write watcher failed.
    #[error("the stray-write watcher: {message}")]
    Strays {
        /// What went wrong and what to do.
        message: String,
        /// Whether starting again may cure it.
        transient: bool,
    },
}

impl RunError {
    /// Whether the source lost the slot (invalidated, or dropped), while
    /// streaming or before the copy finished: starting again cannot help,
    /// only what the error says to run.
    pub fn slot_lost(&self) -> bool {
        use cutover_replication::error::Cause;
        match self {
            RunError::Source {
                err: ReplicationError::Server { error, .. },
            } => matches!(error.cause, Some(Cause::SlotLost | Cause::SlotMissing)),
            RunError::Copy(copy) => matches!(copy, crate::copy::CopyError::SlotGone(_)),
            _ => false,
        }
    }

    pub(crate) fn is_transient(&self) -> bool {
        match self {
            RunError::Copy(err) => err.is_transient(),
            RunError::Spill(_)
            | RunError::Message(_)
            | RunError::Store(_)
            | RunError::NoStream(_)
            | RunError::NoTarget(_) => false,
            RunError::Source { err } => err.is_transient(),
            RunError::Strays { transient, .. } => *transient,
            RunError::Apply(err) => err.is_transient(),
            RunError::Kafka(err) => err.is_transient(),
        }
    }
}

impl From<ApplyError> for RunError {
    fn from(err: ApplyError) -> Self {
        RunError::Apply(Box::new(err))
    }
}

impl From<ReplicationError> for RunError {
    fn from(err: ReplicationError) -> RunError {
        RunError::Source { err }
    }
}
