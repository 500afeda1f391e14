//! `verify`: proving the target equal to the source, on the copied
//! dataset, twice: with both sides equal, and with 0.1% of the target's
//! `beneficiaries` rows changed behind cutover's back.
//!
//! Contestants: `cutover verify` (no daemon running: it takes its own
//! position), `pgcopydb compare data` and `reladiff` where installed, and
//! the floor: every table read once from both servers at the same time
//! (`COPY (SELECT * FROM t) TO STDOUT`, discarded), which any comparison
//! that reads the rows pays.

use std::process::{Command, Stdio};
use std::time::Instant;

use futures_util::StreamExt;

use super::context::{Bench, DB, PATIENCE, PeakRss};
use super::dataset::COPY_TABLES;
use super::report::{Better, Report};
use crate::cli::cutover_bin;

/// One verify scenario round: the dataset copied by `cutover run`, then
/// each case and contestant.
pub async fn verify(b: &Bench, report: &mut Report, round: usize) {
    b.on_target("TRUNCATE payments, documents, beneficiaries")
        .await;
    let config = b.cutover_config("verify-cutover", "bench_verify", COPY_TABLES);
    let mut daemon = b.start_cutover(&config).await;
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    for case in ["equal", "0.1% changed"] {
        let changed = if case == "equal" {
            0
        } else {
            // Behind cutover's back: replica mode fires no trigger.
            let client = b.tgt().await;
            client
                .batch_execute("SET session_replication_role = replica")
                .await
                .expect("replica mode");
            client
                .execute(
                    "UPDATE beneficiaries SET beneficiary_name = beneficiary_name || '!' WHERE id % 1000 = 0",
                    &[],
                )
                .await
                .expect("change 0.1% of the target's rows")
        };
        let scenario = format!("verify, {case}");
        println!("{scenario} round {round}");
        let mut contestants = vec!["cutover", "floor", "pgcopydb", "reladiff"];
        if !round.is_multiple_of(2) {
            contestants.reverse();
        }
        for contestant in contestants {
            b.settle().await;
            let cpu_before = b.cpu_now();
            let (seconds, verified, rss, note) = match contestant {
                "cutover" => cutover(&config, changed),
                "floor" => floor(b).await,
                "pgcopydb" => pgcopydb(b),
                _ => reladiff(b, changed),
            };
            let cpu = b.cpu_now().since(&cpu_before);
            let Some(seconds) = seconds else {
                println!("  {contestant}: skipped ({note})");
                continue;
            };
            println!("  {contestant}: {}", cpu.describe());
            report.record(
                &scenario,
                contestant,
                "time",
                seconds,
                "s",
                Better::Lower,
                verified,
                &note,
            );
            report.record_cpu(&scenario, contestant, &cpu, verified, "");
            if let Some(rss) = rss {
                report.record(
                    "memory",
                    contestant,
                    &format!("peak RSS {scenario}"),
                    rss,
                    "MB",
                    Better::Lower,
                    verified,
                    "",
                );
            }
        }
    }
    under_load(b, report, &config).await;
    b.drop_cutover("bench_verify").await;
}

/// How much a verify slows the application down: `pgbench -R 1000` of
/// single-row updates on the source (a table out of the verify's scope),
/// once alone and once while `cutover verify` runs, each for as long as a
/// verify takes; pgbench's average latency and its rate-limit lag.
async fn under_load(b: &Bench, report: &mut Report, config: &std::path::Path) {
    b.on_source(
        "DROP TABLE IF EXISTS verify_load;
         CREATE TABLE verify_load (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO verify_load (id) SELECT g FROM generate_series(1, 1000) g;",
    )
    .await;
    let script = b.fresh_dir("verify-load").join("update.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 1000)\nUPDATE verify_load SET v = v + 1 WHERE id = :id;\n",
    )
    .expect("write the pgbench script");
    // As long as a verify takes.
    let (seconds, ..) = cutover(config, 0);
    let seconds = seconds.unwrap_or(5.0).ceil() as u64;
    println!(
        "verify under load: pgbench -R 1000 for {seconds} s, alone then during cutover verify"
    );
    b.settle().await;
    let alone = pgbench(b, &script, seconds).await;
    b.settle().await;
    let mut runs = vec![("alone", alone)];
    for (contestant, rate) in [
        ("during cutover verify", None),
        ("during cutover verify, rate 100000", Some(100_000)),
    ] {
        b.settle().await;
        let load = {
            let script = script.clone();
            let port = b.source.port();
            tokio::task::spawn_blocking(move || run_pgbench(port, &script, seconds))
        };
        let config = config.to_owned();
        let verified = tokio::task::spawn_blocking(move || cutover_at(&config, 0, rate))
            .await
            .expect("join the verify");
        println!("  {contestant}: the verify took {:?} s", verified.0);
        runs.push((contestant, load.await.expect("join pgbench")));
    }
    for (contestant, (latency, lag)) in runs {
        println!(
            "  pgbench {contestant}: latency average {latency:.3} ms, schedule lag {lag:.3} ms"
        );
        for (metric, value) in [
            ("pgbench latency average", latency),
            ("pgbench schedule lag", lag),
        ] {
            report.record(
                "verify, under pgbench -R 1000",
                contestant,
                metric,
                value,
                "ms",
                Better::Lower,
                true,
                "",
            );
        }
    }
}

async fn pgbench(b: &Bench, script: &std::path::Path, seconds: u64) -> (f64, f64) {
    let script = script.to_owned();
    let port = b.source.port();
    tokio::task::spawn_blocking(move || run_pgbench(port, &script, seconds))
        .await
        .expect("join pgbench")
}

/// `pgbench -R 1000` for `seconds`: its latency average and average
/// schedule lag, in milliseconds, from its summary.
fn run_pgbench(port: u16, script: &std::path::Path, seconds: u64) -> (f64, f64) {
    let out = super::context::pgbench(port, script, 1000, seconds)
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // `latency average = 1.234 ms`, `rate limit schedule lag: avg 0.083 (max 2.3) ms`.
    let figure = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .map(|l| l[label.len()..].trim_start_matches([' ', '=', ':']))
            .map(|v| v.trim_start_matches("avg "))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (figure("latency average"), figure("rate limit schedule lag"))
}

/// `cutover verify --format json`; verified when it found exactly the
/// rows changed.
fn cutover(config: &std::path::Path, changed: u64) -> (Option<f64>, bool, Option<f64>, String) {
    cutover_at(config, changed, None)
}

/// [`cutover`] with `[verify] rate` set to `rate` source rows per second.
fn cutover_at(
    config: &std::path::Path,
    changed: u64,
    rate: Option<u64>,
) -> (Option<f64>, bool, Option<f64>, String) {
    let started = Instant::now();
    let child = Command::new(cutover_bin())
        .envs(rate.map(|r| ("CUTOVER__VERIFY__RATE", r.to_string())))
        .args([
            "--config",
            config.to_str().unwrap_or_default(),
            "verify",
            "--format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cutover verify");
    let rss = PeakRss::watch(child.id());
    let out = child.wait_with_output().expect("wait for cutover verify");
    let seconds = started.elapsed().as_secs_f64();
    let rss = rss.finish();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let found = report["differing_rows"].as_u64();
    let verified = found == Some(changed);
    if !verified {
        println!("  cutover verify found {found:?} differing rows, {changed} were changed");
    }
    (
        Some(seconds),
        verified,
        Some(rss),
        "2 workers, no daemon: the catch-up to its position included".to_owned(),
    )
}

/// Every table read once from both servers at the same time, discarded.
async fn floor(b: &Bench) -> (Option<f64>, bool, Option<f64>, String) {
    let started = Instant::now();
    let mut reads = tokio::task::JoinSet::new();
    for table in COPY_TABLES {
        for side in [b.src().await, b.tgt().await] {
            reads.spawn(async move {
                let sql = format!("COPY (SELECT * FROM {table}) TO STDOUT");
                let stream = side.copy_out(sql.as_str()).await.expect("COPY TO STDOUT");
                let mut stream = std::pin::pin!(stream);
                let mut bytes = 0usize;
                while let Some(chunk) = stream.next().await {
                    bytes += chunk.expect("COPY data").len();
                }
                bytes
            });
        }
    }
    let mut total = 0;
    while let Some(read) = reads.join_next().await {
        total += read.expect("a floor read");
    }
    (
        Some(started.elapsed().as_secs_f64()),
        true,
        None,
        format!(
            "{} MB read once from each server, in parallel, nothing compared",
            total / 1024 / 1024
        ),
    )
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `pgcopydb compare data`: one checksum query per table on each side.
fn pgcopydb(b: &Bench) -> (Option<f64>, bool, Option<f64>, String) {
    if !installed("pgcopydb") {
        return (
            None,
            false,
            None,
            "pgcopydb is not installed (apt-get install pgcopydb)".into(),
        );
    }
    // `compare` came with pgcopydb 0.13; Debian 12 ships 0.10.
    let help = Command::new("pgcopydb")
        .args(["compare", "--help"])
        .output();
    if !help.is_ok_and(|h| String::from_utf8_lossy(&h.stdout).contains("data")) {
        return (
            None,
            false,
            None,
            "this pgcopydb has no `compare data` (it came with 0.13)".into(),
        );
    }
    let dir = b.fresh_dir("verify-pgcopydb");
    let started = Instant::now();
    let out = Command::new("pgcopydb")
        .args(["compare", "data", "--source"])
        .arg(b.source.url(DB, "postgres", None))
        .arg("--target")
        .arg(b.target.url(DB, "postgres", None))
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("run pgcopydb compare data");
    let seconds = started.elapsed().as_secs_f64();
    (
        Some(seconds),
        out.status.success(),
        None,
        "one checksum per table (counts and sums; no row is named)".into(),
    )
}

/// `reladiff`: bisects key ranges by checksums the servers compute;
/// verified when it names exactly the rows changed (a changed row is one
/// `-` and one `+` line).
fn reladiff(b: &Bench, changed: u64) -> (Option<f64>, bool, Option<f64>, String) {
    if !installed("reladiff") {
        return (
            None,
            false,
            None,
            "reladiff is not installed (pip install 'reladiff[postgresql]')".into(),
        );
    }
    // reladiff knows only the `postgresql://` scheme, and exits 0 when it
    // refuses another one.
    let url = |cluster: &crate::cluster::Cluster| {
        cluster
            .url(DB, "postgres", None)
            .replacen("postgres://", "postgresql://", 1)
    };
    let started = Instant::now();
    let mut ok = true;
    let (mut minus, mut plus) = (0u64, 0u64);
    for table in COPY_TABLES {
        let out = Command::new("reladiff")
            .arg(url(&b.source))
            .arg(table)
            .arg(url(&b.target))
            .arg(table)
            .args(["-k", "id", "-c", "%"])
            .output()
            .expect("run reladiff");
        let text = String::from_utf8_lossy(&out.stdout);
        minus += text.lines().filter(|l| l.starts_with('-')).count() as u64;
        plus += text.lines().filter(|l| l.starts_with('+')).count() as u64;
        if !out.status.success() {
            ok = false;
            println!(
                "  reladiff {table}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    if (minus, plus) != (changed, changed) {
        println!(
            "  reladiff named {minus} rows on the source and {plus} on the target; {changed} were changed"
        );
        ok = false;
    }
    (
        Some(started.elapsed().as_secs_f64()),
        ok,
        None,
        "per table, bisecting id ranges by server-side checksums".into(),
    )
}
