//! A Kafka feed alone (`[kafka]` and no `[target]`): nothing to copy. The
//! publications and the slot are made as for a copy, and the stream starts
//! at the slot's creation: the feed carries every change committed after
//! it. Recorded as a finished copy of no table, so that a restart streams
//! on from the slot.

use cutover_replication::client;
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::slot;

use crate::config::Config;
use crate::store::{CopyRun, Store, now_secs};

use super::orchestration::{outcome, query, tables_in_scope};
use super::source::{
    ensure_publications, install_ddl_capture, install_partition_triggers, publications,
};
use super::{CopyError, CopyOutcome};

/// Makes the slot and the publications of a feed alone (or finds them
/// made) and returns where its stream starts.
pub(super) async fn prepare(config: &Config, store: &Store) -> Result<CopyOutcome, CopyError> {
    let source = client::connect(&config.source.conninfo)
        .await
        .map_err(|source| CopyError::Connect {
            role: "source",
            source,
        })?;
    let tables = tables_in_scope(&source, config).await?;
    let run = store.copy_run()?;
    let done = match run {
        Some(existing) if existing.finished => {
            if slot::slot_state(&source, &existing.slot)
                .await
                .map_err(query("source", "reading the slot"))?
                .is_none()
            {
                return Err(CopyError::SlotGone(existing.slot.clone()));
            }
            existing
        }
        recorded => {
            ensure_publications(&source, store, config, &tables).await?;
            let mut session = Session::connect(&config.source.conninfo)
                .await
                .map_err(|err| CopyError::Replication { err })?;
            if let Some(state) = slot::slot_state(&source, &config.slot)
                .await
                .map_err(query("source", "reading the slot"))?
            {
                // Recorded and never finished: an interrupted start.
                match &recorded {
                    Some(r) if r.slot == config.slot && !state.active => session
                        .drop_slot(&config.slot, false)
                        .await
                        .map_err(|err| CopyError::Replication { err })?,
                    _ => return Err(CopyError::ForeignSlot(config.slot.clone())),
                }
            }
            let mut record = CopyRun {
                slot: config.slot.clone(),
                standalone: false,
                consistent_point: None,
                finished: false,
                started_at: now_secs(),
                finished_at: None,
                target_finished_us: None,
            };
            store.put_copy_run(&record)?;
            store.flush().await?;
            let created = session
                .create_slot(&config.slot, false, SnapshotAction::Nothing)
                .await
                .map_err(|err| CopyError::Replication { err })?;
            record.consistent_point = Some(created.consistent_point);
            record.finished = true;
            record.finished_at = Some(now_secs());
            store.put_copy_run(&record)?;
            store.flush().await?;
            tracing::info!(slot = %config.slot, start = %created.consistent_point, tables = tables.len(), "slot created for the Kafka feed alone: it carries the changes from here");
            record
        }
    };
    let mut prepared = outcome(store, &done)?;
    prepared.publications = publications(&source, config).await?;
    install_partition_triggers(&source, config).await?;
    install_ddl_capture(&source, config).await?;
    Ok(prepared)
}
