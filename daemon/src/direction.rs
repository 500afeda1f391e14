//! Which way a stream runs.
//!
//! Before the switch, changes flow forward: from the source (the old
//! server, where the application writes) to the target. After it, they
//! flow in reverse, from the target back to the source, so that a
//! rollback loses nothing. Each direction has its own slot, its own
//! replication origin on the server it writes to, and its own records in
//! the store, metrics and status; the same pipeline serves both
//! (docs/architecture.md, "Data flow").

use std::fmt;

use serde::{Deserialize, Serialize};

/// The way changes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From the source to the target: the copy's continuation, until the
    /// switch.
    Forward,
    /// From the target back to the source, after the switch.
    Reverse,
}

impl Direction {
    /// `forward` or `reverse`: the label value in metrics, the key part in
    /// the store, the word in status output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }

    /// The other direction.
    pub const fn opposite(self) -> Direction {
        match self {
            Direction::Forward => Direction::Reverse,
            Direction::Reverse => Direction::Forward,
        }
    }

    /// The replication origin that tags this direction's writes on the
    /// server it writes to (the applied position is recorded in it), for
    /// the migration whose slot is `slot`. The other direction skips
    /// changes carrying it, so that nothing loops (invariant 5).
    pub fn origin(self, slot: &str) -> String {
        match self {
            Direction::Forward => format!("cutover_{slot}"),
            Direction::Reverse => format!("cutover_{slot}_reverse"),
        }
    }

    /// The replication slot this direction reads, on the server it reads,
    /// for the migration whose (forward) slot is `slot`.
    pub fn slot(self, slot: &str) -> String {
        match self {
            Direction::Forward => slot.to_owned(),
            Direction::Reverse => format!("{slot}_reverse"),
        }
    }

    /// The publication this direction reads, on the server it reads.
    pub fn publication(self, publication: &str) -> String {
        match self {
            Direction::Forward => publication.to_owned(),
            Direction::Reverse => format!("{publication}_reverse"),
        }
    }

    /// The replication origin of `cutover verify --repair` and of the
    /// background verifier's repairs made beside a running daemon: the
    /// daemon's own session holds the forward origin, and PostgreSQL lets
    /// one session at a time use an origin. Only the target is repaired.
    pub fn repair_origin(slot: &str) -> String {
        format!("cutover_{slot}_repair")
    }

    /// The origins whose changes this direction never applies: those
    /// cutover wrote on the server it reads (invariant 5).
    pub fn skipped_origins(self, slot: &str) -> Vec<String> {
        let mut skipped = vec![self.opposite().origin(slot)];
        match self {
            Direction::Reverse => skipped.push(Direction::repair_origin(slot)),
            // With table groups, the stray writes on the source are
            // repaired from the target, in the reverse direction's repair
            // origin.
            Direction::Forward => {
                skipped.push(Direction::repair_origin(&Direction::Reverse.slot(slot)));
            }
        }
        skipped
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_direction_skips_the_origin_of_the_other() {
        assert_eq!(Direction::Forward.origin("mig"), "cutover_mig");
        assert_eq!(Direction::Reverse.origin("mig"), "cutover_mig_reverse");
        for d in [Direction::Forward, Direction::Reverse] {
            assert_ne!(d.origin("mig"), d.opposite().origin("mig"));
            assert_eq!(d.opposite().opposite(), d);
        }
        assert_eq!(
            serde_json::to_string(&Direction::Reverse).unwrap(),
            "\"reverse\""
        );
        assert_eq!(Direction::Forward.to_string(), "forward");
        // The repairs are written on the target: the reverse direction,
        // which reads it, skips them with the forward stream's writes.
        assert_eq!(
            Direction::Reverse.skipped_origins("mig"),
            ["cutover_mig", "cutover_mig_repair"]
        );
        assert_eq!(
            Direction::Forward.skipped_origins("mig"),
            ["cutover_mig_reverse", "cutover_mig_reverse_repair"]
        );
    }
}
