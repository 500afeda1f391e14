//! What happens on the source that logical decoding does not carry, told
//! through a table of cutover's own.
//!
//! Two kinds of event need to reach the applier at their exact place in
//! their transaction: a TRUNCATE of one partition (pgoutput leaves it out
//! when the tree is published through its root, see [`crate::partition`])
//! and DDL (see [`crate::ddl`]). cutover's triggers on the source write
//! each as a row of `cutover.events`, a table in the publication: the row's
//! INSERT is an ordinary change of the transaction, decoded where it
//! happened, dropped with a subtransaction that rolls back (in a streamed
//! transaction too), and on every PostgreSQL that has pgoutput.
//!
//! Why a table and not `pg_logical_emit_message`: any role may call that
//! function, so anyone who can connect to the source could forge an event,
//! and events make the applier run statements on the target. Only the
//! trigger functions, `SECURITY DEFINER` and owned by cutover's role, may
//! write `cutover.events` (`REVOKE ALL ... FROM PUBLIC`). A message is also
//! tagged with its top-level transaction only, so a rolled-back savepoint
//! could not take it along.
//!
//! The rows themselves are never needed once written (decoding reads the
//! WAL), so the daemon deletes them as it samples lag; those deletes, like
//! every change of the table, are not applied to the target.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::catalog::TableName;
use crate::change::{ChangeKind, Datum, Relation, Tuple};
use crate::lsn::Lsn;
use crate::sql::quote_ident;

/// The schema of cutover's objects on the source.
pub const SCHEMA: &str = "cutover";

/// The events table's name, in [`SCHEMA`].
pub const TABLE: &str = "events";

/// `kind` of a partition TRUNCATE.
pub const TRUNCATE_PARTITION: &str = "truncate_partition";

/// `kind` of a DDL statement.
pub const DDL: &str = "ddl";

/// `cutover.events`.
pub fn table() -> TableName {
    TableName::new(SCHEMA, TABLE)
}

/// Whether a relation is `cutover.events`.
pub fn is_events(relation: &Relation) -> bool {
    relation.name.schema == SCHEMA && relation.name.name == TABLE
}

/// The SQL that records an event from a trigger function: `kind` is a
/// literal, `payload` a text expression.
pub fn insert_sql(kind: &str, payload: &str) -> String {
    format!(
        "INSERT INTO {}.{} (kind, payload) VALUES ({}, {payload})",
        quote_ident(SCHEMA),
        quote_ident(TABLE),
        crate::sql::quote_literal(kind)
    )
}

/// Creates the schema and the events table (if missing), closes them to
/// everyone but their owner, and puts the table in `publication`.
pub async fn install(client: &Client, publication: &str) -> Result<(), tokio_postgres::Error> {
    // `IF NOT EXISTS` is no lock: two sessions installing at once (the
    // copy and the lag sampler) can both miss the schema and collide on
    // the catalog ("duplicate key", "tuple concurrently updated"). One at
    // a time per database, under a session lock released whatever happens
    // (a broken connection releases it too).
    client
        .execute("SELECT pg_advisory_lock($1)", &[&INSTALL_LOCK])
        .await?;
    let installed = install_locked(client, publication).await;
    let released = client
        .execute("SELECT pg_advisory_unlock($1)", &[&INSTALL_LOCK])
        .await;
    installed?;
    released.map(|_| ())
}

/// The advisory lock [`install`] takes ("cutover" in ASCII, then 1); the
/// partitions' triggers are installed under it too.
pub(crate) const INSTALL_LOCK: i64 = 0x6375_746f_7665_7201;

async fn install_locked(client: &Client, publication: &str) -> Result<(), tokio_postgres::Error> {
    let ready: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL
                AND EXISTS (SELECT 1 FROM pg_publication_tables
                             WHERE pubname = $2 AND schemaname = $3 AND tablename = $4)",
            &[&table().quoted(), &publication, &SCHEMA, &TABLE],
        )
        .await?
        .get(0);
    if ready {
        return Ok(());
    }
    let schema = quote_ident(SCHEMA);
    let table = format!("{schema}.{}", quote_ident(TABLE));
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
         CREATE TABLE IF NOT EXISTS {table} (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             kind text NOT NULL,
             payload text NOT NULL,
             at timestamptz NOT NULL DEFAULT now());
         REVOKE ALL ON {table} FROM PUBLIC;"
    );
    client.batch_execute(&create).await?;
    let published: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[&publication, &SCHEMA, &TABLE],
        )
        .await?
        .get(0);
    if !published {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE ONLY {table}",
                quote_ident(publication)
            ))
            .await?;
    }
    Ok(())
}

/// Deletes the events already written (their INSERTs are in the WAL,
/// which is what decoding reads).
pub async fn prune(client: &Client) -> Result<u64, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table().quoted()])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    client
        .execute(
            &format!(
                "DELETE FROM {}.{} WHERE at < now() - interval '1 minute'",
                quote_ident(SCHEMA),
                quote_ident(TABLE)
            ),
            &[],
        )
        .await
}

/// Why an event row could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the cutover.events row at {lsn} is not what cutover's triggers write ({detail}): were its trigger functions changed?"
)]
pub struct EventError {
    /// Where it is.
    pub lsn: Lsn,
    /// What is wrong.
    pub detail: String,
}

/// The change an inserted event row stands for.
pub fn from_row(relation: &Relation, row: &Tuple, lsn: Lsn) -> Result<ChangeKind, EventError> {
    let error = |detail: String| EventError { lsn, detail };
    let text = |name: &str| -> Result<&[u8], EventError> {
        let at = relation
            .columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| error(format!("no column {name}")))?;
        match row.0.get(at) {
            Some(Datum::Text(bytes)) => Ok(&bytes[..]),
            _ => Err(error(format!("column {name} is not text"))),
        }
    };
    let kind = text("kind")?;
    let payload = text("payload")?;
    match kind {
        b"truncate_partition" => serde_json::from_slice(payload)
            .map(|t| ChangeKind::TruncatePartition(Arc::new(t)))
            .map_err(|e| error(e.to_string())),
        b"ddl" => serde_json::from_slice(payload)
            .map(|d| ChangeKind::Ddl(Arc::new(d)))
            .map_err(|e| error(e.to_string())),
        other => Err(error(format!(
            "unknown kind {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}
