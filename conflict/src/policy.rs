//! What to do with a change that meets a write from the other side.
//!
//! In a phased cutover or a parallel run both directions stream at once.
//! Each table belongs to a group; each group has a primary side, the one
//! that takes its writes, and a [`Policy`]. A change committed by an
//! application on one side travels in that side's stream and is about to
//! be written on the other side, where the row under its key may have
//! been written too. This module decides, with no I/O, from:
//!
//! - the group's policy and primary;
//! - the side the change was committed on, and when ([`Incoming`]);
//! - who last wrote the row on the side it is about to be written to, and
//!   when ([`Local`]), which the apply reads from that server
//!   (`pg_xact_commit_timestamp_origin(xmin)`, with
//!   `track_commit_timestamp` on).
//!
//! A change made by an application on the side that is not its group's
//! primary is a **stray write**; a change that meets a row an application
//! wrote on the other side (not cutover's own apply) is a **conflict**.
//! Every [`Decision`] but a plain [`Decision::Apply`] is recorded, with
//! its [`Decision::resolution`]: none is dropped silently.

use std::cmp::Ordering;
use std::fmt;

/// One of the two servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The server the migration started from.
    Source,
    /// The server the migration moves to.
    Target,
}

impl Side {
    /// The other server.
    pub fn other(self) -> Side {
        match self {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        }
    }

    /// `source` or `target`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a group settles stray writes and conflicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The primary's row is kept, and written back over a stray one.
    #[default]
    PrimaryWins,
    /// The later commit wins; equal commit times go to the source.
    LastWriteWins,
    /// Both sides take writes; a conflict goes to the later commit.
    Bidirectional,
    /// A stray write or a conflict is parked, and both rows are left as
    /// they are, until an operator chooses a side.
    Manual,
}

impl Policy {
    /// Every policy, in the order the documentation gives them.
    pub const ALL: [Policy; 4] = [
        Policy::PrimaryWins,
        Policy::LastWriteWins,
        Policy::Bidirectional,
        Policy::Manual,
    ];

    /// The policy's name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::PrimaryWins => "primary_wins",
            Policy::LastWriteWins => "last_write_wins",
            Policy::Bidirectional => "bidirectional",
            Policy::Manual => "manual",
        }
    }

    /// The policy named `name` in the configuration.
    pub fn parse(name: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Whether the policy compares commit times, which needs
    /// `track_commit_timestamp = on` on both servers.
    pub fn needs_commit_times(self) -> bool {
        matches!(self, Policy::LastWriteWins | Policy::Bidirectional)
    }

    /// Whether the side that is not the primary takes writes as a matter
    /// of course (no write there is stray).
    pub fn both_sides_write(self) -> bool {
        self == Policy::Bidirectional
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A commit time, in microseconds since 2000-01-01 (PostgreSQL's epoch).
pub type CommitTime = i64;

/// A change committed by an application, on its way to the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The side it was committed on.
    pub from: Side,
    /// When, from the stream's commit message.
    pub committed_at: CommitTime,
}

/// Who last wrote the row under the change's key on the side it is about
/// to be written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// No row there, or one that cutover wrote (it came from the other
    /// side): nothing the change could overwrite by mistake.
    Clear,
    /// A row an application wrote on that side, committed then (`None`:
    /// the server does not track commit times).
    Written(Option<CommitTime>),
}

/// What the apply does with the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write it.
    Apply,
    /// Do not write it: the row on the other side wins and will travel
    /// this way in its own stream.
    KeepOther,
    /// A stray write that loses: do not write it, and write the primary's
    /// row back over it on the side it was made on.
    WriteBack,
    /// Do not write it, leave both rows as they are, and record both for
    /// an operator.
    Park,
}

impl Decision {
    /// The resolution's name, for the store, `status` and the
    /// `resolution` label of `cutover_conflicts_total`.
    pub fn resolution(self) -> &'static str {
        match self {
            Decision::Apply => "applied",
            Decision::KeepOther => "kept_other",
            Decision::WriteBack => "written_back",
            Decision::Park => "parked",
        }
    }
}

/// What is recorded of a change that was not simply applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Made by an application on the side that is not its group's
    /// primary.
    StrayWrite,
    /// Met a row an application wrote on the other side.
    Conflict,
}

impl Kind {
    /// `stray_write` or `conflict`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::StrayWrite => "stray_write",
            Kind::Conflict => "conflict",
        }
    }
}

/// The decision about one change, and what it is recorded as (`None`: a
/// plain apply, not recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// What the apply does.
    pub decision: Decision,
    /// What the change is recorded as.
    pub kind: Option<Kind>,
}

/// Whether a change made on `from` is a stray write in a group with
/// `policy` whose primary is `primary`.
pub fn is_stray(policy: Policy, primary: Side, from: Side) -> bool {
    from != primary && !policy.both_sides_write()
}

/// Whether the change committed at `incoming` wins over the row written
/// on the other side at `local`: the later commit; at the same time, the
/// source. A row whose commit time is unknown (commit timestamps off)
/// loses only to the primary.
fn later(incoming: Incoming, local: Option<CommitTime>, primary: Side) -> bool {
    match local {
        None => incoming.from == primary,
        Some(local) => match incoming.committed_at.cmp(&local) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => incoming.from == Side::Source,
        },
    }
}

/// What to do with `incoming`, a change an application committed, in a
/// group with `policy` whose primary is `primary`, meeting `local` on the
/// other side.
pub fn decide(policy: Policy, primary: Side, incoming: Incoming, local: Local) -> Verdict {
    let stray = is_stray(policy, primary, incoming.from);
    let kind = match local {
        _ if stray => Some(Kind::StrayWrite),
        Local::Written(_) => Some(Kind::Conflict),
        Local::Clear => None,
    };
    let decision = match (policy, local) {
        (_, Local::Clear) if !stray => Decision::Apply,
        (Policy::PrimaryWins, _) if stray => Decision::WriteBack,
        (Policy::PrimaryWins, _) => Decision::Apply,
        (Policy::Manual, _) => Decision::Park,
        (Policy::LastWriteWins | Policy::Bidirectional, Local::Clear) => Decision::Apply,
        (Policy::LastWriteWins | Policy::Bidirectional, Local::Written(at)) => {
            if later(incoming, at, primary) {
                Decision::Apply
            } else if stray {
                Decision::WriteBack
            } else {
                Decision::KeepOther
            }
        }
    };
    Verdict { decision, kind }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Side::{Source, Target};

    fn at(from: Side, committed_at: CommitTime) -> Incoming {
        Incoming { from, committed_at }
    }

    #[test]
    fn policies_are_named_as_in_the_configuration() {
        for policy in Policy::ALL {
            assert_eq!(Policy::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(Policy::parse("first_write_wins"), None);
        assert_eq!(Policy::default(), Policy::PrimaryWins);
    }

    #[test]
    fn a_change_from_the_primary_onto_a_clear_row_is_applied_and_not_recorded() {
        for policy in Policy::ALL {
            for primary in [Source, Target] {
                let verdict = decide(policy, primary, at(primary, 10), Local::Clear);
                let plain = Verdict {
                    decision: Decision::Apply,
                    kind: None,
                };
                assert_eq!(verdict, plain, "{policy} primary {primary}");
            }
        }
    }

    /// The truth table, the source being the primary: policy, where the
    /// change was made (at time 50), what the other side holds, the
    /// decision and what it is recorded as.
    #[test]
    fn truth_table() {
        use Decision::{Apply, KeepOther, Park, WriteBack};
        use Kind::{Conflict, StrayWrite};
        let rows: &[(Policy, Side, Local, Decision, Option<Kind>)] = &[
            // primary_wins: the primary always; a stray write is undone.
            (
                Policy::PrimaryWins,
                Source,
                Local::Written(Some(99)),
                Apply,
                Some(Conflict),
            ),
            (
                Policy::PrimaryWins,
                Source,
                Local::Written(None),
                Apply,
                Some(Conflict),
            ),
            (
                Policy::PrimaryWins,
                Target,
                Local::Clear,
                WriteBack,
                Some(StrayWrite),
            ),
            (
                Policy::PrimaryWins,
                Target,
                Local::Written(Some(1)),
                WriteBack,
                Some(StrayWrite),
            ),
            (
                Policy::PrimaryWins,
                Target,
                Local::Written(None),
                WriteBack,
                Some(StrayWrite),
            ),
            // last_write_wins: a stray write is still stray, but may win.
            (
                Policy::LastWriteWins,
                Source,
                Local::Written(Some(1)),
                Apply,
                Some(Conflict),
            ),
            (
                Policy::LastWriteWins,
                Source,
                Local::Written(Some(99)),
                KeepOther,
                Some(Conflict),
            ),
            (
                Policy::LastWriteWins,
                Target,
                Local::Clear,
                Apply,
                Some(StrayWrite),
            ),
            (
                Policy::LastWriteWins,
                Target,
                Local::Written(Some(1)),
                Apply,
                Some(StrayWrite),
            ),
            (
                Policy::LastWriteWins,
                Target,
                Local::Written(Some(99)),
                WriteBack,
                Some(StrayWrite),
            ),
            // bidirectional: nothing is stray; conflicts by time.
            (Policy::Bidirectional, Target, Local::Clear, Apply, None),
            (
                Policy::Bidirectional,
                Target,
                Local::Written(Some(1)),
                Apply,
                Some(Conflict),
            ),
            (
                Policy::Bidirectional,
                Target,
                Local::Written(Some(99)),
                KeepOther,
                Some(Conflict),
            ),
            (
                Policy::Bidirectional,
                Source,
                Local::Written(Some(99)),
                KeepOther,
                Some(Conflict),
            ),
            // manual: every stray write and every conflict waits.
            (
                Policy::Manual,
                Source,
                Local::Written(Some(1)),
                Park,
                Some(Conflict),
            ),
            (Policy::Manual, Target, Local::Clear, Park, Some(StrayWrite)),
            (
                Policy::Manual,
                Target,
                Local::Written(Some(1)),
                Park,
                Some(StrayWrite),
            ),
        ];
        for (policy, from, local, decision, kind) in rows {
            let verdict = decide(*policy, Source, at(*from, 50), *local);
            assert_eq!(
                verdict,
                Verdict {
                    decision: *decision,
                    kind: *kind
                },
                "{policy}, from {from}, {local:?}"
            );
        }
    }

    #[test]
    fn equal_commit_times_go_to_the_source_whichever_side_is_primary() {
        for primary in [Source, Target] {
            for policy in [Policy::LastWriteWins, Policy::Bidirectional] {
                let from_source = decide(policy, primary, at(Source, 7), Local::Written(Some(7)));
                assert_eq!(from_source.decision, Decision::Apply, "{policy}, {primary}");
                let from_target = decide(policy, primary, at(Target, 7), Local::Written(Some(7)));
                assert_ne!(from_target.decision, Decision::Apply, "{policy}, {primary}");
            }
        }
    }

    #[test]
    fn without_commit_times_the_primary_wins() {
        for policy in [Policy::LastWriteWins, Policy::Bidirectional] {
            let from_primary = decide(policy, Target, at(Target, 1), Local::Written(None));
            assert_eq!(from_primary.decision, Decision::Apply, "{policy}");
            let from_other = decide(policy, Target, at(Source, 1), Local::Written(None));
            assert_ne!(from_other.decision, Decision::Apply, "{policy}");
        }
    }

    /// Both sides write one row at about the same time, and each change
    /// meets the other's row: exactly one of the two is applied, so the
    /// sides end with the same version (both applied would swap them and
    /// leave them different, neither would leave them different too).
    /// Under `manual` both wait for an operator.
    #[test]
    fn two_writes_to_one_row_at_once_end_with_one_version() {
        for policy in Policy::ALL {
            for primary in [Source, Target] {
                for (source_at, target_at) in [(1, 2), (2, 1), (5, 5)] {
                    let source_change = decide(
                        policy,
                        primary,
                        at(Source, source_at),
                        Local::Written(Some(target_at)),
                    );
                    let target_change = decide(
                        policy,
                        primary,
                        at(Target, target_at),
                        Local::Written(Some(source_at)),
                    );
                    let decisions = [source_change.decision, target_change.decision];
                    let applied = decisions.iter().filter(|d| **d == Decision::Apply).count();
                    let case = format!(
                        "{policy}, primary {primary}, times {source_at}/{target_at}: {decisions:?}"
                    );
                    if policy == Policy::Manual {
                        assert_eq!(decisions, [Decision::Park; 2], "{case}");
                    } else {
                        assert_eq!(applied, 1, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn strayness_depends_on_the_side_and_the_policy_only() {
        assert!(is_stray(Policy::PrimaryWins, Source, Target));
        assert!(is_stray(Policy::Manual, Target, Source));
        assert!(!is_stray(Policy::Bidirectional, Source, Target));
        assert!(!is_stray(Policy::LastWriteWins, Target, Target));
        assert_eq!(Decision::WriteBack.resolution(), "written_back");
        assert_eq!(Kind::StrayWrite.as_str(), "stray_write");
    }
}
