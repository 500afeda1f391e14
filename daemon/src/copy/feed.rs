//! A Kafka feed alone (`[kafka]` and no `[target]`): nothing to copy. The
//! publications and the slot are made as for a copy, and the stream starts
//! at the slot's creation: the feed carries every change committed after
//! it. Recorded as a finished copy of no table, so that a restart streams
//! on from the slot.

use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::slot;

use crate::config::Config;
use crate::store::{Store, now_secs};

use super::orchestration::connect;
use super::orchestration::{new_slot, outcome, query, tables_in_scope};
use super::source::{
    ensure_publications, install_ddl_capture, install_partition_triggers, publications,
};
use super::{CopyError, CopyOutcome};

/// Makes the slot and the publications of a feed alone (or finds them
/// made) and returns where its stream starts.
pub(super) async fn prepare(config: &Config, store: &Store) -> Result<CopyOutcome, CopyError> {
    let source = connect(&config.source.conninfo, "source").await?;
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
            let (mut record, created) = new_slot(
                &source,
                &mut session,
                store,
                recorded.as_ref(),
                &config.slot,
                false,
                SnapshotAction::Nothing,
            )
            .await?;
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
