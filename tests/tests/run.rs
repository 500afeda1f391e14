//! `cutover run`: every change on the source reaches the target once, in
//! order, across crashes of the daemon and restarts of either server.

use std::time::Duration;

use cutover_tests::{ClusterOptions, Daemon, Pair, Proxy, Writer, wait_for, write_config};

const WAIT: Duration = Duration::from_secs(120);

/// Clusters that stream large transactions early (protocol v2 streaming
/// kicks in past 64 kB of decoded changes).
fn options() -> ClusterOptions {
    ClusterOptions::default().setting("logical_decoding_work_mem", "64kB")
}

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, body text);
ALTER TABLE items ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE log (at bigint, what text);
ALTER TABLE log REPLICA IDENTITY FULL;
CREATE TABLE scratch (id serial PRIMARY KEY, v text);";

/// Mixed transactions on `items` and `log`, the `n`th of a writer.
fn mixed(n: u64) -> String {
    let id = 10_000 + n % 500;
    match n % 6 {
        0 => format!(
            "INSERT INTO items VALUES ({id}, 'n{n}', {n}, NULL) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty"
        ),
        1 => format!("UPDATE items SET qty = qty + 1, name = 'u{n}' WHERE id = {id}"),
        2 => format!("DELETE FROM items WHERE id = {id}"),
        3 => format!(
            "BEGIN; INSERT INTO log VALUES ({n}, 'x'); INSERT INTO log VALUES ({n}, 'x'); UPDATE items SET qty = -qty WHERE id BETWEEN {id} AND {id} + 20; COMMIT;"
        ),
        4 => format!(
            "DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE at % 7 = {} LIMIT 1)",
            n % 7
        ),
        _ => format!(
            "BEGIN; UPDATE items SET id = id + 100000 WHERE id = {id}; DELETE FROM items WHERE id > 110000; COMMIT;"
        ),
    }
}

#[tokio::test]
async fn every_kind_of_change_is_applied_with_its_exact_effect() {
    let pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed', g, CASE WHEN g <= 5 THEN repeat('toast' || g, 3000) END FROM generate_series(1, 50) g;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    let writer = Writer::start(&pair, 1_000_000, mixed).await;

    let big = pair.source.client("app").await;
    for sql in [
        // Plain changes and a key change.
        "INSERT INTO items VALUES (1000, 'new', 1, 'short')",
        "UPDATE items SET name = 'renamed' WHERE id = 10",
        "DELETE FROM items WHERE id = 11",
        "UPDATE items SET id = 1011 WHERE id = 12",
        // TOASTed body left unchanged: by a plain update and by a key change.
        "UPDATE items SET qty = 999 WHERE id = 1",
        "UPDATE items SET id = 1002, name = 'moved' WHERE id = 2",
        // Delete and re-insert of a key in one transaction, twice changed.
        "BEGIN; DELETE FROM items WHERE id = 3; INSERT INTO items VALUES (3, 'reborn', 3, NULL); UPDATE items SET qty = 33 WHERE id = 3; COMMIT;",
        // A savepoint rolled back: its insert never reaches the target.
        "BEGIN; INSERT INTO items VALUES (2000, 'kept', 0, NULL); SAVEPOINT s; INSERT INTO items VALUES (2001, 'rolled back', 0, NULL); UPDATE items SET name = 'rolled back' WHERE id = 4; ROLLBACK TO SAVEPOINT s; INSERT INTO items VALUES (2002, 'kept too', 0, NULL); COMMIT;",
        // TRUNCATE, then rows again.
        "INSERT INTO scratch (v) SELECT 'x' FROM generate_series(1, 100)",
        "TRUNCATE scratch RESTART IDENTITY",
        "INSERT INTO scratch (v) VALUES ('after truncate')",
        // A large transaction streamed while in progress, with a rolled
        // back subtransaction inside, that commits.
        "BEGIN; INSERT INTO log SELECT g, repeat('big', 20) FROM generate_series(1, 20000) g; SAVEPOINT a; INSERT INTO log SELECT -g, 'aborted sub' FROM generate_series(1, 5000) g; ROLLBACK TO SAVEPOINT a; UPDATE items SET name = 'in big txn' WHERE id BETWEEN 20 AND 30; COMMIT;",
    ] {
        big.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // A large streamed transaction that aborts.
    big.batch_execute(
        "BEGIN; INSERT INTO log SELECT g, 'never' FROM generate_series(1, 20000) g; DELETE FROM items WHERE id < 40;",
    )
    .await
    .unwrap();
    big.batch_execute("ROLLBACK").await.unwrap();
    writer.advance(300, WAIT).await;
    writer.stop().await;
    big.batch_execute("INSERT INTO items VALUES (3000, 'last', 0, NULL)")
        .await
        .unwrap();
    let last_commit: String = pair
        .source
        .query_value("app", "SELECT pg_current_wal_lsn()::text")
        .await;

    pair.wait_equal(&["items", "log", "scratch"], WAIT).await;
    // The TOASTed bodies were never overwritten with NULL.
    let body: String = pair
        .target
        .query_value("app", "SELECT md5(body) FROM items WHERE id = 1")
        .await;
    let expected: String = pair
        .source
        .query_value("app", "SELECT md5(repeat('toast1', 3000))")
        .await;
    assert_eq!(body, expected);
    let never: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM log WHERE what IN ('never', 'aborted sub')",
        )
        .await;
    assert_eq!(never, 0);
    // The large transactions went through the streamed path.
    assert!(
        std::fs::read_dir(dir.path().join("state/spill")).is_ok(),
        "no streamed transaction was spilled:\n{}",
        daemon.log()
    );
    // The origin on the target records what was applied.
    let origin: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM pg_replication_origin_status s JOIN pg_replication_origin o ON o.roident = s.local_id WHERE o.roname = 'cutover_cutover' AND s.remote_lsn > '0/0'",
        )
        .await;
    assert_eq!(origin, 1, "no origin progress recorded on the target");
    assert_eq!(daemon.terminate(WAIT), Some(0), "SIGTERM must exit 0");
    // The final status update reached the source: the slot's confirmed
    // position covers the last commit.
    let confirmed_behind: bool = pair
        .source
        .query_value(
            "app",
            &format!("SELECT confirmed_flush_lsn < '{last_commit}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cutover'"),
        )
        .await;
    assert!(
        !confirmed_behind,
        "the slot was not told about {last_commit}"
    );
}

#[tokio::test]
async fn ten_sigkills_during_a_workload_lose_and_double_nothing() {
    let pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // Small batches and queues so that kills land in every phase.
    let config = pair.config(
        dir.path(),
        "[apply]\nbatch_rows = 50\nqueue_transactions = 20\n",
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    let writer = Writer::start(&pair, 2_000_000, mixed).await;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..10 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // A different point in the workload each round.
        writer.advance(20 + rng % 200, WAIT).await;
        if round % 3 == 0 {
            // Sometimes a big transaction in flight.
            pair.source
                .execute(
                    "app",
                    &format!(
                        "INSERT INTO log SELECT {round}, 'bulk' FROM generate_series(1, 3000)"
                    ),
                )
                .await;
        }
        daemon.kill();
        writer.advance(10, WAIT).await;
        daemon.restart();
    }
    writer.advance(100, WAIT).await;
    writer.stop().await;
    pair.wait_equal(&["items", "log"], WAIT).await;
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

#[tokio::test]
async fn the_stream_survives_restarts_of_the_source_and_the_target() {
    let mut pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    let round = |n: i64| {
        format!(
            "INSERT INTO items SELECT g, 'r{n}', g, NULL FROM generate_series({0}, {0} + 99) g;
             UPDATE items SET qty = qty + 1 WHERE id % 3 = 0;
             INSERT INTO log VALUES ({n}, 'round');",
            n * 1000
        )
    };
    pair.source.execute("app", &round(1)).await;
    pair.wait_equal(&["items", "log"], WAIT).await;

    pair.source.restart();
    pair.source.execute("app", &round(2)).await;
    pair.wait_equal(&["items", "log"], WAIT).await;

    // Changes queued on the source while the target is down.
    pair.target.stop();
    pair.source.execute("app", &round(3)).await;
    pair.target.start_again();
    pair.source.execute("app", &round(4)).await;
    pair.wait_equal(&["items", "log"], WAIT).await;

    assert!(daemon.running(), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("reconnecting"),
        "no reconnect was logged:\n{log}"
    );
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

#[tokio::test]
async fn a_target_crash_under_load_loses_no_acknowledged_change() {
    // The apply commits asynchronously: what the target had not flushed
    // when it crashed is gone from it, so it must not have been
    // acknowledged to the source either, or the source would never send
    // it again and the tables would differ for good.
    let mut pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    for round in 0..3 {
        let writer = Writer::start(&pair, (100 + round) * 1_000_000, mixed).await;
        writer.advance(300, WAIT).await;
        wait_for("the target to apply under load", WAIT, || async {
            let applied: i64 = pair
                .target
                .query_value("app", "SELECT count(*) FROM log")
                .await;
            (applied > 0).then_some(())
        })
        .await;
        writer.advance(100, WAIT).await;
        pair.target.crash();
        pair.target.start_again();
        writer.stop().await;
        pair.wait_equal(&["items", "log"], WAIT).await;
    }
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

#[tokio::test]
async fn a_change_the_target_rejects_stops_the_stream_and_nothing_is_skipped() {
    let pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    pair.target
        .execute(
            "app",
            "ALTER TABLE items ADD CONSTRAINT qty_small CHECK (qty < 1000)",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items VALUES (1, 'fine', 1, NULL);
             INSERT INTO items VALUES (2, 'fine', 2, NULL), (7, 'too big', 5000, NULL), (8, 'fine', 8, NULL);
             INSERT INTO items VALUES (9, 'after', 9, NULL);",
        )
        .await;
    let code = daemon.wait(WAIT);
    assert_eq!(code, Some(1), "{}", daemon.log());
    let log = daemon.log();
    for part in ["items", "7", "23514", "LSN", "qty_small"] {
        assert!(log.contains(part), "the error does not name {part}:\n{log}");
    }
    // Nothing after (or beside, in the same transaction) the rejected row
    // was applied; the transaction before it was.
    let ids: Vec<i64> = pair
        .target
        .client("app")
        .await
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        ids == vec![1] || ids.is_empty(),
        "rows beyond the refused change were applied: {ids:?}"
    );
    // Fixed on the target, a restart resumes at the refused transaction.
    pair.target
        .execute("app", "ALTER TABLE items DROP CONSTRAINT qty_small")
        .await;
    daemon.restart();
    pair.wait_equal(&["items"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

#[tokio::test]
async fn network_cuts_on_either_side_lose_and_double_nothing() {
    let pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    // Every connection of the daemon, the replication stream included,
    // goes through a proxy that the test cuts.
    let source_proxy = Proxy::start(pair.source.port());
    let target_proxy = Proxy::start(pair.target.port());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"postgres://postgres@127.0.0.1:{}/app?sslmode=disable\"\n\
             [target]\nurl = \"postgres://postgres@127.0.0.1:{}/app?sslmode=disable\"\n\
             [state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n",
            source_proxy.port(),
            target_proxy.port(),
            dir.path().join("state").display()
        ),
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    let writer = Writer::start(&pair, 3_000_000, mixed).await;
    for round in 0..4 {
        writer.advance(150, WAIT).await;
        let (side, proxy) = if round % 2 == 0 {
            ("source", &source_proxy)
        } else {
            ("target", &target_proxy)
        };
        wait_for("the daemon to be connected again", WAIT, || async {
            (source_proxy.open() > 0 && target_proxy.open() > 0).then_some(())
        })
        .await;
        assert!(
            proxy.cut() > 0,
            "round {round}: nothing to cut on the {side}"
        );
    }
    writer.advance(150, WAIT).await;
    writer.stop().await;
    pair.wait_equal(&["items", "log"], WAIT).await;
    assert!(daemon.running(), "{}", daemon.log());
    assert!(
        daemon.log().contains("reconnecting"),
        "no reconnect was logged:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    // With both networks healthy again, the stop is clean on both sides.
    assert!(
        !daemon.log().contains("did not confirm"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn sigterm_with_a_full_queue_exits_cleanly_and_loses_nothing() {
    let pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    // A queue of two transactions, so that a paused applier fills it.
    let config = pair.config(dir.path(), "[apply]\nqueue_transactions = 2\n");
    let env = [("CUTOVER__CONSOLE__ALLOW_NO_PASSWORD", "true")];
    let mut daemon = Daemon::start_with_env(&config, &["run"], &env);
    wait_for("the daemon to stream", WAIT, || async {
        daemon.log().contains("streaming").then_some(())
    })
    .await;
    let console = wait_for("the console address", WAIT, || async {
        let text = std::fs::read_to_string(dir.path().join("state/listen.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["console"].as_str().map(str::to_owned)
    })
    .await;
    let client = cutover_tests::console(&console).await;
    client.simple_query("PAUSE").await.expect("PAUSE");

    let source = pair.source.client("app").await;
    for id in 0..200i64 {
        source
            .execute("INSERT INTO items VALUES ($1, 'queued', 0, NULL)", &[&id])
            .await
            .unwrap();
    }
    // The reader takes two, then waits for room; lag seconds only grow
    // once it has read all it can.
    wait_for("the reader to wait on the full queue", WAIT, || async {
        let rows = client.simple_query("SHOW LAG").await.ok()?;
        let seconds: f64 = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("lag_seconds")?.parse().ok(),
            _ => None,
        })?;
        (seconds >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        daemon.terminate(WAIT),
        Some(0),
        "SIGTERM with a full queue must exit 0:\n{}",
        daemon.log()
    );
    assert!(daemon.log().contains("stream stopped"), "{}", daemon.log());

    // Nothing that was queued or waiting is lost: the next run applies it.
    daemon.restart();
    pair.wait_equal(&["items"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// Target transactions that applied rows of `phase` in `ticks`.
async fn ticks_transactions(pair: &Pair, phase: &str) -> i64 {
    pair.target
        .query_value(
            "app",
            &format!("SELECT count(DISTINCT xmin::text) FROM ticks WHERE phase = '{phase}'"),
        )
        .await
}

/// `apply.batch_ms`: by default a transaction is applied as soon as it
/// arrives, in its own target transaction; with a wait, transactions that
/// arrive within it share one.
#[tokio::test]
async fn apply_batch_ms_groups_transactions_that_arrive_within_it() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE ticks (id int PRIMARY KEY, phase text);")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    for id in 1..=5 {
        pair.source
            .execute(
                "app",
                &format!("INSERT INTO ticks VALUES ({id}, 'at once')"),
            )
            .await;
        wait_for("the tick on the target", WAIT, || async {
            (pair
                .target
                .query_value::<i64>(
                    "app",
                    &format!("SELECT count(*) FROM ticks WHERE id = {id}"),
                )
                .await
                == 1)
                .then_some(())
        })
        .await;
    }
    assert_eq!(ticks_transactions(&pair, "at once").await, 5);
    assert_eq!(daemon.terminate(WAIT), Some(0));

    let config = pair.config(dir.path(), "[apply]\nbatch_ms = 5000\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    // Five transactions over about a second: one batch.
    for id in 6..=10 {
        pair.source
            .execute("app", &format!("INSERT INTO ticks VALUES ({id}, 'waited')"))
            .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    pair.wait_equal(&["ticks"], WAIT).await;
    assert_eq!(ticks_transactions(&pair, "waited").await, 1);
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

/// A batch whose COMMIT succeeded is never applied again, even when the
/// query right after it (the target's WAL positions) fails on a session
/// that is still alive: the change-by-change replay that follows a failed
/// batch must not run then. The target role is not a superuser, so that
/// revoking `pg_current_wal_insert_lsn` from PUBLIC makes exactly that
/// query fail. The keyless `log` table (REPLICA IDENTITY FULL) would show
/// a batch applied twice.
#[tokio::test]
async fn a_batch_committed_before_a_failing_query_is_never_applied_again() {
    let pair = Pair::start(options()).await;
    pair.both(SCHEMA).await;
    pair.target
        .execute(
            "app",
            "CREATE ROLE applier LOGIN;
             GRANT SET ON PARAMETER session_replication_role TO applier;
             GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text),
                 pg_replication_origin_session_setup(text),
                 pg_replication_origin_xact_setup(pg_lsn, timestamptz),
                 pg_replication_origin_progress(text, boolean) TO applier;
             GRANT CREATE ON DATABASE app TO applier;
             GRANT ALL ON SCHEMA public TO applier;
             ALTER TABLE items OWNER TO applier;
             ALTER TABLE log OWNER TO applier;
             ALTER TABLE scratch OWNER TO applier;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n",
            pair.source.url("app", "postgres", None),
            pair.target.url("app", "applier", None),
            dir.path().join("state").display()
        ),
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO log SELECT g, 'before' FROM generate_series(1, 50) g",
        )
        .await;
    pair.wait_equal(&["log"], WAIT).await;

    pair.target
        .execute(
            "app",
            "REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC",
        )
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO log SELECT g, 'during' FROM generate_series(1, 50) g",
        )
        .await;
    // The batch commits, the query after it is refused: a definite error.
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("42501") || log.contains("permission denied"),
        "the error names the refusal:\n{log}"
    );
    let applied: i64 = pair
        .target
        .query_value("app", "SELECT count(*) FROM log WHERE what = 'during'")
        .await;
    assert_eq!(applied, 50, "the batch committed once before the error");

    pair.target
        .execute(
            "app",
            "GRANT EXECUTE ON FUNCTION pg_current_wal_insert_lsn() TO PUBLIC",
        )
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO log SELECT g, 'after' FROM generate_series(1, 50) g",
        )
        .await;
    daemon.restart();
    pair.wait_equal(&["log"], WAIT).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// The target's WAL writer may leave an applied batch unflushed for
/// `wal_writer_delay` (here its maximum, 10 s); the applier then forces a
/// flush instead of holding the source's slot back for that long.
#[tokio::test]
async fn a_slow_wal_writer_on_the_target_does_not_hold_the_acknowledgement_back() {
    let pair = Pair::start(options().setting("wal_writer_delay", "10000ms")).await;
    pair.both(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    let mut slowest = Duration::ZERO;
    for round in 0..4 {
        pair.source
            .execute("app", &format!("INSERT INTO log VALUES ({round}, 'flush')"))
            .await;
        pair.wait_equal(&["log"], WAIT).await;
        // Applied: the origin holds the transaction's end, which is what
        // the slot must be told once the target has it on disk.
        let started = std::time::Instant::now();
        let end: String = pair
            .target
            .query_value(
                "app",
                "SELECT pg_replication_origin_progress('cutover_cutover', false)::text",
            )
            .await;
        wait_for("the slot to confirm the commit", WAIT, || async {
            pair.source
                .query_value::<bool>(
                    "app",
                    &format!("SELECT confirmed_flush_lsn >= '{end}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cutover'"),
                )
                .await
                .then_some(())
        })
        .await;
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        slowest < Duration::from_secs(5),
        "a commit waited {slowest:?} for its acknowledgement:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// Rows a batch inserted go out as a plain INSERT and rows it updated as
/// an UPDATE, not as upserts: a target that lost a row still gets it back
/// from the next UPDATE of its key, and one that holds a row the source
/// inserts again still ends with the source's row (the batch is replayed
/// change by change), as with the upserts they replace.
#[tokio::test]
async fn a_diverged_target_still_ends_with_the_source_rows_after_inserts_and_updates() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE k (id int PRIMARY KEY)")
        .await;
    pair.on_source(
        "INSERT INTO t SELECT g, 'seed' FROM generate_series(1, 10) g;
         INSERT INTO k SELECT generate_series(1, 10)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.wait_equal(&["t", "k"], WAIT).await;
    // A table of key columns only: an update of a row the target lost
    // brings it back too.
    pair.target
        .execute("app", "DELETE FROM k WHERE id = 3")
        .await;
    pair.on_source("UPDATE k SET id = id WHERE id = 3").await;
    pair.wait_equal(&["k"], WAIT).await;
    // The target diverges: a row lost, a row it should not have yet.
    pair.target
        .execute(
            "app",
            "DELETE FROM t WHERE id = 3; INSERT INTO t VALUES (50, 'stray')",
        )
        .await;
    pair.on_source("UPDATE t SET v = 'updated' WHERE id IN (2, 3)")
        .await;
    let expected: Vec<String> = ["(2,updated)", "(3,updated)"].map(String::from).to_vec();
    wait_for("the lost row back from its update", WAIT, || async {
        let rows: Vec<String> = pair
            .target
            .client("app")
            .await
            .query("SELECT t::text FROM t WHERE id IN (2, 3) ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        (rows == expected).then_some(())
    })
    .await;
    pair.on_source("INSERT INTO t VALUES (50, 'from the source'), (51, 'new')")
        .await;
    pair.finish(&mut daemon, &["t", "k"], WAIT).await;
}
