//! The switch journal: which server is primary, and every step of the
//! switch or rollback under way (or last made), recorded in the state
//! store before the step starts and again when it ends (invariant 11), so
//! that a crash at any point is resumed or undone by the next command.
//! Pure data and rules; no I/O.

use serde::{Deserialize, Serialize};

use cutover_replication::Lsn;

use crate::direction::Direction;

/// One of the two servers, by its place in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Server {
    /// `[source]`: the old server, primary until the switch.
    Source,
    /// `[target]`: the new server, primary after it.
    Target,
}

impl Server {
    /// `source` or `target`.
    pub const fn name(self) -> &'static str {
        match self {
            Server::Source => "source",
            Server::Target => "target",
        }
    }

    /// The other server.
    pub const fn other(self) -> Server {
        match self {
            Server::Source => Server::Target,
            Server::Target => Server::Source,
        }
    }

    /// The direction changes flow in while this server is primary: away
    /// from it.
    pub const fn streams(self) -> Direction {
        match self {
            Server::Source => Direction::Forward,
            Server::Target => Direction::Reverse,
        }
    }
}

/// Which way the writes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// From the source to the target.
    Switch,
    /// From the target back to the source.
    Rollback,
}

impl Kind {
    /// `switch` or `rollback`.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Switch => "switch",
            Kind::Rollback => "rollback",
        }
    }

    /// The server that stops taking writes.
    pub const fn from(self) -> Server {
        match self {
            Kind::Switch => Server::Source,
            Kind::Rollback => Server::Target,
        }
    }

    /// The server that takes them.
    pub const fn to(self) -> Server {
        self.from().other()
    }
}

/// The steps, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Checks, and the last catch-up while writes go on.
    Preflight,
    /// The new direction's publication and slot on the new primary,
    /// before it takes any write.
    PrepareReturn,
    /// Writes refused on the old primary for every role but cutover's.
    Fence,
    /// The fence position recorded; the old direction applies up to it.
    Drain,
    /// Sequences set on the new primary.
    Sequences,
    /// The new primary takes writes; the application is pointed at it.
    Open,
    /// The new direction recorded for `cutover run`; the old direction's
    /// slot dropped.
    Stream,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 7] = [
        Step::Preflight,
        Step::PrepareReturn,
        Step::Fence,
        Step::Drain,
        Step::Sequences,
        Step::Open,
        Step::Stream,
    ];

    /// The step's name, as shown and as a failpoint names it.
    pub const fn name(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::PrepareReturn => "prepare_return",
            Step::Fence => "fence",
            Step::Drain => "drain",
            Step::Sequences => "sequences",
            Step::Open => "open",
            Step::Stream => "stream",
        }
    }
}

/// One step as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step.
    pub step: Step,
    /// When it (last) started, milliseconds since the epoch.
    pub started_ms: u64,
    /// When it ended, if it has.
    pub ended_ms: Option<u64>,
    /// What it did.
    pub detail: String,
}

/// How a journal ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Outcome {
    /// Under way (or interrupted).
    InProgress,
    /// Every step done.
    Done,
    /// Undone before the new primary opened: the old one is primary and
    /// writable again.
    Undone {
        /// Why.
        reason: String,
    },
}

/// The slot the new direction streams from, made by `PrepareReturn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStart {
    /// The slot, on the server the direction reads.
    pub slot: String,
    /// Where its stream starts.
    pub start: Lsn,
    /// The publications it streams.
    pub publications: Vec<String>,
    /// This journal made the slot (undoing drops it).
    pub created: bool,
}

/// A switch or a rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Its number, from 1.
    pub id: u64,
    /// Switch or rollback.
    pub kind: Kind,
    /// When it began.
    pub started_ms: u64,
    /// The steps begun, in order.
    pub steps: Vec<StepRecord>,
    /// Where it stands.
    pub outcome: Outcome,
    /// The old primary's WAL position once fenced: everything it committed
    /// is before it.
    pub fence_lsn: Option<Lsn>,
    /// The new direction's slot.
    pub stream: Option<StreamStart>,
    /// The table group it moves (`switch --group`); `None`: every table.
    #[serde(default)]
    pub group: Option<String>,
}

impl Journal {
    /// A new journal.
    pub fn new(id: u64, kind: Kind, now_ms: u64) -> Journal {
        Journal {
            id,
            kind,
            started_ms: now_ms,
            steps: Vec::new(),
            outcome: Outcome::InProgress,
            fence_lsn: None,
            stream: None,
            group: None,
        }
    }

    /// The command that runs (or resumes) this journal, for messages.
    pub fn command(&self) -> String {
        match &self.group {
            Some(group) => format!("cutover {} --group {group}", self.kind.name()),
            None => format!("cutover {}", self.kind.name()),
        }
    }

    fn record(&self, step: Step) -> Option<&StepRecord> {
        self.steps.iter().find(|r| r.step == step)
    }

    /// Whether `step` ended.
    pub fn done(&self, step: Step) -> bool {
        self.record(step).is_some_and(|r| r.ended_ms.is_some())
    }

    /// Whether `step` began (it may have ended).
    pub fn begun(&self, step: Step) -> bool {
        self.record(step).is_some()
    }

    /// The first step not ended.
    pub fn next(&self) -> Option<Step> {
        Step::ALL.into_iter().find(|s| !self.done(*s))
    }

    /// The preflight runs again (a journal resumed before its fence: the
    /// lag built up since is caught up before the fence).
    pub fn restart_preflight(&mut self) {
        self.steps.retain(|r| r.step != Step::Preflight);
    }

    /// `step` starts (again, after a crash).
    pub fn begin(&mut self, step: Step, now_ms: u64) {
        match self.steps.iter_mut().find(|r| r.step == step) {
            Some(record) => {
                record.started_ms = now_ms;
                record.ended_ms = None;
            }
            None => self.steps.push(StepRecord {
                step,
                started_ms: now_ms,
                ended_ms: None,
                detail: String::new(),
            }),
        }
    }

    /// `step` ended, having done `detail`.
    pub fn end(&mut self, step: Step, now_ms: u64, detail: String) {
        if let Some(record) = self.steps.iter_mut().find(|r| r.step == step) {
            record.ended_ms = Some(now_ms);
            record.detail = detail;
        }
        if self.next().is_none() {
            self.outcome = Outcome::Done;
        }
    }

    /// Whether the new primary took writes: from then on, the way back is
    /// the other command, not an undo.
    pub fn opened(&self) -> bool {
        self.done(Step::Open)
    }

    /// Whether the open began: from then on the new primary may have
    /// dropped its fence and the application may point at it, so the
    /// journal is only ever finished, never undone.
    pub fn committed(&self) -> bool {
        self.begun(Step::Open)
    }

    /// The write-unavailability window: from the fence's start to the new
    /// primary's opening, in milliseconds.
    pub fn window_ms(&self) -> Option<u64> {
        let fenced = self.record(Step::Fence)?.started_ms;
        let opened = self.record(Step::Open)?.ended_ms?;
        Some(opened.saturating_sub(fenced))
    }

    /// The journal as lines for a person: each step with its duration.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for step in Step::ALL {
            let line = match self.record(step) {
                None => format!("  {:<15} -", step.name()),
                Some(StepRecord {
                    ended_ms: None,
                    detail,
                    ..
                }) => format!("  {:<15} under way {detail}", step.name()),
                Some(StepRecord {
                    started_ms,
                    ended_ms: Some(ended),
                    detail,
                    ..
                }) => format!(
                    "  {:<15} {:>8.3} s  {detail}",
                    step.name(),
                    ended.saturating_sub(*started_ms) as f64 / 1000.0
                ),
            };
            lines.push(line.trim_end().to_owned());
        }
        lines
    }
}

/// A formal acceptance of the migration (`cutover accept`), also written
/// to `acceptance.json` in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptance {
    /// The migration (its slot's name).
    pub migration_id: String,
    /// Who accepted.
    pub accepted_by: String,
    /// In which role.
    pub role: String,
    /// When, RFC 3339 UTC.
    pub accepted_at: String,
    /// The server primary then (`None`: a running daemon held the store).
    pub primary: Option<Server>,
    /// The last verify then: its status, position and date.
    pub last_verify: LastVerify,
    /// Days the old server is kept before it is decommissioned.
    pub retention_days: u32,
    /// The date the retention ends, RFC 3339 UTC.
    pub keep_old_server_until: String,
}

/// A verify as an acceptance cites it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastVerify {
    /// `VALIDATED`, `REPAIRED` or `FAILED`.
    pub status: String,
    /// The source position compared.
    pub lsn: String,
    /// When it ran.
    pub date: String,
}

/// Everything the store keeps about switching.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchState {
    /// The server the application writes to.
    pub primary: Server,
    /// The switch or rollback under way, or the last one.
    pub journal: Option<Journal>,
    /// Where the forward direction streams from, once a rollback made its
    /// slot again (before: the copy's slot).
    pub forward: Option<StreamStart>,
    /// Where the reverse direction streams from, once a switch made it.
    pub reverse: Option<StreamStart>,
    /// The write-unavailability window of every finished switch and
    /// rollback, milliseconds, oldest first (the last 100).
    pub windows_ms: Vec<u64>,
    /// The acceptance, once given.
    pub acceptance: Option<Acceptance>,
    /// When `cutover cleanup` removed cutover's objects from both servers
    /// (seconds since the epoch): nothing streams any more.
    #[serde(default)]
    pub cleaned_at: Option<u64>,
    /// Each table group moved by `switch --group` or `rollback --group`:
    /// its moves, oldest first. A group never moved follows `primary`.
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, Vec<Flip>>,
}

/// One move of a table group's writes, at an exact position of each
/// server's WAL: on the stream reading a server, the group's changes
/// committed before its position there go by the earlier primary, and
/// those at or after it by this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flip {
    /// The server that takes the group's writes from here on.
    pub primary: Server,
    /// Where it takes effect on the source's WAL (the forward stream).
    pub source_from: Lsn,
    /// Where it takes effect on the target's WAL (the reverse stream).
    pub target_from: Lsn,
    /// When, seconds since the epoch.
    pub at: u64,
}

impl Flip {
    /// Where it takes effect on the WAL of `server`.
    pub fn from(&self, server: Server) -> Lsn {
        match server {
            Server::Source => self.source_from,
            Server::Target => self.target_from,
        }
    }
}

impl Default for SwitchState {
    fn default() -> SwitchState {
        SwitchState {
            primary: Server::Source,
            journal: None,
            forward: None,
            reverse: None,
            windows_ms: Vec::new(),
            acceptance: None,
            cleaned_at: None,
            groups: std::collections::BTreeMap::new(),
        }
    }
}

impl SwitchState {
    /// The journal under way, if one is.
    pub fn in_progress(&self) -> Option<&Journal> {
        self.journal
            .as_ref()
            .filter(|j| j.outcome == Outcome::InProgress)
    }

    /// Where `direction` streams from, if a switch or rollback made it.
    pub fn stream(&self, direction: Direction) -> Option<&StreamStart> {
        match direction {
            Direction::Forward => self.forward.as_ref(),
            Direction::Reverse => self.reverse.as_ref(),
        }
    }

    /// Sets where `direction` streams from.
    pub fn set_stream(&mut self, direction: Direction, start: Option<StreamStart>) {
        match direction {
            Direction::Forward => self.forward = start,
            Direction::Reverse => self.reverse = start,
        }
    }

    /// The direction `cutover run` streams in.
    pub fn direction(&self) -> Direction {
        self.primary.streams()
    }

    /// The primary of table group `group` now.
    pub fn group_primary(&self, group: &str) -> Server {
        self.groups
            .get(group)
            .and_then(|flips| flips.last())
            .map_or(self.primary, |flip| flip.primary)
    }

    /// The primary of `group` for a change committed at `lsn` on the WAL
    /// of `server` (the server a stream reads).
    pub fn group_primary_at(&self, group: &str, server: Server, lsn: Lsn) -> Server {
        self.groups
            .get(group)
            .and_then(|flips| flips.iter().rev().find(|f| f.from(server) <= lsn))
            .map_or(self.primary, |flip| flip.primary)
    }

    /// The groups whose primary is not the migration's primary now.
    pub fn moved_groups(&self) -> Vec<&str> {
        self.groups
            .iter()
            .filter(|(_, flips)| flips.last().is_some_and(|f| f.primary != self.primary))
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_resume_at_the_first_not_ended_and_the_window_spans_fence_to_open() {
        let mut journal = Journal::new(1, Kind::Switch, 0);
        assert_eq!(journal.next(), Some(Step::Preflight));
        for (i, step) in Step::ALL.into_iter().take(3).enumerate() {
            journal.begin(step, 1000 * i as u64);
            journal.end(step, 1000 * i as u64 + 10, format!("{} done", step.name()));
        }
        // A crash in the middle of the drain.
        journal.begin(Step::Drain, 5000);
        assert_eq!(journal.next(), Some(Step::Drain));
        assert!(journal.begun(Step::Drain) && !journal.done(Step::Drain));
        assert!(!journal.opened());
        journal.begin(Step::Drain, 6000);
        journal.end(Step::Drain, 6100, String::new());
        journal.begin(Step::Sequences, 6100);
        journal.end(Step::Sequences, 6200, String::new());
        journal.begin(Step::Open, 6200);
        journal.end(Step::Open, 6300, String::new());
        assert!(journal.opened());
        // The fence began at 2000 (its third step), the open ended at 6300.
        assert_eq!(journal.window_ms(), Some(4300));
        assert_eq!(journal.outcome, Outcome::InProgress);
        journal.begin(Step::Stream, 6300);
        journal.end(Step::Stream, 6400, String::new());
        assert_eq!(journal.outcome, Outcome::Done);
        assert_eq!(journal.next(), None);
        let lines = journal.lines();
        assert_eq!(lines.len(), 7);
        assert!(
            lines[2].contains("fence") && lines[2].contains("0.010 s"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_group_moves_at_its_own_position_on_each_server() {
        let mut state = SwitchState::default();
        let lsn = Lsn::from_u64;
        assert_eq!(state.group_primary("billing"), Server::Source);
        state.groups.insert(
            "billing".into(),
            vec![
                Flip {
                    primary: Server::Target,
                    source_from: lsn(100),
                    target_from: lsn(5000),
                    at: 1,
                },
                Flip {
                    primary: Server::Source,
                    source_from: lsn(300),
                    target_from: lsn(7000),
                    at: 2,
                },
            ],
        );
        let at = |server, l| state.group_primary_at("billing", server, lsn(l));
        assert_eq!(at(Server::Source, 99), Server::Source);
        assert_eq!(at(Server::Source, 100), Server::Target);
        assert_eq!(at(Server::Source, 299), Server::Target);
        assert_eq!(at(Server::Source, 300), Server::Source);
        assert_eq!(at(Server::Target, 4999), Server::Source);
        assert_eq!(at(Server::Target, 5000), Server::Target);
        assert_eq!(at(Server::Target, 7000), Server::Source);
        assert_eq!(state.group_primary("billing"), Server::Source);
        assert!(state.moved_groups().is_empty());
        state.groups.get_mut("billing").unwrap().pop();
        assert_eq!(state.moved_groups(), ["billing"]);
        assert_eq!(
            state.group_primary_at("default", Server::Target, lsn(9000)),
            Server::Source
        );
    }

    #[test]
    fn each_kind_moves_the_writes_away_from_its_primary() {
        assert_eq!(Kind::Switch.from(), Server::Source);
        assert_eq!(Kind::Switch.to(), Server::Target);
        assert_eq!(Kind::Rollback.to(), Server::Source);
        assert_eq!(Server::Target.streams(), Direction::Reverse);
        let state = SwitchState::default();
        assert_eq!(state.direction(), Direction::Forward);
        assert!(state.in_progress().is_none());
        let json = serde_json::to_string(&Outcome::Undone { reason: "x".into() }).unwrap();
        assert_eq!(json, r#"{"state":"undone","reason":"x"}"#);
    }
}
