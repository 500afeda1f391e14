//! The demo's application: it writes payments (and touches their
//! beneficiary) on whichever server is the primary, about a hundred
//! transactions a second, and counts what it sees: writes committed,
//! writes refused while a switch moves the primary, and the longest time
//! it could not write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::NoTls;

/// What the application saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Transactions committed.
    pub committed: AtomicU64,
    /// Attempts refused (a fenced server, a server that went away).
    pub refused: AtomicU64,
    /// The longest stretch without a commit that began with a refusal,
    /// in microseconds.
    pub longest_gap_us: AtomicU64,
}

/// The running application.
#[derive(Debug)]
pub struct App {
    /// What it saw so far.
    pub seen: Arc<Seen>,
    on_target: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    /// Starts writing to `source_url` (the primary until told otherwise).
    pub fn start(source_url: String, target_url: String, beneficiaries: i64) -> App {
        let seen = Arc::new(Seen::default());
        let on_target = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn({
            let (seen, on_target) = (Arc::clone(&seen), Arc::clone(&on_target));
            async move {
                let urls = [source_url, target_url];
                let mut clients: [Option<tokio_postgres::Client>; 2] = [None, None];
                let mut refused_since: Option<Instant> = None;
                let mut n: i64 = 0;
                while !*stopped.borrow() {
                    let side = usize::from(on_target.load(Ordering::SeqCst));
                    if clients[side].as_ref().is_none_or(|c| c.is_closed()) {
                        clients[side] = connect(&urls[side]).await;
                    }
                    n += 1;
                    let beneficiary = 1 + (n * 7919) % beneficiaries.max(1);
                    let sql = format!(
                        "BEGIN;
                         INSERT INTO payments (beneficiary_id, amount, paid_on)
                             VALUES ({beneficiary}, {}.{:02}, current_date);
                         UPDATE beneficiaries SET updated_at = now() WHERE id = {beneficiary};
                         COMMIT;",
                        n % 500,
                        n % 100
                    );
                    let done = match &clients[side] {
                        Some(client) => client.batch_execute(&sql).await.is_ok(),
                        None => false,
                    };
                    if done {
                        seen.committed.fetch_add(1, Ordering::SeqCst);
                        if let Some(since) = refused_since.take() {
                            let gap = since.elapsed().as_micros() as u64;
                            seen.longest_gap_us.fetch_max(gap, Ordering::SeqCst);
                        }
                        let _ = tokio::time::timeout(Duration::from_millis(10), stopped.changed())
                            .await;
                    } else {
                        seen.refused.fetch_add(1, Ordering::SeqCst);
                        refused_since.get_or_insert_with(Instant::now);
                        // A failed transaction leaves the session aborted:
                        // a fresh one next time.
                        clients[side] = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        App {
            seen,
            on_target,
            stop,
            task,
        }
    }

    /// Writes to the target from now on (`true`) or to the source.
    pub fn write_to_target(&self, target: bool) {
        self.on_target.store(target, Ordering::SeqCst);
    }

    /// Stops writing.
    pub async fn stop(self) -> Arc<Seen> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.seen
    }
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(connection);
    Some(client)
}
