//! Connection strings, parsed once for every connection cutover makes.
//!
//! Operators write connection strings the way libpq taught them: either a
//! URL (`postgres://user:pw@host:5432/db?sslmode=verify-full`) or
//! `key=value` pairs (`host=/run/postgresql dbname=app user=cutover`).
//! Both forms parse into one [`ConnInfo`], which the regular SQL
//! connections (through tokio-postgres) and the replication connection
//! share, so the two can never disagree about where a server is or how to
//! reach it securely.
//!
//! Why not `tokio_postgres::Config::from_str`: it does not know the
//! `verify-ca`/`verify-full` SSL modes nor `sslrootcert`, which a migration
//! between two servers over a network needs, and it would let the two
//! connection kinds drift apart. The grammar is small and follows libpq's
//! documentation ("Connection Strings", section 34.1.1).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::secret::Secret;

/// The default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

/// Unix socket directories tried, in order, when a connection string names
/// no host (the Debian default first, then the upstream default).
const DEFAULT_SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, reached over TCP.
    Tcp(String),
    /// The directory holding the server's unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(name) if name.contains(':') => write!(f, "[{name}]"),
            Host::Tcp(name) => f.write_str(name),
            Host::Unix(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// libpq's `sslmode`, with libpq's meaning for each value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Plain first; TLS only if the server insists. Treated as `prefer`
    /// because a server that refuses plain connections answers the same way.
    Allow,
    /// TLS when the server offers it, without verifying the certificate.
    #[default]
    Prefer,
    /// TLS always; the certificate is verified against `sslrootcert` only
    /// when one is given (as libpq does).
    Require,
    /// TLS, certificate chain verified against the root certificates.
    VerifyCa,
    /// TLS, chain verified and the host name must match the certificate.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnInfoError::new(format!(
                    "invalid sslmode {other:?}: use one of disable, allow, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's `channel_binding` for SCRAM authentication over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    /// Never bind the SCRAM exchange to the TLS channel.
    Disable,
    /// Bind when TLS is in use and the server supports it.
    #[default]
    Prefer,
    /// Fail unless the exchange is bound to the TLS channel.
    Require,
}

/// Why a connection string was refused. The message never contains the
/// password, even when the password is what could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConnInfoError {
    message: String,
}

impl ConnInfoError {
    fn new(message: impl Into<String>) -> ConnInfoError {
        ConnInfoError {
            message: message.into(),
        }
    }
}

/// A parsed connection string.
///
/// `Display` gives a `key=value` rendering without the password, safe for
/// logs and error messages; `Debug` redacts the password as well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    host: Host,
    port: u16,
    user: Option<String>,
    dbname: Option<String>,
    password: Option<Secret>,
    sslmode: SslMode,
    sslrootcert: Option<String>,
    channel_binding: ChannelBinding,
    application_name: Option<String>,
    connect_timeout: Option<Duration>,
    options: Option<String>,
    tcp: TcpSettings,
}

/// How TCP notices a peer that vanished without closing the connection
/// (a network cut, a host that lost power): libpq's `keepalives`,
/// `keepalives_idle`, `keepalives_interval`, `keepalives_count` and
/// `tcp_user_timeout`, with cutover's defaults where they are not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSettings {
    /// Keepalive probes: after `idle` of silence, every `interval`,
    /// `count` unanswered ones close the connection. `None`:
    /// `keepalives=0`.
    pub keepalive: Option<Keepalive>,
    /// Data unacknowledged this long closes the connection; `None`
    /// (`tcp_user_timeout=0`): the system's default, which can be 15
    /// minutes and more.
    pub user_timeout: Option<Duration>,
}

/// TCP keepalive probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Unanswered probes that close the connection.
    pub count: u32,
}

impl Default for TcpSettings {
    fn default() -> TcpSettings {
        TcpSettings {
            keepalive: Some(Keepalive {
                idle: TCP_KEEPALIVE_IDLE,
                interval: TCP_KEEPALIVE_INTERVAL,
                count: TCP_KEEPALIVE_RETRIES,
            }),
            user_timeout: Some(TCP_USER_TIMEOUT),
        }
    }
}

impl TcpSettings {
    /// Sets them on a connected socket.
    pub fn apply(&self, socket: socket2::SockRef<'_>) -> std::io::Result<()> {
        match self.keepalive {
            Some(k) => socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(k.idle)
                    .with_interval(k.interval)
                    .with_retries(k.count),
            )?,
            None => socket.set_keepalive(false)?,
        }
        socket.set_tcp_user_timeout(self.user_timeout)
    }
}

impl ConnInfo {
    /// Parses either connection string form.
    pub fn parse(text: &str) -> Result<ConnInfo, ConnInfoError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ConnInfoError::new(
                "empty connection string: give a URL like postgres://user@host:5432/dbname or key=value pairs like 'host=db1 dbname=app user=cutover'",
            ));
        }
        let pairs = if let Some(rest) = strip_scheme(trimmed) {
            parse_url(rest)?
        } else if trimmed.contains("://") {
            return Err(ConnInfoError::new(
                "unsupported URL scheme: a connection URL starts with postgres:// or postgresql://",
            ));
        } else {
            parse_key_values(trimmed)?
        };
        ConnInfo::from_pairs(pairs)
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> Result<ConnInfo, ConnInfoError> {
        let mut host = None;
        let mut port = None;
        let mut info = ConnInfo {
            host: Host::Tcp(String::new()),
            port: DEFAULT_PORT,
            user: None,
            dbname: None,
            password: None,
            sslmode: SslMode::default(),
            sslrootcert: None,
            channel_binding: ChannelBinding::default(),
            application_name: None,
            connect_timeout: None,
            options: None,
            tcp: TcpSettings::default(),
        };
        let mut keepalives = true;
        let mut keepalives_given = false;
        let mut user_timeout_given = false;
        for (key, value) in pairs {
            match key.as_str() {
                "host" | "hostaddr" => {
                    if value.contains(',') {
                        return Err(ConnInfoError::new(format!(
                            "{key} lists several servers ({value:?}): cutover connects to exactly one source and one target, name one host"
                        )));
                    }
                    if !value.is_empty() {
                        host = Some(value);
                    }
                }
                "port" => {
                    if !value.is_empty() {
                        port = Some(value.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(
                            || {
                                // The value is not echoed: in a URL whose password
                                // holds an unencoded '/', the "port" is a piece of it.
                                ConnInfoError::new(
                                    "invalid port: expected a number from 1 to 65535 (in a URL, percent-encode '/', '?', '@' and '#' in the password)",
                                )
                            },
                        )?);
                    }
                }
                "user" => info.user = non_empty(value),
                "dbname" => info.dbname = non_empty(value),
                "password" => info.password = non_empty(value).map(Secret::new),
                "sslmode" => info.sslmode = SslMode::parse(&value)?,
                "sslrootcert" => info.sslrootcert = non_empty(value),
                "channel_binding" => {
                    info.channel_binding = match value.as_str() {
                        "disable" => ChannelBinding::Disable,
                        "prefer" => ChannelBinding::Prefer,
                        "require" => ChannelBinding::Require,
                        other => {
                            return Err(ConnInfoError::new(format!(
                                "invalid channel_binding {other:?}: use disable, prefer or require"
                            )));
                        }
                    }
                }
                "application_name" | "fallback_application_name" => {
                    if key == "application_name" || info.application_name.is_none() {
                        info.application_name = non_empty(value);
                    }
                }
                "connect_timeout" => {
                    let seconds: u64 = value.parse().map_err(|_| {
                        ConnInfoError::new(format!(
                            "invalid connect_timeout {value:?}: expected whole seconds"
                        ))
                    })?;
                    // libpq treats 0 as "wait forever" and anything below 2 as 2.
                    info.connect_timeout =
                        (seconds > 0).then(|| Duration::from_secs(seconds.max(2)));
                }
                "options" => info.options = non_empty(value),
                "keepalives" => {
                    // libpq: any number but 0 turns them on.
                    keepalives = value.parse::<i64>().map(|n| n != 0).map_err(|_| {
                        ConnInfoError::new(format!(
                            "invalid keepalives {value:?}: 1 (the default) or 0"
                        ))
                    })?;
                }
                "keepalives_idle" | "keepalives_interval" | "keepalives_count" => {
                    let n = whole(&key, &value)?;
                    keepalives_given = true;
                    // `keepalives=0` is applied after the loop: set here;
                    // 0 keeps cutover's default (libpq: the system's).
                    if let Some(k) = info.tcp.keepalive.as_mut().filter(|_| n > 0) {
                        match key.as_str() {
                            "keepalives_idle" => k.idle = Duration::from_secs(u64::from(n)),
                            "keepalives_interval" => k.interval = Duration::from_secs(u64::from(n)),
                            _ => k.count = n,
                        }
                    }
                }
                "tcp_user_timeout" => {
                    let ms: u64 = value.parse().map_err(|_| {
                        ConnInfoError::new(format!(
                            "invalid tcp_user_timeout {value:?}: expected milliseconds (0: the system's default)"
                        ))
                    })?;
                    info.tcp.user_timeout = (ms > 0).then(|| Duration::from_millis(ms));
                    user_timeout_given = true;
                }
                // Accepted for compatibility; they do not change what
                // cutover does.
                "target_session_attrs" | "gssencmode" | "client_encoding" => {}
                "replication" => {
                    return Err(ConnInfoError::new(
                        "remove the replication parameter: cutover opens replication connections itself where it needs them",
                    ));
                }
                "sslcert" | "sslkey" | "sslpassword" | "passfile" | "service" => {
                    return Err(ConnInfoError::new(format!(
                        "the connection parameter {key} is not supported by cutover: authenticate with a password (password_file in the config) instead"
                    )));
                }
                other => {
                    return Err(ConnInfoError::new(format!(
                        "unknown connection parameter {other:?}: known ones are host, port, dbname, user, password, sslmode, sslrootcert, channel_binding, application_name, connect_timeout, options, keepalives, keepalives_idle, keepalives_interval, keepalives_count, tcp_user_timeout"
                    )));
                }
            }
        }
        if !keepalives {
            info.tcp.keepalive = None;
        }
        // On Linux a user timeout also decides when unanswered probes end
        // a connection: the probes asked for decide alone, unless a user
        // timeout is asked for too.
        if keepalives_given
            && !user_timeout_given
            && let Some(k) = info.tcp.keepalive
        {
            info.tcp.user_timeout = Some(k.idle + k.interval * k.count);
        }
        info.port = port.unwrap_or(DEFAULT_PORT);
        info.host = match host {
            Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            Some(h) => Host::Tcp(h),
            None => Host::Unix(default_socket_dir()),
        };
        Ok(info)
    }

    /// Where the server listens.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The server's port (also part of a unix socket's file name).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The role to log in as, if one was given.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The database; libpq's default is the user name.
    pub fn dbname(&self) -> Option<&str> {
        self.dbname.as_deref().or(self.user.as_deref())
    }

    /// The password, if one was given.
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }

    /// Replaces the password (from the config's `password` or
    /// `password_file`, which take precedence over the string's own).
    pub fn set_password(&mut self, password: Secret) {
        self.password = Some(password);
    }

    /// The SSL mode; over a unix socket TLS is never used, as in libpq.
    pub fn sslmode(&self) -> SslMode {
        match self.host {
            Host::Unix(_) => SslMode::Disable,
            Host::Tcp(_) => self.sslmode,
        }
    }

    /// The root certificate file, or `system` for the operating system's.
    pub fn sslrootcert(&self) -> Option<&str> {
        self.sslrootcert.as_deref()
    }

    /// The channel binding policy for SCRAM.
    pub fn channel_binding(&self) -> ChannelBinding {
        self.channel_binding
    }

    /// How TCP notices a vanished peer.
    pub fn tcp(&self) -> TcpSettings {
        self.tcp
    }

    /// The connect timeout, if any.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// The `application_name` reported to the server, if any.
    pub fn application_name(&self) -> Option<&str> {
        self.application_name.as_deref()
    }

    /// Replaces `application_name` when the string did not set one.
    pub fn default_application_name(&mut self, name: &str) {
        if self.application_name.is_none() {
            self.application_name = Some(name.to_owned());
        }
    }

    /// Server options (`-c name=value ...`), if any.
    pub fn options(&self) -> Option<&str> {
        self.options.as_deref()
    }

    /// Names this server in messages: `host:port/dbname`, never a password.
    pub fn endpoint(&self) -> String {
        let db = self.dbname().unwrap_or("?");
        match &self.host {
            Host::Tcp(_) => format!("{}:{}/{db}", self.host, self.port),
            Host::Unix(dir) => format!("{}/.s.PGSQL.{}/{db}", dir.display(), self.port),
        }
    }

    /// Settings for a regular (non-replication) tokio-postgres connection.
    /// TLS is chosen by [`crate::tls`], which reads the same `ConnInfo`.
    pub fn to_pg_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        match &self.host {
            Host::Tcp(name) => config.host(name),
            Host::Unix(dir) => config.host_path(dir),
        };
        config.port(self.port);
        if let Some(user) = &self.user {
            config.user(user);
        }
        if let Some(db) = self.dbname() {
            config.dbname(db);
        }
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        if let Some(name) = &self.application_name {
            config.application_name(name);
        }
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout(timeout);
        }
        match self.tcp.keepalive {
            Some(k) => config
                .keepalives(true)
                .keepalives_idle(k.idle)
                .keepalives_interval(k.interval)
                .keepalives_retries(k.count),
            None => config.keepalives(false),
        };
        if let Some(timeout) = self.tcp.user_timeout {
            config.tcp_user_timeout(timeout);
        }
        if let Some(options) = &self.options {
            config.options(options);
        }
        config.ssl_mode(match self.sslmode() {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        config.channel_binding(match self.channel_binding {
            ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        });
        config
    }
}

impl fmt::Display for ConnInfo {
    /// `key=value` form without the password (shown as `password=****`
    /// when one is set, so an operator can see that one is).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host={} port={}",
            quote_value(&self.host.to_string()),
            self.port
        )?;
        if let Some(db) = self.dbname() {
            write!(f, " dbname={}", quote_value(db))?;
        }
        if let Some(user) = &self.user {
            write!(f, " user={}", quote_value(user))?;
        }
        if self.password.is_some() {
            f.write_str(" password=****")?;
        }
        write!(f, " sslmode={}", self.sslmode.as_str())?;
        if let Some(root) = &self.sslrootcert {
            write!(f, " sslrootcert={}", quote_value(root))?;
        }
        Ok(())
    }
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn quote_value(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn default_socket_dir() -> PathBuf {
    DEFAULT_SOCKET_DIRS
        .iter()
        .map(Path::new)
        .find(|dir| dir.is_dir())
        .unwrap_or(Path::new(DEFAULT_SOCKET_DIRS[1]))
        .to_path_buf()
}

fn strip_scheme(text: &str) -> Option<&str> {
    text.strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
}

fn decode(part: &str, what: &str) -> Result<String, ConnInfoError> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ConnInfoError::new(format!(
                "the {what} in the URL is not valid UTF-8 after percent-decoding"
            ))
        })
}

/// `postgres://[user[:password]@][host][:port][/dbname][?key=value&...]`,
/// everything after the scheme.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let (main, query) = match rest.split_once('?') {
        Some((main, query)) => (main, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (main, None),
    };
    // The password may contain '@' when percent-encoded only; the last '@'
    // separates the user info from the host, as in libpq.
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        pairs.push(("user".to_owned(), decode(user, "user name")?));
        if let Some(password) = password {
            // Never echo the password back, even when it is malformed.
            pairs.push(("password".to_owned(), decode(password, "password")?));
        }
    }
    if !hostport.is_empty() {
        let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or_else(|| {
                ConnInfoError::new(
                    "malformed URL: an IPv6 address opened with '[' has no closing ']'",
                )
            })?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    ConnInfoError::new(format!(
                        "malformed URL: unexpected {p:?} after the IPv6 address"
                    ))
                })?),
            };
            (host, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.contains(',') {
            return Err(ConnInfoError::new(
                "the URL lists several hosts: cutover connects to exactly one source and one target, name one host",
            ));
        }
        if host.contains(['@', ' ', '/']) {
            return Err(ConnInfoError::new(
                "malformed URL: the host part is not a host name (percent-encode a socket directory, like %2Frun%2Fpostgresql, and '/', '?', '@' and '#' in the password)",
            ));
        }
        pairs.push(("host".to_owned(), decode(host, "host")?));
        if let Some(port) = port {
            pairs.push(("port".to_owned(), decode(port, "port")?));
        }
    }
    if let Some(path) = path
        && !path.is_empty()
    {
        if path.contains('/') {
            // Not echoed: with an unencoded '/' in the password, this
            // "database name" holds the rest of the password.
            return Err(ConnInfoError::new(
                "malformed URL: the database name contains '/': percent-encode it as %2F (and '/', '?', '@' and '#' in the password)",
            ));
        }
        pairs.push(("dbname".to_owned(), decode(path, "database name")?));
    }
    if let Some(query) = query {
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').ok_or_else(|| {
                // Not echoed: with an unencoded '?' in the password, this
                // "parameter" is the rest of the password.
                ConnInfoError::new(
                    "malformed URL: a query parameter has no '=value' (percent-encode '/', '?', '@' and '#' in the password)",
                )
            })?;
            let key = decode(key, "parameter name")?;
            let value = decode(value, &format!("value of {key}"))?;
            pairs.push((key, value));
        }
    }
    Ok(pairs)
}

/// A peer that vanished without closing the connection (a network cut, a
/// host that lost power) is noticed by TCP itself: keepalive probes after
/// this much silence...
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ...repeated this often...
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...this many times before the connection is declared dead.
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Data sent but not acknowledged for this long closes the connection:
/// a stream that sends status updates, or an apply waiting on a reply,
/// fails (and is retried) instead of hanging on a dead peer.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Parameter names libpq knows that may appear before an `=`: safe to
/// name in an error, unlike any other word of the string.
const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "sslmode",
    "sslrootcert",
    "channel_binding",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "options",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
];

/// A whole number for `key` (0: the default).
fn whole(key: &str, value: &str) -> Result<u32, ConnInfoError> {
    value.parse::<u32>().map_err(|_| {
        ConnInfoError::new(format!(
            "invalid {key} {value:?}: expected a whole number{}",
            if key == "keepalives_count" {
                ""
            } else {
                " of seconds"
            }
        ))
    })
}

/// `key=value key2='quoted value' key3=with\ escape`.
fn parse_key_values(text: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The word is named only when it is a parameter name: otherwise
            // it may be the second half of an unquoted password.
            let after = if KNOWN_KEYS.contains(&key.as_str()) {
                format!("after {key:?}")
            } else {
                "after a word that is not a parameter name (quote values with spaces: password='two words')".to_owned()
            };
            return Err(ConnInfoError::new(format!(
                "malformed connection string: expected '=' {after}; write key=value pairs like 'host=db1 port=5432 dbname=app' or a postgres:// URL"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(ConnInfoError::new(format!(
                            "malformed connection string: the quoted value of {key} has no closing quote"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_value_form() {
        let info = ConnInfo::parse(
            "host=/run/postgresql port=5433 dbname=app user=cutover password='se cr\\'et' sslmode=disable",
        )
        .unwrap();
        assert_eq!(info.host(), &Host::Unix("/run/postgresql".into()));
        assert_eq!(info.port(), 5433);
        assert_eq!(info.dbname(), Some("app"));
        assert_eq!(info.user(), Some("cutover"));
        assert_eq!(info.password().unwrap().expose(), "se cr'et");
        assert_eq!(info.sslmode(), SslMode::Disable);
    }

    #[test]
    fn parses_url_form() {
        let info = ConnInfo::parse(
            "postgres://cut%40over:p%40ss:w@new-db:6543/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(info.user(), Some("cut@over"));
        assert_eq!(info.password().unwrap().expose(), "p@ss:w");
        assert_eq!(info.host(), &Host::Tcp("new-db".into()));
        assert_eq!(info.port(), 6543);
        assert_eq!(info.dbname(), Some("app"));
        assert_eq!(info.sslmode(), SslMode::VerifyFull);
        assert_eq!(info.sslrootcert(), Some("/etc/ca.pem"));
        assert_eq!(info.application_name(), Some("x"));
    }

    #[test]
    fn url_variants() {
        let info = ConnInfo::parse("postgresql://[::1]:5000/db").unwrap();
        assert_eq!(info.host(), &Host::Tcp("::1".into()));
        assert_eq!(info.port(), 5000);
        let info = ConnInfo::parse("postgres://%2Ftmp%2Fsock/db?user=u").unwrap();
        assert_eq!(info.host(), &Host::Unix("/tmp/sock".into()));
        assert_eq!(info.user(), Some("u"));
        assert_eq!(info.dbname(), Some("db"));
        let info = ConnInfo::parse("postgres:///db?host=/var/run/x&port=7").unwrap();
        assert_eq!(info.host(), &Host::Unix("/var/run/x".into()));
        assert_eq!(info.port(), 7);
        // libpq's default database is the user name.
        let info = ConnInfo::parse("postgres://alice@h").unwrap();
        assert_eq!(info.dbname(), Some("alice"));
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let info = ConnInfo::parse("host=/tmp sslmode=require").unwrap();
        assert_eq!(info.sslmode(), SslMode::Disable);
    }

    #[test]
    fn malformed_strings_are_refused_without_echoing_the_password() {
        for (bad, needle) in [
            ("postgres://u:topsecret@h:notaport/db", "invalid port"),
            (
                "postgres://u:topsecret@h/db?sslmode=verify-fully",
                "invalid sslmode",
            ),
            (
                "postgres://u:topsecret@h/db?bogus=1",
                "unknown connection parameter",
            ),
            ("postgres://u:topsecret@[::1/db", "no closing"),
            ("mysql://u:topsecret@h/db", "scheme"),
            ("host=h password=topsecret dbname", "expected '='"),
            ("host=h password=top topsecret dbname=x", "expected '='"),
            (
                "postgres://u:top/topsecret@h/db",
                "database name contains '/'",
            ),
            ("postgres://u:top?topsecret@h/db", "query parameter has no"),
            ("postgres://u:topsecret", "invalid port"),
            ("host=h password='topsecret", "no closing quote"),
            ("host=a,b password=topsecret", "several servers"),
            ("   ", "empty"),
        ] {
            let err = ConnInfo::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
            assert!(!err.contains("topsecret"), "{bad}: {err}");
        }
    }

    #[test]
    fn display_and_debug_redact_the_password() {
        let info = ConnInfo::parse("postgres://u:topsecret@h/db").unwrap();
        let shown = format!("{info} {info:?} {}", info.endpoint());
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("password=****"), "{shown}");
        // And the rendering parses back to the same server.
        let again = ConnInfo::parse(&info.to_string().replace(" password=****", "")).unwrap();
        assert_eq!(again.host(), info.host());
        assert_eq!(again.dbname(), info.dbname());
    }

    #[test]
    fn keepalives_and_user_timeout_follow_libpq() {
        let defaults = ConnInfo::parse("postgres://h/db").unwrap().tcp();
        assert_eq!(defaults, TcpSettings::default());
        assert_eq!(defaults.user_timeout, Some(TCP_USER_TIMEOUT));

        let info = ConnInfo::parse(
            "postgres://h/db?keepalives_idle=2&keepalives_interval=1&keepalives_count=3&tcp_user_timeout=4500",
        )
        .unwrap();
        assert_eq!(
            info.tcp(),
            TcpSettings {
                keepalive: Some(Keepalive {
                    idle: Duration::from_secs(2),
                    interval: Duration::from_secs(1),
                    count: 3
                }),
                user_timeout: Some(Duration::from_millis(4500)),
            }
        );
        let config = info.to_pg_config();
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(2));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_millis(4500))
        );

        let off =
            ConnInfo::parse("host=h keepalives=0 keepalives_idle=5 tcp_user_timeout=0").unwrap();
        assert_eq!(off.tcp().keepalive, None);
        assert_eq!(off.tcp().user_timeout, None);
        assert!(!off.to_pg_config().get_keepalives());

        // Probes asked for without a user timeout decide alone: the user
        // timeout follows them; 0 keeps the default.
        let probes = ConnInfo::parse(
            "host=h keepalives=2 keepalives_idle=5 keepalives_interval=1 keepalives_count=0",
        )
        .unwrap()
        .tcp();
        assert_eq!(
            probes.keepalive,
            Some(Keepalive {
                idle: Duration::from_secs(5),
                interval: Duration::from_secs(1),
                count: TCP_KEEPALIVE_RETRIES
            })
        );
        assert_eq!(probes.user_timeout, Some(Duration::from_secs(5 + 3)));

        for bad in [
            "host=h keepalives=yes",
            "host=h keepalives_idle=soon",
            "host=h keepalives_count=-1",
            "host=h tcp_user_timeout=5s",
        ] {
            let err = ConnInfo::parse(bad).unwrap_err().to_string();
            let key = bad
                .split_whitespace()
                .nth(1)
                .unwrap()
                .split('=')
                .next()
                .unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }
}
