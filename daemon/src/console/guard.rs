//! Who may try to log in to the console, and over what: failed password
//! attempts per peer address, refused for a time that grows with each one
//! past the first few, and plain connections refused when the console
//! serves TLS.
//!
//! The refusal comes before the password is looked at, so that guesses
//! cannot go on while the address is refused, whether they come one after
//! the other or over many connections opened at once.

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::Sink;
use pgwire::api::auth::StartupHandler;
use pgwire::api::{ClientInfo, PgWireConnectionState};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};

/// Set in a connection's metadata when its login succeeded, here and
/// nowhere else. pgwire leaves a connection readable after a FATAL login
/// error (its state reads "ready for query"), so the query handler runs a
/// command only for a connection that carries it.
pub const AUTHENTICATED: &str = "cutover.authenticated";

/// Failed attempts from one address that are never refused (typos).
pub const FREE_ATTEMPTS: u32 = 3;
/// The longest an address is refused after a failed attempt.
pub const MAX_REFUSAL: Duration = Duration::from_secs(60);
/// An address's failures are forgotten this long after its last one.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Addresses tracked at most; past it the oldest are forgotten first.
const MAX_PEERS: usize = 4096;

/// The unit failures are counted by: the address, or for IPv6 its /64
/// (one host commonly holds a whole /64 and could rotate through it).
fn counted_as(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// How long an address is refused after its `failures`-th failed attempt
/// in a row: nothing for the first [`FREE_ATTEMPTS`], then 1 s, doubling,
/// up to [`MAX_REFUSAL`].
pub fn refusal_after(failures: u32) -> Duration {
    match failures.checked_sub(FREE_ATTEMPTS + 1) {
        None => Duration::ZERO,
        Some(n) => Duration::from_secs(1u64 << n.min(6)).min(MAX_REFUSAL),
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    refused_until: Instant,
}

/// The failed attempts of every peer address, and the console's TLS rule.
#[derive(Debug)]
pub struct Guard {
    peers: Mutex<HashMap<IpAddr, Failures>>,
    tls_only: bool,
    failed: prometheus::IntCounter,
}

impl Guard {
    /// A guard counting failures into `failed` (the metric); `tls_only`
    /// refuses connections that did not negotiate TLS.
    pub fn new(tls_only: bool, failed: prometheus::IntCounter) -> Guard {
        Guard {
            peers: Mutex::new(HashMap::new()),
            tls_only,
            failed,
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        // A panic while holding it leaves only counters behind: go on.
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How much longer `peer` is refused, if it is.
    pub fn refused_for(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let peers = self.peers();
        let entry = peers.get(&counted_as(peer))?;
        entry
            .refused_until
            .checked_duration_since(now)
            .filter(|left| !left.is_zero())
    }

    /// Records a failed attempt from `peer`: its count in a row and how
    /// long it is refused now.
    pub fn failed(&self, peer: IpAddr, now: Instant) -> (u32, Duration) {
        self.failed.inc();
        let peer = counted_as(peer);
        let mut peers = self.peers();
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, f| now.saturating_duration_since(f.last) < FORGET_AFTER);
            if peers.len() >= MAX_PEERS
                && let Some(oldest) = peers.iter().min_by_key(|(_, f)| f.last).map(|(ip, _)| *ip)
            {
                peers.remove(&oldest);
            }
        }
        let entry = peers.entry(peer).or_insert(Failures {
            count: 0,
            last: now,
            refused_until: now,
        });
        if now.saturating_duration_since(entry.last) >= FORGET_AFTER {
            entry.count = 0;
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = now;
        let refusal = refusal_after(entry.count);
        entry.refused_until = now + refusal;
        (entry.count, refusal)
    }

    /// A login from `peer` succeeded: its failures are forgotten.
    pub fn succeeded(&self, peer: IpAddr) {
        self.peers().remove(&counted_as(peer));
    }

    /// Whether `peer` is tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.peers().len()
    }
}

fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".to_owned(),
        code.to_owned(),
        message,
    )))
}

/// A login handler behind the [`Guard`].
pub struct Guarded<S> {
    /// The login itself (SCRAM, or none).
    pub inner: S,
    /// The console's guard, shared by every connection.
    pub guard: Arc<Guard>,
}

#[async_trait]
impl<S: StartupHandler> StartupHandler for Guarded<S> {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let peer = client.socket_addr().ip();
        // The marker is the login's alone: a client may send a startup
        // parameter of that name, which pgwire keeps in the same map.
        client.metadata_mut().remove(AUTHENTICATED);
        if self.guard.tls_only && !client.is_secure() {
            return Err(fatal(
                "28000",
                "this console serves TLS only: connect with sslmode=require, or sslmode=verify-ca and sslrootcert set to console.tls_cert's issuer".to_owned(),
            ));
        }
        // Checked at every step of the login, not only its first message:
        // guesses sent over connections opened before the refusal began
        // are refused too.
        if let Some(left) = self.guard.refused_for(peer, Instant::now()) {
            return Err(fatal(
                "28000",
                format!(
                    "too many failed password attempts from {peer}: the console refuses this address for {} s more",
                    left.as_secs_f64().ceil() as u64
                ),
            ));
        }
        let result = self.inner.on_startup(client, message).await;
        client.metadata_mut().remove(AUTHENTICATED);
        match result {
            Err(err @ PgWireError::InvalidPassword(_)) => {
                let (count, refusal) = self.guard.failed(peer, Instant::now());
                tracing::warn!(%peer, failures_in_a_row = count, refused_for_seconds = refusal.as_secs(), "console: a wrong password");
                Err(err)
            }
            Ok(()) => {
                if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
                    self.guard.succeeded(peer);
                    client
                        .metadata_mut()
                        .insert(AUTHENTICATED.to_owned(), "1".to_owned());
                }
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(false, prometheus::IntCounter::new("t", "t").unwrap())
    }

    #[test]
    fn refusals_grow_after_the_free_attempts_and_stop_growing() {
        let waits: Vec<u64> = (1..=12).map(|n| refusal_after(n).as_secs()).collect();
        assert_eq!(waits, [0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(refusal_after(u32::MAX), MAX_REFUSAL);
    }

    #[test]
    fn a_peer_is_refused_alone_and_forgiven_by_a_login() {
        let guard = guard();
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..FREE_ATTEMPTS {
            guard.failed(a, now);
        }
        assert_eq!(guard.refused_for(a, now), None, "typos are free");
        assert_eq!(guard.failed(a, now), (4, Duration::from_secs(1)));
        assert_eq!(guard.refused_for(a, now), Some(Duration::from_secs(1)));
        assert_eq!(guard.refused_for(b, now), None, "another address");
        assert_eq!(
            guard.refused_for(a, now + Duration::from_secs(1)),
            None,
            "the refusal ends"
        );
        assert_eq!(
            guard.failed(a, now + Duration::from_secs(1)).1,
            Duration::from_secs(2)
        );
        guard.succeeded(a);
        assert_eq!(guard.refused_for(a, now), None);
        assert_eq!(guard.failed(a, now).0, 1, "a login starts the count again");
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let guard = guard();
        let now = Instant::now();
        for i in 1..=4u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
            guard.failed(ip, now);
        }
        let same = IpAddr::from([0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 9]);
        let other = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert!(guard.refused_for(same, now).is_some());
        assert_eq!(guard.refused_for(other, now), None);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(counted_as(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_while() {
        let guard = guard();
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..5 {
            guard.failed(a, now);
        }
        assert_eq!(guard.failed(a, now + FORGET_AFTER).0, 1);
    }

    #[test]
    fn the_addresses_tracked_are_bounded() {
        let guard = guard();
        let now = Instant::now();
        for i in 0..(MAX_PEERS as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            guard.failed(ip, now + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(guard.tracked(), MAX_PEERS);
        let newest = IpAddr::from(std::net::Ipv4Addr::from(
            0x0a00_0000 + MAX_PEERS as u32 + 99,
        ));
        assert_eq!(
            guard.failed(newest, now + Duration::from_secs(10)).0,
            2,
            "the newest are kept"
        );
    }
}
