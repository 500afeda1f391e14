//! `[kafka]`: whether the brokers answer with the feed's settings (TLS,
//! SASL), before `run` needs them.

use super::report::{Finding, Report, Severity};
use crate::config::Config;

/// Asks the brokers for their metadata; a feed that cannot reach them
/// blocks.
pub(super) async fn kafka_checks(report: &mut Report, config: &Config) {
    let Some(settings) = &config.kafka else {
        return;
    };
    match cutover_replication::sink::kafka::probe(settings).await {
        Ok(probe) => report.add(Finding {
            severity: Severity::Info,
            code: "kafka_reachable",
            server: "kafka",
            subject: Some("kafka.brokers".into()),
            problem: format!(
                "{} broker(s) answer; {} of the feed's topics ({}.*) exist{}",
                probe.brokers,
                probe.topics.len(),
                settings.topic_prefix,
                if probe.topics.is_empty() {
                    ": cutover creates each on first use"
                } else {
                    ""
                }
            ),
            fix: None,
        }),
        Err(err) => report.add(Finding {
            severity: Severity::Blocking,
            code: "kafka_unreachable",
            server: "kafka",
            subject: Some("kafka.brokers".into()),
            problem: format!("{}: {}", err.what, err.detail),
            fix: Some(err.fix.map_or_else(
                || {
                    "check kafka.brokers and that the brokers run and are reachable from here, with kafka.properties' security.protocol"
                        .to_owned()
                },
                str::to_owned,
            )),
        }),
    }
}
