//! Streamed transactions on disk.
//!
//! A transaction bigger than `logical_decoding_work_mem` arrives in blocks
//! before it commits (protocol 2), interleaved with other transactions. Its
//! changes are written to a file under the state directory as they arrive
//! and applied at Stream Commit, in one target transaction; a Stream Abort
//! deletes the file. Memory stays bounded whatever the transaction's size.
//!
//! A subtransaction abort (a savepoint rolled back) truncates the file at
//! the first change of that subtransaction: subtransactions nest, so every
//! later change belongs to it or to its children. This is what
//! PostgreSQL's own apply worker does.
//!
//! The format is one JSON object per line: relation descriptions (each
//! written once per file, before its first change) and changes. Values
//! keep their exact bytes (text as a string when it is UTF-8, hex
//! otherwise).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value as Json, json};

use crate::catalog::TableName;
use crate::change::{Change, ChangeKind, Datum, OldRow, Relation, RelationColumn, Tuple};
use crate::lsn::Lsn;

/// A spill file problem.
#[derive(Debug, thiserror::Error)]
#[error("spill file {path}: {reason}")]
pub struct SpillError {
    path: PathBuf,
    reason: String,
}

fn spill_err(path: &Path, reason: impl ToString) -> SpillError {
    SpillError {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// An I/O failure on `path`; a full disk says what to do about it.
fn io_err(path: &Path, e: std::io::Error) -> SpillError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        return spill_err(
            path,
            format!(
                "{e}: the disk of the state directory is full; free space there (or raise apply.spill_mb to keep larger transactions in memory), then start cutover again: the transaction is streamed again from the slot, nothing is lost"
            ),
        );
    }
    spill_err(path, e)
}

/// The file of one streamed transaction, being written.
#[derive(Debug)]
pub struct SpillWriter {
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
    relations: HashMap<usize, (u64, u32)>,
    next_relation: u32,
    subxact_start: HashMap<u32, u64>,
    changes: u64,
    /// Keeps the relations alive so their addresses stay unique.
    keep: Vec<Arc<Relation>>,
}

impl SpillWriter {
    /// Creates (or empties) the file for transaction `xid` under `dir`.
    pub fn create(dir: &Path, xid: u32) -> Result<SpillWriter, SpillError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let path = dir.join(format!("{xid}.spill"));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        Ok(SpillWriter {
            path,
            out: BufWriter::with_capacity(256 * 1024, file),
            offset: 0,
            relations: HashMap::new(),
            next_relation: 0,
            subxact_start: HashMap::new(),
            changes: 0,
            keep: Vec::new(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes written (and not truncated away).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Bytes written (and not truncated away).
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// Appends a change.
    pub fn push(&mut self, change: &Change) -> Result<(), SpillError> {
        self.subxact_start
            .entry(change.subxid)
            .or_insert(self.offset);
        let relations: Vec<&Arc<Relation>> = match &change.kind {
            ChangeKind::Insert { relation, .. }
            | ChangeKind::Update { relation, .. }
            | ChangeKind::Delete { relation, .. } => {
                vec![relation]
            }
            ChangeKind::Truncate { relations, .. } => relations.iter().collect(),
            ChangeKind::TruncatePartition(_) | ChangeKind::Ddl(_) => Vec::new(),
        };
        let mut ids = Vec::with_capacity(relations.len());
        for relation in relations {
            let address = Arc::as_ptr(relation) as usize;
            let id = match self.relations.get(&address) {
                Some((_, id)) => *id,
                None => {
                    let id = self.next_relation;
                    self.next_relation += 1;
                    let line = json!({ "relation": id, "def": relation_json(relation) });
                    let at = self.offset;
                    self.write_line(&line)?;
                    self.relations.insert(address, (at, id));
                    self.keep.push(Arc::clone(relation));
                    id
                }
            };
            ids.push(id);
        }
        let line = change_json(change, &ids);
        self.write_line(&line)?;
        self.changes += 1;
        Ok(())
    }

    /// Discards the changes of subtransaction `subxid` (and all after it).
    pub fn abort_subtransaction(&mut self, subxid: u32) -> Result<(), SpillError> {
        let Some(&at) = self.subxact_start.get(&subxid) else {
            return Ok(());
        };
        self.out.flush().map_err(|e| io_err(&self.path, e))?;
        let file = self.out.get_mut();
        file.set_len(at).map_err(|e| io_err(&self.path, e))?;
        file.seek(SeekFrom::Start(at))
            .map_err(|e| io_err(&self.path, e))?;
        self.offset = at;
        self.subxact_start.retain(|_, start| *start < at);
        self.relations.retain(|_, (def_at, _)| *def_at < at);
        // Recount what is left; cheap next to the I/O just done.
        self.changes = count_changes(&self.path)?;
        Ok(())
    }

    /// Flushes and closes the file for reading.
    pub fn finish(mut self) -> Result<PathBuf, SpillError> {
        self.out.flush().map_err(|e| io_err(&self.path, e))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| io_err(&self.path, e))?;
        Ok(self.path)
    }

    /// Deletes the file (the transaction aborted).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn write_line(&mut self, line: &Json) -> Result<(), SpillError> {
        let mut bytes = serde_json::to_vec(line).map_err(|e| spill_err(&self.path, e))?;
        bytes.push(b'\n');
        self.out
            .write_all(&bytes)
            .map_err(|e| io_err(&self.path, e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

fn count_changes(path: &Path) -> Result<u64, SpillError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut count = 0;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| io_err(path, e))?;
        if line.starts_with("{\"change\"") {
            count += 1;
        }
    }
    Ok(count)
}

/// Reads a spill file back in batches.
#[derive(Debug)]
pub struct SpillReader {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    relations: HashMap<u64, Arc<Relation>>,
}

impl SpillReader {
    /// Opens a finished file.
    pub fn open(path: &Path) -> Result<SpillReader, SpillError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        Ok(SpillReader {
            path: path.to_owned(),
            lines: BufReader::with_capacity(256 * 1024, file).lines(),
            relations: HashMap::new(),
        })
    }

    /// Up to `max` more changes; empty at the end.
    pub fn next_batch(&mut self, max: usize) -> Result<Vec<Change>, SpillError> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(line) = self.lines.next() else { break };
            let line = line.map_err(|e| io_err(&self.path, e))?;
            let value: Json = serde_json::from_str(&line).map_err(|e| spill_err(&self.path, e))?;
            if let Some(id) = value.get("relation").and_then(Json::as_u64) {
                let relation = relation_from_json(&value["def"])
                    .ok_or_else(|| spill_err(&self.path, "bad relation record"))?;
                self.relations.insert(id, Arc::new(relation));
            } else {
                let change =
                    change_from_json(&value["change"], &self.relations).ok_or_else(|| {
                        spill_err(
                            &self.path,
                            format!(
                                "bad change record: {}",
                                line.chars().take(200).collect::<String>()
                            ),
                        )
                    })?;
                batch.push(change);
            }
        }
        Ok(batch)
    }
}

fn relation_json(relation: &Relation) -> Json {
    json!({
        "oid": relation.oid,
        "schema": relation.name.schema,
        "name": relation.name.name,
        "identity": relation.replica_identity.to_string(),
        "columns": relation.columns.iter().map(|c| json!([c.name, c.type_oid, c.type_modifier, c.key])).collect::<Vec<_>>(),
    })
}

fn relation_from_json(value: &Json) -> Option<Relation> {
    Some(Relation {
        oid: value["oid"].as_u64()? as u32,
        name: TableName::new(value["schema"].as_str()?, value["name"].as_str()?),
        replica_identity: value["identity"].as_str()?.chars().next()?,
        columns: value["columns"]
            .as_array()?
            .iter()
            .map(|c| {
                Some(RelationColumn {
                    name: c[0].as_str()?.to_owned(),
                    type_oid: c[1].as_u64()? as u32,
                    type_modifier: c[2].as_i64()? as i32,
                    key: c[3].as_bool()?,
                })
            })
            .collect::<Option<Vec<_>>>()?,
    })
}

fn datum_json(datum: &Datum) -> Json {
    match datum {
        Datum::Null => Json::Null,
        Datum::UnchangedToast => json!({ "u": 1 }),
        Datum::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Json::String(text.to_owned()),
            Err(_) => json!({ "x": hex(bytes) }),
        },
        Datum::Binary(bytes) => json!({ "b": hex(bytes) }),
    }
}

fn datum_from_json(value: &Json) -> Option<Datum> {
    Some(match value {
        Json::Null => Datum::Null,
        Json::String(text) => Datum::Text(Bytes::from(text.clone().into_bytes())),
        Json::Object(map) if map.contains_key("u") => Datum::UnchangedToast,
        Json::Object(map) if map.contains_key("x") => {
            Datum::Text(Bytes::from(unhex(map["x"].as_str()?)?))
        }
        Json::Object(map) if map.contains_key("b") => {
            Datum::Binary(Bytes::from(unhex(map["b"].as_str()?)?))
        }
        _ => return None,
    })
}

fn tuple_json(tuple: &Tuple) -> Json {
    Json::Array(tuple.0.iter().map(datum_json).collect())
}

fn tuple_from_json(value: &Json) -> Option<Tuple> {
    Some(Tuple(
        value
            .as_array()?
            .iter()
            .map(datum_from_json)
            .collect::<Option<Vec<_>>>()?,
    ))
}

fn change_json(change: &Change, relation_ids: &[u32]) -> Json {
    let (op, extra) = match &change.kind {
        ChangeKind::Insert { new, .. } => ("I", json!({ "new": tuple_json(new) })),
        ChangeKind::Update { old, new, .. } => (
            "U",
            json!({
                "new": tuple_json(new),
                "old": old.as_ref().map(|o| tuple_json(o.tuple())),
                "full": matches!(old, Some(OldRow::Full(_))),
            }),
        ),
        ChangeKind::Delete { old, .. } => (
            "D",
            json!({ "old": tuple_json(old.tuple()), "full": matches!(old, OldRow::Full(_)) }),
        ),
        ChangeKind::Truncate {
            cascade,
            restart_identity,
            ..
        } => (
            "T",
            json!({ "cascade": cascade, "restart": restart_identity }),
        ),
        ChangeKind::TruncatePartition(truncate) => ("P", json!(**truncate)),
        ChangeKind::Ddl(ddl) => ("L", json!(**ddl)),
    };
    json!({ "change": {
        "xid": change.xid,
        "subxid": change.subxid,
        "lsn": change.lsn.as_u64(),
        "ordinal": change.ordinal,
        "origin": change.origin.as_deref(),
        "rels": relation_ids,
        "op": op,
        "data": extra,
    }})
}

fn change_from_json(value: &Json, relations: &HashMap<u64, Arc<Relation>>) -> Option<Change> {
    let rels: Vec<Arc<Relation>> = value["rels"]
        .as_array()?
        .iter()
        .map(|id| relations.get(&id.as_u64()?).cloned())
        .collect::<Option<Vec<_>>>()?;
    let data = &value["data"];
    let old = |full: bool, tuple: Tuple| {
        if full {
            OldRow::Full(tuple)
        } else {
            OldRow::Key(tuple)
        }
    };
    let kind = match value["op"].as_str()? {
        "I" => ChangeKind::Insert {
            relation: rels.first()?.clone(),
            new: tuple_from_json(&data["new"])?,
        },
        "U" => ChangeKind::Update {
            relation: rels.first()?.clone(),
            old: match &data["old"] {
                Json::Null => None,
                t => Some(old(data["full"].as_bool()?, tuple_from_json(t)?)),
            },
            new: tuple_from_json(&data["new"])?,
        },
        "D" => ChangeKind::Delete {
            relation: rels.first()?.clone(),
            old: old(data["full"].as_bool()?, tuple_from_json(&data["old"])?),
        },
        "T" => ChangeKind::Truncate {
            relations: rels,
            cascade: data["cascade"].as_bool()?,
            restart_identity: data["restart"].as_bool()?,
        },
        "P" => ChangeKind::TruncatePartition(Arc::new(serde_json::from_value(data.clone()).ok()?)),
        "L" => ChangeKind::Ddl(Arc::new(serde_json::from_value(data.clone()).ok()?)),
        _ => return None,
    };
    Some(Change {
        xid: value["xid"].as_u64()? as u32,
        subxid: value["subxid"].as_u64()? as u32,
        commit_lsn: None,
        lsn: Lsn::from_u64(value["lsn"].as_u64()?),
        ordinal: value["ordinal"].as_u64()?,
        origin: value["origin"].as_str().map(Arc::from),
        kind,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            name: TableName::new("public", "t"),
            replica_identity: 'd',
            columns: vec![
                RelationColumn {
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    key: true,
                },
                RelationColumn {
                    name: "v".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: false,
                },
            ],
        })
    }

    fn insert(relation: &Arc<Relation>, subxid: u32, id: &str, v: Datum) -> Change {
        Change {
            xid: 7,
            subxid,
            commit_lsn: None,
            lsn: Lsn::from_u64(100),
            ordinal: 0,
            origin: None,
            kind: ChangeKind::Insert {
                relation: relation.clone(),
                new: Tuple(vec![Datum::Text(Bytes::from(id.to_owned())), v]),
            },
        }
    }

    #[test]
    fn changes_round_trip_exactly_and_subtransaction_aborts_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let rel = relation();
        let mut writer = SpillWriter::create(dir.path(), 7).unwrap();
        writer
            .push(&insert(
                &rel,
                7,
                "1",
                Datum::Text(Bytes::from_static(b"plain")),
            ))
            .unwrap();
        writer
            .push(&insert(
                &rel,
                7,
                "2",
                Datum::Text(Bytes::from_static(&[0xff, 0x00])),
            ))
            .unwrap();
        writer
            .push(&insert(&rel, 8, "3", Datum::UnchangedToast))
            .unwrap();
        writer.push(&insert(&rel, 9, "4", Datum::Null)).unwrap();
        writer.abort_subtransaction(8).unwrap();
        assert_eq!(
            writer.changes(),
            2,
            "the aborted subtransaction and its children are gone"
        );
        writer
            .push(&insert(
                &rel,
                10,
                "5",
                Datum::Binary(Bytes::from_static(b"\x01\x02")),
            ))
            .unwrap();
        let path = writer.finish().unwrap();
        let mut reader = SpillReader::open(&path).unwrap();
        let mut all = Vec::new();
        loop {
            let batch = reader.next_batch(2).unwrap();
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        let values: Vec<Datum> = all
            .iter()
            .map(|c| match &c.kind {
                ChangeKind::Insert { new, .. } => new.0[1].clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            values,
            vec![
                Datum::Text(Bytes::from_static(b"plain")),
                Datum::Text(Bytes::from_static(&[0xff, 0x00])),
                Datum::Binary(Bytes::from_static(b"\x01\x02")),
            ]
        );
        assert_eq!(all[2].subxid, 10);
        match &all[0].kind {
            ChangeKind::Insert { relation, .. } => assert_eq!(**relation, *rel),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_partition_truncate_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let truncate = crate::partition::PartitionTruncate {
            partition: crate::catalog::TableName::new("public", "p1"),
            root: crate::catalog::TableName::new("public", "p"),
            bound: "FOR VALUES IN ('fr')".into(),
            parent: crate::catalog::TableName::new("public", "p"),
            constraint: "((country IS NOT NULL) AND (country = 'fr'::text))".into(),
        };
        let change = Change {
            xid: 7,
            subxid: 7,
            commit_lsn: None,
            lsn: Lsn::from_u64(42),
            ordinal: 0,
            origin: None,
            kind: ChangeKind::TruncatePartition(Arc::new(truncate)),
        };
        let mut writer = SpillWriter::create(dir.path(), 7).unwrap();
        writer.push(&change).unwrap();
        let path = writer.finish().unwrap();
        let mut reader = SpillReader::open(&path).unwrap();
        assert_eq!(reader.next_batch(10).unwrap(), vec![change]);
    }
}
