//! The configuration contract (DESIGN.md, "Command-line and config").
//!
//! A TOML file, every key overridable from the environment as
//! `CUTOVER__SECTION__KEY`. Loading happens in two steps:
//!
//! 1. [`load`] merges the file and the environment with the `config` crate
//!    and deserializes into [`RawConfig`]. Unknown keys are refused, naming
//!    where they came from (the file, or the variable) and the closest
//!    known key.
//! 2. [`RawConfig::validate`] checks every value and produces [`Config`]:
//!    connection strings parsed, passwords resolved, patterns compiled.
//!    Each error names the key path and the constraint.
//!
//! Passwords come from the connection string, from `password` (usually set
//! as `CUTOVER__SOURCE__PASSWORD`), or from `password_file`; they live in a
//! [`Secret`] and never print.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cutover_replication::catalog::{Scope, TablePattern};
use cutover_replication::conninfo::ConnInfo;
use cutover_replication::ddl::DdlPolicy;
use cutover_replication::secret::Secret;
use serde::Deserialize;

/// Prefix of environment overrides: `CUTOVER__SOURCE__URL`.
pub const ENV_PREFIX: &str = "CUTOVER";
/// Separator between prefix, section and key in environment overrides.
pub const ENV_SEPARATOR: &str = "__";

/// Default state directory (the sled store).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cutover";
/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "cutover";
/// Default publication name.
pub const DEFAULT_PUBLICATION: &str = "cutover";
/// Default include pattern.
pub const DEFAULT_TABLES: &str = "public.*";
/// Default `/metrics` and `/health` address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9187";
/// Default admin console address.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:6433";
/// The application_name cutover's sessions show in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "cutover";

/// Every key the contract knows, by section. Unknown keys are refused
/// against this list (the serde structs below refuse them as well).
const KNOWN_KEYS: &[(&str, &[&str])] = &[
    ("source", &["url", "password", "password_file"]),
    ("target", &["url", "password", "password_file"]),
    ("state", &["dir", "lag_sample_seconds"]),
    (
        "replication",
        &["slot", "publication", "tables", "exclude", "keyless"],
    ),
    ("http", &["listen", "max_lag_seconds"]),
    (
        "console",
        &["listen", "password", "password_file", "allow_no_password"],
    ),
    (
        "copy",
        &[
            "workers",
            "chunk_mb",
            "drop_indexes",
            "analyze",
            "truncate_target",
        ],
    ),
    (
        "apply",
        &[
            "batch_rows",
            "batch_mb",
            "batch_ms",
            "queue_transactions",
            "queue_mb",
            "spill_mb",
        ],
    ),
    ("ddl", &["policy"]),
];

/// Keys that hold lists; in the environment they are comma-separated.
const LIST_KEYS: &[&str] = &["replication.tables", "replication.exclude"];

/// A configuration problem. Always names the key or the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A key no section knows.
    #[error("unknown config key {key} ({origin}){}", suggestion.as_ref().map(|s| format!("; did you mean {s}?")).unwrap_or_default())]
    UnknownKey {
        /// `section.key` as found.
        key: String,
        /// The file or the environment variable it came from.
        origin: String,
        /// The closest known key.
        suggestion: Option<String>,
    },
    /// A value that breaks a constraint.
    #[error("config key {key}: {problem}")]
    Invalid {
        /// `section.key`.
        key: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// `[source]` and `[target]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Connection string, URL or `key=value`.
    pub url: Option<String>,
    /// Password; takes precedence over one in `url`.
    pub password: Option<Secret>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
}

/// `[state]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// Directory of the sled store.
    pub dir: Option<PathBuf>,
    /// Seconds between two lag samples.
    pub lag_sample_seconds: Option<u32>,
}

/// `[replication]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    /// Slot name on the source.
    pub slot: Option<String>,
    /// Publication name on the source.
    pub publication: Option<String>,
    /// Include patterns.
    pub tables: Option<Vec<String>>,
    /// Exclude patterns.
    pub exclude: Option<Vec<String>>,
    /// What tables without a key or replica identity get.
    pub keyless: Option<String>,
}

/// `[copy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCopy {
    /// Parallel copy workers.
    pub workers: Option<u32>,
    /// Size of one chunk of a table, in MB of heap pages.
    pub chunk_mb: Option<u32>,
    /// Drop secondary indexes before loading a table, rebuild after.
    pub drop_indexes: Option<bool>,
    /// ANALYZE each table after its load.
    pub analyze: Option<bool>,
    /// Empty non-empty target tables before a fresh copy.
    pub truncate_target: Option<bool>,
}

/// `[apply]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApply {
    /// Most changes in one target transaction.
    pub batch_rows: Option<u32>,
    /// Most MB of changes in one target transaction.
    pub batch_mb: Option<u32>,
    /// Most milliseconds a batch waits for more transactions.
    pub batch_ms: Option<u32>,
    /// Most committed transactions waiting for the applier.
    pub queue_transactions: Option<u32>,
    /// Most MB of committed transactions waiting for the applier.
    pub queue_mb: Option<u32>,
    /// A transaction bigger than this goes to disk even when the server
    /// does not stream it.
    pub spill_mb: Option<u32>,
}

/// `[http]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` to listen on.
    pub listen: Option<String>,
    /// `/health` answers 503 above this lag.
    pub max_lag_seconds: Option<u32>,
}

/// `[console]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    /// `host:port` to listen on.
    pub listen: Option<String>,
    /// The console password (any user name).
    pub password: Option<Secret>,
    /// File whose first line is the console password.
    pub password_file: Option<PathBuf>,
    /// Allow a console without a password on a loopback address.
    pub allow_no_password: Option<bool>,
}

/// The configuration as merged from file and environment, not yet checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[source]`.
    #[serde(default)]
    pub source: RawServer,
    /// `[target]`.
    #[serde(default)]
    pub target: RawServer,
    /// `[state]`.
    #[serde(default)]
    pub state: RawState,
    /// `[replication]`.
    #[serde(default)]
    pub replication: RawReplication,
    /// `[http]`.
    #[serde(default)]
    pub http: RawHttp,
    /// `[console]`.
    #[serde(default)]
    pub console: RawConsole,
    /// `[copy]`.
    #[serde(default)]
    pub copy: RawCopy,
    /// `[apply]`.
    #[serde(default)]
    pub apply: RawApply,
    /// `[ddl]`.
    #[serde(default)]
    pub ddl: RawDdl,
}

/// `[ddl]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDdl {
    /// `stop` or `additive`.
    pub policy: Option<String>,
}

/// Default lag above which `/health` answers 503.
pub const DEFAULT_MAX_LAG_SECONDS: u32 = 300;
/// Default seconds between lag samples (a week is 60,480 samples).
pub const DEFAULT_LAG_SAMPLE_SECONDS: u32 = 10;

/// Default most changes per target transaction.
pub const DEFAULT_BATCH_ROWS: u32 = 10_000;
/// Default most MB per target transaction (a batch is also bounded by
/// what the queue holds, `apply.queue_mb`).
pub const DEFAULT_BATCH_MB: u32 = 32;
/// Default most milliseconds a batch waits for more transactions: none,
/// what is queued is applied at once.
pub const DEFAULT_BATCH_MS: u32 = 0;
/// Default most transactions queued for the applier.
pub const DEFAULT_QUEUE_TRANSACTIONS: u32 = 10_000;
/// Default most MB queued for the applier (in flight included). Small on
/// purpose: a reader far ahead of the applier takes each message from the
/// walsender as it is sent, and the send and wake-up per message cost the
/// source and the daemon CPU that the target's apply needs (on 2 cores,
/// `bench --scenario apply-100 --changes 600000`: 88k changes/s with 8 MB
/// against 73k with 64 MB). Behind a full queue the walsender writes in
/// large blocks, as it does for a native subscriber.
pub const DEFAULT_QUEUE_MB: u32 = 8;
/// Default size above which a transaction is spilled to disk.
pub const DEFAULT_SPILL_MB: u32 = 64;

/// How the streaming apply batches and buffers, checked.
#[derive(Clone, Debug)]
pub struct ApplySettings {
    /// Most changes in one target transaction.
    pub batch_rows: usize,
    /// Most bytes in one target transaction.
    pub batch_bytes: usize,
    /// How long a batch that is not full waits for more transactions
    /// before it is applied; zero applies what is queued at once.
    pub batch_wait: std::time::Duration,
    /// Most committed transactions queued.
    pub queue_transactions: usize,
    /// Most bytes queued.
    pub queue_bytes: usize,
    /// Transactions bigger than this are spilled to disk.
    pub spill_bytes: usize,
}

/// Default number of copy workers.
pub const DEFAULT_COPY_WORKERS: u32 = 4;
/// Default chunk size in MB.
pub const DEFAULT_CHUNK_MB: u32 = 64;

/// What a table gets that neither a primary key nor a replica identity
/// identifies (`replication.keyless`). Publishing its UPDATEs and DELETEs
/// would make them fail on the source, so cutover never does that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeylessPolicy {
    /// Its INSERTs and TRUNCATEs stream (through a publication of their
    /// own); its UPDATEs and DELETEs keep working on the source, are not
    /// streamed, and are reported as rows the stream cannot carry.
    AppendOnly,
    /// `run` sets `REPLICA IDENTITY FULL` on the source (the operator's
    /// choice: more WAL per UPDATE and DELETE), and every change streams.
    ReplicaIdentityFull,
    /// `check` blocks and `run` refuses to start while such a table is in
    /// scope.
    Refuse,
}

/// The default `replication.keyless`: never breaks the source.
pub const DEFAULT_KEYLESS: KeylessPolicy = KeylessPolicy::AppendOnly;

/// How the snapshot copy runs, checked.
#[derive(Clone, Debug)]
pub struct CopySettings {
    /// Parallel workers, each with its own source and target connection.
    pub workers: usize,
    /// Heap pages per chunk.
    pub pages_per_chunk: u32,
    /// Drop secondary indexes before loading, rebuild after.
    pub drop_indexes: bool,
    /// ANALYZE after loading.
    pub analyze: bool,
    /// Truncate target tables that hold rows before a fresh copy.
    pub truncate_target: bool,
}

/// How the admin console lets people in.
#[derive(Clone, Debug)]
pub enum ConsoleAuth {
    /// SCRAM-SHA-256 with this password, any user name.
    Password(Secret),
    /// No password: only on a loopback address, and only when the config
    /// says so (`console.allow_no_password = true`).
    Open,
    /// No password configured: the console does not start.
    Disabled,
}

/// A server to connect to, checked.
#[derive(Clone, Debug)]
pub struct Server {
    /// `source` or `target`: the config section, used to name the server in
    /// messages.
    pub role: &'static str,
    /// Where and how to connect, password included (redacted on print).
    pub conninfo: ConnInfo,
}

/// The checked configuration every command works from.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server migrated from.
    pub source: Server,
    /// The server migrated to.
    pub target: Server,
    /// The sled store's directory.
    pub state_dir: PathBuf,
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// The tables in scope.
    pub scope: Scope,
    /// The include patterns as written (for messages).
    pub include_patterns: Vec<String>,
    /// What tables without a key or replica identity get.
    pub keyless: KeylessPolicy,
    /// `/metrics` and `/health`.
    pub http_listen: SocketAddr,
    /// `/health` answers 503 above this lag.
    pub max_lag: std::time::Duration,
    /// Seconds between lag samples.
    pub lag_sample_interval: std::time::Duration,
    /// Admin console.
    pub console_listen: SocketAddr,
    /// How the console authenticates.
    pub console_auth: ConsoleAuth,
    /// The snapshot copy.
    pub copy: CopySettings,
    /// The streaming apply.
    pub apply: ApplySettings,
    /// What the apply does with DDL on the source.
    pub ddl: DdlPolicy,
}

/// Reads the file (if any) and the environment, refusing unknown keys.
pub fn load(file: Option<&Path>) -> Result<RawConfig, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| name.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
        .collect();
    load_from(file, &env)
}

/// A TOML parse error on one line, without the quoted source line: the
/// parser shows the offending line with a caret under it, and that line
/// may hold a password (an unterminated `password = "...`). Keeps where
/// (line and column) and what.
fn toml_error_summary(error: &str) -> String {
    error
        .lines()
        .map(str::trim)
        .filter(|line| {
            !line.is_empty()
                && !line
                    .trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ')
                    .starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// [`load`] with the environment given explicitly (for tests).
pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<RawConfig, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: format!("{e} (pass an existing file with --config, or set CUTOVER_CONFIG)"),
        })?;
        let file_source = config::File::from_str(&text, config::FileFormat::Toml);
        let file_only = config::Config::builder()
            .add_source(file_source.clone())
            .build()
            .map_err(|e| ConfigError::File {
                path: path.to_owned(),
                reason: format!("not valid TOML: {}", toml_error_summary(&e.to_string())),
            })?;
        let tree: serde_json::Value =
            file_only.try_deserialize().map_err(|e| ConfigError::File {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        check_file_keys(&tree, path)?;
        builder = builder.add_source(file_source);
    }
    let mut overrides: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in env {
        let key = env_key(name)?;
        overrides.insert(key, value.clone());
    }
    for (key, value) in overrides {
        builder = if LIST_KEYS.contains(&key.as_str()) {
            let items: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            builder.set_override(key.as_str(), items)
        } else {
            builder.set_override(key.as_str(), value)
        }
        .map_err(|e| ConfigError::invalid(key.clone(), e.to_string()))?;
    }
    let merged = builder.build().map_err(|e| ConfigError::File {
        path: file.map(Path::to_owned).unwrap_or_default(),
        reason: e.to_string(),
    })?;
    merged
        .try_deserialize::<RawConfig>()
        .map_err(|e| ConfigError::invalid("(config)", e.to_string()))
}

/// `CUTOVER__SOURCE__URL` → `source.url`, refusing unknown names.
fn env_key(name: &str) -> Result<String, ConfigError> {
    let rest = &name[ENV_PREFIX.len() + ENV_SEPARATOR.len()..];
    let parts: Vec<String> = rest.split(ENV_SEPARATOR).map(str::to_lowercase).collect();
    let key = parts.join(".");
    let origin = format!("environment variable {name}");
    match parts.as_slice() {
        [section, field] if is_known(section, Some(field)) => Ok(key),
        _ => Err(unknown_key(&key, origin)),
    }
}

fn check_file_keys(tree: &serde_json::Value, path: &Path) -> Result<(), ConfigError> {
    let origin = format!("in {}", path.display());
    let Some(sections) = tree.as_object() else {
        return Ok(());
    };
    for (section, body) in sections {
        if !is_known(section, None) {
            return Err(unknown_key(section, origin));
        }
        let Some(fields) = body.as_object() else {
            return Err(ConfigError::invalid(
                section.clone(),
                format!(
                    "must be a table: write [{section}] on its own line with its keys below ({origin})"
                ),
            ));
        };
        for field in fields.keys() {
            if !is_known(section, Some(field)) {
                return Err(unknown_key(&format!("{section}.{field}"), origin));
            }
        }
    }
    Ok(())
}

fn is_known(section: &str, field: Option<&str>) -> bool {
    KNOWN_KEYS
        .iter()
        .any(|(s, fields)| *s == section && field.is_none_or(|f| fields.contains(&f)))
}

fn unknown_key(key: &str, origin: String) -> ConfigError {
    let all = KNOWN_KEYS
        .iter()
        .flat_map(|(s, fields)| fields.iter().map(move |f| format!("{s}.{f}")));
    let suggestion = all
        .map(|known| (strsim::damerau_levenshtein(key, &known), known))
        .filter(|(distance, _)| *distance <= 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known);
    ConfigError::UnknownKey {
        key: key.to_owned(),
        origin,
        suggestion,
    }
}

impl RawConfig {
    /// Checks every value; the first problem found is returned.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let source = server("source", self.source)?;
        let target = server("target", self.target)?;
        if source.conninfo.endpoint() == target.conninfo.endpoint() {
            return Err(ConfigError::invalid(
                "target.url",
                format!(
                    "names the same server and database as source.url ({}): the target must be another database",
                    source.conninfo.endpoint()
                ),
            ));
        }
        let slot = self
            .replication
            .slot
            .unwrap_or_else(|| DEFAULT_SLOT.to_owned());
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ConfigError::invalid(
                "replication.slot",
                format!(
                    "{slot:?} is not a valid slot name: use lowercase letters, digits and underscores, at most 63 characters"
                ),
            ));
        }
        let publication = self
            .replication
            .publication
            .unwrap_or_else(|| DEFAULT_PUBLICATION.to_owned());
        if publication.is_empty() || publication.len() > 63 || publication.contains('\0') {
            return Err(ConfigError::invalid(
                "replication.publication",
                format!("{publication:?} is not a valid name: 1 to 63 bytes"),
            ));
        }
        let include_patterns = self
            .replication
            .tables
            .unwrap_or_else(|| vec![DEFAULT_TABLES.to_owned()]);
        if include_patterns.is_empty() {
            return Err(ConfigError::invalid(
                "replication.tables",
                "is empty: list at least one schema.table pattern, like [\"public.*\"]",
            ));
        }
        let include = patterns("replication.tables", &include_patterns)?;
        let exclude = patterns(
            "replication.exclude",
            &self.replication.exclude.unwrap_or_default(),
        )?;
        let keyless = match self.replication.keyless.as_deref() {
            None => DEFAULT_KEYLESS,
            Some("append_only") => KeylessPolicy::AppendOnly,
            Some("replica_identity_full") => KeylessPolicy::ReplicaIdentityFull,
            Some("refuse") => KeylessPolicy::Refuse,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "replication.keyless",
                    format!(
                        "{other:?} is not a choice: use \"append_only\" (stream inserts and truncates; updates and deletes keep working on the source and are reported, not streamed), \"replica_identity_full\" (cutover sets REPLICA IDENTITY FULL on the source) or \"refuse\""
                    ),
                ));
            }
        };
        let state_dir = self
            .state
            .dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "state.dir",
                "is empty: name a directory for cutover's state",
            ));
        }
        let console_listen = listen(
            "console.listen",
            self.console.listen.clone(),
            DEFAULT_CONSOLE_LISTEN,
        )?;
        Ok(Config {
            source,
            target,
            state_dir,
            slot,
            publication,
            scope: Scope::new(include, exclude),
            include_patterns,
            keyless,
            http_listen: listen("http.listen", self.http.listen.clone(), DEFAULT_HTTP_LISTEN)?,
            max_lag: std::time::Duration::from_secs(u64::from(
                self.http.max_lag_seconds.unwrap_or(DEFAULT_MAX_LAG_SECONDS),
            )),
            lag_sample_interval: std::time::Duration::from_secs(u64::from(
                match self
                    .state
                    .lag_sample_seconds
                    .unwrap_or(DEFAULT_LAG_SAMPLE_SECONDS)
                {
                    0 => {
                        return Err(ConfigError::invalid(
                            "state.lag_sample_seconds",
                            "0 is out of range: use 1 or more",
                        ));
                    }
                    n => n,
                },
            )),
            console_auth: console_auth(&console_listen, self.console)?,
            console_listen,
            copy: copy_settings(self.copy)?,
            apply: apply_settings(self.apply)?,
            ddl: match self.ddl.policy.as_deref() {
                None | Some("stop") => DdlPolicy::Stop,
                Some("additive") => DdlPolicy::Additive,
                Some(other) => {
                    return Err(ConfigError::invalid(
                        "ddl.policy",
                        format!(
                            "{other:?} is not a choice: use \"stop\" (DDL on the source that the target lacks stops the stream with the fix) or \"additive\" (new columns and widened types are made on the target)"
                        ),
                    ));
                }
            },
        })
    }
}

fn apply_settings(raw: RawApply) -> Result<ApplySettings, ConfigError> {
    let bounded =
        |key: &str, value: Option<u32>, default: u32, max: u32| -> Result<usize, ConfigError> {
            let value = value.unwrap_or(default);
            if value == 0 || value > max {
                return Err(ConfigError::invalid(
                    key,
                    format!("{value} is out of range: use 1 to {max}"),
                ));
            }
            Ok(value as usize)
        };
    const MB: usize = 1024 * 1024;
    Ok(ApplySettings {
        batch_rows: bounded(
            "apply.batch_rows",
            raw.batch_rows,
            DEFAULT_BATCH_ROWS,
            1_000_000,
        )?,
        batch_bytes: bounded("apply.batch_mb", raw.batch_mb, DEFAULT_BATCH_MB, 4096)? * MB,
        batch_wait: {
            let ms = raw.batch_ms.unwrap_or(DEFAULT_BATCH_MS);
            if ms > 60_000 {
                return Err(ConfigError::invalid(
                    "apply.batch_ms",
                    format!("{ms} is out of range: use 0 to 60000"),
                ));
            }
            std::time::Duration::from_millis(u64::from(ms))
        },
        queue_transactions: bounded(
            "apply.queue_transactions",
            raw.queue_transactions,
            DEFAULT_QUEUE_TRANSACTIONS,
            1_000_000,
        )?,
        queue_bytes: bounded("apply.queue_mb", raw.queue_mb, DEFAULT_QUEUE_MB, 4096)? * MB,
        spill_bytes: bounded("apply.spill_mb", raw.spill_mb, DEFAULT_SPILL_MB, 65536)? * MB,
    })
}

fn copy_settings(raw: RawCopy) -> Result<CopySettings, ConfigError> {
    let workers = raw.workers.unwrap_or(DEFAULT_COPY_WORKERS);
    if !(1..=64).contains(&workers) {
        return Err(ConfigError::invalid(
            "copy.workers",
            format!("{workers} is out of range: use 1 to 64"),
        ));
    }
    let chunk_mb = raw.chunk_mb.unwrap_or(DEFAULT_CHUNK_MB);
    if !(1..=65536).contains(&chunk_mb) {
        return Err(ConfigError::invalid(
            "copy.chunk_mb",
            format!("{chunk_mb} is out of range: use 1 to 65536"),
        ));
    }
    Ok(CopySettings {
        workers: workers as usize,
        // 8 kB pages, PostgreSQL's default block size.
        pages_per_chunk: chunk_mb * 128,
        drop_indexes: raw.drop_indexes.unwrap_or(false),
        analyze: raw.analyze.unwrap_or(false),
        truncate_target: raw.truncate_target.unwrap_or(false),
    })
}

fn server(role: &'static str, raw: RawServer) -> Result<Server, ConfigError> {
    let url = raw.url.ok_or_else(|| {
        ConfigError::invalid(
            format!("{role}.url"),
            format!(
                "is not set: add url = \"postgres://user@host:5432/dbname\" under [{role}] in the config file, or set CUTOVER__{}__URL",
                role.to_uppercase()
            ),
        )
    })?;
    let mut conninfo = ConnInfo::parse(&url)
        .map_err(|e| ConfigError::invalid(format!("{role}.url"), e.to_string()))?;
    if conninfo.user().is_none() {
        return Err(ConfigError::invalid(
            format!("{role}.url"),
            "names no user: add user=NAME (or postgres://NAME@host/dbname)",
        ));
    }
    match (raw.password, raw.password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                format!("{role}.password_file"),
                format!("both {role}.password and {role}.password_file are set: keep one"),
            ));
        }
        (Some(password), None) => conninfo.set_password(password),
        (None, Some(path)) => conninfo.set_password(read_password_file(role, &path)?),
        (None, None) => {}
    }
    conninfo.default_application_name(APPLICATION_NAME);
    Ok(Server { role, conninfo })
}

fn console_auth(listen: &SocketAddr, raw: RawConsole) -> Result<ConsoleAuth, ConfigError> {
    let password = match (raw.password, raw.password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "console.password_file",
                "both console.password and console.password_file are set: keep one",
            ));
        }
        (Some(password), None) => Some(password),
        (None, Some(path)) => Some(read_password_file("console", &path)?),
        (None, None) => None,
    };
    match (password, raw.allow_no_password.unwrap_or(false)) {
        (Some(password), _) => Ok(ConsoleAuth::Password(password)),
        (None, true) if listen.ip().is_loopback() => Ok(ConsoleAuth::Open),
        (None, true) => Err(ConfigError::invalid(
            "console.allow_no_password",
            format!(
                "a console without a password may only listen on a loopback address, not {listen}: set console.password (or CUTOVER__CONSOLE__PASSWORD)"
            ),
        )),
        (None, false) => Ok(ConsoleAuth::Disabled),
    }
}

fn read_password_file(role: &str, path: &Path) -> Result<Secret, ConfigError> {
    let key = format!("{role}.password_file");
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            key.clone(),
            format!(
                "cannot read {}: {e} (the file must exist and be readable by cutover)",
                path.display()
            ),
        )
    })?;
    let first = text.lines().next().unwrap_or("");
    if first.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{} is empty: put the password on its first line",
                path.display()
            ),
        ));
    }
    Ok(Secret::new(first))
}

fn patterns(key: &str, texts: &[String]) -> Result<Vec<TablePattern>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            TablePattern::parse(text)
                .map_err(|e| ConfigError::invalid(format!("{key}[{i}]"), e.to_string()))
        })
        .collect()
}

fn listen(key: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    text.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{text:?} is not an address to listen on: write it like {default}"),
        )
    })
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.role, self.conninfo.endpoint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    const MINIMAL: &str =
        "[source]\nurl = \"host=a user=u dbname=app\"\n[target]\nurl = \"postgres://u@b/app\"\n";

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let f = file(MINIMAL);
        let config = load_from(Some(f.path()), &[]).unwrap().validate().unwrap();
        assert_eq!(config.slot, DEFAULT_SLOT);
        assert_eq!(config.publication, DEFAULT_PUBLICATION);
        assert_eq!(config.include_patterns, [DEFAULT_TABLES]);
        assert_eq!(config.http_listen.to_string(), DEFAULT_HTTP_LISTEN);
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = file(MINIMAL);
        let config = load_from(
            Some(f.path()),
            &env(&[
                ("CUTOVER__SOURCE__URL", "postgres://v@c:7/db2"),
                ("CUTOVER__REPLICATION__TABLES", "sales.*, public.orders"),
                ("CUTOVER__SOURCE__PASSWORD", "0123"),
            ]),
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(config.source.conninfo.endpoint(), "c:7/db2");
        assert_eq!(config.include_patterns, ["sales.*", "public.orders"]);
        // Passwords stay text, never reparsed as numbers.
        assert_eq!(config.source.conninfo.password().unwrap().expose(), "0123");
    }

    #[test]
    fn unknown_keys_name_origin_and_suggest() {
        let f = file(&format!("{MINIMAL}[replication]\nslott = \"x\"\n"));
        let err = load_from(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("replication.slott"), "{err}");
        assert!(err.contains("did you mean replication.slot"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");

        let err = load_from(None, &env(&[("CUTOVER__SOURCE__URLL", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CUTOVER__SOURCE__URLL"), "{err}");
        assert!(err.contains("did you mean source.url"), "{err}");

        let f = file(&format!("{MINIMAL}[sorce]\nurl = \"x\"\n"));
        let err = load_from(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("unknown config key sorce"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (
                "[target]\nurl = \"postgres://u@b/app\"\n",
                "source.url",
                "is not set",
            ),
            (
                "[source]\nurl = \"postgres://u@a:x/app\"\n[target]\nurl = \"postgres://u@b/app\"\n",
                "source.url",
                "invalid port",
            ),
            (
                "[source]\nurl = \"host=a dbname=app\"\n[target]\nurl = \"postgres://u@b/app\"\n",
                "source.url",
                "names no user",
            ),
            (
                &format!("{MINIMAL}[replication]\nslot = \"Bad-Slot\"\n"),
                "replication.slot",
                "lowercase",
            ),
            (
                &format!("{MINIMAL}[replication]\ntables = [\"orders\"]\n"),
                "replication.tables[0]",
                "schema.table",
            ),
            (
                &format!("{MINIMAL}[replication]\ntables = []\n"),
                "replication.tables",
                "is empty",
            ),
            (
                &format!("{MINIMAL}[http]\nlisten = \"localhost\"\n"),
                "http.listen",
                "127.0.0.1:9187",
            ),
            (
                "[source]\nurl = \"postgres://u@a/app\"\n[target]\nurl = \"host=a user=u dbname=app\"\n",
                "target.url",
                "same server",
            ),
        ];
        for (text, key, needle) in cases {
            let f = file(text);
            let err = load_from(Some(f.path()), &[])
                .and_then(RawConfig::validate)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(needle), "{key}: {err}");
        }
    }

    #[test]
    fn the_shipped_example_config_uses_only_known_keys() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cutover.example.toml");
        let raw = load_from(Some(&example), &[]).unwrap();
        assert!(raw.source.url.is_some() && raw.source.password_file.is_some());
        assert_eq!(
            raw.replication.tables.as_deref(),
            Some(&["public.*".to_owned()][..])
        );
    }

    #[test]
    fn passwords_from_file_win_and_never_print() {
        let secret = file("from-file-secret\n");
        let f = file(&format!(
            "[source]\nurl = \"postgres://u:in-url-secret@a/app\"\npassword_file = \"{}\"\n[target]\nurl = \"postgres://u@b/app\"\n",
            secret.path().display()
        ));
        let config = load_from(Some(f.path()), &[]).unwrap().validate().unwrap();
        assert_eq!(
            config.source.conninfo.password().unwrap().expose(),
            "from-file-secret"
        );
        let shown = format!("{config:?} {}", config.source);
        assert!(!shown.contains("secret"), "{shown}");

        let both = file(&format!(
            "[source]\nurl = \"postgres://u@a/app\"\npassword = \"p\"\npassword_file = \"{}\"\n[target]\nurl = \"postgres://u@b/app\"\n",
            secret.path().display()
        ));
        let err = load_from(Some(both.path()), &[])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep one"), "{err}");
    }

    #[test]
    fn a_toml_syntax_error_names_the_line_but_never_shows_it() {
        let f = file(
            "[source]\nurl = \"postgres://u@a/app\"\npassword = \"unterminated-secret\n[target]\nurl = \"postgres://u@b/app\"\n",
        );
        let err = load_from(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(!err.contains("unterminated-secret"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
