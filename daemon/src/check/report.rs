//! What `cutover check` found, and how it is shown: a human summary by
//! default, JSON for scripts. Every finding says what is wrong and, where
//! one is known, the fix (SQL to run where there is SQL to run).

use std::fmt::Write as _;

use cutover_replication::catalog::{ReplicaIdentity, Sequence, TableName};
use serde::Serialize;

/// How much a finding matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// `cutover run` would fail or lose data: fix before starting.
    Blocking,
    /// Works, but something will hurt (performance, the switch, disk).
    Warning,
    /// Worth knowing.
    Info,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Blocking => "BLOCKING",
            Severity::Warning => "WARNING",
            Severity::Info => "INFO",
        }
    }
}

/// One thing `check` wants the operator to know.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// A stable identifier for scripts, e.g. `no_replica_identity`.
    pub code: &'static str,
    /// `source` or `target`.
    pub server: &'static str,
    /// The table, setting or key concerned, if any.
    pub subject: Option<String>,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: Option<String>,
}

/// What one server is and allows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerReport {
    /// `host:port/dbname`, never a password.
    pub endpoint: String,
    /// Whether `check` could connect.
    pub connected: bool,
    /// `server_version`.
    pub version: Option<String>,
    /// `server_version_num`.
    pub version_num: Option<i32>,
    /// `wal_level`.
    pub wal_level: Option<String>,
    /// `max_replication_slots` and how many slots exist.
    pub replication_slots: Option<Usage>,
    /// `max_wal_senders` and how many are running.
    pub wal_senders: Option<Usage>,
    /// The role cutover logs in as.
    pub role: Option<String>,
    /// Whether that role is a superuser.
    pub superuser: Option<bool>,
    /// Whether that role has REPLICATION.
    pub replication: Option<bool>,
    /// `max_slot_wal_keep_size` as the server prints it.
    pub max_slot_wal_keep_size: Option<String>,
}

/// A limit and how much of it is taken.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    /// The configured maximum.
    pub max: i32,
    /// In use now.
    pub used: i32,
}

impl Usage {
    /// What is left.
    pub fn free(self) -> i32 {
        (self.max - self.used).max(0)
    }
}

/// A table in scope, as seen on both servers.
#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    /// Its name.
    pub name: TableName,
    /// Planner estimate on the source; `None` when never analyzed.
    pub row_estimate: Option<i64>,
    /// Exact source count, with `--count`.
    pub source_rows: Option<i64>,
    /// Exact target count, with `--count` (when the table exists there).
    pub target_rows: Option<i64>,
    /// Size on the source, bytes, indexes and TOAST included.
    pub total_bytes: i64,
    /// Primary key columns on the source.
    pub primary_key: Option<Vec<String>>,
    /// Replica identity on the source.
    pub replica_identity: ReplicaIdentity,
    /// Partitioned (published through its root).
    pub partitioned: bool,
    /// Whether the target has a table of that name (or the table its
    /// mapping writes).
    pub on_target: bool,
    /// The table a `[[map]]` writes it to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_to: Option<TableName>,
    /// What the stream will carry of it: `full`, `inserts_only`,
    /// `snapshot_only`, or `refused` (`replication.keyless = "refuse"`).
    pub coverage: &'static str,
    /// Its `[[group]]` (`default` for the tables no group names), when
    /// groups are configured; none when two groups claim it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The whole preflight.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The source server.
    pub source: ServerReport,
    /// The target server.
    pub target: ServerReport,
    /// Tables in scope on the source.
    pub tables: Vec<TableReport>,
    /// Sequences in scope on the source.
    pub sequences: Vec<Sequence>,
    /// Everything found, most severe first.
    pub findings: Vec<Finding>,
    /// Count of blocking findings.
    pub blocking: usize,
    /// Count of warnings.
    pub warnings: usize,
}

impl Report {
    /// Records a finding.
    pub fn add(&mut self, finding: Finding) {
        self.findings.push(finding);
    }

    /// Sorts findings (most severe first, stable otherwise) and counts them.
    pub fn finish(&mut self) {
        self.findings.sort_by_key(|f| f.severity);
        self.blocking = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Blocking)
            .count();
        self.warnings = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Warning)
            .count();
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report holds only JSON-safe values")
    }

    /// The human form.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        for (role, server) in [("source", &self.source), ("target", &self.target)] {
            let _ = write!(out, "{role:<7} {}", server.endpoint);
            if !server.connected {
                out.push_str("  (not reachable)\n");
                continue;
            }
            let _ = write!(
                out,
                "  PostgreSQL {}  wal_level={}",
                server.version.as_deref().unwrap_or("?"),
                server.wal_level.as_deref().unwrap_or("?")
            );
            if let Some(slots) = server.replication_slots {
                let _ = write!(out, "  slots {}/{} free", slots.free(), slots.max);
            }
            if let Some(senders) = server.wal_senders {
                let _ = write!(out, "  senders {}/{} free", senders.free(), senders.max);
            }
            if let Some(role) = &server.role {
                let mut attrs = Vec::new();
                if server.superuser == Some(true) {
                    attrs.push("superuser");
                }
                if server.replication == Some(true) {
                    attrs.push("replication");
                }
                let _ = write!(out, "  role {role}");
                if !attrs.is_empty() {
                    let _ = write!(out, " ({})", attrs.join(", "));
                }
            }
            out.push('\n');
        }

        let _ = writeln!(out, "\nTables in scope ({}):", self.tables.len());
        let width = self
            .tables
            .iter()
            .map(|t| t.name.to_string().len())
            .max()
            .unwrap_or(0);
        for table in &self.tables {
            let rows = match (table.source_rows, table.row_estimate) {
                (Some(exact), _) => format!("{} rows", group_digits(exact)),
                (None, Some(estimate)) => format!("~{} rows", group_digits(estimate)),
                (None, None) => "rows unknown (never analyzed)".to_owned(),
            };
            let identity = match (&table.replica_identity, &table.primary_key) {
                (ReplicaIdentity::Default, Some(key)) => format!("key ({})", key.join(", ")),
                (ReplicaIdentity::Default, None) => "NO KEY".to_owned(),
                (ReplicaIdentity::Full, _) => "replica identity FULL".to_owned(),
                (ReplicaIdentity::Index { index, .. }, _) => {
                    format!("replica identity index {index}")
                }
                (ReplicaIdentity::Nothing, _) => "replica identity NOTHING".to_owned(),
            };
            let _ = write!(
                out,
                "  {:<width$}  {:>24}  {:>10}  {}",
                table.name.to_string(),
                rows,
                human_bytes(table.total_bytes),
                identity
            );
            if let Some(group) = &table.group {
                let _ = write!(out, "  group {group}");
            }
            if table.partitioned {
                out.push_str("  partitioned");
            }
            if table.coverage != "full" {
                let _ = write!(out, "  streams: {}", table.coverage);
            }
            if let Some(to) = &table.written_to {
                let _ = write!(out, "  mapped to {to}");
            }
            if let Some(target_rows) = table.target_rows {
                let _ = write!(out, "  target {} rows", group_digits(target_rows));
            }
            if !table.on_target {
                out.push_str("  MISSING ON TARGET");
            }
            out.push('\n');
        }

        if !self.sequences.is_empty() {
            let _ = writeln!(out, "\nSequences in scope ({}):", self.sequences.len());
            for seq in &self.sequences {
                let last = seq
                    .last_value
                    .map(group_digits)
                    .unwrap_or_else(|| "never used".to_owned());
                let _ = write!(
                    out,
                    "  {}  {}  last value {}",
                    seq.name, seq.data_type, last
                );
                if let Some(owner) = &seq.owned_by {
                    let _ = write!(out, "  owned by {owner}");
                }
                out.push('\n');
            }
        }

        if self.findings.is_empty() {
            out.push_str("\nNo findings.\n");
        } else {
            let _ = writeln!(out, "\nFindings:");
            for f in &self.findings {
                let subject = f
                    .subject
                    .as_deref()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<8}  {}{}: {}",
                    f.severity.label(),
                    f.server,
                    subject,
                    f.problem
                );
                if let Some(fix) = &f.fix {
                    for (i, line) in fix.lines().enumerate() {
                        let lead = if i == 0 { "fix:" } else { "    " };
                        let _ = writeln!(out, "            {lead} {line}");
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\n{} blocking, {} warning{}: {}",
            self.blocking,
            self.warnings,
            if self.warnings == 1 { "" } else { "s" },
            if self.blocking > 0 {
                "fix the blocking findings before `cutover run`."
            } else {
                "ready for `cutover run`."
            }
        );
        out
    }
}

/// `1234567` → `1,234,567`.
pub fn group_digits(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Bytes in the units PostgreSQL's `pg_size_pretty` uses.
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_psql() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(group_digits(-1000), "-1,000");
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(8192), "8.0 kB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MB");
    }

    #[test]
    fn findings_sort_blocking_first_and_are_counted() {
        let mut report = Report::default();
        for severity in [Severity::Info, Severity::Blocking, Severity::Warning] {
            report.add(Finding {
                severity,
                code: "x",
                server: "source",
                subject: None,
                problem: "p".into(),
                fix: Some("ALTER ...;\nthen restart".into()),
            });
        }
        report.finish();
        assert_eq!(report.findings[0].severity, Severity::Blocking);
        assert_eq!((report.blocking, report.warnings), (1, 1));
        let human = report.to_human();
        assert!(human.contains("BLOCKING"), "{human}");
        assert!(human.contains("fix: ALTER ...;"), "{human}");
        assert!(
            human.contains("1 blocking, 1 warning: fix the blocking"),
            "{human}"
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["blocking"], 1);
        assert_eq!(json["findings"][0]["severity"], "blocking");
    }
}
