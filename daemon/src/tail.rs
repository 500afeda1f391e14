//! `cutover tail`: print the decoded change stream as JSON lines.
//!
//! Operators use it to see what would be replicated; tests use it to see
//! what the decoder makes of real WAL. By default it reads from a
//! temporary slot that disappears when it exits, so it holds no WAL back.
//! With `--slot` it reads an existing slot and leaves it where it was,
//! unless `--advance` confirms what was printed.

use std::io::Write as _;

use cutover_replication::catalog::{self, TableName};
use cutover_replication::change::{ChangeKind, OldRow, Relation, Tuple};
use cutover_replication::client;
use cutover_replication::error::ReplicationError;
use cutover_replication::pgoutput::{Decoder, Event};
use cutover_replication::session::{PgOutputOptions, Session, SnapshotAction};
use cutover_replication::slot;
use cutover_replication::stream::StreamMessage;
use cutover_replication::value::datum_to_json;
use cutover_replication::{Lsn, client::describe};
use serde_json::{Map, Value as Json, json};

use crate::config::Config;

/// Options of `cutover tail`.
#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// Read this existing slot instead of a temporary one.
    pub slot: Option<String>,
    /// Confirm printed transactions so the slot advances.
    pub advance: bool,
    /// Publication to stream; `replication.publication` by default.
    pub publication: Option<String>,
    /// Stop after this many change lines.
    pub limit: Option<u64>,
}

/// Why `tail` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The replication connection failed.
    #[error("source: {err}{}", err.hint().map(|h| format!(" ({h})")).unwrap_or_default())]
    Replication {
        /// The error.
        #[from]
        err: ReplicationError,
    },
    /// A regular connection failed.
    #[error("source: {0}")]
    Connect(#[from] client::ConnectError),
    /// A catalog query failed.
    #[error("source: {0}")]
    Query(String),
    /// The named slot is not there.
    #[error(
        "source: replication slot {0:?} does not exist (create it with cutover run, or omit --slot to use a temporary one)"
    )]
    NoSlot(String),
    /// Stdout failed for another reason than a closed pipe.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

fn query_error(err: tokio_postgres::Error) -> TailError {
    TailError::Query(describe(&err))
}

/// Streams until the limit, the end of the stream, a signal, or a closed
/// stdout.
pub async fn run(config: &Config, options: TailOptions) -> Result<(), TailError> {
    let source = &config.source.conninfo;
    let sql = client::connect(source).await?;
    let publication = options
        .publication
        .clone()
        .unwrap_or_else(|| config.publication.clone());
    if !slot::publication_exists(&sql, &publication)
        .await
        .map_err(query_error)?
    {
        // Only tables whose every change can be published: publishing
        // UPDATE and DELETE of a keyless table would make them fail on the
        // source, and no publication can hold an unlogged table.
        let (tables, left_out): (Vec<catalog::Table>, Vec<catalog::Table>) = catalog::tables(&sql)
            .await
            .map_err(query_error)?
            .into_iter()
            .filter(|t| config.scope.contains(&t.name))
            .partition(|t| crate::coverage::identified(t) && !t.unlogged);
        let tables: Vec<TableName> = tables.into_iter().map(|t| t.name).collect();
        slot::create_publication(
            &sql,
            &publication,
            &tables,
            "insert, update, delete, truncate",
        )
        .await
        .map_err(query_error)?;
        eprintln!(
            "tail: created publication {publication:?} for {} table(s) in scope",
            tables.len()
        );
        for table in left_out {
            eprintln!(
                "tail: {} left out: {}",
                table.name,
                crate::coverage::explain(if table.unlogged {
                    crate::coverage::Coverage::SnapshotOnly
                } else {
                    crate::coverage::Coverage::InsertsOnly
                })
            );
        }
    }

    let mut session = Session::connect(source).await?;
    let (slot_name, start) = match &options.slot {
        Some(name) => {
            let state = slot::slot_state(&sql, name)
                .await
                .map_err(query_error)?
                .ok_or_else(|| TailError::NoSlot(name.clone()))?;
            (name.clone(), state.confirmed_flush.unwrap_or(Lsn::ZERO))
        }
        None => {
            let name = format!("cutover_tail_{}", std::process::id());
            let created = session
                .create_slot(&name, true, SnapshotAction::Nothing)
                .await?;
            (name, created.consistent_point)
        }
    };
    let pgoutput =
        PgOutputOptions::for_server(session.server_version_num(), vec![publication.clone()]);
    let mut stream = session
        .start_replication(&slot_name, start, &pgoutput)
        .await?;
    eprintln!("tail: streaming slot {slot_name:?} of publication {publication:?} from {start}");
    tracing::info!(slot = %slot_name, %start, "tail started");

    let mut decoder = Decoder::new();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut shutdown => break,
            message = stream.next() => message?,
        };
        let Some(message) = message else { break };
        let (lsn, data) = match message {
            StreamMessage::XLogData {
                wal_start, data, ..
            } => (wal_start, data),
            StreamMessage::Keepalive { .. } => continue,
        };
        let event = decoder
            .decode(lsn, data)
            .map_err(|source| ReplicationError::Decode {
                endpoint: stream.endpoint().to_owned(),
                lsn,
                source,
            })?;
        let mut lines = Vec::new();
        match &event {
            Event::Change(change) => lines.extend(change_lines(change)),
            Event::Message(m) => lines.push(json!({
                "lsn": m.lsn,
                "commit_lsn": null,
                "xid": m.xid,
                "op": "message",
                "transactional": m.transactional,
                "prefix": m.prefix,
                "content": String::from_utf8_lossy(&m.content),
            })),
            Event::StreamCommit(c) => lines.push(json!({
                "lsn": c.commit_lsn, "commit_lsn": c.commit_lsn, "xid": c.xid, "op": "stream_commit",
            })),
            Event::StreamAbort { xid, subxid } => lines.push(json!({
                "lsn": lsn, "commit_lsn": null, "xid": xid, "subxid": subxid, "op": "stream_abort",
            })),
            _ => {}
        }
        let mut out = stdout.lock();
        for line in &lines {
            if let Err(err) = writeln!(out, "{line}") {
                return closed_pipe_is_fine(err);
            }
            if line["op"] != "stream_commit" && line["op"] != "stream_abort" {
                printed += 1;
            }
        }
        if let Err(err) = out.flush() {
            return closed_pipe_is_fine(err);
        }
        drop(out);
        if options.advance
            && let Event::Commit(c) | Event::StreamCommit(c) = &event
        {
            // Printed and flushed: confirm it so the slot moves on.
            stream.set_flushed(c.end_lsn);
        }
        if options.limit.is_some_and(|limit| printed >= limit) {
            break;
        }
    }
    stream.stop().await?;
    Ok(())
}

fn closed_pipe_is_fine(err: std::io::Error) -> Result<(), TailError> {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(TailError::Stdout(err))
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        // Without signal handlers, run until the stream ends.
        _ => std::future::pending().await,
    }
}

/// The JSON lines for one change (a TRUNCATE gives one per table).
pub fn change_lines(change: &cutover_replication::change::Change) -> Vec<Json> {
    let base = |relation: &Relation, op: &str| {
        json!({
            "lsn": change.lsn,
            "commit_lsn": change.commit_lsn,
            "xid": change.xid,
            "op": op,
            "schema": relation.name.schema,
            "table": relation.name.name,
            "origin": change.origin.as_deref(),
        })
    };
    match &change.kind {
        ChangeKind::Insert { relation, new } => {
            let mut line = base(relation, "insert");
            line["key"] = key_object(relation, new);
            line["old"] = Json::Null;
            line["new"] = row_object(relation, new, false);
            vec![line]
        }
        ChangeKind::Update { relation, old, new } => {
            let mut line = base(relation, "update");
            line["key"] = key_object(relation, old.as_ref().map(OldRow::tuple).unwrap_or(new));
            line["old"] = old_object(relation, old.as_ref());
            line["new"] = row_object(relation, new, false);
            vec![line]
        }
        ChangeKind::Delete { relation, old } => {
            let mut line = base(relation, "delete");
            line["key"] = key_object(relation, old.tuple());
            line["old"] = old_object(relation, Some(old));
            line["new"] = Json::Null;
            vec![line]
        }
        ChangeKind::Truncate {
            relations,
            cascade,
            restart_identity,
        } => relations
            .iter()
            .map(|relation| {
                let mut line = base(relation, "truncate");
                line["key"] = Json::Null;
                line["old"] = Json::Null;
                line["new"] = Json::Null;
                line["cascade"] = Json::Bool(*cascade);
                line["restart_identity"] = Json::Bool(*restart_identity);
                line
            })
            .collect(),
        ChangeKind::TruncatePartition(truncate) => vec![json!({
            "lsn": change.lsn,
            "commit_lsn": change.commit_lsn,
            "xid": change.xid,
            "op": "truncate",
            "schema": truncate.partition.schema,
            "table": truncate.partition.name,
            "partition_of": truncate.root.to_string(),
            "origin": change.origin.as_deref(),
            "key": Json::Null,
            "old": Json::Null,
            "new": Json::Null,
        })],
        ChangeKind::Ddl(ddl) => vec![json!({
            "lsn": change.lsn,
            "commit_lsn": change.commit_lsn,
            "xid": change.xid,
            "op": "ddl",
            "schema": ddl.table.schema,
            "table": ddl.table.name,
            "origin": change.origin.as_deref(),
            "statement": ddl.statement,
        })],
    }
}

fn row_object(relation: &Relation, tuple: &Tuple, key_only: bool) -> Json {
    let mut map = Map::new();
    for (column, datum) in relation.columns.iter().zip(&tuple.0) {
        if key_only && !column.key {
            continue;
        }
        map.insert(column.name.clone(), datum_to_json(datum, column.type_oid));
    }
    Json::Object(map)
}

fn key_object(relation: &Relation, tuple: &Tuple) -> Json {
    if !relation.columns.iter().any(|c| c.key) {
        return Json::Null;
    }
    row_object(relation, tuple, true)
}

fn old_object(relation: &Relation, old: Option<&OldRow>) -> Json {
    match old {
        None => Json::Null,
        Some(OldRow::Key(tuple)) => row_object(relation, tuple, true),
        Some(OldRow::Full(tuple)) => row_object(relation, tuple, false),
    }
}
