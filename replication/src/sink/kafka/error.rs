//! Why the Kafka feed stopped, and whether starting again may cure it.
//!
//! librdkafka's errors are sorted by their code, never by their text:
//! what an operator must fix (credentials, grants, configuration, a
//! message too large) is definite and named with the fix; everything else
//! (a broker down, a timeout, an aborted transaction, a producer fenced
//! by a newer session of the same feed) is transient: the stream session
//! starts again, and the feed resumes from its last committed progress
//! record.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// A failure of the Kafka feed.
#[derive(Debug, thiserror::Error)]
#[error("Kafka: {what}: {detail}{}", fix.map(|f| format!(" ({f})")).unwrap_or_default())]
pub struct FeedError {
    /// What the feed was doing.
    pub what: String,
    /// What librdkafka said, or what went wrong.
    pub detail: String,
    /// What to do, when an operator must act.
    pub fix: Option<&'static str>,
    /// Whether starting again may cure it.
    pub transient: bool,
}

impl FeedError {
    /// Whether starting the session again may cure it.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// A definite failure with its fix.
    pub(super) fn definite(
        what: impl Into<String>,
        detail: impl Into<String>,
        fix: &'static str,
    ) -> FeedError {
        FeedError {
            what: what.into(),
            detail: detail.into(),
            fix: Some(fix),
            transient: false,
        }
    }

    /// A failure that starting again may cure.
    pub(super) fn transient(what: impl Into<String>, detail: impl Into<String>) -> FeedError {
        FeedError {
            what: what.into(),
            detail: detail.into(),
            fix: None,
            transient: true,
        }
    }
}

/// `err`, met while doing `what`, sorted by its code.
pub(super) fn classify(what: impl Into<String>, err: &KafkaError) -> FeedError {
    let what = what.into();
    let code = match err {
        KafkaError::Transaction(e) => Some(e.code()),
        // The configuration is refused before any broker is asked.
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
            return FeedError::definite(
                what,
                err.to_string(),
                "fix the property in [kafka] or [kafka.properties]; they are librdkafka's settings, listed in its CONFIGURATION.md",
            );
        }
        other => other.rdkafka_error_code(),
    };
    let detail = match err {
        KafkaError::Transaction(e) => format!("{} ({})", e.string(), e.name()),
        other => other.to_string(),
    };
    match code.and_then(fix_of) {
        Some(fix) => FeedError::definite(what, detail, fix),
        None => FeedError::transient(what, detail),
    }
}

/// The fix of an error an operator must act on; `None` for one that
/// starting again may cure.
pub(super) fn fix_of(code: RDKafkaErrorCode) -> Option<&'static str> {
    use RDKafkaErrorCode as C;
    Some(match code {
        C::Authentication | C::SaslAuthenticationFailed => {
            "the brokers refused cutover's credentials: check kafka.properties' security.protocol, sasl.mechanism and sasl.username, and kafka.sasl_password"
        }
        C::TopicAuthorizationFailed => {
            "grant cutover's Kafka principal WRITE and DESCRIBE on the feed's topics (<topic_prefix>.*), and READ on <topic_prefix>.cutover.progress"
        }
        C::ClusterAuthorizationFailed => {
            "grant cutover's Kafka principal CREATE on the cluster (or create the feed's topics beforehand) and IDEMPOTENT_WRITE on brokers older than 2.8"
        }
        C::TransactionalIdAuthorizationFailed => {
            "grant cutover's Kafka principal WRITE and DESCRIBE on the transactional ids cutover.<slot>.forward and cutover.<slot>.reverse"
        }
        C::GroupAuthorizationFailed => {
            "grant cutover's Kafka principal READ on the consumer group cutover.<slot>.progress"
        }
        C::MessageSizeTooLarge => {
            "a row's message is larger than the broker accepts: raise the topic's max.message.bytes and kafka.properties' message.max.bytes"
        }
        C::InvalidReplicationFactor => {
            "kafka.replication_factor is more than the cluster's brokers: lower it, or create the topics beforehand"
        }
        C::InvalidConfig | C::PolicyViolation | C::InvalidArgument => {
            "the brokers refused a setting: check [kafka] and [kafka.properties]"
        }
        C::InvalidTransactionTimeout => {
            "the brokers refuse the producer's transaction.timeout.ms (cutover asks for 900000, 15 minutes): set a lower one in [kafka.properties], at most the brokers' transaction.max.timeout.ms"
        }
        C::SSL => {
            "the TLS handshake with the brokers failed: check kafka.properties' ssl.ca.location and the brokers' certificates"
        }
        C::InvalidTopic => {
            "Kafka refuses the topic's name: it is longer than 249 characters with kafka.topic_prefix; shorten the prefix"
        }
        C::UnsupportedVersion => {
            "the brokers are too old for transactions: the feed needs Kafka 2.5 or later"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_code_not_by_text() {
        let denied = classify(
            "producing",
            &KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
        );
        assert!(!denied.is_transient());
        assert!(
            denied
                .to_string()
                .contains("grant cutover's Kafka principal WRITE")
        );
        let down = classify(
            "producing",
            &KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown),
        );
        assert!(down.is_transient());
        // A newer session of the same feed took the transactional id: the
        // slot admits one reader, so this one starts again and reads the
        // feed's progress anew.
        let fenced = classify(
            "committing",
            &KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced),
        );
        assert!(fenced.is_transient());
        let config = classify(
            "configuring",
            &KafkaError::ClientConfig(
                rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
                "No such configuration property".into(),
                "linger.mss".into(),
                "5".into(),
            ),
        );
        assert!(!config.is_transient());
        assert!(config.to_string().contains("[kafka.properties]"));
    }
}
