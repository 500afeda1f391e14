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
//! From the slot's drop to the repair's commit, the store marks the resync
//! pending: a plain `run` refuses (it would stream onto a target that lacks
//! the lost changes), and `--resync` starts again, dropping the slot it
//! made if need be.
//!
//! It costs a read of both sides, where a new copy would write everything:
//! on a large database with a few hours of changes lost, the difference is
//! hours.

use std::collections::HashMap;
use std::sync::Arc;

use cutover_replication::Lsn;
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::slot;

use super::{
    VerifyError, compare_all, connect, plans, progress, query, repair, snapshot_readers,
    target_readers,
};
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
    /// Mapped tables loaded again through their mapping, with the source
    /// rows read.
    pub reloaded: Vec<(String, u64)>,
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
        for (table, n) in &self.reloaded {
            writeln!(
                f,
                "  {table}: loaded again through its mapping ({n} source rows)"
            )?;
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
    config.target()?;
    if config.kafka.is_some() {
        return Err(refused(
            "--resync repairs the target only: the Kafka feed would keep a gap where the slot's changes were lost. Publish a new snapshot into new topics (a new topic_prefix, [kafka] snapshot = true) after a fresh copy instead",
        ));
    }
    let state = store.switch_state()?;
    if state.primary != crate::switch::journal::Server::Source
        || state.journal.is_some()
        || !state.moved_groups().is_empty()
    {
        return Err(refused(
            "--resync remakes the forward stream of a migration not yet switched; after a switch, a rollback or a group moved (`switch --group`), the slots are the switch's and some rows the target's",
        ));
    }
    let pending = store.resync_pending()?;
    let slot_name = run.slot.clone();
    let source = connect(config, "source").await?;
    if let Some(found) = slot::slot_state(&source, &slot_name)
        .await
        .map_err(query("source", "reading the slot"))?
    {
        if found.active {
            return Err(refused(format!(
                "the slot {slot_name} is in use by process {}: stop whatever streams from it",
                found.active_pid.unwrap_or_default()
            )));
        }
        // A resync that did not finish made a slot nothing consumed: it is
        // made again with a new snapshot.
        if !found.is_invalidated() && !pending {
            return Err(refused(format!(
                "the slot {slot_name} is there and usable (wal_status {}): there is nothing to resync; `cutover run` streams from it",
                found.wal_status.as_deref().unwrap_or("unknown")
            )));
        }
    }
    // What is compared, before anything changes; mapped tables are
    // loaded again through their mapping instead.
    let plans = plans(config, None).await?;
    let mapped = {
        let tables = crate::copy::tables_in_scope(&source, config).await?;
        super::mapped::mapped_tables(config, &tables).await?
    };
    let workers = config.verify.workers.min(plans.len()).max(1);
    // From here until the repair commits, a plain `run` refuses: it would
    // stream onto a target that lacks the lost changes.
    store.put_resync(true, None)?;
    store.flush().await?;

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
        tracing::info!(slot = %slot_name, "the slot dropped, to be made again");
    }
    let created = session
        .create_slot(&slot_name, false, SnapshotAction::Export)
        .await
        .map_err(making)?;
    let at = created.consistent_point;
    let mut sources = snapshot_readers(
        config,
        workers + usize::from(!mapped.is_empty()),
        &created.snapshot.unwrap_or_default(),
    )
    .await?;
    let mapped_reader = if mapped.is_empty() {
        None
    } else {
        sources.pop()
    };
    drop(session);
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
    let mut reloaded = Vec::new();
    if let Some(reader) = &mapped_reader {
        for (mapping, table) in &mapped {
            let rows = super::mapped::reload(config, mapping, table, reader).await?;
            reloaded.push((format!("{} -> {}", mapping.source, mapping.target), rows));
        }
    }
    // A test stops here: the slot made again, the target not repaired.
    if std::env::var("CUTOVER_FAILPOINT").is_ok_and(|wanted| wanted == "resync:repair") {
        eprintln!("failpoint resync:repair: aborting");
        std::process::abort();
    }
    let origin = Direction::Forward.origin(&slot_name);
    let repaired = if work.is_empty() {
        HashMap::new()
    } else {
        repair::repair(config, &origin, HashMap::new(), at, &work).await?
    };

    // 4. The stream starts at `L`, and the resync is over.
    run.consistent_point = Some(at);
    store.put_resync(false, Some(&run))?;
    store.flush().await?;
    let mut repaired: Vec<(String, usize)> = repaired
        .into_iter()
        .map(|(table, rows)| (table, rows.len()))
        .collect();
    repaired.sort();
    Ok(Resynced {
        reloaded,
        slot: slot_name,
        at,
        tables: compared.len(),
        source_rows: compared.iter().map(|(_, r, _)| r.source_rows).sum(),
        repaired,
    })
}
