//! What a server holds: the tables in scope with their columns, keys and
//! replica identity, and the sequences beside them.
//!
//! The scope of a migration is a list of `schema.table` glob patterns to
//! include and to exclude ([`Scope`]). Partitions are never listed on their
//! own: a partitioned table is in scope through its root, which is how the
//! publication will publish it (`publish_via_partition_root`).

use std::collections::HashMap;
use std::fmt;

use tokio_postgres::Client;

use crate::sql::{quote_ident, quote_literal};

/// A schema-qualified relation name.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TableName {
    /// The schema (namespace).
    pub schema: String,
    /// The relation's name within the schema.
    pub name: String,
}

impl TableName {
    /// A name from its two parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `"schema"."name"`, ready for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A `schema.table` pattern with `*` (any run of characters) and `?` (one
/// character) wildcards. Double quotes keep dots and wildcards literal:
/// `"odd.schema".*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePattern {
    text: String,
    schema: Vec<GlobToken>,
    name: Vec<GlobToken>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum GlobToken {
    Literal(char),
    AnyRun,
    AnyOne,
}

/// Why a table pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(String);

impl TablePattern {
    /// Parses `schema.table`.
    pub fn parse(text: &str) -> Result<TablePattern, PatternError> {
        let mut parts: Vec<Vec<GlobToken>> = vec![Vec::new()];
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let current = parts.last_mut().expect("parts is never empty");
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    current.push(GlobToken::Literal('"'));
                }
                '"' => quoted = !quoted,
                '.' if !quoted => parts.push(Vec::new()),
                '*' if !quoted => current.push(GlobToken::AnyRun),
                '?' if !quoted => current.push(GlobToken::AnyOne),
                c => current.push(GlobToken::Literal(c)),
            }
        }
        if quoted {
            return Err(PatternError(format!(
                "{text:?} has an unclosed double quote"
            )));
        }
        match <[Vec<GlobToken>; 2]>::try_from(parts) {
            Ok([schema, name]) if !schema.is_empty() && !name.is_empty() => Ok(TablePattern {
                text: text.to_owned(),
                schema,
                name,
            }),
            _ => Err(PatternError(format!(
                "{text:?} is not a schema.table pattern: write it like public.orders, public.* or sales.order_*"
            ))),
        }
    }

    /// A pattern that matches `table` alone.
    pub fn exact(table: &TableName) -> TablePattern {
        TablePattern {
            text: format!(
                "{}.{}",
                quote_ident(&table.schema),
                quote_ident(&table.name)
            ),
            schema: table.schema.chars().map(GlobToken::Literal).collect(),
            name: table.name.chars().map(GlobToken::Literal).collect(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a table's name matches.
    pub fn matches(&self, table: &TableName) -> bool {
        glob_matches(&self.schema, &table.schema) && glob_matches(&self.name, &table.name)
    }

    /// The pattern as two anchored POSIX regular expressions (schema,
    /// name), for SQL that must decide scope on the server (`~`).
    pub fn regexes(&self) -> (String, String) {
        (glob_regex(&self.schema), glob_regex(&self.name))
    }
}

fn glob_regex(tokens: &[GlobToken]) -> String {
    let mut re = String::from("^");
    for token in tokens {
        match token {
            GlobToken::AnyRun => re.push_str(".*"),
            GlobToken::AnyOne => re.push('.'),
            GlobToken::Literal(c) => {
                if c.is_alphanumeric() || *c == '_' {
                    re.push(*c);
                } else {
                    re.push('\\');
                    re.push(*c);
                }
            }
        }
    }
    re.push('$');
    re
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn glob_matches(pattern: &[GlobToken], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    // Classic two-pointer wildcard matching with backtracking to the last '*'.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(GlobToken::AnyOne) => {
                p += 1;
                t += 1;
            }
            Some(GlobToken::Literal(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            Some(GlobToken::AnyRun) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|tok| *tok == GlobToken::AnyRun)
}

/// The tables a migration covers: included by any pattern of `include`
/// and by none of `exclude`.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    include: Vec<TablePattern>,
    exclude: Vec<TablePattern>,
}

impl Scope {
    /// A SQL condition over the text expressions `schema` and `name` that
    /// is true exactly for the tables in scope (regular expressions built
    /// from the patterns, quoted as literals).
    pub fn sql_condition(&self, schema: &str, name: &str) -> String {
        let any = |patterns: &[TablePattern]| -> String {
            if patterns.is_empty() {
                return "false".into();
            }
            patterns
                .iter()
                .map(|p| {
                    let (s, n) = p.regexes();
                    format!(
                        "({schema} ~ {} AND {name} ~ {})",
                        quote_literal(&s),
                        quote_literal(&n)
                    )
                })
                .collect::<Vec<_>>()
                .join(" OR ")
        };
        format!(
            "(({}) AND NOT ({}))",
            any(&self.include),
            any(&self.exclude)
        )
    }

    /// A scope from parsed patterns.
    pub fn new(include: Vec<TablePattern>, exclude: Vec<TablePattern>) -> Scope {
        Scope { include, exclude }
    }

    /// Whether a table is in scope.
    pub fn contains(&self, table: &TableName) -> bool {
        self.include.iter().any(|p| p.matches(table))
            && !self.exclude.iter().any(|p| p.matches(table))
    }

    /// Takes `table` into scope whatever the patterns say (unless an
    /// exclusion names it).
    pub fn include_table(&mut self, table: &TableName) {
        self.include.push(TablePattern::exact(table));
    }

    /// Takes `table` out of scope whatever the patterns say.
    pub fn exclude_table(&mut self, table: &TableName) {
        self.exclude.push(TablePattern::exact(table));
    }

    /// Include patterns that match none of `tables` (likely typos).
    pub fn unmatched_includes<'a>(&'a self, tables: &[TableName]) -> Vec<&'a TablePattern> {
        self.include
            .iter()
            .filter(|p| !tables.iter().any(|t| p.matches(t)))
            .collect()
    }
}

/// How UPDATEs and DELETEs identify their old row in the WAL.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplicaIdentity {
    /// The primary key, if there is one (`REPLICA IDENTITY DEFAULT`).
    Default,
    /// No old-row information: UPDATE/DELETE fail on a published table.
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a unique index.
    Index {
        /// The index's name.
        index: String,
        /// Its columns, in index order.
        columns: Vec<String>,
    },
}

impl ReplicaIdentity {
    fn from_catalog(
        code: &str,
        index: Option<String>,
        columns: Option<Vec<String>>,
    ) -> ReplicaIdentity {
        match (code, index) {
            ("n", _) => ReplicaIdentity::Nothing,
            ("f", _) => ReplicaIdentity::Full,
            ("i", Some(index)) => ReplicaIdentity::Index {
                index,
                columns: columns.unwrap_or_default(),
            },
            // 'i' whose index was dropped behaves like NOTHING in PostgreSQL.
            ("i", None) => ReplicaIdentity::Nothing,
            _ => ReplicaIdentity::Default,
        }
    }
}

/// A table column.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// `format_type()` of the column, e.g. `character varying(20)`.
    pub type_name: String,
    /// `GENERATED ALWAYS AS IDENTITY`: takes a given value only with
    /// `OVERRIDING SYSTEM VALUE`, and never from an UPDATE.
    pub identity_always: bool,
    /// `NOT NULL`.
    pub not_null: bool,
    /// Has a default expression.
    pub has_default: bool,
    /// A generated (computed) column; logical decoding does not send it.
    pub generated: bool,
}

/// A table in a database, with what replication needs to know.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Table {
    /// Its name.
    pub name: TableName,
    /// Its OID on this server.
    pub oid: u32,
    /// A partitioned table (its partitions are covered through it).
    pub partitioned: bool,
    /// An unlogged table: logical decoding never sees its changes.
    pub unlogged: bool,
    /// Columns in attribute order.
    pub columns: Vec<Column>,
    /// Primary key columns, in key order.
    pub primary_key: Option<Vec<String>>,
    /// The primary key is `DEFERRABLE`: PostgreSQL does not use it as the
    /// replica identity, and does not check it under
    /// `session_replication_role = replica`.
    pub primary_key_deferrable: bool,
    /// Unique and primary key constraints declared `DEFERRABLE`, by their
    /// columns.
    pub deferrable_keys: Vec<Vec<String>>,
    /// Tables that inherit from this one (not partitions): counts and
    /// copies of this table take `ONLY` its own rows.
    pub has_inheritance_children: bool,
    /// The replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// The planner's row estimate; `None` when never analyzed.
    pub row_estimate: Option<i64>,
    /// Total size on disk with indexes and TOAST, partitions included.
    pub total_bytes: i64,
}

impl Table {
    /// The columns that identify a row in the WAL, if any do.
    pub fn identity_columns(&self) -> Option<Vec<String>> {
        match &self.replica_identity {
            // A deferrable key is no replica identity (relcache.c skips
            // non-immediate indexes): such a table logs no old key.
            ReplicaIdentity::Default if self.primary_key_deferrable => None,
            ReplicaIdentity::Default => self.primary_key.clone(),
            ReplicaIdentity::Index { columns, .. } => Some(columns.clone()),
            ReplicaIdentity::Full => Some(self.columns.iter().map(|c| c.name.clone()).collect()),
            ReplicaIdentity::Nothing => None,
        }
    }

    /// A column by name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

const TABLES_SQL: &str = "
SELECT c.oid, n.nspname::text, c.relname::text, c.relkind = 'p', c.relpersistence = 'u',
       c.relreplident::text,
       CASE WHEN c.relkind = 'p'
            THEN (SELECT sum(greatest(pc.reltuples, 0))::int8 FROM pg_partition_tree(c.oid) t
                    JOIN pg_class pc ON pc.oid = t.relid WHERE t.isleaf)
            WHEN c.reltuples < 0 THEN NULL
            ELSE c.reltuples::int8 END,
       CASE WHEN c.relkind = 'p'
            THEN (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::int8 FROM pg_partition_tree(c.oid) t)
            ELSE pg_total_relation_size(c.oid) END,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
          FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary),
       (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
         WHERE i.indrelid = c.oid AND i.indisreplident),
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
          FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisreplident),
       coalesce((SELECT NOT i.indimmediate FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), false),
       (SELECT array_agg(array_to_string(ARRAY(
                 SELECT quote_ident(a.attname) FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum ORDER BY u.ord), ','))
          FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u') AND k.condeferrable),
       EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhparent = c.oid) AND c.relkind = 'r'
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence IN ('p', 'u')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover')
   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
 ORDER BY 2, 3";

const COLUMNS_SQL: &str = "
SELECT a.attrelid, a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod),
       a.attnotnull, a.atthasdef, a.attgenerated <> '', a.attidentity = 'a'
  FROM pg_attribute a
 WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum";

/// A foreign key as a server's catalog has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignKey {
    /// The constraint's name.
    pub constraint: String,
    /// The referencing table.
    pub table: TableName,
    /// Whether the referencing table is partitioned.
    pub table_partitioned: bool,
    /// Its referencing columns, in the key's order.
    pub columns: Vec<String>,
    /// The referenced table.
    pub references: TableName,
    /// Whether the referenced table is partitioned.
    pub references_partitioned: bool,
    /// The referenced columns, in the key's order.
    pub referenced: Vec<String>,
}

const FOREIGN_KEYS: &str = "
SELECT c.conname::text,
       tn.nspname::text, t.relname::text, t.relkind = 'p',
       rn.nspname::text, r.relname::text, r.relkind = 'p',
       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
               JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)
  FROM pg_constraint c
  JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
  JOIN pg_class r ON r.oid = c.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
 WHERE c.contype = 'f' AND c.conparentid = 0
 ORDER BY 2, 3, 1";

/// Every foreign key of the connected database (a partition's copies of
/// its parent's keys left out), by referencing table.
pub async fn foreign_keys(client: &Client) -> Result<Vec<ForeignKey>, tokio_postgres::Error> {
    Ok(client
        .query(FOREIGN_KEYS, &[])
        .await?
        .iter()
        .map(|row| ForeignKey {
            constraint: row.get(0),
            table: TableName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
            table_partitioned: row.get(3),
            references: TableName::new(row.get::<_, String>(4), row.get::<_, String>(5)),
            references_partitioned: row.get(6),
            columns: row.get(7),
            referenced: row.get(8),
        })
        .collect())
}

/// Every user table of the connected database (partitions excluded, and
/// cutover's own schema `cutover`).
pub async fn tables(client: &Client) -> Result<Vec<Table>, tokio_postgres::Error> {
    let rows = client.query(TABLES_SQL, &[]).await?;
    let mut tables: Vec<Table> = rows
        .iter()
        .map(|row| Table {
            oid: row.get(0),
            name: TableName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
            partitioned: row.get(3),
            unlogged: row.get(4),
            replica_identity: ReplicaIdentity::from_catalog(
                row.get::<_, &str>(5),
                row.get(9),
                row.get(10),
            ),
            row_estimate: row.get(6),
            total_bytes: row.get(7),
            primary_key: row.get(8),
            primary_key_deferrable: row.get(11),
            deferrable_keys: row
                .get::<_, Option<Vec<String>>>(12)
                .unwrap_or_default()
                .iter()
                .map(|list| split_quoted_list(list))
                .collect(),
            has_inheritance_children: row.get(13),
            columns: Vec::new(),
        })
        .collect();
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let mut columns: HashMap<u32, Vec<Column>> = HashMap::new();
    for row in client.query(COLUMNS_SQL, &[&oids]).await? {
        columns.entry(row.get(0)).or_default().push(Column {
            name: row.get(1),
            type_oid: row.get(2),
            type_name: row.get(3),
            not_null: row.get(4),
            has_default: row.get(5),
            generated: row.get(6),
            identity_always: row.get(7),
        });
    }
    for table in &mut tables {
        table.columns = columns.remove(&table.oid).unwrap_or_default();
    }
    Ok(tables)
}

/// Splits `"a",b` (identifiers quoted by `quote_ident`, comma-separated)
/// into names.
pub(crate) fn split_quoted_list(list: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => names.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    names.push(current);
    names
}

/// The table's own rows in SQL: `ONLY "s"."t"` for a plain table (so that
/// rows of tables inheriting from it are left out), the table itself for a
/// partitioned one (whose rows all live in its partitions).
pub fn own_rows(table: &TableName, partitioned: bool) -> String {
    if partitioned {
        table.quoted()
    } else {
        format!("ONLY {}", table.quoted())
    }
}

/// Exact row count of a table, its inheritance children left out, its
/// partitions counted (a full scan: use on request only).
pub async fn count_rows(client: &Client, table: &TableName) -> Result<i64, tokio_postgres::Error> {
    let partitioned: bool = client
        .query_one(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await?
        .get(0);
    let row = client
        .query_one(
            &format!("SELECT count(*) FROM {}", own_rows(table, partitioned)),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A sequence and the table column that owns it, if any.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sequence {
    /// Its name.
    pub name: TableName,
    /// `bigint`, `integer` or `smallint`.
    pub data_type: String,
    /// The last value handed out; `None` if never used (or not readable).
    pub last_value: Option<i64>,
    /// The table whose column owns it (`SERIAL`, identity, `OWNED BY`).
    pub owned_by: Option<TableName>,
}

const SEQUENCES_SQL: &str = "
SELECT n.nspname::text, c.relname::text, format_type(s.seqtypid, NULL),
       CASE WHEN has_sequence_privilege(c.oid, 'SELECT') THEN pg_sequence_last_value(c.oid) END,
       (SELECT tn.nspname::text FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid
          JOIN pg_namespace tn ON tn.oid = tc.relnamespace
         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
           AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1),
       (SELECT tc.relname::text FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
           AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1)
  FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
 ORDER BY 1, 2";

/// Every sequence of the connected database.
pub async fn sequences(client: &Client) -> Result<Vec<Sequence>, tokio_postgres::Error> {
    let rows = client.query(SEQUENCES_SQL, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| Sequence {
            name: TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            data_type: row.get(2),
            last_value: row.get(3),
            owned_by: match (
                row.get::<_, Option<String>>(4),
                row.get::<_, Option<String>>(5),
            ) {
                (Some(schema), Some(name)) => Some(TableName::new(schema, name)),
                _ => None,
            },
        })
        .collect())
}

/// Whether values of a source column can be written to a target column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeFit {
    /// The same type.
    Same,
    /// Every source value fits; the copy uses the text format.
    Widens,
    /// Some source values may not fit or would change meaning.
    Incompatible,
}

/// Compares `format_type()` spellings of a source and a target column.
pub fn type_fit(source: &str, target: &str) -> TypeFit {
    if source == target {
        return TypeFit::Same;
    }
    if let (Some(s), Some(t)) = (source.strip_suffix("[]"), target.strip_suffix("[]")) {
        return type_fit(s, t);
    }
    let (s_base, s_mod) = split_typmod(source);
    let (t_base, t_mod) = split_typmod(target);
    let widens = match (s_base.as_str(), t_base.as_str()) {
        ("smallint", "integer" | "bigint" | "numeric") => t_mod.is_empty() || t_base != "numeric",
        ("integer", "bigint" | "numeric") => t_mod.is_empty() || t_base != "numeric",
        ("bigint", "numeric") => t_mod.is_empty(),
        ("real", "double precision") => true,
        ("character varying" | "character", "character varying") => {
            t_mod.is_empty() || (!s_mod.is_empty() && s_mod[0] <= t_mod[0])
        }
        ("character varying" | "character" | "name", "text") => true,
        ("text", "character varying") => t_mod.is_empty(),
        ("numeric", "numeric") => match (s_mod.as_slice(), t_mod.as_slice()) {
            (_, []) => true,
            ([sp, ss], [tp, ts]) => ts >= ss && tp - ts >= sp - ss,
            ([sp], [tp, ts]) => tp - ts >= *sp,
            _ => false,
        },
        ("bit varying", "bit varying") => {
            t_mod.is_empty() || (!s_mod.is_empty() && s_mod[0] <= t_mod[0])
        }
        ("json", "jsonb") => true,
        (s, t) if s == t => {
            // Same base type, different modifier: an unconstrained target,
            // or a wider or equal precision (time, timestamp, interval),
            // keeps every value.
            t_mod.is_empty() || (s_mod.len() == 1 && t_mod.len() == 1 && s_mod[0] <= t_mod[0])
        }
        _ => false,
    };
    if widens {
        TypeFit::Widens
    } else {
        TypeFit::Incompatible
    }
}

/// `numeric(10,2)` → (`numeric`, [10, 2]); `timestamp(3) with time zone`
/// → (`timestamp with time zone`, [3]).
fn split_typmod(spelled: &str) -> (String, Vec<i64>) {
    let Some(open) = spelled.find('(') else {
        return (spelled.to_owned(), Vec::new());
    };
    let Some(close) = spelled[open..].find(')').map(|i| i + open) else {
        return (spelled.to_owned(), Vec::new());
    };
    let mods = spelled[open + 1..close]
        .split(',')
        .filter_map(|m| m.trim().parse().ok())
        .collect();
    let base = format!("{}{}", &spelled[..open], &spelled[close + 1..]);
    (base.trim().to_owned(), mods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> TableName {
        TableName::new(schema, name)
    }

    #[test]
    fn patterns_match_schema_and_table() {
        let p = TablePattern::parse("public.*").unwrap();
        assert!(p.matches(&t("public", "orders")));
        assert!(!p.matches(&t("sales", "orders")));
        let p = TablePattern::parse("*.order_?").unwrap();
        assert!(p.matches(&t("x", "order_1")));
        assert!(!p.matches(&t("x", "order_12")));
        let p = TablePattern::parse("s.*a*b*").unwrap();
        assert!(p.matches(&t("s", "xaxxbx")));
        assert!(!p.matches(&t("s", "xbxa")));
        let p = TablePattern::parse("\"odd.schema\".\"T*\"").unwrap();
        assert!(p.matches(&t("odd.schema", "T*")));
        assert!(!p.matches(&t("odd.schema", "Tx")));
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        for bad in ["orders", "a.b.c", ".x", "x.", "\"open.x"] {
            let err = TablePattern::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(bad.trim_matches('"')) || err.contains("quote"),
                "{err}"
            );
        }
    }

    #[test]
    fn scope_excludes_and_reports_unmatched() {
        let scope = Scope::new(
            vec![
                TablePattern::parse("public.*").unwrap(),
                TablePattern::parse("app.nothing").unwrap(),
            ],
            vec![TablePattern::parse("public.tmp_*").unwrap()],
        );
        let tables = [t("public", "a"), t("public", "tmp_x")];
        assert!(scope.contains(&tables[0]));
        assert!(!scope.contains(&tables[1]));
        let unmatched: Vec<_> = scope
            .unmatched_includes(&tables)
            .iter()
            .map(|p| p.as_str())
            .collect();
        assert_eq!(unmatched, ["app.nothing"]);
    }

    #[test]
    fn type_fit_allows_only_widening() {
        assert_eq!(type_fit("integer", "integer"), TypeFit::Same);
        assert_eq!(type_fit("integer", "bigint"), TypeFit::Widens);
        assert_eq!(type_fit("bigint", "integer"), TypeFit::Incompatible);
        assert_eq!(
            type_fit("character varying(10)", "character varying(20)"),
            TypeFit::Widens
        );
        assert_eq!(
            type_fit("character varying(20)", "character varying(10)"),
            TypeFit::Incompatible
        );
        assert_eq!(type_fit("character varying(20)", "text"), TypeFit::Widens);
        assert_eq!(
            type_fit("text", "character varying(5)"),
            TypeFit::Incompatible
        );
        assert_eq!(type_fit("numeric(10,2)", "numeric(12,2)"), TypeFit::Widens);
        assert_eq!(
            type_fit("numeric(10,2)", "numeric(10,3)"),
            TypeFit::Incompatible
        );
        assert_eq!(type_fit("numeric(10,2)", "numeric"), TypeFit::Widens);
        assert_eq!(
            type_fit("timestamp(3) with time zone", "timestamp with time zone"),
            TypeFit::Widens
        );
        assert_eq!(
            type_fit("timestamp with time zone", "timestamp(3) with time zone"),
            TypeFit::Incompatible
        );
        assert_eq!(
            type_fit("timestamp(3) with time zone", "timestamp(6) with time zone"),
            TypeFit::Widens
        );
        assert_eq!(type_fit("integer[]", "bigint[]"), TypeFit::Widens);
        assert_eq!(type_fit("text", "integer"), TypeFit::Incompatible);
        assert_eq!(
            type_fit("timestamp without time zone", "timestamp with time zone"),
            TypeFit::Incompatible
        );
    }

    #[test]
    fn patterns_become_anchored_regexes() {
        let p = TablePattern::parse("sales.order_?*").unwrap();
        assert_eq!(p.regexes(), ("^sales$".into(), "^order_..*$".into()));
        let p = TablePattern::parse("\"a.b\".t").unwrap();
        assert_eq!(p.regexes().0, "^a\\.b$");
        let scope = Scope::new(vec![p], vec![]);
        assert!(scope.sql_condition("s", "n").contains("s ~ E'^a\\\\.b$'"));
    }

    #[test]
    fn quoted_lists_split_into_names() {
        assert_eq!(
            split_quoted_list("a,\"B,c\",\"d\"\"e\""),
            ["a", "B,c", "d\"e"]
        );
        assert_eq!(split_quoted_list("id"), ["id"]);
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            t("Sales", "Order Lines").quoted(),
            "\"Sales\".\"Order Lines\""
        );
    }
}
