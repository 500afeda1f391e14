//! `[kafka]`: the change feed (docs/kafka.md).
//!
//! ```toml
//! [kafka]
//! brokers = "kafka-1:9092,kafka-2:9092"
//! topic_prefix = "shop"            # topics shop.<schema>.<table>
//! format = "debezium"
//! partitions = 6                   # of the topics cutover creates
//! replication_factor = 3
//! sasl_password_file = "/run/secrets/kafka"    # or sasl_password
//! # ssl_key_password, sasl_oauthbearer_client_secret: the other secrets
//! [kafka.properties]               # librdkafka's, passed through
//! "security.protocol" = "SASL_SSL"
//! "sasl.mechanism" = "SCRAM-SHA-512"
//! "sasl.username" = "cutover"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use cutover_replication::secret::Secret;
use cutover_replication::sink::kafka::KafkaSettings;
use serde::Deserialize;

use super::ConfigError;
use super::raw::read_password_file;

/// The keys of `[kafka]`.
pub(super) const KEYS: &[&str] = &[
    "brokers",
    "topic_prefix",
    "format",
    "partitions",
    "replication_factor",
    "snapshot",
    "sasl_password",
    "sasl_password_file",
    "ssl_key_password",
    "sasl_oauthbearer_client_secret",
    "properties",
];

/// `[kafka]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// `host:port` list.
    pub brokers: Option<String>,
    /// Put before every topic's name.
    pub topic_prefix: Option<String>,
    /// The envelope: `debezium`.
    pub format: Option<String>,
    /// Partitions of the topics cutover creates.
    pub partitions: Option<i32>,
    /// Their replication factor.
    pub replication_factor: Option<i32>,
    /// Publish the initial copy's rows.
    pub snapshot: Option<bool>,
    /// `sasl.password`.
    pub sasl_password: Option<Secret>,
    /// File whose first line is `sasl.password`.
    pub sasl_password_file: Option<PathBuf>,
    /// `ssl.key.password`.
    pub ssl_key_password: Option<Secret>,
    /// `sasl.oauthbearer.client.secret` (OAUTHBEARER with OIDC).
    pub sasl_oauthbearer_client_secret: Option<Secret>,
    /// librdkafka properties, passed through.
    pub properties: Option<BTreeMap<String, toml_value::Value>>,
}

/// A property's value as TOML gives it: a string, a number or a boolean.
pub mod toml_value {
    use serde::Deserialize;

    /// One value.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub enum Value {
        /// A string.
        Text(String),
        /// An integer.
        Int(i64),
        /// A float.
        Float(f64),
        /// A boolean.
        Bool(bool),
    }

    impl Value {
        /// librdkafka's text form.
        pub fn text(&self) -> String {
            match self {
                Value::Text(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
            }
        }
    }
}

/// Properties cutover sets itself, with why.
const OWN: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    (
        "transactional.id",
        "cutover names its producers cutover.<slot>.<direction>: each stream's feed is exactly once under its own id",
    ),
    (
        "enable.idempotence",
        "transactions need it: cutover sets it",
    ),
    ("acks", "transactions need acks=all: cutover sets it"),
    (
        "isolation.level",
        "cutover reads its progress read_committed; it is your consumers' setting",
    ),
    ("group.id", "cutover uses no consumer group of yours"),
];

/// The default partitions of the topics cutover creates.
pub const DEFAULT_PARTITIONS: i32 = 6;

/// `[kafka]`, validated.
pub(super) fn settings(raw: RawKafka) -> Result<KafkaSettings, ConfigError> {
    let brokers = raw.brokers.filter(|b| !b.trim().is_empty()).ok_or_else(|| {
        ConfigError::invalid(
            "kafka.brokers",
            "is not set: list the brokers as \"host:port,host:port\", or remove [kafka] to run without a feed",
        )
    })?;
    let topic_prefix = raw.topic_prefix.unwrap_or_else(|| "cutover".to_owned());
    if !topic_prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || topic_prefix.len() > 200
    {
        return Err(ConfigError::invalid(
            "kafka.topic_prefix",
            format!(
                "{topic_prefix:?} cannot begin a Kafka topic's name: use letters, digits, '.', '_' and '-', at most 200"
            ),
        ));
    }
    match raw.format.as_deref() {
        None | Some("debezium") => {}
        Some(other) => {
            return Err(ConfigError::invalid(
                "kafka.format",
                format!("{other:?} is not a format cutover writes: use \"debezium\""),
            ));
        }
    }
    let partitions = raw.partitions.unwrap_or(DEFAULT_PARTITIONS);
    if !(1..=10_000).contains(&partitions) {
        return Err(ConfigError::invalid(
            "kafka.partitions",
            format!("{partitions} is out of range: use 1 to 10000"),
        ));
    }
    let replication_factor = raw.replication_factor.unwrap_or(-1);
    if replication_factor == 0 || !(-1..=100).contains(&replication_factor) {
        return Err(ConfigError::invalid(
            "kafka.replication_factor",
            format!(
                "{replication_factor} is out of range: use 1 to 100, or -1 for the brokers' default"
            ),
        ));
    }
    let sasl_password = match (raw.sasl_password, raw.sasl_password_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "kafka.sasl_password_file",
                "both kafka.sasl_password and kafka.sasl_password_file are set: keep one",
            ));
        }
        (Some(password), None) => Some(password),
        (None, Some(path)) => Some(read_password_file("kafka.sasl_password_file", &path)?),
        (None, None) => None,
    };
    let mut properties = Vec::new();
    for (key, value) in raw.properties.unwrap_or_default() {
        let path = format!("kafka.properties.\"{key}\"");
        if let Some((_, why)) = OWN.iter().find(|(own, _)| *own == key) {
            return Err(ConfigError::invalid(
                path,
                format!("is cutover's to set: {why}"),
            ));
        }
        if key.contains("password") || key.contains("secret") || key == "ssl.key.pem" {
            return Err(ConfigError::invalid(
                path,
                "would put a secret where logs and `status` may show it: use kafka.sasl_password (or sasl_password_file), kafka.ssl_key_password or kafka.sasl_oauthbearer_client_secret",
            ));
        }
        properties.push((key, value.text()));
    }
    Ok(KafkaSettings {
        brokers,
        topic_prefix,
        partitions,
        replication_factor,
        properties,
        sasl_password,
        ssl_key_password: raw.ssl_key_password,
        oauthbearer_client_secret: raw.sasl_oauthbearer_client_secret,
        snapshot: raw.snapshot.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::super::load_from;
    use super::*;

    fn kafka(section: &str) -> Result<Option<KafkaSettings>, ConfigError> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            format!(
                "[source]\nurl = \"host=a user=u dbname=app\"\n[target]\nurl = \"postgres://u@b/app\"\n{section}"
            ),
        )
        .unwrap();
        load_from(Some(f.path()), &[])?
            .validate()
            .map(|config| config.kafka)
    }

    #[test]
    fn a_feed_takes_brokers_a_prefix_and_librdkafka_properties() {
        assert!(kafka("").unwrap().is_none(), "no [kafka], no feed");
        let settings = kafka(
            "[kafka]\nbrokers = \"k1:9092,k2:9092\"\ntopic_prefix = \"shop\"\nsasl_password = \"s3cret\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"linger.ms\" = 20\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(settings.brokers, "k1:9092,k2:9092");
        assert_eq!(settings.topic("public.accounts"), "shop.public.accounts");
        assert_eq!(settings.partitions, DEFAULT_PARTITIONS);
        assert!(
            settings
                .properties
                .contains(&("security.protocol".into(), "SASL_SSL".into()))
        );
        assert!(
            settings
                .properties
                .contains(&("linger.ms".into(), "20".into()))
        );
        // The password never prints.
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    /// `section` in a config with a source and no target.
    fn alone(section: &str) -> Result<super::super::Config, ConfigError> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            format!("[source]\nurl = \"host=a user=u dbname=app\"\n{section}"),
        )
        .unwrap();
        load_from(Some(f.path()), &[])?.validate()
    }

    #[test]
    fn a_feed_without_a_target_runs_alone_and_refuses_what_needs_one() {
        let config = alone("[kafka]\nbrokers = \"k:9092\"\n").unwrap();
        assert!(config.target.is_none());
        assert!(config.target().is_err());
        // Without [kafka], a target is required as ever.
        let missing = alone("").unwrap_err().to_string();
        assert!(missing.contains("target.url"), "{missing}");
        for (section, key) in [
            (
                "[[group]]\nname = \"g\"\ntables = [\"public.*\"]\n",
                "group",
            ),
            ("[verify]\ncontinuous = true\n", "verify.continuous"),
            ("snapshot = true\n", "kafka.snapshot"),
        ] {
            let text = if key == "kafka.snapshot" {
                format!("[kafka]\nbrokers = \"k:9092\"\n{section}")
            } else {
                format!("{section}[kafka]\nbrokers = \"k:9092\"\n")
            };
            let refused = alone(&text).unwrap_err().to_string();
            assert!(
                refused.contains(key) && refused.contains("no [target]"),
                "{refused}"
            );
        }
    }

    #[test]
    fn what_cutover_sets_and_secrets_in_properties_are_refused_with_the_key_to_use() {
        let refused = |section: &str| kafka(section).unwrap_err().to_string();
        let no_brokers = refused("[kafka]\ntopic_prefix = \"shop\"\n");
        assert!(no_brokers.contains("kafka.brokers"), "{no_brokers}");
        let own = refused(
            "[kafka]\nbrokers = \"k:9092\"\n[kafka.properties]\n\"transactional.id\" = \"x\"\n",
        );
        assert!(own.contains("is cutover's to set"), "{own}");
        let secret = refused(
            "[kafka]\nbrokers = \"k:9092\"\n[kafka.properties]\n\"sasl.password\" = \"x\"\n",
        );
        assert!(secret.contains("kafka.sasl_password"), "{secret}");
        assert!(!secret.contains("\"x\""), "{secret}");
        let format = refused("[kafka]\nbrokers = \"k:9092\"\nformat = \"avro\"\n");
        assert!(format.contains("use \"debezium\""), "{format}");
        let prefix = refused("[kafka]\nbrokers = \"k:9092\"\ntopic_prefix = \"a b\"\n");
        assert!(prefix.contains("kafka.topic_prefix"), "{prefix}");
        let unknown = refused("[kafka]\nbrokers = \"k:9092\"\nbroker = \"x\"\n");
        assert!(unknown.contains("kafka.brokers"), "{unknown}");
    }
}
