//! Referential integrity on the target. The apply runs with
//! `session_replication_role = replica`, so PostgreSQL does not check
//! foreign keys on replicated rows: a row missing on the target leaves
//! the rows that refer to it orphaned, silently. Every foreign key of a
//! table in scope is checked for orphans in the target's snapshot of the
//! compared position.

use cutover_replication::catalog::{self, ForeignKey, TableName};
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

/// Checks every foreign key of the tables `in_scope` on `target` (inside
/// the verify's snapshot).
pub(super) async fn check(
    target: &Client,
    in_scope: &[TableName],
) -> Result<Vec<ForeignKeyCheck>, VerifyError> {
    let keys: Vec<ForeignKey> = catalog::foreign_keys(target)
        .await
        .map_err(query("target", "listing foreign keys"))?
        .into_iter()
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
