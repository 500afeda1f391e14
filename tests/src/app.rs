//! An application under a switch: it writes to whichever server a pointer
//! file names (the switch's `repoint_command` rewrites it), reconnects
//! when it changes, and keeps a record of every transaction that
//! committed, so that a test can check none is missing on either server.
//! A write refused by the fence (SQLSTATE 25006, or 42501 for a fence by
//! REVOKE) or cut by a closed connection is counted as failed and tried
//! again with the next number;
//! any other error is kept, for the test to fail on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::NoTls;

/// What the application saw.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// `(n, port)` of each transaction that committed, in order.
    pub committed: Vec<(u64, u16)>,
    /// Writes the fence refused or a closed connection cut.
    pub failed: u64,
    /// Any other error: a test fails on these.
    pub unexpected: Vec<String>,
}

/// The running application.
#[derive(Debug)]
pub struct App {
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn read_port(pointer: &Path) -> Option<u16> {
    std::fs::read_to_string(pointer).ok()?.trim().parse().ok()
}

impl App {
    /// Starts writing `statement(n)` (n = 1, 2, ...) to database `app` as
    /// `user` on the port `pointer` names.
    pub fn start(pointer: PathBuf, user: &str, statement: fn(u64) -> String) -> App {
        App::start_paced(pointer, "app", user, statement, None)
    }

    /// [`App::start`] on database `dbname`, at `rate` transactions per
    /// second at most (as `pgbench -R`, without its random arrival times).
    pub fn start_paced(
        pointer: PathBuf,
        dbname: &str,
        user: &str,
        statement: fn(u64) -> String,
        rate: Option<u32>,
    ) -> App {
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (Arc::clone(&record), Arc::clone(&stop));
        let user = user.to_owned();
        let dbname = dbname.to_owned();
        let task = tokio::spawn(async move {
            let mut n = 0;
            let mut current: Option<(u16, tokio_postgres::Client)> = None;
            let started = tokio::time::Instant::now();
            while !s.load(Ordering::Relaxed) {
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
                    tokio::time::sleep_until(due).await;
                }
                let Some(port) = read_port(&pointer) else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                if current
                    .as_ref()
                    .is_none_or(|(p, c)| *p != port || c.is_closed())
                {
                    let conninfo = format!(
                        "host=127.0.0.1 port={port} dbname={dbname} user={user} connect_timeout=5"
                    );
                    match tokio_postgres::connect(&conninfo, NoTls).await {
                        Ok((client, connection)) => {
                            tokio::spawn(connection);
                            current = Some((port, client));
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let Some((port, client)) = &current else {
                    continue;
                };
                n += 1;
                let sql = statement(n);
                match client.batch_execute(&sql).await {
                    Ok(()) => r.lock().unwrap().committed.push((n, *port)),
                    Err(e)
                        if e.code()
                            == Some(
                                &tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION,
                            )
                            // A fence by REVOKE, as a script by hand makes.
                            || e.code()
                                == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
                            || e.is_closed()
                            || e.code()
                                == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN) =>
                    {
                        let _ = client.batch_execute("ROLLBACK").await;
                        r.lock().unwrap().failed += 1;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        r.lock().unwrap().unexpected.push(format!("{sql}: {e:?}"));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        App { record, stop, task }
    }

    /// What it saw so far.
    pub fn record(&self) -> Record {
        self.record.lock().unwrap().clone()
    }

    /// Waits until `n` more transactions committed on `port`.
    pub async fn advance_on(&self, port: u16, n: usize, timeout: Duration) {
        let count = || {
            self.record()
                .committed
                .iter()
                .filter(|(_, p)| *p == port)
                .count()
        };
        let target = count() + n;
        crate::wait_for("the application to advance", timeout, || async {
            (count() >= target).then_some(())
        })
        .await;
    }

    /// Stops, and returns what it saw.
    pub async fn stop(self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the application panicked");
        self.record.lock().unwrap().clone()
    }
}
