//! Sequences at the switch: logical decoding does not carry them, so the
//! new primary's are set from the old one's before it takes writes.
//!
//! Each sequence is set so that the next value it hands out is at least
//! the one the old primary would have handed out, past the highest value
//! (the lowest, for a descending sequence) of the column that owns it on
//! the new primary, plus an optional gap; a sequence already further on
//! the new primary is left alone, so the step can be run again.

use tokio_postgres::Client;

use crate::catalog::TableName;
use crate::client::describe;
use crate::sql::quote_ident;

/// One sequence as set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceSet {
    /// The sequence.
    pub name: TableName,
    /// The next value on the old primary.
    pub old_next: i64,
    /// The next value on the new primary, as set (or as it was).
    pub new_next: i64,
}

/// Why sequences could not be read or set.
#[derive(Debug, thiserror::Error)]
#[error("{server}: sequence {sequence}: {what}: {detail}")]
pub struct SequenceError {
    /// `source` or `target`.
    pub server: &'static str,
    /// The sequence.
    pub sequence: String,
    /// What was being done.
    pub what: &'static str,
    /// The server's message, or what is wrong.
    pub detail: String,
}

/// How a sequence moves and where it stands on one server.
struct Position {
    increment: i64,
    min: i64,
    max: i64,
    /// The value `nextval` would return now.
    next: i64,
    /// The column that owns it.
    owner: Option<(TableName, String)>,
}

async fn position(
    client: &Client,
    server: &'static str,
    name: &TableName,
) -> Result<Position, SequenceError> {
    let failed = |what: &'static str| {
        move |err: tokio_postgres::Error| SequenceError {
            server,
            sequence: name.to_string(),
            what,
            detail: describe(&err),
        }
    };
    let meta = client
        .query_one(
            "SELECT s.seqincrement, s.seqmin, s.seqmax,
                    (SELECT tn.nspname::text FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid
                       JOIN pg_namespace tn ON tn.oid = tc.relnamespace
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1),
                    (SELECT tc.relname::text FROM pg_depend d JOIN pg_class tc ON tc.oid = d.refobjid
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1),
                    (SELECT a.attname::text FROM pg_depend d
                       JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1)
               FROM pg_sequence s
              WHERE s.seqrelid = $1::text::regclass",
            &[&name.quoted()],
        )
        .await
        .map_err(failed("reading its definition"))?;
    let state = client
        .query_one(
            &format!("SELECT last_value, is_called FROM {}", name.quoted()),
            &[],
        )
        .await
        .map_err(failed("reading its value (needs SELECT on it)"))?;
    let increment: i64 = meta.get(0);
    let last: i64 = state.get(0);
    let called: bool = state.get(1);
    let owner = match (
        meta.get::<_, Option<String>>(3),
        meta.get::<_, Option<String>>(4),
        meta.get::<_, Option<String>>(5),
    ) {
        (Some(schema), Some(table), Some(column)) => Some((TableName::new(schema, table), column)),
        _ => None,
    };
    Ok(Position {
        increment,
        min: meta.get(1),
        max: meta.get(2),
        next: if called {
            last.saturating_add(increment)
        } else {
            last
        },
        owner,
    })
}

/// Sets each of `names` on `new` (the new primary) from `old` (the old
/// one), `gap` values further.
pub async fn carry_over(
    old: &Client,
    old_server: &'static str,
    new: &Client,
    new_server: &'static str,
    names: &[TableName],
    gap: i64,
) -> Result<Vec<SequenceSet>, SequenceError> {
    let mut set = Vec::with_capacity(names.len());
    for name in names {
        let from = position(old, old_server, name).await?;
        let to = position(new, new_server, name).await?;
        let failed = |what: &'static str| {
            move |err: tokio_postgres::Error| SequenceError {
                server: new_server,
                sequence: name.to_string(),
                what,
                detail: describe(&err),
            }
        };
        let ascending = to.increment > 0;
        // The owning column's extreme value on the new primary.
        let column_end: Option<i64> = match &to.owner {
            Some((table, column)) => new
                .query_one(
                    &format!(
                        "SELECT {}({})::bigint FROM {}",
                        if ascending { "max" } else { "min" },
                        quote_ident(column),
                        table.quoted()
                    ),
                    &[],
                )
                .await
                .map_err(failed("reading the highest value of its column"))?
                .get(0),
            None => None,
        };
        let past_column = column_end.map(|v| v.saturating_add(to.increment));
        let wanted = if ascending {
            from.next
                .max(past_column.unwrap_or(i64::MIN))
                .saturating_add(gap)
                .max(to.next)
        } else {
            from.next
                .min(past_column.unwrap_or(i64::MAX))
                .saturating_sub(gap)
                .min(to.next)
        };
        if wanted > to.max || wanted < to.min {
            return Err(SequenceError {
                server: new_server,
                sequence: name.to_string(),
                what: "setting it",
                detail: format!(
                    "the next value would be {wanted}, outside its range {}..{}: ALTER SEQUENCE {} MAXVALUE/MINVALUE, or lower switch.sequence_gap",
                    to.min,
                    to.max,
                    name.quoted()
                ),
            });
        }
        if wanted != to.next {
            new.query_one(
                "SELECT setval($1::text::regclass, $2, false)",
                &[&name.quoted(), &wanted],
            )
            .await
            .map_err(failed("setting it (needs UPDATE on it)"))?;
        }
        set.push(SequenceSet {
            name: name.clone(),
            old_next: from.next,
            new_next: wanted,
        });
    }
    Ok(set)
}
