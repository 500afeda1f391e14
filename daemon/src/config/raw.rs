//! The config as written (file and environment), before validation: the
//! keys this build knows, the raw sections, and [`RawConfig::validate`],
//! which checks every value and produces [`super::Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cutover_replication::catalog::{Scope, TablePattern};
use cutover_replication::conninfo::ConnInfo;
use cutover_replication::ddl::DdlPolicy;
use cutover_replication::secret::Secret;
use serde::Deserialize;

use super::{
    APPLICATION_NAME, ApplySettings, Config, ConfigError, ConsoleAuth, ConsoleTls, CopySettings,
    DEFAULT_BATCH_MB, DEFAULT_BATCH_MS, DEFAULT_BATCH_ROWS, DEFAULT_CHUNK_MB,
    DEFAULT_CONSOLE_LISTEN, DEFAULT_CONTINUOUS_RATE, DEFAULT_COPY_WORKERS, DEFAULT_HTTP_LISTEN,
    DEFAULT_KEYLESS, DEFAULT_LAG_SAMPLE_SECONDS, DEFAULT_MAX_DIVERGENT_RATIO,
    DEFAULT_MAX_LAG_SECONDS, DEFAULT_PUBLICATION, DEFAULT_QUEUE_MB, DEFAULT_QUEUE_TRANSACTIONS,
    DEFAULT_SLOT, DEFAULT_SPILL_MB, DEFAULT_STATE_DIR, DEFAULT_TABLES, DEFAULT_VERIFY_SAMPLES,
    DEFAULT_VERIFY_WORKERS, ENV_PREFIX, ENV_SEPARATOR, KeylessPolicy, Server, VerifySettings,
};
use super::{
    DEFAULT_FENCE_WAIT_SECONDS, DEFAULT_RETENTION_DAYS, DEFAULT_SWITCH_MAX_LAG_SECONDS, Groups,
    SwitchSettings,
};

/// Every key the contract knows, by section. Unknown keys are refused
/// against this list (the serde structs below refuse them as well).
pub(super) const KNOWN_KEYS: &[(&str, &[&str])] = &[
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
        &[
            "listen",
            "password",
            "password_file",
            "allow_no_password",
            "tls_cert",
            "tls_key",
        ],
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
    (
        "verify",
        &[
            "workers",
            "samples",
            "rate",
            "continuous",
            "continuous_rate",
            "repair",
            "max_divergent_ratio",
        ],
    ),
    (
        "switch",
        &[
            "max_lag_seconds",
            "fence_wait_seconds",
            "fence_command",
            "unfence_command",
            "repoint_command",
            "sequence_gap",
            "retention_days",
        ],
    ),
    ("kafka", super::kafka::KEYS),
];

/// Keys that hold lists; in the environment they are comma-separated.
pub(super) const LIST_KEYS: &[&str] = &["replication.tables", "replication.exclude"];

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
    /// PEM certificate chain: the console serves TLS (and only TLS).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
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
    /// `[verify]`.
    #[serde(default)]
    pub verify: RawVerify,
    /// `[switch]`.
    #[serde(default)]
    pub switch: RawSwitch,
    /// `[[group]]`.
    #[serde(default)]
    pub group: Vec<RawGroup>,
    /// `[kafka]`: absent, no feed.
    pub kafka: Option<super::kafka::RawKafka>,
    /// `[[map]]`.
    #[serde(default)]
    pub map: Vec<super::maps::RawMap>,
}

/// One `[[group]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    /// The group's name.
    pub name: Option<String>,
    /// Its tables, as `schema.table` patterns.
    pub tables: Option<Vec<String>>,
    /// How its stray writes are settled.
    pub policy: Option<String>,
}

/// The keys of a `[[group]]`.
const GROUP_KEYS: &[&str] = &["name", "tables", "policy"];

/// `[switch]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSwitch {
    /// The longest the final catch-up before the fence may take.
    pub max_lag_seconds: Option<u64>,
    /// How long the fence waits for transactions open on the old primary
    /// before it ends their sessions.
    pub fence_wait_seconds: Option<u64>,
    /// A shell command run once the old primary is fenced.
    pub fence_command: Option<String>,
    /// A shell command run once the new primary is open (or a fence is
    /// undone).
    pub unfence_command: Option<String>,
    /// A shell command that points the application at the new primary.
    pub repoint_command: Option<String>,
    /// Added to every sequence set on the new primary.
    pub sequence_gap: Option<i64>,
    /// Days the old server is kept after acceptance.
    pub retention_days: Option<u32>,
}

/// `[verify]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    /// Tables compared at once (a connection to each server per worker).
    pub workers: Option<u32>,
    /// Differing rows shown per table and kind.
    pub samples: Option<u32>,
    /// Source rows read per second at most (0: no limit).
    pub rate: Option<u64>,
    /// A background verifier while `run` streams.
    pub continuous: Option<bool>,
    /// Its source rows per second at most.
    pub continuous_rate: Option<u64>,
    /// The background verifier repairs what it finds.
    pub repair: Option<bool>,
    /// Divergent rows over rows checked above which `/health` fails.
    pub max_divergent_ratio: Option<f64>,
}

/// `[ddl]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDdl {
    /// `stop` or `additive`.
    pub policy: Option<String>,
}

/// `CUTOVER__SOURCE__URL` → `source.url`, refusing unknown names.
pub(super) fn env_key(name: &str) -> Result<String, ConfigError> {
    let rest = &name[ENV_PREFIX.len() + ENV_SEPARATOR.len()..];
    let parts: Vec<String> = rest.split(ENV_SEPARATOR).map(str::to_lowercase).collect();
    let key = parts.join(".");
    let origin = format!("environment variable {name}");
    match parts.as_slice() {
        [section, field] if is_known(section, Some(field)) => Ok(key),
        _ => Err(unknown_key(&key, origin)),
    }
}

pub(super) fn check_file_keys(tree: &serde_json::Value, path: &Path) -> Result<(), ConfigError> {
    let origin = format!("in {}", path.display());
    let Some(sections) = tree.as_object() else {
        return Ok(());
    };
    for (section, body) in sections {
        if section == "group" {
            check_list_keys(body, &origin, "group", GROUP_KEYS, "name and tables")?;
            continue;
        }
        if section == "map" {
            check_list_keys(
                body,
                &origin,
                "map",
                super::maps::MAP_KEYS,
                "source, target and columns",
            )?;
            continue;
        }
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

/// Each `[[group]]`'s or `[[map]]`'s keys.
fn check_list_keys(
    body: &serde_json::Value,
    origin: &str,
    section: &str,
    keys: &[&str],
    what: &str,
) -> Result<(), ConfigError> {
    let as_array = || {
        ConfigError::invalid(
            section,
            format!(
                "must be a list of tables: write [[{section}]] (two brackets) above each one's {what} ({origin})"
            ),
        )
    };
    for (i, item) in body.as_array().ok_or_else(as_array)?.iter().enumerate() {
        let fields = item.as_object().ok_or_else(as_array)?;
        if let Some(field) = fields.keys().find(|f| !keys.contains(&f.as_str())) {
            return Err(ConfigError::invalid(
                format!("{section}[{i}].{field}"),
                format!(
                    "is not a key of a {section}: a [[{section}]] has {} ({origin})",
                    keys.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn is_known(section: &str, field: Option<&str>) -> bool {
    KNOWN_KEYS
        .iter()
        .any(|(s, fields)| *s == section && field.is_none_or(|f| fields.contains(&f)))
}

pub(super) fn unknown_key(key: &str, origin: String) -> ConfigError {
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
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        let source = server("source", self.source)?;
        // With a Kafka feed and no [target], the feed runs alone.
        let feed_alone = self.kafka.is_some()
            && self.target.url.is_none()
            && self.target.password.is_none()
            && self.target.password_file.is_none();
        let target = if feed_alone {
            None
        } else {
            Some(server("target", self.target)?)
        };
        if let Some(target) = &target
            && source.conninfo.endpoint() == target.conninfo.endpoint()
        {
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
        let config = Config {
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
            console_tls: console_tls(&mut self.console)?,
            console_auth: console_auth(&console_listen, self.console)?,
            console_listen,
            copy: copy_settings(self.copy)?,
            apply: apply_settings(self.apply)?,
            verify: verify_settings(self.verify)?,
            switch: switch_settings(self.switch)?,
            groups: Groups::new(
                self.group
                    .into_iter()
                    .map(|g| (g.name, g.tables, g.policy))
                    .collect(),
            )?,
            kafka: self.kafka.map(super::kafka::settings).transpose()?,
            mappings: super::maps::map_specs(std::mem::take(&mut self.map))?,
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
        };
        if config.target.is_none() {
            feed_alone_refusals(&config)?;
        }
        mapping_refusals(&config)?;
        Ok(config)
    }
}

/// What field mappings do not combine with, refused by key.
fn mapping_refusals(config: &Config) -> Result<(), ConfigError> {
    if config.mappings.is_empty() {
        return Ok(());
    }
    if config.target.is_none() {
        return Err(ConfigError::invalid(
            "map",
            "a mapping writes a target table, and the config has no [target] (a Kafka feed alone carries the source's rows as they are): add [target], or remove the [[map]]s",
        ));
    }
    if !config.groups.is_empty() {
        return Err(ConfigError::invalid(
            "map",
            "field mappings and table groups do not combine yet (a group's stray writes are compared and written back by table name, which a mapped table does not share): remove the [[group]]s and switch every table at once, or remove the [[map]]s",
        ));
    }
    if config.kafka.as_ref().is_some_and(|k| k.snapshot) {
        return Err(ConfigError::invalid(
            "kafka.snapshot",
            "the feed's initial rows are read from the target's tables by their source names, which a mapped table does not have: remove kafka.snapshot (the feed carries the changes from the slot's creation), or remove the [[map]]s",
        ));
    }
    Ok(())
}

/// What a Kafka feed without a target cannot do, refused by key.
fn feed_alone_refusals(config: &Config) -> Result<(), ConfigError> {
    let alone = "the config has a [kafka] feed and no [target], so the feed runs alone";
    if !config.groups.is_empty() {
        return Err(ConfigError::invalid(
            "group",
            format!(
                "{alone}, and table groups move tables between two servers: add [target], or remove the [[group]]s"
            ),
        ));
    }
    if config.verify.continuous {
        return Err(ConfigError::invalid(
            "verify.continuous",
            format!(
                "{alone}, and the background verifier compares a target: add [target], or set verify.continuous = false"
            ),
        ));
    }
    if config.kafka.as_ref().is_some_and(|k| k.snapshot) {
        return Err(ConfigError::invalid(
            "kafka.snapshot",
            format!(
                "{alone}; publishing the initial rows is built for a feed beside a target (they are read from the target after the copy): remove kafka.snapshot (the feed starts with the changes from the slot's creation), or add [target]"
            ),
        ));
    }
    Ok(())
}

pub(super) fn apply_settings(raw: RawApply) -> Result<ApplySettings, ConfigError> {
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

pub(super) fn copy_settings(raw: RawCopy) -> Result<CopySettings, ConfigError> {
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

pub(super) fn switch_settings(raw: RawSwitch) -> Result<SwitchSettings, ConfigError> {
    let max_lag_seconds = raw
        .max_lag_seconds
        .unwrap_or(DEFAULT_SWITCH_MAX_LAG_SECONDS);
    if max_lag_seconds == 0 {
        return Err(ConfigError::invalid(
            "switch.max_lag_seconds",
            "0 is out of range: use 1 or more seconds".to_owned(),
        ));
    }
    let sequence_gap = raw.sequence_gap.unwrap_or(0);
    if sequence_gap < 0 {
        return Err(ConfigError::invalid(
            "switch.sequence_gap",
            format!("{sequence_gap} is out of range: use 0 or more values to skip"),
        ));
    }
    let command = |key: &str, value: Option<String>| -> Result<Option<String>, ConfigError> {
        match value {
            Some(c) if c.trim().is_empty() => Err(ConfigError::invalid(
                key,
                "is empty: remove the key, or give the shell command to run".to_owned(),
            )),
            other => Ok(other),
        }
    };
    Ok(SwitchSettings {
        max_lag: std::time::Duration::from_secs(max_lag_seconds),
        fence_wait: std::time::Duration::from_secs(
            raw.fence_wait_seconds.unwrap_or(DEFAULT_FENCE_WAIT_SECONDS),
        ),
        fence_command: command("switch.fence_command", raw.fence_command)?,
        unfence_command: command("switch.unfence_command", raw.unfence_command)?,
        repoint_command: command("switch.repoint_command", raw.repoint_command)?,
        sequence_gap,
        retention_days: raw.retention_days.unwrap_or(DEFAULT_RETENTION_DAYS),
    })
}

pub(super) fn verify_settings(raw: RawVerify) -> Result<VerifySettings, ConfigError> {
    let workers = raw.workers.unwrap_or(DEFAULT_VERIFY_WORKERS);
    if !(1..=64).contains(&workers) {
        return Err(ConfigError::invalid(
            "verify.workers",
            format!("{workers} is out of range: use 1 to 64"),
        ));
    }
    let max_divergent_ratio = raw
        .max_divergent_ratio
        .unwrap_or(DEFAULT_MAX_DIVERGENT_RATIO);
    if !(0.0..=1.0).contains(&max_divergent_ratio) {
        return Err(ConfigError::invalid(
            "verify.max_divergent_ratio",
            format!(
                "{max_divergent_ratio} is out of range: use a ratio from 0 to 1 (0.001 is 0.1% of rows)"
            ),
        ));
    }
    let continuous_rate = raw.continuous_rate.unwrap_or(DEFAULT_CONTINUOUS_RATE);
    if continuous_rate == 0 {
        return Err(ConfigError::invalid(
            "verify.continuous_rate",
            "0 is out of range: the background verifier needs a limit; use 1 or more rows per second".to_owned(),
        ));
    }
    let continuous = raw.continuous.unwrap_or(false);
    let repair = raw.repair.unwrap_or(false);
    if repair && !continuous {
        return Err(ConfigError::invalid(
            "verify.repair",
            "repairs what the background verifier finds, which is off: set verify.continuous = true as well, or repair once with `cutover verify --repair`".to_owned(),
        ));
    }
    Ok(VerifySettings {
        workers: workers as usize,
        samples: raw.samples.unwrap_or(DEFAULT_VERIFY_SAMPLES) as usize,
        rate: raw.rate.filter(|r| *r > 0),
        continuous,
        continuous_rate,
        repair,
        max_divergent_ratio,
    })
}

pub(super) fn server(role: &'static str, raw: RawServer) -> Result<Server, ConfigError> {
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
        (None, Some(path)) => {
            conninfo.set_password(read_password_file(&format!("{role}.password_file"), &path)?)
        }
        (None, None) => {}
    }
    conninfo.default_application_name(APPLICATION_NAME);
    Ok(Server { role, conninfo })
}

pub(super) fn console_auth(
    listen: &SocketAddr,
    raw: RawConsole,
) -> Result<ConsoleAuth, ConfigError> {
    let password = match (raw.password, raw.password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "console.password_file",
                "both console.password and console.password_file are set: keep one",
            ));
        }
        (Some(password), None) => Some(password),
        (None, Some(path)) => Some(read_password_file("console.password_file", &path)?),
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

/// `console.tls_cert` and `console.tls_key`: both or neither, loaded and
/// checked now so that a bad file stops the start, not the first login.
fn console_tls(raw: &mut RawConsole) -> Result<Option<ConsoleTls>, ConfigError> {
    match (raw.tls_cert.take(), raw.tls_key.take()) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            "console.tls_key",
            "console.tls_cert is set without its key: set console.tls_key to the certificate's private key (PEM)",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "console.tls_cert",
            "console.tls_key is set without a certificate: set console.tls_cert to the certificate chain (PEM)",
        )),
        (Some(cert), Some(key)) => {
            let identity = cutover_replication::tls::server_identity(&cert, &key).map_err(|e| {
                let which = match &e {
                    cutover_replication::tls::TlsError::ServerFile { path, .. }
                        if Path::new(path) == cert.as_path() =>
                    {
                        "console.tls_cert"
                    }
                    _ => "console.tls_key",
                };
                ConfigError::invalid(which, e.to_string())
            })?;
            Ok(Some(ConsoleTls { cert, identity }))
        }
    }
}

pub(super) fn read_password_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    use std::io::Read;
    let key = key.to_owned();
    let unreadable = |e: std::io::Error| {
        ConfigError::invalid(
            key.clone(),
            format!(
                "cannot read {}: {e} (the file must exist and be readable by cutover)",
                path.display()
            ),
        )
    };
    // Only the first line counts: at most this much is read, so that a
    // device or a huge file named by mistake fails instead of hanging.
    const MAX_PASSWORD_FILE: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PASSWORD_FILE).read_to_end(&mut bytes))
        .map_err(unreadable)?;
    if bytes.len() as u64 == MAX_PASSWORD_FILE && !bytes.contains(&b'\n') {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{}: its first line is longer than 64 KiB: name the file that holds the password on its first line",
                path.display()
            ),
        ));
    }
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = std::str::from_utf8(line)
        .map_err(|e| unreadable(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?
        .trim_end_matches('\r');
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

pub(super) fn patterns(key: &str, texts: &[String]) -> Result<Vec<TablePattern>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            TablePattern::parse(text)
                .map_err(|e| ConfigError::invalid(format!("{key}[{i}]"), e.to_string()))
        })
        .collect()
}

pub(super) fn listen(
    key: &str,
    value: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or_else(|| default.to_owned());
    text.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{text:?} is not an address to listen on: write it like {default}"),
        )
    })
}
