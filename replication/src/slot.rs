//! Slots and publications, inspected and managed over a regular SQL
//! connection (the replication session creates and drops slots; see
//! [`crate::session`]).

use tokio_postgres::Client;

use crate::catalog::TableName;
use crate::lsn::Lsn;
use crate::sql::{quote_ident, quote_literal};

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotState {
    /// Slot name.
    pub name: String,
    /// Output plugin (`None` for physical slots).
    pub plugin: Option<String>,
    /// Database of a logical slot.
    pub database: Option<String>,
    /// Whether a connection streams from it now.
    pub active: bool,
    /// The process streaming from it.
    pub active_pid: Option<i32>,
    /// A temporary slot, dropped with its session.
    pub temporary: bool,
    /// Everything before this is confirmed by the consumer.
    pub confirmed_flush: Option<Lsn>,
    /// The oldest WAL the slot needs.
    pub restart_lsn: Option<Lsn>,
    /// Bytes of WAL retained for the slot (current WAL minus restart LSN).
    pub retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (13+).
    pub wal_status: Option<String>,
    /// Bytes left before `max_slot_wal_keep_size` invalidates the slot
    /// (13+, `None` when unlimited).
    pub safe_wal_size: Option<i64>,
}

impl SlotState {
    /// The slot lost its WAL: changes after it fell behind are gone.
    pub fn is_invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

const SLOT_SQL: &str = "
SELECT slot_name::text, plugin::text, database::text, active, active_pid, temporary,
       confirmed_flush_lsn::text, restart_lsn::text,
       CASE WHEN restart_lsn IS NULL THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 END,
       wal_status, safe_wal_size::int8
  FROM pg_replication_slots WHERE slot_name = $1";

/// The slot of that name, if it exists.
pub async fn slot_state(
    client: &Client,
    name: &str,
) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let row = client.query_opt(SLOT_SQL, &[&name]).await?;
    Ok(row.map(|row| SlotState {
        name: row.get(0),
        plugin: row.get(1),
        database: row.get(2),
        active: row.get(3),
        active_pid: row.get(4),
        temporary: row.get(5),
        confirmed_flush: row.get::<_, Option<String>>(6).and_then(|v| v.parse().ok()),
        restart_lsn: row.get::<_, Option<String>>(7).and_then(|v| v.parse().ok()),
        retained_bytes: row.get(8),
        wal_status: row.get(9),
        safe_wal_size: row.get(10),
    }))
}

/// The server's current WAL position (`pg_current_wal_lsn()`).
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn, tokio_postgres::Error> {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    // The server's own text form always parses; 0/0 only if it does not.
    Ok(text.parse().unwrap_or(Lsn::ZERO))
}

/// Whether a publication exists.
pub async fn publication_exists(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some())
}

/// What keeps an existing publication from sending every change of its
/// tables: operations it does not publish, row filters and column lists
/// (15+). Empty when it sends everything.
pub async fn publication_gaps(
    client: &Client,
    name: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut gaps = Vec::new();
    let Some(row) = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate,
                    current_setting('server_version_num')::int4
               FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(gaps);
    };
    let missing: Vec<&str> = ["insert", "update", "delete", "truncate"]
        .iter()
        .enumerate()
        .filter(|(i, _)| !row.get::<_, bool>(*i))
        .map(|(_, op)| *op)
        .collect();
    if !missing.is_empty() {
        gaps.push(format!("it does not publish {}", missing.join(", ")));
    }
    if row.get::<_, i32>(4) >= 150000 {
        let filtered: Vec<String> = client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname),
                        pr.prqual IS NOT NULL, pr.prattrs IS NOT NULL
                   FROM pg_publication_rel pr
                   JOIN pg_publication p ON p.oid = pr.prpubid
                   JOIN pg_class c ON c.oid = pr.prrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE p.pubname = $1 AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL)
                  ORDER BY 1",
                &[&name],
            )
            .await?
            .iter()
            .map(|r| {
                let what = match (r.get::<_, bool>(1), r.get::<_, bool>(2)) {
                    (true, true) => "a row filter and a column list",
                    (true, false) => "a row filter",
                    _ => "a column list",
                };
                format!("{} has {what}", r.get::<_, String>(0))
            })
            .collect();
        gaps.extend(filtered);
    }
    Ok(gaps)
}

/// The statements that make publication `name` send every change of its
/// tables again, for messages that tell an operator how to fix one that
/// [`publication_gaps`] found wanting.
pub fn publication_gaps_fix(name: &str) -> String {
    let name = quote_ident(name);
    format!(
        "ALTER PUBLICATION {name} SET (publish = 'insert, update, delete, truncate');  -- and SET TABLE without WHERE or column lists\nor: DROP PUBLICATION {name};  -- cutover run creates its own"
    )
}

/// The tables a publication publishes (partition roots as published).
pub async fn publication_tables(
    client: &Client,
    name: &str,
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Creates a publication for `tables` that publishes the operations
/// `publish` lists (`insert, update, delete, truncate`), partitions through
/// their root (13+) so a differently partitioned target receives them.
pub async fn create_publication(
    client: &Client,
    name: &str,
    tables: &[TableName],
    publish: &str,
) -> Result<(), tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    // ONLY: a table's inheritance children are in scope on their own
    // (a partitioned table's partitions are published through it anyway).
    let list = tables
        .iter()
        .map(|t| format!("ONLY {}", t.quoted()))
        .collect::<Vec<_>>()
        .join(", ");
    let with = if version >= 130000 {
        format!(
            " WITH (publish = {}, publish_via_partition_root = true)",
            quote_literal(publish)
        )
    } else {
        format!(" WITH (publish = {})", quote_literal(publish))
    };
    let sql = if tables.is_empty() {
        format!("CREATE PUBLICATION {}{with}", quote_ident(name))
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list}{with}",
            quote_ident(name)
        )
    };
    client.batch_execute(&sql).await
}

/// Adds the tables of `tables` the publication lacks; returns them.
pub async fn add_publication_tables(
    client: &Client,
    name: &str,
    tables: &[TableName],
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let all_tables: bool = client
        .query_one(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .get(0);
    if all_tables {
        return Ok(Vec::new());
    }
    let published = publication_tables(client, name).await?;
    let missing: Vec<TableName> = tables
        .iter()
        .filter(|t| !published.contains(t))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let list = missing
            .iter()
            .map(|t| format!("ONLY {}", t.quoted()))
            .collect::<Vec<_>>()
            .join(", ");
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {list}",
                quote_ident(name)
            ))
            .await?;
    }
    Ok(missing)
}

/// Takes `tables` out of publication `name`.
pub async fn drop_publication_tables(
    client: &Client,
    name: &str,
    tables: &[TableName],
) -> Result<(), tokio_postgres::Error> {
    if tables.is_empty() {
        return Ok(());
    }
    let list = tables
        .iter()
        .map(|t| format!("ONLY {}", t.quoted()))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(publication = name, tables = %list, "taking tables out of the publication");
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} DROP TABLE {list}",
            quote_ident(name)
        ))
        .await
}

/// Drops a publication if it exists.
pub async fn drop_publication(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
}
