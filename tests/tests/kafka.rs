//! The Kafka feed against librdkafka's mock cluster (in the test's
//! process; no broker is installable here): every change reaches Kafka
//! once, in key order, as a `read_committed` consumer reads it, across a
//! SIGKILL of the daemon, brokers going down, a produce refused and a
//! switch and a rollback; a definite failure stops the daemon with the fix.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cutover_tests::kafka::{Event, Kafka, by_key};
use cutover_tests::{ClusterOptions, Daemon, Pair, Writer, wait_for};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, n int NOT NULL);
CREATE TABLE audit (v bigint);";

const KEYS: u64 = 20;

/// One application transaction: a key's counter goes up by one, and a row
/// is appended to a table without a key.
fn write(i: u64) -> String {
    format!(
        "BEGIN; UPDATE accounts SET n = n + 1 WHERE id = {}; INSERT INTO audit VALUES ({i}); COMMIT;",
        i % KEYS + 1
    )
}

/// The pair with the schema and the keys seeded (copied, not fed), and a
/// config feeding `kafka` under the prefix `shop`.
async fn setup(dir: &Path, kafka: &Kafka) -> (Pair, std::path::PathBuf) {
    kafka.topics("shop", &["accounts", "audit"]);
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(SCHEMA).await;
    pair.on_source(&format!(
        "INSERT INTO accounts SELECT g, 0 FROM generate_series(1, {KEYS}) g;"
    ))
    .await;
    let config = pair.config(
        dir,
        &format!("allow_no_password = true\n{}", kafka.config("shop")),
    );
    (pair, config)
}

/// Each key's counter on `cluster`.
async fn counters(cluster: &cutover_tests::Cluster) -> BTreeMap<String, i64> {
    cluster
        .client("app")
        .await
        .query("SELECT id, n FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                serde_json::json!({"id": r.get::<_, i32>(0)}).to_string(),
                i64::from(r.get::<_, i32>(1)),
            )
        })
        .collect()
}

/// The counters of each key's `u` events, in the order a consumer reads
/// them.
fn fed_counters(events: &[Event]) -> BTreeMap<String, Vec<i64>> {
    by_key(events, "shop.public.accounts")
        .into_iter()
        .map(|(key, values)| {
            let ns = values
                .iter()
                .map(|v| {
                    assert_eq!(v["op"], "u", "{v}");
                    v["after"]["n"].as_i64().unwrap()
                })
                .collect();
            (key, ns)
        })
        .collect()
}

/// Waits until Kafka holds every change the source's counters say there
/// were, then checks that each key's changes came once each, in order.
async fn feed_holds(kafka: &Kafka, expected: &BTreeMap<String, i64>) -> Vec<Event> {
    let events = wait_for("Kafka to hold every change", WAIT, || async {
        let events = kafka.read("shop");
        let fed = fed_counters(&events);
        let complete = expected
            .iter()
            .all(|(key, n)| fed.get(key).map_or(0, Vec::len) as i64 >= *n);
        complete.then_some(events)
    })
    .await;
    let fed = fed_counters(&events);
    for (key, n) in expected {
        let got = fed.get(key).cloned().unwrap_or_default();
        // Once each, in order: the k-th change set the counter to k.
        if let Some(at) =
            (0..got.len().max(*n as usize)).find(|&i| got.get(i) != Some(&(i as i64 + 1)))
        {
            panic!(
                "key {key}: {} changes fed for {n} made; the change at {at} is {:?} (around it: {:?})",
                got.len(),
                got.get(at),
                &got[at.saturating_sub(3)..(at + 3).min(got.len())]
            );
        }
    }
    events
}

#[tokio::test]
async fn every_change_reaches_kafka_once_in_key_order_across_a_kill_and_broker_faults() {
    let kafka = Kafka::start(3);
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = setup(dir.path(), &kafka).await;
    let mut daemon = Daemon::start_streaming(&config).await;
    let writer = Writer::start(&pair, 0, write).await;
    writer.advance(150, WAIT).await;

    // A crash: whatever Kafka transaction was open is aborted when the
    // next session takes the feed's transactional id.
    daemon.kill();
    writer.advance(100, WAIT).await;
    daemon.restart();
    writer.advance(100, WAIT).await;

    // Produce requests refused for a while, then a commit sent to a
    // broker that is not the coordinator: librdkafka's retries, under
    // the idempotent producer, add nothing twice.
    kafka.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 3],
    );
    writer.advance(100, WAIT).await;
    kafka.cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 2],
    );
    writer.advance(100, WAIT).await;
    // Every broker down for a while, then back.
    for broker in 1..=3 {
        kafka.cluster.broker_down(broker).unwrap();
    }
    writer.advance(50, WAIT).await;
    for broker in 1..=3 {
        kafka.cluster.broker_up(broker).unwrap();
    }
    writer.advance(100, WAIT).await;
    let written = writer.stop().await;
    pair.on_source("TRUNCATE audit;").await;
    pair.wait_equal(&["accounts", "audit"], WAIT).await;
    assert!(daemon.running(), "the daemon stopped:\n{}", daemon.log());

    let expected = counters(&pair.source).await;
    assert_eq!(expected.values().sum::<i64>() as u64, written);
    let events = feed_holds(&kafka, &expected).await;
    let log = daemon.log();
    assert!(log.contains("Kafka"), "{log}");

    // The table without a key: partition 0, every row once, in commit
    // order; its truncate reaches every partition.
    let audit: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == "shop.public.audit")
        .collect();
    let rows: Vec<i64> = audit
        .iter()
        .filter(|e| e.value["op"] == "c")
        .map(|e| {
            assert_eq!(e.partition, 0, "{:?}", e.value);
            e.value["after"]["v"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(rows, (1..=written as i64).collect::<Vec<_>>());
    let mut truncated: Vec<i32> = audit
        .iter()
        .filter(|e| e.value["op"] == "t")
        .map(|e| e.partition)
        .collect();
    truncated.sort_unstable();
    assert_eq!(truncated, vec![0, 1, 2], "a truncate on each partition");

    // The envelope says where each change came from.
    let one = events
        .iter()
        .find(|e| e.topic == "shop.public.accounts")
        .unwrap();
    assert_eq!(one.value["source"]["name"], "source", "{}", one.value);
    assert_eq!(one.value["source"]["direction"], "forward");
    assert_eq!(one.value["source"]["db"], "app");
    assert_eq!(one.value["after"]["id"], one.key["id"]);
    // Without REPLICA IDENTITY FULL an update carries no old row.
    assert_eq!(one.value["before"], Value::Null);
    // The progress records are the feed's own.
    assert!(
        kafka
            .read("shop.cutover")
            .iter()
            .any(|e| e.topic == "shop.cutover.progress"),
        "the progress topic"
    );

    // The metrics say what was produced.
    let addr = cutover_tests::http::listen_addr(&dir.path().join("state")).await;
    let (_, metrics) = cutover_tests::http::get(&addr, "/metrics");
    let messages = cutover_tests::http::metric(
        &metrics,
        "cutover_kafka_messages_total{topic=\"shop.public.accounts\"}",
    )
    .unwrap_or(0.0);
    assert!(messages >= 1.0, "{metrics}");
    assert!(
        metrics.contains("cutover_kafka_commit_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("cutover_kafka_lag_bytes"), "{metrics}");
    cutover_tests::http::promtool_check(&metrics);
    // `status` says how far Kafka holds the stream.
    status_says_kafka_holds(&config).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// `cutover status` says how far Kafka holds the stream.
async fn status_says_kafka_holds(config: &Path) {
    let status = cutover_tests::cli::cutover_beside(config, &["status"], None).await;
    assert_eq!(status.code, 0, "{}", status.all_output());
    assert!(
        status.stdout.contains("Kafka holds   up to"),
        "{}",
        status.stdout
    );
}

/// The finding `code` of `cutover check --format json` with `config`.
fn check_finding(config: &Path, code: &str) -> (i32, Value) {
    let outcome = cutover_tests::run_cutover(
        &[
            "--config",
            config.to_str().unwrap(),
            "check",
            "--format",
            "json",
        ],
        &[],
    );
    let report: Value = serde_json::from_str(&outcome.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", outcome.all_output()));
    let found = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == code)
        .cloned()
        .unwrap_or_else(|| panic!("no {code} finding: {report:#}"));
    (outcome.code, found)
}

#[tokio::test]
async fn a_broker_that_refuses_the_feed_stops_the_daemon_with_the_fix() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = setup(dir.path(), &kafka).await;
    // `check` asks the brokers first.
    let (_, reachable) = check_finding(&config, "kafka_reachable");
    assert_eq!(reachable["severity"], "info", "{reachable}");
    assert!(
        reachable["problem"]
            .as_str()
            .unwrap()
            .contains("1 broker(s) answer"),
        "{reachable}"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let nowhere = dir.path().join("nowhere.toml");
    // A port nothing listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &nowhere,
        text.replace(&kafka.bootstrap(), &free.to_string()),
    )
    .unwrap();
    let (code, unreachable) = check_finding(&nowhere, "kafka_unreachable");
    assert_eq!(code, 1, "{unreachable}");
    assert_eq!(unreachable["severity"], "blocking", "{unreachable}");
    assert!(
        unreachable["fix"]
            .as_str()
            .unwrap()
            .contains("kafka.brokers"),
        "{unreachable}"
    );
    // Every InitProducerId refused: the principal may not use the
    // transactional id.
    kafka.cluster.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED; 20],
    );
    let mut daemon = Daemon::start(&config, &["run"]);
    let code = daemon.wait(WAIT);
    let log = daemon.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("WRITE and DESCRIBE on the transactional ids"),
        "{log}"
    );

    // A produce refused for the topic's ACL: librdkafka's next call says
    // only that the transaction failed; the delivery's own error names
    // the fix, and the daemon stops on it instead of retrying forever.
    kafka
        .cluster
        .clear_request_errors(RDKafkaApiKey::InitProducerId);
    let mut daemon = Daemon::start_streaming(&config).await;
    kafka.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
    );
    pair.on_source(&write(1)).await;
    let code = daemon.wait(WAIT);
    let log = daemon.log_of_this_start();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("WRITE and DESCRIBE on the feed's topics"),
        "{log}"
    );
}

/// The value of `event`'s `source.direction`.
fn direction(event: &Event) -> &str {
    event.value["source"]["direction"].as_str().unwrap_or("")
}

#[tokio::test]
async fn the_feed_goes_on_across_a_switch_and_a_rollback_without_a_gap_or_a_duplicate() {
    let kafka = Kafka::start(1);
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = setup(dir.path(), &kafka).await;
    let bump = |round: u64| {
        (1..=KEYS)
            .map(|k| format!("UPDATE accounts SET n = n + 1 WHERE id = {k};"))
            .collect::<Vec<_>>()
            .join(" ")
            + &format!(" INSERT INTO audit VALUES ({round});")
    };
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source(&bump(1)).await;
    pair.on_source(&bump(2)).await;
    pair.wait_equal(&["accounts"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    let switched = cutover_tests::cli::cutover_beside(&config, &["switch", "--verify"], None).await;
    assert_eq!(switched.code, 0, "{}", switched.all_output());
    // The application now writes on the target; the reverse stream feeds.
    let mut daemon = Daemon::start_streaming(&config).await;
    for round in 3..=5 {
        pair.target.execute("app", &bump(round)).await;
    }
    wait_for("the source to hold the target's writes", WAIT, || async {
        let source = counters(&pair.source).await;
        (source.values().all(|n| *n == 5)).then_some(())
    })
    .await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    let rolled = cutover_tests::cli::cutover_beside(&config, &["rollback"], None).await;
    assert_eq!(rolled.code, 0, "{}", rolled.all_output());
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source(&bump(6)).await;
    pair.wait_equal(&["accounts"], WAIT).await;
    let expected = counters(&pair.source).await;
    assert!(expected.values().all(|n| *n == 6), "{expected:?}");
    let events = feed_holds(&kafka, &expected).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    // Each key: two changes from the source, three from the target, one
    // from the source again, each marked with where it came from.
    let accounts = by_key(&events, "shop.public.accounts");
    for (key, values) in &accounts {
        let from: Vec<(&str, &str)> = values
            .iter()
            .map(|v| {
                (
                    v["source"]["direction"].as_str().unwrap_or(""),
                    v["source"]["name"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            from,
            [
                ("forward", "source"),
                ("forward", "source"),
                ("reverse", "target"),
                ("reverse", "target"),
                ("reverse", "target"),
                ("forward", "source"),
            ],
            "key {key}"
        );
    }
    let audit: Vec<(i64, &str)> = events
        .iter()
        .filter(|e| e.topic == "shop.public.audit" && e.value["op"] == "c")
        .map(|e| (e.value["after"]["v"].as_i64().unwrap(), direction(e)))
        .collect();
    assert_eq!(
        audit,
        [
            (1, "forward"),
            (2, "forward"),
            (3, "reverse"),
            (4, "reverse"),
            (5, "reverse"),
            (6, "forward")
        ]
    );
}

#[tokio::test]
async fn the_copy_s_rows_come_first_as_r_events_when_the_snapshot_is_asked_for() {
    let kafka = Kafka::start(1);
    kafka.topics("shop", &["accounts", "audit", "regions"]);
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::start(ClusterOptions::default()).await;
    let partitioned = "
        CREATE TABLE regions (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
        CREATE TABLE regions_eu PARTITION OF regions FOR VALUES IN ('eu');
        CREATE TABLE regions_us PARTITION OF regions FOR VALUES IN ('us');";
    pair.both(&format!("{SCHEMA}{partitioned}")).await;
    pair.on_source(&format!(
        "INSERT INTO accounts SELECT g, 0 FROM generate_series(1, {KEYS}) g;
         INSERT INTO audit SELECT -g FROM generate_series(1, 5) g;
         INSERT INTO regions VALUES (1, 'eu'), (2, 'us'), (3, 'eu');"
    ))
    .await;
    let config = pair.config(
        dir.path(),
        &format!(
            "allow_no_password = true\n{}snapshot = true\n",
            kafka.config("shop")
        ),
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    for i in 1..=3 {
        pair.on_source(&write(i)).await;
    }
    pair.wait_equal(&["accounts", "audit"], WAIT).await;
    let events = wait_for("the snapshot and the changes in Kafka", WAIT, || async {
        let events = kafka.read("shop");
        let changes = events.iter().filter(|e| e.value["op"] == "u").count();
        (changes == 3).then_some(events)
    })
    .await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    // Every key: its copied row first (op r, n 0), then its changes.
    let accounts = by_key(&events, "shop.public.accounts");
    assert_eq!(accounts.len(), KEYS as usize);
    for (key, values) in &accounts {
        assert_eq!(values[0]["op"], "r", "key {key}: {}", values[0]);
        assert_eq!(values[0]["after"]["n"], 0);
        assert_eq!(values[0]["source"]["snapshot"], true);
        let reads = values.iter().filter(|v| v["op"] == "r").count();
        assert_eq!(reads, 1, "key {key}: one row from the copy");
        for (i, v) in values.iter().skip(1).enumerate() {
            assert_eq!(v["op"], "u", "key {key}");
            assert_eq!(v["after"]["n"], i as i64 + 1, "key {key}");
        }
    }
    // The table without a key: its copied rows, then the new ones.
    let audit: Vec<(String, i64)> = events
        .iter()
        .filter(|e| e.topic == "shop.public.audit")
        .map(|e| {
            (
                e.value["op"].as_str().unwrap().to_owned(),
                e.value["after"]["v"].as_i64().unwrap(),
            )
        })
        .collect();
    let copied: Vec<i64> = audit
        .iter()
        .filter(|(op, _)| op == "r")
        .map(|(_, v)| *v)
        .collect();
    let mut sorted = copied.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [-5, -4, -3, -2, -1]);
    assert_eq!(
        audit.iter().skip(5).map(|(_, v)| *v).collect::<Vec<_>>(),
        [1, 2, 3],
        "{audit:?}"
    );
    // A partitioned table's rows come under its root's name.
    let regions = by_key(&events, "shop.public.regions");
    assert_eq!(regions.len(), 3, "{regions:?}");
    assert!(regions.values().all(|v| v.len() == 1 && v[0]["op"] == "r"));

    // A snapshot asked for once the feed carries changes without one is
    // refused with the fix.
    let late = Kafka::start(1);
    late.topics("late", &["accounts", "audit", "regions"]);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("shop", "late")
            .replace(&kafka.bootstrap(), &late.bootstrap())
            .replace("snapshot = true\n", ""),
    )
    .unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source(&write(4)).await;
    wait_for("the change in the new feed", WAIT, || async {
        (!late.read("late").iter().all(|e| e.value["op"] != "u")).then_some(())
    })
    .await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}snapshot = true\n")).unwrap();
    let mut daemon = Daemon::start(&config, &["run"]);
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    assert!(
        daemon
            .log()
            .contains("a snapshot now would come after them"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn a_snapshot_stopped_in_the_middle_goes_on_where_it_stopped_and_a_late_one_is_refused() {
    let kafka = Kafka::start(1);
    for prefix in ["snap", "later"] {
        kafka.topic(&format!("{prefix}.cutover.progress"), 1);
        kafka.topic(&format!("{prefix}.public.wide"), 3);
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE wide (id int PRIMARY KEY, pad text NOT NULL);")
        .await;
    // About 600 heap blocks: three of the snapshot's ranges.
    const ROWS: i64 = 20_000;
    pair.on_source(&format!(
        "INSERT INTO wide SELECT g, repeat('x', 200) FROM generate_series(1, {ROWS}) g;"
    ))
    .await;
    let config = pair.config(
        dir.path(),
        &format!(
            "allow_no_password = true\n{}snapshot = true\n",
            kafka.config("snap")
        ),
    );
    // Killed once the snapshot's first range is in Kafka.
    let mut daemon = Daemon::start_with_env(
        &config,
        &["run"],
        &[("CUTOVER_FAILPOINT", "kafka:snapshot:range")],
    );
    assert_ne!(daemon.wait(WAIT), Some(0), "{}", daemon.log());
    assert!(
        daemon.log().contains("failpoint kafka:snapshot:range"),
        "{}",
        daemon.log()
    );
    let before = kafka
        .read("snap")
        .iter()
        .filter(|e| e.value["op"] == "r")
        .count() as i64;
    assert!(
        before > 0 && before < ROWS,
        "{before} rows published before the kill"
    );

    // Started again, it publishes the rest, each row once.
    let mut daemon = Daemon::start_streaming(&config).await;
    let ids = wait_for("every row of the snapshot in Kafka", WAIT, || async {
        let ids: Vec<i64> = kafka
            .read("snap")
            .iter()
            .filter(|e| e.topic == "snap.public.wide" && e.value["op"] == "r")
            .map(|e| e.value["after"]["id"].as_i64().unwrap())
            .collect();
        (ids.len() as i64 >= ROWS).then_some(ids)
    })
    .await;
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a row published twice");
    assert_eq!(sorted, (1..=ROWS).collect::<Vec<_>>());

    // Once the target has applied changes, a feed asked for a snapshot
    // (here a new one, under another prefix) is refused with the fix.
    pair.on_source("UPDATE wide SET pad = 'y' WHERE id = 1;")
        .await;
    pair.wait_equal(&["wide"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"snap\"", "\"later\"")).unwrap();
    let mut daemon = Daemon::start(&config, &["run"]);
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    assert!(
        daemon
            .log_of_this_start()
            .contains("kafka.snapshot must be set before the first"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn a_group_moved_and_moved_back_keeps_each_key_s_changes_once_and_in_order() {
    use cutover_tests::groups;
    let kafka = Kafka::start(1);
    kafka.topic("shop.cutover.progress", 1);
    for table in ["accounts", "ledger", "codes"] {
        kafka.topic(&format!("shop.public.{table}"), 3);
    }
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = groups::seeded(dir.path(), &kafka.config("shop")).await;
    let (mut daemon, source, target) = groups::streaming(&pair, &config).await;
    // Balances move on the source, the money group's primary; the default
    // group's codes too.
    for n in 0..100 {
        source.batch_execute(&groups::load(n)).await.unwrap();
        source.batch_execute(&groups::codes_load(n)).await.unwrap();
    }
    // The money group moves to the target; its writes go there, the
    // default group's stay on the source.
    let moved = groups::cutover(&config, &["switch", "--group", "money", "--verify"]).await;
    assert_eq!(moved.code, 0, "{}\n{}", moved.all_output(), daemon.log());
    groups::watching(&daemon).await;
    for n in 100..200 {
        target.batch_execute(&groups::load(n)).await.unwrap();
        source.batch_execute(&groups::codes_load(n)).await.unwrap();
    }
    // And back.
    let back = groups::cutover(&config, &["rollback", "--group", "money"]).await;
    assert_eq!(back.code, 0, "{}\n{}", back.all_output(), daemon.log());
    groups::watching(&daemon).await;
    for n in 200..300 {
        source.batch_execute(&groups::load(n)).await.unwrap();
    }
    pair.wait_equal(&["accounts", "codes"], WAIT).await;

    // Each account moved 6 times: twice from each phase, in order, each
    // once, marked with the server it was made on.
    let events = wait_for("every balance change in Kafka", WAIT, || async {
        let events = kafka.read("shop");
        let updates = by_key(&events, "shop.public.accounts")
            .values()
            .map(Vec::len)
            .sum::<usize>();
        (updates >= 300).then_some(events)
    })
    .await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    let accounts = by_key(&events, "shop.public.accounts");
    assert_eq!(accounts.len(), 50);
    for (key, values) in &accounts {
        let seen: Vec<(i64, &str)> = values
            .iter()
            .map(|v| {
                (
                    v["after"]["balance"].as_i64().unwrap(),
                    v["source"]["name"].as_str().unwrap_or(""),
                )
            })
            .collect();
        let want: Vec<(i64, &str)> = (101..=106)
            .zip(["source", "source", "target", "target", "source", "source"])
            .collect();
        assert_eq!(seen, want, "key {key}");
    }
    // The default group's changes all come from the source.
    let codes = by_key(&events, "shop.public.codes");
    assert!(
        codes
            .values()
            .flatten()
            .all(|v| v["source"]["name"] == "source" && v["source"]["direction"] == "forward"),
        "{codes:?}"
    );
    assert_eq!(codes.values().map(Vec::len).sum::<usize>(), 200);
}

#[tokio::test]
async fn a_feed_without_a_target_publishes_every_change_once_across_a_kill() {
    let kafka = Kafka::start(1);
    kafka.topics("shop", &["accounts", "audit"]);
    let dir = tempfile::tempdir().unwrap();
    let source = cutover_tests::Cluster::start();
    source.create_database("app").await;
    source.execute("app", SCHEMA).await;
    source
        .execute(
            "app",
            &format!("INSERT INTO accounts SELECT g, 0 FROM generate_series(1, {KEYS}) g;"),
        )
        .await;
    // [kafka] and no [target]: the feed alone.
    let config = cutover_tests::write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\nallow_no_password = true\n{}",
            source.url("app", "postgres", None),
            dir.path().join("state").display(),
            kafka.config("shop")
        ),
    );
    let (_, alone) = check_finding(&config, "feed_alone");
    assert_eq!(alone["severity"], "info", "{alone}");
    // What needs a target says so, and changes nothing.
    let refused =
        cutover_tests::run_cutover(&["--config", config.to_str().unwrap(), "verify"], &[]);
    assert_eq!(refused.code, 2, "{}", refused.all_output());
    assert!(refused.stderr.contains("no [target]"), "{}", refused.stderr);

    let mut daemon = Daemon::start_streaming(&config).await;
    let client = source.client("app").await;
    for i in 1..=200 {
        client.batch_execute(&write(i)).await.unwrap();
        if i == 100 {
            daemon.kill();
            daemon.restart();
        }
    }
    let expected = counters(&source).await;
    let events = feed_holds(&kafka, &expected).await;
    let rows: Vec<i64> = events
        .iter()
        .filter(|e| e.topic == "shop.public.audit")
        .map(|e| e.value["after"]["v"].as_i64().unwrap())
        .collect();
    assert_eq!(rows, (1..=200).collect::<Vec<_>>());
    assert!(daemon.running(), "{}", daemon.log());
    status_says_kafka_holds(&config).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}
