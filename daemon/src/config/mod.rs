//! The configuration contract (docs/architecture.md, "Config and CLI contract").
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

use cutover_replication::catalog::Scope;
use cutover_replication::conninfo::ConnInfo;
use cutover_replication::ddl::DdlPolicy;
use cutover_replication::secret::Secret;

mod groups;
mod kafka;
pub mod maps;
mod raw;

pub use groups::{Groups, TwoGroups};
pub use raw::RawConfig;
use raw::{LIST_KEYS, check_file_keys, env_key};

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

/// The console's TLS (`console.tls_cert`, `console.tls_key`).
#[derive(Clone, Debug)]
pub struct ConsoleTls {
    /// The certificate file, for messages.
    pub cert: PathBuf,
    /// The loaded certificate and key.
    pub identity: cutover_replication::tls::ServerIdentity,
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
    /// The server migrated to; `None` for a Kafka feed alone (`[kafka]`
    /// and no `[target]`).
    pub target: Option<Server>,
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
    /// The console's TLS; when set, plain connections are refused.
    pub console_tls: Option<ConsoleTls>,
    /// The snapshot copy.
    pub copy: CopySettings,
    /// The streaming apply.
    pub apply: ApplySettings,
    /// What the apply does with DDL on the source.
    pub ddl: DdlPolicy,
    /// `cutover verify`.
    pub verify: VerifySettings,
    /// `cutover switch` and `cutover rollback`.
    pub switch: SwitchSettings,
    /// `[[group]]`: the tables in scope by functional area.
    pub groups: Groups,
    /// `[kafka]`: the change feed, when configured.
    pub kafka: Option<cutover_replication::sink::kafka::KafkaSettings>,
    /// `[[map]]`: tables written to a target table of another shape.
    pub mappings: Vec<cutover_replication::mapping::MapSpec>,
}

/// A command that needs the target, run with a config that has none (a
/// Kafka feed alone).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the config has no [target]: it runs a Kafka feed alone, and this needs a target server; add [target] url = \"postgres://user@host:5432/dbname\""
)]
pub struct NoTarget;

impl Config {
    /// The target, for what needs one.
    pub fn target(&self) -> Result<&Server, NoTarget> {
        self.target.as_ref().ok_or(NoTarget)
    }

    /// The config `direction` streams with: for the reverse direction the
    /// servers swapped (the target is read, the source written), and the
    /// reverse direction's slot and publication (on the target).
    pub fn for_direction(&self, direction: crate::direction::Direction) -> Config {
        let mut config = self.clone();
        if direction == crate::direction::Direction::Reverse
            && let Some(target) = config.target.take()
        {
            config.target = Some(std::mem::replace(&mut config.source, target));
        }
        if direction == crate::direction::Direction::Reverse {
            // The reverse direction reads the target: a mapped table there
            // goes back through its inverse, or not at all (one-way).
            for map in &self.mappings {
                if map.inverse.is_some() {
                    config.scope.include_table(&map.target);
                } else {
                    config.scope.exclude_table(&map.target);
                }
                if map.source != map.target {
                    config.scope.exclude_table(&map.source);
                }
            }
            config.mappings = self.mappings.iter().filter_map(|m| m.inverted()).collect();
        }
        config.slot = direction.slot(&self.slot);
        config.publication = direction.publication(&self.publication);
        config
    }
}

/// Default `switch.max_lag_seconds`.
pub const DEFAULT_SWITCH_MAX_LAG_SECONDS: u64 = 30;
/// Default `switch.fence_wait_seconds`.
pub const DEFAULT_FENCE_WAIT_SECONDS: u64 = 5;
/// Default `switch.retention_days`: migration teams keep the old system
/// about three months.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;

/// `[switch]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchSettings {
    /// The longest the last catch-up before the fence may take: a target
    /// further behind is caught up first, with the daemon.
    pub max_lag: std::time::Duration,
    /// How long the fence waits for transactions already writing on the
    /// old primary before it ends their sessions.
    pub fence_wait: std::time::Duration,
    /// Run once the old primary is fenced (PgBouncer's PAUSE, say).
    pub fence_command: Option<String>,
    /// Run once the new primary is open, and when a fence is undone.
    pub unfence_command: Option<String>,
    /// Run to point the application at the new primary.
    pub repoint_command: Option<String>,
    /// Values skipped on every sequence set on the new primary.
    pub sequence_gap: i64,
    /// Days the old server is kept after `accept`, before `cleanup`.
    pub retention_days: u32,
}

/// Default `verify.workers`.
pub const DEFAULT_VERIFY_WORKERS: u32 = 2;
/// Default `verify.samples`.
pub const DEFAULT_VERIFY_SAMPLES: u32 = 5;

/// Default `verify.continuous_rate`: source rows per second.
pub const DEFAULT_CONTINUOUS_RATE: u64 = 10_000;
/// Default `verify.max_divergent_ratio`: a migration team's usual "more
/// than 0.1% of records fail validation: roll back".
pub const DEFAULT_MAX_DIVERGENT_RATIO: f64 = 0.001;

/// `[verify]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifySettings {
    /// Tables compared at once.
    pub workers: usize,
    /// Differing rows shown per table and kind.
    pub samples: usize,
    /// Source rows read per second at most, all workers together.
    pub rate: Option<u64>,
    /// A background verifier while `run` streams.
    pub continuous: bool,
    /// Its source rows per second at most.
    pub continuous_rate: u64,
    /// The background verifier makes the rows it finds differing equal to
    /// the source (as `cutover verify --repair` does beside a daemon).
    pub repair: bool,
    /// Divergent rows over rows checked above which `/health` fails.
    pub max_divergent_ratio: f64,
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
    let text = match file {
        Some(path) => Some(read_config_file(path)?),
        None => None,
    };
    merge(text.as_deref().zip(file), env)
}

/// The config file's text, read with a bound so that a device named by
/// mistake fails instead of hanging.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    const MAX_CONFIG_FILE: u64 = 16 * 1024 * 1024;
    let failed = |reason: String| ConfigError::File {
        path: path.to_owned(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            failed(format!(
                "{e} (pass an existing file with --config, or set CUTOVER_CONFIG)"
            ))
        })?;
    if bytes.len() as u64 > MAX_CONFIG_FILE {
        return Err(failed("larger than 16 MiB: not a cutover config".into()));
    }
    String::from_utf8(bytes).map_err(|e| failed(format!("not UTF-8 text: {e}")))
}

/// A config file's text as [`load`] reads it, without the environment.
pub fn parse_text(text: &str) -> Result<RawConfig, ConfigError> {
    merge(Some((text, Path::new("cutover.toml"))), &[])
}

/// The file's text (and its path, for messages) merged with the
/// environment's keys.
fn merge(file: Option<(&str, &Path)>, env: &[(String, String)]) -> Result<RawConfig, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some((text, path)) = file {
        let file_source = config::File::from_str(text, config::FileFormat::Toml);
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
        path: file.map(|(_, p)| p.to_owned()).unwrap_or_default(),
        reason: e.to_string(),
    })?;
    merged
        .try_deserialize::<RawConfig>()
        .map_err(|e| ConfigError::invalid("(config)", e.to_string()))
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
    fn maps_are_read_with_their_columns_reasons_and_inverse_and_refused_where_they_cannot_work() {
        let map = "[[map]]\nsource = \"Legacy.Beneficiaries\"\ntarget = \"people\"\nwhere = \"name IS NOT NULL\"\n\
                   [map.columns]\nperson_id = \"id\"\n[map.reject]\nbad = \"x < 0\"\n[map.inverse]\nid = \"person_id\"\n";
        let f = file(&format!("{MINIMAL}{map}"));
        let config = load_from(Some(f.path()), &[]).unwrap().validate().unwrap();
        let spec = &config.mappings[0];
        use cutover_replication::catalog::TableName;
        assert_eq!(spec.source, TableName::new("legacy", "beneficiaries"));
        assert_eq!(spec.target, TableName::new("public", "people"));
        assert_eq!(spec.filter.as_deref(), Some("name IS NOT NULL"));
        assert_eq!(spec.columns, [("person_id".to_owned(), "id".to_owned())]);
        assert_eq!(spec.rejects, [("bad".to_owned(), "x < 0".to_owned())]);
        // The reverse direction reads the target table through the inverse.
        let reverse = config.for_direction(crate::direction::Direction::Reverse);
        assert_eq!(reverse.mappings[0].source, spec.target);
        assert!(reverse.scope.contains(&spec.target));
        assert!(!reverse.scope.contains(&spec.source));

        let f = file(&format!(
            "{MINIMAL}[[map]]\nsource = \"a\"\ntarget = \"b\"\nwhere_ = \"x\"\n"
        ));
        let err = load_from(Some(f.path()), &[]).unwrap_err().to_string();
        assert!(err.contains("map[0].where_"), "{err}");
        let f = file(&format!(
            "{MINIMAL}[[group]]\nname = \"g\"\ntables = [\"public.*\"]\n{map}"
        ));
        let err = load_from(Some(f.path()), &[])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config key map:") && err.contains("table groups"),
            "{err}"
        );
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

    #[test]
    fn files_named_by_mistake_fail_instead_of_hanging() {
        // A device that never ends, as a password file and as the
        // console's certificate and key.
        let err = parse_text(&format!(
            "{MINIMAL}[console]\npassword_file = \"/dev/zero\"\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("longer than 64 KiB"), "{err}");
        let err = parse_text(&format!(
            "{MINIMAL}[console]\ntls_cert = \"/dev/zero\"\ntls_key = \"/dev/zero\"\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("console.tls_cert") && err.contains("1 MiB"),
            "{err}"
        );
        let err = load_from(Some(Path::new("/dev/zero")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("16 MiB"), "{err}");
        // And the first line of a small file is the password.
        let f = file("s3cret\r\nignored\n");
        let config = parse_text(&format!(
            "{MINIMAL}[console]\npassword_file = \"{}\"\n",
            f.path().display()
        ))
        .unwrap()
        .validate()
        .unwrap();
        match config.console_auth {
            ConsoleAuth::Password(p) => assert_eq!(p.expose(), "s3cret"),
            other => panic!("{other:?}"),
        }
    }
}
