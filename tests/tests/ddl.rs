//! DDL on either side while `cutover run` streams: the source's DDL
//! stops the stream at its place with the fix (the default policy) or is
//! followed where it only adds (`[ddl] policy = "additive"`); columns
//! changed by an operator on both sides are described again; cutover's
//! own event records cannot be forged or outlive a rolled-back savepoint.
//! Every change is made on the source while the daemon streams, then both
//! sides are compared row by row.

use cutover_tests::{ClusterOptions, Daemon, Pair, wait_for};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn columns_changed_on_both_sides_are_described_again_and_a_narrower_target_names_the_fix() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int, note text);
         CREATE TABLE ledger (id int PRIMARY KEY, amount int);",
    )
    .await;
    pair.on_source(
        "INSERT INTO accounts SELECT g, g, 'n' FROM generate_series(1, 10) g;
         INSERT INTO ledger SELECT g, g FROM generate_series(1, 10) g;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    // As on a source where cutover's role may not create event triggers:
    // DDL reaches the applier only through the tables' new descriptions.
    pair.source
        .execute(
            "app",
            "DROP EVENT TRIGGER cutover_ddl; DROP EVENT TRIGGER cutover_ddl_drop;",
        )
        .await;
    pair.on_source("UPDATE accounts SET balance = balance + 1")
        .await;
    pair.wait_equal(&["accounts"], WAIT).await;
    // The operator widens a column and adds one, on the target first.
    pair.target
        .execute(
            "app",
            "ALTER TABLE accounts ALTER COLUMN balance TYPE bigint; ALTER TABLE accounts ADD COLUMN region text;",
        )
        .await;
    pair.on_source("ALTER TABLE accounts ALTER COLUMN balance TYPE bigint; ALTER TABLE accounts ADD COLUMN region text;",
    )
    .await;
    for sql in [
        "INSERT INTO accounts VALUES (11, 5000000000, 'wide', 'eu')",
        "UPDATE accounts SET balance = 6000000000, region = 'us' WHERE id = 1",
        "UPDATE accounts SET note = 'short' WHERE id = 2",
    ] {
        pair.on_source(sql).await;
    }
    pair.wait_equal(&["accounts"], WAIT).await;
    // Widened on the source only: the stream stops naming the column and
    // the statement that widens it on the target; nothing is skipped.
    pair.on_source("ALTER TABLE ledger ALTER COLUMN amount TYPE bigint; INSERT INTO ledger VALUES (11, 7000000000);",
    )
    .await;
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("amount is integer on the target but bigint on the source")
            && log
                .contains("ALTER TABLE \"public\".\"ledger\" ALTER COLUMN \"amount\" TYPE bigint;"),
        "{log}"
    );
    pair.target
        .execute("app", "ALTER TABLE ledger ALTER COLUMN amount TYPE bigint")
        .await;
    daemon.restart();
    pair.finish(&mut daemon, &["accounts", "ledger"], WAIT)
        .await;
    let triggers: i64 = pair
        .source
        .query_value(
            "app",
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'cutover_ddl%'",
        )
        .await;
    assert_eq!(triggers, 2, "a start puts missing DDL triggers back");
}

#[tokio::test]
async fn ddl_on_the_source_stops_the_stream_at_its_place_with_the_fix_by_default() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE accounts (id int PRIMARY KEY, balance int);")
        .await;
    pair.on_source("INSERT INTO accounts SELECT g, g FROM generate_series(1, 10) g;")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    // Changed on the target first: the source's DDL finds it there and
    // the stream goes on.
    pair.target
        .execute("app", "ALTER TABLE accounts ADD COLUMN region text")
        .await;
    pair.on_source("ALTER TABLE accounts ADD COLUMN region text; UPDATE accounts SET region = 'eu' WHERE id = 1;",
    )
    .await;
    pair.wait_equal(&["accounts"], WAIT).await;
    // On the source only: the stream stops at the statement, before the
    // rows after it, naming the statement and the fix.
    pair.on_source("BEGIN; UPDATE accounts SET balance = -1 WHERE id = 2; ALTER TABLE accounts ADD COLUMN note text; UPDATE accounts SET note = 'n' WHERE id = 3; COMMIT;",
    )
    .await;
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("ALTER TABLE accounts ADD COLUMN note text")
            && log.contains("the target lacks column note (text)")
            && log.contains("ALTER TABLE \"public\".\"accounts\" ADD COLUMN \"note\" text;"),
        "{log}"
    );
    let balance: i32 = pair
        .target
        .query_value("app", "SELECT balance FROM accounts WHERE id = 2")
        .await;
    assert_eq!(balance, 2, "nothing of the transaction is applied");
    pair.target
        .execute("app", "ALTER TABLE accounts ADD COLUMN note text")
        .await;
    daemon.restart();
    pair.finish(&mut daemon, &["accounts"], WAIT).await;
}

#[tokio::test]
async fn with_the_additive_policy_new_columns_and_widened_types_follow_and_drops_stop() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE accounts (id int PRIMARY KEY, balance int);")
        .await;
    pair.on_source("INSERT INTO accounts SELECT g, g FROM generate_series(1, 10) g;")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[ddl]\npolicy = \"additive\"\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    for sql in [
        // Existing rows read the default: the target's must too.
        "ALTER TABLE accounts ADD COLUMN status text NOT NULL DEFAULT 'open'",
        "ALTER TABLE accounts ADD COLUMN note text",
        "ALTER TABLE accounts ALTER COLUMN balance TYPE bigint",
        "INSERT INTO accounts VALUES (11, 5000000000, 'closed', 'big')",
        "UPDATE accounts SET note = 'x' WHERE id = 1",
    ] {
        pair.on_source(sql).await;
    }
    pair.wait_equal(&["accounts"], WAIT).await;
    let status_type: String = pair
        .target
        .query_value(
            "app",
            "SELECT format_type(atttypid, atttypmod) || ' ' || attnotnull FROM pg_attribute WHERE attrelid = 'accounts'::regclass AND attname = 'balance'",
        )
        .await;
    assert_eq!(status_type, "bigint false");
    // A destructive change stops with the statement and the fix, also
    // right after a restart (nothing remembered of the table).
    daemon.kill();
    daemon.restart();
    pair.on_source("ALTER TABLE accounts DROP COLUMN note")
        .await;
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("the source dropped column note")
            && log.contains("ALTER TABLE \"public\".\"accounts\" DROP COLUMN \"note\";"),
        "{log}"
    );
}

#[tokio::test]
async fn a_new_table_in_scope_streams_from_its_first_row_and_is_created_with_the_additive_policy() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE accounts (id int PRIMARY KEY, balance int);")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        "[ddl]\npolicy = \"additive\"\n[replication]\nexclude = [\"public.scratch_*\"]\n",
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[state]\n", "[state]\nlag_sample_seconds = 1\n", 1),
    )
    .unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    for sql in [
        // Created and filled in one transaction: its first rows stream.
        "BEGIN; CREATE TABLE invoices (id bigint PRIMARY KEY, amount numeric(10,2) NOT NULL, total numeric GENERATED ALWAYS AS (amount * 2) STORED);
                INSERT INTO invoices VALUES (1, 10.50), (2, 20); COMMIT;",
        "UPDATE invoices SET amount = 11 WHERE id = 1",
        // Keyless: its inserts stream (replication.keyless = append_only).
        "CREATE TABLE audit (at int, what text); INSERT INTO audit VALUES (1, 'created');",
        // Out of scope: not followed.
        "CREATE TABLE scratch_tmp (x int); INSERT INTO scratch_tmp VALUES (1);",
        "INSERT INTO accounts VALUES (1, 1)",
    ] {
        pair.on_source(sql).await;
    }
    pair.wait_equal(&["accounts", "invoices", "audit"], WAIT)
        .await;
    let scratch: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM pg_class WHERE relname = 'scratch_tmp'",
        )
        .await;
    assert_eq!(scratch, 0, "a table out of scope is not created");
    let published: Vec<String> = pair
        .source
        .client("app")
        .await
        .query(
            "SELECT pubname || ':' || tablename FROM pg_publication_tables WHERE tablename IN ('invoices', 'audit', 'scratch_tmp') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, ["cutover:invoices", "cutover_inserts:audit"]);
    // The new keyless table's updates and deletes are reported, as for
    // one that was there at the start.
    pair.on_source("UPDATE audit SET what = 'changed'; DELETE FROM audit;")
        .await;
    let addr = cutover_tests::http::listen_addr(&dir.path().join("state")).await;
    wait_for("the new keyless table's unstreamed rows", WAIT, || async {
        let (_, body) = cutover_tests::http::get(&addr, "/metrics");
        (cutover_tests::http::metric(&body, "cutover_unstreamed_rows{table=\"public.audit\"}")
            == Some(2.0))
        .then_some(())
    })
    .await;
    // CREATE TABLE AS writes rows before any trigger could publish the
    // table: the stream stops and says so.
    pair.on_source("CREATE TABLE copied AS SELECT * FROM accounts")
        .await;
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    assert!(
        daemon.log().contains("a CREATE TABLE AS in scope"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn events_rolled_back_with_a_savepoint_or_forged_by_a_source_user_change_nothing() {
    // Small logical_decoding_work_mem: the bulk below streams while in
    // progress, savepoint rollbacks included.
    let pair =
        Pair::start(ClusterOptions::default().setting("logical_decoding_work_mem", "64kB")).await;
    pair.both(
        "CREATE TABLE parts (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (1000);
         CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (1000) TO (100000);
         CREATE TABLE accounts (id int PRIMARY KEY, balance int);",
    )
    .await;
    pair.on_source(
        "INSERT INTO parts SELECT g, 'seed' FROM generate_series(1, 1500) g;
         INSERT INTO accounts SELECT g, g FROM generate_series(1, 10) g;
         CREATE ROLE app LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO app;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    for sql in [
        // A partition truncate and a DDL change, both rolled back inside a
        // transaction large enough to stream.
        "BEGIN; INSERT INTO parts SELECT g, repeat('x', 200) FROM generate_series(2000, 4000) g;
                SAVEPOINT s; TRUNCATE parts_1; ROLLBACK TO SAVEPOINT s;
                SAVEPOINT t; ALTER TABLE accounts ADD COLUMN note text; ROLLBACK TO SAVEPOINT t;
                UPDATE accounts SET balance = 0 WHERE id = 1; COMMIT;",
    ] {
        pair.on_source(sql).await;
    }
    // A source user forging cutover's events: a logical message (any role
    // may write one) is not an event, and the events table is closed.
    let app = tokio_postgres::connect(&pair.source.conninfo("app", "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(app.1);
    let app = app.0;
    app.batch_execute(
        r#"SELECT pg_logical_emit_message(true, 'cutover.truncate_partition', '{"partition":{"schema":"public","name":"parts_2"},"root":{"schema":"public","name":"parts"},"parent":{"schema":"public","name":"parts"},"bound":"x","constraint":"true"}')"#,
    )
    .await
    .unwrap();
    let refused = app
        .batch_execute("INSERT INTO cutover.events (kind, payload) VALUES ('ddl', '{}')")
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("permission denied")
            || format!("{refused:?}").contains("permission denied"),
        "{refused:?}"
    );
    pair.on_source("INSERT INTO accounts VALUES (100, 100)")
        .await;
    pair.finish(&mut daemon, &["parts", "accounts"], WAIT).await;
    assert!(
        std::fs::read_dir(dir.path().join("state/spill")).is_ok(),
        "the transaction was not streamed"
    );
}

#[tokio::test]
async fn a_rename_on_the_source_stops_even_with_the_additive_policy() {
    // Followed as an addition, a renamed column would reach the target
    // empty while its values stayed in the old column.
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE accounts (id int PRIMARY KEY, balance int);")
        .await;
    pair.on_source("INSERT INTO accounts VALUES (1, 10)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[ddl]\npolicy = \"additive\"\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    daemon.kill();
    daemon.restart();
    wait_for("the daemon to stream again", WAIT, || async {
        (daemon.log().matches("to=\"streaming\"").count() >= 2).then_some(())
    })
    .await;
    pair.on_source(
        "ALTER TABLE accounts RENAME COLUMN balance TO amount; UPDATE accounts SET amount = 11;",
    )
    .await;
    assert_eq!(daemon.wait(WAIT), Some(1), "{}", daemon.log());
    assert!(
        daemon.log().contains("a rename on the source"),
        "{}",
        daemon.log()
    );
    let columns: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'accounts'::regclass AND attnum > 0 AND NOT attisdropped",
        )
        .await;
    assert_eq!(columns, 2, "nothing was added to the target");
}
