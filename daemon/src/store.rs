//! cutover's own state, in a sled store under `[state] dir`.
//!
//! Rules for whoever changes this file:
//!
//! - The store is the daemon's memory across restarts, never the truth
//!   about the target: the applied position lives on the target, in the
//!   replication origin written in the same transaction as the rows
//!   (docs/architecture.md invariant 2). The store records plans and progress.
//! - A table's copy is `Copied` only after its last chunk committed on the
//!   target, and that mark is flushed before anything depends on it.
//! - `copied_at` of a table never changes once the table is `Copied`: the
//!   stream skips changes to the table that committed before it.
//! - Values are JSON, so an operator can read them with any sled tool; the
//!   format version is checked on open and a mismatch is an error, never a
//!   silent rewrite. The one older layout this build knows (1) is upgraded
//!   in one atomic batch, and the upgrade is logged.
//! - Records of a stream (its run status, lag samples, refused changes)
//!   are kept per [`Direction`]: `<kind>/<direction>/...`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;
use cutover_replication::snapshot::CopyFormat;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::direction::Direction;

/// The layout version this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// The older layout this build upgrades: lag samples and refused changes
/// were kept under `lag/` and `dead/`, for the forward direction only.
const FORMAT_VERSION_1: &[u8] = b"1";

const KEY_FORMAT: &str = "format_version";
const KEY_COPY_RUN: &str = "copy/run";
/// A `cutover run --resync` begun and not finished.
const KEY_RESYNC: &str = "copy/resync";
const PREFIX_COPY_TABLE: &str = "copy/table/";
const PID_FILE: &str = "cutover.pid";
/// Written beside the database when the store is created: a store whose
/// records vanish while this file exists is damaged.
const MARKER_FILE: &str = "store.json";
/// Lag samples: the key is `lag/<direction>/` and the sample time in
/// big-endian milliseconds, so that a scan returns them in time order.
const PREFIX_LAG: &str = "lag/";

/// The last known run state and position: `run/<direction>/status`.
const PREFIX_RUN: &str = "run/";

/// Refused changes: `dead/<direction>/` and big-endian unix milliseconds.
const PREFIX_DEAD: &str = "dead/";

/// `<kind>/<direction>/`: where a direction's records of one kind live.
fn direction_prefix(kind: &str, direction: Direction) -> String {
    format!("{kind}{}/", direction.as_str())
}
/// The background verifier's last pass over each table
/// ([`crate::live::Divergence`]), by table name.
const PREFIX_DIVERGENCE: &str = "verify/divergence/";
/// Tables whose changes do not all stream, with their counters
/// ([`crate::coverage::Watch`]), by table name.
const PREFIX_WATCH: &str = "coverage/watch/";

mod conflicts;
pub use conflicts::{ConflictRecord, PendingStray};

/// Which server is primary and the switch journal
/// ([`crate::switch::journal::SwitchState`]).
const KEY_SWITCH: &str = "switch/state";

/// A change the target refused. The stream stopped on it (nothing is
/// skipped); the record stays for the operator after the fix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// insert, update, delete, truncate.
    pub op: String,
    /// The table.
    pub table: String,
    /// The key, as `col=value` pairs.
    pub key: String,
    /// The change's source LSN.
    pub lsn: Lsn,
    /// The target's SQLSTATE.
    pub sqlstate: String,
    /// The target's message.
    pub detail: String,
}

/// One lag sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LagSample {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Lag in bytes (`None` when the source could not be asked).
    pub bytes: Option<u64>,
    /// Lag in seconds.
    pub seconds: f64,
    /// WAL the source retained for the slot (absent in older samples).
    #[serde(default)]
    pub retained_bytes: Option<u64>,
    /// The slot's `wal_status` (absent in older samples).
    #[serde(default)]
    pub wal_status: Option<String>,
}

/// What the daemon last recorded about the stream, for `cutover status`
/// when no daemon runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// The state name when it was recorded.
    pub state: String,
    /// The last applied source commit.
    pub applied_lsn: Option<Lsn>,
    /// Unix seconds.
    pub at: u64,
    /// The last error, if the daemon stopped on one.
    pub last_error: Option<String>,
}

/// A store problem, naming the directory and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the store.
    #[error("the state directory {dir} is in use by another cutover process{}: stop it first, or give this one another state.dir", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The holder, from its pid file.
        pid: Option<u32>,
    },
    /// The directory cannot be created or opened.
    #[error("cannot open the state directory {dir}: {reason}")]
    Open {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Written by another version of cutover.
    #[error(
        "the state in {dir} has format version {found}, this cutover reads version {FORMAT_VERSION}: use the cutover version that wrote it"
    )]
    Version {
        /// The directory.
        dir: PathBuf,
        /// The version found.
        found: String,
    },
    /// A value that does not decode: the store is damaged.
    #[error(
        "the state in {dir} is damaged at key {key}: {reason}; it is left as it is (move it aside to start over)"
    )]
    Corrupt {
        /// The directory.
        dir: PathBuf,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// sled failed.
    #[error("the state store in {dir} failed: {reason}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where the snapshot copy stands as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRun {
    /// The slot whose snapshot was copied (and which streams afterwards,
    /// unless `standalone`).
    pub slot: String,
    /// `cutover copy`: a load without a slot kept for streaming.
    pub standalone: bool,
    /// The slot's consistent point; `None` until the slot exists.
    pub consistent_point: Option<Lsn>,
    /// Every table in scope is copied.
    pub finished: bool,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    /// Seconds since the Unix epoch.
    pub finished_at: Option<u64>,
    /// The target's clock when the copy finished, in microseconds since
    /// 2000-01-01 (as PostgreSQL counts commit times): every row the copy
    /// wrote committed before it.
    #[serde(default)]
    pub target_finished_us: Option<i64>,
}

/// A table's copy state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableCopyState {
    /// Not started, or to be copied again from scratch.
    Pending,
    /// Chunks are being copied from the snapshot at `copied_at`.
    Copying,
    /// All rows of the snapshot at `copied_at` are on the target.
    Copied,
}

/// An index dropped for the load, to be rebuilt after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedIndex {
    /// Schema-qualified index name.
    pub name: String,
    /// `pg_get_indexdef()`, the statement that rebuilds it (for a
    /// constraint, `pg_get_constraintdef()`).
    pub definition: String,
    /// For a key: `pg_get_indexdef()` of its index and the index's name,
    /// so that the index is built on its own (beside the table's other
    /// builds) and then attached with `USING INDEX`. `None` on a
    /// partitioned table, where only `ADD CONSTRAINT` works.
    #[serde(default)]
    pub index: Option<(String, String)>,
    /// For a foreign key: the table it references, so that it is put back
    /// as soon as both its tables are copied. `None` otherwise (and in a
    /// record written before this was kept: put back at the end).
    #[serde(default)]
    pub references: Option<TableName>,
}

/// One table's copy: state, position and reconciliation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCopy {
    /// The table.
    pub name: TableName,
    /// Where it stands.
    pub state: TableCopyState,
    /// The snapshot it was (or is being) copied from: changes that
    /// committed before this LSN are in the copy.
    pub copied_at: Lsn,
    /// Chunks planned.
    pub chunks_total: u64,
    /// Chunks committed on the target.
    pub chunks_done: u64,
    /// Rows written by COPY.
    pub rows_copied: u64,
    /// Bytes of COPY data moved.
    pub bytes_copied: u64,
    /// Rows in the source snapshot (`count(*)` in the snapshot).
    pub source_count: Option<i64>,
    /// Rows on the target after the load.
    pub target_count: Option<i64>,
    /// The COPY format used.
    pub format: Option<CopyFormat>,
    /// Indexes dropped for the load and not yet rebuilt.
    pub dropped_indexes: Vec<DroppedIndex>,
    /// CHECK and FOREIGN KEY constraints dropped for the load and not yet
    /// added back (name and `pg_get_constraintdef()`).
    #[serde(default)]
    pub dropped_constraints: Vec<DroppedIndex>,
    /// PRIMARY KEY and UNIQUE constraints dropped for the load and not yet
    /// added back (name and `pg_get_constraintdef()`).
    #[serde(default)]
    pub dropped_keys: Vec<DroppedIndex>,
    /// The table written, when a `[[map]]` writes it to another.
    #[serde(default)]
    pub target: Option<TableName>,
    /// The rows its mapping rejected, by reason, when it can reject.
    #[serde(default)]
    pub rejected: Option<cutover_replication::mapping::Rejected>,
}

impl TableCopy {
    /// A table waiting for its copy from the snapshot at `copied_at`.
    pub fn pending(name: TableName, copied_at: Lsn) -> TableCopy {
        TableCopy {
            name,
            state: TableCopyState::Pending,
            copied_at,
            chunks_total: 0,
            chunks_done: 0,
            rows_copied: 0,
            bytes_copied: 0,
            source_count: None,
            target_count: None,
            format: None,
            dropped_indexes: Vec::new(),
            dropped_constraints: Vec::new(),
            dropped_keys: Vec::new(),
            target: None,
            rejected: None,
        }
    }

    /// Rows rejected by the table's mapping.
    pub fn rejected_rows(&self) -> i64 {
        self.rejected.as_ref().map_or(0, |r| r.total())
    }

    /// The rows the target should hold: the source's, less those rejected.
    pub fn expected(&self) -> Option<i64> {
        Some(self.source_count? - self.rejected_rows())
    }

    /// Target minus expected rows; `None` until both are counted.
    pub fn variance(&self) -> Option<i64> {
        Some(self.target_count? - self.expected()?)
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
}

/// Makes `dir` (the state directory) readable by its owner only, when it
/// is cutover's user's; refuses one that others may write to (they could
/// change what cutover trusts) or that another user owns.
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let refuse = |reason: String| StoreError::Open {
        dir: dir.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| refuse(e.to_string()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "others may write to it (mode {mode:03o}), and it holds what cutover trusts: chmod 700 {}",
            dir.display()
        )));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(refuse(format!(
            "it belongs to user id {}, not to the user running cutover ({}): chown it, or set state.dir",
            meta.uid(),
            nix::unistd::getuid()
        )));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| refuse(format!("making it readable by its owner only: {e}")))?;
        tracing::warn!(dir = %dir.display(), was = format!("{mode:03o}"), "the state directory holds row data: it is readable by its owner only now (700)");
    }
    Ok(())
}

impl Store {
    /// Opens (creating) the store in `dir`; refuses a store in use, of
    /// another format, or damaged.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            dir: dir.to_owned(),
            reason: format!(
                "{e} (create it, writable by the user running cutover, or set state.dir)"
            ),
        })?;
        private_dir(dir)?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("lock")
                    || text.contains("WouldBlock")
                    || text.contains("Resource temporarily unavailable")
                {
                    StoreError::Locked {
                        dir: dir.to_owned(),
                        pid: std::fs::read_to_string(dir.join(PID_FILE))
                            .ok()
                            .and_then(|p| p.trim().parse().ok()),
                    }
                } else {
                    StoreError::Open {
                        dir: dir.to_owned(),
                        reason: sled_reason(&e),
                    }
                }
            })?;
        let store = Store {
            db,
            dir: dir.to_owned(),
        };
        let marker = dir.join(MARKER_FILE);
        match store.db.get(KEY_FORMAT).map_err(|e| store.io(e))? {
            None if marker.exists() => {
                // sled drops a damaged log tail and opens what is left: a
                // store that once existed and lost even its format key is
                // damaged, never to be reset silently.
                return Err(StoreError::Corrupt {
                    dir: dir.to_owned(),
                    key: KEY_FORMAT.to_owned(),
                    reason: format!(
                        "the records are missing although {} says this store was created; restore state.dir from a backup",
                        marker.display()
                    ),
                });
            }
            None => {
                store
                    .db
                    .insert(KEY_FORMAT, FORMAT_VERSION.to_string().as_bytes())
                    .map_err(|e| store.io(e))?;
                store.db.flush().map_err(|e| store.io(e))?;
                std::fs::write(
                    &marker,
                    format!(
                        "{{\"format_version\": {FORMAT_VERSION}, \"created_at\": {}}}\n",
                        now_secs()
                    ),
                )
                .map_err(|e| StoreError::Open {
                    dir: dir.to_owned(),
                    reason: format!("cannot write {}: {e}", marker.display()),
                })?;
            }
            Some(found) if found.as_ref() == FORMAT_VERSION.to_string().as_bytes() => {}
            Some(found) if found.as_ref() == FORMAT_VERSION_1 => store.upgrade_from_1()?,
            Some(found) => {
                return Err(StoreError::Version {
                    dir: dir.to_owned(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                });
            }
        }
        // Best effort: lets a second process name the one holding the lock.
        let _ = std::fs::write(dir.join(PID_FILE), std::process::id().to_string());
        Ok(store)
    }

    /// Moves the forward direction's lag samples and refused changes of a
    /// layout 1 store under their direction, and records layout 2: one
    /// atomic batch, so that a crash leaves either layout whole.
    fn upgrade_from_1(&self) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut moved = 0usize;
        for kind in [PREFIX_LAG, PREFIX_DEAD] {
            let new_prefix = direction_prefix(kind, Direction::Forward);
            for entry in self.db.scan_prefix(kind) {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                // Layout 1 keys are the prefix and 8 bytes of time.
                if key.len() != kind.len() + 8 {
                    continue;
                }
                let mut new_key = new_prefix.as_bytes().to_vec();
                new_key.extend_from_slice(&key[kind.len()..]);
                batch.remove(key);
                batch.insert(new_key, value);
                moved += 1;
            }
        }
        batch.insert(KEY_FORMAT, FORMAT_VERSION.to_string().as_bytes());
        self.db.apply_batch(batch).map_err(|e| self.io(e))?;
        self.db.flush().map_err(|e| self.io(e))?;
        tracing::info!(
            dir = %self.dir.display(),
            records = moved,
            "state store upgraded from layout 1 to {FORMAT_VERSION} (records kept per direction)"
        );
        Ok(())
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The copy run, if one was started.
    pub fn copy_run(&self) -> Result<Option<CopyRun>, StoreError> {
        self.get(KEY_COPY_RUN)
    }

    /// Records the copy run.
    pub fn put_copy_run(&self, run: &CopyRun) -> Result<(), StoreError> {
        self.put(KEY_COPY_RUN, run)
    }

    /// Whether a `cutover run --resync` began and did not finish: the
    /// target may lack changes the new slot will never bring.
    pub fn resync_pending(&self) -> Result<bool, StoreError> {
        Ok(self.get::<bool>(KEY_RESYNC)?.unwrap_or(false))
    }

    /// Marks a resync begun (`true`) or ended with the copy run's new
    /// start (`false`, with `run` written in the same batch).
    pub fn put_resync(&self, pending: bool, run: Option<&CopyRun>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(
            KEY_RESYNC,
            serde_json::to_vec(&pending).expect("a bool serializes"),
        );
        if let Some(run) = run {
            batch.insert(
                KEY_COPY_RUN,
                serde_json::to_vec(run).expect("state records serialize to JSON"),
            );
        }
        self.db.apply_batch(batch).map_err(|e| self.io(e))
    }

    /// One table's copy record.
    pub fn table_copy(&self, name: &TableName) -> Result<Option<TableCopy>, StoreError> {
        self.get(&format!("{PREFIX_COPY_TABLE}{name}"))
    }

    /// Records a table's copy.
    pub fn put_table_copy(&self, table: &TableCopy) -> Result<(), StoreError> {
        self.put(&format!("{PREFIX_COPY_TABLE}{}", table.name), table)
    }

    /// Every table's copy record, by name.
    pub fn table_copies(&self) -> Result<Vec<TableCopy>, StoreError> {
        self.db
            .scan_prefix(PREFIX_COPY_TABLE)
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                self.decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    /// Appends a lag sample of `direction`, keeping its newest `keep`
    /// samples.
    pub fn put_lag_sample(
        &self,
        direction: Direction,
        sample: &LagSample,
        keep: usize,
    ) -> Result<(), StoreError> {
        let prefix = direction_prefix(PREFIX_LAG, direction);
        let mut key = prefix.as_bytes().to_vec();
        key.extend_from_slice(&sample.at_ms.to_be_bytes());
        let bytes = serde_json::to_vec(sample).expect("lag samples serialize to JSON");
        self.db.insert(key, bytes).map_err(|e| self.io(e))?;
        // Trim the oldest beyond `keep` (one or two per insert in steady state).
        let count = self.db.scan_prefix(&prefix).keys().count();
        for key in self
            .db
            .scan_prefix(&prefix)
            .keys()
            .take(count.saturating_sub(keep))
        {
            let key = key.map_err(|e| self.io(e))?;
            self.db.remove(key).map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    /// The newest `limit` lag samples of `direction`, oldest first.
    pub fn lag_history(
        &self,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<LagSample>, StoreError> {
        let mut samples = self
            .db
            .scan_prefix(direction_prefix(PREFIX_LAG, direction))
            .values()
            .rev()
            .take(limit)
            .map(|value| {
                let value = value.map_err(|e| self.io(e))?;
                self.decode(PREFIX_LAG, &value)
            })
            .collect::<Result<Vec<LagSample>, StoreError>>()?;
        samples.reverse();
        Ok(samples)
    }

    /// Records a change that `direction` could not apply.
    pub fn put_dead_letter(
        &self,
        direction: Direction,
        letter: &DeadLetter,
    ) -> Result<(), StoreError> {
        let mut key = direction_prefix(PREFIX_DEAD, direction).into_bytes();
        key.extend_from_slice(&letter.at_ms.to_be_bytes());
        let bytes = serde_json::to_vec(letter).expect("dead letters serialize to JSON");
        self.db
            .insert(key, bytes)
            .map(|_| ())
            .map_err(|e| self.io(e))
    }

    /// Every change `direction` could not apply, oldest first.
    pub fn dead_letters(&self, direction: Direction) -> Result<Vec<DeadLetter>, StoreError> {
        self.db
            .scan_prefix(direction_prefix(PREFIX_DEAD, direction))
            .values()
            .map(|value| {
                let value = value.map_err(|e| self.io(e))?;
                self.decode(PREFIX_DEAD, &value)
            })
            .collect()
    }

    /// Records the background verifier's last pass over `table`.
    pub fn put_divergence(
        &self,
        table: &str,
        divergence: &crate::live::Divergence,
    ) -> Result<(), StoreError> {
        self.put(&format!("{PREFIX_DIVERGENCE}{table}"), divergence)
    }

    /// Forgets what was found of `table` (out of scope now).
    pub fn remove_divergence(&self, table: &str) -> Result<(), StoreError> {
        self.db
            .remove(format!("{PREFIX_DIVERGENCE}{table}"))
            .map(|_| ())
            .map_err(|e| self.io(e))
    }

    /// The background verifier's last pass over each table, by name.
    pub fn divergences(&self) -> Result<Vec<(String, crate::live::Divergence)>, StoreError> {
        self.db
            .scan_prefix(PREFIX_DIVERGENCE)
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.io(e))?;
                let table = String::from_utf8_lossy(&key[PREFIX_DIVERGENCE.len()..]).into_owned();
                Ok((table, self.decode(PREFIX_DIVERGENCE, &value)?))
            })
            .collect()
    }

    /// Records a table whose changes do not all stream.
    pub fn put_watch(&self, watch: &crate::coverage::Watch) -> Result<(), StoreError> {
        self.put(&format!("{PREFIX_WATCH}{}", watch.table), watch)
    }

    /// The watch of `table`, if one is recorded.
    pub fn watch(&self, table: &TableName) -> Result<Option<crate::coverage::Watch>, StoreError> {
        self.get(&format!("{PREFIX_WATCH}{table}"))
    }

    /// Every table whose changes do not all stream.
    pub fn watches(&self) -> Result<Vec<crate::coverage::Watch>, StoreError> {
        self.db
            .scan_prefix(PREFIX_WATCH)
            .values()
            .map(|value| {
                let value = value.map_err(|e| self.io(e))?;
                self.decode(PREFIX_WATCH, &value)
            })
            .collect()
    }

    /// Records the state and position of `direction`'s stream.
    pub fn put_run_status(
        &self,
        direction: Direction,
        status: &RunStatus,
    ) -> Result<(), StoreError> {
        self.put(
            &format!("{}status", direction_prefix(PREFIX_RUN, direction)),
            status,
        )
    }

    /// The last recorded state and position of `direction`'s stream.
    pub fn run_status(&self, direction: Direction) -> Result<Option<RunStatus>, StoreError> {
        self.get(&format!(
            "{}status",
            direction_prefix(PREFIX_RUN, direction)
        ))
    }

    /// Which server is primary, and the switch journal (the source and
    /// no journal before the first switch).
    pub fn switch_state(&self) -> Result<crate::switch::journal::SwitchState, StoreError> {
        Ok(self.get(KEY_SWITCH)?.unwrap_or_default())
    }

    /// Records the switch state and makes it durable before returning: a
    /// journal entry is only written ahead if it is on disk.
    pub async fn put_switch_state(
        &self,
        state: &crate::switch::journal::SwitchState,
    ) -> Result<(), StoreError> {
        self.put(KEY_SWITCH, state)?;
        self.flush().await
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| self.io(e))
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.db.get(key).map_err(|e| self.io(e))? {
            None => Ok(None),
            Some(bytes) => self.decode(key, &bytes).map(Some),
        }
    }

    fn decode<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            dir: self.dir.clone(),
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("state records serialize to JSON");
        self.db
            .insert(key, bytes)
            .map(|_| ())
            .map_err(|e| self.io(e))
    }

    fn io(&self, e: sled::Error) -> StoreError {
        StoreError::Io {
            dir: self.dir.clone(),
            reason: sled_reason(&e),
        }
    }
}

/// sled's error, and what to do when the disk is full.
fn sled_reason(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => format!(
            "{e}: the disk of the state directory is full; free space there, then start cutover again (what the store holds is kept)"
        ),
        _ => e.to_string(),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_reopening_and_versions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut table =
                TableCopy::pending(TableName::new("public", "t"), "0/10".parse().unwrap());
            table.state = TableCopyState::Copied;
            store.put_table_copy(&table).unwrap();
            store
                .put_copy_run(&CopyRun {
                    slot: "cutover".into(),
                    standalone: false,
                    consistent_point: Some("0/10".parse().unwrap()),
                    finished: true,
                    started_at: 1,
                    finished_at: Some(2),
                    target_finished_us: None,
                })
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        assert!(store.copy_run().unwrap().unwrap().finished);
        let tables = store.table_copies().unwrap();
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].state, TableCopyState::Copied);
        store.db.insert(KEY_FORMAT, b"99".as_slice()).unwrap();
        store.flush().await.unwrap();
        drop(store);
        let err = reopen(dir.path()).unwrap_err();
        assert!(err.to_string().contains("format version 99"), "{err}");
    }

    /// Opens a store that this process had open: sled's background
    /// flusher may hold the dropped database's file lock for a moment
    /// longer, which a new process (a restarted daemon) never sees.
    fn reopen(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Err(StoreError::Locked { pid, .. })
                    if pid == Some(std::process::id()) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    #[tokio::test]
    async fn a_store_that_lost_its_records_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        // What sled leaves after dropping a damaged log: an empty database.
        std::fs::remove_dir_all(dir.path().join("db")).unwrap();
        let err = reopen(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("damaged") && err.to_string().contains("backup"),
            "{err}"
        );
    }

    #[test]
    fn lag_history_keeps_the_newest_samples_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for at_ms in 1..=10 {
            let sample = LagSample {
                at_ms,
                bytes: Some(at_ms * 100),
                seconds: at_ms as f64,
                retained_bytes: Some(at_ms * 1000),
                wal_status: Some("reserved".to_owned()),
            };
            store
                .put_lag_sample(Direction::Forward, &sample, 4)
                .unwrap();
        }
        let history = store.lag_history(Direction::Forward, 100).unwrap();
        let times: Vec<u64> = history.iter().map(|s| s.at_ms).collect();
        assert_eq!(times, vec![7, 8, 9, 10]);
        assert_eq!(
            store.lag_history(Direction::Forward, 2).unwrap()[0].at_ms,
            9
        );
        assert_eq!(history[0].retained_bytes, Some(7000));
        assert_eq!(history[0].wal_status.as_deref(), Some("reserved"));
    }

    #[tokio::test]
    async fn damaged_values_are_errors_not_resets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .db
            .insert(KEY_COPY_RUN, b"{not json".as_slice())
            .unwrap();
        let err = store.copy_run().unwrap_err();
        assert!(err.to_string().contains("damaged at key copy/run"), "{err}");
    }

    #[tokio::test]
    async fn a_layout_1_store_is_upgraded_with_its_records_kept_per_direction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            // What layout 1 wrote: forward records without a direction.
            store.db.insert(KEY_FORMAT, FORMAT_VERSION_1).unwrap();
            let sample = LagSample {
                at_ms: 7,
                bytes: Some(10),
                seconds: 0.5,
                retained_bytes: None,
                wal_status: None,
            };
            let mut key = PREFIX_LAG.as_bytes().to_vec();
            key.extend_from_slice(&7u64.to_be_bytes());
            store
                .db
                .insert(key, serde_json::to_vec(&sample).unwrap())
                .unwrap();
            let letter = DeadLetter {
                at_ms: 9,
                op: "insert".into(),
                table: "public.t".into(),
                key: "(id=1)".into(),
                lsn: "0/10".parse().unwrap(),
                sqlstate: "23502".into(),
                detail: "null value".into(),
            };
            let mut key = PREFIX_DEAD.as_bytes().to_vec();
            key.extend_from_slice(&9u64.to_be_bytes());
            store
                .db
                .insert(key, serde_json::to_vec(&letter).unwrap())
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        let history = store.lag_history(Direction::Forward, 10).unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].at_ms, 7);
        assert!(
            store
                .lag_history(Direction::Reverse, 10)
                .unwrap()
                .is_empty()
        );
        let letters = store.dead_letters(Direction::Forward).unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].sqlstate, "23502");
        assert!(store.dead_letters(Direction::Reverse).unwrap().is_empty());
        assert_eq!(
            store.db.get(KEY_FORMAT).unwrap().unwrap().as_ref(),
            FORMAT_VERSION.to_string().as_bytes()
        );
    }

    #[test]
    fn each_direction_keeps_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sample = |at_ms| LagSample {
            at_ms,
            bytes: None,
            seconds: 1.0,
            retained_bytes: None,
            wal_status: None,
        };
        store
            .put_lag_sample(Direction::Forward, &sample(1), 10)
            .unwrap();
        store
            .put_lag_sample(Direction::Reverse, &sample(2), 10)
            .unwrap();
        store
            .put_lag_sample(Direction::Reverse, &sample(3), 1)
            .unwrap();
        let at = |d| -> Vec<u64> {
            store
                .lag_history(d, 10)
                .unwrap()
                .iter()
                .map(|s| s.at_ms)
                .collect()
        };
        assert_eq!(at(Direction::Forward), [1]);
        assert_eq!(at(Direction::Reverse), [3]);
    }
}
