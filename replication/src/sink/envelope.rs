//! Changes as Debezium's JSON envelope, the format Kafka consumers of a
//! PostgreSQL change feed already read (docs/kafka.md). Pure: the Kafka
//! sink produces what this returns.
//!
//! Each row change becomes one message on its table's topic
//! (`<schema>.<table>`, after the feed's prefix):
//!
//! - the **key** is the row's key columns as a JSON object (`null` for a
//!   table without a key, whose rows then share one partition);
//! - the **value** is `{"before", "after", "source", "op", "ts_ms"}`, `op`
//!   being `c`, `u`, `d`, `t` or `r` (a snapshot row). `source` names the
//!   server, database, schema and table, the change's position (`lsn`),
//!   its transaction (`txId`), when it committed (`ts_ms`) and cutover's
//!   `direction` (which server it came from across a switch).
//!
//! Values are pgoutput's text forms. Integers and booleans become JSON
//! numbers and booleans. Floats become numbers too, except `NaN` and the
//! infinities, which stay strings. Everything else, `numeric` included,
//! is a string, exactly as the server wrote it, so no digit is lost. A
//! TOASTed value that did not change carries Debezium's placeholder
//! `__debezium_unavailable_value`. A `TRUNCATE` is one `t` message per
//! table. A partition's truncate is a `t` message on its root's topic that
//! names the partition and the rows it held. A schema change goes to the
//! feed's `cutover.schema_changes` topic.

use serde_json::{Value, json};

use crate::change::{Change, ChangeKind, Datum, Relation, Tuple};
use crate::lsn::Lsn;

/// Debezium's stand-in for a TOASTed value that did not change.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// The topic of schema changes, after the feed's prefix.
pub const SCHEMA_CHANGES: &str = "cutover.schema_changes";

/// Where a change came from, for `source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The server's name in the feed (`source` or `target`, or what the
    /// operator calls it).
    pub server: &'a str,
    /// Its database.
    pub database: &'a str,
    /// `forward` or `reverse`.
    pub direction: &'a str,
    /// The transaction.
    pub xid: u32,
    /// Its commit time, milliseconds since the Unix epoch.
    pub commit_ms: i64,
}

/// One message.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Its topic, after the feed's prefix: `<schema>.<table>`.
    pub topic: String,
    /// Its key, JSON (`None`: no key).
    pub key: Option<String>,
    /// Its value, JSON.
    pub value: String,
    /// It concerns every key (a truncate): it goes to every partition,
    /// so that each partition's readers see it in order with their keys.
    pub every_partition: bool,
}

/// The messages of `change` (none for a schema change outside the
/// migration's scope). `ts_ms`: when cutover produced them; `snapshot`:
/// the change is a row of the initial copy (`op` `r`).
pub fn messages(change: &Change, origin: &Origin<'_>, ts_ms: i64, snapshot: bool) -> Vec<Message> {
    let source = |schema: &str, table: &str| {
        json!({
            "connector": "cutover",
            "name": origin.server,
            "db": origin.database,
            "schema": schema,
            "table": table,
            "lsn": change.lsn.as_u64(),
            "lsn_text": change.lsn.to_string(),
            "txId": origin.xid,
            "ts_ms": origin.commit_ms,
            "snapshot": snapshot,
            "direction": origin.direction,
        })
    };
    let row_message = |relation: &Relation,
                       op: &str,
                       before: Option<&Tuple>,
                       after: Option<&Tuple>,
                       key_of: &Tuple| {
        // Written directly, in the columns' order: a row change is the
        // feed's hot path, and a tree of `Value`s per message cost more
        // than the rest of the feed.
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"before\":");
        write_row(&mut out, relation, before);
        out.extend_from_slice(b",\"after\":");
        write_row(&mut out, relation, after);
        out.extend_from_slice(b",\"source\":");
        write_source(&mut out, change, origin, snapshot, &relation.name);
        out.extend_from_slice(b",\"op\":");
        write_str(&mut out, op);
        out.extend_from_slice(b",\"ts_ms\":");
        out.extend_from_slice(ts_ms.to_string().as_bytes());
        out.push(b'}');
        Message {
            topic: topic(relation),
            key: key_text(relation, key_of),
            value: text_of(out),
            every_partition: false,
        }
    };
    match &change.kind {
        ChangeKind::Insert { relation, new } => {
            let op = if snapshot { "r" } else { "c" };
            vec![row_message(relation, op, None, Some(new), new)]
        }
        ChangeKind::Update { relation, old, new } => {
            // A moved key: the message goes under the old key, as the row
            // it changes was found by it.
            let key_of = old.as_ref().map_or(new, |old| old.tuple());
            vec![row_message(
                relation,
                "u",
                old.as_ref().map(|old| old.tuple()),
                Some(new),
                key_of,
            )]
        }
        ChangeKind::Delete { relation, old } => {
            vec![row_message(
                relation,
                "d",
                Some(old.tuple()),
                None,
                old.tuple(),
            )]
        }
        ChangeKind::Truncate { relations, .. } => relations
            .iter()
            .map(|relation| Message {
                topic: topic(relation),
                key: None,
                value: json!({
                    "before": null,
                    "after": null,
                    "source": source(&relation.name.schema, &relation.name.name),
                    "op": "t",
                    "ts_ms": ts_ms,
                })
                .to_string(),
                every_partition: true,
            })
            .collect(),
        ChangeKind::TruncatePartition(truncate) => vec![Message {
            topic: table_topic(&truncate.root),
            key: None,
            value: json!({
                "before": null,
                "after": null,
                "source": source(&truncate.root.schema, &truncate.root.name),
                "op": "t",
                "ts_ms": ts_ms,
                "partition": {
                    "name": truncate.partition.to_string(),
                    "rows": truncate.constraint,
                },
            })
            .to_string(),
            every_partition: true,
        }],
        ChangeKind::Ddl(ddl) if ddl.in_scope => vec![Message {
            topic: SCHEMA_CHANGES.to_owned(),
            key: Some(json!({ "table": ddl.table.to_string() }).to_string()),
            value: json!({
                "source": source(&ddl.table.schema, &ddl.table.name),
                "ddl": ddl.statement,
                "tag": ddl.tag,
                "ts_ms": ts_ms,
            })
            .to_string(),
            every_partition: false,
        }],
        ChangeKind::Ddl(_) => Vec::new(),
    }
}

fn topic(relation: &Relation) -> String {
    table_topic(&relation.name)
}

/// A table's topic, after the feed's prefix: `<schema>.<table>`, each
/// character Kafka does not allow in a topic's name (it takes letters,
/// digits, `.`, `_` and `-`) made `_`, as Debezium does.
pub fn table_topic(table: &crate::catalog::TableName) -> String {
    let clean = |name: &str| -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}.{}", clean(&table.schema), clean(&table.name))
}

/// `text` (valid JSON, so UTF-8) as a `String`.
fn text_of(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The row as a JSON object by column name, or `null`.
fn write_row(out: &mut Vec<u8>, relation: &Relation, tuple: Option<&Tuple>) {
    let Some(tuple) = tuple else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    for (i, (column, datum)) in relation.columns.iter().zip(&tuple.0).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &column.name);
        out.push(b':');
        write_value(out, column.type_oid, datum);
    }
    out.push(b'}');
}

/// The row's key columns as a JSON object, or `None` for a table without
/// a key.
fn key_text(relation: &Relation, tuple: &Tuple) -> Option<String> {
    // REPLICA IDENTITY FULL flags every column: that is no key.
    if relation.replica_identity == 'f' || !relation.columns.iter().any(|c| c.key) {
        return None;
    }
    let mut out = Vec::with_capacity(32);
    out.push(b'{');
    let keyed = relation.columns.iter().zip(&tuple.0).filter(|(c, _)| c.key);
    for (i, (column, datum)) in keyed.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, &column.name);
        out.push(b':');
        write_value(&mut out, column.type_oid, datum);
    }
    out.push(b'}');
    Some(text_of(out))
}

/// The envelope's `source` of `change` to `table`.
fn write_source(
    out: &mut Vec<u8>,
    change: &Change,
    origin: &Origin<'_>,
    snapshot: bool,
    table: &crate::catalog::TableName,
) {
    out.extend_from_slice(b"{\"connector\":\"cutover\",\"name\":");
    write_str(out, origin.server);
    out.extend_from_slice(b",\"db\":");
    write_str(out, origin.database);
    out.extend_from_slice(b",\"schema\":");
    write_str(out, &table.schema);
    out.extend_from_slice(b",\"table\":");
    write_str(out, &table.name);
    out.extend_from_slice(b",\"lsn\":");
    out.extend_from_slice(change.lsn.as_u64().to_string().as_bytes());
    out.extend_from_slice(b",\"lsn_text\":");
    write_str(out, &change.lsn.to_string());
    out.extend_from_slice(b",\"txId\":");
    out.extend_from_slice(origin.xid.to_string().as_bytes());
    out.extend_from_slice(b",\"ts_ms\":");
    out.extend_from_slice(origin.commit_ms.to_string().as_bytes());
    out.extend_from_slice(if snapshot {
        b",\"snapshot\":true,\"direction\":"
    } else {
        b",\"snapshot\":false,\"direction\":"
    });
    write_str(out, origin.direction);
    out.push(b'}');
}

/// One value of type `type_oid`, written as [`value`] gives it.
fn write_value(out: &mut Vec<u8>, type_oid: u32, datum: &Datum) {
    match datum {
        Datum::Null => out.extend_from_slice(b"null"),
        Datum::Text(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            match type_oid {
                BOOL if *text == *"t" => out.extend_from_slice(b"true"),
                BOOL if *text == *"f" => out.extend_from_slice(b"false"),
                INT2 | INT4 | INT8 | OID
                    if !text.starts_with('+') && text.parse::<i64>().is_ok() =>
                {
                    // The server's own digits: an integer's text is JSON.
                    out.extend_from_slice(text.as_bytes());
                }
                FLOAT4 | FLOAT8 => match text.parse::<f64>() {
                    Ok(f) if f.is_finite() => {
                        let _ = serde_json::to_writer(&mut *out, &f);
                    }
                    _ => write_str(out, &text),
                },
                _ => write_str(out, &text),
            }
        }
        // The rare forms go through the `Value` path.
        other => {
            let _ = serde_json::to_writer(&mut *out, &value(type_oid, other));
        }
    }
}

/// Built-in type OIDs written as JSON numbers or booleans.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;

/// One value of type `type_oid`.
fn value(type_oid: u32, datum: &Datum) -> Value {
    let text = match datum {
        Datum::Null => return Value::Null,
        Datum::UnchangedToast => return Value::String(UNAVAILABLE.to_owned()),
        Datum::Text(bytes) => String::from_utf8_lossy(bytes),
        // Text mode is what cutover streams; a binary value is kept as
        // PostgreSQL's hex form rather than guessed at.
        Datum::Binary(bytes) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            return Value::String(format!("\\x{hex}"));
        }
    };
    match type_oid {
        BOOL => match text.as_ref() {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.into_owned()),
        },
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map_or_else(|_| Value::String(text.to_string()), Value::from),
        FLOAT4 | FLOAT8 => text
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(text.to_string()), Value::Number),
        _ => Value::String(text.into_owned()),
    }
}

/// How far the feed published the initial copy's rows (`[kafka]
/// snapshot`), as its progress records carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotMark {
    /// Published up to `table` (in name order), whose blocks before
    /// `block` are published.
    At {
        /// The table (a partition of a partitioned one) being read, in
        /// name order.
        table: crate::catalog::TableName,
        /// Its first block not published.
        block: u64,
    },
    /// Every row published.
    Done,
}

/// The position a batch of messages covers, for the feed's progress
/// record: the end of its last transaction, and how far the snapshot is
/// published when the feed publishes one.
pub fn progress(direction: &str, end_lsn: Lsn, snapshot: Option<&SnapshotMark>) -> String {
    let mut record = json!({ "direction": direction, "end_lsn": end_lsn.as_u64(), "end_lsn_text": end_lsn.to_string() });
    match snapshot {
        None => {}
        Some(SnapshotMark::Done) => record["snapshot"] = json!("done"),
        Some(SnapshotMark::At { table, block }) => {
            record["snapshot"] =
                json!({ "schema": table.schema, "table": table.name, "block": block });
        }
    }
    record.to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::catalog::TableName;
    use crate::change::{OldRow, RelationColumn};

    fn relation(identity: char) -> Arc<Relation> {
        let column = |name: &str, type_oid: u32, key: bool| RelationColumn {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            key,
        };
        Arc::new(Relation {
            oid: 1,
            name: TableName::new("public", "accounts"),
            replica_identity: identity,
            columns: vec![
                column("id", INT8, true),
                column("owner", 25, false),
                column("balance", 1700, false),
                column("active", BOOL, false),
                column("rate", FLOAT8, false),
                column("notes", 25, false),
            ],
        })
    }

    fn text(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| {
                    v.map_or(Datum::Null, |v| {
                        Datum::Text(Bytes::copy_from_slice(v.as_bytes()))
                    })
                })
                .collect(),
        )
    }

    fn change(kind: ChangeKind) -> Change {
        Change {
            xid: 7,
            subxid: 7,
            commit_lsn: None,
            lsn: Lsn::from_u64(0x1_0000_0010),
            ordinal: 0,
            origin: None,
            kind,
        }
    }

    const ORIGIN: Origin<'static> = Origin {
        server: "source",
        database: "app",
        direction: "forward",
        xid: 7,
        commit_ms: 1_700_000_000_123,
    };

    fn parsed(message: &Message) -> (Option<Value>, Value) {
        (
            message
                .key
                .as_deref()
                .map(|k| serde_json::from_str(k).unwrap()),
            serde_json::from_str(&message.value).unwrap(),
        )
    }

    #[test]
    fn an_insert_is_a_c_message_keyed_by_its_key_with_typed_values() {
        let new = text(&[
            Some("1"),
            Some("ann"),
            Some("10.50"),
            Some("t"),
            Some("NaN"),
            None,
        ]);
        let kind = ChangeKind::Insert {
            relation: relation('d'),
            new,
        };
        let messages = messages(&change(kind), &ORIGIN, 5, false);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].topic, "public.accounts");
        let (key, value) = parsed(&messages[0]);
        assert_eq!(key, Some(json!({"id": 1})));
        assert_eq!(value["op"], "c");
        assert_eq!(value["before"], Value::Null);
        assert_eq!(
            value["after"],
            json!({"id": 1, "owner": "ann", "balance": "10.50", "active": true, "rate": "NaN", "notes": null})
        );
        assert_eq!(value["ts_ms"], 5);
        let source = &value["source"];
        assert_eq!(source["table"], "accounts");
        assert_eq!(source["schema"], "public");
        assert_eq!(source["lsn_text"], "1/10");
        assert_eq!(source["txId"], 7);
        assert_eq!(source["ts_ms"], 1_700_000_000_123_i64);
        assert_eq!(source["direction"], "forward");
        assert_eq!(source["snapshot"], false);
        let snapshot = messages_of_snapshot();
        assert_eq!(snapshot["op"], "r");
        assert_eq!(snapshot["source"]["snapshot"], true);
    }

    fn messages_of_snapshot() -> Value {
        let new = text(&[
            Some("2"),
            Some("bo"),
            Some("1"),
            Some("f"),
            Some("1.5"),
            Some("x"),
        ]);
        let kind = ChangeKind::Insert {
            relation: relation('d'),
            new,
        };
        parsed(&messages(&change(kind), &ORIGIN, 5, true)[0]).1
    }

    #[test]
    fn an_update_that_moved_its_key_goes_under_the_old_key_with_both_images() {
        let old = OldRow::Key(text(&[Some("1"), None, None, None, None, None]));
        let mut new = text(&[
            Some("9"),
            Some("ann"),
            Some("1"),
            Some("f"),
            Some("2.25"),
            None,
        ]);
        new.0[5] = Datum::UnchangedToast;
        let kind = ChangeKind::Update {
            relation: relation('d'),
            old: Some(old),
            new,
        };
        let (key, value) = parsed(&messages(&change(kind), &ORIGIN, 5, false)[0]);
        assert_eq!(key, Some(json!({"id": 1})));
        assert_eq!(value["op"], "u");
        assert_eq!(value["before"]["id"], 1);
        assert_eq!(value["after"]["id"], 9);
        assert_eq!(value["after"]["rate"], 2.25);
        assert_eq!(value["after"]["notes"], UNAVAILABLE);
    }

    #[test]
    fn a_delete_carries_the_old_row_and_a_full_identity_table_has_no_key() {
        let old = OldRow::Full(text(&[
            Some("3"),
            Some("cy"),
            Some("0"),
            Some("t"),
            Some("-Infinity"),
            None,
        ]));
        let kind = ChangeKind::Delete {
            relation: relation('f'),
            old,
        };
        let (key, value) = parsed(&messages(&change(kind), &ORIGIN, 5, false)[0]);
        assert_eq!(key, None);
        assert_eq!(value["op"], "d");
        assert_eq!(value["after"], Value::Null);
        assert_eq!(value["before"]["rate"], "-Infinity");
    }

    #[test]
    fn names_and_values_are_escaped_and_columns_keep_the_table_s_order() {
        let mut relation = (*relation('d')).clone();
        relation.columns[1].name = "own\"er\n".into();
        let new = text(&[
            Some("7"),
            Some("a \"quoted\"\\ line\nand\u{1}"),
            Some("1.10"),
            Some("x"),
            Some("1e+20"),
            Some("é"),
        ]);
        let kind = ChangeKind::Insert {
            relation: Arc::new(relation),
            new,
        };
        let message = &messages(&change(kind), &ORIGIN, 5, false)[0];
        let (_, value) = parsed(message);
        let after = &value["after"];
        assert_eq!(after["own\"er\n"], "a \"quoted\"\\ line\nand\u{1}");
        assert_eq!(after["active"], "x", "not a boolean's text: a string");
        assert_eq!(after["rate"], 1e20);
        assert_eq!(after["notes"], "é");
        let order: Vec<usize> = [
            "\"id\"",
            "\"own",
            "\"balance\"",
            "\"active\"",
            "\"rate\"",
            "\"notes\"",
        ]
        .iter()
        .map(|name| message.value.find(name).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{}", message.value);
    }

    #[test]
    fn a_table_whose_name_kafka_refuses_gets_a_topic_with_underscores() {
        let odd = crate::catalog::TableName::new("Sales EU", "orders/2024 é");
        assert_eq!(table_topic(&odd), "Sales_EU.orders_2024__");
        let plain = crate::catalog::TableName::new("public", "line_items-v2");
        assert_eq!(table_topic(&plain), "public.line_items-v2");
    }

    #[test]
    fn a_truncate_is_one_t_message_per_table_and_out_of_scope_ddl_is_none() {
        let other = Arc::new(Relation {
            name: TableName::new("billing", "invoices"),
            ..(*relation('d')).clone()
        });
        let kind = ChangeKind::Truncate {
            relations: vec![relation('d'), other],
            cascade: false,
            restart_identity: false,
        };
        let messages = messages(&change(kind), &ORIGIN, 5, false);
        let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["public.accounts", "billing.invoices"]);
        assert!(
            messages
                .iter()
                .all(|m| m.key.is_none() && parsed(m).1["op"] == "t")
        );
        let ddl = |in_scope| {
            change(ChangeKind::Ddl(Arc::new(crate::ddl::DdlChange {
                tag: "ALTER TABLE".into(),
                table: TableName::new("public", "accounts"),
                statement: "ALTER TABLE accounts ADD COLUMN x int".into(),
                columns: None,
                in_scope,
                primary_key: None,
                published: None,
                dropped_column: None,
            })))
        };
        let schema = super::messages(&ddl(true), &ORIGIN, 5, false);
        assert_eq!(schema.len(), 1);
        assert_eq!(schema[0].topic, SCHEMA_CHANGES);
        assert_eq!(
            parsed(&schema[0]).1["ddl"],
            "ALTER TABLE accounts ADD COLUMN x int"
        );
        assert!(super::messages(&ddl(false), &ORIGIN, 5, false).is_empty());
        assert_eq!(
            progress("reverse", Lsn::from_u64(16), None),
            r#"{"direction":"reverse","end_lsn":16,"end_lsn_text":"0/10"}"#
        );
    }
}
