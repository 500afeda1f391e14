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
//! TRUNCATE` trigger on every partition of a published tree. It writes one
//! transactional logical message (`pg_logical_emit_message`, prefix
//! [`MESSAGE_PREFIX`]) naming the partition, its root, its bound and its
//! partition constraint, at the truncate's exact place in its transaction.
//! The stream turns the message into [`PartitionTruncate`], and the
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

use crate::catalog::{TableName, quote_ident};

/// The prefix of the logical messages the partition triggers write.
pub const MESSAGE_PREFIX: &str = "cutover.truncate_partition";

/// The schema holding the trigger function on the source.
pub const SCHEMA: &str = "cutover";

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

/// Why a partition message could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "a {MESSAGE_PREFIX} message at {lsn} is not what cutover's trigger writes ({detail}): was the trigger function {SCHEMA}.{TRIGGER} changed?"
)]
pub struct MessageError {
    /// Where the message is.
    pub lsn: crate::lsn::Lsn,
    /// What is wrong.
    pub detail: String,
}

impl PartitionTruncate {
    /// Reads the content of a [`MESSAGE_PREFIX`] message.
    pub fn from_message(
        content: &[u8],
        lsn: crate::lsn::Lsn,
    ) -> Result<PartitionTruncate, MessageError> {
        serde_json::from_slice(content).map_err(|e| MessageError {
            lsn,
            detail: e.to_string(),
        })
    }

    /// Whether the partition's rows can be found only by its own hash
    /// function, which names the source's parent by OID.
    pub fn hashed(&self) -> bool {
        self.constraint.contains("satisfies_hash_partition")
    }
}

/// The trigger function: the message's content is a [`PartitionTruncate`]
/// in JSON.
fn function_sql() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger LANGUAGE plpgsql AS $cutover$
BEGIN
  PERFORM pg_logical_emit_message(true, {prefix}, json_build_object(
      'partition', json_build_object('schema', TG_TABLE_SCHEMA, 'name', TG_TABLE_NAME),
      'root', (SELECT json_build_object('schema', n.nspname, 'name', r.relname)
                 FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
                WHERE r.oid = pg_partition_root(TG_RELID)),
      'parent', (SELECT json_build_object('schema', n.nspname, 'name', p.relname)
                   FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                   JOIN pg_namespace n ON n.oid = p.relnamespace
                  WHERE i.inhrelid = TG_RELID),
      'bound', (SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.oid = TG_RELID),
      'constraint', pg_get_partition_constraintdef(TG_RELID))::text);
  RETURN NULL;
END $cutover$",
        schema = quote_ident(SCHEMA),
        name = quote_ident(TRIGGER),
        prefix = crate::catalog::quote_literal(MESSAGE_PREFIX),
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
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    if roots.is_empty() {
        return Ok(Vec::new());
    }
    let missing = untriggered(client, roots).await?;
    if missing.is_empty() {
        return Ok(missing);
    }
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}; {}",
            quote_ident(SCHEMA),
            function_sql()
        ))
        .await?;
    for partition in &missing {
        let sql = format!(
            "BEGIN; SET LOCAL lock_timeout = '2s';
             CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.{}();
             COMMIT;",
            quote_ident(TRIGGER),
            partition.quoted(),
            quote_ident(SCHEMA),
            quote_ident(TRIGGER)
        );
        let mut attempt = 0;
        loop {
            match client.batch_execute(&sql).await {
                Ok(()) => break,
                Err(err) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    let lock_timeout = err
                        .code()
                        .is_some_and(|c| *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
                    attempt += 1;
                    if !lock_timeout || attempt >= 5 {
                        return Err(err);
                    }
                    tracing::info!(%partition, attempt, "the partition is busy: adding cutover's truncate trigger again shortly");
                    tokio::time::sleep(std::time::Duration::from_millis(500 * attempt)).await;
                }
            }
        }
    }
    Ok(missing)
}

/// [`install`] for every partitioned table the publications `names`
/// publish. Run before the slot is created (so that every TRUNCATE after
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
    install(client, &roots).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_and_a_bad_one_names_the_function() {
        let content =
            br#"{"partition":{"schema":"public","name":"p1"},"root":{"schema":"public","name":"p"},
            "parent":{"schema":"public","name":"p"},"bound":"FOR VALUES FROM (0) TO (10)",
            "constraint":"((id IS NOT NULL) AND (id >= 0) AND (id < 10))"}"#;
        let t = PartitionTruncate::from_message(content, crate::lsn::Lsn::ZERO).unwrap();
        assert_eq!(t.partition, TableName::new("public", "p1"));
        assert_eq!(t.root, TableName::new("public", "p"));
        assert!(!t.hashed());
        let err = PartitionTruncate::from_message(b"{}", crate::lsn::Lsn::ZERO)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cutover.cutover_truncate_partition"), "{err}");
    }
}
