//! The SQL of every statement the sink runs, from the target's description
//! of a table. Pure: identifiers are quoted, values are always parameters
//! (docs/architecture.md invariant 8).

use super::target::TargetTable;
use crate::catalog::TableName;
use crate::change::Relation;
use crate::sql::{idents, quote_ident};

pub(super) fn cast(target: &TargetTable, column: &str) -> String {
    target
        .types
        .get(column)
        .cloned()
        .unwrap_or_else(|| "text".to_owned())
}

/// `SELECT u.a::type_a, ... FROM unnest($1::text[], ...) AS u(a, ...)`.
pub(super) fn unnest_select(names: &[&str], target: &TargetTable, first_param: usize) -> String {
    unnest(names, target, first_param, false)
}

/// The rows of `text[]` parameters `$first_param...` typed as the target's
/// columns; with `named`, each column is named after its target column.
fn unnest(names: &[&str], target: &TargetTable, first_param: usize, named: bool) -> String {
    let casts: Vec<String> = names
        .iter()
        .map(|n| {
            let name = quote_ident(n);
            let cast = cast(target, n);
            if named {
                format!("u.{name}::{cast} AS {name}")
            } else {
                format!("u.{name}::{cast}")
            }
        })
        .collect();
    let params: Vec<String> = (0..names.len())
        .map(|i| format!("${}::text[]", first_param + i))
        .collect();
    format!(
        "SELECT {} FROM unnest({}) AS u({})",
        casts.join(", "),
        params.join(", "),
        idents(names)
    )
}

pub(super) fn upsert_sql(
    table: &TableName,
    names: &[&str],
    keys: &[&str],
    target: &TargetTable,
) -> String {
    let updates: Vec<String> = names
        .iter()
        .filter(|n| !keys.contains(n))
        .map(|n| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
        .collect();
    let action = if updates.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {} ({}){} {} ON CONFLICT ({}) {action}",
        table.quoted(),
        idents(names),
        target.overriding(names),
        unnest_select(names, target, 1),
        idents(keys)
    )
}

/// Whole rows written over the rows of their keys: a plain UPDATE, whose
/// rows the target lacks (it diverged, or a table of both servers) are
/// inserted by the same statement, as an upsert would. Cheaper than
/// `INSERT ... ON CONFLICT DO UPDATE` for rows that exist: no speculative
/// insertion and no row lock first, one WAL record less per row.
pub(super) fn update_sql(
    table: &TableName,
    names: &[&str],
    keys: &[&str],
    target: &TargetTable,
) -> String {
    let sets: Vec<String> = names
        .iter()
        .filter(|n| !keys.contains(n))
        .map(|n| format!("{0} = s.{0}", quote_ident(n)))
        .collect();
    let matches: Vec<String> = keys
        .iter()
        .map(|n| format!("t.{0} = s.{0}", quote_ident(n)))
        .collect();
    let found: Vec<String> = keys
        .iter()
        .map(|n| format!("u.{0} = s.{0}", quote_ident(n)))
        .collect();
    if sets.is_empty() {
        // Key columns only: nothing to update, only rows to make, which
        // the upsert does (ON CONFLICT DO NOTHING).
        return upsert_sql(table, names, keys, target);
    }
    format!(
        "WITH s AS ({rows}), \
              u AS (UPDATE {only} AS t SET {sets} FROM s WHERE {matches} RETURNING {returned}) \
         INSERT INTO {table} ({cols}){overriding} SELECT s.* FROM s WHERE NOT EXISTS (SELECT 1 FROM u WHERE {found})",
        rows = typed_rows(names, target),
        only = target.only(table),
        sets = sets.join(", "),
        matches = matches.join(" AND "),
        returned = idents(keys).qualified("t"),
        table = table.quoted(),
        cols = idents(names),
        overriding = target.overriding(names),
        found = found.join(" AND "),
    )
}

pub(super) fn insert_sql(table: &TableName, names: &[&str], target: &TargetTable) -> String {
    format!(
        "INSERT INTO {} ({}){} {}",
        table.quoted(),
        idents(names),
        target.overriding(names),
        unnest_select(names, target, 1)
    )
}

/// Replaces existing rows by key with partial new rows (some columns
/// unchanged TOAST), for tables whose UPDATE cannot write a `GENERATED
/// ALWAYS` identity column: each old row is deleted and inserted again
/// with the columns sent (`present`, key first as in `patch_sql`) and the
/// others taken from the deleted row. Counts the rows written.
pub(super) fn move_sql(
    table: &TableName,
    relation: &Relation,
    keys: &[&str],
    present: &[&str],
    target: &TargetTable,
) -> String {
    let mut names: Vec<&str> = keys.to_vec();
    names.extend_from_slice(present);
    let all: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    let values: Vec<String> = all
        .iter()
        .map(|n| {
            if names.contains(n) {
                format!("s.{}", quote_ident(n))
            } else {
                format!("d.{}", quote_ident(n))
            }
        })
        .collect();
    let joins: Vec<String> = keys
        .iter()
        .map(|n| format!("t.{0} = s.{0}", quote_ident(n)))
        .collect();
    let on: Vec<String> = keys
        .iter()
        .map(|n| format!("d.{0} = s.{0}", quote_ident(n)))
        .collect();
    format!(
        "WITH s AS ({}), \
              d AS (DELETE FROM {only} AS t USING s WHERE {} RETURNING t.*) \
         INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM s JOIN d ON {}",
        typed_rows(&names, target),
        joins.join(" AND "),
        idents(&all),
        values.join(", "),
        on.join(" AND "),
        table = table.quoted(),
        only = target.only(table),
    )
}

/// The one-row form of [`move_sql`] for the change-by-change path: the
/// row found by `match_cols` (as in `update_one_sql`) is deleted and
/// inserted again with the columns `set` ($1...) and the rest unchanged.
pub(super) fn move_one_sql(
    table: &TableName,
    relation: &Relation,
    match_cols: &[usize],
    set: &[usize],
    target: &TargetTable,
    keyed: bool,
) -> String {
    let values: Vec<String> = (0..relation.columns.len())
        .map(|i| {
            let name = &relation.columns[i].name;
            match set.iter().position(|s| *s == i) {
                Some(p) => format!("${}::text::{}", p + 1, cast(target, name)),
                None => format!("d.{}", quote_ident(name)),
            }
        })
        .collect();
    let cols: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    let condition = match_condition(relation, match_cols, target, set.len() + 1, keyed);
    format!(
        "WITH d AS (DELETE FROM {only} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {only} WHERE {condition} LIMIT 1) RETURNING *) \
         INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM d",
        idents(&cols),
        values.join(", "),
        table = table.quoted(),
        only = target.only(table),
    )
}

pub(super) fn delete_sql(table: &TableName, keys: &[&str], target: &TargetTable) -> String {
    format!(
        "DELETE FROM {} WHERE ({}) IN ({})",
        target.only(table),
        idents(keys),
        unnest_select(keys, target, 1)
    )
}

/// `SELECT u.a::type_a AS a, ... FROM unnest($1::text[], ...) AS u(a, ...)`:
/// the rows of a batch, typed as the target's columns and named after them.
pub(super) fn typed_rows(names: &[&str], target: &TargetTable) -> String {
    unnest(names, target, 1, true)
}

pub(super) fn patch_sql(
    table: &TableName,
    keys: &[&str],
    set: &[&str],
    target: &TargetTable,
) -> String {
    let mut names: Vec<&str> = keys.to_vec();
    names.extend_from_slice(set);
    let sets: Vec<String> = set
        .iter()
        .map(|n| format!("{0} = s.{0}", quote_ident(n)))
        .collect();
    let matches: Vec<String> = keys
        .iter()
        .map(|n| format!("t.{0} = s.{0}", quote_ident(n)))
        .collect();
    format!(
        "UPDATE {} AS t SET {} FROM ({}) AS s WHERE {}",
        target.only(table),
        sets.join(", "),
        typed_rows(&names, target),
        matches.join(" AND ")
    )
}

/// `UPDATE t SET a = $1::ta, ... WHERE <match>` for one row. Keyless tables
/// match one row whose every column's text equals the old row's (text
/// comparison works for every type, json included).
pub(super) fn update_one_sql(
    table: &TableName,
    relation: &Relation,
    match_cols: &[usize],
    set: &[usize],
    target: &TargetTable,
    keyed: bool,
) -> String {
    let sets: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(p, i)| {
            let name = &relation.columns[*i].name;
            format!(
                "{} = ${}::text::{}",
                quote_ident(name),
                p + 1,
                cast(target, name)
            )
        })
        .collect();
    let condition = match_condition(relation, match_cols, target, set.len() + 1, keyed);
    if keyed {
        format!(
            "UPDATE {} SET {} WHERE {condition}",
            target.only(table),
            sets.join(", ")
        )
    } else {
        // A ctid is unique only within one table: a partitioned target (or
        // a parent with children) needs the tableoid too.
        format!(
            "UPDATE {0} SET {1} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {0} WHERE {condition} LIMIT 1)",
            target.only(table),
            sets.join(", ")
        )
    }
}

pub(super) fn delete_one_sql(
    table: &TableName,
    relation: &Relation,
    match_cols: &[usize],
    target: &TargetTable,
    keyed: bool,
) -> String {
    let condition = match_condition(relation, match_cols, target, 1, keyed);
    if keyed {
        format!("DELETE FROM {} WHERE {condition}", target.only(table))
    } else {
        format!(
            "DELETE FROM {0} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {0} WHERE {condition} LIMIT 1)",
            target.only(table)
        )
    }
}

pub(super) fn match_condition(
    relation: &Relation,
    match_cols: &[usize],
    target: &TargetTable,
    first: usize,
    keyed: bool,
) -> String {
    let parts: Vec<String> = match_cols
        .iter()
        .enumerate()
        .map(|(p, i)| {
            let name = &relation.columns[*i].name;
            if keyed {
                format!(
                    "{} = ${}::text::{}",
                    quote_ident(name),
                    first + p,
                    cast(target, name)
                )
            } else {
                format!(
                    "{}::text IS NOT DISTINCT FROM ${}::text",
                    quote_ident(name),
                    first + p
                )
            }
        })
        .collect();
    if parts.is_empty() {
        "true".to_owned()
    } else {
        parts.join(" AND ")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::change::RelationColumn;

    fn relation(columns: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            name: TableName::new("app", "Orders"),
            replica_identity: 'd',
            columns: columns
                .iter()
                .map(|c| RelationColumn {
                    name: (*c).to_owned(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: *c == "id",
                })
                .collect(),
        })
    }

    fn target(relation: &Arc<Relation>, identity_always: &[&str]) -> TargetTable {
        TargetTable {
            relation: Arc::clone(relation),
            types: HashMap::from([
                ("id".to_owned(), "bigint".to_owned()),
                ("Note".to_owned(), "text".to_owned()),
                ("n".to_owned(), "integer".to_owned()),
            ]),
            primary_key: vec!["id".to_owned()],
            key_deferrable: false,
            identity_always: identity_always.iter().map(|c| (*c).to_owned()).collect(),
            deferrable_keys: Vec::new(),
            partitioned: false,
            narrower: Vec::new(),
        }
    }

    #[test]
    fn an_upsert_casts_each_column_and_updates_all_but_the_key() {
        let r = relation(&["id", "Note", "n"]);
        let t = target(&r, &[]);
        assert_eq!(
            upsert_sql(&r.name, &["id", "Note", "n"], &["id"], &t),
            "INSERT INTO \"app\".\"Orders\" (\"id\", \"Note\", \"n\") \
             SELECT u.\"id\"::bigint, u.\"Note\"::text, u.\"n\"::integer \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS u(\"id\", \"Note\", \"n\") \
             ON CONFLICT (\"id\") DO UPDATE SET \"Note\" = EXCLUDED.\"Note\", \"n\" = EXCLUDED.\"n\""
        );
    }

    #[test]
    fn an_update_of_whole_rows_updates_by_key_and_inserts_what_it_did_not_find() {
        let r = relation(&["id", "Note", "n"]);
        let t = target(&r, &[]);
        assert_eq!(
            update_sql(&r.name, &["id", "Note", "n"], &["id"], &t),
            "WITH s AS (SELECT u.\"id\"::bigint AS \"id\", u.\"Note\"::text AS \"Note\", u.\"n\"::integer AS \"n\" \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS u(\"id\", \"Note\", \"n\")), \
             u AS (UPDATE ONLY \"app\".\"Orders\" AS t SET \"Note\" = s.\"Note\", \"n\" = s.\"n\" FROM s \
             WHERE t.\"id\" = s.\"id\" RETURNING t.\"id\") \
             INSERT INTO \"app\".\"Orders\" (\"id\", \"Note\", \"n\") SELECT s.* FROM s \
             WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.\"id\" = s.\"id\")"
        );
    }

    #[test]
    fn an_upsert_of_key_columns_only_does_nothing_on_conflict() {
        let r = relation(&["id"]);
        let t = target(&r, &[]);
        assert!(
            upsert_sql(&r.name, &["id"], &["id"], &t).ends_with("ON CONFLICT (\"id\") DO NOTHING")
        );
    }

    #[test]
    fn an_insert_writing_an_always_identity_overrides_the_system_value() {
        let r = relation(&["id", "n"]);
        let t = target(&r, &["n"]);
        assert_eq!(
            insert_sql(&r.name, &["id", "n"], &t),
            "INSERT INTO \"app\".\"Orders\" (\"id\", \"n\") OVERRIDING SYSTEM VALUE \
             SELECT u.\"id\"::bigint, u.\"n\"::integer FROM unnest($1::text[], $2::text[]) AS u(\"id\", \"n\")"
        );
        assert!(!insert_sql(&r.name, &["id"], &t).contains("OVERRIDING"));
    }

    #[test]
    fn deletes_and_patches_touch_only_the_table_itself() {
        let r = relation(&["id", "Note"]);
        let t = target(&r, &[]);
        assert_eq!(
            delete_sql(&r.name, &["id"], &t),
            "DELETE FROM ONLY \"app\".\"Orders\" WHERE (\"id\") IN \
             (SELECT u.\"id\"::bigint FROM unnest($1::text[]) AS u(\"id\"))"
        );
        assert_eq!(
            patch_sql(&r.name, &["id"], &["Note"], &t),
            "UPDATE ONLY \"app\".\"Orders\" AS t SET \"Note\" = s.\"Note\" FROM \
             (SELECT u.\"id\"::bigint AS \"id\", u.\"Note\"::text AS \"Note\" \
             FROM unnest($1::text[], $2::text[]) AS u(\"id\", \"Note\")) AS s WHERE t.\"id\" = s.\"id\""
        );
    }

    #[test]
    fn one_row_statements_number_the_set_values_before_the_match() {
        let r = relation(&["id", "Note", "n"]);
        let t = target(&r, &[]);
        assert_eq!(
            update_one_sql(&r.name, &r, &[0], &[1, 2], &t, true),
            "UPDATE ONLY \"app\".\"Orders\" SET \"Note\" = $1::text::text, \"n\" = $2::text::integer \
             WHERE \"id\" = $3::text::bigint"
        );
        // A keyless row is found by every column's text, one row at most.
        assert_eq!(
            delete_one_sql(&r.name, &r, &[0, 1], &t, false),
            "DELETE FROM ONLY \"app\".\"Orders\" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM \
             ONLY \"app\".\"Orders\" WHERE \"id\"::text IS NOT DISTINCT FROM $1::text AND \
             \"Note\"::text IS NOT DISTINCT FROM $2::text LIMIT 1)"
        );
    }
}
