//! The running daemon's live state: what it is doing, shared by the pipeline (which writes
//! it), `/metrics`, `/health` and the admin console (which read it), and
//! the pause switch of the applier.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cutover_replication::Lsn;
use serde::Serialize;
use tokio::sync::watch;

use crate::direction::Direction;
use crate::hold::HoldSwitch;
use crate::metrics::Metrics;
use crate::store::now_secs;

/// The daemon's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    /// Connecting, checking.
    Starting,
    /// The snapshot copy runs.
    Copying,
    /// Changes stream and are applied.
    Streaming,
    /// The applier is paused by an operator; the stream holds its position.
    Paused,
    /// A transient failure: waiting to reconnect.
    Reconnecting,
    /// Stopped by a definite error.
    Failed,
    /// Stopped on request.
    Stopped,
}

impl DaemonState {
    /// Every state, for the state gauge.
    pub const ALL: [DaemonState; 7] = [
        DaemonState::Starting,
        DaemonState::Copying,
        DaemonState::Streaming,
        DaemonState::Paused,
        DaemonState::Reconnecting,
        DaemonState::Failed,
        DaemonState::Stopped,
    ];

    /// The lowercase name used in metrics, JSON and the console.
    pub fn name(self) -> &'static str {
        match self {
            DaemonState::Starting => "starting",
            DaemonState::Copying => "copying",
            DaemonState::Streaming => "streaming",
            DaemonState::Paused => "paused",
            DaemonState::Reconnecting => "reconnecting",
            DaemonState::Failed => "failed",
            DaemonState::Stopped => "stopped",
        }
    }
}

/// Error kinds for `cutover_errors_total` (a fixed set, never messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The source connection or stream failed (transient).
    SourceTransient,
    /// The target connection failed (transient).
    TargetTransient,
    /// The Kafka feed failed (transient: a broker down, a transaction
    /// aborted).
    KafkaTransient,
    /// A definite failure: the daemon stopped.
    Definite,
}

impl ErrorKind {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::SourceTransient => "source_transient",
            ErrorKind::TargetTransient => "target_transient",
            ErrorKind::KafkaTransient => "kafka_transient",
            ErrorKind::Definite => "definite",
        }
    }
}

/// The last error, with when it happened.
#[derive(Clone, Debug, Serialize)]
pub struct LastError {
    /// The message (never holds a secret: connection errors name the
    /// endpoint, not the connection string).
    pub message: String,
    /// Unix seconds.
    pub at: u64,
}

/// The latest lag figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Lag {
    /// Source WAL position minus the last applied commit LSN; `None` until
    /// the source was asked.
    pub bytes: Option<u64>,
    /// Seconds since the commit of the oldest change not yet applied.
    pub seconds: f64,
    /// WAL retained by the slot on the source.
    pub slot_retained_bytes: Option<u64>,
    /// The slot's `wal_status`.
    pub wal_status: Option<String>,
    /// WAL left before `max_slot_wal_keep_size` invalidates the slot.
    pub slot_safe_wal_bytes: Option<i64>,
    /// The source's WAL position at the last sample.
    pub source_lsn: Option<String>,
    /// When it was sampled (unix seconds).
    pub sampled_at: Option<u64>,
}

/// Changes applied to one table since the daemon started.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableCounts {
    /// Inserts applied.
    pub inserts: u64,
    /// Updates applied.
    pub updates: u64,
    /// Deletes applied.
    pub deletes: u64,
    /// Truncates applied.
    pub truncates: u64,
}

/// A point-in-time view, as `/health`, the console and `status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    /// Lifecycle state.
    pub state: DaemonState,
    /// The direction this daemon streams.
    pub direction: Direction,
    /// Which server takes writes: `source` until the switch.
    pub primary: &'static str,
    /// The switch or rollback under way, or the last one.
    pub switch: Option<SwitchView>,
    /// The groups moved by `switch --group` whose primary is not
    /// `primary` now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved_groups: Vec<String>,
    /// The replication slot on the source.
    pub slot: String,
    /// The last source commit applied on the target.
    pub applied_lsn: Option<String>,
    /// Lag.
    pub lag: Lag,
    /// Source transactions applied since start.
    pub transactions_applied: u64,
    /// Applied changes per table since start.
    pub tables: BTreeMap<String, TableCounts>,
    /// Per table whose changes do not all stream (keyless append-only,
    /// unlogged): rows the source changed that the stream did not carry.
    pub unstreamed_rows: BTreeMap<String, i64>,
    /// Per table the background verifier compared: its last pass.
    pub divergence: BTreeMap<String, Divergence>,
    /// The last error.
    pub last_error: Option<LastError>,
    /// The last source position the Kafka feed committed (`[kafka]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_committed_lsn: Option<String>,
    /// When the daemon started (unix seconds).
    pub started_at: u64,
    /// Process id.
    pub pid: u32,
}

/// Where the last switch or rollback stands, as `/health`, the console's
/// `SHOW SWITCH` and `status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchView {
    /// `switch` or `rollback`.
    pub kind: &'static str,
    /// Its number.
    pub id: u64,
    /// `in_progress`, `done` or `undone`.
    pub state: &'static str,
    /// The step under way or next, while in progress.
    pub next_step: Option<&'static str>,
    /// Neither server takes writes now (fenced, not yet opened): only
    /// while a switch is under way or was interrupted there.
    pub neither_writable: bool,
    /// Each step with its duration.
    pub journal: Vec<String>,
    /// The write-unavailability window, seconds.
    pub window_seconds: Option<f64>,
}

impl SwitchView {
    /// The view of `state`'s journal.
    pub fn of(state: &crate::switch::journal::SwitchState) -> Option<SwitchView> {
        use crate::switch::journal::{Outcome, Step};
        let journal = state.journal.as_ref()?;
        let in_progress = journal.outcome == Outcome::InProgress;
        Some(SwitchView {
            kind: journal.kind.name(),
            id: journal.id,
            state: match journal.outcome {
                Outcome::InProgress => "in_progress",
                Outcome::Done => "done",
                Outcome::Undone { .. } => "undone",
            },
            next_step: journal.next().filter(|_| in_progress).map(|s| s.name()),
            neither_writable: in_progress && journal.begun(Step::Fence) && !journal.opened(),
            journal: journal.lines(),
            window_seconds: journal.window_ms().map(|ms| ms as f64 / 1000.0),
        })
    }
}

#[derive(Debug)]
struct Inner {
    state: DaemonState,
    applied: Option<Lsn>,
    /// The server's WAL end from a keepalive received while nothing was
    /// pending: everything before it is applied or not ours to apply.
    idle_at: Option<Lsn>,
    lag: Lag,
    last_error: Option<LastError>,
    /// Committed transactions received and not yet applied: end LSN and
    /// commit time, in commit order.
    pending: VecDeque<(Lsn, SystemTime)>,
    transactions: u64,
    tables: BTreeMap<String, TableCounts>,
    unstreamed: BTreeMap<String, i64>,
    divergence: BTreeMap<String, Divergence>,
    switch: crate::switch::journal::SwitchState,
    /// The Kafka feed's last committed position, with `[kafka]`.
    kafka: Option<Lsn>,
}

/// What the background verifier found of one table in its last pass.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Divergence {
    /// Source rows compared.
    pub rows_checked: u64,
    /// Rows that differ (missing, extra or changed on the target).
    pub divergent_rows: u64,
    /// The source position compared.
    pub compared_at: Option<Lsn>,
    /// When the pass over the table ended (unix seconds).
    pub checked_at: u64,
    /// A few differing rows, as `missing on target: (id=1)`.
    pub samples: Vec<String>,
}

/// The shared status of a running daemon.
#[derive(Debug)]
pub struct Status {
    inner: Mutex<Inner>,
    /// The Prometheus families.
    pub metrics: Metrics,
    pause: watch::Sender<bool>,
    /// A verify's hold on the applier ([`crate::hold`]).
    pub hold: HoldSwitch,
    /// The slot streamed and the direction: a switch made through the
    /// console turns the daemon around without a restart.
    stream: Mutex<(String, Direction)>,
    started_at: u64,
    /// Switches and rollbacks asked through the console, for the run loop
    /// ([`crate::switch::desk`]).
    pub desk: crate::switch::desk::Desk,
    /// The stream beside this one (the reverse stream, with `[[group]]`s),
    /// for the console's `HOLD REVERSE`.
    beside: Mutex<Option<Arc<Status>>>,
}

impl Status {
    /// A daemon starting to stream `direction` with `slot`.
    pub fn new(slot: &str, direction: Direction) -> Status {
        let status = Status {
            inner: Mutex::new(Inner {
                state: DaemonState::Starting,
                applied: None,
                idle_at: None,
                lag: Lag::default(),
                last_error: None,
                pending: VecDeque::new(),
                transactions: 0,
                tables: BTreeMap::new(),
                unstreamed: BTreeMap::new(),
                divergence: BTreeMap::new(),
                switch: crate::switch::journal::SwitchState::default(),
                kafka: None,
            }),
            metrics: Metrics::new(),
            pause: watch::channel(false).0,
            hold: HoldSwitch::default(),
            stream: Mutex::new((slot.to_owned(), direction)),
            started_at: now_secs(),
            desk: crate::switch::desk::Desk::default(),
            beside: Mutex::new(None),
        };
        status.set_state(DaemonState::Starting);
        status
    }

    /// The stream beside this one, while it runs.
    pub fn beside(&self) -> Option<Arc<Status>> {
        self.beside
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets (or clears) the stream beside this one.
    pub fn set_beside(&self, beside: Option<Arc<Status>>) {
        *self
            .beside
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = beside;
    }

    /// The direction this daemon streams.
    pub fn direction(&self) -> Direction {
        self.stream_lock().1
    }

    /// The slot this daemon streams from.
    pub fn slot(&self) -> String {
        self.stream_lock().0.clone()
    }

    /// The daemon streams `direction` from `slot` from now on (after a
    /// switch or rollback made through the console).
    pub fn set_stream(&self, slot: &str, direction: Direction) {
        *self.stream_lock() = (slot.to_owned(), direction);
    }

    fn stream_lock(&self) -> std::sync::MutexGuard<'_, (String, Direction)> {
        // A panic while holding this lock leaves plain data behind.
        self.stream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves to `state`, logging the change once.
    pub fn set_state(&self, state: DaemonState) {
        let previous = {
            let mut inner = self.lock();
            std::mem::replace(&mut inner.state, state)
        };
        for s in DaemonState::ALL {
            self.metrics
                .state
                .with_label_values(&[s.name()])
                .set(i64::from(s == state));
        }
        if previous != state {
            tracing::info!(from = previous.name(), to = state.name(), "state changed");
        }
    }

    /// The current state.
    pub fn state(&self) -> DaemonState {
        self.lock().state
    }

    /// Records an error of `kind`.
    pub fn error(&self, kind: ErrorKind, message: &str) {
        self.metrics.errors.with_label_values(&[kind.name()]).inc();
        self.lock().last_error = Some(LastError {
            message: message.to_owned(),
            at: now_secs(),
        });
    }

    /// A committed transaction was queued for the applier.
    pub fn received(&self, end_lsn: Lsn, commit_time: SystemTime) {
        self.lock().pending.push_back((end_lsn, commit_time));
    }

    /// The stream restarts from the durable position: nothing is pending.
    pub fn reset_pending(&self) {
        self.lock().pending.clear();
    }

    /// Transactions up to `position` are applied; `counts` are the changes
    /// of the batch by (table, op).
    pub fn applied(
        &self,
        position: Lsn,
        transactions: u64,
        counts: &BTreeMap<(String, &str), u64>,
    ) {
        self.metrics
            .applied_transactions
            .with_label_values(&[self.direction().as_str()])
            .inc_by(transactions);
        for ((table, op), n) in counts {
            self.metrics
                .applied_changes
                .with_label_values(&[self.direction().as_str(), table, op])
                .inc_by(*n);
        }
        let mut inner = self.lock();
        inner.applied = Some(position);
        inner.transactions += transactions;
        while inner
            .pending
            .front()
            .is_some_and(|(end, _)| *end <= position)
        {
            inner.pending.pop_front();
        }
        for ((table, op), n) in counts {
            let entry = inner.tables.entry(table.clone()).or_default();
            match *op {
                "insert" => entry.inserts += n,
                "update" => entry.updates += n,
                "delete" => entry.deletes += n,
                _ => entry.truncates += n,
            }
        }
    }

    /// Rows of `table` changed on the source that the stream does not
    /// carry (see [`crate::coverage`]).
    pub fn set_unstreamed(&self, table: &str, rows: i64) {
        self.metrics
            .unstreamed_rows
            .with_label_values(&[table])
            .set(rows);
        self.lock().unstreamed.insert(table.to_owned(), rows);
    }

    /// What the background verifier found of `table` in its last pass.
    pub fn set_divergence(&self, table: &str, divergence: Divergence) {
        self.metrics
            .divergent_rows
            .with_label_values(&[table])
            .set(i64::try_from(divergence.divergent_rows).unwrap_or(i64::MAX));
        self.metrics
            .verified_rows
            .with_label_values(&[table])
            .set(i64::try_from(divergence.rows_checked).unwrap_or(i64::MAX));
        self.lock().divergence.insert(table.to_owned(), divergence);
    }

    /// Divergent rows over rows checked, all tables, in the verifier's
    /// last passes (`None` before any).
    pub fn divergent_ratio(&self) -> Option<f64> {
        let inner = self.lock();
        let checked: u64 = inner.divergence.values().map(|d| d.rows_checked).sum();
        let divergent: u64 = inner.divergence.values().map(|d| d.divergent_rows).sum();
        (checked > 0).then(|| divergent as f64 / checked as f64)
    }

    /// The stream starts at `position`: everything before it is on the
    /// target (from the snapshot copy or applied earlier).
    pub fn start_at(&self, position: Lsn) {
        let mut inner = self.lock();
        if inner.applied.is_none_or(|applied| applied < position) {
            inner.applied = Some(position);
        }
    }

    /// A keepalive reported the server's WAL end while the stream was idle
    /// and everything received was applied: the target is caught up to it.
    pub fn caught_up(&self, wal_end: Lsn) {
        let mut inner = self.lock();
        if inner.pending.is_empty() && inner.idle_at.is_none_or(|at| at < wal_end) {
            inner.idle_at = Some(wal_end);
        }
    }

    /// How far the target is caught up, for lag in bytes: the last applied
    /// commit, or a later idle keepalive position.
    pub fn caught_up_lsn(&self) -> Option<Lsn> {
        let inner = self.lock();
        match (inner.applied, inner.idle_at) {
            (Some(a), Some(i)) => Some(a.max(i)),
            (a, i) => a.or(i),
        }
    }

    /// The last applied position.
    pub fn applied_lsn(&self) -> Option<Lsn> {
        self.lock().applied
    }

    /// Seconds since the commit of the oldest pending transaction.
    pub fn lag_seconds(&self) -> f64 {
        let inner = self.lock();
        inner
            .pending
            .front()
            .and_then(|(_, at)| SystemTime::now().duration_since(*at).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// The Kafka feed committed everything up to `end`.
    pub fn kafka_committed(&self, end: Lsn) {
        self.lock().kafka = Some(end);
    }

    /// The Kafka feed's last committed position, with `[kafka]`.
    pub fn kafka_position(&self) -> Option<Lsn> {
        self.lock().kafka
    }

    /// Stores a lag sample and exports it.
    pub fn set_lag(&self, lag: Lag) {
        self.metrics
            .lag_seconds
            .with_label_values(&[self.direction().as_str()])
            .set(lag.seconds);
        if let Some(bytes) = lag.bytes {
            self.metrics
                .lag_bytes
                .with_label_values(&[self.direction().as_str()])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Some(bytes) = lag.slot_retained_bytes {
            self.metrics
                .slot_retained_bytes
                .with_label_values(&[&self.slot()])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Some(current) = lag.wal_status.as_deref() {
            // Label values from the fixed set only; anything else the
            // server may say leaves every series at 0.
            for status in crate::metrics::WAL_STATUSES {
                self.metrics
                    .slot_wal_status
                    .with_label_values(&[self.slot().as_str(), status])
                    .set(i64::from(*status == current));
            }
        }
        self.lock().lag = lag;
    }

    /// Which server is primary and the last switch journal, as the store
    /// holds them.
    pub fn set_switch(&self, state: crate::switch::journal::SwitchState) {
        use crate::switch::journal::Server;
        for server in [Server::Source, Server::Target] {
            self.metrics
                .primary
                .with_label_values(&[server.name()])
                .set(i64::from(state.primary == server));
        }
        if let Some(window) = state.windows_ms.last() {
            self.metrics.switch_window.set(*window as f64 / 1000.0);
        }
        let under_way = state
            .journal
            .as_ref()
            .is_some_and(|journal| journal.outcome == crate::switch::journal::Outcome::InProgress);
        self.metrics.switch_in_progress.set(i64::from(under_way));
        self.lock().switch = state;
    }

    /// A view for `/health`, the console and `status`.
    pub fn view(&self) -> StatusView {
        let seconds = self.lag_seconds();
        let inner = self.lock();
        let mut lag = inner.lag.clone();
        lag.seconds = seconds;
        StatusView {
            state: inner.state,
            direction: self.direction(),
            primary: inner.switch.primary.name(),
            switch: SwitchView::of(&inner.switch),
            moved_groups: inner
                .switch
                .moved_groups()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            slot: self.slot(),
            applied_lsn: inner.applied.map(|l| l.to_string()),
            lag,
            transactions_applied: inner.transactions,
            tables: inner.tables.clone(),
            unstreamed_rows: inner.unstreamed.clone(),
            divergence: inner.divergence.clone(),
            last_error: inner.last_error.clone(),
            kafka_committed_lsn: inner.kafka.map(|l| l.to_string()),
            started_at: self.started_at,
            pid: std::process::id(),
        }
    }

    /// Pauses (`true`) or resumes (`false`) the applier. Returns whether
    /// anything changed.
    pub fn set_paused(&self, paused: bool) -> bool {
        let changed = self.pause.send_replace(paused) != paused;
        if changed {
            let state = self.state();
            match (paused, state) {
                (true, DaemonState::Streaming) => self.set_state(DaemonState::Paused),
                (false, DaemonState::Paused) => self.set_state(DaemonState::Streaming),
                _ => {}
            }
        }
        changed
    }

    /// Whether the applier is paused.
    pub fn paused(&self) -> bool {
        *self.pause.borrow()
    }

    /// Follows the pause switch.
    pub fn pause_watch(&self) -> watch::Receiver<bool> {
        self.pause.subscribe()
    }
}
