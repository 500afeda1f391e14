//! The guard of tables both servers write (a `bidirectional` table group):
//! a change is applied only if it is later than the row it would
//! overwrite, when an application wrote that row on this server.
//!
//! Inside the batch's target transaction, before its statements, the rows
//! the guarded changes touch are locked (`SELECT ... FOR UPDATE`) and
//! their last writer read: when it committed and under which replication
//! origin (`pg_xact_commit_timestamp_origin(xmin)`, which needs
//! `track_commit_timestamp = on`). A row cutover wrote (one of its
//! origins), a row older than the guard's `clear_until` (the initial
//! copy's, written without an origin), or no row at all: the change is
//! applied. A row an application wrote here: the later commit wins, and
//! at the same time the server the guard favours. A delete wins over a
//! concurrent write on both servers: a delete is always applied, and an
//! update that finds no row here (deleted here) is not. A change that loses is
//! left out of the batch and reported ([`Kept`]): the row here is the
//! later one, and its own stream carries it to the other server, where it
//! wins in turn. The lock keeps an application from writing the rows
//! between the check and the write; a row an application inserts under a
//! new key in that moment is not locked (there was no row to lock), the
//! one race left.

use std::collections::HashMap;
use std::sync::Arc;

use super::PostgresSink;
use super::error::{ApplyError, session_error};
use super::one::{datum_text, show_key};
use super::statements::{cast, unnest_select};
use super::target::key_spec;
use crate::catalog::TableName;
use crate::change::{Change, ChangeKind, Relation, Tuple};
use crate::lsn::Lsn;
use crate::sql::quote_ident;

/// Which tables are guarded.
pub type GuardedFn = dyn Fn(&TableName) -> bool + Send + Sync;

/// Records the changes a batch leaves out, durably, before the batch
/// commits (a record made after could be lost with a crash in between,
/// while the stream would never deliver the changes again).
pub type RecordFn = dyn Fn(&[Kept]) -> Result<(), String> + Send + Sync;

/// How the sink guards the tables both servers write.
#[derive(Clone)]
pub struct Guard {
    /// The tables guarded.
    pub tables: Arc<GuardedFn>,
    /// cutover's replication origins on the server written: rows they
    /// wrote came from the other server and never block a change.
    pub own_origins: Vec<String>,
    /// At equal commit times, the change applied wins (`true`) or the row
    /// here (`false`).
    pub incoming_wins_ties: bool,
    /// Rows committed at or before this time (microseconds since
    /// 2000-01-01) count as cutover's: the initial copy wrote them without
    /// an origin.
    pub clear_until: i64,
    /// Where the changes left out are recorded before the batch commits.
    pub record: Arc<RecordFn>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("own_origins", &self.own_origins)
            .field("incoming_wins_ties", &self.incoming_wins_ties)
            .field("clear_until", &self.clear_until)
            .finish_non_exhaustive()
    }
}

/// A change not applied because the row here was written later by an
/// application on this server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The table.
    pub table: TableName,
    /// The row's key, as reports show it (`(id=1)`).
    pub key: String,
    /// insert, update or delete.
    pub op: &'static str,
    /// The commit position of the change's transaction.
    pub commit_lsn: Lsn,
    /// The change's position in it.
    pub ordinal: u64,
    /// When the change committed, microseconds since 2000-01-01.
    pub incoming_us: i64,
    /// When the row kept here committed; `None`: the row is deleted here
    /// (a delete wins over a concurrent write).
    pub local_us: Option<i64>,
}

/// Who last wrote a row: when (microseconds since 2000-01-01, `None`
/// when the server does not know) and under which origin (`None`: an
/// application).
type LastWriter = (Option<i64>, Option<String>);

/// A guarded change: its table, key columns and key values.
struct Probe<'a> {
    relation: &'a Arc<Relation>,
    tuple: &'a Tuple,
    key: Vec<usize>,
    values: Vec<Option<String>>,
}

fn probe(change: &Change) -> Option<(&Arc<Relation>, &Tuple)> {
    match &change.kind {
        ChangeKind::Insert { relation, new } => Some((relation, new)),
        // An update that moved the key is located by its old key.
        ChangeKind::Update { relation, old, new } => {
            Some((relation, old.as_ref().map_or(new, |o| o.tuple())))
        }
        ChangeKind::Delete { relation, old } => Some((relation, old.tuple())),
        _ => None,
    }
}

impl PostgresSink {
    /// Guards the tables `guard` names from here on.
    pub fn set_guard(&mut self, guard: Guard) {
        self.guard = Some(guard);
    }

    /// The changes left out since the last call.
    pub fn take_kept(&mut self) -> Vec<Kept> {
        std::mem::take(&mut self.kept)
    }

    /// Inside the open transaction (sent first if still pending): locks
    /// the rows the guarded changes of `wanted` touch, and returns the
    /// changes to apply and those that lose.
    pub(super) async fn guarded<'a>(
        &mut self,
        wanted: Vec<(&'a Change, Lsn)>,
    ) -> Result<(Vec<(&'a Change, Lsn)>, Vec<Kept>), ApplyError> {
        let Some(guard) = self.guard.clone() else {
            return Ok((wanted, Vec::new()));
        };
        let mut probes: Vec<Option<Probe<'a>>> = Vec::with_capacity(wanted.len());
        for (change, _) in &wanted {
            let found = match probe(change) {
                Some((relation, tuple)) if (guard.tables)(&relation.name) => {
                    let target = self.target_table(relation).await?;
                    // A table without a key has no row to compare with.
                    key_spec(relation, &target).map(|key| {
                        let values = key.iter().map(|i| datum_text(&tuple.0[*i])).collect();
                        Probe {
                            relation,
                            tuple,
                            key,
                            values,
                        }
                    })
                }
                _ => None,
            };
            probes.push(found);
        }
        if probes.iter().all(Option::is_none) {
            return Ok((wanted, Vec::new()));
        }
        self.begun().await?;
        // Per guarded change (by its index in `probes`), who last wrote
        // its row here; absent: no row.
        let mut local: HashMap<usize, LastWriter> = HashMap::new();
        let mut tables: Vec<&Arc<Relation>> = Vec::new();
        for p in probes.iter().flatten() {
            if !tables.iter().any(|t| t.name == p.relation.name) {
                tables.push(p.relation);
            }
        }
        for relation in tables {
            let target = self.target_table(relation).await?;
            let mine: Vec<(usize, &Probe)> = probes
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
                .filter(|(_, p)| p.relation.name == relation.name)
                .collect();
            let names: Vec<&str> = mine[0]
                .1
                .key
                .iter()
                .map(|i| relation.columns[*i].name.as_str())
                .collect();
            let columns: Vec<Vec<Option<String>>> = (0..names.len())
                .map(|k| mine.iter().map(|(_, p)| p.values[k].clone()).collect())
                .collect();
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
                .iter()
                .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let keys: Vec<String> = names
                .iter()
                .map(|n| format!("t.{}", quote_ident(n)))
                .collect();
            let failed = |what: &str| {
                session_error(format!(
                    "{what} of {} both servers write (track_commit_timestamp must be on)",
                    relation.name
                ))
            };
            // First the lock, then the read in a statement of its own: a
            // row changed between a statement's snapshot and its lock is
            // locked in its new version, but what the same statement
            // computed from the old one stays.
            self.client
                .execute(
                    &format!(
                        "SELECT 1 FROM {} AS t WHERE ROW({}) IN ({}) FOR UPDATE OF t",
                        target.only(&relation.name),
                        keys.join(", "),
                        unnest_select(&names, &target, 1)
                    ),
                    &params,
                )
                .await
                .map_err(failed("locking the rows"))?;
            // Matched by the key's own type (text would differ for
            // char(n), citext...), each row by its probe's position.
            let typed: Vec<String> = names
                .iter()
                .map(|n| format!("u.{0}::{1} AS {0}", quote_ident(n), cast(&target, n)))
                .collect();
            let unnest: Vec<String> = (1..=names.len()).map(|i| format!("${i}::text[]")).collect();
            let joins: Vec<String> = names
                .iter()
                .map(|n| format!("t.{0} = u.{0}", quote_ident(n)))
                .collect();
            let sql = format!(
                "SELECT u.ord, (extract(epoch FROM c.timestamp) * 1000000)::bigint - 946684800000000, o.roname::text \
                   FROM (SELECT {}, u.ord FROM unnest({}) WITH ORDINALITY AS u({}, ord)) AS u \
                   JOIN {} AS t ON {} \
                   LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) AS c ON true \
                   LEFT JOIN pg_replication_origin AS o ON o.roident = c.roident",
                typed.join(", "),
                unnest.join(", "),
                crate::sql::idents(&names),
                target.only(&relation.name),
                joins.join(" AND ")
            );
            let rows = self
                .client
                .query(&sql, &params)
                .await
                .map_err(failed("reading who last wrote the rows"))?;
            for row in rows {
                let read = |row: &tokio_postgres::Row| -> Result<(i64, LastWriter), tokio_postgres::Error> {
                    Ok((row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?)))
                };
                let (ord, writer) =
                    read(&row).map_err(failed("reading who last wrote the rows"))?;
                if let Some((i, _)) = usize::try_from(ord - 1).ok().and_then(|o| mine.get(o)) {
                    local.insert(*i, writer);
                }
            }
        }
        let mut apply = Vec::with_capacity(wanted.len());
        let mut kept = Vec::new();
        let record = Arc::clone(&guard.record);
        for (i, ((change, commit_lsn), probe)) in wanted.into_iter().zip(probes).enumerate() {
            let Some(p) = probe else {
                apply.push((change, commit_lsn));
                continue;
            };
            let incoming_us = self.commit_times.get(&commit_lsn).copied();
            let is_delete = matches!(change.kind, ChangeKind::Delete { .. });
            let is_update = matches!(change.kind, ChangeKind::Update { .. });
            let loses = match local.get(&i) {
                // A delete wins over a concurrent write, on both servers:
                // the only rule both can follow without knowing when a
                // row was deleted.
                _ if is_delete => None,
                // No row here for an update: a delete here won.
                None if is_update => Some((incoming_us.unwrap_or(0), None)),
                None => None,
                Some((Some(local_us), origin))
                    if origin
                        .as_ref()
                        .is_none_or(|o| !guard.own_origins.contains(o))
                        && *local_us > guard.clear_until =>
                {
                    match incoming_us.map(|at| at.cmp(local_us)) {
                        Some(std::cmp::Ordering::Greater) | None => None,
                        Some(std::cmp::Ordering::Equal) if guard.incoming_wins_ties => None,
                        Some(_) => Some((incoming_us.unwrap_or(0), Some(*local_us))),
                    }
                }
                Some(_) => None,
            };
            match loses {
                None => apply.push((change, commit_lsn)),
                Some((incoming_us, local_us)) => {
                    let spec = Some(p.key.clone());
                    kept.push(Kept {
                        table: p.relation.name.clone(),
                        key: show_key(p.relation, &spec, p.tuple),
                        op: change.kind.op(),
                        commit_lsn,
                        ordinal: change.ordinal,
                        incoming_us,
                        local_us,
                    });
                }
            }
        }
        if !kept.is_empty() {
            record(&kept).map_err(|detail| ApplyError::Session {
                what: "recording the conflicts of tables both servers write".into(),
                detail,
                transient: false,
            })?;
        }
        Ok((apply, kept))
    }
}
