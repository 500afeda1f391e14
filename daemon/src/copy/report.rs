//! The reconciliation table printed at the end of a copy: per table, the
//! source's rows, the rows copied, those its mapping rejected, the rows expected on the
//! target, the rows there, and the variance; then, for mapped tables, the
//! rejections by reason with sample keys.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::store::TableCopy;

/// The reconciliation table, as printed at the end of the copy.
pub fn reconciliation(tables: &[TableCopy]) -> String {
    let mut rows: BTreeMap<String, &TableCopy> = BTreeMap::new();
    for t in tables {
        let name = match &t.target {
            Some(target) => format!("{} -> {target}", t.name),
            None => t.name.to_string(),
        };
        rows.insert(name, t);
    }
    let width = rows.keys().map(String::len).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>12}  {:>12}  {:>9}  {:>12}  {:>12}  {:>8}  {:>6}  {:>12}",
        "table",
        "source rows",
        "copied",
        "rejected",
        "expected",
        "target rows",
        "variance",
        "chunks",
        "snapshot"
    );
    let show = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    for (name, t) in &rows {
        let _ = writeln!(
            out,
            "{name:<width$}  {:>12}  {:>12}  {:>9}  {:>12}  {:>12}  {:>8}  {:>6}  {:>12}",
            show(t.source_count),
            t.rows_copied,
            t.rejected_rows(),
            show(t.expected()),
            show(t.target_count),
            show(t.variance()),
            t.chunks_total,
            t.copied_at.to_string()
        );
    }
    for (name, t) in &rows {
        let Some(rejected) = &t.rejected else {
            continue;
        };
        if rejected.by_reason.is_empty() {
            continue;
        }
        let reasons: Vec<String> = rejected
            .by_reason
            .iter()
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect();
        let _ = writeln!(out, "rejected by {name}: {}", reasons.join(", "));
        for (key, reason) in &rejected.samples {
            let _ = writeln!(out, "  e.g. key {key} ({reason})");
        }
    }
    out
}
