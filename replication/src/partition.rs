//! TRUNCATE of one partition, which logical decoding does not send.
//!
//! cutover publishes partitioned tables through their root
//! (`publish_via_partition_root`), so that a target partitioned
//! differently, or not at all, receives every row. PostgreSQL's pgoutput
//! then leaves out a TRUNCATE of a single partition (`pgoutput_truncate`
//! skips a partition whose changes are published as its root's), and the
//! target would keep rows the source emptied, with no error.
//!
//! cutover closes that gap on the source with a statement-level `AFTER
//! TRUNCATE` trigger on every partition of a published tree. It records
//! one event in `cutover.events` (see [`crate::events`]) naming the
//! partition, its root, its bound and its partition constraint, at the
//! truncate's exact place in its transaction. The stream turns the event
//! into [`PartitionTruncate`], and the
//! applier empties the same rows on the target: `TRUNCATE ONLY` of the same
//! partition where the target has it with the same bound under the same
//! root, else a `DELETE` from the root of the rows the partition
//! constraint holds. A hash partition's rows can only be found that way
//! on a target with the same partition; otherwise the stream stops and
//! says so. A TRUNCATE of the whole tree is sent by pgoutput as the root's,
//! and also fires every partition's trigger: emptying an empty partition
//! again is harmless.
//!
//! `cutover cleanup` removes the triggers and the function.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::catalog::TableName;
use crate::sql::quote_ident;

/// The schema holding the trigger function on the source.
pub const SCHEMA: &str = crate::events::SCHEMA;

/// The trigger function (in [`SCHEMA`]) and the triggers' name.
pub const TRIGGER: &str = "cutover_truncate_partition";

/// One partition emptied on the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTruncate {
    /// The partition.
    pub partition: TableName,
    /// The root of its tree, as published.
    pub root: TableName,
    /// Its bound, `pg_get_expr(relpartbound)`: `FOR VALUES FROM (0) TO (10)`.
    pub bound: String,
    /// The parent it is bound in.
    pub parent: TableName,
    /// `pg_get_partition_constraintdef()`: the rows it holds, as an
    /// expression over the root's columns (ancestors' bounds included).
    pub constraint: String,
}

impl PartitionTruncate {
    /// Whether the partition's rows can be found only by its own hash
    /// function, which names the source's parent by OID.
    pub fn hashed(&self) -> bool {
        self.constraint.contains("satisfies_hash_partition")
    }
}

/// The trigger function: it records a [`PartitionTruncate`], in JSON, in
/// `cutover.events`.
fn function_sql() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $cutover$
BEGIN
  {insert};
  RETURN NULL;
END $cutover$",
        schema = quote_ident(SCHEMA),
        name = quote_ident(TRIGGER),
        insert = crate::events::insert_sql(
            crate::events::TRUNCATE_PARTITION,
            "json_build_object(
      'partition', json_build_object('schema', TG_TABLE_SCHEMA, 'name', TG_TABLE_NAME),
      'root', (SELECT json_build_object('schema', n.nspname, 'name', r.relname)
                 FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
                WHERE r.oid = pg_partition_root(TG_RELID)),
      'parent', (SELECT json_build_object('schema', n.nspname, 'name', p.relname)
                   FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                   JOIN pg_namespace n ON n.oid = p.relnamespace
                  WHERE i.inhrelid = TG_RELID),
      'bound', (SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.oid = TG_RELID),
      'constraint', pg_get_partition_constraintdef(TG_RELID))::text",
        ),
    )
}

/// Every partition (at any depth) of the partitioned `roots` that lacks
/// cutover's trigger.
async fn untriggered(
    client: &Client,
    roots: &[TableName],
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let names: Vec<String> = roots.iter().map(TableName::quoted).collect();
    Ok(client
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM unnest($1::text[]::regclass[]) AS r(oid)
              CROSS JOIN LATERAL pg_partition_tree(r.oid) t
               JOIN pg_class c ON c.oid = t.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.level > 0
                AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = c.oid AND g.tgname = $2)
              ORDER BY 1, 2",
            &[&names, &TRIGGER],
        )
        .await?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Puts the trigger on every partition of `roots` that lacks it (the
/// function and its schema first). Each `CREATE TRIGGER` takes a brief
/// lock on its partition: it waits at most `lock_timeout` (2 s) behind the
/// application, and is retried a few times, so that the application never
/// queues behind cutover for long. Returns the partitions it covered.
pub async fn install(
    client: &Client,
    roots: &[TableName],
    publication: &str,
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    // One session at a time (the copy and the lag sampler both install):
    // two would make the same trigger and the second fail.
    client
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&crate::events::INSTALL_LOCK],
        )
        .await?;
    let installed = install_locked(client, roots, publication).await;
    let released = client
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&crate::events::INSTALL_LOCK],
        )
        .await;
    let installed = installed?;
    released?;
    Ok(installed)
}

async fn install_locked(
    client: &Client,
    roots: &[TableName],
    publication: &str,
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let missing = untriggered(client, roots).await?;
    if missing.is_empty() {
        return Ok(missing);
    }
    crate::events::install(client, publication).await?;
    client.batch_execute(&function_sql()).await?;
    for partition in &missing {
        crate::client::with_short_lock(
            client,
            &format!(
                "CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.{}()",
                quote_ident(TRIGGER),
                partition.quoted(),
                quote_ident(SCHEMA),
                quote_ident(TRIGGER)
            ),
        )
        .await?;
    }
    Ok(missing)
}

/// [`install`] for every partitioned table the publications `names`
/// publish (the first is the one `cutover.events` belongs in). Run before the slot is created (so that every TRUNCATE after
/// its snapshot is reported) and again while streaming, for partitions
/// added since.
pub async fn install_for_publications(
    client: &Client,
    names: &[String],
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let roots: Vec<TableName> = client
        .query(
            "SELECT DISTINCT t.schemaname::text, t.tablename::text
               FROM pg_publication_tables t
               JOIN pg_namespace n ON n.nspname = t.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
              WHERE t.pubname = ANY($1) AND c.relkind = 'p'",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    install(client, &roots, &names[0]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back() {
        let content =
            br#"{"partition":{"schema":"public","name":"p1"},"root":{"schema":"public","name":"p"},
            "parent":{"schema":"public","name":"p"},"bound":"FOR VALUES FROM (0) TO (10)",
            "constraint":"((id IS NOT NULL) AND (id >= 0) AND (id < 10))"}"#;
        let t: PartitionTruncate = serde_json::from_slice(content).unwrap();
        assert_eq!(t.partition, TableName::new("public", "p1"));
        assert_eq!(t.root, TableName::new("public", "p"));
        assert!(!t.hashed());
    }
}
