//! A slot the source invalidated while the daemon was down: `run` fails
//! with the reason and the way out and stays up so that `/health` says
//! it, `status` says it too, and
//! `cutover run --resync` makes the slot again and brings the target back
//! to equal by comparing and repairing, without copying again.

use std::time::Duration;

use cutover_tests::{ClusterOptions, Daemon, Pair, run_cutover};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_lost_slot_is_said_and_resync_repairs_the_target_without_a_new_copy() {
    let pair =
        Pair::start(ClusterOptions::default().setting("max_slot_wal_keep_size", "1MB")).await;
    pair.both(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL, note text);
         CREATE TABLE events (id bigint PRIMARY KEY, what text NOT NULL);",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO accounts SELECT g, g * 10, 'seed' FROM generate_series(1, 500) g;
             INSERT INTO events SELECT g, 'seed ' || g FROM generate_series(1, 300) g;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.source
        .execute("app", "UPDATE accounts SET balance = 0 WHERE id <= 5")
        .await;
    pair.finish(&mut daemon, &["accounts", "events"], WAIT)
        .await;
    // The target was copied once; it keeps a row the copy wrote, to show
    // that resync does not copy again.
    pair.target
        .execute(
            "app",
            "CREATE TABLE marker AS SELECT ctid::text AS at FROM accounts WHERE id = 400",
        )
        .await;

    // While the daemon is down: changes of every kind, then the slot lost.
    pair.source
        .execute(
            "app",
            "INSERT INTO accounts SELECT g, g, 'new' FROM generate_series(501, 540) g;
             UPDATE accounts SET balance = balance + 1, note = 'changed' WHERE id BETWEEN 100 AND 120;
             DELETE FROM accounts WHERE id BETWEEN 200 AND 209;
             DELETE FROM events WHERE id > 290;
             INSERT INTO events VALUES (1000, 'while down');",
        )
        .await;
    pair.source.lose_slot("app", "cutover").await;

    // `run` fails, saying what happened and what to run, and stays up
    // (a supervisor restarting it could not help) so that /health says
    // it too; stopped, it exits 1.
    let config_text = config.to_str().unwrap();
    let mut failed = Daemon::start_with_env(
        &config,
        &["run"],
        &[("CUTOVER__CONSOLE__ALLOW_NO_PASSWORD", "true")],
    );
    let health = cutover_tests::wait_for("/health to say the slot is lost", WAIT, || async {
        let text = std::fs::read_to_string(dir.path().join("state/listen.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let (code, body) = cutover_tests::http::get(json["http"].as_str()?, "/health");
        body.contains("cutover run --resync")
            .then_some((code, body))
    })
    .await;
    assert_eq!(health.0, 503, "{}", health.1);
    assert!(health.1.contains("\"state\":\"failed\""), "{}", health.1);
    assert!(failed.running(), "{}", failed.log());
    // A switch asked of it meanwhile is answered at once, not queued.
    let asked = config.clone();
    let switch = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            run_cutover(
                &["--config", asked.to_str().unwrap(), "switch"],
                &[("CUTOVER__CONSOLE__ALLOW_NO_PASSWORD", "true")],
            )
        }),
    )
    .await
    .expect("the switch was answered")
    .unwrap();
    assert_eq!(switch.code, 1, "{}", switch.all_output());
    assert!(
        switch.all_output().contains("only waits to be stopped"),
        "{}",
        switch.all_output()
    );
    assert_eq!(failed.terminate(WAIT), Some(1), "{}", failed.log());
    let log = failed.log();
    assert!(
        log.contains("invalidated") && log.contains("cutover run --resync"),
        "{log}"
    );
    let status = run_cutover(&["--config", config_text, "status"], &[]);
    assert!(
        status.stdout.contains("cutover run --resync"),
        "status says what to run:\n{}",
        status.all_output()
    );

    // A resync that stops after making the slot again and before the
    // repair: a plain `run` refuses, the next --resync does it all.
    let interrupted = run_cutover(
        &["--config", config_text, "run", "--resync"],
        &[("CUTOVER_FAILPOINT", "resync:repair")],
    );
    assert_ne!(interrupted.code, 0, "{}", interrupted.all_output());
    assert!(
        interrupted.stderr.contains("failpoint resync:repair"),
        "{}",
        interrupted.stderr
    );
    let refused = run_cutover(&["--config", config_text, "run"], &[]);
    assert_eq!(refused.code, 1, "{}", refused.all_output());
    assert!(
        refused.stderr.contains("began and did not finish"),
        "{}",
        refused.stderr
    );

    // --resync: compared and repaired, then streaming from the new slot.
    let mut daemon = Daemon::start(&config, &["run", "--resync"]);
    cutover_tests::wait_for("the resync and the stream", WAIT, || async {
        let log = daemon.log_of_this_start();
        assert!(!log.contains("error:"), "the resync failed:\n{log}");
        log.contains("to=\"streaming\"").then_some(())
    })
    .await;
    let log = daemon.log_of_this_start();
    assert!(log.contains("resync: slot cutover made again at"), "{log}");
    // 40 inserted, 21 changed, 10 deleted in accounts; 10 deleted and 1
    // inserted in events.
    assert!(log.contains("public.accounts: 71 rows"), "{log}");
    assert!(log.contains("public.events: 11 rows"), "{log}");
    pair.wait_equal(&["accounts", "events"], WAIT).await;
    // Not copied again: the row the copy wrote is where it was.
    let kept: bool = pair
        .target
        .query_value(
            "app",
            "SELECT (SELECT at FROM marker) = (SELECT ctid::text FROM accounts WHERE id = 400)",
        )
        .await;
    assert!(kept, "accounts was rewritten");
    // And the stream goes on from the new slot.
    pair.source
        .execute(
            "app",
            "INSERT INTO events VALUES (2000, 'after'); DELETE FROM accounts WHERE id = 1;",
        )
        .await;
    pair.finish(&mut daemon, &["accounts", "events"], WAIT)
        .await;
    // A second resync has nothing to do: the slot is fine.
    let again = run_cutover(&["--config", config_text, "run", "--resync"], &[]);
    assert_eq!(again.code, 1, "{}", again.all_output());
    assert!(
        again.stderr.contains("nothing to resync"),
        "{}",
        again.stderr
    );
}
