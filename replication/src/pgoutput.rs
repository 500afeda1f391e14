//! The pgoutput codec: the bytes of each XLogData message to [`Event`]s,
//! whose changes are the pipeline's own types ([`crate::change`]).
//!
//! It follows "Logical Replication Message Formats" of the PostgreSQL
//! documentation for protocol versions 1 and 2 (streamed transactions).
//! It never does I/O: the stream ([`crate::stream`]) owns the wire, this
//! module owns meaning.
//!
//! Position rules, which the applier relies on:
//!
//! - Every [`Change`] carries its top-level transaction's xid, its own WAL
//!   position, and its ordinal within the transaction.
//! - A non-streamed transaction's commit LSN is known at `Begin` (the
//!   "final LSN"), so its changes carry it.
//! - A streamed transaction's commit LSN is only known at Stream Commit:
//!   its changes carry `commit_lsn: None` and the subtransaction xid they
//!   belong to, so a Stream Abort of a subtransaction can discard exactly
//!   its changes.
//! - A change for a relation whose Relation message was not seen is an
//!   error, never skipped: skipping would lose data silently.
//!
//! Column values are kept as sent (text form or binary, plus the type OID
//! of the column), so nothing is lost in decoding; [`crate::value`] turns
//! them into typed values where needed.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::catalog::TableName;
use crate::change::{
    Change, ChangeKind, Commit, Datum, OldRow, PgTimestamp, Relation, RelationColumn, Tuple,
};
use crate::lsn::Lsn;

/// Truncate option flag: CASCADE.
const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option flag: RESTART IDENTITY.
const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Why a message could not be decoded. Always definite: the stream stops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field.
    #[error("message '{tag}' ends early, reading {what}")]
    Truncated {
        /// The message tag.
        tag: char,
        /// The field being read.
        what: &'static str,
    },
    /// Bytes left over after the last field.
    #[error("message '{tag}' has {extra} unexpected trailing bytes")]
    Trailing {
        /// The message tag.
        tag: char,
        /// How many bytes.
        extra: usize,
    },
    /// An unknown message tag.
    #[error("unknown pgoutput message tag 0x{0:02x}")]
    UnknownMessage(u8),
    /// An unknown tuple column kind.
    #[error("unknown tuple column kind 0x{0:02x}")]
    UnknownColumnKind(u8),
    /// An unknown tuple marker in an Update or Delete.
    #[error("unexpected tuple marker 0x{0:02x} in message '{1}'")]
    UnknownTupleMarker(u8, char),
    /// A change for a relation never described by a Relation message.
    #[error("change for relation OID {0} arrived before its Relation message")]
    UnknownRelation(u32),
    /// The tuple's column count differs from the relation's.
    #[error("tuple of {got} columns for relation {relation} of {expected} columns")]
    ColumnCount {
        /// The relation.
        relation: String,
        /// Columns in the Relation message.
        expected: usize,
        /// Columns in the tuple.
        got: usize,
    },
    /// A name that is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A negative length or count.
    #[error("negative {0}")]
    Negative(&'static str),
    /// A message where the protocol does not allow it.
    #[error("{0}")]
    OutOfPlace(String),
}

/// A user-defined type a Relation refers to (enums, domains, ...).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TypeInfo {
    /// Type OID.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Type name (arrays start with `_`).
    pub name: String,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// The transaction, for transactional messages.
    pub xid: Option<u32>,
    /// Whether it is part of a transaction (else sent immediately).
    pub transactional: bool,
    /// Its WAL position.
    pub lsn: Lsn,
    /// The prefix the writer chose.
    pub prefix: String,
    /// The content.
    pub content: Bytes,
}

/// Everything the decoder produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A transaction starts; it commits at `final_lsn`.
    Begin {
        /// Transaction id.
        xid: u32,
        /// Its commit LSN.
        final_lsn: Lsn,
        /// Its commit time.
        commit_time: PgTimestamp,
    },
    /// The transaction started by the last Begin commits.
    Commit(Commit),
    /// The current transaction came from another node via an origin.
    Origin {
        /// The origin's name.
        name: String,
        /// The commit LSN on the origin node.
        origin_lsn: Lsn,
    },
    /// A relation's description (new, or changed: it replaces the old one).
    Relation(Arc<Relation>),
    /// A user-defined type's name.
    Type(TypeInfo),
    /// A row change.
    Change(Change),
    /// A logical message.
    Message(LogicalMessage),
    /// A block of a streamed (not yet committed) transaction starts.
    StreamStart {
        /// Top-level transaction id.
        xid: u32,
        /// Whether this is its first block.
        first_segment: bool,
    },
    /// The current block of a streamed transaction ends.
    StreamStop {
        /// Top-level transaction id.
        xid: u32,
    },
    /// A streamed transaction commits.
    StreamCommit(Commit),
    /// A streamed transaction, or one of its subtransactions, aborts.
    StreamAbort {
        /// Top-level transaction id.
        xid: u32,
        /// The aborted (sub)transaction; equal to `xid` when the whole
        /// transaction aborts.
        subxid: u32,
    },
}

/// The state that gives bytes meaning: relations, types, transactions.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Looked up for every change: hashed with foldhash, not SipHash.
    relations: HashMap<u32, Arc<Relation>, foldhash::fast::RandomState>,
    types: HashMap<u32, TypeInfo>,
    /// The open non-streamed transaction: xid, final LSN, next ordinal, origin.
    current: Option<OpenTransaction>,
    /// The top-level xid of the open stream block.
    stream_xid: Option<u32>,
    /// Streamed transactions not yet committed or aborted.
    streamed: HashMap<u32, OpenTransaction>,
}

#[derive(Debug, Clone)]
struct OpenTransaction {
    xid: u32,
    final_lsn: Option<Lsn>,
    next_ordinal: u64,
    origin: Option<Arc<str>>,
}

impl Decoder {
    /// A decoder with empty caches.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// The relation last described under `oid`.
    pub fn relation(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// The type last described under `oid`.
    pub fn type_info(&self, oid: u32) -> Option<&TypeInfo> {
        self.types.get(&oid)
    }

    /// Whether a transaction is open (between Begin and Commit).
    pub fn in_transaction(&self) -> bool {
        self.current.is_some()
    }

    /// Decodes one pgoutput message found at `lsn`.
    pub fn decode(&mut self, lsn: Lsn, data: Bytes) -> Result<Event, DecodeError> {
        let tag = *data.first().ok_or(DecodeError::Truncated {
            tag: '?',
            what: "message tag",
        })?;
        let mut r = Reader::new(data.slice(1..), tag as char);
        let event = match tag {
            b'B' => {
                let final_lsn = r.lsn("final LSN")?;
                let commit_time = PgTimestamp::from_micros(r.i64("commit timestamp")?);
                let xid = r.u32("xid")?;
                if self.stream_xid.is_some() {
                    return Err(DecodeError::OutOfPlace(
                        "Begin inside a stream block".into(),
                    ));
                }
                self.current = Some(OpenTransaction {
                    xid,
                    final_lsn: Some(final_lsn),
                    next_ordinal: 0,
                    origin: None,
                });
                Event::Begin {
                    xid,
                    final_lsn,
                    commit_time,
                }
            }
            b'C' => {
                let _flags = r.u8("flags")?;
                let commit_lsn = r.lsn("commit LSN")?;
                let end_lsn = r.lsn("end LSN")?;
                let commit_time = PgTimestamp::from_micros(r.i64("commit timestamp")?);
                let open = self
                    .current
                    .take()
                    .ok_or_else(|| DecodeError::OutOfPlace("Commit without Begin".into()))?;
                Event::Commit(Commit {
                    xid: open.xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            }
            b'O' => {
                let origin_lsn = r.lsn("origin LSN")?;
                let name = r.cstr("origin name")?;
                let origin: Arc<str> = Arc::from(name.as_str());
                match (self.stream_xid, self.current.as_mut()) {
                    (Some(xid), _) => {
                        if let Some(open) = self.streamed.get_mut(&xid) {
                            open.origin = Some(origin);
                        }
                    }
                    (None, Some(open)) => open.origin = Some(origin),
                    (None, None) => {
                        return Err(DecodeError::OutOfPlace(
                            "Origin outside a transaction".into(),
                        ));
                    }
                }
                Event::Origin { name, origin_lsn }
            }
            b'R' => {
                let _xid = self.stream_prefix(&mut r)?;
                let oid = r.u32("relation OID")?;
                let schema = r.cstr("namespace")?;
                let name = r.cstr("relation name")?;
                let replica_identity = r.u8("replica identity")? as char;
                let count = r.count16("column count")?;
                let mut columns = Vec::with_capacity(count.min(1600));
                for _ in 0..count {
                    let flags = r.u8("column flags")?;
                    let name = r.cstr("column name")?;
                    let type_oid = r.u32("column type")?;
                    let type_modifier = r.i32("type modifier")?;
                    columns.push(RelationColumn {
                        name,
                        type_oid,
                        type_modifier,
                        key: flags & 1 == 1,
                    });
                }
                let relation = Arc::new(Relation {
                    oid,
                    name: TableName::new(schema, name),
                    replica_identity,
                    columns,
                });
                self.relations.insert(oid, relation.clone());
                Event::Relation(relation)
            }
            b'Y' => {
                let _xid = self.stream_prefix(&mut r)?;
                let info = TypeInfo {
                    oid: r.u32("type OID")?,
                    schema: r.cstr("type namespace")?,
                    name: r.cstr("type name")?,
                };
                self.types.insert(info.oid, info.clone());
                Event::Type(info)
            }
            b'I' => {
                let subxid = self.stream_prefix(&mut r)?;
                let relation = self.lookup(r.u32("relation OID")?)?;
                match r.u8("tuple marker")? {
                    b'N' => {}
                    other => return Err(DecodeError::UnknownTupleMarker(other, 'I')),
                }
                let new = r.tuple(&relation)?;
                self.change(subxid, lsn, ChangeKind::Insert { relation, new })?
            }
            b'U' => {
                let subxid = self.stream_prefix(&mut r)?;
                let relation = self.lookup(r.u32("relation OID")?)?;
                let mut old = None;
                let new = loop {
                    match r.u8("tuple marker")? {
                        b'K' if old.is_none() => old = Some(OldRow::Key(r.tuple(&relation)?)),
                        b'O' if old.is_none() => old = Some(OldRow::Full(r.tuple(&relation)?)),
                        b'N' => break r.tuple(&relation)?,
                        other => return Err(DecodeError::UnknownTupleMarker(other, 'U')),
                    }
                };
                self.change(subxid, lsn, ChangeKind::Update { relation, old, new })?
            }
            b'D' => {
                let subxid = self.stream_prefix(&mut r)?;
                let relation = self.lookup(r.u32("relation OID")?)?;
                let old = match r.u8("tuple marker")? {
                    b'K' => OldRow::Key(r.tuple(&relation)?),
                    b'O' => OldRow::Full(r.tuple(&relation)?),
                    other => return Err(DecodeError::UnknownTupleMarker(other, 'D')),
                };
                self.change(subxid, lsn, ChangeKind::Delete { relation, old })?
            }
            b'T' => {
                let subxid = self.stream_prefix(&mut r)?;
                let count = r.i32("relation count")?;
                if count < 0 {
                    return Err(DecodeError::Negative("relation count"));
                }
                let options = r.u8("truncate options")?;
                let mut relations = Vec::with_capacity((count as usize).min(1024));
                for _ in 0..count {
                    relations.push(self.lookup(r.u32("relation OID")?)?);
                }
                self.change(
                    subxid,
                    lsn,
                    ChangeKind::Truncate {
                        relations,
                        cascade: options & TRUNCATE_CASCADE != 0,
                        restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
                    },
                )?
            }
            b'M' => {
                let xid = self.stream_prefix(&mut r)?;
                let transactional = r.u8("flags")? & 1 == 1;
                let message_lsn = r.lsn("message LSN")?;
                let prefix = r.cstr("message prefix")?;
                let len = r.i32("content length")?;
                if len < 0 {
                    return Err(DecodeError::Negative("content length"));
                }
                let content = r.bytes(len as usize, "message content")?;
                let xid = xid.or_else(|| {
                    transactional
                        .then(|| self.current.as_ref().map(|t| t.xid))
                        .flatten()
                });
                Event::Message(LogicalMessage {
                    xid,
                    transactional,
                    lsn: message_lsn,
                    prefix,
                    content,
                })
            }
            b'S' => {
                let xid = r.u32("xid")?;
                let first_segment = r.u8("first segment")? == 1;
                if self.stream_xid.is_some() {
                    return Err(DecodeError::OutOfPlace(
                        "Stream Start inside a stream block".into(),
                    ));
                }
                if self.current.is_some() {
                    return Err(DecodeError::OutOfPlace(
                        "Stream Start inside a transaction".into(),
                    ));
                }
                self.stream_xid = Some(xid);
                self.streamed.entry(xid).or_insert(OpenTransaction {
                    xid,
                    final_lsn: None,
                    next_ordinal: 0,
                    origin: None,
                });
                Event::StreamStart { xid, first_segment }
            }
            b'E' => {
                let xid = self.stream_xid.take().ok_or_else(|| {
                    DecodeError::OutOfPlace("Stream Stop without Stream Start".into())
                })?;
                Event::StreamStop { xid }
            }
            b'c' => {
                let xid = r.u32("xid")?;
                let _flags = r.u8("flags")?;
                let commit_lsn = r.lsn("commit LSN")?;
                let end_lsn = r.lsn("end LSN")?;
                let commit_time = PgTimestamp::from_micros(r.i64("commit timestamp")?);
                if self.stream_xid.is_some() {
                    return Err(DecodeError::OutOfPlace(
                        "Stream Commit inside a stream block".into(),
                    ));
                }
                self.streamed.remove(&xid);
                Event::StreamCommit(Commit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            }
            b'A' => {
                let xid = r.u32("xid")?;
                let subxid = r.u32("subtransaction xid")?;
                // Protocol 4 (PostgreSQL 16 parallel apply) adds the abort
                // LSN and time; they are not needed to discard the changes.
                if r.remaining() == 16 {
                    let _abort_lsn = r.lsn("abort LSN")?;
                    let _abort_time = r.i64("abort timestamp")?;
                }
                if self.stream_xid.is_some() {
                    return Err(DecodeError::OutOfPlace(
                        "Stream Abort inside a stream block".into(),
                    ));
                }
                if xid == subxid {
                    self.streamed.remove(&xid);
                }
                Event::StreamAbort { xid, subxid }
            }
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        r.finish()?;
        Ok(event)
    }

    /// Inside a stream block, messages start with the (sub)transaction xid.
    fn stream_prefix(&self, r: &mut Reader) -> Result<Option<u32>, DecodeError> {
        match self.stream_xid {
            Some(_) => Ok(Some(r.u32("xid")?)),
            None => Ok(None),
        }
    }

    fn lookup(&self, oid: u32) -> Result<Arc<Relation>, DecodeError> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(oid))
    }

    fn change(
        &mut self,
        subxid: Option<u32>,
        lsn: Lsn,
        kind: ChangeKind,
    ) -> Result<Event, DecodeError> {
        let (open, subxid) = match (self.stream_xid, subxid) {
            (Some(top), Some(subxid)) => {
                let open = self.streamed.get_mut(&top).ok_or_else(|| {
                    DecodeError::OutOfPlace(format!(
                        "change for unknown streamed transaction {top}"
                    ))
                })?;
                (open, subxid)
            }
            _ => {
                let open = self.current.as_mut().ok_or_else(|| {
                    DecodeError::OutOfPlace(format!("{} outside a transaction", kind.op()))
                })?;
                let xid = open.xid;
                (open, xid)
            }
        };
        let ordinal = open.next_ordinal;
        open.next_ordinal += 1;
        Ok(Event::Change(Change {
            xid: open.xid,
            subxid,
            commit_lsn: open.final_lsn,
            lsn,
            ordinal,
            origin: open.origin.clone(),
            kind,
        }))
    }
}

/// A bounds-checked big-endian reader over one message.
struct Reader {
    buf: Bytes,
    pos: usize,
    tag: char,
}

impl Reader {
    fn new(buf: Bytes, tag: char) -> Reader {
        Reader { buf, pos: 0, tag }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                what,
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..self.pos])
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn::from_u64(self.i64(what)? as u64))
    }

    fn count16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.i16(what)?;
        usize::try_from(n).map_err(|_| DecodeError::Negative(what))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated {
                tag: self.tag,
                what,
            })?;
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|_| DecodeError::InvalidUtf8(what))?
            .to_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                what,
            });
        }
        let slice = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(slice)
    }

    fn tuple(&mut self, relation: &Relation) -> Result<Tuple, DecodeError> {
        let count = self.count16("tuple column count")?;
        if count != relation.columns.len() {
            return Err(DecodeError::ColumnCount {
                relation: relation.name.to_string(),
                expected: relation.columns.len(),
                got: count,
            });
        }
        let mut datums = Vec::with_capacity(count);
        for _ in 0..count {
            let datum = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("column length")?;
                    if len < 0 {
                        return Err(DecodeError::Negative("column length"));
                    }
                    let value = self.bytes(len as usize, "column value")?;
                    if kind == b't' {
                        Datum::Text(value)
                    } else {
                        Datum::Binary(value)
                    }
                }
                other => return Err(DecodeError::UnknownColumnKind(other)),
            };
            datums.push(datum);
        }
        Ok(Tuple(datums))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                tag: self.tag,
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
