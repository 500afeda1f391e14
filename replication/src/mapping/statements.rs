//! The SQL of a mapping's statements (pure): the rows read typed as the
//! source's columns, each with its reason, then written, patched, deleted
//! or compared through the mapping. Identifiers are quoted; the mapping's
//! expressions are the operator's SQL, checked by the target first.

use super::{Mapping, REASON, REJECTED, referenced};

/// The CTE of the rows read, each with its reason (a name no lookup table
/// of an operator's is expected to have).
const ROWS: &str = "\"cutover rows\"";

/// The CTE of the target rows a patch updated.
const UPDATED: &str = "\"cutover updated\"";
use crate::sql::{Literal, idents, quote_ident};

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
    /// as `types` (the source's types as its stream describes them now,
    /// so that a cast never cuts a value short).
    pub fn typed_rows(&self, names: &[&str], types: &[&str], first: usize) -> String {
        let casts: Vec<String> = names
            .iter()
            .zip(types)
            .map(|(n, t)| {
                let q = quote_ident(n);
                format!("u.{q}::{t} AS {q}")
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

    /// The target key's values computed from a row of the source, never
    /// cast: compared with the target's key by PostgreSQL's operators, so
    /// that no value is cut short to match one it is not.
    fn key_exprs(&self) -> Vec<String> {
        self.target_key
            .iter()
            .filter_map(|k| self.columns.iter().find(|c| c.name == *k))
            .map(|c| format!("({})", c.expr))
            .collect()
    }

    /// `SELECT (expr) AS "column", ...`: the target form of the rows read
    /// (`src`), converted to the target's types by the INSERT or UPDATE
    /// that writes them (assignment casts: a value too long for its
    /// column is refused, never cut).
    fn mapped_select(&self) -> String {
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("({}) AS {}", c.expr, quote_ident(&c.name)))
            .collect();
        values.join(", ")
    }

    /// The rows of `rows` (typed source rows), each with its reason, in a
    /// CTE computed once ([`ROWS`]).
    fn with_reasons(&self, rows: &str) -> String {
        format!(
            "{ROWS} AS MATERIALIZED (SELECT src.*, {} AS {REASON} FROM ({rows}) AS src)",
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
            "WITH {} INSERT INTO {} ({}){} SELECT {} FROM {ROWS} AS src WHERE {REASON} IS NULL ON CONFLICT ({}) {action}",
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
            "{UPDATED} AS (UPDATE {} AS t SET {sets} FROM (SELECT {} FROM {ROWS} AS src WHERE {REASON} IS NULL) AS n \
             WHERE ({keys}) = ({}) RETURNING {keys})",
            self.target_rows(),
            self.mapped_select(),
            idents(&self.target_key).qualified("n")
        ));
        // NOT EXISTS, not NOT IN: a key computed as NULL is reported, not
        // lost in a NULL comparison.
        format!(
            "WITH {} SELECT 1 FROM {ROWS} AS src WHERE {REASON} IS NULL \
             AND NOT EXISTS (SELECT 1 FROM {UPDATED} AS t WHERE ({keys}) IS NOT DISTINCT FROM ({}))",
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
                "\"cutover recorded\" AS (INSERT INTO {REJECTED} (map, key, reason) SELECT {map}, {key}, {REASON} FROM {ROWS} WHERE {REASON} IS NOT NULL \
                 ON CONFLICT (map, key) DO UPDATE SET reason = EXCLUDED.reason, at = now())",
                key = self.key_array()
            ),
            format!(
                "\"cutover forgotten\" AS (DELETE FROM {REJECTED} WHERE map = {map} AND key IN (SELECT {key} FROM {ROWS} WHERE {REASON} IS NULL))",
                key = self.key_array()
            ),
            format!(
                "\"cutover removed\" AS (DELETE FROM {} WHERE ({}) IN (SELECT {} FROM {ROWS} AS src WHERE {REASON} IS NOT NULL))",
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
                ", \"cutover forgotten\" AS (DELETE FROM {REJECTED} WHERE map = {} AND key IN (SELECT {} FROM {ROWS}))",
                Literal(&self.map_name()),
                self.key_array()
            )
        };
        format!(
            "WITH {ROWS} AS ({rows}){forget} DELETE FROM {} WHERE ({}) IN (SELECT {} FROM {ROWS} AS src)",
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

    /// A temporary table of the mapped columns, typed as the target's
    /// (their type modifiers too, nothing else), and the rows the target
    /// must hold in it: the passing rows of `x` (a
    /// [`Mapping::reasons_table_sql`] table) written through the mapping
    /// with the same conversions as the real writes.
    pub fn expected_sql(&self, x: &str, expected: &str) -> String {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        format!(
            "CREATE TEMPORARY TABLE {e} ON COMMIT DROP AS SELECT {cols} FROM {target} WITH NO DATA; \
             INSERT INTO {e} ({cols}) SELECT {mapped} FROM {x} AS src WHERE {REASON} IS NULL",
            e = quote_ident(expected),
            target = self.target_rows(),
            cols = idents(&names),
            mapped = self.mapped_select(),
            x = quote_ident(x),
        )
    }

    /// The target rows that differ from those of `expected` (see
    /// [`Mapping::expected_sql`]; every column the mapping writes,
    /// compared as text), joined on the target's key: `kind` (`missing`,
    /// `extra`, `changed`), the key as `(col=value, ...)`, and for
    /// `changed` the columns that differ.
    pub fn diff_sql(&self, expected: &str) -> String {
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
               FROM (SELECT {cols} FROM {expected}) AS m \
               FULL JOIN (SELECT {cols} FROM {target}) AS t ON {on} \
              WHERE m.{first} IS NULL OR t.{first} IS NULL OR ({m_row}) IS DISTINCT FROM ({t_row})",
            shown = shown.join(", "),
            differs = differs.join(", "),
            expected = quote_ident(expected),
            cols = idents(&names),
            target = self.target_rows(),
            on = on.join(" AND "),
            m_row = text_row("m", &names),
            t_row = text_row("t", &names),
        )
    }

    /// The statements the server written to must accept for the mapping
    /// to work, over rows of `stage` (a [`Mapping::stage_sql`] table):
    /// the write, with every expression and condition converted to the
    /// target's column types as the stream's writes do, and the delete by
    /// key. Prepared, never run.
    pub fn probe_sql(&self, stage: &str) -> Vec<String> {
        let rows = format!("SELECT * FROM {}", quote_ident(stage));
        let keys: Vec<String> = self
            .source_key
            .iter()
            .map(|k| format!("{} AS {}", quote_ident(k), quote_ident(k)))
            .collect();
        let key_rows = format!("SELECT {} FROM {}", keys.join(", "), quote_ident(stage));
        vec![self.write_sql(&rows), self.delete_sql(&key_rows)]
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
