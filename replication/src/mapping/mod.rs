//! Field mappings: a source table written to a target table of another
//! shape (`[[map]]` in the config).
//!
//! A mapping names the target table, the SQL that feeds each target column
//! from the source row's columns, and the conditions that reject a row.
//! Every expression is evaluated by the server written to, in the statement
//! that writes the row: a lookup in a mapping table there works, and no
//! value is ever built into SQL text (docs/architecture.md invariant 8);
//! the expressions themselves are the operator's SQL, checked by `cutover
//! check` against the target before anything runs.
//!
//! The copy, the stream and `verify` all go through the same statements
//! built here, over rows typed as the source's columns (a `COPY` into a
//! temporary table, or `unnest` of a batch's `text[]` columns), so that a
//! row's target form does not depend on the path it took.
//!
//! In every statement the row read is named `src`: an expression may
//! qualify a column of it (`src.region`) where a lookup table has a column
//! of the same name.
//!
//! Rejected rows are recorded in `cutover.rejected` on the server written
//! to, in the same statement as the rows (so the record commits with
//! them): one row per rejected source key with its reason. A row that
//! passes later (an UPDATE) leaves it; a row that fails later is deleted
//! from the target table and recorded. The reconciliation reads it.

use crate::catalog::{ReplicaIdentity, Table, TableName};
use crate::sql::quote_ident;

mod server;
mod statements;

pub use server::{Rejected, ensure_rejected, rejected, resolve_all};

/// The schema and table where rejected rows are recorded.
pub const REJECTED: &str = "\"cutover\".\"rejected\"";

/// The reason recorded for a row the `where` filter leaves out.
pub const WHERE_REASON: &str = "where";

/// The column a row's reason is computed into (a name no source table is
/// expected to have: it holds a space).
const REASON: &str = "\"cutover reason\"";

/// One `[[map]]` as configured, before it is checked against the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// Its position in the config (`map[i]`), for errors.
    pub index: usize,
    /// The table read.
    pub source: TableName,
    /// The table written.
    pub target: TableName,
    /// `where`: rows for which it is not true are rejected.
    pub filter: Option<String>,
    /// `[map.reject]`: reason → SQL condition; a row for which one is true
    /// is rejected with that reason (the first that is, in name order).
    pub rejects: Vec<(String, String)>,
    /// `[map.columns]`: target column → a source column's name, or a SQL
    /// expression over the source row's columns.
    pub columns: Vec<(String, String)>,
    /// `[map.inverse]`: source column → a target column's name or an
    /// expression over the target row's columns, for the reverse
    /// direction. `None`: the table is one-way.
    pub inverse: Option<Vec<(String, String)>>,
}

impl MapSpec {
    /// The config key of one of this mapping's keys: `map[0].columns`.
    pub fn key(&self, field: &str) -> String {
        format!("map[{}].{field}", self.index)
    }

    /// The mapping the reverse direction applies: target to source through
    /// the `inverse` expressions, with no filter. `None` for a one-way
    /// table.
    pub fn inverted(&self) -> Option<MapSpec> {
        Some(MapSpec {
            index: self.index,
            source: self.target.clone(),
            target: self.source.clone(),
            filter: None,
            rejects: Vec::new(),
            columns: self.inverse.clone()?,
            inverse: None,
        })
    }
}

/// A source column as the mapped statements type it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    /// Its name.
    pub name: String,
    /// The type its values are cast to on the server written to: the
    /// source's type when that server has it, else `text`.
    pub type_name: String,
}

/// A target column and what feeds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedColumn {
    /// The target column.
    pub name: String,
    /// SQL over the source row's columns (a quoted column name for a
    /// rename).
    pub expr: String,
    /// Its type on the target (`format_type`).
    pub type_name: String,
    /// The source columns the expression names (found by its words: a
    /// column named inside a lookup counts too, which only errs on the
    /// safe side).
    pub uses: Vec<String>,
}

/// A mapping checked against both servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The config's `map[i]`.
    pub index: usize,
    /// The table read.
    pub source: TableName,
    /// The table written.
    pub target: TableName,
    /// The source's columns, in its order (generated ones left out).
    pub source_columns: Vec<SourceColumn>,
    /// The source columns that identify a row (its replica identity).
    pub source_key: Vec<String>,
    /// The target columns written, in the target's order.
    pub columns: Vec<MappedColumn>,
    /// The target's primary key (fed from `source_key` alone).
    pub target_key: Vec<String>,
    /// (reason, condition that rejects), in the order tried.
    pub rejects: Vec<(String, String)>,
    /// A `GENERATED ALWAYS` identity column is written.
    pub overriding: bool,
    /// The target is partitioned (no `ONLY`).
    pub target_partitioned: bool,
    /// The source columns any expression or condition names.
    pub uses: Vec<String>,
}

/// A mapping that cannot work, with the config key it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct MappingError {
    /// `map[0].columns.region`, say.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn problem(key: String, message: impl Into<String>) -> MappingError {
    MappingError {
        key,
        message: message.into(),
    }
}

/// The source columns named by the words of `expr`: identifiers outside
/// string literals and comments, unquoted ones folded to lower case as
/// PostgreSQL does, compared with `columns`.
pub fn referenced(expr: &str, columns: &[String]) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            // A string literal; '' inside is a quote.
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' {
            let mut word = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' {
                    if chars.get(i + 1) == Some(&'"') {
                        word.push('"');
                        i += 2;
                        continue;
                    }
                    break;
                }
                word.push(chars[i]);
                i += 1;
            }
            i += 1;
            words.push(word);
        } else if c.is_alphabetic() || c == '_' {
            let mut word = String::new();
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                word.extend(chars[i].to_lowercase());
                i += 1;
            }
            // The whole row read (`to_jsonb(src)`) uses every column.
            let qualifies = chars[i..].iter().find(|c| !c.is_whitespace()) == Some(&'.');
            if word == "src" && !qualifies {
                return columns.to_vec();
            }
            words.push(word);
        } else {
            i += 1;
        }
    }
    columns
        .iter()
        .filter(|c| words.contains(c))
        .cloned()
        .collect()
}

/// What feeds a column: a column of the row read, named exactly, is
/// quoted; anything else is SQL, in parentheses.
fn feed(value: &str, columns: &[String]) -> String {
    if columns.iter().any(|c| c == value) {
        quote_ident(value)
    } else {
        format!("({value})")
    }
}

/// Checks `spec` against the two servers' catalogs and builds its
/// statements' parts. `source_types` says which source type names the
/// server written to has (the others are read as `text`).
pub fn resolve(
    spec: &MapSpec,
    source: Option<&Table>,
    target: Option<&Table>,
    target_has_type: &dyn Fn(&str) -> bool,
) -> Result<Mapping, MappingError> {
    let source = source.ok_or_else(|| {
        problem(
            spec.key("source"),
            format!(
                "there is no table {} on the server read: name an existing table (schema.table)",
                spec.source
            ),
        )
    })?;
    let target = target.ok_or_else(|| {
        problem(
            spec.key("target"),
            format!(
                "there is no table {} on the server written: create it first",
                spec.target
            ),
        )
    })?;
    let source_columns: Vec<SourceColumn> = source
        .columns
        .iter()
        .filter(|c| !c.generated)
        .map(|c| SourceColumn {
            name: c.name.clone(),
            type_name: if target_has_type(&c.type_name) {
                c.type_name.clone()
            } else {
                "text".to_owned()
            },
        })
        .collect();
    let names: Vec<String> = source_columns.iter().map(|c| c.name.clone()).collect();
    let source_key = match &source.replica_identity {
        ReplicaIdentity::Full => source.primary_key.clone(),
        _ => source.identity_columns(),
    }
    .filter(|k| !k.is_empty())
    .ok_or_else(|| {
        problem(
            spec.key("source"),
            format!(
                "{} has no primary key or replica identity index: a mapped table's rows are found by their key; add a primary key on the source",
                spec.source
            ),
        )
    })?;
    for (column, _) in &spec.columns {
        if target.column(column).is_none() {
            let known: Vec<&str> = target.columns.iter().map(|c| c.name.as_str()).collect();
            return Err(problem(
                spec.key(&format!("columns.{column}")),
                format!(
                    "{} has no column {column:?}: its columns are {}",
                    spec.target,
                    known.join(", ")
                ),
            ));
        }
    }
    let mut columns = Vec::new();
    for column in &target.columns {
        let key = spec.key(&format!("columns.{}", column.name));
        let given = spec.columns.iter().find(|(c, _)| *c == column.name);
        let value = match given {
            Some((_, value)) => {
                if column.generated {
                    return Err(problem(
                        key,
                        "is a generated column on the target, computed there: take it out of [map.columns]",
                    ));
                }
                if value.trim().is_empty() {
                    return Err(problem(
                        key,
                        "is empty: give a source column's name or a SQL expression over the source row's columns",
                    ));
                }
                value.clone()
            }
            None if column.generated => continue,
            // Same name on both sides: fed as is.
            None if names.contains(&column.name) => column.name.clone(),
            None if column.has_default || !column.not_null => continue,
            None => {
                return Err(problem(
                    key,
                    format!(
                        "target column {:?} is NOT NULL, has no default and no source column of that name: feed it (\"{}\" = \"<source column or SQL expression>\" under [map.columns])",
                        column.name, column.name
                    ),
                ));
            }
        };
        let uses = referenced(&value, &names);
        columns.push(MappedColumn {
            name: column.name.clone(),
            expr: feed(&value, &names),
            type_name: column.type_name.clone(),
            uses,
        });
    }
    if columns.is_empty() {
        return Err(problem(
            spec.key("columns"),
            "feeds no target column: map at least the key",
        ));
    }
    let target_key = target.primary_key.clone().ok_or_else(|| {
        problem(
            spec.key("target"),
            format!(
                "{} has no primary key: a mapped table is written by key; add one on the target",
                spec.target
            ),
        )
    })?;
    let mut key_uses: Vec<&String> = Vec::new();
    for key in &target_key {
        let Some(column) = columns.iter().find(|c| c.name == *key) else {
            return Err(problem(
                spec.key(&format!("columns.{key}")),
                format!(
                    "{key} is in the target's primary key but nothing feeds it: map it from the source's key ({})",
                    source_key.join(", ")
                ),
            ));
        };
        let outside: Vec<&String> = column
            .uses
            .iter()
            .filter(|u| !source_key.contains(u))
            .collect();
        key_uses.extend(&column.uses);
        if column.uses.is_empty() || !outside.is_empty() {
            return Err(problem(
                spec.key(&format!("columns.{key}")),
                format!(
                    "feeds the target's key from {}: a key must come from the source's key ({}) alone, or deletes and updates cannot find the row",
                    if column.uses.is_empty() {
                        "no source column".to_owned()
                    } else {
                        outside
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    source_key.join(", ")
                ),
            ));
        }
    }
    let unused_key: Vec<&str> = source_key
        .iter()
        .filter(|k| !key_uses.contains(k))
        .map(|k| k.as_str())
        .collect();
    if !unused_key.is_empty() {
        return Err(problem(
            spec.key("columns"),
            format!(
                "the target's key ({}) is fed without the source's key column(s) {}: two source rows could become one target row, and a delete of one would delete the other; feed the target's key from every column of the source's key ({}), one to one",
                target_key.join(", "),
                unused_key.join(", "),
                source_key.join(", ")
            ),
        ));
    }
    let mut rejects = Vec::new();
    if let Some(filter) = &spec.filter {
        if filter.trim().is_empty() {
            return Err(problem(
                spec.key("where"),
                "is empty: give a condition or leave it out",
            ));
        }
        rejects.push((
            WHERE_REASON.to_owned(),
            format!("NOT coalesce(({filter}), false)"),
        ));
    }
    for (reason, condition) in &spec.rejects {
        if condition.trim().is_empty() {
            return Err(problem(
                spec.key(&format!("reject.{reason}")),
                "is empty: give the condition that rejects a row",
            ));
        }
        rejects.push((reason.clone(), format!("coalesce(({condition}), false)")));
    }
    let mut uses: Vec<String> = columns.iter().flat_map(|c| c.uses.clone()).collect();
    for (_, condition) in &rejects {
        uses.extend(referenced(condition, &names));
    }
    uses.sort();
    uses.dedup();
    let overriding = columns
        .iter()
        .any(|c| target.column(&c.name).is_some_and(|t| t.identity_always));
    Ok(Mapping {
        index: spec.index,
        source: spec.source.clone(),
        target: spec.target.clone(),
        source_columns,
        source_key,
        columns,
        target_key,
        rejects,
        overriding,
        target_partitioned: target.partitioned,
        uses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Column;

    fn column(name: &str, type_name: &str, not_null: bool) -> Column {
        Column {
            name: name.to_owned(),
            type_oid: 25,
            type_name: type_name.to_owned(),
            identity_always: false,
            not_null,
            has_default: false,
            generated: false,
        }
    }

    fn table(name: &str, columns: Vec<Column>, key: &[&str]) -> Table {
        Table {
            name: TableName::new("public", name),
            oid: 1,
            partitioned: false,
            unlogged: false,
            columns,
            primary_key: Some(key.iter().map(|k| (*k).to_owned()).collect()),
            primary_key_deferrable: false,
            deferrable_keys: Vec::new(),
            has_inheritance_children: false,
            replica_identity: ReplicaIdentity::Default,
            row_estimate: None,
            total_bytes: 0,
        }
    }

    fn beneficiaries() -> Table {
        table(
            "beneficiaries",
            vec![
                column("id", "bigint", true),
                column("beneficiary_name", "text", false),
                column("location_code", "text", false),
                column("legacy", "text", false),
            ],
            &["id"],
        )
    }

    fn people() -> Table {
        table(
            "people",
            vec![
                column("target_id", "bigint", true),
                column("full_name", "text", true),
                column("region", "text", false),
                column("note", "text", false),
            ],
            &["target_id"],
        )
    }

    fn spec() -> MapSpec {
        MapSpec {
            index: 0,
            source: TableName::new("public", "beneficiaries"),
            target: TableName::new("public", "people"),
            filter: Some("beneficiary_name IS NOT NULL".into()),
            rejects: Vec::new(),
            columns: vec![
                ("target_id".into(), "id".into()),
                ("full_name".into(), "beneficiary_name".into()),
                (
                    "region".into(),
                    "(SELECT region FROM location_map WHERE old_code = location_code)".into(),
                ),
            ],
            inverse: None,
        }
    }

    fn all_types(_: &str) -> bool {
        true
    }

    #[test]
    fn words_outside_literals_and_comments_name_columns() {
        let columns: Vec<String> = ["id", "Code", "name"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            referenced("upper(NAME) || 'id' -- id\n", &columns),
            vec!["name".to_owned()]
        );
        assert_eq!(
            referenced("\"Code\" || code", &columns),
            vec!["Code".to_owned()]
        );
        assert!(referenced("'it''s id'", &columns).is_empty());
    }

    #[test]
    fn a_mapping_feeds_renamed_and_computed_columns_and_leaves_out_the_rest() {
        let m = resolve(&spec(), Some(&beneficiaries()), Some(&people()), &all_types).unwrap();
        let fed: Vec<(&str, &str)> = m
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.expr.as_str()))
            .collect();
        assert_eq!(
            fed,
            vec![
                ("target_id", "\"id\""),
                ("full_name", "\"beneficiary_name\""),
                (
                    "region",
                    "((SELECT region FROM location_map WHERE old_code = location_code))"
                ),
            ]
        );
        assert_eq!(m.source_key, vec!["id".to_owned()]);
        assert_eq!(m.target_key, vec!["target_id".to_owned()]);
        assert_eq!(
            m.uses,
            vec![
                "beneficiary_name".to_owned(),
                "id".to_owned(),
                "location_code".to_owned()
            ]
        );
        let sql = m.write_sql("SELECT 1");
        assert!(sql.contains("NOT coalesce((beneficiary_name IS NOT NULL), false) THEN 'where'"));
        assert!(sql.contains(
            "ON CONFLICT (\"target_id\") DO UPDATE SET \"full_name\" = EXCLUDED.\"full_name\""
        ));
        assert!(sql.contains("INSERT INTO \"cutover\".\"rejected\""));
    }

    #[test]
    fn a_required_target_column_left_unfed_is_named_with_the_fix() {
        let mut s = spec();
        s.columns.retain(|(c, _)| c != "full_name");
        let err = resolve(&s, Some(&beneficiaries()), Some(&people()), &all_types).unwrap_err();
        assert_eq!(err.key, "map[0].columns.full_name");
        assert!(err.message.contains("NOT NULL"), "{err}");
    }

    #[test]
    fn the_whole_row_uses_every_column_and_a_key_must_come_from_the_whole_source_key() {
        let columns: Vec<String> = ["id", "name"].iter().map(|s| s.to_string()).collect();
        assert_eq!(referenced("to_jsonb(src) ->> 'name'", &columns), columns);
        assert_eq!(
            referenced("src.name || 'src'", &columns),
            vec!["name".to_owned()]
        );
        let mut source = beneficiaries();
        source.primary_key = Some(vec!["id".into(), "location_code".into()]);
        let err = resolve(&spec(), Some(&source), Some(&people()), &all_types).unwrap_err();
        assert_eq!(err.key, "map[0].columns");
        assert!(err.message.contains("location_code"), "{err}");
    }

    #[test]
    fn a_target_key_fed_from_outside_the_source_key_is_refused() {
        let mut s = spec();
        s.columns[0].1 = "hashtext(beneficiary_name)".into();
        let err = resolve(&s, Some(&beneficiaries()), Some(&people()), &all_types).unwrap_err();
        assert_eq!(err.key, "map[0].columns.target_id");
        assert!(err.message.contains("beneficiary_name"), "{err}");
    }

    #[test]
    fn unknown_columns_and_tables_are_named() {
        let mut s = spec();
        s.columns.push(("nope".into(), "id".into()));
        let err = resolve(&s, Some(&beneficiaries()), Some(&people()), &all_types).unwrap_err();
        assert_eq!(err.key, "map[0].columns.nope");
        let err = resolve(&spec(), Some(&beneficiaries()), None, &all_types).unwrap_err();
        assert_eq!(err.key, "map[0].target");
    }

    #[test]
    fn the_inverse_runs_the_other_way_without_a_filter() {
        let mut s = spec();
        s.inverse = Some(vec![("id".into(), "target_id".into())]);
        let back = s.inverted().unwrap();
        assert_eq!(back.source, s.target);
        assert_eq!(back.target, s.source);
        assert_eq!(back.filter, None);
        s.inverse = None;
        assert!(s.inverted().is_none());
    }
}
