//! `cutover status`: what the migration is doing, for a person or a script.
//!
//! While a daemon runs it holds the state store, so `status` asks it
//! through the admin console (the address is in `<state.dir>/listen.json`).
//! When no daemon runs, it reads the store directly: the last recorded
//! state, position, lag sample, per-table copy results and refused changes.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

use crate::config::{Config, ConsoleAuth};
use crate::console::{copy_state_name, timestamp, timestamp_millis};
use crate::serve::LISTEN_FILE;
use crate::store::{Store, StoreError};
use cutover_replication::{Lsn, slot};

/// How long `status` waits for the daemon's console.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no status could be given.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing was ever run with this state directory.
    #[error(
        "no cutover state in {0}: nothing has run with this config yet (or state.dir points elsewhere)"
    )]
    NoState(PathBuf),
    /// A daemon holds the store and its console cannot be asked.
    #[error("{0}")]
    Unreachable(String),
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The status, from the daemon or from the store.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `daemon` (asked through its console) or `state store` (no daemon).
    pub source: &'static str,
    /// Whether a daemon is running.
    pub running: bool,
    /// The daemon's process id, when running.
    pub pid: Option<i64>,
    /// starting, copying, streaming, paused, reconnecting, failed, stopped.
    pub state: String,
    /// When the state was recorded (the store) or the daemon started.
    pub since: Option<String>,
    /// The applier is paused by an operator.
    pub paused: bool,
    /// `forward` until the switch.
    pub direction: String,
    /// Which server takes writes.
    pub primary: String,
    /// The table groups `switch --group` moved to the other server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved_groups: Vec<String>,
    /// The source replication slot.
    pub slot: Option<String>,
    /// The last source commit applied on the target.
    pub applied_lsn: Option<String>,
    /// The last source position the Kafka feed committed (`[kafka]`, a
    /// running daemon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_committed_lsn: Option<String>,
    /// Source transactions applied since the daemon started.
    pub transactions_applied: Option<i64>,
    /// Lag figures.
    pub lag: SummaryLag,
    /// The last error.
    pub last_error: Option<SummaryError>,
    /// Per table: copy result and changes applied.
    pub tables: Vec<SummaryTable>,
    /// Changes the target refused (the stream stopped on each).
    pub refused_changes: Vec<RefusedChange>,
    /// The background verifier's last pass over each table.
    pub divergence: Vec<SummaryDivergence>,
    /// Stray writes on the target, oldest first, with what was done.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stray_writes: Vec<SummaryStray>,
    /// The same, added up per `[[group]]` (when groups are configured).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub group_divergence: Vec<SummaryGroupDivergence>,
    /// The last switch or rollback.
    pub switch: Option<SummarySwitch>,
    /// The acceptance recorded in the store (`cutover accept`), when read
    /// from the store.
    pub accepted: Option<String>,
}

/// The last switch or rollback, step by step.
#[derive(Debug, Serialize)]
pub struct SummarySwitch {
    /// `switch` or `rollback`, and its number.
    pub kind: String,
    /// `in_progress`, `done` or `undone`.
    pub state: String,
    /// Neither server takes writes now.
    pub neither_writable: bool,
    /// The write-unavailability window, seconds.
    pub window_seconds: Option<String>,
    /// Each step with its duration.
    pub journal: Vec<String>,
}

impl SummarySwitch {
    fn of(view: crate::live::SwitchView) -> SummarySwitch {
        SummarySwitch {
            kind: format!("{} {}", view.kind, view.id),
            state: view.state.to_owned(),
            neither_writable: view.neither_writable,
            window_seconds: view.window_seconds.map(|w| format!("{w:.3}")),
            journal: view.journal,
        }
    }
}

/// What the background verifier found of one table.
#[derive(Debug, Serialize)]
pub struct SummaryDivergence {
    /// `schema.table`.
    pub table: String,
    /// Source rows compared in the last pass.
    pub rows_checked: Option<i64>,
    /// Rows that differ.
    pub divergent_rows: Option<i64>,
    /// The source position compared.
    pub compared_at: Option<String>,
    /// When the pass ended.
    pub checked_at: Option<String>,
}

/// A stray write: an application's write on the side that is not its
/// group's primary.
#[derive(Debug, Serialize)]
pub struct SummaryStray {
    /// Its number (`RESOLVE <id>`).
    pub id: Option<i64>,
    /// The server it was made on.
    pub side: String,
    /// `schema.table`.
    pub table: String,
    /// insert, update, delete, truncate.
    pub op: String,
    /// The row's key.
    pub key: String,
    /// When it committed.
    pub committed_at: Option<String>,
    /// `pending`, `written_back`, `carried_over`, `equal`, `parked`,
    /// `chose_source`, `chose_target`, `reported`.
    pub resolution: String,
}

impl SummaryStray {
    /// One line for a person: `#12 target public.codes update (code=c6)
    /// at ...: carried over`.
    pub fn line(&self) -> String {
        format!(
            "#{} {} {} {} {} at {}: {}",
            self.id.map_or_else(|| "-".to_owned(), |id| id.to_string()),
            self.side,
            self.table,
            self.op,
            self.key,
            self.committed_at.as_deref().unwrap_or("-"),
            self.resolution.replace('_', " ")
        )
    }
}

/// What the background verifier found of one `[[group]]`'s tables.
#[derive(Debug, Serialize)]
pub struct SummaryGroupDivergence {
    /// The group.
    pub group: String,
    /// Source rows compared in the last passes over its tables.
    pub rows_checked: i64,
    /// Rows that differ.
    pub divergent_rows: i64,
}

impl Summary {
    /// Adds up the divergence per group of `groups` (nothing without
    /// groups; a table two groups claim is left out, as `check` says).
    fn add_group_divergence(&mut self, groups: &crate::config::Groups) {
        if groups.is_empty() {
            return;
        }
        let mut sums: std::collections::BTreeMap<String, (i64, i64)> = groups
            .names()
            .into_iter()
            .map(|g| (g.to_owned(), (0, 0)))
            .collect();
        for d in &self.divergence {
            let Some((schema, name)) = d.table.split_once('.') else {
                continue;
            };
            let table = cutover_replication::catalog::TableName::new(schema, name);
            if let Ok(group) = groups.of(&table)
                && let Some(sum) = sums.get_mut(group)
            {
                sum.0 += d.rows_checked.unwrap_or(0);
                sum.1 += d.divergent_rows.unwrap_or(0);
            }
        }
        self.group_divergence = sums
            .into_iter()
            .map(
                |(group, (rows_checked, divergent_rows))| SummaryGroupDivergence {
                    group,
                    rows_checked,
                    divergent_rows,
                },
            )
            .collect();
    }
}

/// Lag, as last measured.
#[derive(Debug, Default, Serialize)]
pub struct SummaryLag {
    /// Source WAL position minus the last applied commit.
    pub bytes: Option<i64>,
    /// Seconds since the commit of the oldest change not yet applied.
    pub seconds: Option<f64>,
    /// WAL the slot holds on the source.
    pub slot_retained_bytes: Option<i64>,
    /// The slot's `wal_status`.
    pub wal_status: Option<String>,
    /// Bytes of WAL left before `max_slot_wal_keep_size` invalidates the
    /// slot (`None` when unlimited or unknown).
    pub slot_safe_wal_bytes: Option<i64>,
    /// When it was measured.
    pub sampled_at: Option<String>,
    /// Why the source could not be asked (no daemon running), if so.
    pub source_unreachable: Option<String>,
}

/// The last error with its time.
#[derive(Debug, Serialize)]
pub struct SummaryError {
    /// What went wrong.
    pub message: String,
    /// When.
    pub at: Option<String>,
}

/// One table.
#[derive(Debug, Serialize)]
pub struct SummaryTable {
    /// Schema-qualified name.
    pub table: String,
    /// pending, copying, copied, or `not copied`.
    pub copy_state: String,
    /// Rows copied from the snapshot.
    pub rows_copied: Option<i64>,
    /// Rows in the snapshot on the source.
    pub source_rows: Option<i64>,
    /// Rows on the target after the copy.
    pub target_rows: Option<i64>,
    /// Changes applied since the daemon started (`None` from the store).
    pub inserts: Option<i64>,
    /// Updates applied.
    pub updates: Option<i64>,
    /// Deletes applied.
    pub deletes: Option<i64>,
    /// Truncates applied.
    pub truncates: Option<i64>,
    /// The table written, when a `[[map]]` writes it to another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_to: Option<String>,
    /// Rows its mapping rejected, as of the copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<i64>,
}

/// A change the target refused.
#[derive(Debug, Serialize)]
pub struct RefusedChange {
    /// When.
    pub at: String,
    /// The table.
    pub table: String,
    /// insert, update, delete, truncate.
    pub op: String,
    /// The key.
    pub key: String,
    /// The change's source LSN.
    pub lsn: String,
    /// The target's SQLSTATE.
    pub sqlstate: String,
    /// The target's message.
    pub detail: String,
}

/// Where the running daemon listens, from `listen.json`.
struct Listening {
    pid: Option<u32>,
    console: Option<SocketAddr>,
}

fn listening(dir: &Path) -> Option<Listening> {
    let text = std::fs::read_to_string(dir.join(LISTEN_FILE)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(Listening {
        pid: value["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
        console: value["console"].as_str().and_then(|a| a.parse().ok()),
    })
}

/// The status of the migration configured in `config`.
pub async fn run(config: &Config) -> Result<Summary, StatusError> {
    let dir = &config.state_dir;
    let listen = listening(dir);
    let mut console_failure = None;
    if let Some(addr) = listen.as_ref().and_then(|l| l.console) {
        match ask_console(addr, config).await {
            Ok(mut summary) => {
                summary.add_group_divergence(&config.groups);
                return Ok(summary);
            }
            // A stale listen.json (daemon killed) or a daemon shutting down:
            // the store answers if nobody holds it.
            Err(err) => {
                console_failure = Some(format!("its console at {addr} did not answer: {err}"))
            }
        }
    }
    if !dir.join("db").exists() {
        return Err(StatusError::NoState(dir.clone()));
    }
    match Store::open(dir) {
        Ok(store) => {
            let mut summary = from_store(&store, config)?;
            summary.add_group_divergence(&config.groups);
            drop(store);
            measure_source(config, &mut summary).await;
            Ok(summary)
        }
        Err(StoreError::Locked { pid, .. }) => {
            let who = pid
                .or(listen.as_ref().and_then(|l| l.pid))
                .map(|p| format!("the daemon (pid {p})"))
                .unwrap_or_else(|| "a cutover process".to_owned());
            let why = console_failure.unwrap_or_else(|| {
                "its admin console is off: set console.password (or console.password_file) in the daemon's config and restart it, or watch /health and /metrics".to_owned()
            });
            Err(StatusError::Unreachable(format!(
                "{who} holds {} and {why}",
                dir.display()
            )))
        }
        Err(err) => Err(err.into()),
    }
}

/// A connection to the running daemon's admin console at `addr`, with the
/// config's password, over TLS when the config gives the console a
/// certificate (that certificate, and only it, is trusted).
pub async fn connect_console(
    addr: SocketAddr,
    config: &Config,
    application_name: &str,
) -> Result<tokio_postgres::Client, String> {
    let host = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    let mut pg = tokio_postgres::Config::new();
    pg.host(host.to_string())
        .port(addr.port())
        .user("cutover")
        .dbname("cutover")
        .application_name(application_name)
        .connect_timeout(CONSOLE_TIMEOUT);
    if let ConsoleAuth::Password(password) = &config.console_auth {
        pg.password(password.expose());
    }
    let tls = match &config.console_tls {
        None => None,
        Some(tls) => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(
                cutover_replication::tls::pinned_client_config(tls.identity.certificate.clone())
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    cutover_replication::client::connect_with(&pg, tls)
        .await
        .map_err(|e| cutover_replication::client::describe(&e))
}

/// The address of the running daemon's console, from `listen.json`.
pub fn console_address(dir: &Path) -> Option<SocketAddr> {
    listening(dir).and_then(|l| l.console)
}

async fn ask_console(addr: SocketAddr, config: &Config) -> Result<Summary, String> {
    let work = async {
        let client = connect_console(addr, config, "cutover status").await?;
        let status = rows(&client, "SHOW STATUS").await?;
        let lag = rows(&client, "SHOW LAG").await?;
        let tables = rows(&client, "SHOW TABLES").await?;
        let divergence = rows(&client, "SHOW DIVERGENCE").await?;
        let switch = rows(&client, "SHOW SWITCH").await?;
        let conflicts = rows(&client, "SHOW CONFLICTS").await?;
        Ok::<_, String>((status, lag, tables, divergence, switch, conflicts))
    };
    let (status, lag, tables, divergence, switch, conflicts) =
        tokio::time::timeout(CONSOLE_TIMEOUT, work)
            .await
            .map_err(|_| format!("no answer within {CONSOLE_TIMEOUT:?}"))??;
    let status = status
        .first()
        .ok_or("SHOW STATUS returned no row".to_owned())?;
    let lag = lag.first().ok_or("SHOW LAG returned no row".to_owned())?;
    Ok(Summary {
        source: "daemon",
        running: true,
        pid: int(status, "pid"),
        state: text(status, "state").unwrap_or_default(),
        since: text(status, "started_at"),
        paused: text(status, "paused").as_deref() == Some("t"),
        direction: text(status, "direction").unwrap_or_default(),
        primary: text(status, "primary_server").unwrap_or_default(),
        moved_groups: text(status, "moved_groups")
            .unwrap_or_default()
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect(),
        slot: text(status, "slot"),
        applied_lsn: text(status, "applied_lsn"),
        kafka_committed_lsn: text(status, "kafka_committed_lsn"),
        transactions_applied: int(status, "transactions_applied"),
        lag: SummaryLag {
            bytes: int(lag, "lag_bytes"),
            seconds: text(lag, "lag_seconds").and_then(|s| s.parse().ok()),
            slot_retained_bytes: int(lag, "slot_retained_bytes"),
            wal_status: text(lag, "wal_status"),
            slot_safe_wal_bytes: int(lag, "slot_safe_wal_bytes"),
            sampled_at: text(lag, "sampled_at"),
            source_unreachable: None,
        },
        last_error: text(status, "last_error").map(|message| SummaryError {
            message,
            at: text(status, "last_error_at"),
        }),
        tables: tables
            .iter()
            .map(|row| SummaryTable {
                table: text(row, "table_name").unwrap_or_default(),
                copy_state: text(row, "copy_state").unwrap_or_default(),
                rows_copied: int(row, "rows_copied"),
                source_rows: int(row, "source_rows"),
                target_rows: int(row, "target_rows"),
                inserts: int(row, "inserts"),
                updates: int(row, "updates"),
                deletes: int(row, "deletes"),
                truncates: int(row, "truncates"),
                written_to: text(row, "written_to"),
                rejected: int(row, "rejected"),
            })
            .collect(),
        refused_changes: Vec::new(),
        group_divergence: Vec::new(),
        stray_writes: conflicts
            .iter()
            .map(|row| SummaryStray {
                id: int(row, "id"),
                side: text(row, "side").unwrap_or_default(),
                table: text(row, "table").unwrap_or_default(),
                op: text(row, "op").unwrap_or_default(),
                key: text(row, "key").unwrap_or_default(),
                committed_at: text(row, "committed_at"),
                resolution: text(row, "resolution").unwrap_or_default(),
            })
            .collect(),
        divergence: divergence
            .iter()
            .map(|row| SummaryDivergence {
                table: text(row, "table").unwrap_or_default(),
                rows_checked: int(row, "rows_checked"),
                divergent_rows: int(row, "divergent_rows"),
                compared_at: text(row, "compared_at"),
                checked_at: text(row, "checked_at"),
            })
            .collect(),
        accepted: None,
        switch: switch.first().map(|first| SummarySwitch {
            kind: format!(
                "{} {}",
                text(first, "kind").unwrap_or_default(),
                text(first, "id").unwrap_or_default()
            ),
            state: text(first, "state").unwrap_or_default(),
            // A running daemon settled any interrupted switch first.
            neither_writable: false,
            window_seconds: text(first, "window_seconds"),
            journal: switch
                .iter()
                .filter_map(|row| text(row, "step"))
                .map(|line| format!("  {line}"))
                .collect(),
        }),
    })
}

pub async fn rows(
    client: &tokio_postgres::Client,
    command: &str,
) -> Result<Vec<SimpleQueryRow>, String> {
    Ok(client
        .simple_query(command)
        .await
        .map_err(|e| format!("{command}: {}", cutover_replication::client::describe(&e)))?
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .collect())
}

pub fn text(row: &SimpleQueryRow, column: &str) -> Option<String> {
    row.try_get(column).ok().flatten().map(str::to_owned)
}

fn int(row: &SimpleQueryRow, column: &str) -> Option<i64> {
    text(row, column).and_then(|s| s.parse().ok())
}

fn from_store(store: &Store, config: &Config) -> Result<Summary, StatusError> {
    // The direction streaming away from the primary, as the switch
    // journal says.
    let switch = store.switch_state()?;
    let direction = switch.direction();
    let run = store.run_status(direction)?;
    let copy = store.copy_run()?;
    let sample = store.lag_history(direction, 1)?.pop();
    let tables = store
        .table_copies()?
        .into_iter()
        .map(|t| SummaryTable {
            table: t.name.to_string(),
            copy_state: copy_state_name(t.state).to_owned(),
            rows_copied: i64::try_from(t.rows_copied).ok(),
            source_rows: t.source_count,
            target_rows: t.target_count,
            inserts: None,
            updates: None,
            deletes: None,
            truncates: None,
            written_to: t.target.as_ref().map(|t| t.to_string()),
            rejected: t.rejected.as_ref().map(|r| r.total()),
        })
        .collect();
    let refused_changes = store
        .dead_letters(direction)?
        .into_iter()
        .map(|d| RefusedChange {
            at: timestamp_millis(d.at_ms),
            table: d.table,
            op: d.op,
            key: d.key,
            lsn: d.lsn.to_string(),
            sqlstate: d.sqlstate,
            detail: d.detail,
        })
        .collect();
    let state = match (&run, &copy) {
        (Some(run), _) => run.state.clone(),
        (None, Some(copy)) if copy.finished => "copied".to_owned(),
        (None, Some(_)) => "copying".to_owned(),
        (None, None) => "not started".to_owned(),
    };
    Ok(Summary {
        source: "state store",
        running: false,
        pid: None,
        state,
        since: run.as_ref().map(|r| timestamp(r.at)),
        paused: false,
        direction: direction.to_string(),
        primary: switch.primary.name().to_owned(),
        moved_groups: switch
            .moved_groups()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        slot: copy
            .as_ref()
            .map(|c| c.slot.clone())
            .or_else(|| Some(config.slot.clone())),
        applied_lsn: run
            .as_ref()
            .and_then(|r| r.applied_lsn)
            .map(|l| l.to_string()),
        kafka_committed_lsn: None,
        transactions_applied: None,
        lag: SummaryLag {
            bytes: sample
                .as_ref()
                .and_then(|s| s.bytes)
                .and_then(|b| i64::try_from(b).ok()),
            seconds: sample.as_ref().map(|s| s.seconds),
            slot_retained_bytes: None,
            wal_status: None,
            slot_safe_wal_bytes: None,
            sampled_at: sample.as_ref().map(|s| timestamp_millis(s.at_ms)),
            source_unreachable: None,
        },
        last_error: run
            .as_ref()
            .and_then(|r| r.last_error.clone().map(|m| (m, r.at)))
            .map(|(message, at)| SummaryError {
                message,
                at: Some(timestamp(at)),
            }),
        tables,
        refused_changes,
        group_divergence: Vec::new(),
        stray_writes: store
            .conflicts()?
            .into_iter()
            .map(|c| SummaryStray {
                id: i64::try_from(c.id).ok(),
                side: c.side,
                table: c.table,
                op: c.op,
                key: c.key,
                committed_at: Some(c.committed_at),
                resolution: c.resolution,
            })
            .collect(),
        divergence: store
            .divergences()?
            .into_iter()
            .map(|(table, d)| SummaryDivergence {
                table,
                rows_checked: i64::try_from(d.rows_checked).ok(),
                divergent_rows: i64::try_from(d.divergent_rows).ok(),
                compared_at: d.compared_at.map(|l| l.to_string()),
                checked_at: Some(timestamp(d.checked_at)),
            })
            .collect(),
        switch: crate::live::SwitchView::of(&switch).map(SummarySwitch::of),
        accepted: switch.acceptance.as_ref().map(|a| {
            format!(
                "accepted by {} ({}) at {}; keep the old server until {}",
                a.accepted_by, a.role, a.accepted_at, a.keep_old_server_until
            )
        }),
    })
}

/// With no daemon running the slot still holds WAL on the source: ask the
/// source directly how far behind the recorded position is and how much
/// the slot retains. Falls back to the last stored sample.
async fn measure_source(config: &Config, summary: &mut Summary) {
    let measured = tokio::time::timeout(CONSOLE_TIMEOUT, async {
        let client = cutover_replication::client::connect(&config.source.conninfo)
            .await
            .map_err(|e| e.to_string())?;
        let current = slot::current_wal_lsn(&client)
            .await
            .map_err(|e| e.to_string())?;
        let state = slot::slot_state(&client, summary.slot.as_deref().unwrap_or(&config.slot))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((current, state))
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {CONSOLE_TIMEOUT:?}")));
    match measured {
        Ok((current, state)) => {
            let applied = summary
                .applied_lsn
                .as_deref()
                .and_then(|l| l.parse::<Lsn>().ok());
            summary.lag = SummaryLag {
                bytes: applied.and_then(|a| i64::try_from(current.bytes_since(a)).ok()),
                // Seconds are the age of what the daemon received and has not
                // applied: with no daemon, nothing is received.
                seconds: None,
                slot_retained_bytes: state.as_ref().and_then(|s| s.retained_bytes),
                wal_status: state.as_ref().and_then(|s| s.wal_status.clone()),
                slot_safe_wal_bytes: state.as_ref().and_then(|s| s.safe_wal_size),
                sampled_at: Some(timestamp_millis(crate::store::now_millis())),
                source_unreachable: None,
            };
        }
        Err(err) => summary.lag.source_unreachable = Some(format!("{}: {err}", config.source.role)),
    }
}

impl Summary {
    /// The summary as a person reads it.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        // The server the stream reads: the target once switched.
        let read = if self.direction == "reverse" {
            "target"
        } else {
            "source"
        };
        let mut state = self.state.clone();
        if self.paused && state != "paused" {
            state.push_str(" (paused)");
        }
        if self.running {
            let _ = writeln!(
                out,
                "cutover: {state} (daemon pid {}, started {})",
                self.pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "?".into()),
                self.since.as_deref().unwrap_or("?")
            );
        } else {
            let _ = writeln!(
                out,
                "cutover: no daemon running; last recorded state: {state}{}",
                self.since
                    .as_ref()
                    .map(|s| format!(" at {s}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "  direction     {} (writes go to the {})",
            self.direction, self.primary
        );
        if !self.moved_groups.is_empty() {
            let _ = writeln!(
                out,
                "  moved groups  {} (their writes go to the other server; both directions stream)",
                self.moved_groups.join(", ")
            );
        }
        if let Some(slot) = &self.slot {
            let _ = writeln!(out, "  slot          {slot}");
        }
        let _ = writeln!(
            out,
            "  applied up to {}",
            self.applied_lsn.as_deref().unwrap_or("nothing yet")
        );
        if let Some(fed) = &self.kafka_committed_lsn {
            let _ = writeln!(out, "  Kafka holds   up to {fed}");
        }
        let lag = match (&self.lag.seconds, &self.lag.bytes) {
            (None, None) => "not measured yet".to_owned(),
            (seconds, bytes) => {
                let mut parts = Vec::new();
                if let Some(s) = seconds {
                    parts.push(format!("{s:.1} s"));
                }
                if let Some(b) = bytes {
                    parts.push(format!("{} behind the {read}", human_bytes(*b)));
                }
                let mut text = parts.join(", ");
                if let Some(at) = &self.lag.sampled_at {
                    let _ = write!(text, " (sampled {at})");
                }
                text
            }
        };
        let _ = writeln!(out, "  lag           {lag}");
        if let Some(why) = &self.lag.source_unreachable {
            let _ = writeln!(
                out,
                "  source        not reachable ({why}); lag above is the last sample"
            );
        }
        if let Some(retained) = self.lag.slot_retained_bytes {
            let safe = self
                .lag
                .slot_safe_wal_bytes
                .map(|b| {
                    format!(
                        "; {} more before max_slot_wal_keep_size invalidates it",
                        human_bytes(b)
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  slot holds    {} of WAL on the {read} (wal_status {}{safe})",
                human_bytes(retained),
                self.lag.wal_status.as_deref().unwrap_or("unknown")
            );
        }
        if let Some(n) = self.transactions_applied {
            let _ = writeln!(
                out,
                "  applied       {n} transactions since the daemon started"
            );
        }
        match &self.last_error {
            None => {
                let _ = writeln!(out, "  last error    none");
            }
            Some(e) => {
                let _ = writeln!(
                    out,
                    "  last error    {}{}",
                    e.at.as_ref().map(|a| format!("{a}: ")).unwrap_or_default(),
                    e.message
                );
            }
        }
        if !self.tables.is_empty() {
            out.push('\n');
            let mut rows = vec![[
                "table".to_owned(),
                "copy".to_owned(),
                "rows copied".to_owned(),
                "source rows".to_owned(),
                "target rows".to_owned(),
                "ins".to_owned(),
                "upd".to_owned(),
                "del".to_owned(),
                "trunc".to_owned(),
                "rejected".to_owned(),
            ]];
            for t in &self.tables {
                rows.push([
                    match &t.written_to {
                        Some(to) => format!("{} -> {to}", t.table),
                        None => t.table.clone(),
                    },
                    t.copy_state.clone(),
                    opt(t.rows_copied),
                    opt(t.source_rows),
                    opt(t.target_rows),
                    opt(t.inserts),
                    opt(t.updates),
                    opt(t.deletes),
                    opt(t.truncates),
                    t.rejected.map(|r| r.to_string()).unwrap_or_default(),
                ]);
            }
            let mut widths = [0usize; 10];
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            for row in &rows {
                let line: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .enumerate()
                    .map(|(i, (cell, w))| {
                        if i < 2 {
                            format!("{cell:<w$}")
                        } else {
                            format!("{cell:>w$}")
                        }
                    })
                    .collect();
                let _ = writeln!(out, "  {}", line.join("  ").trim_end());
            }
        }
        if !self.divergence.is_empty() {
            let checked: i64 = self.divergence.iter().filter_map(|d| d.rows_checked).sum();
            let divergent: i64 = self
                .divergence
                .iter()
                .filter_map(|d| d.divergent_rows)
                .sum();
            let _ = writeln!(
                out,
                "\nbackground verifier: {divergent} of {checked} rows checked differ"
            );
            for g in &self.group_divergence {
                let _ = writeln!(
                    out,
                    "  group {}: {} of {} rows differ",
                    g.group, g.divergent_rows, g.rows_checked
                );
            }
            for d in self
                .divergence
                .iter()
                .filter(|d| d.divergent_rows > Some(0))
            {
                let _ = writeln!(
                    out,
                    "  {}: {} of {} rows differ (compared at {}, {})",
                    d.table,
                    opt(d.divergent_rows),
                    opt(d.rows_checked),
                    d.compared_at.as_deref().unwrap_or("-"),
                    d.checked_at.as_deref().unwrap_or("-")
                );
            }
        }
        if !self.stray_writes.is_empty() {
            let count = |resolution: &str| {
                self.stray_writes
                    .iter()
                    .filter(|s| s.resolution == resolution)
                    .count()
            };
            let parked = count("parked");
            let _ = writeln!(
                out,
                "\nstray writes: {} ({} written back over with the primary's rows{})",
                self.stray_writes.len(),
                count("written_back"),
                if parked > 0 {
                    format!(
                        "; {parked} parked for an operator: `cutover conflicts resolve ID --use source|target`"
                    )
                } else {
                    String::new()
                }
            );
            const SHOWN: usize = 10;
            let skip = self.stray_writes.len().saturating_sub(SHOWN);
            for s in self.stray_writes.iter().skip(skip) {
                let _ = writeln!(out, "  {}", s.line());
            }
        }
        if let Some(switch) = &self.switch {
            let _ = writeln!(
                out,
                "\n{} {}{}{}",
                switch.kind,
                switch.state.replace('_', " "),
                switch
                    .window_seconds
                    .as_ref()
                    .map(|w| format!(", write-unavailability window {w} s"))
                    .unwrap_or_default(),
                if switch.neither_writable {
                    ": NEITHER SERVER TAKES WRITES (fenced, new primary not open): run the same command again to finish, or `cutover run` to undo"
                } else {
                    ""
                }
            );
            for line in &switch.journal {
                let _ = writeln!(out, "{line}");
            }
        }
        if let Some(accepted) = &self.accepted {
            let _ = writeln!(out, "\n{accepted}");
        }
        if !self.refused_changes.is_empty() {
            let _ = writeln!(out, "\nrefused by the target (the stream stopped on each):");
            for r in &self.refused_changes {
                let _ = writeln!(
                    out,
                    "  {}  {} on {} key {} at LSN {}: SQLSTATE {} {}",
                    r.at, r.op, r.table, r.key, r.lsn, r.sqlstate, r.detail
                );
            }
        }
        out
    }
}

fn opt(v: Option<i64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_else(|| "-".to_owned())
}

fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_like_a_person_writes_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GB");
    }
}
