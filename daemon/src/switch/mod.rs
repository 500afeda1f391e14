//! `cutover switch` and `cutover rollback`: move the application's writes
//! from one server to the other in about a second, with the way back
//! ready before the new primary takes a write.
//!
//! Both are one journaled state machine ([`journal`]); a rollback is a
//! switch from the target to the source. Each step is recorded in the
//! state store before it starts and when it ends (invariant 11):
//!
//! 1. `preflight`: the new primary can be replicated from, sequences are
//!    readable on both sides, the fence can be put up, the last verify was
//!    clean (switch), and the old direction catches up while writes go on,
//!    within `switch.max_lag_seconds`;
//! 2. `prepare_return`: the new direction's publication and slot on the
//!    new primary, before it takes any write (invariant 7);
//! 3. `fence`: the old primary refuses every application write
//!    ([`cutover_replication::fence`]); `fence_command` runs;
//! 4. `drain`: the old primary's WAL position is recorded and the old
//!    direction applies everything committed before it;
//! 5. `sequences`: set on the new primary
//!    ([`cutover_replication::sequences`]);
//! 6. `open`: the new primary's own fence (from an earlier rollback) is
//!    taken down, `repoint_command` and `unfence_command` run, and it is
//!    recorded as primary;
//! 7. `stream`: the new direction is recorded for `cutover run`, and the
//!    old direction's slot dropped (nothing it holds is needed: the old
//!    primary takes no writes but cutover's).
//!
//! A failure before `open` undoes what was done (the fence comes down,
//! `unfence_command` runs, a slot made by this journal is dropped), so the
//! old primary takes writes again and the error says why. A crash
//! (SIGKILL, a server restart) is resumed by the next `cutover switch` (or
//! `cutover rollback`, for one), or undone by the next `cutover run` when
//! the new primary did not open yet, and finished by it when it did. The
//! application never has both servers writable; when it has neither
//! (between `fence` and `open`), the journal says so, in `status`, the
//! console's `SHOW SWITCH` and `/health`.
//!
//! The switch runs with the daemon stopped: it drains the stream itself,
//! and `cutover run` then streams in the new direction.

use cutover_replication::client::{self, ConnectError, describe};
use cutover_replication::error::ReplicationError;
use cutover_replication::fence::FenceError;
use cutover_replication::sequences::SequenceError;
use tokio_postgres::Client;

use crate::config::Config;
use crate::direction::Direction;
use crate::run::RunError;
use crate::store::{Store, StoreError, now_millis};

pub mod desk;
pub mod finish;
pub mod hooks;
pub mod journal;
mod preflight;
mod steps;

use journal::{Journal, Kind, Outcome, Server, Step, SwitchState};

/// Why a switch or rollback stopped.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The config has no target (a Kafka feed alone).
    #[error(transparent)]
    NoTarget(#[from] crate::config::NoTarget),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A daemon holds the state store.
    #[error("a daemon holds {0}: stop it first (SIGTERM); {1}")]
    DaemonRunning(String, &'static str),
    /// The writes are already where they were asked to go.
    #[error("the {0}: nothing to do (`cutover status` shows the journal)")]
    AlreadyPrimary(String),
    /// Another journal is under way after its new primary opened.
    #[error(
        "`{0}` is under way and its new primary already takes writes: finish it with `{0}` (or `cutover run`) first"
    )]
    OtherUnderWay(String),
    /// A check failed before anything changed.
    #[error("preflight: nothing was changed:\n  - {}", .0.join("\n  - "))]
    Preflight(Vec<String>),
    /// A connection failed.
    #[error("{server}: {source}")]
    Connect {
        /// `source` or `target`.
        server: &'static str,
        /// The error.
        source: ConnectError,
    },
    /// A query failed.
    #[error("{server}: {what}: {detail}")]
    Query {
        /// `source` or `target`.
        server: &'static str,
        /// What was being done.
        what: String,
        /// The server's message.
        detail: String,
    },
    /// The fence could not be put up or taken down.
    #[error("fence: {0}")]
    Fence(#[from] FenceError),
    /// Sequences could not be carried over.
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    /// An operator command failed.
    #[error("switch.{key}: {detail}")]
    Hook {
        /// The config key.
        key: &'static str,
        /// What happened.
        detail: String,
    },
    /// The stream could not catch up or drain.
    #[error("streaming: {0}")]
    Stream(#[from] RunError),
    /// The new direction's slot could not be made.
    #[error("the new primary's slot: {0}")]
    Slot(#[from] ReplicationError),
    /// The last catch-up took too long.
    #[error(
        "the target is more than switch.max_lag_seconds ({0} s) behind: nothing was fenced; let `cutover run` catch up (see `cutover status`), stop it, and switch again"
    )]
    TooFarBehind(u64),
    /// The drain did not finish in twice `switch.max_lag_seconds`.
    #[error(
        "the {new} did not take what was committed before the fence within {seconds} s (twice switch.max_lag_seconds){}: fix what stops the stream (`cutover status` shows it) and switch again",
        last_error.as_ref().map(|e| format!("; the stream's last error: {e}")).unwrap_or_default()
    )]
    DrainStuck {
        /// The new primary's role name.
        new: &'static str,
        /// The bound.
        seconds: u64,
        /// Why the stream did not get there, if it said.
        last_error: Option<String>,
    },
    /// Refused, with the reason and the fix.
    #[error("{0}")]
    Refused(String),
}

pub(crate) fn query(
    server: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SwitchError {
    let what = what.into();
    move |err| SwitchError::Query {
        server,
        what,
        detail: describe(&err),
    }
}

/// How a switch is run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Check and print the plan; change nothing.
    pub dry_run: bool,
    /// Run a verify now instead of relying on the last one.
    pub verify: bool,
    /// Move only this table group's writes (`--group`).
    pub group: Option<String>,
}

/// What a switch or rollback did, for the operator.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Switch or rollback.
    pub kind: Kind,
    /// The journal's lines, one per step.
    pub lines: Vec<String>,
    /// The server primary now.
    pub primary: Server,
    /// The write-unavailability window, seconds.
    pub window_seconds: Option<f64>,
    /// Only planned (`--dry-run`).
    pub dry_run: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// Run by the daemon itself (asked through its console), which
    /// already streams in the new direction.
    #[serde(default)]
    pub by_daemon: bool,
    /// The table group moved (`--group`); absent: every table.
    #[serde(default)]
    pub group: Option<String>,
}

impl Summary {
    /// For a person.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let what = match &self.group {
            Some(group) => format!("{} of group {group}", self.kind.name()),
            None => self.kind.name().to_owned(),
        };
        let title = if self.dry_run {
            format!("{what} plan (dry run: nothing changed)")
        } else {
            format!("{what} journal")
        };
        out.push_str(&title);
        out.push('\n');
        for line in &self.lines {
            out.push_str(line);
            out.push('\n');
        }
        if let Some(window) = self.window_seconds {
            out.push_str(&format!(
                "write-unavailability window: {window:.3} s (fence to new primary open)\n"
            ));
        }
        if !self.dry_run {
            let who = if self.by_daemon {
                "the daemon streams"
            } else {
                "start `cutover run` again: it streams"
            };
            let back = match self.kind {
                Kind::Switch => "rollback",
                Kind::Rollback => "switch",
            };
            let done = self.outcome == Outcome::Done;
            match &self.group {
                Some(group) => {
                    out.push_str(&format!(
                        "primary of group {group}: {}\n",
                        self.primary.name()
                    ));
                    if done {
                        out.push_str(&format!(
                            "{who} both directions; group {group}'s changes flow from the {} to the {}, the other groups' as before; `cutover {back} --group {group}` moves them back\n",
                            self.primary.name(),
                            self.primary.other().name(),
                        ));
                    }
                }
                None => {
                    out.push_str(&format!("primary: {}\n", self.primary.name()));
                    if done {
                        out.push_str(&format!(
                            "{who} {} ({} to {}), so that `cutover {back}` loses nothing\n",
                            self.primary.streams(),
                            self.primary.name(),
                            self.primary.other().name(),
                        ));
                    }
                }
            }
        }
        out
    }
}

/// Dies here when `CUTOVER_FAILPOINT` names this place
/// (`switch:fence` right after the step is recorded as begun,
/// `switch:fence:done` after its work and before its end is recorded),
/// so that tests crash the process at each step. Off unless set.
fn failpoint(kind: Kind, step: Step, done: bool) {
    let Ok(wanted) = std::env::var("CUTOVER_FAILPOINT") else {
        return;
    };
    let here = format!(
        "{}:{}{}",
        kind.name(),
        step.name(),
        if done { ":done" } else { "" }
    );
    if wanted == here {
        eprintln!("failpoint {here}: aborting");
        std::process::abort();
    }
}

/// A regular connection to one of the servers.
pub(crate) async fn connect(config: &Config, server: Server) -> Result<Client, SwitchError> {
    let conninfo = match server {
        Server::Source => &config.source.conninfo,
        Server::Target => &config.target()?.conninfo,
    };
    let client = client::connect(conninfo)
        .await
        .map_err(|source| SwitchError::Connect {
            server: server.name(),
            source,
        })?;
    // cutover's own sessions are never held back by a fence's default
    // read-only setting an operator may have added.
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(query(server.name(), "preparing the session"))?;
    Ok(client)
}

/// Runs (or resumes) a switch (`kind` Switch) or a rollback with no
/// daemon running ([`SwitchError::DaemonRunning`] otherwise: ask the
/// daemon through its console).
pub async fn run(config: &Config, kind: Kind, options: Options) -> Result<Summary, SwitchError> {
    let store = match Store::open(&config.state_dir) {
        Ok(store) => store,
        Err(StoreError::Locked { .. }) => {
            return Err(SwitchError::DaemonRunning(
                config.state_dir.display().to_string(),
                "or turn its admin console on, through which it switches without a restart",
            ));
        }
        Err(err) => return Err(err.into()),
    };
    run_with_store(config, &store, kind, options).await
}

/// [`run`] with the state store held already: by `cutover switch`, or by
/// the daemon's run loop once its stream stopped.
pub async fn run_with_store(
    config: &Config,
    store: &Store,
    kind: Kind,
    options: Options,
) -> Result<Summary, SwitchError> {
    let store = store.clone();
    let mut state = store.switch_state()?;
    let group = options.group.clone();
    check_group(config, &state, kind, group.as_deref())?;
    let mut journal = match state.in_progress().cloned() {
        Some(mut journal) if journal.kind == kind && journal.group == group => {
            tracing::warn!(kind = kind.name(), id = journal.id, next = ?journal.next(), "resuming the {} interrupted at this step", kind.name());
            // Not fenced yet: the lag built up meanwhile is caught up (and
            // checked) again before the fence, not inside the window.
            if !journal.begun(Step::Fence) {
                journal.restart_preflight();
            }
            journal
        }
        // Another move while one is under way: undo it if it can be.
        Some(journal) if !journal.committed() => {
            let reason = format!(
                "`{}` asked while `{}` had not opened its new primary",
                command(kind, group.as_deref()),
                journal.command()
            );
            let undone = steps::undo(config, &store, &mut state, journal, reason).await?;
            return Ok(summary(&state, &undone, false));
        }
        Some(journal) => return Err(SwitchError::OtherUnderWay(journal.command())),
        None if primary_of(&state, group.as_deref()) == kind.to() => {
            return Err(SwitchError::AlreadyPrimary(match &group {
                Some(group) => format!(
                    "{} is already the primary of group {group}",
                    kind.to().name()
                ),
                None => format!("{} is already the primary", kind.to().name()),
            }));
        }
        None => {
            let mut journal = Journal::new(
                state.journal.as_ref().map_or(1, |j| j.id + 1),
                kind,
                now_millis(),
            );
            journal.group = group.clone();
            journal
        }
    };
    let mut ctx = steps::Ctx::new(config, &store, kind, group.clone()).await?;
    if options.dry_run {
        let lines = ctx.plan(&state, &options).await?;
        return Ok(Summary {
            kind,
            lines,
            primary: primary_of(&state, group.as_deref()),
            window_seconds: None,
            dry_run: true,
            outcome: Outcome::InProgress,
            by_daemon: false,
            group,
        });
    }
    while let Some(step) = journal.next() {
        journal.begin(step, now_millis());
        state.journal = Some(journal.clone());
        store.put_switch_state(&state).await?;
        failpoint(kind, step, false);
        let started = std::time::Instant::now();
        match ctx.step(step, &mut state, &mut journal, &options).await {
            Ok(detail) => {
                failpoint(kind, step, true);
                journal.end(step, now_millis(), detail);
                if journal.outcome == Outcome::Done
                    && let Some(window) = journal.window_ms()
                {
                    state.windows_ms.push(window);
                    let excess = state.windows_ms.len().saturating_sub(100);
                    state.windows_ms.drain(..excess);
                }
                state.journal = Some(journal.clone());
                store.put_switch_state(&state).await?;
                tracing::info!(step = step.name(), elapsed = ?started.elapsed(), "{} step done", kind.name());
            }
            Err(err) if !journal.committed() => {
                let journal_command = journal.command();
                tracing::error!(step = step.name(), error = %err, "the {} failed: undoing it", kind.name());
                let reason = format!("{} failed: {err}", step.name());
                match steps::undo(config, &store, &mut state, journal, reason).await {
                    Ok(_) => return Err(err),
                    Err(undo) => {
                        return Err(SwitchError::Refused(format!(
                            "{err}\nand undoing it failed too: {undo}\nthe {} may still be fenced: run `{}` again to resume, or `cutover run` to undo",
                            kind.from().name(),
                            journal_command
                        )));
                    }
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(summary(&state, &journal, false))
}

fn summary(state: &SwitchState, journal: &Journal, dry_run: bool) -> Summary {
    Summary {
        kind: journal.kind,
        lines: journal.lines(),
        primary: primary_of(state, journal.group.as_deref()),
        window_seconds: journal.window_ms().map(|ms| ms as f64 / 1000.0),
        dry_run,
        outcome: journal.outcome.clone(),
        by_daemon: false,
        group: journal.group.clone(),
    }
}

/// The primary of `group` (`None`: of the migration).
fn primary_of(state: &SwitchState, group: Option<&str>) -> Server {
    group.map_or(state.primary, |g| state.group_primary(g))
}

/// The command that moves `group` (`None`: every table) by `kind`.
fn command(kind: Kind, group: Option<&str>) -> String {
    match group {
        Some(group) => format!("cutover {} --group {group}", kind.name()),
        None => format!("cutover {}", kind.name()),
    }
}

/// Refuses a move that the groups' state does not allow, with the fix.
fn check_group(
    config: &Config,
    state: &SwitchState,
    kind: Kind,
    group: Option<&str>,
) -> Result<(), SwitchError> {
    let moved = state.moved_groups();
    match group {
        None if !moved.is_empty() => {
            let (listed, verb) = if moved.len() == 1 {
                (format!("group {}", moved[0]), "is")
            } else {
                (format!("groups {}", moved.join(", ")), "are")
            };
            let back = moved
                .iter()
                .map(|g| format!("`cutover rollback --group {g}`"))
                .collect::<Vec<_>>()
                .join(", ");
            Err(SwitchError::Refused(match kind {
                Kind::Switch => format!(
                    "{listed} {verb} on the target already: a whole switch moves every table at once; move the other groups with `cutover switch --group NAME`, or bring {listed} back first with {back}"
                ),
                Kind::Rollback => format!(
                    "{listed} {verb} on the target: groups moved one by one come back one by one: {back}"
                ),
            }))
        }
        None => Ok(()),
        Some(_) if config.groups.is_empty() => Err(SwitchError::Refused(
            "--group needs table groups: add [[group]] sections (name, tables) to the config, and restart `cutover run` so that both directions stream".into(),
        )),
        Some(group) if !config.groups.knows(group) => Err(SwitchError::Refused(format!(
            "there is no group {group:?}: the groups are {}",
            config.groups.names().join(", ")
        ))),
        Some(group)
            if config.groups.policy(group) == cutover_conflict::policy::Policy::Bidirectional =>
        {
            Err(SwitchError::Refused(format!(
                "group {group} is bidirectional: both servers take its writes already, there is nothing to move; point its application where it should write"
            )))
        }
        Some(_) if state.primary != Server::Source => Err(SwitchError::Refused(
            "the whole migration was switched to the target: groups move while the source is the migration's primary; `cutover rollback` first".into(),
        )),
        Some(_) => Ok(()),
    }
}

/// At the start of `cutover run`: a switch or rollback interrupted before
/// its new primary opened is undone (the old primary takes writes again),
/// one interrupted after is finished. Returns the direction to stream.
pub async fn settle(config: &Config, store: &Store) -> Result<Direction, SwitchError> {
    let mut state = store.switch_state()?;
    if let Some(at) = state.cleaned_at {
        return Err(SwitchError::Refused(format!(
            "`cutover cleanup` ended this migration at {}: nothing is left to stream (the {} is the primary); start a new migration with another state.dir",
            crate::console::timestamp(at),
            state.primary.name()
        )));
    }
    if let Some(journal) = state.in_progress().cloned() {
        let kind = journal.kind;
        if journal.committed() {
            let mut ctx = steps::Ctx::new(config, store, kind, journal.group.clone()).await?;
            tracing::warn!(
                kind = kind.name(),
                "finishing the {} interrupted after its new primary opened",
                kind.name()
            );
            let mut journal = journal;
            while let Some(step) = journal.next() {
                journal.begin(step, now_millis());
                state.journal = Some(journal.clone());
                store.put_switch_state(&state).await?;
                let detail = ctx
                    .step(step, &mut state, &mut journal, &Options::default())
                    .await?;
                journal.end(step, now_millis(), detail);
                state.journal = Some(journal.clone());
                store.put_switch_state(&state).await?;
            }
        } else {
            tracing::warn!(
                kind = kind.name(),
                "undoing the interrupted `{}` (its new primary had not opened): the {} takes those writes again; run it again to move them",
                journal.command(),
                kind.from().name(),
            );
            let reason = "interrupted; undone by `cutover run`".to_owned();
            steps::undo(config, store, &mut state, journal, reason).await?;
        }
    }
    Ok(state.direction())
}
