//! What an operator watches: `/metrics`, `/health`, `/ready` and the lag
//! history, while `cutover run` streams.

use std::time::Duration;

use cutover_tests::http::{get, metric};
use cutover_tests::{ClusterOptions, Daemon, Pair, wait_for};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn metrics_health_and_lag_describe_a_streaming_daemon_without_secrets() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 250) g",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    // A password the trust-authenticated servers ignore; it must show up
    // nowhere.
    let secret = cutover_tests::http::SECRET;
    let (mut daemon, addr) = cutover_tests::http::streaming_daemon(&config, dir.path()).await;
    let state = dir.path().join("state");
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'new' FROM generate_series(1001, 1040) g;
             UPDATE items SET v = 'changed' WHERE id <= 10;
             DELETE FROM items WHERE id > 1030;",
        )
        .await;
    pair.wait_equal(&["items"], WAIT).await;

    let body = wait_for("the applied changes in /metrics", WAIT, || async {
        let (code, body) = get(&addr, "/metrics");
        assert_eq!(code, 200);
        let deletes = metric(
            &body,
            "cutover_applied_changes_total{direction=\"forward\",op=\"delete\",table=\"public.items\"}",
        );
        let sampled = metric(&body, "cutover_lag_bytes{direction=\"forward\"}").is_some()
            && metric(&body, "cutover_slot_retained_bytes{slot=\"cutover\"}").is_some();
        (deletes == Some(10.0) && sampled).then_some(body)
    })
    .await;
    for (series, value) in [
        (
            "cutover_applied_changes_total{direction=\"forward\",op=\"insert\",table=\"public.items\"}",
            40.0,
        ),
        (
            "cutover_applied_changes_total{direction=\"forward\",op=\"update\",table=\"public.items\"}",
            10.0,
        ),
        ("cutover_copy_rows_total{table=\"public.items\"}", 250.0),
        ("cutover_state{state=\"streaming\"}", 1.0),
        ("cutover_state{state=\"copying\"}", 0.0),
        (
            "cutover_slot_wal_status{slot=\"cutover\",wal_status=\"reserved\"}",
            1.0,
        ),
        (
            "cutover_slot_wal_status{slot=\"cutover\",wal_status=\"lost\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric(&body, series), Some(value), "{series} in\n{body}");
    }
    assert!(
        metric(
            &body,
            "cutover_applied_transactions_total{direction=\"forward\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(body.contains("# TYPE cutover_lag_seconds gauge"), "{body}");
    cutover_tests::http::promtool_check(&body);

    let (code, health) = get(&addr, "/health");
    assert_eq!(code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["state"], "streaming");
    assert_eq!(health["direction"], "forward");
    assert_eq!(health["primary"], "source");
    assert_eq!(health["healthy"], true);
    assert!(health["lag"]["bytes"].is_u64(), "{health}");
    assert!(health["applied_lsn"].is_string(), "{health}");

    // The target goes away: /health turns 503 and says why; it recovers.
    let mut pair = pair;
    pair.target.stop();
    pair.source
        .execute(
            "app",
            "INSERT INTO items VALUES (5000, 'while the target is down')",
        )
        .await;
    let down = wait_for("/health to report the outage", WAIT, || async {
        let (code, body) = get(&addr, "/health");
        (code == 503).then_some(body)
    })
    .await;
    let down: serde_json::Value = serde_json::from_str(&down).unwrap();
    assert_eq!(down["healthy"], false);
    assert!(down["last_error"]["message"].is_string(), "{down}");
    assert!(
        down["problems"][0]
            .as_str()
            .unwrap()
            .contains("not streaming"),
        "{down}"
    );
    pair.target.start_again();
    pair.wait_equal(&["items"], WAIT).await;
    wait_for("/health to recover", WAIT, || async {
        (get(&addr, "/health").0 == 200).then_some(())
    })
    .await;
    // The source goes away: the same, and the stream resumes.
    pair.source.stop();
    wait_for("/health to report the source outage", WAIT, || async {
        let (code, body) = get(&addr, "/health");
        (code == 503 && body.contains("not streaming")).then_some(())
    })
    .await;
    pair.source.start_again();
    pair.source
        .execute(
            "app",
            "INSERT INTO items VALUES (5001, 'after the source came back')",
        )
        .await;
    pair.wait_equal(&["items"], WAIT).await;
    wait_for(
        "/health to recover from the source outage",
        WAIT,
        || async { (get(&addr, "/health").0 == 200).then_some(()) },
    )
    .await;
    let (_, metrics) = get(&addr, "/metrics");
    assert!(
        metric(&metrics, "cutover_errors_total{kind=\"target_transient\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "cutover_errors_total{kind=\"source_transient\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    cutover_tests::http::promtool_check(&metrics);

    // No secret in anything the daemon exposed or logged.
    for text in [&metrics, &get(&addr, "/health").1, &daemon.log()] {
        assert!(!text.contains(secret), "the password leaked:\n{text}");
    }
    assert_eq!(daemon.terminate(WAIT), Some(0));
    assert!(
        !state.join("listen.json").exists(),
        "listen.json must go with the daemon"
    );
}

/// During the copy the slot already holds back WAL: lag in bytes and the
/// retained WAL are sampled and exported from the start, not only once
/// streaming begins. The copy is held by a lock on the target table that
/// lets it read (the emptiness check) but not write.
#[tokio::test]
async fn lag_and_retained_wal_are_sampled_while_the_copy_runs() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 100) g",
        )
        .await;
    let mut lock = pair.target.client("app").await;
    let held = lock.transaction().await.unwrap();
    held.batch_execute("LOCK TABLE items IN SHARE MODE")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_with_env(
        &config,
        &["run"],
        &[("CUTOVER__STATE__LAG_SAMPLE_SECONDS", "1")],
    );
    let addr = cutover_tests::http::listen_addr(&dir.path().join("state")).await;
    // WAL written on the source after the slot's snapshot.
    wait_for("the slot", WAIT, || async {
        let slots: i64 = pair
            .source
            .query_value(
                "app",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cutover'",
            )
            .await;
        (slots == 1).then_some(())
    })
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, repeat('w', 200) FROM generate_series(1001, 3000) g",
        )
        .await;
    let body = wait_for("lag samples during the copy", WAIT, || async {
        let (_, body) = get(&addr, "/metrics");
        let lag = metric(&body, "cutover_lag_bytes{direction=\"forward\"}")?;
        let retained = metric(&body, "cutover_slot_retained_bytes{slot=\"cutover\"}")?;
        (lag > 100_000.0 && retained > 100_000.0).then_some(body)
    })
    .await;
    assert_eq!(
        metric(&body, "cutover_state{state=\"copying\"}"),
        Some(1.0),
        "{body}"
    );
    held.rollback().await.unwrap();
    pair.wait_equal(&["items"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

#[tokio::test]
async fn a_busy_listen_address_is_a_clear_error() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE t (id int PRIMARY KEY);").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let out = cutover_tests::run_cutover(
        &["--config", config.to_str().unwrap(), "run"],
        &[(
            "CUTOVER__HTTP__LISTEN",
            &taken.local_addr().unwrap().to_string(),
        )],
    );
    assert_eq!(out.code, 1, "{}", out.all_output());
    assert!(
        out.stderr.contains("http.listen") && out.stderr.contains("cannot listen"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn a_second_daemon_on_the_same_state_is_refused_naming_the_first() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE t (id int PRIMARY KEY);").await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut first = Daemon::start(&config, &["run"]);
    let state = dir.path().join("state");
    let addr = cutover_tests::http::listen_addr(&state).await;
    wait_for("the first daemon to stream", WAIT, || async {
        (get(&addr, "/ready").0 == 200).then_some(())
    })
    .await;
    let pid: String = std::fs::read_to_string(state.join("cutover.pid")).unwrap();
    let second = cutover_tests::run_cutover(
        &["--config", config.to_str().unwrap(), "run"],
        &[("CUTOVER__HTTP__LISTEN", "127.0.0.1:0")],
    );
    assert_eq!(second.code, 1, "{}", second.all_output());
    assert!(
        second.stderr.contains("in use by another cutover process")
            && second.stderr.contains(&format!("pid {}", pid.trim())),
        "{}",
        second.stderr
    );
    assert!(first.running(), "the first daemon must be untouched");
    assert_eq!(first.terminate(WAIT), Some(0));
}

#[test]
fn the_alert_rules_load_and_fire_as_their_unit_tests_say() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        vec!["check", "rules", "cutover-alerts.yml"],
        vec!["test", "rules", "cutover-alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&deploy)
            .output()
            .expect("run promtool (make test installs it: apt-get install prometheus)");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
