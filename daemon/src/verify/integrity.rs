//! Referential integrity on the target. The apply runs with
//! `session_replication_role = replica`, so PostgreSQL does not check
//! foreign keys on replicated rows: a row missing on the target leaves
//! the rows that refer to it orphaned, silently. Every foreign key of a
//! table in scope is checked for orphans in the target's snapshot of the
//! compared position.

use cutover_replication::catalog::{self, TableName};
use cutover_replication::sql::quote_ident;
use serde::Serialize;
use tokio_postgres::Client;

use super::{VerifyError, query};

/// Orphans shown per foreign key.
const ORPHANS_SHOWN: i64 = 5;

/// One foreign key checked.
#[derive(Clone, Debug, Serialize)]
pub struct ForeignKeyCheck {
    /// The constraint's name.
    pub constraint: String,
    /// The referring table.
    pub table: String,
    /// The referenced table.
    pub references: String,
    /// Rows whose key refers to no row.
    pub orphans: i64,
    /// A few of their foreign key values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
}

/// A foreign key as the target's catalog has it.
struct ForeignKey {
    constraint: String,
    table: TableName,
    table_partitioned: bool,
    columns: Vec<String>,
    references: TableName,
    references_partitioned: bool,
    referenced: Vec<String>,
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

/// Checks every foreign key of the tables `in_scope` on `target` (inside
/// the verify's snapshot).
pub(super) async fn check(
    target: &Client,
    in_scope: &[TableName],
) -> Result<Vec<ForeignKeyCheck>, VerifyError> {
    let keys: Vec<ForeignKey> = target
        .query(FOREIGN_KEYS, &[])
        .await
        .map_err(query("target", "listing foreign keys"))?
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
        .filter(|k| in_scope.contains(&k.table))
        .collect();
    let mut checks = Vec::with_capacity(keys.len());
    for key in keys {
        let child: Vec<String> = key
            .columns
            .iter()
            .map(|c| format!("c.{}", quote_ident(c)))
            .collect();
        let not_null: Vec<String> = child.iter().map(|c| format!("{c} IS NOT NULL")).collect();
        let matches: Vec<String> = key
            .referenced
            .iter()
            .zip(&child)
            .map(|(p, c)| format!("p.{} = {c}", quote_ident(p)))
            .collect();
        // MATCH SIMPLE: a key with a NULL refers to nothing and is valid.
        let sql = format!(
            "SELECT count(*), (array_agg(ROW({cols})::text))[1:{ORPHANS_SHOWN}]
               FROM {child_table} c
              WHERE {not_null} AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {matches})",
            cols = child.join(", "),
            child_table = catalog::own_rows(&key.table, key.table_partitioned),
            not_null = not_null.join(" AND "),
            parent = catalog::own_rows(&key.references, key.references_partitioned),
            matches = matches.join(" AND "),
        );
        let row = target.query_one(&sql, &[]).await.map_err(query(
            "target",
            &format!("checking foreign key {} of {}", key.constraint, key.table),
        ))?;
        checks.push(ForeignKeyCheck {
            constraint: key.constraint,
            table: key.table.to_string(),
            references: key.references.to_string(),
            orphans: row.get(0),
            samples: row.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
        });
    }
    Ok(checks)
}
