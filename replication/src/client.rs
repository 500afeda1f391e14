//! Regular SQL connections (catalog queries, copy, apply) through
//! tokio-postgres, with TLS from [`crate::tls`] and errors an operator can
//! act on.

use std::error::Error as _;
use std::io;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::conninfo::ConnInfo;
use crate::tls::{self, TlsError};

/// What kind of failure a connection attempt met; decides retry or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectFailure {
    /// Nothing listens there, or the network is in the way. Transient.
    Unreachable,
    /// The server is starting, shutting down or out of connections. Transient.
    Unavailable,
    /// The password was wrong or missing. Definite.
    Authentication,
    /// pg_hba.conf has no line for this client, the role does not exist,
    /// or it lacks a privilege. Definite.
    NotAllowed,
    /// The database does not exist. Definite.
    NoDatabase,
    /// TLS could not be set up or the certificate was refused. Definite.
    Tls,
    /// Anything else the server said. Definite.
    Other,
}

impl ConnectFailure {
    /// Whether waiting and trying again may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ConnectFailure::Unreachable | ConnectFailure::Unavailable
        )
    }
}

/// A failed connection attempt: which server, what happened, what to do.
/// Never contains the password.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {endpoint}: {detail}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
pub struct ConnectError {
    /// `host:port/dbname` of the server.
    pub endpoint: String,
    /// The kind of failure.
    pub failure: ConnectFailure,
    /// What the server or the network said.
    pub detail: String,
    /// How to fix it, where known.
    pub hint: Option<String>,
}

impl From<(&ConnInfo, TlsError)> for ConnectError {
    fn from((info, err): (&ConnInfo, TlsError)) -> ConnectError {
        ConnectError {
            endpoint: info.endpoint(),
            failure: ConnectFailure::Tls,
            detail: err.to_string(),
            hint: None,
        }
    }
}

/// Session settings under which values in text form read back exactly on
/// the other server: ISO dates, UTC offsets, exact floats, hex bytea. The
/// replication session sends them at startup (the walsender's output
/// functions follow them); every connection that moves values as text (the
/// copy in text format, the apply) sets them too ([`text_value_settings`]),
/// so that servers or databases configured differently (`DateStyle = 'SQL,
/// DMY'`, say) can never turn `01/02` into another date on the way.
pub const TEXT_VALUE_PARAMETERS: &[(&str, &str)] = &[
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// [`TEXT_VALUE_PARAMETERS`] as `SET` statements for a regular session.
pub fn text_value_settings() -> String {
    TEXT_VALUE_PARAMETERS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens a regular connection; the connection task runs until the client
/// is dropped.
pub async fn connect(info: &ConnInfo) -> Result<Client, ConnectError> {
    let tls = tls::client_config(info).map_err(|e| ConnectError::from((info, e)))?;
    connect_with(&info.to_pg_config(), tls)
        .await
        .map_err(|err| classify(info, &err))
}

/// Opens a connection from a tokio-postgres configuration, encrypted with
/// `tls` when given; the connection task runs until the client is dropped.
pub async fn connect_with(
    config: &tokio_postgres::Config,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Client, tokio_postgres::Error> {
    fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection closed with an error");
            }
        });
    }
    match tls {
        None => config.connect(NoTls).await.map(|(client, conn)| {
            drive(conn);
            client
        }),
        Some(tls) => config
            .connect(MakeRustlsConnect::new((*tls).clone()))
            .await
            .map(|(client, conn)| {
                drive(conn);
                client
            }),
    }
}

/// Turns a tokio-postgres connection error into a [`ConnectError`].
pub fn classify(info: &ConnInfo, err: &tokio_postgres::Error) -> ConnectError {
    let endpoint = info.endpoint();
    let user = info.user().unwrap_or("(none)");
    let db = info.dbname().unwrap_or("(none)");
    let (failure, hint) = if let Some(db_err) = err.as_db_error() {
        failure_for_sqlstate(db_err.code().code(), user, db)
    } else if let Some(io_err) = find_io_error(err) {
        let hint = match io_err.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
                "is the server running and listening there? check host and port in the url"
                    .to_owned()
            }
            io::ErrorKind::TimedOut => {
                "the server did not answer in time; check the network path and connect_timeout"
                    .to_owned()
            }
            _ => "check host and port in the url and the network path".to_owned(),
        };
        (ConnectFailure::Unreachable, hint)
    } else if is_tls_error(err) {
        (
            ConnectFailure::Tls,
            "check sslmode and sslrootcert, and that the server has ssl = on".to_owned(),
        )
    } else if err.to_string().contains("password missing") {
        (
            ConnectFailure::Authentication,
            "the server asks for a password: add one to the url, the password key, or password_file".to_owned(),
        )
    } else if err.is_closed() || err.to_string().contains("timed out") {
        (
            ConnectFailure::Unreachable,
            "the connection was closed; check the network path".to_owned(),
        )
    } else {
        (ConnectFailure::Other, String::new())
    };
    ConnectError {
        endpoint,
        failure,
        detail: describe(err),
        hint: (!hint.is_empty()).then_some(hint),
    }
}

/// What a server error during connection setup means, and what to do.
pub fn failure_for_sqlstate(code: &str, user: &str, db: &str) -> (ConnectFailure, String) {
    match code {
        // invalid_password
        "28P01" => (
            ConnectFailure::Authentication,
            format!(
                "check the password of role {user:?}: in the url, the password key, or password_file"
            ),
        ),
        // invalid_authorization_specification: no pg_hba.conf line for
        // this client, or no such role. The server says which in its own
        // language (the detail); the code does not tell them apart.
        "28000" => (
            ConnectFailure::NotAllowed,
            format!(
                "the server refused role {user:?} here: allow this client and database in its pg_hba.conf, then SELECT pg_reload_conf(); or create the role (CREATE ROLE \"{user}\" LOGIN ...) or fix user in the url"
            ),
        ),
        // invalid_catalog_name
        "3D000" => (
            ConnectFailure::NoDatabase,
            format!("create database {db:?} on the server or fix dbname in the url"),
        ),
        // cannot_connect_now, too_many_connections, admin_shutdown, crash_shutdown
        "57P03" | "53300" | "57P01" | "57P02" => (
            ConnectFailure::Unavailable,
            "the server is starting, stopping or full; try again shortly".to_owned(),
        ),
        // insufficient_privilege (e.g. no REPLICATION attribute)
        "42501" => (
            ConnectFailure::NotAllowed,
            format!("grant the role what it lacks, e.g. ALTER ROLE \"{user}\" REPLICATION"),
        ),
        _ => (ConnectFailure::Other, String::new()),
    }
}

/// The error and its causes on one line, without repeating itself.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = match err
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.as_db_error())
    {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => err.to_string(),
    };
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

fn find_io_error(err: &tokio_postgres::Error) -> Option<&io::Error> {
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io_err) = cause.downcast_ref::<io::Error>() {
            // rustls reports certificate problems as io errors wrapping its own.
            if io_err
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return None;
            }
            return Some(io_err);
        }
        source = cause.source();
    }
    None
}

fn is_tls_error(err: &tokio_postgres::Error) -> bool {
    let text = describe(err).to_lowercase();
    text.contains("tls") || text.contains("ssl") || text.contains("certificate")
}

/// Runs one statement that takes a strong lock on a source table (`ALTER
/// TABLE`, `CREATE TRIGGER`) without ever queueing the application behind
/// it for long: it waits at most 2 s for its lock (`lock_timeout`), and is
/// tried again a few times, a little later each time, when the lock was
/// busy. Other errors return at once.
pub async fn with_short_lock(
    client: &Client,
    statement: &str,
) -> Result<(), tokio_postgres::Error> {
    let sql = format!("BEGIN; SET LOCAL lock_timeout = '2s'; {statement}; COMMIT;");
    let mut attempt = 0;
    loop {
        match client.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                let _ = client.batch_execute("ROLLBACK").await;
                attempt += 1;
                let busy = err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
                if !busy || attempt >= 5 {
                    return Err(err);
                }
                tracing::info!(
                    attempt,
                    statement,
                    "the table is busy: trying again shortly"
                );
                tokio::time::sleep(std::time::Duration::from_millis(500 * attempt)).await;
            }
        }
    }
}
