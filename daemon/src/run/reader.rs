//! The reader: the replication stream, the decoder and the transactions
//! being assembled, in one task. It alone talks to the source: it reports
//! the durable position the applier publishes, and keeps the stream alive
//! while the queue is full.

use std::path::PathBuf;
use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::error::ReplicationError;
use cutover_replication::pgoutput::{Decoder, Event};
use cutover_replication::stream::{ReplicationStream, StreamMessage};
use tokio::sync::watch;

use crate::config::ApplySettings;

use super::RunError;
use super::assembly::Assembly;
use super::queue::Queue;
use super::session::stopped;

/// The reader: stream → decoder → committed transactions on the queue.
///
/// With `until`, the reader queues every transaction that commits before
/// that position and none after it, then tells the applier and stops:
/// the session ends with the target exactly as the source was at `until`
/// (a transaction is in a snapshot taken at `until` if and only if its
/// commit record is before it).
pub(super) async fn read_stream(
    mut stream: ReplicationStream,
    spill_dir: PathBuf,
    settings: ApplySettings,
    queue: Queue,
    mut durable: watch::Receiver<Lsn>,
    mut shutdown: watch::Receiver<bool>,
    until: Option<Lsn>,
) -> Result<(), RunError> {
    let mut decoder = Decoder::new();
    let mut assembly = Assembly::new(spill_dir, settings.spill_bytes, *durable.borrow());
    // Acknowledgements are sent at most every FEEDBACK_EVERY: each one that
    // moves the slot makes the walsender save (and fsync) the slot's state
    // file, and one per applied batch would stall the stream it feeds.
    let mut feedback = tokio::time::interval(FEEDBACK_EVERY);
    feedback.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acknowledged = assembly.forwarded();
    // While waiting for a position (a switch's drain, a verify's hold), a
    // quiet source is asked how far it has read every PROBE_EVERY: its
    // own keepalive comes only every wal_sender_timeout / 2, and each
    // millisecond here is one of the switch's write-unavailability window.
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last hold position the applier was told the reader passed.
    let mut marked: Option<Lsn> = None;
    loop {
        // What one read brought is decoded in one go; the duties below
        // (shutdown, durability, acknowledgements) are looked at between
        // reads, not per message: polling them costs more than decoding.
        let message = match stream.next_buffered()? {
            Some(message) => Some(message),
            None => tokio::select! {
                biased;
                // Stop reading; the applier finishes its batch and reports.
                () = stopped(&mut shutdown) => break,
                // Durable on the target: the flush position may move up to
                // here (invariant 1), reported with the next tick.
                changed = durable.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let lsn = *durable.borrow_and_update();
                    stream.set_flushed(lsn);
                    continue;
                }
                _ = probe.tick(), if (until.is_some() || queue.status.hold.target().is_some())
                    && !decoder.in_transaction() => {
                    stream.request_reply().await?;
                    continue;
                }
                _ = feedback.tick() => {
                    let lsn = *durable.borrow();
                    if lsn > acknowledged {
                        stream.set_flushed(lsn);
                        stream.send_status().await?;
                        acknowledged = lsn;
                    }
                    continue;
                }
                message = stream.next() => message?,
            },
        };
        let Some(message) = message else {
            // The server ended the stream (shutting down): reconnect.
            if !*shutdown.borrow() {
                return Err(stream.ended_by_server().into());
            }
            break;
        };
        let (lsn, data, sent) = match message {
            StreamMessage::XLogData {
                wal_start,
                data,
                server_time,
                ..
            } => (wal_start, data, server_time),
            StreamMessage::Keepalive { wal_end, .. } => {
                // The next BEGIN says again whether the stream is behind;
                // until then (a quiet source, a switch's drain waiting on
                // these keepalives) every read goes at once.
                stream.set_behind(false);
                // The source read past `until` with no transaction open:
                // every one that commits before it was queued.
                if let Some(until) = until
                    && wal_end >= until
                    && !decoder.in_transaction()
                {
                    queue.reached(until).await?;
                    break;
                }
                // The same for a verify's hold on a running daemon; the
                // reader goes on. A full queue holds transactions before
                // the marker would go: the next keepalive tries again.
                if let Some(target) = queue.status.hold.target()
                    && wal_end >= target
                    && !decoder.in_transaction()
                    && marked != Some(target)
                    && queue.mark(target)
                {
                    marked = Some(target);
                }
                // Nothing in flight and everything forwarded is durable:
                // the source may forget up to here (as PostgreSQL's own
                // apply does), or an idle database would retain WAL.
                let idle = !assembly.in_flight() && !decoder.in_transaction();
                if idle && *durable.borrow() >= assembly.forwarded() {
                    stream.set_flushed(wal_end);
                    queue.status.caught_up(wal_end);
                }
                continue;
            }
        };
        let event = decoder
            .decode(lsn, data)
            .map_err(|source| ReplicationError::Decode {
                endpoint: stream.endpoint().to_owned(),
                lsn,
                source,
            })?;
        // Behind: the source sends a transaction well after it committed
        // (both times on the source's clock). The stream then reads in
        // larger pieces; see `ReplicationStream::set_behind`.
        if let Event::Begin { commit_time, .. } = &event {
            stream.set_behind(sent.micros().saturating_sub(commit_time.micros()) > BEHIND_MICROS);
        }
        if let Some(until) = until
            && beyond(&event, until)
        {
            queue.reached(until).await?;
            break;
        }
        if let Some(item) = assembly.take(event)?
            && !queue
                .push(&mut stream, &durable, &mut shutdown, item)
                .await?
        {
            break;
        }
    }
    // Shutdown: wait for the applier's last word, report it, stop cleanly.
    tracing::debug!("stream reader stopping: waiting for the applier's last durable position");
    drop(queue);
    while durable.changed().await.is_ok() {}
    tracing::debug!(flushed = %*durable.borrow(), "stopping the stream");
    let last = *durable.borrow();
    stream.set_flushed(last);
    match stream.stop().await {
        Ok(_) => {}
        // The final position went out before CopyDone: closing the
        // connection without the server's answer loses nothing.
        Err(ReplicationError::Timeout { .. }) => {
            tracing::warn!(flushed = %last, "the source did not confirm the end of the stream in time; closing the connection");
        }
        Err(err) => return Err(err.into()),
    }
    assembly.discard();
    tracing::info!(flushed = %last, "stream stopped");
    Ok(())
}

/// Whether `event` starts or commits a transaction that commits at or
/// after `until`: the first one a snapshot taken at `until` does not hold.
fn beyond(event: &Event, until: Lsn) -> bool {
    match event {
        Event::Begin { final_lsn, .. } => *final_lsn >= until,
        Event::StreamCommit(commit) => commit.commit_lsn >= until,
        _ => false,
    }
}

/// How long after its commit a transaction must be sent for the stream to
/// count as behind: a catch-up, not live changes, whose extra millisecond
/// of gathering (see `ReplicationStream::set_behind`) is then 2% of it.
const BEHIND_MICROS: i64 = 50_000;

/// How often the durable position is acknowledged to the source.
pub(super) const FEEDBACK_EVERY: Duration = Duration::from_millis(200);

/// How often a quiet source is asked how far it has read while the reader
/// waits for a position.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(5);
