//! The replication stream: CopyBoth after `START_REPLICATION`.
//!
//! The stream owns the wire. It hands out XLogData and keepalives, answers
//! keepalives that ask for a reply at once, and sends a standby status
//! update at least every `wal_sender_timeout / 3` otherwise, so the server
//! never drops an idle consumer.
//!
//! Progress rules (docs/architecture.md invariant 1):
//!
//! - The flush position reported to the server is set only by the
//!   consumer, through [`ReplicationStream::set_flushed`], once the changes
//!   up to it are durably applied. The reader never advances it: the
//!   server may recycle WAL up to the flush position, so reporting more
//!   than is durable would lose changes on a crash.
//! - Write, flush and apply positions never move backward ([`Feedback`]).
//!
//! [`ReplicationStream::next`] is cancel-safe: bytes read stay in the
//! session's buffer and a status update written partly is finished on the
//! next call, so it can sit in a `tokio::select!`.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use crate::change::PgTimestamp;
use crate::error::ReplicationError;
use crate::lsn::Lsn;
use crate::session::{Backend, Session};

/// How long [`ReplicationStream::stop`] waits for the server to end the
/// stream after CopyDone.
pub const STOP_DRAIN: Duration = Duration::from_secs(10);
/// Status interval when the server disables `wal_sender_timeout`.
const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Never send unsolicited status updates more often than this.
const MIN_STATUS_INTERVAL: Duration = Duration::from_millis(500);
/// While the stream is behind ([`ReplicationStream::set_behind`]), a read
/// that brought less than this is followed by a wait of `GATHER_WAIT`
/// before the next one.
const GATHER_BELOW: usize = 16 * 1024;
/// See `GATHER_BELOW`.
const GATHER_WAIT: Duration = Duration::from_millis(1);

/// What the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// The WAL position of the data.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// When the server sent it.
        server_time: PgTimestamp,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A primary keepalive.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// When the server sent it.
        server_time: PgTimestamp,
        /// The server asked for an immediate reply (already sent).
        reply_requested: bool,
    },
}

/// The positions reported to the server. None of them ever moves
/// backward, whatever the callers pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Feedback {
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
}

impl Feedback {
    /// Starts from a durable position (the slot's, or the target's).
    pub fn starting_at(flushed: Lsn) -> Feedback {
        Feedback {
            write: flushed,
            flush: flushed,
            apply: flushed,
        }
    }

    /// Data up to `lsn` was received.
    pub fn received(&mut self, lsn: Lsn) {
        self.write = self.write.max(lsn);
    }

    /// Changes up to `lsn` are durably applied.
    pub fn flushed(&mut self, lsn: Lsn) {
        self.flush = self.flush.max(lsn);
        self.apply = self.apply.max(lsn);
        self.write = self.write.max(self.flush);
    }

    /// The write position.
    pub fn write(&self) -> Lsn {
        self.write
    }

    /// The flush position: what the server may forget.
    pub fn flush(&self) -> Lsn {
        self.flush
    }

    /// The apply position.
    pub fn apply(&self) -> Lsn {
        self.apply
    }
}

/// A running replication stream.
#[derive(Debug)]
pub struct ReplicationStream {
    session: Session,
    feedback: Feedback,
    status_interval: Duration,
    next_status_at: Instant,
    /// Bytes queued for the server, written across calls (cancel safety).
    out: BytesMut,
    /// Status updates sent, for tests and metrics.
    statuses_sent: u64,
    last_sent: Option<Feedback>,
    /// A message parsed by [`next_buffered`](Self::next_buffered) that it
    /// leaves to [`next`](Self::next).
    stashed: Option<Backend>,
    /// The consumer said the stream is behind: read in larger pieces.
    behind: bool,
    /// No read before this (a gathering wait, kept across cancellation).
    gather_until: Option<Instant>,
}

impl ReplicationStream {
    pub(crate) fn new(
        session: Session,
        start: Lsn,
        wal_sender_timeout: Option<Duration>,
    ) -> ReplicationStream {
        let status_interval = wal_sender_timeout
            .map(|t| (t / 3).max(MIN_STATUS_INTERVAL))
            .unwrap_or(DEFAULT_STATUS_INTERVAL)
            .min(DEFAULT_STATUS_INTERVAL);
        ReplicationStream {
            session,
            // The server starts at max(start, confirmed flush); reporting
            // `start` as flushed before anything was applied would be wrong
            // only if it were beyond the durable position, and callers pass
            // exactly that position.
            feedback: Feedback::starting_at(start),
            status_interval,
            next_status_at: Instant::now() + status_interval,
            out: BytesMut::new(),
            statuses_sent: 0,
            last_sent: None,
            stashed: None,
            behind: false,
            gather_until: None,
        }
    }

    /// `host:port/dbname` of the server.
    pub fn endpoint(&self) -> &str {
        self.session.endpoint()
    }

    /// The positions reported so far.
    pub fn feedback(&self) -> Feedback {
        self.feedback
    }

    /// How many status updates were sent.
    pub fn statuses_sent(&self) -> u64 {
        self.statuses_sent
    }

    /// The interval between unsolicited status updates.
    pub fn status_interval(&self) -> Duration {
        self.status_interval
    }

    /// Records that changes up to `lsn` are durably applied; reported with
    /// the next status update. Lower values than before are ignored.
    pub fn set_flushed(&mut self, lsn: Lsn) {
        self.feedback.flushed(lsn);
    }

    /// Tells the stream whether what it carries is behind the source (old
    /// commits: a catch-up). While it is, a read that brings little is
    /// followed by a millisecond's wait before the next, so that the
    /// walsender, which decodes message by message, writes in blocks
    /// instead of waking this reader for each message: a catch-up of
    /// single-row transactions costs both sides far less CPU that way.
    /// A live stream (`false`) is read as soon as anything arrives, so
    /// the wait never adds to the latency of current changes.
    pub fn set_behind(&mut self, behind: bool) {
        self.behind = behind;
        if !behind {
            self.gather_until = None;
        }
    }

    /// Sends a status update now (e.g. right after a durable commit, or
    /// before shutting down).
    pub async fn send_status(&mut self) -> Result<(), ReplicationError> {
        self.queue_status(false);
        self.flush_out().await
    }

    /// Sends a status update that asks the server to answer at once with a
    /// keepalive, whose `wal_end` says how far the server has read: a
    /// reader waiting for a position learns that nothing more is coming
    /// before it without waiting for the server's own keepalive.
    pub async fn request_reply(&mut self) -> Result<(), ReplicationError> {
        self.queue_status(true);
        self.flush_out().await
    }

    /// The next message, or `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<StreamMessage>, ReplicationError> {
        loop {
            self.flush_out().await?;
            let parsed = match self.stashed.take() {
                Some(backend) => Some(backend),
                None => self.session.try_parse()?,
            };
            if let Some(backend) = parsed {
                match backend {
                    Backend::Message(Message::CopyData(body)) => {
                        let message = self.copy_data(body.into_bytes())?;
                        // A keepalive that asks for an answer gets it now.
                        self.flush_out().await?;
                        return Ok(Some(message));
                    }
                    Backend::Message(Message::CopyDone) => {
                        // The server ended the stream: acknowledge.
                        let mut buf = BytesMut::new();
                        frontend::copy_done(&mut buf);
                        self.out.extend_from_slice(&buf);
                        self.flush_out().await?;
                        return Ok(None);
                    }
                    Backend::Message(Message::CommandComplete(_)) => {
                        // A walsender that stops (server shutdown) ends the
                        // COPY with CommandComplete and exits, without a
                        // CopyDone of its own (walsender.c, WalSndDone).
                        return Ok(None);
                    }
                    Backend::Message(Message::ErrorResponse(body)) => {
                        let mut err = self.session.server_error(&body);
                        // While streaming, the only objects pgoutput looks
                        // up by name are the publications.
                        if let ReplicationError::Server { error, .. } = &mut err
                            && error.code == "42704"
                        {
                            error.cause = Some(crate::error::Cause::PublicationMissing);
                        }
                        return Err(err);
                    }
                    Backend::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {
                        continue;
                    }
                    Backend::Message(other) => {
                        return Err(self.session.protocol(&format!(
                            "unexpected {} message in the replication stream",
                            message_name(&other)
                        )));
                    }
                    Backend::CopyBothResponse => {
                        return Err(self
                            .session
                            .protocol("unexpected CopyBothResponse in the replication stream"));
                    }
                }
            }
            if Instant::now() >= self.next_status_at {
                self.queue_status(false);
                continue;
            }
            let deadline = self.next_status_at;
            tokio::select! {
                biased;
                // Data first: a busy stream must not starve on timers.
                filled = self.fill() => filled?,
                // An idle stream still reports in time.
                () = tokio::time::sleep_until(deadline) => self.queue_status(false),
            }
        }
    }

    /// The next message if the last read already brought it whole, without
    /// touching the socket: a reader that is busy can take every message of
    /// one read before it looks at its other duties (timers, shutdown,
    /// acknowledgements) again, instead of once per message. `None` means
    /// nothing usable is buffered, or what is needs [`next`](Self::next)
    /// (a status update to send, or anything but CopyData).
    pub fn next_buffered(&mut self) -> Result<Option<StreamMessage>, ReplicationError> {
        if !self.out.is_empty() || self.stashed.is_some() {
            return Ok(None);
        }
        match self.session.try_parse()? {
            Some(Backend::Message(Message::CopyData(body))) => {
                self.copy_data(body.into_bytes()).map(Some)
            }
            Some(other) => {
                self.stashed = Some(other);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Reads more from the socket; while behind, after a gathering wait
    /// when the last read brought little. Cancel-safe: the wait's end is
    /// kept, so a cancelled wait is not started again.
    async fn fill(&mut self) -> Result<(), ReplicationError> {
        if let Some(until) = self.gather_until {
            tokio::time::sleep_until(until).await;
            self.gather_until = None;
        }
        let read = self.session.fill().await?;
        if self.behind && read < GATHER_BELOW {
            self.gather_until = Some(Instant::now() + GATHER_WAIT);
        }
        Ok(())
    }

    /// A CopyData message of the stream: positions noted, and a status
    /// update queued when the server asks for one.
    fn copy_data(&mut self, data: Bytes) -> Result<StreamMessage, ReplicationError> {
        let message = self.parse_copy_data(data)?;
        match &message {
            StreamMessage::XLogData { wal_start, .. } => self.feedback.received(*wal_start),
            StreamMessage::Keepalive {
                reply_requested: true,
                ..
            } => self.queue_status(false),
            StreamMessage::Keepalive { .. } => {}
        }
        Ok(message)
    }

    /// Ends the stream cleanly: reports the final positions, sends
    /// CopyDone, and drains what the server still sends until it is ready
    /// for commands again. Returns the session for further commands.
    ///
    /// The final positions are on the wire before CopyDone, so the server
    /// knows them whatever follows. A walsender in the middle of decoding
    /// a large transaction may answer CopyDone only once it is through;
    /// after `STOP_DRAIN` the wait ends with [`ReplicationError::Timeout`]
    /// and the caller may simply close the connection.
    pub async fn stop(mut self) -> Result<Session, ReplicationError> {
        self.queue_status(false);
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        self.out.extend_from_slice(&buf);
        self.flush_out().await?;
        let endpoint = self.endpoint().to_owned();
        let drain = async {
            loop {
                let backend = match self.stashed.take() {
                    Some(backend) => backend,
                    None => self.session.read_backend().await?,
                };
                match backend {
                    Backend::Message(Message::ReadyForQuery(_)) => return Ok(()),
                    Backend::Message(Message::ErrorResponse(body)) => {
                        let mut err = self.session.server_error(&body);
                        // While streaming, the only objects pgoutput looks
                        // up by name are the publications.
                        if let ReplicationError::Server { error, .. } = &mut err
                            && error.code == "42704"
                        {
                            error.cause = Some(crate::error::Cause::PublicationMissing);
                        }
                        return Err(err);
                    }
                    // Remaining CopyData, the server's CopyDone, CommandComplete.
                    _ => continue,
                }
            }
        };
        match tokio::time::timeout(STOP_DRAIN, drain).await {
            Ok(result) => result.map(|()| self.session),
            Err(_) => Err(ReplicationError::Timeout {
                endpoint,
                seconds: STOP_DRAIN.as_secs(),
            }),
        }
    }

    /// The error for a stream the server ended by itself (it sends
    /// CopyDone when shutting down): transient, the caller reconnects.
    pub fn ended_by_server(&self) -> ReplicationError {
        self.session.io_error(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server ended the replication stream (shutting down?)",
        ))
    }

    fn parse_copy_data(&self, data: Bytes) -> Result<StreamMessage, ReplicationError> {
        parse_copy_data(data).map_err(|problem| self.session.protocol(&problem))
    }

    /// Queues a standby status update with the current positions.
    fn queue_status(&mut self, reply_requested: bool) {
        let mut body = BytesMut::with_capacity(34);
        body.extend_from_slice(b"r");
        body.extend_from_slice(&self.feedback.write().as_u64().to_be_bytes());
        body.extend_from_slice(&self.feedback.flush().as_u64().to_be_bytes());
        body.extend_from_slice(&self.feedback.apply().as_u64().to_be_bytes());
        body.extend_from_slice(&PgTimestamp::now().micros().to_be_bytes());
        body.extend_from_slice(&[u8::from(reply_requested)]);
        match frontend::CopyData::new(&body[..]) {
            Ok(copy) => copy.write(&mut self.out),
            // A 34-byte body always fits a CopyData message.
            Err(_) => unreachable!("a status update always fits a CopyData message"),
        }
        if let Some(previous) = self.last_sent {
            debug_assert!(
                previous.flush() <= self.feedback.flush(),
                "flush positions never go backward"
            );
        }
        self.last_sent = Some(self.feedback);
        self.statuses_sent += 1;
        self.next_status_at = Instant::now() + self.status_interval;
        tracing::trace!(
            write = %self.feedback.write(),
            flush = %self.feedback.flush(),
            "standby status update"
        );
    }

    async fn flush_out(&mut self) -> Result<(), ReplicationError> {
        while !self.out.is_empty() {
            let n = self.session.write_some(&self.out).await?;
            self.out.advance(n);
        }
        Ok(())
    }
}

/// The protocol name of a backend message, for errors.
fn message_name(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationOk | Message::AuthenticationSasl(_) => "Authentication",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "other",
    }
}

/// One CopyData body of the stream: XLogData (`w`) or a primary
/// keepalive (`k`).
fn parse_copy_data(mut data: Bytes) -> Result<StreamMessage, String> {
    let tag = if data.is_empty() { 0 } else { data.get_u8() };
    match tag {
        b'w' if data.len() >= 24 => {
            let wal_start = Lsn::from_u64(data.get_u64());
            let wal_end = Lsn::from_u64(data.get_u64());
            let server_time = PgTimestamp::from_micros(data.get_i64());
            // The message gets its own allocation: a slice of the read
            // buffer would keep the whole buffer (64 KiB or more) alive
            // for as long as any value decoded from it waits in the
            // queue, so every read would need fresh memory, and fresh
            // pages are costly to fault in. Copied, the read buffer is
            // reused in place and the queue holds only what it counts.
            Ok(StreamMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: Bytes::copy_from_slice(&data),
            })
        }
        b'k' if data.len() >= 17 => {
            let wal_end = Lsn::from_u64(data.get_u64());
            let server_time = PgTimestamp::from_micros(data.get_i64());
            let reply_requested = data.get_u8() == 1;
            Ok(StreamMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        other => Err(format!(
            "malformed CopyData in the replication stream (tag 0x{other:02x}, {} bytes)",
            data.len()
        )),
    }
}

/// Runs `bytes`, as a server would send them after START_REPLICATION,
/// through the whole read path: framing into backend messages, CopyData
/// into XLogData and keepalives, and XLogData through the pgoutput decoder.
/// For the fuzzer (`fuzz/`): whatever the bytes, this returns, without a
/// panic, a hang, or an allocation a length field asked for and the bytes
/// do not hold.
#[doc(hidden)]
pub fn read_path(bytes: &[u8]) {
    use crate::session::split_backend;

    let mut buf = BytesMut::from(bytes);
    let mut decoder = crate::pgoutput::Decoder::new();
    while let Ok(Some(backend)) = split_backend(&mut buf) {
        let Backend::Message(Message::CopyData(body)) = backend else {
            continue;
        };
        if let Ok(StreamMessage::XLogData {
            wal_start, data, ..
        }) = parse_copy_data(body.into_bytes())
            && decoder.decode(wal_start, data).is_err()
        {
            // The daemon stops on a decode error; so does this.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_never_moves_backward() {
        let mut f = Feedback::starting_at(Lsn::from_u64(100));
        f.flushed(Lsn::from_u64(50));
        assert_eq!(f.flush(), Lsn::from_u64(100));
        f.received(Lsn::from_u64(300));
        f.flushed(Lsn::from_u64(200));
        f.received(Lsn::from_u64(150));
        assert_eq!(
            (f.write(), f.flush(), f.apply()),
            (Lsn::from_u64(300), Lsn::from_u64(200), Lsn::from_u64(200))
        );
        // A flush beyond what was received pulls the write position along.
        f.flushed(Lsn::from_u64(400));
        assert_eq!(f.write(), Lsn::from_u64(400));
        // Any sequence of calls keeps all three monotonic.
        let mut previous = f;
        for i in 0..1000u64 {
            let v = Lsn::from_u64((i * 7919) % 1000);
            if i % 2 == 0 {
                f.received(v)
            } else {
                f.flushed(v)
            }
            assert!(
                f.write() >= previous.write()
                    && f.flush() >= previous.flush()
                    && f.apply() >= previous.apply()
            );
            assert!(f.flush() <= f.write());
            previous = f;
        }
    }
}
