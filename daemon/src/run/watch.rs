//! The way back while the source is the primary: with `[[group]]`s
//! configured, `run` streams both directions at once. The reverse stream
//! reads the target (slot and publications `<slot>_reverse`, made when it
//! first starts, once the copy is done) and applies to the source the
//! changes to tables whose group's primary is the target (`switch
//! --group`); a change an application made there to any other table is a
//! stray write, recorded by the stream ([`super::routed`]).
//!
//! The resolver ([`resolve`]) settles every stray write recorded, by
//! either stream: the group's primary's rows are written over the other
//! server's (`primary_wins`), the way `verify --repair` repairs beside a
//! daemon ([`crate::verify::strays::write_back`]): the stream that writes
//! that server is held at a fresh position of the primary, each row is
//! read again by key on both sides there, and only rows that still differ
//! are written, in a repair origin that neither stream sends back. Each
//! is recorded with what was done, counted in
//! `cutover_conflicts_total{table,resolution}` and shown by `status`.
//! The resolver holds one stream at a time, never from inside a stream's
//! apply: the two streams never wait for each other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::slot;
use tokio::sync::watch;

use crate::config::Config;
use crate::copy::{self, CopyOutcome};
use crate::direction::Direction;
use crate::live::{DaemonState, Status};
use crate::store::{PendingStray, Store};
use crate::switch::journal::{Server, SwitchState};
use crate::verify::strays::{self, RowTime, Stray};
use cutover_conflict::policy::{self, Decision, Incoming, Local, Policy, Side};

use super::RunError;
use super::session::stopped;
use super::supervisor::{FIRST_BACKOFF, MAX_BACKOFF, stream_with_retries};

/// Streams the target's changes to the source until `shutdown`, once
/// `forward` (the daemon's forward stream) has begun streaming.
pub(super) async fn watch(
    config: Config,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
    forward: Arc<Status>,
    reverse: Arc<Status>,
) -> Result<(), RunError> {
    // Before the copy ends, the target holds the copy's own writes, which
    // carry no origin: the way back starts after it.
    if !wait_streaming(&forward, &mut shutdown).await {
        return Ok(());
    }
    let reverse_config = config.for_direction(Direction::Reverse);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        let ran = async {
            let plan = reverse_plan(&config, &store).await?;
            // What the target's slot keeps, beside the source slot's.
            let _sampled = super::supervisor::AbortOnDrop(tokio::spawn(sample_slot(
                reverse_config.clone(),
                plan.slot.clone(),
                Arc::clone(&forward),
            )));
            tracing::info!(slot = %plan.slot, start = %plan.start, "streaming the target's changes: a group's whose primary is the target to the source, stray writes to the resolver");
            stream_with_retries(
                &reverse_config,
                &store,
                &plan,
                shutdown.clone(),
                &reverse,
                None,
            )
            .await
        }
        .await;
        match ran {
            Ok(()) => return Ok(()),
            Err(err) if err.is_transient() => {
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(error = %err, retry_in = ?backoff, "the reverse stream stopped; it starts again");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(err) => return Err(err),
        }
    }
}

/// Waits until `status` streams; `false` when shut down first.
async fn wait_streaming(status: &Status, shutdown: &mut watch::Receiver<bool>) -> bool {
    loop {
        if status.state() == DaemonState::Streaming {
            return true;
        }
        tokio::select! {
            () = stopped(shutdown) => return false,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Where the reverse direction streams from while groups are configured
/// and no whole switch made its slot: the target's slot `<slot>_reverse`,
/// made if missing. `config` is the migration's, not swapped.
pub(super) async fn reverse_plan(config: &Config, store: &Store) -> Result<CopyOutcome, RunError> {
    let reverse = config.for_direction(Direction::Reverse);
    let (slot, start, publications) = prepare(&reverse, store).await?;
    Ok(CopyOutcome {
        slot,
        migration: migration(config, store)?,
        start,
        copied_at: HashMap::new(),
        tables: Vec::new(),
        publications,
    })
}

/// Every `lag_sample_interval`: how much WAL the target's slot retains
/// and its `wal_status`, in the same families as the source slot's
/// (`cutover_slot_retained_bytes{slot}`, `cutover_slot_wal_status`), so
/// that the same alerts watch it.
async fn sample_slot(reverse: Config, slot: String, forward: Arc<Status>) {
    let mut ticker = tokio::time::interval(reverse.lag_sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        ticker.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = cutover_replication::client::connect(&reverse.source.conninfo)
                .await
                .ok();
        }
        let Some(c) = &client else { continue };
        let Ok(Some(state)) = slot::slot_state(c, &slot).await else {
            continue;
        };
        if let Some(bytes) = state.retained_bytes {
            forward
                .metrics
                .slot_retained_bytes
                .with_label_values(&[&slot])
                .set(bytes.max(0));
        }
        if let Some(current) = state.wal_status.as_deref() {
            for status in crate::metrics::WAL_STATUSES {
                forward
                    .metrics
                    .slot_wal_status
                    .with_label_values(&[slot.as_str(), status])
                    .set(i64::from(*status == current));
            }
        }
    }
}

/// The migration's name, which its origins carry.
fn migration(config: &Config, store: &Store) -> Result<String, RunError> {
    Ok(store
        .copy_run()?
        .map_or_else(|| config.slot.clone(), |run| run.slot))
}

/// The reverse direction's publications and slot on the target, made if
/// missing, and where to start: after what the watcher handled, or where
/// the slot stands.
async fn prepare(reverse: &Config, store: &Store) -> Result<(String, Lsn, Vec<String>), RunError> {
    let target = cutover_replication::client::connect(&reverse.source.conninfo)
        .await
        .map_err(|e| strays_error(format!("connecting to the target: {e}"), true))?;
    // A server that does not answer may answer later; anything else it
    // says is for the operator to fix.
    let failed = |e: copy::CopyError| {
        let transient = e.is_transient();
        strays_error(
            format!("preparing the target's slot and publications: {e}"),
            transient,
        )
    };
    let tables = copy::tables_in_scope(&target, reverse)
        .await
        .map_err(failed)?;
    copy::ensure_publications(&target, store, reverse, &tables)
        .await
        .map_err(failed)?;
    let publications = copy::publications(&target, reverse).await.map_err(failed)?;
    let name = reverse.slot.clone();
    let existing = slot::slot_state(&target, &name)
        .await
        .map_err(|e| strays_error(format!("reading the target's replication slots: {e}"), true))?;
    let from_slot = match existing {
        Some(state) if state.wal_status.as_deref() == Some("lost") => {
            return Err(strays_error(
                format!(
                    "the target's slot {name} lost WAL it needed while cutover was down: stray writes made meanwhile were not seen; drop it (SELECT pg_drop_replication_slot('{name}');), start cutover again, and run `cutover verify --repair`"
                ),
                false,
            ));
        }
        Some(state) => state.confirmed_flush.ok_or_else(|| {
            strays_error(
                format!(
                    "the target's slot {name} cannot be streamed from (plugin {:?}, wal_status {:?}): drop it (SELECT pg_drop_replication_slot('{name}');) and start cutover again",
                    state.plugin, state.wal_status
                ),
                false,
            )
        })?,
        None => {
            let mut session = Session::connect(&reverse.source.conninfo).await?;
            let created = session
                .create_slot(&name, false, SnapshotAction::Nothing)
                .await?;
            tracing::info!(slot = %name, at = %created.consistent_point, "made the target's slot: stray writes are watched from here");
            created.consistent_point
        }
    };
    let start = store
        .stray_position()?
        .map_or(from_slot, |at| at.max(from_slot));
    Ok((name, start, publications))
}

fn strays_error(message: String, transient: bool) -> RunError {
    RunError::Strays { message, transient }
}

/// Settles the stray writes the streams recorded until `shutdown`: the
/// rows of each one's table group's primary (now) written over the other
/// server's, holding the stream that writes that server (`forward` writes
/// the target, `reverse` the source).
pub(super) async fn resolve(
    config: Config,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
    forward: Arc<Status>,
    reverse: Arc<Status>,
) -> Result<(), RunError> {
    commit_times_tracked(&config).await?;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let pending = store.pending_strays(PENDING_BATCH)?;
        if pending.is_empty() {
            tokio::select! {
                () = stopped(&mut shutdown) => return Ok(()),
                () = tokio::time::sleep(RESOLVE_EVERY) => {}
            }
            continue;
        }
        let state = store.switch_state()?;
        let by_written = match decide(&config, &store, &forward, &state, pending).await {
            Ok(by_written) => by_written,
            Err(err) if err.is_transient() => {
                tracing::warn!(error = %err, retry_in = ?backoff, "deciding stray writes failed; trying again");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopped(&mut shutdown) => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(err) => return Err(err),
        };
        for (written, batch) in by_written {
            let (side_config, holder) = match written {
                Server::Target => (config.clone(), &forward),
                Server::Source => (config.for_direction(Direction::Reverse), &reverse),
            };
            // The hold needs the stream that writes there running.
            if !wait_streaming(holder, &mut shutdown).await {
                return Ok(());
            }
            let settled = match settle(
                &side_config,
                &store,
                holder,
                &forward,
                written,
                batch.clone(),
            )
            .await
            {
                // One that cannot be settled (its table dropped, say) must
                // not hold up the others nor stop the daemon: found one at
                // a time, recorded as failed and parked for an operator.
                Err(err) if !err.is_transient() => {
                    let mut outcome = Ok(());
                    for stray in batch {
                        match settle(
                            &side_config,
                            &store,
                            holder,
                            &forward,
                            written,
                            vec![stray.clone()],
                        )
                        .await
                        {
                            Ok(()) => {}
                            Err(err) if err.is_transient() => {
                                outcome = Err(err);
                                break;
                            }
                            Err(err) => set_aside(&store, &forward, &stray, Some(&err)).await?,
                        }
                    }
                    outcome
                }
                other => other,
            };
            match settled {
                Ok(()) => backoff = FIRST_BACKOFF,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?backoff, "resolving stray writes failed; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopped(&mut shutdown) => return Ok(()),
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// With a `last_write_wins` group, both servers must track commit times.
async fn commit_times_tracked(config: &Config) -> Result<(), RunError> {
    let groups = config.groups.comparing_commit_times();
    if groups.is_empty() {
        return Ok(());
    }
    for (name, conninfo) in [
        ("source", &config.source.conninfo),
        ("target", &config.target()?.conninfo),
    ] {
        let client = cutover_replication::client::connect(conninfo)
            .await
            .map_err(|e| strays_error(format!("connecting to the {name}: {e}"), true))?;
        let on: String = client
            .query_one("SELECT current_setting('track_commit_timestamp')", &[])
            .await
            .map_err(|e| {
                strays_error(
                    format!(
                        "reading track_commit_timestamp on the {name}: {}",
                        cutover_replication::client::describe(&e)
                    ),
                    true,
                )
            })?
            .get(0);
        if on != "on" {
            return Err(strays_error(
                format!(
                    "group {} compares commit times (policy last_write_wins or bidirectional): the {name} does not keep them (track_commit_timestamp is {on}): ALTER SYSTEM SET track_commit_timestamp = on; and restart the {name}",
                    groups.join(", ")
                ),
                false,
            ));
        }
    }
    Ok(())
}

/// The server named `name` in a record.
fn server_named(name: &str) -> Server {
    if name == Server::Target.name() {
        Server::Target
    } else {
        Server::Source
    }
}

fn side_of(server: Server) -> Side {
    match server {
        Server::Source => Side::Source,
        Server::Target => Side::Target,
    }
}

/// Decides each of `pending` by its group's policy (or an operator's
/// choice): `manual` ones are parked; the others are returned by the
/// server their losing row is on, which the winning row is written over.
async fn decide(
    config: &Config,
    store: &Store,
    forward: &Status,
    state: &SwitchState,
    pending: Vec<PendingStray>,
) -> Result<Vec<(Server, Vec<PendingStray>)>, RunError> {
    let mut by_written: Vec<(Server, Vec<PendingStray>)> = Vec::new();
    let mut push = |written: Server, stray: PendingStray| match by_written
        .iter_mut()
        .find(|(s, _)| *s == written)
    {
        Some((_, list)) => list.push(stray),
        None => by_written.push((written, vec![stray])),
    };
    let mut by_time: Vec<PendingStray> = Vec::new();
    for stray in pending {
        let side = server_named(&stray.record.side);
        let primary = state.group_primary(&stray.record.group);
        let schema_change = stray.rows.is_empty() && !stray.whole;
        let winner = match (&stray.use_side, config.groups.policy(&stray.record.group)) {
            // Reported: no row is written.
            _ if schema_change => primary,
            (Some(chosen), _) => server_named(chosen),
            (None, Policy::Manual) => {
                set_aside(store, forward, &stray, None).await?;
                continue;
            }
            // Its group moved to where it was made since.
            (None, _) if side == primary => side,
            (None, Policy::LastWriteWins) => {
                by_time.push(stray);
                continue;
            }
            (None, _) => primary,
        };
        push(winner.other(), stray);
    }
    // last_write_wins: each stray write against the row its group's
    // primary holds under the same key.
    for primary in [Server::Source, Server::Target] {
        let (mine, rest): (Vec<PendingStray>, Vec<PendingStray>) = by_time
            .into_iter()
            .partition(|s| state.group_primary(&s.record.group) == primary);
        by_time = rest;
        if mine.is_empty() {
            continue;
        }
        let reads_primary = match primary {
            Server::Source => config.clone(),
            Server::Target => config.for_direction(Direction::Reverse),
        };
        let rows: Vec<Stray> = mine
            .iter()
            .map(|s| Stray {
                table: s.table.clone(),
                fields: s.rows.first().cloned().unwrap_or_default(),
            })
            .collect();
        let times = strays::commit_times(&reads_primary, &rows)
            .await
            .map_err(|e| {
                let transient = e.is_transient();
                strays_error(
                    format!("reading commit times on the {}: {e}", primary.name()),
                    transient,
                )
            })?;
        for (stray, time) in mine.into_iter().zip(times) {
            let side = server_named(&stray.record.side);
            let local = match time {
                RowTime::At(at) => Local::Written(Some(at)),
                RowTime::Unknown => Local::Written(None),
                // The primary has no row: a new row made on the other
                // server wins; an update or a delete of a row the primary
                // deleted (when, no server says) does not.
                RowTime::Absent if stray.record.op == "insert" => Local::Clear,
                RowTime::Absent => Local::Written(None),
            };
            let incoming = Incoming {
                from: side_of(side),
                committed_at: stray.committed_us,
            };
            let verdict = policy::decide(Policy::LastWriteWins, side_of(primary), incoming, local);
            let winner = if verdict.decision == Decision::Apply {
                side
            } else {
                primary
            };
            push(winner.other(), stray);
        }
    }
    Ok(by_written)
}

/// Sets a stray write aside for an operator, recorded as `parked` (a
/// `manual` group's) or `failed` (with `err`: it could not be settled);
/// an operator's `RESOLVE` settles it with the side chosen.
async fn set_aside(
    store: &Store,
    forward: &Status,
    stray: &PendingStray,
    err: Option<&RunError>,
) -> Result<(), RunError> {
    let mut record = stray.record.clone();
    record.resolution = if err.is_some() { "failed" } else { "parked" }.into();
    let resolve = format!(
        "`cutover conflicts resolve {0} --use source|target` (or RESOLVE {0} USE SOURCE | TARGET in the console)",
        record.id
    );
    match err {
        Some(err) => tracing::error!(
            id = record.id,
            table = %record.table,
            op = %record.op,
            key = %record.key,
            side = %record.side,
            error = %err,
            "a stray write could not be settled: it is parked; fix what the error says, then {resolve}"
        ),
        None => tracing::warn!(
            id = record.id,
            table = %record.table,
            op = %record.op,
            key = %record.key,
            side = %record.side,
            "stray write parked (group {} is manual): both rows are left as they are until {resolve}",
            record.group
        ),
    }
    store.park_stray(stray, &record).await?;
    forward
        .metrics
        .conflicts
        .with_label_values(&[record.table.as_str(), record.resolution.as_str()])
        .inc();
    Ok(())
}

/// How many pending stray writes one round resolves.
const PENDING_BATCH: usize = 1000;
/// How often the resolver looks for stray writes when there were none.
const RESOLVE_EVERY: Duration = Duration::from_millis(250);

/// Writes the primary's rows over `batch` on `written` (with `config`
/// reading the primary and writing `written`, holding `holder`), and
/// records what was done.
async fn settle(
    config: &Config,
    store: &Store,
    holder: &Status,
    forward: &Status,
    written: Server,
    batch: Vec<PendingStray>,
) -> Result<(), RunError> {
    let mut rows: Vec<Stray> = Vec::new();
    let mut whole: Vec<TableName> = Vec::new();
    let mut indexes: Vec<Vec<usize>> = Vec::with_capacity(batch.len());
    for stray in &batch {
        let table = stray.table.clone();
        if stray.whole && !whole.contains(&table) {
            whole.push(table.clone());
        }
        let mut mine = Vec::with_capacity(stray.rows.len());
        for fields in &stray.rows {
            rows.push(Stray {
                table: table.clone(),
                fields: fields.clone(),
            });
            mine.push(rows.len() - 1);
        }
        indexes.push(mine);
    }
    let done = if rows.is_empty() && whole.is_empty() {
        strays::WrittenBack::default()
    } else {
        strays::write_back(config, holder, &rows, &whole)
            .await
            .map_err(|e| {
                let transient = e.is_transient();
                strays_error(
                    format!(
                        "writing the primary's rows over the {}: {e}",
                        written.name()
                    ),
                    transient,
                )
            })?
    };
    for (stray, mine) in batch.iter().zip(indexes) {
        let was_written = stray.whole
            || mine
                .iter()
                .any(|i| done.rows.get(*i).is_some_and(|(_, w)| *w));
        // On the server the stray write was made: the primary's rows
        // written back over it; on the other one (its group moved there
        // since): its row carried to the other server. A schema change
        // has no row: it is reported.
        let resolution = if stray.rows.is_empty() && !stray.whole {
            "reported"
        } else {
            match (was_written, stray.record.side == written.name()) {
                (false, _) => "equal",
                // An operator's choice.
                (true, _) if stray.use_side.as_deref() == Some("source") => "chose_source",
                (true, _) if stray.use_side.is_some() => "chose_target",
                (true, true) => "written_back",
                (true, false) => "carried_over",
            }
        };
        let mut record = stray.record.clone();
        if let Some((key, _)) = mine.first().and_then(|i| done.rows.get(*i)) {
            record.key = key.clone();
        }
        record.resolution = resolution.into();
        record.resolved_at = done.at;
        tracing::info!(
            table = %record.table,
            op = %record.op,
            key = %record.key,
            at = %record.lsn,
            side = %record.side,
            resolution,
            "stray write resolved: {}",
            match resolution {
                "written_back" => "the primary's rows are written back over it",
                "carried_over" => "its group's primary is now where it was made: its row is carried to the other server",
                "reported" => "a schema change cutover cannot write back: look at it, and bring the table back to the primary's",
                "chose_source" | "chose_target" => "the operator's choice is written over the other server",
                _ => "the row was equal on both servers again",
            }
        );
        store.resolve_stray(stray, &record)?;
        forward
            .metrics
            .conflicts
            .with_label_values(&[record.table.as_str(), resolution])
            .inc();
    }
    store.flush().await?;
    Ok(())
}
