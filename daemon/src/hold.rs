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
//! a verify killed in the middle never leaves the daemon held. Nothing is
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

/// The hold, shared by the console (which sets it), the applier (which
/// obeys it and reports) and the reader (which looks for its position).
#[derive(Debug)]
pub struct HoldSwitch {
    hold: watch::Sender<Hold>,
    /// The position of [`Hold::At`] as a number (0: none), for the reader,
    /// which looks at it on every keepalive.
    target: AtomicU64,
    /// The applied (and durable) position at which the applier stopped
    /// under the current hold; `None` while it is still applying.
    reached: Mutex<Option<Lsn>>,
}

impl Default for HoldSwitch {
    fn default() -> HoldSwitch {
        HoldSwitch {
            hold: watch::channel(Hold::Off).0,
            target: AtomicU64::new(0),
            reached: Mutex::new(None),
        }
    }
}

impl HoldSwitch {
    /// Sets the hold (a new one: nothing reached under it yet).
    pub fn set(&self, hold: Hold) {
        self.target
            .store(hold.limit().map_or(0, |l| l.as_u64()), Ordering::Relaxed);
        *self.lock() = None;
        self.hold.send_replace(hold);
    }

    /// Sets `hold` unless someone else holds the applier; returns whether
    /// it was set.
    pub fn set_if_free(&self, hold: Hold) -> bool {
        let free = match self.hold.borrow().owner() {
            None => true,
            Some(owner) => Some(owner) == hold.owner(),
        };
        if free {
            self.set(hold);
        }
        free
    }

    /// Waits up to `wait` for the applier to stop under the current hold.
    pub async fn wait_reached(&self, wait: std::time::Duration) -> Option<Lsn> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(reached) = self.reached() {
                return Some(reached);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Ends the hold if `owner` holds it (its connection ended).
    pub fn release_by(&self, owner: &str) -> bool {
        let held = self.hold.borrow().owner() == Some(owner);
        if held {
            tracing::info!(
                owner,
                "the console connection holding the applier ended: released"
            );
            self.set(Hold::Off);
        }
        held
    }

    /// The current hold.
    pub fn current(&self) -> Hold {
        self.hold.borrow().clone()
    }

    /// Follows the hold.
    pub fn watch(&self) -> watch::Receiver<Hold> {
        self.hold.subscribe()
    }

    /// The position of [`Hold::At`], for the reader.
    pub fn target(&self) -> Option<Lsn> {
        match self.target.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Lsn::from_u64(n)),
        }
    }

    /// The applier stopped under the current hold with everything up to
    /// `applied` applied and durable.
    pub fn stopped_at(&self, applied: Lsn) {
        *self.lock() = Some(applied);
    }

    /// Where the applier stopped under the current hold, if it has.
    pub fn reached(&self) -> Option<Lsn> {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Lsn>> {
        self.reached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_ends_with_the_connection_that_set_it_only() {
        let switch = HoldSwitch::default();
        let lsn: Lsn = "0/100".parse().unwrap();
        switch.set(Hold::At {
            lsn,
            owner: "a".into(),
        });
        assert_eq!(switch.target(), Some(lsn));
        switch.stopped_at(lsn);
        assert_eq!(switch.reached(), Some(lsn));
        assert!(!switch.release_by("b"));
        assert_eq!(switch.current().limit(), Some(lsn));
        assert!(switch.release_by("a"));
        assert_eq!(switch.current(), Hold::Off);
        assert_eq!(switch.target(), None);
        assert_eq!(switch.reached(), None);
    }
}
