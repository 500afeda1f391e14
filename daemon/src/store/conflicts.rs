//! Stray writes and conflicts in the state store: each one's record (what
//! was done), the stray writes a stream recorded and the resolver has not
//! settled yet, and those a `manual` group parked for an operator.

use serde::{Deserialize, Serialize};

use cutover_replication::Lsn;

use super::{Store, StoreError};

/// `conflicts/<position>/<ordinal>`: every stray write and conflict, with
/// what was done about it.
const PREFIX_CONFLICT: &str = "conflicts/";

/// The position the stray-write watcher has handled every target change
/// up to.
const KEY_STRAY_POSITION: &str = "strays/position";
/// `strays/pending/<side>/<position>/<ordinal>/<table>`: stray writes
/// recorded by a stream and not resolved yet ([`PendingStray`]).
const PREFIX_PENDING_STRAY: &str = "strays/pending/";
/// `strays/parked/<id>`: stray writes of `manual` groups, waiting for an
/// operator's `RESOLVE`.
const PREFIX_PARKED_STRAY: &str = "strays/parked/";
/// A stray write (an application's write on the side that is not its
/// group's primary) or a conflict, and what cutover did about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// Its number, for `RESOLVE <id>` (0 in records of earlier versions).
    #[serde(default)]
    pub id: u64,
    /// `stray_write` or `conflict`.
    pub kind: String,
    /// The server the change was made on: `source` or `target`.
    pub side: String,
    /// Its group.
    pub group: String,
    /// The table.
    pub table: String,
    /// insert, update, delete, truncate.
    pub op: String,
    /// The row's key (`(id=1)`), the whole row for a table without a
    /// key, or the table for a truncate.
    pub key: String,
    /// The change's transaction in its server's WAL: its end for a stray
    /// write, its commit for a conflict of a bidirectional group.
    pub lsn: Lsn,
    /// Its position in that transaction.
    pub ordinal: u64,
    /// When it committed, RFC 3339 UTC.
    pub committed_at: String,
    /// `pending` (seen, not resolved yet), `written_back` (the primary's
    /// rows written over the other side's), `carried_over` (the stray
    /// write's row written over the other server's), `equal` (the row
    /// was equal on both sides when read again), `parked` (`manual`),
    /// `chose_source` / `chose_target` (an operator's choice), `failed`
    /// (it could not be settled: parked, with the reason in the log),
    /// `kept_source` / `kept_target` (a bidirectional group's conflict:
    /// that server's later row kept), `reported` (a schema change, which
    /// cannot be written back).
    pub resolution: String,
    /// Where the primary's row was read, on the primary's WAL.
    pub resolved_at: Option<Lsn>,
    /// Unix seconds.
    pub at: u64,
}

/// A stray write seen by a stream and not resolved yet: the record shown
/// meanwhile (resolution `pending`) and the rows to make equal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingStray {
    /// The record, as `SHOW CONFLICTS` shows it until it is resolved.
    pub record: ConflictRecord,
    /// Its table.
    pub table: cutover_replication::catalog::TableName,
    /// The rows the change touched: each one's columns as the change
    /// carried them (by name, as text; `None` for NULL). An update that
    /// moved a key has two: the new key and the old.
    pub rows: Vec<Vec<(String, Option<Vec<u8>>)>>,
    /// The whole table is compared (a truncate).
    pub whole: bool,
    /// When the change committed, microseconds since 2000-01-01 (as
    /// PostgreSQL counts), for `last_write_wins`.
    #[serde(default)]
    pub committed_us: i64,
    /// An operator's choice (`RESOLVE <id> USE SOURCE | TARGET`): that
    /// server's row is written over the other's, whatever the policy.
    #[serde(default)]
    pub use_side: Option<String>,
}

impl PendingStray {
    fn key(&self) -> String {
        format!(
            "{PREFIX_PENDING_STRAY}{}/{:016x}/{:08x}/{}",
            self.record.side,
            self.record.lsn.as_u64(),
            self.record.ordinal,
            self.record.table
        )
    }
}

/// Where a record is kept: a truncate of several tables is one change,
/// the table tells its records apart.
fn conflict_key(record: &ConflictRecord) -> String {
    format!(
        "{PREFIX_CONFLICT}{:016x}/{:08x}/{}/{}",
        record.lsn.as_u64(),
        record.ordinal,
        record.side,
        record.table
    )
}

impl Store {
    /// Records a stray write or a conflict (again: the same change keeps
    /// its one record).
    pub fn put_conflict(&self, record: &ConflictRecord) -> Result<(), StoreError> {
        self.put(&conflict_key(record), record)
    }

    /// Records stray writes a stream saw, to be resolved (each shown as
    /// `pending` meanwhile), durably: the stream acknowledges them after.
    pub async fn put_pending_strays(&self, strays: &[PendingStray]) -> Result<(), StoreError> {
        for stray in strays {
            // Seen again (the stream delivered it again after a failure):
            // its record stands, settled or not.
            if self
                .db
                .contains_key(conflict_key(&stray.record))
                .map_err(|e| self.io(e))?
            {
                continue;
            }
            let mut stray = stray.clone();
            if stray.record.id == 0 {
                stray.record.id = self.new_id()?;
            }
            self.put(&stray.key(), &stray)?;
            self.put_conflict(&stray.record)?;
        }
        self.flush().await
    }

    /// Records a conflict now, durably, unless the same change has its
    /// record already: for the apply, which records before it commits
    /// (a blocking flush, on a path only conflicts take).
    pub fn put_conflict_now(&self, record: &ConflictRecord) -> Result<(), StoreError> {
        if self
            .db
            .contains_key(conflict_key(record))
            .map_err(|e| self.io(e))?
        {
            return Ok(());
        }
        let mut record = record.clone();
        record.id = self.new_id()?;
        self.put_conflict(&record)?;
        self.db.flush().map(|_| ()).map_err(|e| self.io(e))
    }

    /// A new record number.
    pub fn new_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id().map_err(|e| self.io(e))? + 1)
    }

    /// A stray write of a `manual` group set aside for an operator: its
    /// record (`parked`) updated, its pending entry moved, durably.
    pub async fn park_stray(
        &self,
        stray: &PendingStray,
        record: &ConflictRecord,
    ) -> Result<(), StoreError> {
        let mut parked = stray.clone();
        parked.record = record.clone();
        self.put(&format!("{PREFIX_PARKED_STRAY}{:016x}", record.id), &parked)?;
        self.put_conflict(record)?;
        self.db.remove(stray.key()).map_err(|e| self.io(e))?;
        self.flush().await
    }

    /// An operator's choice for parked stray write `id`: it goes back to
    /// the resolver, which writes `side`'s row over the other server's.
    /// `None` when no stray write is parked under that number.
    pub async fn choose_side(
        &self,
        id: u64,
        side: &str,
    ) -> Result<Option<ConflictRecord>, StoreError> {
        let key = format!("{PREFIX_PARKED_STRAY}{id:016x}");
        let Some(mut stray) = self.get::<PendingStray>(&key)? else {
            return Ok(None);
        };
        stray.use_side = Some(side.to_owned());
        stray.record.resolution = format!("use_{side}");
        self.put(&stray.key(), &stray)?;
        self.put_conflict(&stray.record)?;
        self.db.remove(key).map_err(|e| self.io(e))?;
        self.flush().await?;
        Ok(Some(stray.record))
    }

    /// Up to `limit` stray writes not resolved yet, oldest first per side.
    pub fn pending_strays(&self, limit: usize) -> Result<Vec<PendingStray>, StoreError> {
        self.db
            .scan_prefix(PREFIX_PENDING_STRAY)
            .values()
            .take(limit)
            .map(|value| {
                let value = value.map_err(|e| self.io(e))?;
                self.decode(PREFIX_PENDING_STRAY, &value)
            })
            .collect()
    }

    /// A stray write resolved: its record updated, its pending entry gone.
    pub fn resolve_stray(
        &self,
        stray: &PendingStray,
        record: &ConflictRecord,
    ) -> Result<(), StoreError> {
        self.put_conflict(record)?;
        self.db.remove(stray.key()).map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Every stray write and conflict recorded, oldest first.
    pub fn conflicts(&self) -> Result<Vec<ConflictRecord>, StoreError> {
        self.db
            .scan_prefix(PREFIX_CONFLICT)
            .values()
            .map(|value| {
                let value = value.map_err(|e| self.io(e))?;
                self.decode(PREFIX_CONFLICT, &value)
            })
            .collect()
    }

    /// How many conflicts are recorded, and the newest `limit` of them,
    /// newest first: what the status page shows, without decoding them
    /// all.
    pub fn newest_conflicts(
        &self,
        limit: usize,
    ) -> Result<(usize, Vec<ConflictRecord>), StoreError> {
        let count = self.db.scan_prefix(PREFIX_CONFLICT).keys().count();
        let newest = self
            .db
            .scan_prefix(PREFIX_CONFLICT)
            .values()
            .rev()
            .take(limit)
            .map(|value| {
                let value = value.map_err(|e| self.io(e))?;
                self.decode(PREFIX_CONFLICT, &value)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((count, newest))
    }

    /// The position the stray-write watcher of an earlier version handled
    /// everything up to (the reverse stream starts after it).
    pub fn stray_position(&self) -> Result<Option<Lsn>, StoreError> {
        self.get(KEY_STRAY_POSITION)
    }
}
