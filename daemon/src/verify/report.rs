//! What a verify found, for a person (a table of counts, a few sample keys
//! per table) and for a script or a migration team's records (JSON, and
//! `validation_report.json` in the state directory).

use std::fmt::Write as _;

use cutover_conflict::compare::Tally;
use cutover_replication::Lsn;
use serde::{Deserialize, Serialize};

use super::integrity::ForeignKeyCheck;

/// Whether the target holds what the source held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Every table equal.
    Validated,
    /// At least one row differs.
    Failed,
    /// Rows differed, and `--repair` made every one equal.
    Repaired,
}

/// Repaired rows a person sees per table (the JSON report has them all).
const REPAIRS_SHOWN: usize = 20;

/// What kind of difference a sample is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    /// On the source only.
    MissingOnTarget,
    /// On the target only.
    ExtraOnTarget,
    /// Under one key on both, with other values.
    Changed,
}

impl SampleKind {
    fn label(self) -> &'static str {
        match self {
            SampleKind::MissingOnTarget => "missing on target",
            SampleKind::ExtraOnTarget => "extra on target",
            SampleKind::Changed => "changed",
        }
    }
}

/// One differing row, as shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// What kind of difference.
    pub kind: SampleKind,
    /// Its key as `(col=value, ...)`; the whole row for a table without a
    /// key.
    pub key: String,
    /// The columns that differ (for `changed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

/// One table's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Rows read on the source.
    pub source_rows: u64,
    /// Rows read on the target.
    pub target_rows: u64,
    /// Rows equal on both sides.
    pub equal: u64,
    /// Rows on the source only.
    pub missing: u64,
    /// Rows on the target only.
    pub extra: u64,
    /// Keys on both sides with other values.
    pub changed: u64,
    /// Columns of the source the target lacks (not compared).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_columns: Vec<String>,
    /// The source positions its rows were compared at: one, or more when
    /// an interrupted verify resumed it (each chunk exact at its own).
    pub compared_at: Vec<Lsn>,
    /// An order-independent checksum of the source's rows (`rows:blake3
    /// sum`), as read.
    pub source_checksum: String,
    /// The same of the target's rows.
    pub target_checksum: String,
    /// Up to `samples` differences of each kind.
    pub samples: Vec<Sample>,
    /// Rows `--repair` wrote, as `inserted (id=1)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
    /// A table written through a `[[map]]`: its reconciliation. Its
    /// `source_rows` above are then the rows expected on the target (the
    /// source's, less those rejected), compared as mapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped: Option<Reconciliation>,
}

/// A mapped table's reconciliation at the compared position.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reconciliation {
    /// The table written.
    pub written_to: String,
    /// Rows of the source table.
    pub source_rows: u64,
    /// Rows the mapping rejects, by reason.
    pub rejected: Vec<(String, i64)>,
    /// Up to `verify.samples` rejected keys, as `(key) (reason)`.
    #[serde(default)]
    pub rejected_samples: Vec<String>,
    /// Rows the target should hold.
    pub expected: i64,
    /// Rows it holds.
    pub target_rows: i64,
    /// `target_rows - expected`.
    pub variance: i64,
    /// Rejected rows whose record in `cutover.rejected` disagrees (missing,
    /// another reason, or a record of a row that is not rejected).
    pub records_off: u64,
}

impl TableReport {
    /// An empty result for `table`.
    pub fn new(table: String, missing_columns: Vec<String>) -> TableReport {
        TableReport {
            table,
            source_rows: 0,
            target_rows: 0,
            equal: 0,
            missing: 0,
            extra: 0,
            changed: 0,
            missing_columns,
            compared_at: Vec::new(),
            source_checksum: String::new(),
            target_checksum: String::new(),
            samples: Vec::new(),
            repaired: Vec::new(),
            mapped: None,
        }
    }

    /// Records both sides' checksums.
    pub fn set_checksums(&mut self, source: String, target: String) {
        self.source_checksum = source;
        self.target_checksum = target;
    }

    /// Keeps `sample` unless `limit` of its kind are kept already.
    pub fn add_sample(&mut self, sample: Sample, limit: usize) {
        let kept = self
            .samples
            .iter()
            .filter(|s| s.kind == sample.kind)
            .count();
        if kept < limit {
            self.samples.push(sample);
        }
    }

    /// Adds the counts of one more chunk.
    pub fn add_tally(&mut self, tally: Tally) {
        self.source_rows += tally.source_rows;
        self.target_rows += tally.target_rows;
        self.equal += tally.equal;
        self.missing += tally.missing;
        self.extra += tally.extra;
        self.changed += tally.changed;
    }

    /// Rows that differ, whichever way.
    pub fn differing(&self) -> u64 {
        self.missing + self.extra + self.changed
    }

    /// Whether the table is the same on both sides (and a mapped one's
    /// records of rejection agree).
    pub fn equal_on_both_sides(&self) -> bool {
        self.differing() == 0
            && self.missing_columns.is_empty()
            && self.mapped.as_ref().is_none_or(|m| m.records_off == 0)
    }
}

/// The result of a verify.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The migration (its slot's name).
    pub migration_id: String,
    /// When the verify finished, RFC 3339 UTC.
    pub date: String,
    /// The source position both sides were compared at.
    pub lsn: Lsn,
    /// The `[[group]]` compared (`--group`); absent: every table in scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `VALIDATED` or `FAILED`.
    pub status: Verdict,
    /// Tables compared.
    pub tables_verified: usize,
    /// Rows on the source, all tables.
    pub total_source_rows: u64,
    /// Rows on the target, all tables.
    pub total_target_rows: u64,
    /// Target rows minus source rows.
    pub variance: i64,
    /// Rows that differ, all tables.
    pub differing_rows: u64,
    /// Rows `--repair` wrote, all tables.
    pub repaired_rows: u64,
    /// The source position `--repair` wrote at: the compared position, or
    /// beside a running daemon a later one, where the rows found differing
    /// were read again (those the stream had made equal meanwhile were
    /// left alone). `null` without `--repair`.
    pub repaired_at: Option<Lsn>,
    /// Per table, in name order.
    pub tables: Vec<TableReport>,
    /// Every foreign key of a table in scope, checked on the target.
    pub referential_integrity: Vec<ForeignKeyCheck>,
    /// Target rows whose foreign key refers to no row.
    pub orphaned_rows: i64,
    /// `target` when the group compared was moved to the target: the
    /// target was read as the primary, and every `source` figure, the
    /// position included, is the target's (and `target` the source's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared_from: Option<&'static str>,
    /// Groups not compared: `switch --group` moved them to the target.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups_not_compared: Vec<String>,
    /// The stray writes and conflicts recorded so far (with `[[group]]`s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Conflicts>,
}

/// What the report keeps of the stray writes and conflicts recorded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Conflicts {
    /// How many, by resolution (`written_back`, `parked`, ...).
    pub by_resolution: std::collections::BTreeMap<String, u64>,
    /// The ones an operator still has to settle (`parked`) or that are
    /// not settled yet (`pending`): `#id side table op key`.
    pub unsettled: Vec<String>,
}

impl Conflicts {
    /// Adds one record.
    pub fn add(&mut self, id: u64, side: &str, table: &str, op: &str, key: &str, resolution: &str) {
        *self.by_resolution.entry(resolution.to_owned()).or_default() += 1;
        if resolution == "parked" || resolution == "pending" {
            self.unsettled
                .push(format!("#{id} {side} {table} {op} {key}: {resolution}"));
        }
    }
}

impl Report {
    /// The report of `tables` compared at `lsn`.
    pub fn new(
        migration_id: String,
        date: String,
        lsn: Lsn,
        mut tables: Vec<TableReport>,
        referential_integrity: Vec<ForeignKeyCheck>,
        repaired_at: Option<Lsn>,
    ) -> Report {
        tables.sort_by(|a, b| a.table.cmp(&b.table));
        let total_source_rows = tables.iter().map(|t| t.source_rows).sum();
        let total_target_rows = tables.iter().map(|t| t.target_rows).sum();
        let differing_rows = tables.iter().map(TableReport::differing).sum();
        let repaired_rows = tables.iter().map(|t| t.repaired.len() as u64).sum();
        let orphaned_rows = referential_integrity.iter().map(|k| k.orphans).sum();
        let status = if orphaned_rows > 0 {
            Verdict::Failed
        } else if tables.iter().all(TableReport::equal_on_both_sides) {
            Verdict::Validated
        } else if repaired_at.is_some()
            && tables.iter().all(|t| {
                t.missing_columns.is_empty() && (t.mapped.is_none() || t.equal_on_both_sides())
            })
        {
            // Every row found differing was written, or (beside a daemon)
            // read again equal; a failed repair is an error, not a report.
            Verdict::Repaired
        } else {
            Verdict::Failed
        };
        Report {
            migration_id,
            date,
            lsn,
            group: None,
            status,
            tables_verified: tables.len(),
            total_source_rows,
            total_target_rows,
            variance: total_target_rows as i64 - total_source_rows as i64,
            differing_rows,
            repaired_rows,
            repaired_at,
            tables,
            referential_integrity,
            orphaned_rows,
            compared_from: None,
            groups_not_compared: Vec::new(),
            conflicts: None,
        }
    }

    /// The report for a person.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        // A moved group is compared from the target, its primary.
        let (primary, other) = match self.compared_from {
            Some("target") => ("target", "source"),
            _ => ("source", "target"),
        };
        let _ = writeln!(
            out,
            "verified {} tables{} as of {primary} LSN {} ({} rows on the {primary}, {} on the {other}){}",
            self.tables_verified,
            self.group
                .as_deref()
                .map(|g| format!(" of group {g}"))
                .unwrap_or_default(),
            self.lsn,
            self.total_source_rows,
            self.total_target_rows,
            if primary == "target" {
                ": the group's primary is the target, compared against the source (below, \"source\" is the target)"
            } else {
                ""
            }
        );
        let width = self
            .tables
            .iter()
            .map(|t| t.table.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(
            out,
            "{:width$}  {:>12}  {:>12}  {:>12}  {:>8}  {:>8}  {:>8}",
            "table", "source rows", "target rows", "equal", "missing", "extra", "changed"
        );
        for t in &self.tables {
            let _ = writeln!(
                out,
                "{:width$}  {:>12}  {:>12}  {:>12}  {:>8}  {:>8}  {:>8}",
                t.table, t.source_rows, t.target_rows, t.equal, t.missing, t.extra, t.changed
            );
        }
        let mapped: Vec<&TableReport> = self.tables.iter().filter(|t| t.mapped.is_some()).collect();
        let width = mapped
            .iter()
            .filter_map(|t| Some(t.table.len() + 4 + t.mapped.as_ref()?.written_to.len()))
            .max()
            .unwrap_or(width)
            .max(width);
        if !mapped.is_empty() {
            let _ = writeln!(
                out,
                "\nreconciliation of mapped tables:\n{:width$}  {:>12}  {:>9}  {:>12}  {:>12}  {:>8}",
                "table", "source rows", "rejected", "expected", "target rows", "variance"
            );
            for t in &mapped {
                let Some(m) = &t.mapped else { continue };
                let rejected: i64 = m.rejected.iter().map(|(_, n)| n).sum();
                let _ = writeln!(
                    out,
                    "{:width$}  {:>12}  {:>9}  {:>12}  {:>12}  {:>8}",
                    format!("{} -> {}", t.table, m.written_to),
                    m.source_rows,
                    rejected,
                    m.expected,
                    m.target_rows,
                    m.variance
                );
                for (reason, n) in &m.rejected {
                    let _ = writeln!(out, "  rejected by {reason}: {n}");
                }
                if !m.rejected_samples.is_empty() {
                    let _ = writeln!(out, "  e.g. {}", m.rejected_samples.join(", "));
                }
                if m.records_off > 0 {
                    let _ = writeln!(
                        out,
                        "  {} rejected rows disagree with their record in cutover.rejected on the target",
                        m.records_off
                    );
                }
            }
        }
        for t in self.tables.iter().filter(|t| !t.equal_on_both_sides()) {
            let _ = writeln!(out, "\n{}:", t.table);
            if t.mapped.is_some() && self.repaired_at.is_some() {
                let _ = writeln!(
                    out,
                    "  not repaired: a mapped table is loaded again instead (stop the daemon, drop its slot on the source and run `cutover run --resync`)"
                );
            }
            if !t.missing_columns.is_empty() {
                let _ = writeln!(
                    out,
                    "  columns missing on the target (not compared): {}",
                    t.missing_columns.join(", ")
                );
            }
            for s in &t.samples {
                if s.columns.is_empty() {
                    let _ = writeln!(out, "  {}: {}", s.kind.label(), s.key);
                } else {
                    let _ = writeln!(
                        out,
                        "  {}: {} in {}",
                        s.kind.label(),
                        s.key,
                        s.columns.join(", ")
                    );
                }
            }
            let shown = t.samples.len() as u64;
            if t.differing() > shown {
                let _ = writeln!(out, "  ... and {} more", t.differing() - shown);
            }
            for row in t.repaired.iter().take(REPAIRS_SHOWN) {
                let _ = writeln!(out, "  repaired: {row}");
            }
            if t.repaired.len() > REPAIRS_SHOWN {
                let _ = writeln!(
                    out,
                    "  ... and {} more repaired (every one is in {})",
                    t.repaired.len() - REPAIRS_SHOWN,
                    super::REPORT_FILE
                );
            }
        }
        let _ = writeln!(
            out,
            "\nreferential integrity on the target: {} foreign keys checked, {} orphaned rows",
            self.referential_integrity.len(),
            self.orphaned_rows
        );
        for key in self.referential_integrity.iter().filter(|k| k.orphans > 0) {
            let _ = writeln!(
                out,
                "  {} of {} refers to no row of {} in {} rows: {}",
                key.constraint,
                key.table,
                key.references,
                key.orphans,
                key.samples.join(", ")
            );
        }
        if !self.groups_not_compared.is_empty() {
            let _ = writeln!(
                out,
                "\nnot compared: group {} (moved to the target by `switch --group`)",
                self.groups_not_compared.join(", ")
            );
        }
        if let Some(conflicts) = &self.conflicts {
            let counts: Vec<String> = conflicts
                .by_resolution
                .iter()
                .map(|(resolution, n)| format!("{n} {}", resolution.replace('_', " ")))
                .collect();
            let _ = writeln!(
                out,
                "\nstray writes and conflicts recorded: {}",
                if counts.is_empty() {
                    "none".to_owned()
                } else {
                    counts.join(", ")
                }
            );
            for line in &conflicts.unsettled {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = match self.status {
            Verdict::Validated => writeln!(
                out,
                "\nVALIDATED: the {other} holds exactly what the {primary} held at {}",
                self.lsn
            ),
            Verdict::Failed => writeln!(
                out,
                "\nFAILED: {} rows differ (target minus source rows: {}), {} orphaned rows",
                self.differing_rows, self.variance, self.orphaned_rows
            ),
            Verdict::Repaired if self.repaired_at == Some(self.lsn) => writeln!(
                out,
                "\nREPAIRED: {} differing rows made equal to the source at {} (run verify again to see it)",
                self.repaired_rows, self.lsn
            ),
            Verdict::Repaired => writeln!(
                out,
                "\nREPAIRED: of {} rows differing at {}, {} still differed at {} and were made equal to the source there; the stream had made the others equal (run verify again to see it)",
                self.differing_rows,
                self.lsn,
                self.repaired_rows,
                self.repaired_at.unwrap_or(self.lsn)
            ),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, missing: u64) -> TableReport {
        let mut t = TableReport::new(name.into(), Vec::new());
        t.add_tally(Tally {
            source_rows: 10,
            target_rows: 10 - missing,
            equal: 10 - missing,
            missing,
            extra: 0,
            changed: 0,
        });
        t
    }

    #[test]
    fn one_differing_table_fails_the_whole_verify() {
        let lsn: Lsn = "0/10".parse().unwrap();
        let ok = Report::new(
            "m".into(),
            "d".into(),
            lsn,
            vec![table("b", 0), table("a", 0)],
            Vec::new(),
            None,
        );
        assert_eq!(ok.status, Verdict::Validated);
        assert_eq!(ok.tables[0].table, "a");
        assert!(ok.to_human().contains("VALIDATED"));
        let mut bad = table("c", 2);
        for i in 0..3 {
            bad.add_sample(
                Sample {
                    kind: SampleKind::MissingOnTarget,
                    key: format!("(id={i})"),
                    columns: Vec::new(),
                },
                1,
            );
        }
        assert_eq!(bad.samples.len(), 1);
        let failed = Report::new(
            "m".into(),
            "d".into(),
            lsn,
            vec![table("a", 0), bad.clone()],
            Vec::new(),
            None,
        );
        assert_eq!(failed.status, Verdict::Failed);
        assert_eq!((failed.differing_rows, failed.variance), (2, -2));
        let human = failed.to_human();
        assert!(human.contains("missing on target: (id=0)"), "{human}");
        assert!(human.contains("... and 1 more"), "{human}");
        assert!(
            serde_json::to_string(&failed)
                .unwrap()
                .contains("\"status\":\"FAILED\"")
        );
        // Repaired beside a daemon, at a later position where one of the
        // two rows was still missing.
        bad.repaired = vec!["inserted (id=0)".into()];
        let later: Lsn = "0/20".parse().unwrap();
        let repaired = Report::new(
            "m".into(),
            "d".into(),
            lsn,
            vec![bad],
            Vec::new(),
            Some(later),
        );
        assert_eq!(repaired.status, Verdict::Repaired);
        let human = repaired.to_human();
        assert!(
            human.contains("of 2 rows differing at 0/10, 1 still differed at 0/20"),
            "{human}"
        );
    }
}
