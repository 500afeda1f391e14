//! `cutover run --resync`: the way back to streaming after the source lost
//! the slot (invalidated by `max_slot_wal_keep_size` while the daemon was
//! down, or dropped by hand), without truncating and copying every table
//! again.
//!
//! 1. The lost slot is dropped, and made again with an exported snapshot:
//!    its consistent point `L` is where the stream starts again.
//! 2. Every table is read in that snapshot on the source and as it is on
//!    the target (nothing writes there: the daemon is not running, and the
//!    target takes no writes before the switch), and merged by key, as
//!    `cutover verify` does.
//! 3. What differs is written on the target in one transaction that moves
//!    the replication origin to `L` ([`super::repair`]): the target then
//!    holds exactly what the source held at `L`.
//! 4. The copy's record starts at `L`; `cutover run` streams from there.
//!
//! It costs a read of both sides, where a new copy would write everything:
//! on a large database with a few hours of changes lost, the difference is
//! hours.

use std::collections::HashMap;
use std::sync::Arc;

use cutover_replication::Lsn;
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::{slot, snapshot};

use super::{VerifyError, compare_all, connect, plans, progress, query, repair, target_readers};
use crate::config::Config;
use crate::direction::Direction;
use crate::store::Store;

/// What the resync did.
#[derive(Debug)]
pub struct Resynced {
    /// The slot, made again.
    pub slot: String,
    /// Where the stream starts again.
    pub at: Lsn,
    /// Tables compared.
    pub tables: usize,
    /// Rows compared on the source.
    pub source_rows: u64,
    /// Rows written or deleted on the target, per table.
    pub repaired: Vec<(String, usize)>,
}

impl std::fmt::Display for Resynced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows: usize = self.repaired.iter().map(|(_, n)| n).sum();
        writeln!(
            f,
            "resync: slot {} made again at {}; {} tables compared ({} source rows), {rows} target rows repaired",
            self.slot, self.at, self.tables, self.source_rows
        )?;
        for (table, n) in &self.repaired {
            writeln!(f, "  {table}: {n} rows")?;
        }
        Ok(())
    }
}

/// Why a resync cannot start, or cannot make its slot.
fn refused(message: impl Into<String>) -> VerifyError {
    VerifyError::Resync(message.into())
}

/// Makes the forward slot again and brings the target to where it
/// starts (see the module's documentation).
pub async fn resync(config: &Config, store: &Store) -> Result<Resynced, VerifyError> {
    let Some(mut run) = store.copy_run()?.filter(|r| r.finished && !r.standalone) else {
        return Err(refused(
            "--resync repairs a migration whose copy finished; there is none in this state directory: `cutover run` copies",
        ));
    };
    let state = store.switch_state()?;
    if state.primary != crate::switch::journal::Server::Source || state.journal.is_some() {
        return Err(refused(
            "--resync remakes the forward stream of a migration not yet switched; after a switch or rollback the slots are the switch's",
        ));
    }
    let slot_name = run.slot.clone();
    let source = connect(config, "source").await?;
    if let Some(found) = slot::slot_state(&source, &slot_name)
        .await
        .map_err(query("source", "reading the slot"))?
    {
        if !found.is_invalidated() {
            return Err(refused(format!(
                "the slot {slot_name} is there and usable (wal_status {}): there is nothing to resync; `cutover run` streams from it",
                found.wal_status.as_deref().unwrap_or("unknown")
            )));
        }
        if found.active {
            return Err(refused(format!(
                "the slot {slot_name} is in use by process {}: stop whatever streams from it",
                found.active_pid.unwrap_or_default()
            )));
        }
    }

    // 1. The slot, made again, and its snapshot in every source reader.
    let making = |e: cutover_replication::error::ReplicationError| {
        refused(format!("making the slot {slot_name} again: {e}"))
    };
    let mut session = Session::connect(&config.source.conninfo)
        .await
        .map_err(making)?;
    if slot::slot_state(&source, &slot_name)
        .await
        .map_err(query("source", "reading the slot"))?
        .is_some()
    {
        session.drop_slot(&slot_name, false).await.map_err(making)?;
        tracing::info!(slot = %slot_name, "the invalidated slot dropped");
    }
    let plans = plans(config, None).await?;
    let workers = config.verify.workers.min(plans.len()).max(1);
    let created = session
        .create_slot(&slot_name, false, SnapshotAction::Export)
        .await
        .map_err(making)?;
    let at = created.consistent_point;
    let snapshot_name = created.snapshot.unwrap_or_default();
    let mut sources = Vec::with_capacity(workers);
    for _ in 0..workers {
        let client = connect(config, "source").await?;
        snapshot::open_snapshot(&client, &snapshot_name)
            .await
            .map_err(query("source", "importing the slot's snapshot"))?;
        sources.push(client);
    }
    drop(session);
    // From here the slot holds WAL from `L`: the stream starts there, even
    // if the comparison below is interrupted (the next resync finds the
    // slot usable, and a verify --repair finishes the job).
    run.consistent_point = Some(at);
    store.put_copy_run(&run)?;
    store.flush().await?;
    tracing::info!(slot = %slot_name, %at, tables = plans.len(), "slot made again; comparing both sides as of its snapshot");

    // 2. Both sides compared.
    let targets = target_readers(config, workers).await?;
    let progress = Arc::new(progress::ProgressFile::open(&config.state_dir, true)?);
    let compared = compare_all(plans, sources, targets, config, true, at, progress).await?;

    // 3. The differences written, the origin moved to `L`.
    let work: Vec<_> = compared
        .iter()
        .map(|(plan, _, fixes)| (plan, fixes.clone()))
        .filter(|(_, fixes)| !fixes.is_empty())
        .collect();
    let origin = Direction::Forward.origin(&slot_name);
    let repaired = if work.is_empty() {
        HashMap::new()
    } else {
        repair::repair(config, &origin, HashMap::new(), at, &work).await?
    };
    let mut repaired: Vec<(String, usize)> = repaired
        .into_iter()
        .map(|(table, rows)| (table, rows.len()))
        .collect();
    repaired.sort();
    Ok(Resynced {
        slot: slot_name,
        at,
        tables: compared.len(),
        source_rows: compared.iter().map(|(_, r, _)| r.source_rows).sum(),
        repaired,
    })
}
