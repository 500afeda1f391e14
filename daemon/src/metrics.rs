//! Prometheus metrics: every family name and label in one place.
//!
//! Names carry the `cutover_` prefix and the `_total`, `_seconds`,
//! `_bytes` suffixes; label values come from small fixed sets (direction,
//! table, op, kind, state), never from error messages.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// Replication lag in bytes of WAL, by direction.
pub const LAG_BYTES: &str = "cutover_lag_bytes";
/// Replication lag in seconds, by direction.
pub const LAG_SECONDS: &str = "cutover_lag_seconds";
/// Changes applied to the target, by direction, table and op.
pub const APPLIED_CHANGES: &str = "cutover_applied_changes_total";
/// Source transactions applied, by direction.
pub const APPLIED_TRANSACTIONS: &str = "cutover_applied_transactions_total";
/// WAL the source retains for the slot, by slot.
pub const SLOT_RETAINED_BYTES: &str = "cutover_slot_retained_bytes";
/// Rows copied by the snapshot copy, by table.
pub const COPY_ROWS: &str = "cutover_copy_rows_total";
/// Bytes of COPY data moved by the snapshot copy, by table.
pub const COPY_BYTES: &str = "cutover_copy_bytes_total";
/// Errors by kind.
pub const ERRORS: &str = "cutover_errors_total";
/// The daemon's state: 1 for the current one.
pub const STATE: &str = "cutover_state";
/// 1 for the slot's current `wal_status` on the source, 0 for the others.
pub const SLOT_WAL_STATUS: &str = "cutover_slot_wal_status";

/// Rows the source changed that the stream does not carry (UPDATEs and
/// DELETEs of keyless append-only tables, every write to unlogged
/// tables), by table.
pub const UNSTREAMED_ROWS: &str = "cutover_unstreamed_rows";

/// Rows found different between source and target by the background
/// verifier in its last pass over each table, by table.
pub const DIVERGENT_ROWS: &str = "cutover_divergent_rows";
/// Source rows the background verifier compared in its last pass over
/// each table, by table (the denominator of the divergent ratio).
pub const VERIFIED_ROWS: &str = "cutover_verified_rows";
/// Rows that differ in the background verifier's last passes over the
/// tables of each `[[group]]`, by group.
pub const GROUP_DIVERGENT_ROWS: &str = "cutover_group_divergent_rows";
/// Stray writes and conflicts, by table and resolution.
pub const CONFLICTS: &str = "cutover_conflicts_total";
/// Source rows the background verifier compared.
pub const VERIFY_ROWS: &str = "cutover_verify_rows_total";
/// Target rows the background verifier repaired (`verify.repair`).
pub const VERIFY_REPAIRED_ROWS: &str = "cutover_verify_repaired_rows_total";
/// When the background verifier last finished a pass over every table.
pub const VERIFY_LAST_PASS: &str = "cutover_verify_last_pass_timestamp_seconds";

/// 1 for the server the application writes to, 0 for the other, by
/// server (`source`, `target`).
pub const PRIMARY: &str = "cutover_primary";
/// The last switch's or rollback's write-unavailability window.
pub const SWITCH_WINDOW: &str = "cutover_switch_window_seconds";
/// 1 while this daemon runs a switch or rollback (asked through the
/// console), from its drain to its end.
pub const SWITCH_IN_PROGRESS: &str = "cutover_switch_in_progress";

/// Messages the Kafka feed committed, by topic.
pub const KAFKA_MESSAGES: &str = "cutover_kafka_messages_total";
/// Bytes (keys and values) of the messages the Kafka feed committed, by
/// topic.
pub const KAFKA_BYTES: &str = "cutover_kafka_bytes_total";
/// Kafka transactions the feed committed, by direction.
pub const KAFKA_TRANSACTIONS: &str = "cutover_kafka_transactions_total";
/// How long the feed's Kafka transactions took to commit.
pub const KAFKA_COMMIT_SECONDS: &str = "cutover_kafka_commit_seconds";
/// The source's WAL position minus the feed's last committed position,
/// by direction.
pub const KAFKA_LAG_BYTES: &str = "cutover_kafka_lag_bytes";

/// Label: `forward` or `reverse`.
pub const LABEL_DIRECTION: &str = "direction";
/// Label: `schema.table`.
pub const LABEL_TABLE: &str = "table";
/// Label: `insert`, `update`, `delete`, `truncate`.
pub const LABEL_OP: &str = "op";
/// Label: the slot name.
pub const LABEL_SLOT: &str = "slot";
/// Label: an error kind (see [`crate::live::ErrorKind`]).
pub const LABEL_KIND: &str = "kind";
/// Label: a daemon state.
pub const LABEL_STATE: &str = "state";
/// Label key: a slot's `wal_status`, one of [`WAL_STATUSES`].
pub const LABEL_WAL_STATUS: &str = "wal_status";

/// The values of `pg_replication_slots.wal_status` (PostgreSQL 13+):
/// `extended` and `unreserved` warn that the slot is past
/// `max_wal_size` or about to lose WAL; `lost` means it was invalidated.
pub const WAL_STATUSES: &[&str] = &["reserved", "extended", "unreserved", "lost"];

/// Console logins refused for a wrong password.
pub const CONSOLE_FAILED_LOGINS: &str = "cutover_console_failed_logins_total";
/// The registered families.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// [`LAG_BYTES`].
    pub lag_bytes: IntGaugeVec,
    /// [`LAG_SECONDS`] (whole milliseconds would need a float; seconds as
    /// a float gauge).
    pub lag_seconds: prometheus::GaugeVec,
    /// [`APPLIED_CHANGES`].
    pub applied_changes: IntCounterVec,
    /// [`APPLIED_TRANSACTIONS`].
    pub applied_transactions: IntCounterVec,
    /// [`SLOT_RETAINED_BYTES`].
    pub slot_retained_bytes: IntGaugeVec,
    /// [`COPY_ROWS`].
    pub copy_rows: IntCounterVec,
    /// [`COPY_BYTES`].
    pub copy_bytes: IntCounterVec,
    /// [`ERRORS`].
    pub errors: IntCounterVec,
    /// [`STATE`].
    pub state: IntGaugeVec,
    /// [`SLOT_WAL_STATUS`].
    pub slot_wal_status: IntGaugeVec,
    /// [`UNSTREAMED_ROWS`].
    pub unstreamed_rows: IntGaugeVec,
    /// [`DIVERGENT_ROWS`].
    pub divergent_rows: IntGaugeVec,
    /// [`VERIFIED_ROWS`].
    pub verified_rows: IntGaugeVec,
    /// [`GROUP_DIVERGENT_ROWS`].
    pub group_divergent_rows: IntGaugeVec,
    /// [`CONFLICTS`].
    pub conflicts: IntCounterVec,
    /// [`VERIFY_ROWS`].
    pub verify_rows: prometheus::IntCounter,
    /// [`VERIFY_LAST_PASS`] (0 before the first pass).
    pub verify_last_pass: prometheus::Gauge,
    /// [`VERIFY_REPAIRED_ROWS`].
    pub verify_repaired_rows: prometheus::IntCounter,
    /// [`PRIMARY`].
    pub primary: IntGaugeVec,
    /// [`SWITCH_WINDOW`] (0 before the first switch).
    pub switch_window: prometheus::Gauge,
    /// [`SWITCH_IN_PROGRESS`].
    pub switch_in_progress: prometheus::IntGauge,
    /// [`CONSOLE_FAILED_LOGINS`].
    pub console_failed_logins: prometheus::IntCounter,
    /// [`KAFKA_MESSAGES`].
    pub kafka_messages: IntCounterVec,
    /// [`KAFKA_BYTES`].
    pub kafka_bytes: IntCounterVec,
    /// [`KAFKA_TRANSACTIONS`].
    pub kafka_transactions: IntCounterVec,
    /// [`KAFKA_COMMIT_SECONDS`].
    pub kafka_commit_seconds: prometheus::Histogram,
    /// [`KAFKA_LAG_BYTES`].
    pub kafka_lag_bytes: IntGaugeVec,
    /// Every family's name, for the dashboard's and the alerts' test.
    #[cfg(test)]
    families: Vec<String>,
}

impl Metrics {
    /// Registers every family in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::new());
        fn reg<T: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            names: &std::cell::RefCell<Vec<String>>,
            c: T,
        ) -> T {
            names
                .borrow_mut()
                .extend(c.desc().iter().map(|d| d.fq_name.clone()));
            r.register(Box::new(c.clone()))
                .expect("metric names are unique constants");
            c
        }
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                &names,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                &names,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        Metrics {
            lag_bytes: int_gauge(
                LAG_BYTES,
                "Source WAL position minus the last applied commit LSN",
                &[LABEL_DIRECTION],
            ),
            lag_seconds: reg(
                &registry,
                &names,
                prometheus::GaugeVec::new(
                    Opts::new(
                        LAG_SECONDS,
                        "Seconds since the commit of the oldest change not yet applied (0 when none is pending)",
                    ),
                    &[LABEL_DIRECTION],
                )
                .expect("valid metric"),
            ),
            applied_changes: counter(
                APPLIED_CHANGES,
                "Changes applied to the target",
                &[LABEL_DIRECTION, LABEL_TABLE, LABEL_OP],
            ),
            applied_transactions: counter(
                APPLIED_TRANSACTIONS,
                "Source transactions applied to the target",
                &[LABEL_DIRECTION],
            ),
            slot_retained_bytes: int_gauge(
                SLOT_RETAINED_BYTES,
                "WAL the source retains for the replication slot",
                &[LABEL_SLOT],
            ),
            copy_rows: counter(COPY_ROWS, "Rows copied by the snapshot copy", &[LABEL_TABLE]),
            copy_bytes: counter(
                COPY_BYTES,
                "Bytes of COPY data moved by the snapshot copy",
                &[LABEL_TABLE],
            ),
            errors: counter(ERRORS, "Errors by kind", &[LABEL_KIND]),
            state: int_gauge(STATE, "1 for the daemon's current state", &[LABEL_STATE]),
            slot_wal_status: int_gauge(
                SLOT_WAL_STATUS,
                "1 for the replication slot's current wal_status on the source (lost: invalidated)",
                &[LABEL_SLOT, LABEL_WAL_STATUS],
            ),
            unstreamed_rows: int_gauge(
                UNSTREAMED_ROWS,
                "Rows changed on the source that the stream does not carry (keyless append-only tables' updates and deletes, unlogged tables' writes), from the source's statistics",
                &[LABEL_TABLE],
            ),
            divergent_rows: int_gauge(
                DIVERGENT_ROWS,
                "Rows that differ between source and target in the background verifier's last pass over the table",
                &[LABEL_TABLE],
            ),
            conflicts: counter(
                CONFLICTS,
                "Stray writes (an application's writes on the side that is not the table group's primary) and conflicts, by what was done",
                &[LABEL_TABLE, "resolution"],
            ),
            group_divergent_rows: int_gauge(
                GROUP_DIVERGENT_ROWS,
                "Rows that differ between source and target in the background verifier's last passes over a [[group]]'s tables",
                &["group"],
            ),
            verified_rows: int_gauge(
                VERIFIED_ROWS,
                "Source rows the background verifier compared in its last pass over the table",
                &[LABEL_TABLE],
            ),
            verify_rows: reg(
                &registry,
                &names,
                prometheus::IntCounter::new(VERIFY_ROWS, "Source rows the background verifier compared")
                    .expect("valid metric"),
            ),
            verify_last_pass: reg(
                &registry,
                &names,
                prometheus::Gauge::new(
                    VERIFY_LAST_PASS,
                    "Unix time the background verifier last finished a pass over every table (0: none yet)",
                )
                .expect("valid metric"),
            ),
            verify_repaired_rows: reg(
                &registry,
                &names,
                prometheus::IntCounter::new(
                    VERIFY_REPAIRED_ROWS,
                    "Target rows the background verifier made equal to the source (verify.repair)",
                )
                .expect("valid metric"),
            ),
            primary: int_gauge(
                PRIMARY,
                "1 for the server the application writes to (source until the switch)",
                &["server"],
            ),
            switch_window: reg(
                &registry,
                &names,
                prometheus::Gauge::new(
                    SWITCH_WINDOW,
                    "The last switch's or rollback's write-unavailability window: fence to new primary open",
                )
                .expect("valid metric"),
            ),
            switch_in_progress: reg(
                &registry,
                &names,
                prometheus::IntGauge::new(
                    SWITCH_IN_PROGRESS,
                    "1 while this daemon runs a switch or rollback, from its drain to its end",
                )
                .expect("valid metric"),
            ),
            console_failed_logins: reg(
                &registry,
                &names,
                prometheus::IntCounter::new(
                    CONSOLE_FAILED_LOGINS,
                    "Console logins refused for a wrong password",
                )
                .expect("valid metric"),
            ),
            kafka_messages: counter(
                KAFKA_MESSAGES,
                "Messages the Kafka feed committed",
                &["topic"],
            ),
            kafka_bytes: counter(
                KAFKA_BYTES,
                "Bytes (keys and values) of the messages the Kafka feed committed",
                &["topic"],
            ),
            kafka_transactions: counter(
                KAFKA_TRANSACTIONS,
                "Kafka transactions the feed committed",
                &[LABEL_DIRECTION],
            ),
            kafka_commit_seconds: reg(
                &registry,
                &names,
                prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        KAFKA_COMMIT_SECONDS,
                        "How long the feed's Kafka transactions took to commit",
                    )
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                )
                .expect("valid metric"),
            ),
            kafka_lag_bytes: int_gauge(
                KAFKA_LAG_BYTES,
                "Source WAL position minus the Kafka feed's last committed position",
                &[LABEL_DIRECTION],
            ),
            registry,
            #[cfg(test)]
            families: names.into_inner(),
        }
    }

    /// The name of every family registered, whether it has samples yet or
    /// not (`/metrics` shows a family once it has one).
    #[cfg(test)]
    pub fn families(&self) -> &[String] {
        &self.families
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `cutover_…` names in `text`, a histogram's series
    /// (`_bucket`, `_sum`, `_count`) under its family's name.
    fn names_in(text: &str, families: &[String]) -> Vec<String> {
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("cutover_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| families.iter().any(|f| f == base))
                })
                .map_or(name.clone(), str::to_owned);
            found.push(family);
        }
        found
    }

    #[test]
    fn the_dashboard_and_the_alerts_query_only_families_the_daemon_exports() {
        let metrics = Metrics::new();
        let families = metrics.families();
        assert!(families.iter().any(|f| f == SWITCH_IN_PROGRESS));
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let dashboard = std::fs::read_to_string(deploy.join("grafana/cutover-dashboard.json"))
            .expect("the Grafana dashboard");
        let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
        let mut queried = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("a PromQL expression");
                let names = names_in(expr, families);
                assert!(
                    !names.is_empty(),
                    "{}: {expr} queries no cutover metric",
                    panel["title"]
                );
                queried.extend(names);
            }
        }
        let alerts = std::fs::read_to_string(deploy.join("prometheus/cutover-alerts.yml"))
            .expect("the alert rules");
        queried.extend(names_in(&alerts, families));
        for name in &queried {
            assert!(
                families.contains(name),
                "{name} is queried but the daemon exports no such family"
            );
        }
        // What the dashboard is for: lag, throughput, divergence,
        // conflicts and the switch window.
        for wanted in [
            LAG_SECONDS,
            APPLIED_CHANGES,
            DIVERGENT_ROWS,
            CONFLICTS,
            SWITCH_WINDOW,
        ] {
            assert!(
                queried.iter().any(|q| q == wanted),
                "the dashboard lacks {wanted}"
            );
        }
    }
}
