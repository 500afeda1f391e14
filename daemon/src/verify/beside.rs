//! A repair beside a running daemon: `cutover verify --repair` while the
//! daemon streams, and the background verifier with `[verify] repair`.
//!
//! The differences were found at a compared position the daemon has since
//! moved past, so they are not written as found. The daemon's applier is
//! held at a fresh position `L2` (a new temporary slot's consistent
//! point, taken the way the verify takes its own), the rows found
//! differing are read again on both sides there (the source in the slot's
//! snapshot, the target with the applier stopped at `L2`), and only those
//! that still differ are written, in one transaction, before the applier
//! goes on. A row the stream made equal in between is left alone; a row
//! the stream will change after `L2` is changed on top of the repaired
//! one, as it is on the source.
//!
//! The daemon's session holds the forward replication origin, so the
//! repair writes in an origin of its own
//! ([`crate::direction::Direction::repair_origin`]), which the reverse
//! direction skips as it skips the forward stream's writes.

use std::collections::HashMap;

use cutover_conflict::repair::Fix;
use cutover_replication::Lsn;

use crate::config::Config;
use crate::direction::Direction;

use super::daemon::Holder;
use super::table::{self, Plan};
use super::{VerifyError, connect, source_position_within};

/// What a repair beside a daemon did.
#[derive(Debug)]
pub(super) struct Repaired {
    /// The source position the rows were read again and written at.
    pub(super) at: Lsn,
    /// Per table, each row written (`inserted (id=1)`).
    pub(super) rows: HashMap<String, Vec<String>>,
}

/// Holds the daemon through `holder` at a fresh position and makes the
/// rows of `work` that still differ there equal to the source.
pub(super) async fn repair(
    config: &Config,
    holder: &Holder<'_>,
    work: &[(&Plan, Vec<Fix>)],
) -> Result<Repaired, VerifyError> {
    holder.arm().await?;
    let repaired = held(config, holder, work).await;
    // Released whatever happened; a failure to release is reported after
    // the repair's own failure, which says more.
    let released = holder.release().await;
    let repaired = repaired?;
    released?;
    Ok(repaired)
}

/// The repair, with the applier armed.
async fn held(
    config: &Config,
    holder: &Holder<'_>,
    work: &[(&Plan, Vec<Fix>)],
) -> Result<Repaired, VerifyError> {
    let (at, mut sources) = source_position_within(config, 1).await?;
    let reached = holder.hold_at(at).await?;
    tracing::info!(%at, %reached, "the daemon holds while the differing rows are read again and repaired");
    let target = connect(config, "target").await?;
    let Some(source) = sources.pop() else {
        return Err(VerifyError::Daemon(
            "no source reader for the repair".into(),
        ));
    };
    let mut fresh = Vec::new();
    for (plan, fixes) in work {
        let still = table::recheck(plan, &source, &target, fixes).await?;
        tracing::info!(
            table = %plan.table().name,
            found = fixes.len(),
            still_differing = still.len(),
            %at,
            "differing rows read again"
        );
        if !still.is_empty() {
            fresh.push((*plan, still));
        }
    }
    let rows = super::repair::repair(
        config,
        &Direction::repair_origin(&config.slot),
        HashMap::new(),
        at,
        &fresh,
    )
    .await?;
    Ok(Repaired { at, rows })
}
