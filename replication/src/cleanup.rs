//! What `cutover cleanup` removes from a server: every object cutover
//! made there (replication slots, publications, replication origins, the
//! DDL event triggers, the fence and partition TRUNCATE triggers, and the
//! `cutover` schema with its functions and tables), and nothing else: the
//! schema goes only when nothing else is in it. Every removal is
//! `IF EXISTS`, so a second run does nothing.

use tokio_postgres::Client;

use crate::client::describe;
use crate::sql::quote_ident;

/// What one server held of cutover's, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Everything dropped, as `slot cutover`, `publication cutover`, ...
    pub dropped: Vec<String>,
}

/// Why a server could not be cleaned up.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct CleanupError {
    /// What was being done.
    pub what: String,
    /// The server's message, or what is in the way.
    pub detail: String,
}

fn error(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CleanupError {
    let what = what.into();
    move |err| CleanupError {
        what,
        detail: describe(&err),
    }
}

/// The names cutover gives its objects on a server.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// Replication slots.
    pub slots: Vec<String>,
    /// Publications.
    pub publications: Vec<String>,
    /// Replication origins.
    pub origins: Vec<String>,
}

/// Removes every object of `names`, and cutover's triggers, event
/// triggers and schema, from the server `client` is connected to.
pub async fn remove(client: &Client, names: &Names) -> Result<Removed, CleanupError> {
    let mut removed = Removed::default();

    // Slots first: a slot a process streams from is in use, and says so.
    let slots = client
        .query(
            // A verify's slots are temporary: they go with their session.
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &[&names.slots],
        )
        .await
        .map_err(error("reading replication slots"))?;
    for row in &slots {
        let (name, active): (String, bool) = (row.get(0), row.get(1));
        if active {
            return Err(CleanupError {
                what: format!("dropping slot {name}"),
                detail: "a process streams from it: stop `cutover run` (and any verify) first"
                    .into(),
            });
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
            .map_err(error(format!("dropping slot {name}")))?;
        removed.dropped.push(format!("slot {name}"));
    }

    for publication in &names.publications {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[publication],
            )
            .await
            .map_err(error("reading publications"))?
            .is_some();
        if exists {
            client
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}",
                    quote_ident(publication)
                ))
                .await
                .map_err(error(format!("dropping publication {publication}")))?;
            removed.dropped.push(format!("publication {publication}"));
        }
    }

    let event_triggers = client
        .query(
            "SELECT evtname::text FROM pg_event_trigger WHERE evtname = ANY($1)",
            &[&crate::ddl::TRIGGERS.to_vec()],
        )
        .await
        .map_err(error("reading event triggers"))?;
    for row in &event_triggers {
        let name: String = row.get(0);
        client
            .batch_execute(&format!(
                "DROP EVENT TRIGGER IF EXISTS {}",
                quote_ident(&name)
            ))
            .await
            .map_err(error(format!(
                "dropping event trigger {name} (needs superuser)"
            )))?;
        removed.dropped.push(format!("event trigger {name}"));
    }

    let triggers = client
        .query(
            "SELECT t.tgname::text, n.nspname::text, c.relname::text
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname = ANY($1) AND NOT t.tgisinternal
              ORDER BY 2, 3, 1",
            &[&vec![crate::fence::TRIGGER, crate::partition::TRIGGER]],
        )
        .await
        .map_err(error("reading cutover's triggers"))?;
    for row in &triggers {
        let (trigger, schema, table): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let table = crate::catalog::TableName::new(schema, table);
        client
            .batch_execute(&format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                quote_ident(&trigger),
                table.quoted()
            ))
            .await
            .map_err(error(format!("dropping trigger {trigger} on {table}")))?;
        removed
            .dropped
            .push(format!("trigger {trigger} on {table}"));
    }

    let schema = client
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&crate::events::SCHEMA],
        )
        .await
        .map_err(error("reading schemas"))?
        .is_some();
    if schema {
        // cutover's own objects by name, then the schema only if nothing
        // else is in it: an object someone else put there (or a view on
        // the events table) is left, and said so.
        let mut script = format!(
            "DROP TABLE IF EXISTS {schema}.{events}, {schema}.partitions;",
            schema = quote_ident(crate::events::SCHEMA),
            events = quote_ident(crate::events::TABLE),
        );
        for function in [
            crate::fence::TRIGGER,
            crate::partition::TRIGGER,
            "cutover_ddl",
            "cutover_ddl_drop",
        ] {
            script.push_str(&format!(
                "DROP FUNCTION IF EXISTS {}.{}();",
                quote_ident(crate::events::SCHEMA),
                quote_ident(function)
            ));
        }
        script.push_str(&format!(
            "DROP FUNCTION IF EXISTS {}.cutover_register_tree(oid);",
            quote_ident(crate::events::SCHEMA)
        ));
        client
            .batch_execute(&script)
            .await
            .map_err(error("dropping cutover's functions and tables"))?;
        match client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {}",
                quote_ident(crate::events::SCHEMA)
            ))
            .await
        {
            Ok(()) => removed
                .dropped
                .push(format!("schema {}", crate::events::SCHEMA)),
            Err(err) => {
                return Err(CleanupError {
                    what: format!("dropping schema {}", crate::events::SCHEMA),
                    detail: format!(
                        "{}: it holds objects cutover did not make; move them, then run cleanup again",
                        describe(&err)
                    ),
                });
            }
        }
    }

    let origins = client
        .query(
            "SELECT roname::text FROM pg_replication_origin WHERE roname = ANY($1)",
            &[&names.origins],
        )
        .await
        .map_err(error("reading replication origins"))?;
    for row in &origins {
        let name: String = row.get(0);
        client
            .execute("SELECT pg_replication_origin_drop($1)", &[&name])
            .await
            .map_err(error(format!(
                "dropping replication origin {name} (stop `cutover run` first)"
            )))?;
        removed.dropped.push(format!("replication origin {name}"));
    }
    Ok(removed)
}
