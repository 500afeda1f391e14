//! Errors of the replication connection, split by what to do about them.
//!
//! One question decides everything downstream: retry or stop? A
//! [`ReplicationError`] answers it with [`ReplicationError::is_transient`]
//! (connection lost, server shutting down or starting up, timeout: retry
//! with backoff, resuming from the durable position) and gives the
//! operator a [`ReplicationError::hint`] for the definite ones (slot
//! missing or invalidated, publication missing, permission denied,
//! protocol violation: stop and say how to recover).

use std::io;

use crate::client::{ConnectError, ConnectFailure};
use crate::pgoutput::DecodeError;
use crate::tls::TlsError;

/// An error the server sent, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// The five-character SQLSTATE.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The server's detail, if any.
    pub detail: Option<String>,
    /// The server's hint, if any.
    pub hint: Option<String>,
    /// What the error means, where cutover found out from the command it
    /// answered and the server's catalog: never from the message's text,
    /// which is in the server's `lc_messages` language.
    pub cause: Option<Cause>,
}

/// What a server error means, found from its context (see
/// [`ServerError::cause`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// START_REPLICATION named a slot the server does not have.
    SlotMissing,
    /// START_REPLICATION named a slot the server invalidated
    /// (`wal_status = 'lost'`: `max_slot_wal_keep_size` exceeded).
    SlotLost,
    /// The stream named a publication the server does not have.
    PublicationMissing,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// What went wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Could not connect or authenticate.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// TLS could not be set up.
    #[error("{endpoint}: {source}")]
    Tls {
        /// The server.
        endpoint: String,
        /// What went wrong.
        #[source]
        source: TlsError,
    },
    /// The connection broke.
    #[error("{endpoint}: connection lost: {source}")]
    Io {
        /// The server.
        endpoint: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The server answered with an error.
    #[error("{endpoint}: {error}")]
    Server {
        /// The server.
        endpoint: String,
        /// What it said.
        error: Box<ServerError>,
    },
    /// The server sent something the protocol does not allow here.
    #[error("{endpoint}: protocol violation: {message}")]
    Protocol {
        /// The server.
        endpoint: String,
        /// What was unexpected.
        message: String,
    },
    /// A pgoutput message could not be decoded.
    #[error("{endpoint}: cannot decode the change stream at {lsn}: {source}")]
    Decode {
        /// The server.
        endpoint: String,
        /// The WAL position of the message.
        lsn: crate::Lsn,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The server did not answer in time.
    #[error("{endpoint}: no answer for {seconds} s")]
    Timeout {
        /// The server.
        endpoint: String,
        /// How long we waited.
        seconds: u64,
    },
}

/// SQLSTATEs after which waiting and reconnecting may succeed.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "53300", // too_many_connections
    "55006", // object_in_use: the slot is still held by our previous connection
    "08006", // connection_failure
    "08003", // connection_does_not_exist
    "40001", // serialization_failure
    "53100", // disk_full (may clear)
];

impl ReplicationError {
    /// Whether to retry with backoff (true) or stop (false).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect(err) => err.failure.is_transient(),
            ReplicationError::Io { .. } | ReplicationError::Timeout { .. } => true,
            ReplicationError::Server { error, .. } => {
                TRANSIENT_SQLSTATES.contains(&error.code.as_str())
            }
            ReplicationError::Tls { .. }
            | ReplicationError::Protocol { .. }
            | ReplicationError::Decode { .. } => false,
        }
    }

    /// A short stable name of the kind, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplicationError::Connect(err) => match err.failure {
                ConnectFailure::Unreachable | ConnectFailure::Unavailable => "connect",
                _ => "auth",
            },
            ReplicationError::Tls { .. } => "tls",
            ReplicationError::Io { .. } => "connection_lost",
            ReplicationError::Timeout { .. } => "timeout",
            ReplicationError::Protocol { .. } => "protocol",
            ReplicationError::Decode { .. } => "decode",
            ReplicationError::Server { error, .. } => match (error.cause, error.code.as_str()) {
                (Some(Cause::SlotMissing), _) => "slot_missing",
                (Some(Cause::SlotLost), _) => "slot_invalidated",
                (Some(Cause::PublicationMissing), _) => "publication_missing",
                (None, "42501") => "permission_denied",
                (None, code) if TRANSIENT_SQLSTATES.contains(&code) => "server_unavailable",
                _ => "server",
            },
        }
    }

    /// What the operator should do, where that is known.
    pub fn hint(&self) -> Option<String> {
        match self {
            ReplicationError::Connect(err) => err.hint.clone(),
            ReplicationError::Tls { .. } => Some("check sslmode and sslrootcert in the url".into()),
            ReplicationError::Io { .. } | ReplicationError::Timeout { .. } => {
                Some("the connection will be retried; check the network and the server if this repeats".into())
            }
            ReplicationError::Protocol { .. } | ReplicationError::Decode { .. } => Some(
                "this is a bug in cutover or an unsupported server version: report it with the server version and the log".into(),
            ),
            ReplicationError::Server { error, .. } => match self.kind() {
                "slot_missing" => Some(
                    "the replication slot is gone (dropped by someone, or never created): the changes since are lost to it; `cutover run --resync` makes it again and repairs the target by comparing it with the source (no new copy)".into(),
                ),
                "publication_missing" => Some(
                    "the publication was dropped or renamed: recreate it (cutover run creates it) for the tables in scope".into(),
                ),
                "slot_invalidated" => Some(
                    "the slot was invalidated because it retained more WAL than max_slot_wal_keep_size: its changes are lost; `cutover run --resync` makes it again and repairs the target by comparing it with the source (no new copy); raise max_slot_wal_keep_size".into(),
                ),
                "permission_denied" => Some(
                    "grant the role REPLICATION (ALTER ROLE ... REPLICATION) and read access to the tables in scope".into(),
                ),
                "server_unavailable" => Some("the server is restarting or busy; cutover retries".into()),
                _ => error.hint.clone(),
            },
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str, cause: Option<Cause>) -> ReplicationError {
        ReplicationError::Server {
            endpoint: "h:5432/db".into(),
            error: Box::new(ServerError {
                severity: "ERROR".into(),
                code: code.into(),
                message: message.into(),
                detail: None,
                hint: None,
                cause,
            }),
        }
    }

    #[test]
    fn server_errors_are_classified_by_sqlstate_and_context_never_by_text() {
        let shutdown = server("57P01", "Verbindung wird abgebrochen", None);
        assert!(shutdown.is_transient());
        assert_eq!(shutdown.kind(), "server_unavailable");
        // The same message, its meaning from where it was answered.
        let text = "Replikations-Slot »x« existiert nicht";
        let missing = server("42704", text, Some(Cause::SlotMissing));
        assert!(!missing.is_transient());
        assert_eq!(missing.kind(), "slot_missing");
        assert!(missing.hint().unwrap().contains("--resync"));
        let publication = server("42704", text, Some(Cause::PublicationMissing));
        assert_eq!(publication.kind(), "publication_missing");
        // English words in a message with no context found decide nothing.
        let unknown = server("42704", "publication \"p\" does not exist", None);
        assert_eq!(unknown.kind(), "server");
        let invalid = server("55000", "kann nicht mehr lesen", Some(Cause::SlotLost));
        assert_eq!(invalid.kind(), "slot_invalidated");
        assert!(!invalid.is_transient());
        let other = server(
            "55000",
            "can no longer get changes from replication slot",
            None,
        );
        assert_eq!(other.kind(), "server");
        let denied = server("42501", "keine Berechtigung", None);
        assert_eq!(denied.kind(), "permission_denied");
        assert!(!denied.is_transient());
        assert!(denied.to_string().contains("SQLSTATE 42501"), "{denied}");
    }

    #[test]
    fn io_is_transient_and_protocol_is_not() {
        let io = ReplicationError::Io {
            endpoint: "h".into(),
            source: io::Error::new(io::ErrorKind::ConnectionReset, "reset"),
        };
        assert!(io.is_transient());
        let protocol = ReplicationError::Protocol {
            endpoint: "h".into(),
            message: "x".into(),
        };
        assert!(!protocol.is_transient());
    }
}
