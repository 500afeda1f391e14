//! The scenarios of `make bench`, each run for cutover and its peers on
//! the same clusters, alternately.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::context::{Bench, DB, PATIENCE, PeakRss, parse_lsn};
use super::dataset::{self, COPY_TABLES, STREAM_TABLES, Sizes};
use super::report::{Better, Report, quantile};
use crate::cli::cutover_bin;
use crate::cluster::bindir;

/// The dataset on the source and the empty schema on the target.
pub async fn prepare(b: &Bench) {
    let schema = format!("{}{}", dataset::drop_schema(), dataset::SCHEMA);
    b.on_source(&schema).await;
    b.on_target(&schema).await;
    b.on_source(dataset::BACKLOG_PROCEDURE).await;
    let sizes = Sizes::for_rows(b.rows);
    for (what, sql) in dataset::generate(sizes, b.seed) {
        let started = Instant::now();
        b.on_source(&sql).await;
        println!(
            "  dataset: {what} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    b.on_target(dataset::WAL_WARMUP).await;
    println!(
        "  target WAL warm-up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The bytes of the copied tables on the source (heap, TOAST, no indexes).
async fn copy_bytes(b: &Bench) -> f64 {
    let sql = format!(
        "SELECT ({})::float8",
        COPY_TABLES
            .iter()
            .map(|t| format!("pg_table_size('{t}')"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    b.src()
        .await
        .query_one(&sql, &[])
        .await
        .expect("table sizes")
        .get(0)
}

async fn copy_verified(b: &Bench) -> bool {
    let mut all = true;
    for table in COPY_TABLES {
        let (source, target) = (b.src().await, b.tgt().await);
        let (s, t) = (
            Bench::fingerprint(&source, table).await,
            Bench::fingerprint(&target, table).await,
        );
        if s != t {
            println!(
                "  {table} differs: source {} rows, target {} rows",
                s.0, t.0
            );
            all = false;
        }
    }
    all
}

async fn empty_copy_tables(b: &Bench) {
    b.on_target("TRUNCATE payments, documents, beneficiaries")
        .await;
}

/// `copy`: the snapshot copy of the dataset into the pre-created schema.
pub async fn copy(b: &Bench, report: &mut Report, round: usize) {
    let bytes = copy_bytes(b).await;
    let mb = bytes / 1024.0 / 1024.0;
    println!(
        "copy round {round}: {mb:.0} MB in {} tables",
        COPY_TABLES.len()
    );
    let mut contestants: Vec<&str> = vec![
        "cutover",
        "native",
        "pg_dump|pg_restore",
        "pgcopydb",
        "cutover drop_indexes",
    ];
    if !round.is_multiple_of(2) {
        contestants.reverse();
    }
    for contestant in contestants {
        empty_copy_tables(b).await;
        b.settle().await;
        let cpu_before = b.cpu_now();
        let (result, note, rss) = match contestant {
            "cutover" => copy_cutover(b, false).await,
            "cutover drop_indexes" => copy_cutover(b, true).await,
            "native" => copy_native(b).await,
            "pg_dump|pg_restore" => copy_pg_dump(b),
            _ => copy_pgcopydb(b),
        };
        let cpu = b.cpu_now().since(&cpu_before);
        println!("  {contestant}: {}", cpu.describe());
        let Some(seconds) = result else {
            println!("  {contestant}: skipped ({note})");
            continue;
        };
        let verified = copy_verified(b).await;
        report.record(
            "copy",
            contestant,
            "time",
            seconds,
            "s",
            Better::Lower,
            verified,
            &note,
        );
        report.record(
            "copy",
            contestant,
            "throughput",
            mb / seconds,
            "MB/s",
            Better::Higher,
            verified,
            "",
        );
        report.record_cpu("copy", contestant, &cpu, verified, "");
        if let Some(rss) = rss {
            report.record(
                "memory",
                contestant,
                "peak RSS during copy",
                rss,
                "MB",
                Better::Lower,
                verified,
                "",
            );
        }
    }
}

async fn copy_cutover(b: &Bench, drop_indexes: bool) -> (Option<f64>, String, Option<f64>) {
    // Each variant in a directory of its own, so `--keep` keeps both logs.
    let name = if drop_indexes {
        "copy-cutover-drop-indexes"
    } else {
        "copy-cutover"
    };
    let config = b.cutover_config(name, "bench_copy", COPY_TABLES);
    if drop_indexes {
        let text = std::fs::read_to_string(&config).expect("read the config");
        std::fs::write(&config, format!("{text}drop_indexes = true\n")).expect("write the config");
    }
    let log = config.with_extension("log");
    let started = Instant::now();
    let child = Command::new(cutover_bin())
        .arg("--config")
        .arg(&config)
        .arg("copy")
        .env(
            "RUST_LOG",
            std::env::var("CUTOVER_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the copy log"))
        .spawn()
        .expect("start cutover copy");
    let rss = PeakRss::watch(child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait for cutover copy");
    let seconds = started.elapsed().as_secs_f64();
    let rss = rss.finish();
    assert!(
        out.status.success(),
        "cutover copy failed:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    b.drop_cutover("bench_copy").await;
    let note = if drop_indexes {
        format!(
            "{} workers, [copy] drop_indexes = true (opt-in: indexes and constraints rebuilt after the load, inside the time)",
            b.workers
        )
    } else {
        format!("{} workers, default config", b.workers)
    };
    (Some(seconds), note, Some(rss))
}

async fn copy_native(b: &Bench) -> (Option<f64>, String, Option<f64>) {
    let started = Instant::now();
    b.create_subscription("native_copy", COPY_TABLES, true)
        .await;
    let seconds = started.elapsed().as_secs_f64();
    b.drop_subscription("native_copy").await;
    (
        Some(seconds),
        "CREATE SUBSCRIPTION until every table is ready; max_sync_workers_per_subscription = 2"
            .to_owned(),
        None,
    )
}

/// Runs a peer's command to its end: the wall clock around it, in seconds.
/// A failed run stops the benchmark with the command's stderr.
pub(super) fn run_timed(command: &mut Command, what: &str) -> f64 {
    let started = Instant::now();
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seconds
}

fn copy_pg_dump(b: &Bench) -> (Option<f64>, String, Option<f64>) {
    let tables: String = COPY_TABLES
        .iter()
        .map(|t| format!(" -t public.{t}"))
        .collect();
    let script = format!(
        "set -o pipefail; '{}' -Fc --data-only{tables} -d '{}' | '{}' --data-only -d '{}'",
        bindir().join("pg_dump").display(),
        b.source.url(DB, "postgres", None),
        bindir().join("pg_restore").display(),
        b.target.url(DB, "postgres", None),
    );
    let seconds = run_timed(
        Command::new("bash").args(["-c", &script]),
        "pg_dump | pg_restore",
    );
    (
        Some(seconds),
        "one stream (a pipe cannot restore in parallel)".to_owned(),
        None,
    )
}

fn copy_pgcopydb(b: &Bench) -> (Option<f64>, String, Option<f64>) {
    if Command::new("pgcopydb").arg("--version").output().is_err() {
        return (
            None,
            "pgcopydb is not installed (apt-get install pgcopydb)".to_owned(),
            None,
        );
    }
    let dir = b.fresh_dir("pgcopydb");
    let filters = dir.join("filters.ini");
    let include: String = COPY_TABLES
        .iter()
        .map(|t| format!("public.{t}\n"))
        .collect();
    std::fs::write(&filters, format!("[include-only-table]\n{include}")).expect("write filters");
    let seconds = run_timed(
        Command::new("pgcopydb")
            .args(["copy", "table-data", "--source"])
            .arg(b.source.url(DB, "postgres", None))
            .arg("--target")
            .arg(b.target.url(DB, "postgres", None))
            .arg("--dir")
            .arg(dir.join("work"))
            .arg("--table-jobs")
            .arg(b.workers.to_string())
            .arg("--filters")
            .arg(&filters),
        "pgcopydb",
    );
    (
        Some(seconds),
        format!("copy table-data --table-jobs {}", b.workers),
        None,
    )
}

/// Empties the stream tables on both sides and seeds `seeded` rows on the
/// source, before any slot exists.
pub(super) async fn reset_stream(b: &Bench, seeded: i64) {
    b.on_target("TRUNCATE bench_stream, bench_marker").await;
    b.on_source(&format!(
        "TRUNCATE bench_stream, bench_marker; {}",
        dataset::stream_seed(seeded)
    ))
    .await;
    b.settle().await;
}

/// The backlog and then the marker, on the source.
pub(super) async fn write_backlog(b: &Bench, changes: i64, per_txn: i64, seeded: i64) -> f64 {
    let source = b.src().await;
    source
        .batch_execute("SET synchronous_commit = off")
        .await
        .expect("synchronous_commit");
    let started = Instant::now();
    source
        .batch_execute(&dataset::backlog_call(changes, per_txn, seeded, b.seed))
        .await
        .expect("write the backlog");
    source
        .batch_execute("INSERT INTO bench_marker VALUES (1, now())")
        .await
        .expect("marker");
    started.elapsed().as_secs_f64()
}

const MARKER: &str = "SELECT EXISTS (SELECT 1 FROM bench_marker WHERE id = 1)";

/// `apply-1` / `apply-100`: catch-up on a backlog of `changes` changes in
/// transactions of `per_txn` rows.
pub async fn apply(b: &Bench, report: &mut Report, changes: i64, per_txn: i64, round: usize) {
    let scenario = format!("apply-{per_txn}");
    let seeded = changes.max(1000);
    println!("{scenario} round {round}: {changes} changes in transactions of {per_txn}");
    decode_ceiling(b, report, &scenario, changes, per_txn).await;
    let order: [&str; 2] = if round.is_multiple_of(2) {
        ["cutover", "native"]
    } else {
        ["native", "cutover"]
    };
    for contestant in order {
        reset_stream(b, seeded).await;
        let ((seconds, applying), rss, cpu) = if contestant == "cutover" {
            let config =
                b.cutover_config(&format!("{scenario}-cutover"), "bench_apply", STREAM_TABLES);
            let mut daemon = b.start_cutover(&config).await;
            assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
            let written = write_backlog(b, changes, per_txn, seeded).await;
            println!("  backlog written in {written:.1} s");
            let before = origin_progress(b, "cutover_bench_apply").await;
            let cpu_before = b.cpu_now();
            let started = Instant::now();
            daemon.restart();
            let rss = PeakRss::watch(daemon.pid().expect("running"));
            let timing = catch_up(b, "cutover_bench_apply", before, started).await;
            // Read at the last applied change, as native's is: the
            // daemon's shutdown, like the subscription's drop, is outside.
            let cpu = b
                .cpu_now_with(daemon.pid().expect("running"))
                .since(&cpu_before);
            let rss = rss.finish();
            assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
            let to_exit = b.cpu_now().since(&cpu_before);
            println!("  cutover to its exit: {}", to_exit.describe());
            b.drop_cutover("bench_apply").await;
            (timing, Some(rss), cpu)
        } else {
            b.create_subscription("native_apply", STREAM_TABLES, true)
                .await;
            b.on_target("ALTER SUBSCRIPTION native_apply DISABLE").await;
            wait_worker_gone(b, "native_apply").await;
            let written = write_backlog(b, changes, per_txn, seeded).await;
            println!("  backlog written in {written:.1} s");
            let origin = b.subscription_origin("native_apply").await;
            let before = origin_progress(b, &origin).await;
            let cpu_before = b.cpu_now();
            let started = Instant::now();
            b.on_target("ALTER SUBSCRIPTION native_apply ENABLE").await;
            let timing = catch_up(b, &origin, before, started).await;
            let cpu = b.cpu_now().since(&cpu_before);
            b.drop_subscription("native_apply").await;
            (timing, None, cpu)
        };
        println!("  {contestant}: {}", cpu.describe());
        let verified = b.equal("bench_stream").await;
        report.record(
            &scenario,
            contestant,
            "throughput",
            changes as f64 / applying,
            "changes/s",
            Better::Higher,
            verified,
            "from the first applied transaction to the last",
        );
        report.record(
            &scenario,
            contestant,
            "catch-up",
            seconds,
            "s",
            Better::Lower,
            verified,
            "from start, connection and startup included",
        );
        report.record_cpu(
            &scenario,
            contestant,
            &cpu,
            verified,
            "to the last applied change, ",
        );
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

/// The same backlog decoded by the source's walsender into
/// `pg_recvlogical`, which writes it to /dev/null: the rate at which the
/// source hands out changes to a client that applies nothing. When cutover
/// and native replication both apply at about this rate, the source's
/// decoding (and not the apply) is what bounds them on this machine.
async fn decode_ceiling(
    b: &Bench,
    report: &mut Report,
    scenario: &str,
    changes: i64,
    per_txn: i64,
) {
    backlog_on_own_slot(b, "bench_decode", changes, per_txn).await;
    let end: String = b
        .src()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("the source's WAL position")
        .get(0);
    let seconds = run_timed(
        Command::new(bindir().join("pg_recvlogical"))
            .args(["-d", &b.source.url(DB, "postgres", None)])
            .args(["-S", "bench_decode", "--start", "-E", &end, "--no-loop"])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=bench_decode",
            ])
            .args(["-f", "/dev/null"]),
        "pg_recvlogical",
    );
    b.on_source("SELECT pg_drop_replication_slot('bench_decode'); DROP PUBLICATION bench_decode")
        .await;
    report.record(
        scenario,
        "decode only",
        "throughput",
        changes as f64 / seconds,
        "changes/s",
        Better::Higher,
        true,
        "pg_recvlogical to /dev/null: the source's decoding with a client that applies nothing",
    );
}

/// The stream tables emptied and seeded, a publication and a slot
/// `name` of their own, then the backlog: what a client decoding the
/// backlog alone reads.
pub(super) async fn backlog_on_own_slot(b: &Bench, name: &str, changes: i64, per_txn: i64) {
    let seeded = changes.max(1000);
    reset_stream(b, seeded).await;
    let tables = STREAM_TABLES.join(", ");
    b.on_source(&format!(
        "DROP PUBLICATION IF EXISTS {name}; CREATE PUBLICATION {name} FOR TABLE {tables}"
    ))
    .await;
    b.on_source(&format!(
        "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"
    ))
    .await;
    write_backlog(b, changes, per_txn, seeded).await;
}

/// The target's replication origin progress (0 before any).
pub(super) async fn origin_progress(b: &Bench, origin: &str) -> u64 {
    let text: Option<String> = b
        .tgt()
        .await
        .query_one(
            "SELECT pg_replication_origin_progress($1, false)::text",
            &[&origin],
        )
        .await
        .expect("pg_replication_origin_progress")
        .get(0);
    text.as_deref().map(parse_lsn).unwrap_or(0)
}

/// Waits for the marker: (seconds since `started`, seconds from the first
/// transaction applied after `before` to the marker).
pub(super) async fn catch_up(b: &Bench, origin: &str, before: u64, started: Instant) -> (f64, f64) {
    let target = b.tgt().await;
    let mut first: Option<Instant> = None;
    loop {
        let row = target
            .query_one(
                "SELECT pg_replication_origin_progress($1, false)::text,
                        EXISTS (SELECT 1 FROM bench_marker WHERE id = 1)",
                &[&origin],
            )
            .await
            .expect("poll the target");
        let progress = row
            .get::<_, Option<String>>(0)
            .as_deref()
            .map(parse_lsn)
            .unwrap_or(0);
        let now = Instant::now();
        if first.is_none() && progress > before {
            first = Some(now);
        }
        if row.get::<_, bool>(1) {
            let total = now.duration_since(started).as_secs_f64();
            let applying = now.duration_since(first.unwrap_or(started)).as_secs_f64();
            return (total, applying.max(0.001));
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the backlog was never applied"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_worker_gone(b: &Bench, subscription: &str) {
    let target = b.tgt().await;
    let started = Instant::now();
    loop {
        let running: i64 = target
            .query_one(
                "SELECT count(*) FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL",
                &[&subscription],
            )
            .await
            .expect("pg_stat_subscription")
            .get(0);
        if running == 0 {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the apply worker never stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `lag`: `pgbench -R rate` on the source for `seconds` with the sync
/// running; lag sampled by LSN, identically for both contestants.
pub async fn lag(b: &Bench, report: &mut Report, rate: u32, seconds: u32, round: usize) {
    let seeded = 100_000.min(b.rows);
    println!("lag round {round}: pgbench -R {rate} for {seconds} s");
    let order: [&str; 2] = if round.is_multiple_of(2) {
        ["cutover", "native"]
    } else {
        ["native", "cutover"]
    };
    let script = b.fresh_dir("lag").join("update.sql");
    std::fs::write(&script, dataset::pgbench_script(seeded)).expect("write the pgbench script");
    for contestant in order {
        reset_stream(b, seeded).await;
        let mut daemon = None;
        let origin = if contestant == "cutover" {
            let config = b.cutover_config("lag-cutover", "bench_lag", STREAM_TABLES);
            daemon = Some(b.start_cutover(&config).await);
            "cutover_bench_lag".to_owned()
        } else {
            b.create_subscription("native_lag", STREAM_TABLES, true)
                .await;
            b.subscription_origin("native_lag").await
        };
        // Settled: the stream has applied something and is idle.
        b.on_source("INSERT INTO bench_marker VALUES (1, now())")
            .await;
        b.wait_target(MARKER).await;
        let rss = daemon.as_ref().and_then(|d| d.pid()).map(PeakRss::watch);
        let (lags, unmatched) = run_lag(b, &origin, &script, rate, seconds).await;
        let rss = rss.map(PeakRss::finish);
        if let Some(mut d) = daemon {
            assert_eq!(d.terminate(PATIENCE), Some(0), "{}", d.log());
            b.drop_cutover("bench_lag").await;
        } else {
            b.drop_subscription("native_lag").await;
        }
        let verified = b.equal("bench_stream").await;
        let note = if unmatched > 0 {
            format!(
                "{} samples, {unmatched} not applied within the window",
                lags.len()
            )
        } else {
            format!("{} samples", lags.len())
        };
        for (metric, q) in [("p50 lag", 0.5), ("p99 lag", 0.99), ("max lag", 1.0)] {
            report.record(
                "lag",
                contestant,
                metric,
                quantile(&lags, q),
                "ms",
                Better::Lower,
                verified,
                &note,
            );
        }
        if let Some(rss) = rss {
            report.record(
                "memory",
                contestant,
                "peak RSS lag",
                rss,
                "MB",
                Better::Lower,
                verified,
                "",
            );
        }
    }
}

/// Samples the source's WAL position every 100 ms and the target's
/// origin progress every 5 ms while pgbench runs; the lag of a source
/// sample is the time until the target applied past it.
async fn run_lag(
    b: &Bench,
    origin: &str,
    script: &std::path::Path,
    rate: u32,
    seconds: u32,
) -> (Vec<f64>, usize) {
    let source = b.src().await;
    let target = b.tgt().await;
    let mut pgbench =
        super::context::pgbench(b.source.port(), script, u64::from(rate), u64::from(seconds));
    pgbench.stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let child = pgbench.spawn().expect("start pgbench");
    let bench = tokio::task::spawn_blocking(move || child.wait_with_output());
    let origin = origin.to_owned();
    let observer = tokio::spawn(async move {
        let mut seen: Vec<(Instant, u64)> = Vec::new();
        let stop_at = started + Duration::from_secs(u64::from(seconds) + 30);
        while Instant::now() < stop_at {
            let text: Option<String> = target
                .query_one(
                    "SELECT pg_replication_origin_progress($1, false)::text",
                    &[&origin],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(None);
            seen.push((Instant::now(), text.as_deref().map(parse_lsn).unwrap_or(0)));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    });
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    while started.elapsed() < Duration::from_secs(u64::from(seconds)) {
        samples.push((Instant::now(), Bench::source_lsn(&source).await));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = bench.await.expect("join").expect("pgbench");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = observer.await.expect("join the observer");
    let mut lags = Vec::new();
    let mut unmatched = 0;
    for (at, lsn) in samples {
        match seen
            .iter()
            .find(|(when, applied)| *when >= at && *applied >= lsn)
        {
            Some((when, _)) => lags.push(when.duration_since(at).as_secs_f64() * 1000.0),
            None => unmatched += 1,
        }
    }
    (lags, unmatched)
}

/// `memory`: cutover's peak RSS while it applies one transaction of `mb`
/// MiB (streamed by the source in chunks of `logical_decoding_work_mem`).
pub async fn memory(b: &Bench, report: &mut Report, mb: i64) {
    println!("memory: one transaction of {mb} MiB");
    b.on_target("TRUNCATE bench_bulk, bench_marker").await;
    b.on_source("TRUNCATE bench_bulk, bench_marker").await;
    let config = b.cutover_config(
        "memory-cutover",
        "bench_memory",
        &["bench_bulk", "bench_marker"],
    );
    let mut daemon = b.start_cutover(&config).await;
    let rss = PeakRss::watch(daemon.pid().expect("running"));
    let (rows, insert) = dataset::bulk_insert(mb);
    let started = Instant::now();
    b.on_source(&insert).await;
    b.on_source("INSERT INTO bench_marker VALUES (1, now())")
        .await;
    let written = started.elapsed().as_secs_f64();
    b.wait_target(MARKER).await;
    let seconds = started.elapsed().as_secs_f64();
    let peak = rss.finish();
    assert_eq!(daemon.terminate(PATIENCE), Some(0), "{}", daemon.log());
    b.drop_cutover("bench_memory").await;
    let count: i64 = b
        .tgt()
        .await
        .query_one("SELECT count(*) FROM bench_bulk", &[])
        .await
        .expect("count")
        .get(0);
    let verified = count == rows;
    report.record(
        "memory",
        "cutover",
        &format!("peak RSS {mb} MiB txn"),
        peak,
        "MB",
        Better::Lower,
        verified,
        &format!("{rows} rows; source commit after {written:.0} s, applied after {seconds:.0} s"),
    );
}
