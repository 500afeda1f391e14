//! The reconciliation table printed at the end of a copy.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::store::TableCopy;

/// The reconciliation table, as printed at the end of the copy.
pub fn reconciliation(tables: &[TableCopy]) -> String {
    let mut rows: BTreeMap<String, &TableCopy> = BTreeMap::new();
    for t in tables {
        rows.insert(t.name.to_string(), t);
    }
    let width = rows.keys().map(String::len).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>12}  {:>12}  {:>12}  {:>8}  {:>6}  {:>12}",
        "table", "source rows", "copied", "target rows", "variance", "chunks", "snapshot"
    );
    for (name, t) in rows {
        let show = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        let _ = writeln!(
            out,
            "{name:<width$}  {:>12}  {:>12}  {:>12}  {:>8}  {:>6}  {:>12}",
            show(t.source_count),
            t.rows_copied,
            show(t.target_count),
            show(t.variance()),
            t.chunks_total,
            t.copied_at.to_string()
        );
    }
    out
}
