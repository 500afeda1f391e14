//! Table groups in `run`: with `[[group]]`s configured, writes an
//! application makes on the server that is not a table's primary (stray
//! writes) are written back over with the primary's rows, recorded and
//! counted; a switch and a rollback beside the reverse stream lose
//! nothing and take none of the new primary's writes for stray ones; one
//! group moves (`switch --group`) and back while the other streams, with
//! both directions at once, and a group switch killed mid-way resumes;
//! both directions never loop. The policies other than `primary_wins`
//! are in `policies.rs`.

use std::time::Duration;

use cutover_tests::groups::*;
use cutover_tests::http::{get, listen_addr, metric};
use cutover_tests::{App, Daemon, Writer};

#[tokio::test]
async fn stray_writes_on_the_target_are_written_back_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = seeded(dir.path(), "").await;
    let mut daemon = Daemon::start_streaming(&config).await;
    let http = listen_addr(&dir.path().join("state")).await;
    watching(&daemon).await;
    let writer = Writer::start(&pair, 0, load).await;
    // An application writes on the target, which is not the primary: in
    // both groups, every kind of change, a key moved, a truncate; rows the
    // source's own writes leave alone (1 to 50).
    pair.target
        .execute(
            "app",
            "UPDATE accounts SET balance = -999 WHERE id = 105;
             DELETE FROM accounts WHERE id = 106;
             INSERT INTO accounts VALUES (999999, 'ghost', 0);
             UPDATE accounts SET id = 888888 WHERE id = 107;
             UPDATE codes SET label = 'tampered' WHERE code = 'c3';
             INSERT INTO ledger (n) VALUES (-1);
             TRUNCATE ledger;",
        )
        .await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = get(&http, "/metrics");
        let accounts = metric(
            &body,
            "cutover_conflicts_total{resolution=\"written_back\",table=\"public.accounts\"}",
        );
        if accounts.is_some_and(|n| n >= 4.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stray writes were not written back:\n{body}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writer.stop().await;
    pair.wait_equal(&["accounts", "codes", "ledger"], WAIT)
        .await;
    let (_, body) = get(&http, "/metrics");
    assert_eq!(
        metric(
            &body,
            "cutover_conflicts_total{resolution=\"written_back\",table=\"public.codes\"}"
        ),
        Some(1.0),
        "{body}"
    );
    let status = cutover(&config, &["status"]).await;
    let out = status.all_output();
    assert!(out.contains("stray writes: "), "{out}");
    for expected in [
        "public.accounts update (id=105)",
        "public.accounts delete (id=106)",
        "public.accounts insert (id=999999)",
        "public.accounts update (id=888888)",
        "public.codes update (code=c3)",
        "public.ledger truncate",
    ] {
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
    }
    // Nothing the source wrote was taken for a stray write.
    let (_, body) = get(&http, "/metrics");
    let recorded: f64 = body
        .lines()
        .filter(|l| l.starts_with("cutover_conflicts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(recorded, 7.0, "{body}\n{}", daemon.log());
    // The target's slot is watched like the source's.
    assert!(
        metric(
            &body,
            "cutover_slot_retained_bytes{slot=\"cutover_reverse\"}"
        )
        .is_some(),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "cutover_slot_wal_status{slot=\"cutover_reverse\",wal_status=\"reserved\"}"
        ),
        Some(1.0),
        "{body}"
    );
    // A schema change on the target is reported, as it cannot be written
    // back; one outside the migration (a temporary table) is no stray
    // write; the daemon goes on.
    pair.target
        .execute(
            "app",
            "CREATE TEMP TABLE scratch (x int); ALTER TABLE codes ADD COLUMN note text;",
        )
        .await;
    cutover_tests::wait_for("the schema change to be reported", WAIT, || async {
        let (_, body) = get(&http, "/metrics");
        metric(
            &body,
            "cutover_conflicts_total{resolution=\"reported\",table=\"public.codes\"}",
        )
        .filter(|n| *n == 1.0)
    })
    .await;
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    // The records outlive the daemon.
    let status = cutover(&config, &["status"]).await;
    assert!(
        status
            .stdout
            .contains("stray writes: 8 (6 written back over with the primary's rows)"),
        "{}",
        status.all_output()
    );
}

#[tokio::test]
async fn a_switch_and_a_rollback_beside_the_watcher_lose_nothing_and_write_back_only_strays() {
    let dir = tempfile::tempdir().unwrap();
    let pointer = dir.path().join("primary");
    let (pair, config) = seeded(
        dir.path(),
        &format!(
            "[switch]\nrepoint_command = \"echo $CUTOVER_NEW_PRIMARY_PORT > {}\"\n",
            dir.path().join("primary").display()
        ),
    )
    .await;
    std::fs::write(&pointer, pair.source.port().to_string()).unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    let http = listen_addr(&dir.path().join("state")).await;
    watching(&daemon).await;
    let app = App::start(pointer.clone(), "postgres", ledger);
    app.advance_on(pair.source.port(), 20, WAIT).await;
    // A stray write while the source is the primary.
    pair.target
        .execute("app", "UPDATE codes SET label = 'stray' WHERE code = 'c9';")
        .await;
    cutover_tests::wait_for("the stray write to be written back", WAIT, || async {
        let (_, body) = get(&http, "/metrics");
        metric(
            &body,
            "cutover_conflicts_total{resolution=\"written_back\",table=\"public.codes\"}",
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
    let switched = cutover(&config, &["switch", "--verify"]).await;
    assert_eq!(
        switched.code,
        0,
        "{}\n{}",
        switched.all_output(),
        daemon.log()
    );
    // The target is the primary: its writes are the application's, and
    // travel to the source; none is stray.
    app.advance_on(pair.target.port(), 30, WAIT).await;
    let rolled = cutover(&config, &["rollback"]).await;
    assert_eq!(rolled.code, 0, "{}\n{}", rolled.all_output(), daemon.log());
    app.advance_on(pair.source.port(), 20, WAIT).await;
    let record = app.stop().await;
    pair.wait_equal(&["accounts", "codes", "ledger"], WAIT)
        .await;
    let status = cutover(&config, &["status"]).await;
    let out = status.all_output();
    assert!(
        out.contains("stray writes: 1 "),
        "only the write before the switch is stray:\n{out}\n{}",
        daemon.log()
    );
    assert!(out.contains("public.codes update (code=c9)"), "{out}");
    assert!(record.unexpected.is_empty(), "{:?}", record.unexpected);
    let ns: Vec<i64> = pair
        .source
        .client("app")
        .await
        .query("SELECT n FROM ledger ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (n, _) in &record.committed {
        assert!(ns.contains(&(*n as i64)), "transaction {n} lost: {ns:?}");
    }
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn a_group_moves_and_comes_back_while_the_other_group_streams() {
    let dir = tempfile::tempdir().unwrap();
    let pointer = dir.path().join("primary");
    let (pair, config) = seeded(
        dir.path(),
        &format!(
            "[switch]\nrepoint_command = \"echo $CUTOVER_NEW_PRIMARY_PORT > {}\"\n",
            pointer.display()
        ),
    )
    .await;
    std::fs::write(&pointer, pair.source.port().to_string()).unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    let http = listen_addr(&dir.path().join("state")).await;
    watching(&daemon).await;
    // The money group's application follows the pointer; the default
    // group's keeps writing on the source all along.
    let app = App::start(pointer.clone(), "postgres", ledger);
    let codes = Writer::start(&pair, 0, codes_load).await;
    app.advance_on(pair.source.port(), 20, WAIT).await;

    // The daemon moves the money group through its console.
    let switched = cutover(&config, &["switch", "--group", "money", "--verify"]).await;
    assert_eq!(
        switched.code,
        0,
        "{}\n{}",
        switched.all_output(),
        daemon.log()
    );
    let out = switched.all_output();
    assert!(
        out.contains("switch of group money journal")
            && out.contains("primary of group money: target"),
        "{out}"
    );
    // The target takes the money group's writes, the source the default
    // group's: both flow, each its way.
    app.advance_on(pair.target.port(), 30, WAIT).await;
    codes.advance(30, WAIT).await;
    // The source's money tables are fenced for the application.
    let fenced = pair
        .source
        .client("app")
        .await
        .batch_execute("UPDATE accounts SET owner = 'x' WHERE id = 1")
        .await;
    assert!(fenced.is_err(), "the source took a write for a moved group");
    // Stray writes on both sides: the default group's on the target, and
    // the money group's on the source by a session that bypasses the
    // fence (triggers off): each is written back over with its primary's
    // row.
    pair.target
        .execute("app", "UPDATE codes SET label = 'stray' WHERE code = 'c9';")
        .await;
    pair.source
        .execute(
            "app",
            "SET session_replication_role = replica; UPDATE accounts SET owner = 'stray' WHERE id = 7;",
        )
        .await;
    for table in ["public.codes", "public.accounts"] {
        cutover_tests::wait_for("the stray writes to be written back", WAIT, || async {
            let (_, body) = get(&http, "/metrics");
            metric(
                &body,
                &format!(
                    "cutover_conflicts_total{{resolution=\"written_back\",table=\"{table}\"}}"
                ),
            )
            .filter(|n| *n >= 1.0)
        })
        .await;
    }
    // A verify compares the groups whose primary is the source, and says
    // which it left out.
    let verified = cutover(&config, &["verify"]).await;
    let out = verified.all_output();
    assert!(
        out.contains("not compared: group money (moved to the target"),
        "{out}"
    );
    // The moved group is compared from its primary, the target, with
    // the reverse stream held there while the application writes on.
    let moved = cutover(&config, &["verify", "--group", "money"]).await;
    let out = moved.all_output();
    assert_eq!(moved.code, 0, "{out}\n{}", daemon.log());
    assert!(
        out.contains("of group money as of target LSN") && out.contains("VALIDATED"),
        "{out}"
    );
    // A whole rollback is refused while a group is moved.
    let whole = cutover(&config, &["rollback"]).await;
    assert_ne!(whole.code, 0);
    assert!(
        whole.all_output().contains("rollback --group money"),
        "{}",
        whole.all_output()
    );
    // And back.
    let rolled = cutover(&config, &["rollback", "--group", "money"]).await;
    assert_eq!(rolled.code, 0, "{}\n{}", rolled.all_output(), daemon.log());
    app.advance_on(pair.source.port(), 20, WAIT).await;
    let record = app.stop().await;
    codes.stop().await;
    pair.wait_equal(&["accounts", "codes", "ledger"], WAIT)
        .await;
    assert!(record.unexpected.is_empty(), "{:?}", record.unexpected);
    // Every committed ledger row is on both servers, once.
    for server in [&pair.source, &pair.target] {
        let ns = ledger_ns(&server.client("app").await).await;
        let mut unique = ns.clone();
        unique.dedup();
        assert_eq!(unique.len(), ns.len(), "a row doubled: {ns:?}");
        for (n, _) in &record.committed {
            assert!(ns.contains(&(*n as i64)), "transaction {n} lost: {ns:?}");
        }
    }
    let stray_owner: String = pair
        .source
        .client("app")
        .await
        .query_one("SELECT owner FROM accounts WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stray_owner, "owner7", "the source's stray write stayed");
    // The group is back: a whole switch moves every table, the money
    // group's writes on the target included.
    let whole = cutover(&config, &["switch", "--verify"]).await;
    assert_eq!(whole.code, 0, "{}\n{}", whole.all_output(), daemon.log());
    pair.target.execute("app", &ledger(1_000_000)).await;
    pair.wait_equal(&["ledger"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    let status = cutover(&config, &["status"]).await;
    let out = status.all_output();
    assert!(out.contains("public.accounts update (id=7)"), "{out}");
    assert!(out.contains("public.codes update (code=c9)"), "{out}");
}

#[tokio::test]
async fn a_group_switch_killed_mid_way_resumes_and_moves_only_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = seeded(dir.path(), "").await;
    let mut daemon = Daemon::start_streaming(&config).await;
    watching(&daemon).await;
    pair.source.execute("app", &ledger(1)).await;
    pair.wait_equal(&["ledger"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    let verified = cutover(&config, &["verify", "--group", "money"]).await;
    assert_eq!(verified.code, 0, "{}", verified.all_output());

    // Killed after the fence and the drain, before the open.
    let killed = cutover_with(
        &config,
        &["switch", "--group", "money"],
        Some("switch:drain:done"),
    )
    .await;
    assert_ne!(killed.code, 0, "{}", killed.all_output());
    let app = pair.source.client("app").await;
    assert!(
        app.batch_execute(&ledger(2)).await.is_err(),
        "the money group is fenced on the source meanwhile"
    );
    app.batch_execute("UPDATE codes SET label = 'still open' WHERE code = 'c1'")
        .await
        .expect("the default group is not fenced");
    let resumed = cutover(&config, &["switch", "--group", "money"]).await;
    assert_eq!(resumed.code, 0, "{}", resumed.all_output());
    assert!(
        resumed
            .all_output()
            .contains("primary of group money: target"),
        "{}",
        resumed.all_output()
    );
    // With no daemon, the verify of the moved group drains the reverse
    // stream itself, and repairs the source from the target.
    pair.source
        .execute(
            "app",
            "SET session_replication_role = replica; UPDATE accounts SET owner = 'drifted' WHERE id = 3;",
        )
        .await;
    let verified = cutover(&config, &["verify", "--group", "money", "--repair"]).await;
    let out = verified.all_output();
    assert!(
        out.contains("as of target LSN") && out.contains("REPAIRED"),
        "{out}"
    );
    assert_eq!(
        one(
            &pair.source.client("app").await,
            "SELECT owner FROM accounts WHERE id = 3"
        )
        .await,
        "owner3"
    );
    // Again: nothing to do.
    let again = cutover(&config, &["switch", "--group", "money"]).await;
    assert_ne!(again.code, 0);
    assert!(
        again
            .all_output()
            .contains("target is already the primary of group money"),
        "{}",
        again.all_output()
    );

    let mut daemon = Daemon::start_streaming(&config).await;
    watching(&daemon).await;
    // The money group flows from the target, the default group from the
    // source.
    pair.target.execute("app", &ledger(3)).await;
    pair.source
        .execute("app", "UPDATE codes SET label = 'after' WHERE code = 'c2'")
        .await;
    pair.wait_equal(&["accounts", "codes", "ledger"], WAIT)
        .await;
    assert_eq!(ledger_ns(&pair.source.client("app").await).await, [1, 3]);
    let status = cutover(&config, &["status"]).await;
    assert!(
        status.stdout.contains("moved groups  money"),
        "{}",
        status.all_output()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// Moves the money group to the target through the running daemon, and
/// waits until both directions stream again.
async fn move_money(daemon: &Daemon, config: &std::path::Path) {
    let switched = cutover(config, &["switch", "--group", "money", "--verify"]).await;
    assert_eq!(
        switched.code,
        0,
        "{}\n{}",
        switched.all_output(),
        daemon.log()
    );
    watching(daemon).await;
}

/// How long the two-way traffic of the no-loops test runs:
/// `CUTOVER_SOAK_SECONDS` (hours, for a soak run), 6 seconds by default.
fn soak() -> Duration {
    Duration::from_secs(
        std::env::var("CUTOVER_SOAK_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(6),
    )
}

/// The money group's application on the target: a ledger row and a
/// balance moved.
fn money_load(n: u64) -> String {
    format!(
        "BEGIN; INSERT INTO ledger (n) VALUES ({n}); UPDATE accounts SET balance = balance + 1 WHERE id = {}; COMMIT;",
        1 + n % 50
    )
}

/// A stray write on the target to the default group's table.
fn codes_stray(n: u64) -> String {
    format!(
        "UPDATE codes SET label = 'stray{n}' WHERE code = 'c{}'",
        1 + n % 10
    )
}

#[tokio::test]
async fn both_directions_at_once_never_loop_nor_lose_nor_double() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = seeded(dir.path(), "").await;
    let mut daemon = Daemon::start_streaming(&config).await;
    watching(&daemon).await;
    move_money(&daemon, &config).await;

    // Both directions apply at once: the money group's writes on the
    // target, the default group's on the source, strays among them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_target = traffic(
        pair.target.client("app").await,
        std::sync::Arc::clone(&stop),
        money_load,
        Some(codes_stray),
    );
    let on_source = traffic(
        pair.source.client("app").await,
        std::sync::Arc::clone(&stop),
        codes_load,
        None,
    );
    tokio::time::sleep(soak()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let money = on_target.await.unwrap();
    let codes = on_source.await.unwrap();
    assert!(
        money > 50 && codes > 50,
        "too little traffic: {money} and {codes}"
    );
    pair.wait_equal(&["accounts", "codes", "ledger"], WAIT)
        .await;

    // Every ledger row once on each side.
    for server in [&pair.source, &pair.target] {
        let ns = ledger_ns(&server.client("app").await).await;
        assert_eq!(ns.len() as u64, money, "rows lost or doubled");
        assert_eq!(ns, (1..=money as i64).collect::<Vec<_>>());
    }
    // Quiet now: a change going round between the two streams would
    // keep writing WAL on both servers.
    let wal = |cluster: &'static str| {
        let pair = &pair;
        async move {
            let server = if cluster == "source" {
                &pair.source
            } else {
                &pair.target
            };
            let text = one(
                &server.client("app").await,
                "SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint::text",
            )
            .await;
            text.parse::<i64>().unwrap()
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = (wal("source").await, wal("target").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = (wal("source").await, wal("target").await);
    assert!(
        after.0 - before.0 < 2048 && after.1 - before.1 < 2048,
        "WAL still grows with no application writing: {before:?} then {after:?}\n{}",
        daemon.log()
    );
    let status = cutover(&config, &["conflicts"]).await.stdout;
    // Only the strays made on the target: none of cutover's own writes
    // on the source came back as one.
    assert!(
        !status.contains("pending") && status.contains("public.codes"),
        "{status}"
    );
    assert!(!status.contains(" source public."), "{status}");
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn the_background_verifier_compares_a_moved_group_from_the_target_and_repairs_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = seeded(
        dir.path(),
        "[verify]\ncontinuous = true\nrepair = true\ncontinuous_rate = 1000000\n",
    )
    .await;
    let mut daemon = Daemon::start_streaming(&config).await;
    let http = listen_addr(&dir.path().join("state")).await;
    watching(&daemon).await;
    move_money(&daemon, &config).await;
    // A row of the moved group changed on the source behind every
    // stream's back (under the reverse repair origin, which the forward
    // stream skips: it stands for what no stream shows). One statement at
    // a time: a multi-statement string is one transaction.
    let tamper = pair.source.client("app").await;
    for statement in [
        "SELECT pg_replication_origin_create('cutover_cutover_reverse_repair')
           WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'cutover_cutover_reverse_repair')",
        "SELECT pg_replication_origin_session_setup('cutover_cutover_reverse_repair')",
        "SET session_replication_role = replica",
        "UPDATE accounts SET owner = 'drifted' WHERE id = 4",
        "SELECT pg_replication_origin_session_reset()",
    ] {
        tamper.batch_execute(statement).await.unwrap();
    }
    cutover_tests::wait_for("the source repaired from the target", WAIT, || async {
        let owner = one(&tamper, "SELECT owner FROM accounts WHERE id = 4").await;
        (owner == "owner4").then_some(())
    })
    .await;
    let log = daemon.log();
    assert!(
        log.contains("the background verifier repaired: updated (id=4)"),
        "{log}"
    );
    let (_, body) = get(&http, "/metrics");
    assert!(
        metric(&body, "cutover_verify_repaired_rows_total").is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}
