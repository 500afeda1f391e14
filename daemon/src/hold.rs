//! A verify's hold on a running daemon's applier.
//!
//! `cutover verify` compares both sides as of one source position `L`
//! (docs/architecture.md invariant 10). When a daemon streams, the target
//! must stop at exactly `L` long enough for the verify to take a snapshot
//! of it, so the verify asks the daemon through the admin console:
//!
//! 1. `HOLD`: the applier finishes the batch in flight and applies nothing
//!    new ([`Hold::Armed`]). Everything applied so far committed on the
//!    source before the verify creates its slot, so before `L`.
//! 2. The verify creates a temporary slot: its consistent point is `L`.
//! 3. `HOLD AT 'L'`: the applier applies every transaction that commits
//!    before `L` and stops at the first one at or after it, or when the
//!    reader learns from the source that none is left before `L`
//!    ([`Hold::At`]). It reports the position reached ([`HoldSwitch::reached`]).
//! 4. The verify exports a target snapshot, then `RELEASE`s the hold.
//!
//! A hold belongs to the console connection that set it and ends with it:
//! a verify killed in the middle never leaves the daemon held. `HOLD AT`
//! is accepted only from the owner of an armed hold that the applier
//! reached, so that a hold released meanwhile (`RELEASE FORCE` by an
//! operator) fails the verify instead of letting it compare a target that
//! moved on. Nothing is
//! lost meanwhile: the source keeps the changes, the queue fills, lag grows.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cutover_replication::Lsn;
use tokio::sync::watch;

/// What the applier may apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Everything: no verify holds the daemon.
    Off,
    /// Nothing new.
    Armed {
        /// The console connection that holds it.
        owner: String,
    },
    /// What commits before `lsn`, then nothing.
    At {
        /// The position to stop at.
        lsn: Lsn,
        /// The console connection that holds it.
        owner: String,
    },
}

impl Hold {
    /// The position to stop at, if there is one.
    pub fn limit(&self) -> Option<Lsn> {
        match self {
            Hold::At { lsn, .. } => Some(*lsn),
            Hold::Off | Hold::Armed { .. } => None,
        }
    }

    fn owner(&self) -> Option<&str> {
        match self {
            Hold::Off => None,
            Hold::Armed { owner } | Hold::At { owner, .. } => Some(owner),
        }
    }

    /// `off`, `armed` or `at`, for the console.
    pub fn name(&self) -> &'static str {
        match self {
            Hold::Off => "off",
            Hold::Armed { .. } => "armed",
            Hold::At { .. } => "at",
        }
    }
}

/// Why a hold could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// Someone else holds the applier.
    #[error("another verify holds the applier ({0}): try again in a moment")]
    Busy(String),
    /// `HOLD AT` without a reached `HOLD` of the same owner: the hold was
    /// released (or never set) while the position was taken, so the
    /// applier may have applied past it.
    #[error(
        "no HOLD of this connection is in force (it was released, or never reached): the applier may have moved past the position; start again with HOLD"
    )]
    NotArmed,
    /// A position the applier cannot stop at.
    #[error("HOLD AT takes a position after 0/0")]
    ZeroPosition,
}

/// The hold and what the applier reached under it, changed together.
#[derive(Debug)]
struct State {
    hold: Hold,
    /// Bumped by every change of the hold: what the applier reports is
    /// for one generation, and a report for an older one is ignored.
    generation: u64,
    /// Where the applier stopped under this generation.
    reached: Option<Lsn>,
}

/// The hold, shared by the console (which sets it), the applier (which
/// obeys it and reports) and the reader (which looks for its position).
/// Every change is one step under one lock: two verifies can never both
/// believe they hold the applier.
#[derive(Debug)]
pub struct HoldSwitch {
    state: Mutex<State>,
    /// The hold and its generation, for the applier to wait on.
    changes: watch::Sender<(Hold, u64)>,
    /// The position of [`Hold::At`] as a number (0: none), for the reader,
    /// which looks at it on every keepalive.
    target: AtomicU64,
}

impl Default for HoldSwitch {
    fn default() -> HoldSwitch {
        HoldSwitch {
            state: Mutex::new(State {
                hold: Hold::Off,
                generation: 0,
                reached: None,
            }),
            changes: watch::channel((Hold::Off, 0)).0,
            target: AtomicU64::new(0),
        }
    }
}

impl HoldSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the hold, under the lock the caller holds.
    fn change(&self, state: &mut State, hold: Hold) {
        state.generation += 1;
        state.reached = None;
        self.target
            .store(hold.limit().map_or(0, |l| l.as_u64()), Ordering::Relaxed);
        state.hold = hold.clone();
        self.changes.send_replace((hold, state.generation));
    }

    /// `HOLD`: the applier applies nothing new, unless someone else holds
    /// it.
    pub fn arm(&self, owner: &str) -> Result<(), HoldError> {
        let mut state = self.lock();
        match state.hold.owner() {
            Some(other) if other != owner => return Err(HoldError::Busy(other.to_owned())),
            _ => {}
        }
        self.change(
            &mut state,
            Hold::Armed {
                owner: owner.to_owned(),
            },
        );
        Ok(())
    }

    /// `HOLD AT`: only from the owner of an armed hold the applier reached,
    /// so that nothing was applied since the position was taken.
    pub fn hold_at(&self, owner: &str, lsn: Lsn) -> Result<(), HoldError> {
        if lsn == Lsn::ZERO {
            return Err(HoldError::ZeroPosition);
        }
        let mut state = self.lock();
        let armed = matches!(&state.hold, Hold::Armed { owner: o } if o == owner);
        if !armed || state.reached.is_none() {
            return Err(HoldError::NotArmed);
        }
        self.change(
            &mut state,
            Hold::At {
                lsn,
                owner: owner.to_owned(),
            },
        );
        Ok(())
    }

    /// Ends the hold of `owner`, or (`None`: an operator's `RELEASE
    /// FORCE`) whoever holds it; returns whether one ended.
    pub fn release(&self, owner: Option<&str>) -> bool {
        let mut state = self.lock();
        let ends = match (state.hold.owner(), owner) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(holder), Some(owner)) => holder == owner,
        };
        if ends {
            tracing::info!(owner = ?state.hold.owner(), "the applier's hold ends");
            self.change(&mut state, Hold::Off);
        }
        ends
    }

    /// The current hold.
    pub fn current(&self) -> Hold {
        self.lock().hold.clone()
    }

    /// Follows the hold and its generation.
    pub fn watch(&self) -> watch::Receiver<(Hold, u64)> {
        self.changes.subscribe()
    }

    /// The position of [`Hold::At`], for the reader.
    pub fn target(&self) -> Option<Lsn> {
        match self.target.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Lsn::from_u64(n)),
        }
    }

    /// The applier stopped under the hold of `generation` with everything
    /// up to `applied` applied and durable (ignored if the hold changed
    /// since).
    pub fn stopped_at(&self, generation: u64, applied: Lsn) {
        let mut state = self.lock();
        if state.generation == generation && state.hold != Hold::Off {
            state.reached = Some(applied);
        }
    }

    /// Where the applier stopped under the current hold, if it has.
    pub fn reached(&self) -> Option<Lsn> {
        self.lock().reached
    }

    /// Waits up to `wait` for the applier to stop under the current hold
    /// of `owner`; `None` on timeout or when the hold is no longer theirs.
    pub async fn wait_reached(&self, owner: &str, wait: std::time::Duration) -> Option<Lsn> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let state = self.lock();
                if state.hold.owner() != Some(owner) {
                    return None;
                }
                if let Some(reached) = state.reached {
                    return Some(reached);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_belongs_to_its_owner_and_moves_on_only_once_reached() {
        let switch = HoldSwitch::default();
        let lsn: Lsn = "0/100".parse().unwrap();
        // HOLD AT without a reached HOLD is refused.
        assert_eq!(switch.hold_at("a", lsn), Err(HoldError::NotArmed));
        switch.arm("a").unwrap();
        assert_eq!(switch.arm("b"), Err(HoldError::Busy("a".into())));
        assert_eq!(switch.hold_at("a", lsn), Err(HoldError::NotArmed));
        let (_, generation) = switch.watch().borrow().clone();
        switch.stopped_at(generation, "0/50".parse().unwrap());
        assert_eq!(switch.hold_at("b", lsn), Err(HoldError::NotArmed));
        assert_eq!(switch.hold_at("a", Lsn::ZERO), Err(HoldError::ZeroPosition));
        switch.hold_at("a", lsn).unwrap();
        assert_eq!(switch.target(), Some(lsn));
        // A report for the armed generation is not one for this hold.
        switch.stopped_at(generation, "0/50".parse().unwrap());
        assert_eq!(switch.reached(), None);
        assert!(!switch.release(Some("b")));
        assert!(switch.release(Some("a")));
        assert_eq!(switch.current(), Hold::Off);
        assert_eq!(switch.target(), None);
    }

    #[test]
    fn a_forced_release_makes_the_owners_next_step_fail() {
        let switch = HoldSwitch::default();
        switch.arm("a").unwrap();
        let (_, generation) = switch.watch().borrow().clone();
        switch.stopped_at(generation, "0/50".parse().unwrap());
        assert!(switch.release(None));
        assert_eq!(
            switch.hold_at("a", "0/100".parse().unwrap()),
            Err(HoldError::NotArmed)
        );
    }
}
