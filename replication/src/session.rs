//! A replication session with a walsender: connection, TLS, startup with
//! `replication=database`, authentication, and the replication commands.
//!
//! tokio-postgres has no replication support, so this speaks the protocol
//! itself, using `postgres-protocol` for every message codec and for the
//! SCRAM and MD5 computations. The one message that crate does not parse
//! is CopyBothResponse (`W`), which only replication uses; it is framed
//! here.
//!
//! Once `START_REPLICATION` succeeds the session becomes a
//! [`ReplicationStream`](crate::stream::ReplicationStream).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::client::{ConnectError, ConnectFailure, failure_for_sqlstate};
use crate::conninfo::{self, ConnInfo, Host, SslMode};
use crate::error::{ReplicationError, ServerError};
use crate::lsn::Lsn;
use crate::sql::{command_literal, quote_ident, quote_literal};
use crate::tls;

/// How long to wait for a connection when the string sets no
/// `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Tag of CopyBothResponse, absent from `postgres-protocol`.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// The socket under a session: TCP, unix, or TLS over TCP.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A backend message, including the one `postgres-protocol` lacks.
pub(crate) enum Backend {
    Message(Message),
    CopyBothResponse,
}

// `postgres-protocol`'s messages are not `Debug`.
impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Message(_) => f.write_str("Backend::Message(..)"),
            Backend::CopyBothResponse => f.write_str("Backend::CopyBothResponse"),
        }
    }
}

/// Result rows of a simple query, as text.
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows; `None` is SQL NULL.
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let index = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(index)?.as_deref()
    }
}

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier.
    pub system_id: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The connected database.
    pub dbname: Option<String>,
}

/// What to do with the snapshot of a new slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other sessions (`SET TRANSACTION SNAPSHOT`) until the
    /// next command on this session.
    Export,
    /// Do not export one.
    Nothing,
}

/// A slot just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Its name.
    pub name: String,
    /// Changes that commit after this position are streamed.
    pub consistent_point: Lsn,
    /// The exported snapshot, with [`SnapshotAction::Export`].
    pub snapshot: Option<String>,
}

/// `START_REPLICATION` options for pgoutput.
#[derive(Debug, Clone)]
pub struct PgOutputOptions {
    /// Protocol version: 1, or 2 for streamed transactions (14+).
    pub proto_version: u32,
    /// Publications to stream.
    pub publications: Vec<String>,
    /// Send logical messages (`pg_logical_emit_message`).
    pub messages: bool,
    /// Stream transactions larger than `logical_decoding_work_mem`
    /// before they commit (needs protocol 2).
    pub streaming: bool,
}

impl PgOutputOptions {
    /// Protocol 2 with streaming where the server supports it (14+),
    /// protocol 1 otherwise; logical messages on.
    pub fn for_server(server_version_num: u32, publications: Vec<String>) -> PgOutputOptions {
        let modern = server_version_num >= 140000;
        PgOutputOptions {
            proto_version: if modern { 2 } else { 1 },
            publications,
            messages: server_version_num >= 140000,
            streaming: modern,
        }
    }
}

/// A session in replication mode.
#[derive(Debug)]
pub struct Session {
    socket: Socket,
    read_buf: BytesMut,
    endpoint: String,
    parameters: HashMap<String, String>,
    server_version_num: u32,
}

impl Session {
    /// Connects, negotiates TLS per `sslmode`, authenticates, and waits
    /// until the server is ready for commands.
    pub async fn connect(info: &ConnInfo) -> Result<Session, ReplicationError> {
        let timeout = info.connect_timeout().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let endpoint = info.endpoint();
        match tokio::time::timeout(timeout, Session::connect_inner(info)).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Connect(ConnectError {
                endpoint,
                failure: ConnectFailure::Unreachable,
                detail: format!("no answer within {} s", timeout.as_secs()),
                hint: Some(
                    "check host and port in the url, the network path, and connect_timeout".into(),
                ),
            })),
        }
    }

    async fn connect_inner(info: &ConnInfo) -> Result<Session, ReplicationError> {
        let endpoint = info.endpoint();
        let unreachable = |err: io::Error| {
            ReplicationError::Connect(ConnectError {
                endpoint: endpoint.clone(),
                failure: ConnectFailure::Unreachable,
                detail: err.to_string(),
                hint: Some(
                    "is the server running and listening there? check host and port in the url"
                        .into(),
                ),
            })
        };
        let (socket, channel_binding) = match info.host() {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port()));
                (
                    Socket::Unix(UnixStream::connect(&path).await.map_err(unreachable)?),
                    None,
                )
            }
            Host::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), info.port()))
                    .await
                    .map_err(unreachable)?;
                tcp.set_nodelay(true).map_err(unreachable)?;
                // A silent peer is found by TCP (see conninfo's
                // TcpSettings): a replication stream can otherwise wait
                // forever on a connection that a network cut left open.
                info.tcp()
                    .apply(socket2::SockRef::from(&tcp))
                    .map_err(unreachable)?;
                negotiate_tls(info, host, tcp).await?
            }
        };
        let mut session = Session {
            socket,
            read_buf: BytesMut::with_capacity(64 * 1024),
            endpoint,
            parameters: HashMap::new(),
            server_version_num: 0,
        };
        session.startup(info, channel_binding).await?;
        session.server_version_num = session
            .parameters
            .get("server_version")
            .and_then(|v| parse_server_version(v))
            .unwrap_or(0);
        Ok(session)
    }

    /// `host:port/dbname` of the server.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `server_version_num` (e.g. 150004).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// A run-time parameter the server reported at startup.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Whether the session is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.socket, Socket::Tls(_))
    }

    async fn startup(
        &mut self,
        info: &ConnInfo,
        channel_binding: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let user = info.user().unwrap_or_default().to_owned();
        let db = info.dbname().unwrap_or_default().to_owned();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &user),
            ("database", &db),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
        ];
        // Output functions in the walsender follow these: text that reads
        // back the same on the target.
        params.extend_from_slice(crate::client::TEXT_VALUE_PARAMETERS);
        if let Some(name) = info.application_name() {
            params.push(("application_name", name));
        }
        if let Some(options) = info.options() {
            params.push(("options", options));
        }
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| self.io_error(e))?;
        self.write_all(&buf).await?;

        let mut used_channel_binding = false;
        loop {
            let message = match self.read_backend().await? {
                Backend::Message(m) => m,
                Backend::CopyBothResponse => {
                    return Err(self.protocol("CopyBothResponse during startup"));
                }
            };
            match message {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    let password = self.password(info)?;
                    let mut buf = BytesMut::new();
                    frontend::password_message(password.as_bytes(), &mut buf)
                        .map_err(|e| self.io_error(e))?;
                    self.write_all(&buf).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password(info)?;
                    let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                    let mut buf = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut buf)
                        .map_err(|e| self.io_error(e))?;
                    self.write_all(&buf).await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body
                        .mechanisms()
                        .map(|m| Ok(m.to_owned()))
                        .collect()
                        .map_err(|e| self.io_error(e))?;
                    used_channel_binding = self
                        .scram(info, &mechanisms, channel_binding.clone())
                        .await?;
                }
                Message::ErrorResponse(body) => return Err(self.connect_error(info, &body)),
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi => {
                    return Err(ReplicationError::Connect(ConnectError {
                        endpoint: self.endpoint.clone(),
                        failure: ConnectFailure::Authentication,
                        detail: "the server asks for an authentication method cutover does not support (Kerberos/GSSAPI/SSPI)".into(),
                        hint: Some("use password, md5 or scram-sha-256 for this role in pg_hba.conf".into()),
                    }));
                }
                other => {
                    return Err(self.protocol(&format!(
                        "unexpected message during authentication: {}",
                        name_of(&other)
                    )));
                }
            }
        }
        if info.channel_binding() == conninfo::ChannelBinding::Require && !used_channel_binding {
            return Err(ReplicationError::Connect(ConnectError {
                endpoint: self.endpoint.clone(),
                failure: ConnectFailure::Authentication,
                detail: "channel_binding=require, but the server authenticated without SCRAM channel binding".into(),
                hint: Some("use scram-sha-256 over TLS for this role, or relax channel_binding".into()),
            }));
        }
        loop {
            match self.read_backend().await? {
                Backend::Message(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(|e| self.io_error(e))?.to_owned();
                    let value = body.value().map_err(|e| self.io_error(e))?.to_owned();
                    self.parameters.insert(name, value);
                }
                Backend::Message(Message::BackendKeyData(_)) => {}
                Backend::Message(Message::NoticeResponse(_)) => {}
                Backend::Message(Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(self.connect_error(info, &body));
                }
                Backend::Message(other) => {
                    return Err(self.protocol(&format!(
                        "unexpected message after authentication: {}",
                        name_of(&other)
                    )));
                }
                Backend::CopyBothResponse => {
                    return Err(self.protocol("CopyBothResponse during startup"));
                }
            }
        }
    }

    /// SCRAM-SHA-256, with channel binding when TLS gives us the server's
    /// certificate hash and the server offers SCRAM-SHA-256-PLUS.
    async fn scram(
        &mut self,
        info: &ConnInfo,
        mechanisms: &[String],
        cb_data: Option<Vec<u8>>,
    ) -> Result<bool, ReplicationError> {
        let password = self.password(info)?.to_owned();
        let plus_offered = mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS);
        let plain_offered = mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256);
        let policy = info.channel_binding();
        let (mechanism, binding, bound) = match (policy, cb_data, plus_offered) {
            (conninfo::ChannelBinding::Disable, _, _) => {
                (sasl::SCRAM_SHA_256, ChannelBinding::unsupported(), false)
            }
            (_, Some(data), true) => (
                sasl::SCRAM_SHA_256_PLUS,
                ChannelBinding::tls_server_end_point(data),
                true,
            ),
            (conninfo::ChannelBinding::Require, _, _) => {
                return Err(ReplicationError::Connect(ConnectError {
                    endpoint: self.endpoint.clone(),
                    failure: ConnectFailure::Authentication,
                    detail: "channel_binding=require, but channel binding is not possible on this connection".into(),
                    hint: Some("connect with TLS (sslmode=require or stricter) to a server offering SCRAM-SHA-256-PLUS".into()),
                }));
            }
            (_, Some(_), false) => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested(), false),
            (_, None, _) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported(), false),
        };
        if mechanism == sasl::SCRAM_SHA_256 && !plain_offered {
            return Err(self.protocol(&format!(
                "the server offers no SASL mechanism cutover supports: {mechanisms:?}"
            )));
        }
        let mut scram = ScramSha256::new(password.as_bytes(), binding);
        let mut buf = BytesMut::new();
        frontend::sasl_initial_response(mechanism, scram.message(), &mut buf)
            .map_err(|e| self.io_error(e))?;
        self.write_all(&buf).await?;
        loop {
            match self.read_backend().await? {
                Backend::Message(Message::AuthenticationSaslContinue(body)) => {
                    scram
                        .update(body.data())
                        .map_err(|e| self.auth_protocol(e))?;
                    let mut buf = BytesMut::new();
                    frontend::sasl_response(scram.message(), &mut buf)
                        .map_err(|e| self.io_error(e))?;
                    self.write_all(&buf).await?;
                }
                Backend::Message(Message::AuthenticationSaslFinal(body)) => {
                    scram
                        .finish(body.data())
                        .map_err(|e| self.auth_protocol(e))?;
                    return Ok(bound);
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(self.connect_error(info, &body));
                }
                Backend::Message(other) => {
                    return Err(self.protocol(&format!(
                        "unexpected message during SCRAM: {}",
                        name_of(&other)
                    )));
                }
                Backend::CopyBothResponse => {
                    return Err(self.protocol("CopyBothResponse during SCRAM"));
                }
            }
        }
    }

    fn password<'a>(&self, info: &'a ConnInfo) -> Result<&'a str, ReplicationError> {
        info.password().map(|p| p.expose()).ok_or_else(|| {
            ReplicationError::Connect(ConnectError {
                endpoint: self.endpoint.clone(),
                failure: ConnectFailure::Authentication,
                detail: "the server asks for a password and none is configured".into(),
                hint: Some("add one to the url, the password key, or password_file".into()),
            })
        })
    }

    /// Runs a command or query with the simple query protocol.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ReplicationError> {
        tracing::debug!(endpoint = %self.endpoint, command = sql, "replication command");
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|e| self.io_error(e))?;
        self.write_all(&buf).await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            match self.read_backend().await? {
                Backend::Message(Message::RowDescription(body)) => {
                    result.columns = body
                        .fields()
                        .map(|f| Ok(f.name().to_owned()))
                        .collect()
                        .map_err(|e| self.io_error(e))?;
                }
                Backend::Message(Message::DataRow(body)) => {
                    let buffer = body.buffer();
                    let row: Vec<Option<String>> = body
                        .ranges()
                        .map(|range| {
                            Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()))
                        })
                        .collect()
                        .map_err(|e| self.io_error(e))?;
                    result.rows.push(row);
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(self.server_error(&body))
                }
                Backend::Message(Message::ReadyForQuery(_)) => break,
                Backend::Message(
                    Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    | Message::NoticeResponse(_)
                    | Message::ParameterStatus(_),
                ) => {}
                Backend::Message(other) => {
                    return Err(self.protocol(&format!(
                        "unexpected reply to a command: {}",
                        name_of(&other)
                    )));
                }
                Backend::CopyBothResponse => {
                    return Err(self.protocol("unexpected CopyBothResponse"));
                }
            }
        }
        match error {
            Some(err) => Err(err),
            None => Ok(result),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let result = self.simple_query("IDENTIFY_SYSTEM").await?;
        let field = |name: &str| {
            result
                .first(name)
                .map(str::to_owned)
                .ok_or_else(|| self.protocol(&format!("IDENTIFY_SYSTEM without {name}")))
        };
        Ok(SystemIdentity {
            system_id: field("systemid")?,
            timeline: field("timeline")?
                .parse()
                .map_err(|_| self.protocol("IDENTIFY_SYSTEM timeline is not a number"))?,
            xlogpos: field("xlogpos")?
                .parse()
                .map_err(|_| self.protocol("IDENTIFY_SYSTEM xlogpos is not an LSN"))?,
            dbname: result.first("dbname").map(str::to_owned),
        })
    }

    /// `CREATE_REPLICATION_SLOT ... LOGICAL pgoutput`. With
    /// [`SnapshotAction::Export`] the snapshot stays importable only until
    /// the next command on this session: import it first.
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ReplicationError> {
        let temp = if temporary { " TEMPORARY" } else { "" };
        let sql = if self.server_version_num >= 150000 {
            let action = match snapshot {
                SnapshotAction::Export => "export",
                SnapshotAction::Nothing => "nothing",
            };
            format!(
                "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput (SNAPSHOT '{action}')",
                quote_ident(name)
            )
        } else {
            let action = match snapshot {
                SnapshotAction::Export => "EXPORT_SNAPSHOT",
                SnapshotAction::Nothing => "NOEXPORT_SNAPSHOT",
            };
            format!(
                "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput {action}",
                quote_ident(name)
            )
        };
        let result = self.simple_query(&sql).await?;
        let consistent_point = result
            .first("consistent_point")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.protocol("CREATE_REPLICATION_SLOT returned no consistent_point"))?;
        Ok(CreatedSlot {
            name: result.first("slot_name").unwrap_or(name).to_owned(),
            consistent_point,
            snapshot: result.first("snapshot_name").map(str::to_owned),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        let wait = if wait { " WAIT" } else { "" };
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}{wait}",
            quote_ident(name)
        ))
        .await
        .map(|_| ())
    }

    /// The server's `wal_sender_timeout`; status updates go at least three
    /// times as often. `None` when the server disables the timeout.
    pub async fn wal_sender_timeout(&mut self) -> Result<Option<Duration>, ReplicationError> {
        let result = self
            .simple_query(
                "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'wal_sender_timeout'",
            )
            .await?;
        let ms: u64 = result
            .rows
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(60_000);
        Ok((ms > 0).then(|| Duration::from_millis(ms)))
    }

    /// `START_REPLICATION SLOT ... LOGICAL start (...)`: the session turns
    /// into a stream of WAL data for the slot, from `start` (or from the
    /// slot's confirmed position when `start` is before it).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &PgOutputOptions,
    ) -> Result<crate::stream::ReplicationStream, ReplicationError> {
        let timeout = self.wal_sender_timeout().await?;
        let publications = options
            .publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut opts = vec![
            format!("\"proto_version\" '{}'", options.proto_version),
            format!("\"publication_names\" {}", command_literal(&publications)),
        ];
        if options.messages {
            opts.push("\"messages\" 'true'".into());
        }
        if options.streaming {
            opts.push("\"streaming\" 'true'".into());
        }
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(slot),
            opts.join(", ")
        );
        tracing::debug!(endpoint = %self.endpoint, command = %sql, "starting replication");
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf).map_err(|e| self.io_error(e))?;
        self.write_all(&buf).await?;
        loop {
            match self.read_backend().await? {
                Backend::CopyBothResponse => break,
                Backend::Message(Message::NoticeResponse(_)) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    let mut err = self.server_error(&body);
                    // Drain up to ReadyForQuery so the session stays usable.
                    while !matches!(
                        self.read_backend().await?,
                        Backend::Message(Message::ReadyForQuery(_))
                    ) {}
                    if let ReplicationError::Server { error, .. } = &mut err {
                        error.cause = self.slot_cause(slot, &error.code).await;
                    }
                    return Err(err);
                }
                Backend::Message(other) => {
                    return Err(self.protocol(&format!(
                        "unexpected reply to START_REPLICATION: {}",
                        name_of(&other)
                    )));
                }
            }
        }
        Ok(crate::stream::ReplicationStream::new(self, start, timeout))
    }

    /// What START_REPLICATION's error `code` means for `slot`, asked of
    /// the server's catalog rather than read from its message (which is in
    /// the server's language): the slot is gone (42704), or invalidated
    /// (55000 with `wal_status = 'lost'`).
    async fn slot_cause(&mut self, slot: &str, code: &str) -> Option<crate::error::Cause> {
        use crate::error::Cause;
        if !matches!(code, "42704" | "55000") {
            return None;
        }
        let sql = format!(
            "SELECT wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        );
        // A moment at most: the error itself is what matters.
        let found =
            tokio::time::timeout(std::time::Duration::from_secs(5), self.simple_query(&sql))
                .await
                .ok()?
                .ok()?;
        match (code, found.rows.first()) {
            ("42704", None) => Some(Cause::SlotMissing),
            ("55000", Some(row)) if row.first().and_then(|v| v.as_deref()) == Some("lost") => {
                Some(Cause::SlotLost)
            }
            _ => None,
        }
    }

    /// Parses one message from the buffer, if a whole one is there.
    pub(crate) fn try_parse(&mut self) -> Result<Option<Backend>, ReplicationError> {
        split_backend(&mut self.read_buf).map_err(|problem| self.protocol(&problem))
    }

    /// Reads more bytes from the socket into the buffer; returns how many.
    /// Cancel-safe: bytes read are kept in the buffer.
    pub(crate) async fn fill(&mut self) -> Result<usize, ReplicationError> {
        self.read_buf.reserve(64 * 1024);
        match self.socket.read_buf(&mut self.read_buf).await {
            Ok(0) => Err(ReplicationError::Io {
                endpoint: self.endpoint.clone(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ),
            }),
            Ok(read) => Ok(read),
            Err(e) => Err(self.io_error(e)),
        }
    }

    pub(crate) async fn read_backend(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(message) = self.try_parse()? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.socket
            .write_all(bytes)
            .await
            .map_err(|e| self.io_error(e))?;
        self.socket.flush().await.map_err(|e| self.io_error(e))
    }

    /// Writes some of `bytes`, returning how many; used by the stream to
    /// keep partially written messages across cancellation.
    pub(crate) async fn write_some(&mut self, bytes: &[u8]) -> Result<usize, ReplicationError> {
        let n = self
            .socket
            .write(bytes)
            .await
            .map_err(|e| self.io_error(e))?;
        if n == bytes.len() {
            self.socket.flush().await.map_err(|e| self.io_error(e))?;
        }
        Ok(n)
    }

    pub(crate) fn io_error(&self, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    pub(crate) fn protocol(&self, message: &str) -> ReplicationError {
        ReplicationError::Protocol {
            endpoint: self.endpoint.clone(),
            message: message.to_owned(),
        }
    }

    fn auth_protocol(&self, err: io::Error) -> ReplicationError {
        ReplicationError::Connect(ConnectError {
            endpoint: self.endpoint.clone(),
            failure: ConnectFailure::Authentication,
            detail: format!("SCRAM authentication failed: {err}"),
            hint: Some("the server's SCRAM answer did not verify: check the password, and that no proxy interferes with TLS".into()),
        })
    }

    pub(crate) fn server_error(&self, body: &ErrorResponseBody) -> ReplicationError {
        ReplicationError::Server {
            endpoint: self.endpoint.clone(),
            error: Box::new(parse_error(body)),
        }
    }

    fn connect_error(&self, info: &ConnInfo, body: &ErrorResponseBody) -> ReplicationError {
        let error = parse_error(body);
        let (failure, hint) = failure_for_sqlstate(
            &error.code,
            info.user().unwrap_or_default(),
            info.dbname().unwrap_or_default(),
        );
        ReplicationError::Connect(ConnectError {
            endpoint: self.endpoint.clone(),
            failure,
            detail: error.to_string(),
            hint: (!hint.is_empty()).then_some(hint).or(error.hint),
        })
    }
}

/// Sends SSLRequest when `sslmode` asks for TLS and upgrades the socket.
/// Returns the socket and, under TLS, the tls-server-end-point channel
/// binding data.
async fn negotiate_tls(
    info: &ConnInfo,
    host: &str,
    mut tcp: TcpStream,
) -> Result<(Socket, Option<Vec<u8>>), ReplicationError> {
    let endpoint = info.endpoint();
    let mode = info.sslmode();
    let Some(config) = tls::client_config(info).map_err(|source| ReplicationError::Tls {
        endpoint: endpoint.clone(),
        source,
    })?
    else {
        return Ok((Socket::Tcp(tcp), None));
    };
    let io_err = |source: io::Error| ReplicationError::Io {
        endpoint: endpoint.clone(),
        source,
    };
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {}
        b'N' if matches!(mode, SslMode::Allow | SslMode::Prefer) => {
            return Ok((Socket::Tcp(tcp), None));
        }
        b'N' => {
            return Err(ReplicationError::Connect(ConnectError {
                endpoint,
                failure: ConnectFailure::Tls,
                detail: format!(
                    "the server does not accept TLS, and sslmode={} requires it",
                    mode.as_str()
                ),
                hint: Some("turn ssl on in the server's postgresql.conf, or lower sslmode".into()),
            }));
        }
        other => {
            return Err(ReplicationError::Protocol {
                endpoint,
                message: format!("unexpected answer 0x{other:02x} to SSLRequest"),
            });
        }
    }
    let name = tls::server_name(host).map_err(|source| ReplicationError::Tls {
        endpoint: endpoint.clone(),
        source,
    })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
    let stream = connector.connect(name, tcp).await.map_err(|e| {
        ReplicationError::Connect(ConnectError {
            endpoint: endpoint.clone(),
            failure: ConnectFailure::Tls,
            detail: format!("TLS handshake failed: {e}"),
            hint: Some("check sslmode and sslrootcert: the server's certificate must be signed by the CA in sslrootcert (and name the host for verify-full)".into()),
        })
    })?;
    let binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| tls_server_end_point(cert.as_ref()));
    Ok((Socket::Tls(Box::new(stream)), binding))
}

/// RFC 5929 tls-server-end-point: the hash of the server certificate with
/// its signature's hash algorithm (SHA-256 for MD5 and SHA-1). `None` for
/// algorithms without one (Ed25519, RSA-PSS), which then do without
/// channel binding.
fn tls_server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest as _;
    use x509_cert::der::Decode as _;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    match cert.signature_algorithm.oid.to_string().as_str() {
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => Some(sha2::Sha256::digest(der).to_vec()),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(der).to_vec()),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(der).to_vec()),
        _ => None,
    }
}

/// Takes one whole backend message off the front of `buf`, if one is
/// there; what cannot be a message is a protocol error. postgres-protocol
/// parses every message but CopyBothResponse, which it does not know.
pub(crate) fn split_backend(buf: &mut BytesMut) -> Result<Option<Backend>, String> {
    if buf.len() >= 5 && buf[0] == COPY_BOTH_RESPONSE_TAG {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len < 4 {
            return Err("CopyBothResponse with an invalid length".into());
        }
        if buf.len() < len + 1 {
            return Ok(None);
        }
        buf.advance(len + 1);
        return Ok(Some(Backend::CopyBothResponse));
    }
    match Message::parse(buf) {
        Ok(Some(message)) => Ok(Some(Backend::Message(message))),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("unparsable message: {e}")),
    }
}

fn parse_error(body: &ErrorResponseBody) -> ServerError {
    let mut error = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
        detail: None,
        hint: None,
        cause: None,
    };
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => error.severity = value,
            b'S' if error.severity == "ERROR" => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    error
}

/// `15.4 (Debian 15.4-1)` → 150004; `9.6.2` → 90602.
fn parse_server_version(text: &str) -> Option<u32> {
    let numeric: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + minor)
    } else {
        let patch = parts.next().flatten().unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

fn name_of(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::NoticeResponse(_) => "NoticeResponse",
        _ => "another message",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_parse() {
        assert_eq!(
            parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
            Some(150004)
        );
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("x"), None);
    }

    #[test]
    fn options_follow_the_server_version() {
        let v15 = PgOutputOptions::for_server(150004, vec!["p".into()]);
        assert_eq!(
            (v15.proto_version, v15.streaming, v15.messages),
            (2, true, true)
        );
        let v13 = PgOutputOptions::for_server(130010, vec!["p".into()]);
        assert_eq!((v13.proto_version, v13.streaming), (1, false));
    }
}
