//! A background writer on the source: the load a test runs cutover under.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::Pair;

/// Runs `statement(n)` on the source's `app` database for `n` = `first`
/// + 1, + 2, ... until stopped, counting each committed transaction.
#[derive(Debug)]
pub struct Writer {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Starts writing.
    pub async fn start(pair: &Pair, first: u64, statement: fn(u64) -> String) -> Writer {
        let client = pair.source.client("app").await;
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (Arc::clone(&done), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let mut n = first;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let sql = statement(n);
                client
                    .batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("writer: {sql}: {e}"));
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        Writer { done, stop, task }
    }

    /// Transactions committed so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more transactions committed.
    pub async fn advance(&self, n: u64, timeout: Duration) {
        let target = self.done() + n;
        crate::wait_for("the writer to advance", timeout, || async {
            (self.done() >= target).then_some(())
        })
        .await;
    }

    /// Stops, and returns how many transactions committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer panicked");
        self.done.load(Ordering::Relaxed)
    }
}
