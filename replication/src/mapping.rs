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

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::catalog::{ReplicaIdentity, Table, TableName};
use crate::sql::{Literal, idents, quote_ident};

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

impl Mapping {
    /// The type a source column's values are cast to (`text` for one the
    /// mapping does not know: added on the source since).
    pub fn source_type(&self, column: &str) -> &str {
        self.source_columns
            .iter()
            .find(|c| c.name == column)
            .map_or("text", |c| c.type_name.as_str())
    }

    /// The source column names.
    pub fn source_names(&self) -> Vec<&str> {
        self.source_columns
            .iter()
            .map(|c| c.name.as_str())
            .collect()
    }

    /// How `cutover.rejected` names this mapping: the source table.
    pub fn map_name(&self) -> String {
        self.source.to_string()
    }

    fn target_rows(&self) -> String {
        crate::catalog::own_rows(&self.target, self.target_partitioned)
    }

    /// `SELECT u."a"::type AS "a", ... FROM unnest($first::text[], ...)
    /// AS u("a", ...)`: rows of `names` sent as `text[]` columns, typed
    /// as the source's.
    pub fn typed_rows(&self, names: &[&str], first: usize) -> String {
        let casts: Vec<String> = names
            .iter()
            .map(|n| {
                let q = quote_ident(n);
                format!("u.{q}::{} AS {q}", self.source_type(n))
            })
            .collect();
        let params: Vec<String> = (0..names.len())
            .map(|i| format!("${}::text[]", first + i))
            .collect();
        format!(
            "SELECT {} FROM unnest({}) AS u({})",
            casts.join(", "),
            params.join(", "),
            idents(names)
        )
    }

    /// A temporary table of the source's columns, typed as the source's,
    /// dropped at commit: where a copy or a verify loads source rows.
    pub fn stage_sql(&self, stage: &str) -> String {
        let columns: Vec<String> = self
            .source_columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
            .collect();
        format!(
            "CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP",
            quote_ident(stage),
            columns.join(", ")
        )
    }

    /// The reason a row is rejected, or NULL.
    fn reason(&self) -> String {
        if self.rejects.is_empty() {
            return "NULL::text".to_owned();
        }
        let whens: Vec<String> = self
            .rejects
            .iter()
            .map(|(reason, condition)| format!("WHEN {condition} THEN {}", Literal(reason)))
            .collect();
        format!("CASE {} END", whens.join(" "))
    }

    /// The source key's text form as recorded in `cutover.rejected`.
    fn key_array(&self) -> String {
        let parts: Vec<String> = self
            .source_key
            .iter()
            .map(|k| format!("{}::text", quote_ident(k)))
            .collect();
        format!("ARRAY[{}]", parts.join(", "))
    }

    fn key_exprs(&self) -> Vec<String> {
        self.target_key
            .iter()
            .filter_map(|k| self.columns.iter().find(|c| c.name == *k))
            .map(|c| format!("({})::{}", c.expr, c.type_name))
            .collect()
    }

    /// `SELECT (expr)::type AS "column", ...`: the target form of the rows
    /// in `x` (which holds the source columns and their reason).
    fn mapped_select(&self) -> String {
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("({})::{} AS {}", c.expr, c.type_name, quote_ident(&c.name)))
            .collect();
        values.join(", ")
    }

    /// The rows of `rows` (typed source rows), each with its reason, in a
    /// CTE named `x` computed once.
    fn with_reasons(&self, rows: &str) -> String {
        format!(
            "x AS MATERIALIZED (SELECT src.*, {} AS {REASON} FROM ({rows}) AS src)",
            self.reason()
        )
    }

    /// One statement that writes the rows of `rows` (whole source rows,
    /// typed) through the mapping: the passing ones upserted on the
    /// target's key, the rejected ones deleted from the target and
    /// recorded with their reason, and earlier records of the passing ones
    /// removed.
    pub fn write_sql(&self, rows: &str) -> String {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let updates: Vec<String> = names
            .iter()
            .filter(|n| !self.target_key.iter().any(|k| k == *n))
            .map(|n| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
            .collect();
        let action = if updates.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        let mut ctes = vec![self.with_reasons(rows)];
        ctes.extend(self.reject_ctes());
        format!(
            "WITH {} INSERT INTO {} ({}){} SELECT {} FROM x AS src WHERE {REASON} IS NULL ON CONFLICT ({}) {action}",
            ctes.join(", "),
            self.target.quoted(),
            idents(&names),
            if self.overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            self.mapped_select(),
            idents(&self.target_key),
        )
    }

    /// Whether a row lacking the values of `missing` (unchanged TOAST the
    /// source did not send) can still be written: no condition and no key
    /// needs them, and each target column that does is a plain copy of
    /// one of them (left as it is on the target).
    pub fn patchable(&self, missing: &[&str]) -> bool {
        let touches = |uses: &[String]| uses.iter().any(|u| missing.contains(&u.as_str()));
        let names: Vec<String> = missing.iter().map(|m| (*m).to_owned()).collect();
        self.rejects
            .iter()
            .all(|(_, condition)| referenced(condition, &names).is_empty())
            && self.columns.iter().all(|c| {
                if !touches(&c.uses) {
                    return true;
                }
                !self.target_key.contains(&c.name)
                    && c.uses.len() == 1
                    && c.expr == quote_ident(&c.uses[0])
            })
    }

    /// One statement for rows that lack the values of `missing` (see
    /// [`Mapping::patchable`]): as [`Mapping::write_sql`], except that
    /// passing rows update the target row in place, leaving the columns
    /// fed by `missing` as they are. It returns one row per passing row
    /// the target lacks (one rejected until now, which cannot be built
    /// without the missing values): the caller expects none.
    pub fn patch_sql(&self, rows: &str, missing: &[&str]) -> String {
        let keys = idents(&self.target_key).qualified("t").to_string();
        // The new values are computed apart (`n`), so that an expression's
        // column names cannot meet the target table's in the UPDATE.
        let sets: Vec<String> = self
            .columns
            .iter()
            .filter(|c| !self.target_key.contains(&c.name))
            .filter(|c| !c.uses.iter().any(|u| missing.contains(&u.as_str())))
            .map(|c| format!("{0} = n.{0}", quote_ident(&c.name)))
            .collect();
        let sets = if sets.is_empty() {
            let first = quote_ident(&self.target_key[0]);
            format!("{first} = t.{first}")
        } else {
            sets.join(", ")
        };
        let mut ctes = vec![self.with_reasons(rows)];
        ctes.extend(self.reject_ctes());
        ctes.push(format!(
            "u AS (UPDATE {} AS t SET {sets} FROM (SELECT {} FROM x AS src WHERE {REASON} IS NULL) AS n \
             WHERE ({keys}) = ({}) RETURNING {keys})",
            self.target_rows(),
            self.mapped_select(),
            idents(&self.target_key).qualified("n")
        ));
        format!(
            "WITH {} SELECT 1 FROM x AS src WHERE {REASON} IS NULL AND ({}) NOT IN (SELECT * FROM u)",
            ctes.join(", "),
            self.key_exprs().join(", ")
        )
    }

    /// The CTEs that record rejected rows, forget the records of passing
    /// ones and delete rejected rows from the target (none when nothing
    /// can be rejected).
    fn reject_ctes(&self) -> Vec<String> {
        if self.rejects.is_empty() {
            return Vec::new();
        }
        let map = Literal(&self.map_name()).to_string();
        vec![
            format!(
                "r AS (INSERT INTO {REJECTED} (map, key, reason) SELECT {map}, {key}, {REASON} FROM x WHERE {REASON} IS NOT NULL \
                 ON CONFLICT (map, key) DO UPDATE SET reason = EXCLUDED.reason, at = now())",
                key = self.key_array()
            ),
            format!(
                "a AS (DELETE FROM {REJECTED} WHERE map = {map} AND key IN (SELECT {key} FROM x WHERE {REASON} IS NULL))",
                key = self.key_array()
            ),
            format!(
                "d AS (DELETE FROM {} WHERE ({}) IN (SELECT {} FROM x AS src WHERE {REASON} IS NOT NULL))",
                self.target_rows(),
                idents(&self.target_key),
                self.key_exprs().join(", ")
            ),
        ]
    }

    /// One statement that deletes the target rows of the source keys in
    /// `rows` (typed rows of the source key columns), and their records
    /// of rejection.
    pub fn delete_sql(&self, rows: &str) -> String {
        let forget = if self.rejects.is_empty() {
            String::new()
        } else {
            format!(
                ", a AS (DELETE FROM {REJECTED} WHERE map = {} AND key IN (SELECT {} FROM s))",
                Literal(&self.map_name()),
                self.key_array()
            )
        };
        format!(
            "WITH s AS ({rows}){forget} DELETE FROM {} WHERE ({}) IN (SELECT {} FROM s AS src)",
            self.target_rows(),
            idents(&self.target_key),
            self.key_exprs().join(", ")
        )
    }

    /// The statements that empty the target table and its records of
    /// rejection (a TRUNCATE of the source table).
    pub fn truncate_sql(&self, restart_identity: bool) -> String {
        format!(
            "TRUNCATE {}{}{}",
            self.target_rows(),
            if restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            self.forget_all_sql()
                .map(|f| format!("; {f}"))
                .unwrap_or_default()
        )
    }

    /// Deletes every record of rejection of this mapping, when it can
    /// reject.
    pub fn forget_all_sql(&self) -> Option<String> {
        (!self.rejects.is_empty()).then(|| {
            format!(
                "DELETE FROM {REJECTED} WHERE map = {}",
                Literal(&self.map_name())
            )
        })
    }

    /// `CREATE TEMPORARY TABLE x ... AS`: the rows of `stage` (a
    /// [`Mapping::stage_sql`] table) each with its reason, computed once.
    pub fn reasons_table_sql(&self, stage: &str, x: &str) -> String {
        format!(
            "CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT src.*, {} AS {REASON} FROM {} AS src",
            quote_ident(x),
            self.reason(),
            quote_ident(stage)
        )
    }

    /// `SELECT reason, count(*)` of the rejected rows of `x` (a
    /// [`Mapping::reasons_table_sql`] table).
    pub fn rejected_in_sql(&self, x: &str) -> String {
        format!(
            "SELECT {REASON}, count(*) FROM {} WHERE {REASON} IS NOT NULL GROUP BY 1 ORDER BY 1",
            quote_ident(x)
        )
    }

    /// Up to `$1` rejected rows of `x`: the key as `(a, b)` and the reason.
    pub fn rejected_samples_sql(&self, x: &str) -> String {
        format!(
            "SELECT '(' || array_to_string({key}, ', ', 'NULL') || ')', {REASON} FROM {x} \
              WHERE {REASON} IS NOT NULL ORDER BY {key} LIMIT $1",
            key = self.key_array(),
            x = quote_ident(x),
        )
    }

    /// The rows of `x` whose record in `cutover.rejected` disagrees (a
    /// rejected row not recorded, or with another reason, or a record of
    /// a row that passes or is gone): how many.
    pub fn records_off_sql(&self, x: &str) -> String {
        format!(
            "SELECT count(*) FROM (SELECT {key} AS key, {REASON} AS reason FROM {x} WHERE {REASON} IS NOT NULL) a \
             FULL JOIN (SELECT key, reason FROM {REJECTED} WHERE map = {map}) b ON a.key = b.key \
             WHERE a.key IS NULL OR b.key IS NULL OR a.reason IS DISTINCT FROM b.reason",
            key = self.key_array(),
            x = quote_ident(x),
            map = Literal(&self.map_name()),
        )
    }

    /// The target rows that differ from the passing rows of `x` as mapped
    /// (every column the mapping writes, compared as text), joined on the
    /// target's key: `kind` (`missing`, `extra`, `changed`), the key as
    /// `(col=value, ...)`, and for `changed` the columns that differ.
    pub fn diff_sql(&self, x: &str) -> String {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let on: Vec<String> = self
            .target_key
            .iter()
            .map(|k| format!("m.{0} = t.{0}", quote_ident(k)))
            .collect();
        let first = quote_ident(&self.target_key[0]);
        let shown: Vec<String> = self
            .target_key
            .iter()
            .map(|k| {
                format!(
                    "{} || coalesce(coalesce(m.{q}, t.{q})::text, 'NULL')",
                    Literal(&format!("{k}=")),
                    q = quote_ident(k)
                )
            })
            .collect();
        let differs: Vec<String> = names
            .iter()
            .map(|n| {
                format!(
                    "CASE WHEN m.{q}::text IS DISTINCT FROM t.{q}::text THEN {} END",
                    Literal(n),
                    q = quote_ident(n)
                )
            })
            .collect();
        format!(
            "SELECT CASE WHEN t.{first} IS NULL THEN 'missing' WHEN m.{first} IS NULL THEN 'extra' ELSE 'changed' END AS kind, \
                    '(' || concat_ws(', ', {shown}) || ')' AS key, \
                    array_remove(ARRAY[{differs}]::text[], NULL) AS columns \
               FROM (SELECT {mapped} FROM {x} AS src WHERE {REASON} IS NULL) AS m \
               FULL JOIN (SELECT {cols} FROM {target}) AS t ON {on} \
              WHERE m.{first} IS NULL OR t.{first} IS NULL OR ({m_row}) IS DISTINCT FROM ({t_row})",
            shown = shown.join(", "),
            differs = differs.join(", "),
            mapped = self.mapped_select(),
            x = quote_ident(x),
            cols = idents(&names),
            target = self.target_rows(),
            on = on.join(" AND "),
            m_row = text_row("m", &names),
            t_row = text_row("t", &names),
        )
    }

    /// A statement the server written to must accept for the mapping to
    /// work: every expression and condition over a row of `stage` (a
    /// [`Mapping::stage_sql`] table), cast to the target's types.
    pub fn probe_sql(&self, stage: &str) -> String {
        format!(
            "SELECT {}, {} FROM {} AS src",
            self.mapped_select(),
            self.reason(),
            quote_ident(stage)
        )
    }

    /// The columns a source row of `present` columns lacks for this
    /// mapping: those its expressions and conditions need.
    pub fn missing(&self, present: impl Fn(&str) -> bool) -> Vec<&str> {
        self.uses
            .iter()
            .filter(|u| !present(u))
            .map(|u| u.as_str())
            .collect()
    }
}

/// `ROW(alias."a"::text, ...)`.
fn text_row(alias: &str, names: &[&str]) -> String {
    let parts: Vec<String> = names
        .iter()
        .map(|n| format!("{alias}.{}::text", quote_ident(n)))
        .collect();
    format!("ROW({})", parts.join(", "))
}

/// Creates `cutover.rejected` on the server written to, if missing.
pub async fn ensure_rejected(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS cutover;
             CREATE TABLE IF NOT EXISTS {REJECTED} (
                 map text NOT NULL,
                 key text[] NOT NULL,
                 reason text NOT NULL,
                 at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (map, key));"
        ))
        .await
}

/// Rejected rows of a mapping on the server written to: how many by
/// reason, and up to `samples` of their keys (oldest first).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    /// reason → rows.
    pub by_reason: Vec<(String, i64)>,
    /// (key, reason), the key as `(a, b)`.
    pub samples: Vec<(String, String)>,
}

impl Rejected {
    /// Rows rejected in all.
    pub fn total(&self) -> i64 {
        self.by_reason.iter().map(|(_, n)| n).sum()
    }
}

/// Reads what `mapping` rejected so far from `client` (the server written
/// to), as its current transaction sees it.
pub async fn rejected(
    client: &Client,
    mapping: &Mapping,
    samples: i64,
) -> Result<Rejected, tokio_postgres::Error> {
    if mapping.rejects.is_empty() {
        return Ok(Rejected::default());
    }
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&REJECTED])
        .await?
        .get(0);
    if !exists {
        return Ok(Rejected::default());
    }
    let map = mapping.map_name();
    let by_reason = client
        .query(
            &format!(
                "SELECT reason, count(*) FROM {REJECTED} WHERE map = $1 GROUP BY reason ORDER BY reason"
            ),
            &[&map],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let samples = client
        .query(
            &format!(
                "SELECT '(' || array_to_string(key, ', ', 'NULL') || ')', reason FROM {REJECTED}
                  WHERE map = $1 ORDER BY at, key LIMIT $2"
            ),
            &[&map, &samples],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Rejected { by_reason, samples })
}

/// Resolves every spec against the two servers (`source` read, `target`
/// written): the catalogs, which source types the target has, and a
/// probe of every expression on the target.
pub async fn resolve_all(
    specs: &[MapSpec],
    source: &Client,
    target: &Client,
) -> Result<Result<Vec<Mapping>, MappingError>, tokio_postgres::Error> {
    if specs.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let sources: HashMap<TableName, Table> = crate::catalog::tables(source)
        .await?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let targets: HashMap<TableName, Table> = crate::catalog::tables(target)
        .await?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut type_names: Vec<String> = specs
        .iter()
        .filter_map(|s| sources.get(&s.source))
        .flat_map(|t| t.columns.iter().map(|c| c.type_name.clone()))
        .collect();
    type_names.sort();
    type_names.dedup();
    let known: Vec<String> = target
        .query(
            "SELECT n FROM unnest($1::text[]) AS n WHERE to_regtype(n) IS NOT NULL",
            &[&type_names],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let has_type = |name: &str| known.iter().any(|k| k == name);
    let mut mappings = Vec::new();
    for spec in specs {
        let mapping = match resolve(
            spec,
            sources.get(&spec.source),
            targets.get(&spec.target),
            &has_type,
        ) {
            Ok(m) => m,
            Err(err) => return Ok(Err(err)),
        };
        if let Err(err) = probe(target, &mapping).await? {
            return Ok(Err(err));
        }
        mappings.push(mapping);
    }
    Ok(Ok(mappings))
}

/// Has the target parse and plan every expression of `mapping` over a
/// typed, empty row set, in a transaction rolled back.
async fn probe(
    target: &Client,
    mapping: &Mapping,
) -> Result<Result<(), MappingError>, tokio_postgres::Error> {
    const STAGE: &str = "cutover_probe";
    target.batch_execute("BEGIN").await?;
    let result = async {
        target.batch_execute(&mapping.stage_sql(STAGE)).await?;
        target.prepare(&mapping.probe_sql(STAGE)).await.map(|_| ())
    }
    .await;
    target.batch_execute("ROLLBACK").await?;
    match result {
        Ok(()) => Ok(Ok(())),
        Err(err) => match err.as_db_error() {
            Some(db) => Ok(Err(problem(
                format!("map[{}]", mapping.index),
                format!(
                    "the server written to refuses its expressions ({} -> {}): {}{}",
                    mapping.source,
                    mapping.target,
                    db.message(),
                    db.hint().map(|h| format!(" ({h})")).unwrap_or_default()
                ),
            ))),
            None => Err(err),
        },
    }
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
