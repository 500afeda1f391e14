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

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::catalog::TableName;
use crate::change::{Change, ChangeKind, Datum, Relation, Tuple};
use crate::lsn::Lsn;

/// Debezium's stand-in for a TOASTed value that did not change.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// The topic of schema changes, after the feed's prefix.
pub const SCHEMA_CHANGES: &str = "cutover.schema_changes";

/// Where a transaction's changes came from, for `source`: what differs
/// between transactions (the server and database are the [`Encoder`]'s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin<'a> {
    /// `forward` or `reverse`.
    pub direction: &'a str,
    /// The transaction.
    pub xid: u32,
    /// Its commit time, milliseconds since the Unix epoch.
    pub commit_ms: i64,
}

/// Messages encoded into one buffer, produced from it in order: a batch
/// of changes costs a few growing buffers, not three allocations a
/// message.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    items: Vec<Item>,
}

/// One message of a [`Batch`]: where its key and value are in the buffer.
#[derive(Debug)]
struct Item {
    topic: Arc<str>,
    key: Option<(usize, usize)>,
    value: (usize, usize),
    every_partition: bool,
}

/// One message, borrowed from its [`Batch`].
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Its topic's full name, after the feed's prefix. Messages of one
    /// table share the same `Arc`.
    pub topic: &'a Arc<str>,
    /// Its key, JSON (`None`: no key).
    pub key: Option<&'a [u8]>,
    /// Its value, JSON.
    pub value: &'a [u8],
    /// It concerns every key (a truncate): it goes to every partition,
    /// so that each partition's readers see it in order with their keys.
    pub every_partition: bool,
}

impl Batch {
    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }

    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The bytes of its keys and values.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Its messages, in order.
    pub fn records(&self) -> impl Iterator<Item = Record<'_>> {
        self.items.iter().map(|item| Record {
            topic: &item.topic,
            key: item.key.map(|(from, to)| &self.buf[from..to]),
            value: &self.buf[item.value.0..item.value.1],
            every_partition: item.every_partition,
        })
    }

    /// Appends a message whose value is `value` as JSON.
    fn push_json(&mut self, topic: Arc<str>, key: Option<&Value>, value: &Value, every: bool) {
        let key = key.map(|key| {
            let from = self.buf.len();
            // Writing to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut self.buf, key);
            (from, self.buf.len())
        });
        let from = self.buf.len();
        let _ = serde_json::to_writer(&mut self.buf, value);
        self.items.push(Item {
            topic,
            key,
            value: (from, self.buf.len()),
            every_partition: every,
        });
    }
}

/// A row change's parts, as its message carries them.
#[derive(Clone, Copy, Debug)]
struct Row<'a> {
    /// `c`, `u`, `d` or `r`.
    op: &'a str,
    before: Option<&'a Tuple>,
    after: Option<&'a Tuple>,
    /// The row whose key columns make the message's key.
    key_of: &'a Tuple,
}

/// What every message of one table shares, made once per Relation
/// message the stream brings for it.
#[derive(Debug)]
struct Shape {
    /// The relation it was made of: a new Relation message (a column
    /// added, renamed) is a new `Arc`, and makes a new shape.
    relation: Arc<Relation>,
    /// The topic's full name.
    topic: Arc<str>,
    /// `"<column>":` for each column, escaped.
    names: Vec<Box<[u8]>>,
    /// `{"connector":…,"name":…,"db":…,"schema":…,"table":…,"lsn":`
    source: Box<[u8]>,
    /// Whether its rows have a key (REPLICA IDENTITY FULL flags every
    /// column: that is no key).
    keyed: bool,
}

/// Turns changes into Debezium's envelope for one feed: its topics'
/// prefix, and the server and database its `source` names. What each
/// table's messages share (topic, escaped column names, the start of
/// `source`) is made once, not per message: a row change is the feed's
/// hot path.
#[derive(Debug)]
pub struct Encoder {
    prefix: String,
    server: String,
    database: String,
    shapes: HashMap<u32, Shape>,
}

impl Encoder {
    /// An encoder for topics `<prefix>.<schema>.<table>` (no prefix when
    /// `prefix` is empty) of `server`'s `database`.
    pub fn new(prefix: &str, server: &str, database: &str) -> Self {
        Encoder {
            prefix: prefix.to_owned(),
            server: server.to_owned(),
            database: database.to_owned(),
            shapes: HashMap::new(),
        }
    }

    /// The full name of `topic` (after the prefix).
    fn topic(&self, topic: &str) -> String {
        prefixed(&self.prefix, topic)
    }

    /// The shape of `relation`'s messages, made if the relation is new.
    fn shape(&mut self, relation: &Arc<Relation>) -> &Shape {
        let made = |relation| make_shape(&self.prefix, &self.server, &self.database, relation);
        match self.shapes.entry(relation.oid) {
            Entry::Occupied(entry) if Arc::ptr_eq(&entry.get().relation, relation) => {
                entry.into_mut()
            }
            Entry::Occupied(mut entry) => {
                entry.insert(made(relation));
                entry.into_mut()
            }
            Entry::Vacant(entry) => entry.insert(made(relation)),
        }
    }

    /// The envelope's `source` of a change to `table`, for the rare
    /// messages (truncates, schema changes) built as JSON values.
    fn source(
        &self,
        change: &Change,
        origin: &Origin<'_>,
        table: &TableName,
        snapshot: bool,
    ) -> Value {
        json!({
            "connector": "cutover",
            "name": self.server,
            "db": self.database,
            "schema": table.schema,
            "table": table.name,
            "lsn": change.lsn.as_u64(),
            "lsn_text": change.lsn.to_string(),
            "txId": origin.xid,
            "ts_ms": origin.commit_ms,
            "snapshot": snapshot,
            "direction": origin.direction,
        })
    }

    /// Appends the messages of `change` to `out` (none for a schema change
    /// outside the migration's scope). `ts_ms`: when cutover produced
    /// them; `snapshot`: the change is a row of the initial copy (`op`
    /// `r`).
    pub fn encode(
        &mut self,
        change: &Change,
        origin: &Origin<'_>,
        ts_ms: i64,
        snapshot: bool,
        out: &mut Batch,
    ) {
        // A row change: its relation, op, images and the row whose key
        // is the message's.
        let (relation, op, before, after, key_of) = match &change.kind {
            ChangeKind::Insert { relation, new } => {
                let op = if snapshot { "r" } else { "c" };
                (relation, op, None, Some(new), new)
            }
            // A moved key: the message goes under the old key, as the row
            // it changes was found by it.
            ChangeKind::Update { relation, old, new } => (
                relation,
                "u",
                old.as_ref().map(|old| old.tuple()),
                Some(new),
                old.as_ref().map_or(new, |old| old.tuple()),
            ),
            ChangeKind::Delete { relation, old } => {
                (relation, "d", Some(old.tuple()), None, old.tuple())
            }
            _ => return self.rare(change, origin, ts_ms, snapshot, out),
        };
        let row = Row {
            op,
            before,
            after,
            key_of,
        };
        self.row(change, origin, ts_ms, snapshot, relation, &row, out);
    }

    /// The messages of a truncate or a schema change, built as JSON values.
    fn rare(
        &mut self,
        change: &Change,
        origin: &Origin<'_>,
        ts_ms: i64,
        snapshot: bool,
        out: &mut Batch,
    ) {
        match &change.kind {
            ChangeKind::Truncate { relations, .. } => {
                for relation in relations {
                    let topic = Arc::clone(&self.shape(relation).topic);
                    let value = json!({
                        "before": null,
                        "after": null,
                        "source": self.source(change, origin, &relation.name, snapshot),
                        "op": "t",
                        "ts_ms": ts_ms,
                    });
                    out.push_json(topic, None, &value, true);
                }
            }
            ChangeKind::TruncatePartition(truncate) => {
                let value = json!({
                    "before": null,
                    "after": null,
                    "source": self.source(change, origin, &truncate.root, snapshot),
                    "op": "t",
                    "ts_ms": ts_ms,
                    "partition": {
                        "name": truncate.partition.to_string(),
                        "rows": truncate.constraint,
                    },
                });
                let topic = self.topic(&table_topic(&truncate.root));
                out.push_json(topic.into(), None, &value, true);
            }
            ChangeKind::Ddl(ddl) if ddl.in_scope => {
                let value = json!({
                    "source": self.source(change, origin, &ddl.table, snapshot),
                    "ddl": ddl.statement,
                    "tag": ddl.tag,
                    "ts_ms": ts_ms,
                });
                let key = json!({ "table": ddl.table.to_string() });
                let topic = self.topic(SCHEMA_CHANGES);
                out.push_json(topic.into(), Some(&key), &value, false);
            }
            ChangeKind::Ddl(_)
            | ChangeKind::Insert { .. }
            | ChangeKind::Update { .. }
            | ChangeKind::Delete { .. } => {}
        }
    }

    /// One row change's message, written directly in the columns' order:
    /// a tree of `Value`s per message cost more than the rest of the feed.
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        change: &Change,
        origin: &Origin<'_>,
        ts_ms: i64,
        snapshot: bool,
        relation: &Arc<Relation>,
        row: &Row<'_>,
        out: &mut Batch,
    ) {
        let Row {
            op,
            before,
            after,
            key_of,
        } = *row;
        let shape = self.shape(relation);
        let buf = &mut out.buf;
        let key = shape.keyed.then(|| {
            let from = buf.len();
            buf.push(b'{');
            let keyed = relation.columns.iter().zip(&shape.names).zip(&key_of.0);
            let mut first = true;
            for ((column, name), datum) in keyed.filter(|((c, _), _)| c.key) {
                if !first {
                    buf.push(b',');
                }
                first = false;
                buf.extend_from_slice(name);
                write_value(buf, column.type_oid, datum);
            }
            buf.push(b'}');
            (from, buf.len())
        });
        let from = buf.len();
        buf.extend_from_slice(b"{\"before\":");
        write_row(buf, shape, before);
        buf.extend_from_slice(b",\"after\":");
        write_row(buf, shape, after);
        buf.extend_from_slice(b",\"source\":");
        buf.extend_from_slice(&shape.source);
        let mut numbers = itoa::Buffer::new();
        buf.extend_from_slice(numbers.format(change.lsn.as_u64()).as_bytes());
        buf.extend_from_slice(b",\"lsn_text\":\"");
        write_lsn(buf, change.lsn);
        buf.extend_from_slice(b"\",\"txId\":");
        buf.extend_from_slice(numbers.format(origin.xid).as_bytes());
        buf.extend_from_slice(b",\"ts_ms\":");
        buf.extend_from_slice(numbers.format(origin.commit_ms).as_bytes());
        buf.extend_from_slice(if snapshot {
            b",\"snapshot\":true,\"direction\":"
        } else {
            b",\"snapshot\":false,\"direction\":"
        });
        write_str(buf, origin.direction);
        buf.extend_from_slice(b"},\"op\":\"");
        buf.extend_from_slice(op.as_bytes());
        buf.extend_from_slice(b"\",\"ts_ms\":");
        buf.extend_from_slice(numbers.format(ts_ms).as_bytes());
        buf.push(b'}');
        out.items.push(Item {
            topic: Arc::clone(&shape.topic),
            key,
            value: (from, out.buf.len()),
            every_partition: false,
        });
    }
}

/// The full name of `topic` under `prefix` (none when it is empty).
pub fn prefixed(prefix: &str, topic: &str) -> String {
    if prefix.is_empty() {
        topic.to_owned()
    } else {
        format!("{prefix}.{topic}")
    }
}

/// The shape of `relation`'s messages in a feed of `server`'s `database`
/// under `prefix`.
fn make_shape(prefix: &str, server: &str, database: &str, relation: &Arc<Relation>) -> Shape {
    let names = relation
        .columns
        .iter()
        .map(|column| {
            let mut name = Vec::with_capacity(column.name.len() + 3);
            write_str(&mut name, &column.name);
            name.push(b':');
            name.into_boxed_slice()
        })
        .collect();
    let mut source = Vec::with_capacity(128);
    source.extend_from_slice(b"{\"connector\":\"cutover\",\"name\":");
    write_str(&mut source, server);
    source.extend_from_slice(b",\"db\":");
    write_str(&mut source, database);
    source.extend_from_slice(b",\"schema\":");
    write_str(&mut source, &relation.name.schema);
    source.extend_from_slice(b",\"table\":");
    write_str(&mut source, &relation.name.name);
    source.extend_from_slice(b",\"lsn\":");
    Shape {
        relation: Arc::clone(relation),
        topic: prefixed(prefix, &table_topic(&relation.name)).into(),
        names,
        source: source.into_boxed_slice(),
        keyed: relation.replica_identity != 'f' && relation.columns.iter().any(|c| c.key),
    }
}

/// A table's topic, after the feed's prefix: `<schema>.<table>`, each
/// character Kafka does not allow in a topic's name (it takes letters,
/// digits, `.`, `_` and `-`) made `_`, as Debezium does.
pub fn table_topic(table: &TableName) -> String {
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

/// `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Most names and values need no escaping: they are copied as they
    // are. serde_json escapes exactly these bytes, and the rest.
    // No early exit: the compiler checks many bytes at a time.
    let escaped = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escaped {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `lsn`'s text, `X/Y` in upper-case hex, as PostgreSQL writes it (and
/// `Lsn`'s `Display`), without the formatting machinery.
fn write_lsn(out: &mut Vec<u8>, lsn: Lsn) {
    fn hex(out: &mut Vec<u8>, n: u32) {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let digits = (32 - n.leading_zeros()).div_ceil(4).max(1);
        for i in (0..digits).rev() {
            out.push(DIGITS[(n >> (i * 4)) as usize & 0xF]);
        }
    }
    let n = lsn.as_u64();
    hex(out, (n >> 32) as u32);
    out.push(b'/');
    hex(out, n as u32);
}

/// The row as a JSON object by column name, or `null`.
fn write_row(out: &mut Vec<u8>, shape: &Shape, tuple: Option<&Tuple>) {
    let Some(tuple) = tuple else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    let columns = shape.relation.columns.iter().zip(&shape.names);
    for (i, ((column, name), datum)) in columns.zip(&tuple.0).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name);
        write_value(out, column.type_oid, datum);
    }
    out.push(b'}');
}

/// Whether `text` is a JSON integer as it is: an optional minus, then
/// digits without a leading zero.
fn json_integer(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    match digits {
        [] => false,
        [b'0', _, ..] => false,
        _ => digits.iter().all(u8::is_ascii_digit),
    }
}

/// One value of type `type_oid`, written as [`value`] gives it.
fn write_value(out: &mut Vec<u8>, type_oid: u32, datum: &Datum) {
    match datum {
        Datum::Null => out.extend_from_slice(b"null"),
        Datum::Text(bytes) => {
            match type_oid {
                BOOL if **bytes == *b"t" => return out.extend_from_slice(b"true"),
                BOOL if **bytes == *b"f" => return out.extend_from_slice(b"false"),
                // The server's own digits: an integer's text is JSON.
                INT2 | INT4 | INT8 | OID if json_integer(bytes) => {
                    return out.extend_from_slice(bytes);
                }
                _ => {}
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => std::borrow::Cow::Borrowed(text),
                Err(_) => String::from_utf8_lossy(bytes),
            };
            match type_oid {
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
        direction: "forward",
        xid: 7,
        commit_ms: 1_700_000_000_123,
    };

    /// One message, owned, as the tests look at it.
    struct Message {
        topic: String,
        key: Option<String>,
        value: String,
    }

    fn owned(batch: &Batch) -> Vec<Message> {
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
        batch
            .records()
            .map(|record| Message {
                topic: record.topic.to_string(),
                key: record.key.map(text),
                value: text(record.value),
            })
            .collect()
    }

    /// The messages of `change` alone, with no topic prefix.
    fn messages(change: &Change, origin: &Origin<'_>, ts_ms: i64, snapshot: bool) -> Vec<Message> {
        let mut batch = Batch::default();
        Encoder::new("", "source", "app").encode(change, origin, ts_ms, snapshot, &mut batch);
        owned(&batch)
    }

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
    fn a_new_relation_message_for_a_table_changes_its_messages_and_the_prefix_names_topics() {
        let mut encoder = Encoder::new("feed", "source", "app");
        let mut batch = Batch::default();
        let insert = |relation: &Arc<Relation>, id: &str| {
            change(ChangeKind::Insert {
                relation: Arc::clone(relation),
                new: text(&[Some(id), Some("ann"), None, None, None, None]),
            })
        };
        let before = relation('d');
        encoder.encode(&insert(&before, "1"), &ORIGIN, 5, false, &mut batch);
        // The same table (same OID) after `ALTER TABLE ... RENAME COLUMN`
        // and a change of identity: a new Relation message.
        let mut renamed = (*before).clone();
        renamed.columns[1].name = "holder".into();
        renamed.replica_identity = 'f';
        let renamed = Arc::new(renamed);
        encoder.encode(&insert(&renamed, "2"), &ORIGIN, 5, false, &mut batch);
        encoder.encode(&insert(&before, "-3"), &ORIGIN, 5, false, &mut batch);
        let messages = owned(&batch);
        assert_eq!(batch.len(), 3);
        assert!(messages.iter().all(|m| m.topic == "feed.public.accounts"));
        let (key, value) = parsed(&messages[0]);
        assert_eq!(
            (key, &value["after"]["owner"]),
            (Some(json!({"id": 1})), &json!("ann"))
        );
        let (key, value) = parsed(&messages[1]);
        assert_eq!((key, &value["after"]["holder"]), (None, &json!("ann")));
        assert!(value["after"].get("owner").is_none());
        let (key, _) = parsed(&messages[2]);
        assert_eq!(key, Some(json!({"id": -3})));
        let bytes: usize = messages
            .iter()
            .map(|m| m.value.len() + m.key.as_ref().map_or(0, String::len))
            .sum();
        assert_eq!(batch.bytes(), bytes);
    }

    #[test]
    fn an_lsn_is_written_as_postgresql_writes_it() {
        for n in [0, 0x10, 0x1_0000_0010, 0xFFFF_FFFF_FFFF_FFFF, 0xA_0BC0_0000] {
            let mut out = Vec::new();
            write_lsn(&mut out, Lsn::from_u64(n));
            assert_eq!(
                String::from_utf8(out).unwrap(),
                Lsn::from_u64(n).to_string()
            );
        }
    }

    #[test]
    fn only_an_integer_s_own_json_form_is_written_as_a_number() {
        for (text, number) in [
            ("0", true),
            ("-0", true),
            ("12", true),
            ("-9223372036854775808", true),
            ("007", false),
            ("+1", false),
            ("", false),
            ("-", false),
            ("1e3", false),
        ] {
            assert_eq!(json_integer(text.as_bytes()), number, "{text:?}");
        }
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
        let schema = self::messages(&ddl(true), &ORIGIN, 5, false);
        assert_eq!(schema.len(), 1);
        assert_eq!(schema[0].topic, SCHEMA_CHANGES);
        assert_eq!(
            parsed(&schema[0]).1["ddl"],
            "ALTER TABLE accounts ADD COLUMN x int"
        );
        assert!(self::messages(&ddl(false), &ORIGIN, 5, false).is_empty());
        assert_eq!(
            progress("reverse", Lsn::from_u64(16), None),
            r#"{"direction":"reverse","end_lsn":16,"end_lsn_text":"0/10"}"#
        );
    }
}
