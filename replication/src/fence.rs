//! The write fence: a server that is no longer primary refuses every
//! application write to the tables in scope.
//!
//! `default_transaction_read_only` is only a default: a session can `SET`
//! it off or `BEGIN READ WRITE`, and sessions already open keep theirs.
//! The fence is a statement-level `BEFORE INSERT OR UPDATE OR DELETE OR
//! TRUNCATE` trigger, `cutover_fence`, on every table in scope and every
//! member of their partition trees (a statement on a partition does not
//! fire its parent's statement triggers). It raises
//! `read_only_sql_transaction` (25006) for every ordinary session,
//! superusers included, and never fires in cutover's apply sessions,
//! which run with `session_replication_role = replica`.
//!
//! All the triggers are created in one transaction, so the fence takes
//! effect on every table at once. `CREATE TRIGGER` waits for the
//! transactions that have written to the table; each try waits briefly
//! (`lock_timeout`) so that the application never queues behind the
//! fence, and once `wait` has passed the sessions that still hold such a
//! transaction open are ended (`pg_terminate_backend`), their number and
//! names reported. Once the fence is committed, no transaction that wrote
//! a table in scope before it is still open.

use std::time::Duration;

use tokio_postgres::Client;

use crate::catalog::TableName;
use crate::client::describe;
use crate::sql::{quote_ident, quote_literal};

/// The schema holding the fence's function.
pub const SCHEMA: &str = crate::events::SCHEMA;
/// The function and the triggers' name.
pub const TRIGGER: &str = "cutover_fence";

/// What a fence did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fenced {
    /// Tables (and partitions) fenced.
    pub tables: usize,
    /// Tries made (each waits `lock_timeout` at most per table).
    pub tries: u32,
    /// Sessions ended because they held a write open past the wait:
    /// `pid user application`.
    pub ended: Vec<String>,
}

/// Why a fence could not be put up or taken down.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct FenceError {
    /// What was being done.
    pub what: String,
    /// The server's message.
    pub detail: String,
}

fn error(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> FenceError {
    let what = what.into();
    move |err| FenceError {
        what,
        detail: describe(&err),
    }
}

/// Each try's wait for a table's lock.
const LOCK_TIMEOUT: &str = "200ms";

/// The tables of `tables` and every member of their partition trees, as
/// names.
async fn members(client: &Client, tables: &[TableName]) -> Result<Vec<TableName>, FenceError> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = client
        .query(
            // pg_partition_tree() returns no row for a table that is
            // neither partitioned nor a partition.
            // Ancestors too: a write to a parent out of scope routed into
            // a partition in scope fires only the parent's statement
            // triggers.
            "SELECT DISTINCT n.nspname::text, c.relname::text
               FROM (SELECT t.name::regclass AS relid FROM unnest($1::text[]) AS t(name)
                     UNION
                     SELECT p.relid FROM unnest($1::text[]) AS t(name)
                     CROSS JOIN LATERAL pg_partition_tree(t.name::regclass) AS p
                     UNION
                     SELECT a FROM unnest($1::text[]) AS t(name)
                     CROSS JOIN LATERAL pg_partition_ancestors(t.name::regclass) AS a) AS m
               JOIN pg_class c ON c.oid = m.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY 1, 2",
            &[&names],
        )
        .await
        .map_err(error("listing the tables to fence and their partitions"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The trigger function; `primary` (its argument) names the server that
/// takes the writes now.
fn function_sql() -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger LANGUAGE plpgsql AS $cutover$
BEGIN
  RAISE EXCEPTION USING
    ERRCODE = 'read_only_sql_transaction',
    MESSAGE = format('cutover: %I.%I is fenced: this server is no longer the primary (writes go to %s)',
                     TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]),
    HINT = 'point the application at the new primary; `cutover rollback` moves the writes back here';
END $cutover$",
        schema = quote_ident(SCHEMA),
        name = quote_ident(TRIGGER),
    )
}

/// Fences `tables` (and their partitions) on the server `client` is
/// connected to; `primary` names the server that takes the writes now.
/// Waits up to `wait` for the transactions writing to them, then ends
/// their sessions.
pub async fn install(
    client: &Client,
    tables: &[TableName],
    primary: &str,
    wait: Duration,
) -> Result<Fenced, FenceError> {
    client.batch_execute(&function_sql()).await.map_err(error(
        "creating the fence's function (needs CREATE on the database for the cutover schema)",
    ))?;
    let members = members(client, tables).await?;
    // Only where it is missing: after a crash some tables have it, and
    // dropping it again would wait for their readers too.
    let already = fenced_tables(client).await?;
    let missing: Vec<&TableName> = members.iter().filter(|t| !already.contains(t)).collect();
    let mut fenced = Fenced {
        tables: members.len(),
        ..Fenced::default()
    };
    if missing.is_empty() {
        return Ok(fenced);
    }
    let mut script = format!(
        "BEGIN; SET LOCAL lock_timeout = {};",
        quote_literal(LOCK_TIMEOUT)
    );
    for table in &missing {
        script.push_str(&format!(
            "\nCREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
  FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{trigger}({primary});",
            table = table.quoted(),
            trigger = quote_ident(TRIGGER),
            schema = quote_ident(SCHEMA),
            primary = quote_literal(primary),
        ));
    }
    script.push_str("\nCOMMIT;");
    let started = tokio::time::Instant::now();
    loop {
        fenced.tries += 1;
        match client.batch_execute(&script).await {
            Ok(()) => return Ok(fenced),
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(error("ending a fence try"))?;
                if started.elapsed() >= wait + GIVE_UP_AFTER {
                    return Err(FenceError {
                        what: format!("fencing {} tables", missing.len()),
                        detail: format!(
                            "their locks were still held {GIVE_UP_AFTER:?} after cutover began ending the sessions that held them{}: nothing was fenced",
                            prepared(client).await
                        ),
                    });
                }
                if started.elapsed() >= wait {
                    fenced.ended.extend(end_writers(client, &members).await?);
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Err(err) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(error(
                    "creating the fence's triggers (needs the TRIGGER privilege on every table in scope, or ownership)",
                )(err));
            }
        }
    }
}

/// How long the fence goes on trying once it has begun ending sessions.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

/// Prepared transactions, which hold locks with no session to end.
async fn prepared(client: &Client) -> String {
    match client
        .query_one(
            "SELECT string_agg(gid, ', ') FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
    {
        Ok(row) => row
            .get::<_, Option<String>>(0)
            .map(|gids| {
                format!(
                    " (prepared transactions hold locks: COMMIT PREPARED or ROLLBACK PREPARED {gids})"
                )
            })
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Ends the sessions holding a lock that keeps `CREATE TRIGGER` waiting on
/// one of `tables` (a transaction that wrote to it, or DDL); returns them.
async fn end_writers(client: &Client, tables: &[TableName]) -> Result<Vec<String>, FenceError> {
    let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
    let rows = client
        .query(
            "SELECT DISTINCT a.pid, coalesce(a.usename::text, ''), coalesce(a.application_name, ''),
                    pg_terminate_backend(a.pid)
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.granted AND l.locktype = 'relation'
                AND l.relation = ANY (SELECT n::regclass FROM unnest($1::text[]) AS n)
                AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock',
                               'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
                AND a.pid <> pg_backend_pid()",
            &[&names],
        )
        .await
        .map_err(error(
            "ending the sessions that keep the fence waiting (needs superuser, the same role, or pg_signal_backend)",
        ))?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "pid {} user {} application {}",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .collect())
}

/// Takes every fence trigger down on the server `client` is connected to
/// (whatever the scope was when it went up); returns how many.
pub async fn remove(client: &Client) -> Result<usize, FenceError> {
    let fenced = fenced_tables(client).await?;
    drop_triggers(client, &fenced).await
}

/// Takes the fence down from `tables` (and their partitions) only, on the
/// server `client` is connected to; returns how many carried it.
pub async fn remove_tables(client: &Client, tables: &[TableName]) -> Result<usize, FenceError> {
    let members = members(client, tables).await?;
    let fenced: Vec<TableName> = fenced_tables(client)
        .await?
        .into_iter()
        .filter(|t| members.contains(t))
        .collect();
    drop_triggers(client, &fenced).await
}

/// Drops the fence trigger of each of `fenced`, in one transaction.
async fn drop_triggers(client: &Client, fenced: &[TableName]) -> Result<usize, FenceError> {
    if fenced.is_empty() {
        return Ok(0);
    }
    let mut script = format!("BEGIN; SET LOCAL lock_timeout = {};", quote_literal("5s"));
    for table in fenced {
        script.push_str(&format!(
            "\nDROP TRIGGER IF EXISTS {} ON {};",
            quote_ident(TRIGGER),
            table.quoted()
        ));
    }
    script.push_str("\nCOMMIT;");
    if let Err(err) = client.batch_execute(&script).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(error("taking the fence's triggers down")(err));
    }
    Ok(fenced.len())
}

/// The tables that carry the fence trigger.
pub async fn fenced_tables(client: &Client) -> Result<Vec<TableName>, FenceError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname = $1 ORDER BY 1, 2",
            &[&TRIGGER],
        )
        .await
        .map_err(error("reading the fence's triggers"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Drops the fence's function (`cutover cleanup`, after [`remove`]).
pub async fn drop_function(client: &Client) -> Result<(), FenceError> {
    client
        .batch_execute(&format!(
            "DROP FUNCTION IF EXISTS {}.{}()",
            quote_ident(SCHEMA),
            quote_ident(TRIGGER)
        ))
        .await
        .map_err(error("dropping the fence's function"))
}
