//! `kafka`: the feed's rate into librdkafka's mock cluster (in the bench's
//! process) while cutover catches up on the apply-100 backlog, beside the
//! rate at which the source decodes the same backlog for `cutover tail`
//! writing it to /dev/null: the ceiling of any client of one slot.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;

use super::context::{Bench, PATIENCE, PeakRss, parse_lsn};
use super::dataset::STREAM_TABLES;
use super::report::{Better, Report};
use super::scenarios::{
    backlog_on_own_slot, catch_up, origin_progress, reset_stream, run_timed, write_backlog,
};
use crate::cli::cutover_bin;

/// Transactions of the backlog: apply-100's.
const PER_TXN: i64 = 100;

/// `kafka`: one round.
pub async fn kafka(b: &Bench, report: &mut Report, changes: i64, round: usize) {
    let scenario = "kafka";
    let seeded = changes.max(1000);
    println!("{scenario} round {round}: {changes} changes in transactions of {PER_TXN}");

    // The ceiling: `cutover tail` on a slot holding the backlog.
    backlog_on_own_slot(b, "bench_tail", changes, PER_TXN).await;
    let config = b.cutover_config("kafka-tail", "bench_tail", STREAM_TABLES);
    let seconds = run_timed(
        Command::new(cutover_bin())
            .args(["--config"])
            .arg(&config)
            .args([
                "tail",
                "--slot",
                "bench_tail",
                "--publication",
                "bench_tail",
            ])
            .args(["--limit", &changes.to_string()])
            .stdout(Stdio::null()),
        "cutover tail",
    );
    b.on_source("SELECT pg_drop_replication_slot('bench_tail'); DROP PUBLICATION bench_tail")
        .await;
    report.record(
        scenario,
        "decode only",
        "throughput",
        changes as f64 / seconds,
        "changes/s",
        Better::Higher,
        true,
        "cutover tail to /dev/null: the source's decoding with a client that publishes nothing",
    );

    // cutover on the same backlog without the feed: what the target's
    // apply alone allows, the bound of the feed beside it.
    reset_stream(b, seeded).await;
    let config = b.cutover_config("kafka-target-only", "bench_kafka", STREAM_TABLES);
    let mut daemon = b.start_cutover(&config).await;
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    write_backlog(b, changes, PER_TXN, seeded).await;
    let before = origin_progress(b, "cutover_bench_kafka").await;
    let started = Instant::now();
    daemon.restart();
    let (_, applying) = catch_up(b, "cutover_bench_kafka", before, started).await;
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    b.drop_cutover("bench_kafka").await;
    report.record(
        scenario,
        "cutover, no feed",
        "throughput",
        changes as f64 / applying,
        "changes/s",
        Better::Higher,
        b.equal("bench_stream").await,
        "the same backlog applied to the target alone",
    );

    // cutover feeding the mock cluster beside the target.
    let cluster = MockCluster::new(1).expect("librdkafka's mock cluster");
    cluster
        .create_topic("bench.cutover.progress", 1, 1)
        .unwrap();
    for table in STREAM_TABLES {
        cluster
            .create_topic(&format!("bench.public.{table}"), 3, 1)
            .unwrap();
    }
    reset_stream(b, seeded).await;
    let config = b.cutover_config("kafka-cutover", "bench_kafka", STREAM_TABLES);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"bench\"\n",
            cluster.bootstrap_servers()
        ),
    )
    .unwrap();
    let state = config.parent().unwrap().join("state");
    let mut daemon = b.start_cutover(&config).await;
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    let written = write_backlog(b, changes, PER_TXN, seeded).await;
    println!("  backlog written in {written:.1} s");
    let before = origin_progress(b, "cutover_bench_kafka").await;
    let cpu_before = b.cpu_now();
    let started = Instant::now();
    daemon.restart();
    let rss = PeakRss::watch(daemon.pid().expect("running"));
    // The target has the backlog; then Kafka, up to the same position.
    let (total, applying) = catch_up(b, "cutover_bench_kafka", before, started).await;
    // The first batch: both sinks start on it together.
    let first = started + Duration::from_secs_f64(total - applying);
    let end = origin_progress(b, "cutover_bench_kafka").await;
    let addr = crate::http::listen_addr(&state).await;
    let done = loop {
        let (_, body) = crate::http::get(&addr, "/health");
        let committed = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|h| h["kafka_committed_lsn"].as_str().map(parse_lsn))
            .unwrap_or(0);
        if committed >= end {
            break Instant::now();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the feed never caught up:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let rss = rss.finish();
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    let cpu = b.cpu_now().since(&cpu_before);
    b.drop_cutover("bench_kafka").await;
    println!("  cutover: {}", cpu.describe());
    let feeding = done.duration_since(first).as_secs_f64().max(0.001);
    let verified = b.equal("bench_stream").await;
    report.record(
        scenario,
        "cutover",
        "throughput",
        changes as f64 / feeding,
        "changes/s",
        Better::Higher,
        verified,
        "into Kafka (the mock cluster), beside the target: from the first batch applied to the last Kafka commit",
    );
    report.record(
        scenario,
        "cutover",
        "catch-up",
        done.duration_since(started).as_secs_f64(),
        "s",
        Better::Lower,
        verified,
        "from start to Kafka holding the backlog, connection and startup included",
    );
    report.record_cpu(scenario, "cutover", &cpu, verified, "catch-up, ");
    report.record(
        "memory",
        "cutover",
        "peak RSS kafka",
        rss,
        "MB",
        Better::Lower,
        verified,
        "",
    );

    // The feed alone: no [target].
    reset_stream(b, seeded).await;
    let config = b.cutover_config("kafka-alone", "bench_kafka", STREAM_TABLES);
    let text = std::fs::read_to_string(&config).unwrap();
    let without_target: String = {
        let mut out = String::new();
        let mut skip = false;
        for line in text.lines() {
            if line.starts_with('[') {
                skip = line == "[target]";
            }
            if !skip {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    std::fs::write(
        &config,
        format!(
            "{without_target}[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"alone\"\n",
            cluster.bootstrap_servers()
        ),
    )
    .unwrap();
    cluster
        .create_topic("alone.cutover.progress", 1, 1)
        .unwrap();
    for table in STREAM_TABLES {
        cluster
            .create_topic(&format!("alone.public.{table}"), 3, 1)
            .unwrap();
    }
    let state = config.parent().unwrap().join("state");
    let mut daemon = b.start_cutover(&config).await;
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    // Every transaction of the backlog commits after this position, and
    // the marker's after the next: the feed's committed position says
    // when Kafka holds them.
    let backlog_from = insert_position(b).await;
    write_backlog(b, changes, PER_TXN, seeded).await;
    let marker_after = insert_position(b).await;
    b.on_source("INSERT INTO bench_marker VALUES (2, now())")
        .await;
    let cpu_before = b.cpu_now();
    let started = Instant::now();
    daemon.restart();
    let rss = PeakRss::watch(daemon.pid().expect("running"));
    let addr = crate::http::listen_addr(&state).await;
    let mut first = None;
    let done = loop {
        let (_, body) = crate::http::get(&addr, "/health");
        let health = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
        let committed = health["kafka_committed_lsn"].as_str().map_or(0, parse_lsn);
        let now = Instant::now();
        // Streaming, with the backlog ahead: the feed's work starts.
        if first.is_none() && health["state"] == "streaming" && committed <= backlog_from {
            first = Some(now);
        }
        if committed > marker_after {
            break now;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the feed never caught up:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let rss = rss.finish();
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    let cpu = b.cpu_now().since(&cpu_before);
    b.drop_cutover("bench_kafka").await;
    println!("  cutover, feed alone: {}", cpu.describe());
    let feeding = done
        .duration_since(first.unwrap_or(started))
        .as_secs_f64()
        .max(0.001);
    report.record(
        scenario,
        "cutover, feed alone",
        "throughput",
        changes as f64 / feeding,
        "changes/s",
        Better::Higher,
        true,
        "into Kafka with no target: from the stream's start to the last Kafka commit",
    );
    report.record(
        scenario,
        "cutover, feed alone",
        "catch-up",
        done.duration_since(started).as_secs_f64(),
        "s",
        Better::Lower,
        true,
        "from start to Kafka holding the backlog, connection and startup included",
    );
    report.record_cpu(scenario, "cutover, feed alone", &cpu, true, "catch-up, ");
    report.record(
        "memory",
        "cutover",
        "peak RSS kafka alone",
        rss,
        "MB",
        Better::Lower,
        true,
        "",
    );
}

/// The source's WAL insert position.
async fn insert_position(b: &Bench) -> u64 {
    let text: String = b
        .src()
        .await
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("the source's WAL position")
        .get(0);
    parse_lsn(&text)
}
