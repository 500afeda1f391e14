//! `switch`: the write-unavailability window of a switch and a rollback
//! under a steady write load, and what the load lost.
//!
//! An application writes `rate` transactions per second (one row each, as
//! `pgbench -R`; pgbench itself cannot follow a re-pointed primary) as a
//! non-superuser role, `bench_app`, to whichever server a pointer file
//! names. Each contestant moves the writes `pairs` times to the target and
//! back, re-pointing the application at each move:
//!
//! - cutover: `cutover switch` and `cutover rollback`, with
//!   `repoint_command` writing the pointer file, with no daemon running
//!   and (`cutover (daemon)`) asked of a running daemon through its
//!   console; the window is the one the journal reports (fence start to
//!   new primary open);
//! - native logical replication by hand, as a script would do it on
//!   PostgreSQL 15: fence (`REVOKE` from the application role and end its
//!   sessions), a canary row written on the old primary and waited for on
//!   the new one, the subscription dropped, `setval` on the new primary,
//!   the reverse subscription created (PostgreSQL 15 has no `origin =
//!   none`: the old direction must be gone before the new one exists), the
//!   grant back and the pointer file; the window is measured the same way,
//!   from the fence to the pointer.
//!
//! Then every transaction the application saw committed is looked for on
//! both servers: missing ones are counted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::context::{Bench, DB, PATIENCE};
use super::report::{Better, Report, median, quantile};
use crate::app::App;
use crate::cli::cutover_bin;

const TABLES: &[&str] = &["switch_ledger", "switch_canary"];

fn write(n: u64) -> String {
    format!("INSERT INTO switch_ledger (n) VALUES ({n})")
}

/// The schema and the application role on both servers, empty.
async fn prepare(b: &Bench) {
    for cluster in [&b.source, &b.target] {
        cluster
            .execute(
                DB,
                "DROP TABLE IF EXISTS switch_ledger, switch_canary;
                 CREATE TABLE switch_ledger (id bigserial PRIMARY KEY, n bigint NOT NULL, at timestamptz DEFAULT now());
                 CREATE TABLE switch_canary (id int PRIMARY KEY, at timestamptz);
                 DO $$ BEGIN CREATE ROLE bench_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
                 GRANT INSERT, SELECT, UPDATE, DELETE ON switch_ledger TO bench_app;
                 GRANT USAGE ON SEQUENCE switch_ledger_id_seq TO bench_app;",
            )
            .await;
    }
}

/// What one contestant's run gave.
struct Run {
    windows: Vec<f64>,
    failed: u64,
    committed: usize,
    missing: usize,
}

/// Committed transactions missing on either server.
async fn missing(b: &Bench, committed: &[(u64, u16)]) -> usize {
    let mut lost = 0;
    for client in [b.src().await, b.tgt().await] {
        let present: std::collections::HashSet<i64> = client
            .query("SELECT n FROM switch_ledger", &[])
            .await
            .expect("read switch_ledger")
            .iter()
            .map(|r| r.get(0))
            .collect();
        lost += committed
            .iter()
            .filter(|(n, _)| !present.contains(&(*n as i64)))
            .count();
    }
    lost
}

/// One `switch` scenario round: cutover, then native by hand (the order
/// alternates between rounds).
pub async fn switch(b: &Bench, report: &mut Report, pairs: usize, rate: u32, round: usize) {
    let mut contestants = vec!["cutover", "cutover (daemon)", "native"];
    if !round.is_multiple_of(2) {
        contestants.reverse();
    }
    for contestant in contestants {
        prepare(b).await;
        b.settle().await;
        println!(
            "switch round {round}: {contestant}, {pairs} switch and rollback pairs at {rate} tx/s"
        );
        let run = match contestant {
            "cutover" => cutover(b, pairs, rate, false).await,
            "cutover (daemon)" => cutover(b, pairs, rate, true).await,
            _ => native(b, pairs, rate).await,
        };
        let verified = run.missing == 0;
        let note = format!(
            "{} transactions committed, {} failed (refused or cut), {} missing",
            run.committed, run.failed, run.missing
        );
        println!("  {contestant}: windows {:?} s; {note}", run.windows);
        for (metric, value) in [
            ("window p50", median(&run.windows)),
            ("window max", quantile(&run.windows, 1.0)),
        ] {
            report.record(
                "switch",
                contestant,
                metric,
                value,
                "s",
                Better::Lower,
                verified,
                &note,
            );
        }
        report.record(
            "switch",
            contestant,
            "failed transactions",
            run.failed as f64,
            "tx",
            Better::Lower,
            verified,
            "",
        );
        report.record(
            "switch",
            contestant,
            "missing transactions",
            run.missing as f64,
            "tx",
            Better::Lower,
            verified,
            "",
        );
    }
}

fn cutover_command(config: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(cutover_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .args(["--format", "json"])
        .env(
            "RUST_LOG",
            std::env::var("CUTOVER_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .expect("run cutover");
    if std::env::var("CUTOVER_BENCH_LOG").is_ok() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "cutover {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the journal as JSON")
}

/// `cutover switch` and `rollback`: with the daemon stopped (it streams
/// between the moves only at the start and the end), or asked of the
/// running daemon through its console (`daemon`), which turns around at
/// each move.
async fn cutover(b: &Bench, pairs: usize, rate: u32, daemon: bool) -> Run {
    let config = b.cutover_config("switch-cutover", "bench_switch", TABLES);
    let pointer = config.with_file_name("primary");
    std::fs::write(&pointer, b.source.port().to_string()).expect("write the pointer");
    let mut text = std::fs::read_to_string(&config)
        .expect("read the config")
        .replace(
            "[console]\nlisten = \"127.0.0.1:0\"\n",
            "[console]\nlisten = \"127.0.0.1:0\"\nallow_no_password = true\n",
        );
    text.push_str(&format!(
        "[switch]\nrepoint_command = \"echo $CUTOVER_NEW_PRIMARY_PORT > {}\"\nfence_wait_seconds = 1\n",
        pointer.display()
    ));
    std::fs::write(&config, text).expect("write the config");
    let mut running = b.start_cutover(&config).await;
    if !daemon {
        assert_eq!(running.terminate(PATIENCE), Some(0), "{}", running.log());
    }
    let app = App::start_paced(pointer.clone(), DB, "bench_app", write, Some(rate));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut windows = Vec::new();
    let config_path = config.clone();
    let verified = tokio::task::spawn_blocking(move || {
        Command::new(cutover_bin())
            .arg("--config")
            .arg(&config_path)
            .arg("verify")
            .output()
            .expect("run cutover verify")
            .status
            .success()
    })
    .await
    .expect("verify");
    assert!(verified, "cutover verify before the switch failed");
    for _ in 0..pairs {
        for command in ["switch", "rollback"] {
            let config = config.clone();
            let journal = tokio::task::spawn_blocking(move || cutover_command(&config, &[command]))
                .await
                .expect("the switch");
            windows.push(journal["window_seconds"].as_f64().unwrap_or(f64::NAN));
            if windows.len() <= 2 {
                for line in journal["lines"].as_array().into_iter().flatten() {
                    println!("    {command}: {}", line.as_str().unwrap_or_default());
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let record = app.stop().await;
    assert!(record.unexpected.is_empty(), "{:?}", record.unexpected);
    // The last writes on the source reach the target.
    if !daemon {
        running = b.start_cutover(&config).await;
    }
    b.wait_target(&format!(
        "SELECT count(*) >= {} FROM switch_ledger",
        record.committed.len()
    ))
    .await;
    assert_eq!(running.terminate(PATIENCE), Some(0), "{}", running.log());
    let missing = missing(b, &record.committed).await;
    let cleanup = Command::new(cutover_bin())
        .arg("--config")
        .arg(&config)
        .args(["cleanup", "--force"])
        .output()
        .expect("cutover cleanup");
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    Run {
        windows,
        failed: record.failed,
        committed: record.committed.len(),
        missing,
    }
}

/// One move by hand from `from` to `to` (clients of the two servers);
/// returns the window.
async fn move_by_hand(b: &Bench, forward: bool, pointer: &Path, canary: i32) -> f64 {
    let (old, new) = if forward {
        (b.src().await, b.tgt().await)
    } else {
        (b.tgt().await, b.src().await)
    };
    let (old_sub, new_sub) = if forward {
        ("switch_fwd", "switch_rev")
    } else {
        ("switch_rev", "switch_fwd")
    };
    let (new_port, old_conninfo) = if forward {
        (b.target.port(), b.source.conninfo(DB, "postgres"))
    } else {
        (b.source.port(), b.target.conninfo(DB, "postgres"))
    };
    let started = Instant::now();
    // The fence: the application's role may no longer write, and its
    // sessions end.
    old.batch_execute(
        "REVOKE INSERT, UPDATE, DELETE ON switch_ledger FROM bench_app;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'bench_app';",
    )
    .await
    .expect("fence by hand");
    // Everything before the canary is applied once the canary is.
    old.execute("INSERT INTO switch_canary VALUES ($1, now())", &[&canary])
        .await
        .expect("write the canary");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = new
            .query_opt("SELECT 1 FROM switch_canary WHERE id = $1", &[&canary])
            .await
            .expect("look for the canary")
            .is_some();
        if seen {
            break;
        }
        assert!(Instant::now() < deadline, "the canary never arrived");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The old direction goes (its slot with it), the sequence is set, the
    // way back is made before the new primary takes writes.
    new.batch_execute(&format!("DROP SUBSCRIPTION {old_sub}"))
        .await
        .expect("drop the old subscription");
    new.batch_execute(
        "SELECT setval('switch_ledger_id_seq', (SELECT coalesce(max(id), 1) FROM switch_ledger))",
    )
    .await
    .expect("setval");
    old.batch_execute(&format!(
        "CREATE SUBSCRIPTION {new_sub} CONNECTION '{}' PUBLICATION {new_sub} WITH (copy_data = false)",
        if forward {
            b.target.conninfo(DB, "postgres")
        } else {
            b.source.conninfo(DB, "postgres")
        }
    ))
    .await
    .expect("create the reverse subscription");
    let _ = old_conninfo;
    new.batch_execute("GRANT INSERT, UPDATE, DELETE ON switch_ledger TO bench_app")
        .await
        .expect("open by hand");
    std::fs::write(pointer, new_port.to_string()).expect("re-point");
    started.elapsed().as_secs_f64()
}

async fn native(b: &Bench, pairs: usize, rate: u32) -> Run {
    let dir = b.fresh_dir("switch-native");
    let pointer = dir.join("primary");
    std::fs::write(&pointer, b.source.port().to_string()).expect("write the pointer");
    let tables = TABLES.join(", ");
    b.on_source(&format!("CREATE PUBLICATION switch_fwd FOR TABLE {tables}"))
        .await;
    b.on_target(&format!("CREATE PUBLICATION switch_rev FOR TABLE {tables}"))
        .await;
    b.on_target(&format!(
        "CREATE SUBSCRIPTION switch_fwd CONNECTION '{}' PUBLICATION switch_fwd",
        b.source.conninfo(DB, "postgres")
    ))
    .await;
    b.wait_subscription_ready("switch_fwd", TABLES.len()).await;
    let app = App::start_paced(pointer.clone(), DB, "bench_app", write, Some(rate));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut windows = Vec::new();
    let mut canary = 0;
    for _ in 0..pairs {
        for forward in [true, false] {
            canary += 1;
            windows.push(move_by_hand(b, forward, &pointer, canary).await);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let record = app.stop().await;
    assert!(record.unexpected.is_empty(), "{:?}", record.unexpected);
    b.wait_target(&format!(
        "SELECT count(*) >= {} FROM switch_ledger",
        record.committed.len()
    ))
    .await;
    let missing = missing(b, &record.committed).await;
    // One statement each: DROP SUBSCRIPTION runs outside a transaction.
    b.on_target("DROP SUBSCRIPTION IF EXISTS switch_fwd").await;
    b.on_target("DROP PUBLICATION IF EXISTS switch_rev").await;
    b.on_source("DROP SUBSCRIPTION IF EXISTS switch_rev").await;
    b.on_source("DROP PUBLICATION IF EXISTS switch_fwd").await;
    Run {
        windows,
        failed: record.failed,
        committed: record.committed.len(),
        missing,
    }
}
