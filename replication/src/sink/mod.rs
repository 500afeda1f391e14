//! Sinks: where a direction's committed source transactions go.
//!
//! A direction (forward: source to target; reverse: the same with the two
//! servers swapped) reads one slot and hands whole committed transactions,
//! in commit order, to its sinks. [`postgres`] writes them to a PostgreSQL
//! server; a Kafka sink will sit beside it behind the same trait, writing
//! [`envelope`]'s messages. The
//! reader acknowledges the slot only up to the position that every sink of
//! the direction reports durable.

use std::future::Future;
use std::path::Path;

use crate::change::{Change, Commit, SourceTransaction};
use crate::lsn::Lsn;

pub mod envelope;
pub mod filter;
pub mod kafka;
pub mod postgres;

/// The delivery contract between a direction's reader and a sink.
///
/// - **Order.** Transactions arrive in source commit order, each whole
///   (all its changes, or none, in one call). A sink may merge consecutive
///   transactions into one write of its own; it never reorders them and
///   never makes part of a transaction visible without the rest
///   (docs/architecture.md invariant 3).
/// - **Applied.** [`Sink::applied`] is the end LSN of the last transaction
///   the sink has written (committed on its side, perhaps not durable).
///   It never moves backward. A transaction ending at or before it is
///   skipped when offered again: after a restart the source sends again
///   everything above the slot's confirmed position (invariant 2).
/// - **Durable.** [`Sink::durable`] is the end LSN up to which everything
///   written survives a crash of the sink's server (for PostgreSQL: the
///   commit record is flushed to its WAL). It never passes `applied`, and
///   the sink records it atomically with the data, so that after a crash
///   the sink's own record says where to resume.
/// - **Acknowledged.** The reader reports to the source, as the slot's
///   flush position, at most the least `durable` of its sinks
///   (invariant 1). A position not yet durable is never acknowledged;
///   acknowledging less than is durable is always safe.
/// - **Refusal.** A change the sink cannot write is an error that names
///   the change (table, key, LSN) and leaves the sink as it was before the
///   call's transaction: nothing is skipped (invariant 6).
pub trait Sink: Send {
    /// Why a write failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Writes `transactions` (consecutive, in commit order). Those ending
    /// at or before [`Sink::applied`] are skipped. Returns the new
    /// applied position.
    fn apply(
        &mut self,
        transactions: &[SourceTransaction],
    ) -> impl Future<Output = Result<Lsn, Self::Error>> + Send;

    /// Writes one transaction too big for memory, read back from its spill
    /// file in pieces of `batch_rows` changes; it still becomes visible
    /// whole.
    fn apply_spilled(
        &mut self,
        path: &Path,
        commit: &Commit,
        batch_rows: usize,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether the sink writes `change` of a transaction committed at
    /// `commit_lsn`, or skips it (a change carrying an origin it skips, so
    /// that nothing loops; one its table's copy already holds). What the
    /// daemon counts as applied.
    fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool;

    /// The end LSN of the last transaction written.
    fn applied(&self) -> Lsn;

    /// The end LSN up to which everything written is durable.
    fn durable(&self) -> Lsn;

    /// Whether written transactions wait to become durable.
    fn flush_pending(&self) -> bool;

    /// Asks the sink's server how far its writes are durable, and returns
    /// the new durable position.
    fn refresh_durable(&mut self) -> impl Future<Output = Result<Lsn, Self::Error>> + Send;

    /// Waits until everything written is durable.
    fn wait_durable(&mut self) -> impl Future<Output = Result<Lsn, Self::Error>> + Send;
}
