//! The snapshot copy: exact for every type, split across workers, meeting
//! the stream without losing or doubling a write, and resumable after a
//! crash without duplicates or holes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cutover_tests::{Cluster, ClusterOptions, Daemon, Pair, run_cutover, wait_for};

const WAIT: Duration = Duration::from_secs(120);

/// Rows of `table` on the target.
async fn target_rows(pair: &Pair, table: &str) -> i64 {
    pair.target
        .query_value("app", &format!("SELECT count(*) FROM {table}"))
        .await
}

/// Every column type the copy supports, with edge values, NULLs, and a
/// column whose type differs on the target (forcing the text format).
const TYPES_SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 int, i8 bigint,
    f4 real, f8 double precision,
    num numeric, num_fixed numeric(12, 4),
    b bool,
    t text, vc varchar(20), ch char(5),
    by bytea,
    d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
    u uuid,
    j json, jb jsonb,
    ints int[], texts text[], grid int[][],
    m mood, moods mood[],
    addr inet, net cidr, mac macaddr,
    bits bit varying(16),
    r int4range, tsr tstzrange,
    money_col money,
    p point,
    composite pair,
    xml_col xml,
    tsv tsvector
);
CREATE TABLE nothing (id int PRIMARY KEY, v text);
-- The built-in types alone: identical on both sides, so copied in binary.
CREATE TABLE builtin (LIKE everything INCLUDING ALL);
ALTER TABLE builtin DROP COLUMN m, DROP COLUMN moods, DROP COLUMN composite;";

/// Fills `builtin` from `everything` on the source.
const BUILTIN_ROWS: &str = "INSERT INTO builtin SELECT id, i2, i4, i8, f4, f8, num, num_fixed, b, t, vc, ch, by,
 d, tm, ttz, ts, tstz, iv, u, j, jb, ints, texts, grid, addr, net, mac, bits, r, tsr, money_col, p, xml_col, tsv
 FROM everything";

const TYPES_ROWS: &str = r#"
INSERT INTO everything VALUES
 (1, -32768, -2147483648, -9223372036854775808,
  'NaN', '-Infinity', 'NaN', -99999999.9999, false,
  '', '', '', '\x',
  '-infinity', '00:00', '00:00+14', '4713-01-01 BC 00:00', 'infinity', '-178000000 years',
  '00000000-0000-0000-0000-000000000000',
  '{ "spaced" :  [1, 2] , "dup": 1, "dup": 2 }', '{"a": {"b": [null, true, 1.50]}}',
  '{}', '{}', '{{1,2},{3,4}}',
  'sad', '{}', '::1', '10.0.0.0/8', '08:00:2b:01:02:03',
  B'', 'empty', '[,)', -92233720368547758.08, '(0,0)', '(,)',
  '<a/>', ''),
 (2, 32767, 2147483647, 9223372036854775807,
  3.4028235e38, 1.7976931348623157e308, 123456789012345678901234567890.123456789012345678901234567890, 0.0001, true,
  E'tab\there\nnewline \\ backslash "quote'' é 日本 🎉', 'x', 'ab', '\x00ff0d0a5c',
  '5874897-12-31', '24:00:00', '23:59:59.999999-12', '294276-12-31 23:59:59.999999', '2024-02-29 12:34:56.789012+05:30', '1 year 2 mons 3 days 04:05:06.789',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '"just a string"', '[]',
  '{1,NULL,3}', '{"a,b","c\"d",NULL,"NULL",""}', '{{NULL,2},{3,NULL}}',
  'happy', '{sad,happy}', '2001:db8::ff00:42:8329/64', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff',
  B'1010101010101010', '[1,10)', '["2020-01-01 00:00+00","2021-01-01 00:00+00")', 92233720368547758.07, '(-1.5,1e300)', '(7,"with ""quotes"" and , comma")',
  '<doc><x a="1">text &amp; more</x></doc>', 'a fat:1A cat:2B sat'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0, 0, '-0', 5e-324, '-0.000', 0, true,
  repeat('long text that will be toasted ', 5000), 'y', 'z', decode(repeat('deadbeef', 10000), 'hex'),
  '2000-01-01', '12:00', '12:00-00', '2000-01-01', '2000-01-01 00:00:00+00', '0',
  gen_random_uuid(), NULL, jsonb_build_object('big', repeat('j', 10000)),
  ARRAY(SELECT generate_series(1, 1000)), NULL, NULL,
  'ok', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"#;

#[tokio::test]
async fn every_type_survives_the_copy_exactly_and_the_reconciliation_is_printed() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(TYPES_SCHEMA).await;
    // A type that differs on the target: the copy uses the text format.
    pair.source
        .execute(
            "app",
            "CREATE TABLE widened (id int PRIMARY KEY, n int, s varchar(10));",
        )
        .await;
    pair.target
        .execute(
            "app",
            "CREATE TABLE widened (id bigint PRIMARY KEY, n bigint, s text);",
        )
        .await;
    pair.source.execute("app", TYPES_ROWS).await;
    pair.source.execute("app", BUILTIN_ROWS).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO widened SELECT g, g * 7, 'w' || g FROM generate_series(1, 500) g",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[copy]\nworkers = 2\n");

    let out = run_cutover(&["--config", config.to_str().unwrap(), "copy"], &[]);
    assert_eq!(out.code, 0, "cutover copy failed:\n{}", out.all_output());

    for table in ["everything", "nothing", "widened", "builtin"] {
        let (source, target) = pair.rows(table).await;
        assert_eq!(source, target, "{table} differs after the copy");
    }
    assert_eq!(pair.rows("everything").await.1.len(), 4);
    assert_eq!(pair.rows("builtin").await.1.len(), 4);
    // Both paths were taken: enums and composites go as text, built-in
    // types identical on both sides in binary.
    for (table, format) in [
        ("public.everything", "text"),
        ("public.widened", "text"),
        ("public.builtin", "binary"),
    ] {
        assert!(
            out.stderr.lines().any(|l| l.contains("table copied")
                && l.contains(&format!("table={table} "))
                && l.contains(&format!("format=\"{format}\""))),
            "{table} was not copied as {format}:\n{}",
            out.stderr
        );
    }
    // Bit-exact beyond the text form: binary images of the values.
    for table in ["everything", "builtin"] {
        let digest = format!(
            "SELECT md5(string_agg(textsend(t::text)::text || coalesce(encode(by, 'hex'), '-') || coalesce(float8send(f8)::text, '-') || coalesce(float4send(f4)::text, '-') || coalesce(numeric_send(num)::text, '-'), ',' ORDER BY id)) FROM {table} t"
        );
        let s: String = pair.source.query_value("app", &digest).await;
        let t: String = pair.target.query_value("app", &digest).await;
        assert_eq!(s, t, "binary images of {table} differ");
    }

    // The reconciliation: a header and one line per table with equal counts.
    let header = out
        .stdout
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no reconciliation printed:\n{}", out.all_output()));
    for column in [
        "table",
        "source rows",
        "copied",
        "target rows",
        "variance",
        "chunks",
    ] {
        assert!(header.contains(column), "header lacks {column}: {header}");
    }
    for (table, rows) in [
        ("public.everything", 4),
        ("public.nothing", 0),
        ("public.widened", 500),
        ("public.builtin", 4),
    ] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(table))
            .unwrap_or_else(|| panic!("no line for {table}:\n{}", out.stdout));
        let fields: Vec<&str> = line.split_whitespace().collect();
        // source rows, copied, rejected, expected, target rows, variance
        let rows = rows.to_string();
        assert_eq!(
            &fields[1..7],
            &[&rows, &rows, "0", &rows, &rows, "0"],
            "{line}"
        );
    }
    // The standalone copy leaves no slot behind on the source.
    let slots: i64 = pair
        .source
        .query_value("app", "SELECT count(*) FROM pg_replication_slots")
        .await;
    assert_eq!(slots, 0, "cutover copy left a replication slot");

    // A second copy onto the loaded target refuses to double the rows.
    let again_dir = tempfile::tempdir().unwrap();
    let again = pair.config(again_dir.path(), "");
    let out = run_cutover(&["--config", again.to_str().unwrap(), "copy"], &[]);
    assert_eq!(out.code, 1, "{}", out.all_output());
    assert!(
        out.stderr.contains("already hold rows") && out.stderr.contains("truncate_target"),
        "{}",
        out.stderr
    );
    assert_eq!(pair.rows("widened").await.1.len(), 500);
}

/// Waits until `cutover run` has finished its copy and streams. The rows
/// of the tables are equal as soon as they are loaded, but what
/// `copy.drop_indexes` dropped is all back only at the end of the copy
/// (a foreign key after both its tables are vacuumed and analyzed).
async fn copy_over(daemon: &Daemon) {
    wait_for(
        "the copy to finish and streaming to start",
        WAIT,
        || async { daemon.log().contains("to=\"streaming\"").then_some(()) },
    )
    .await;
}

/// The target's constraints matching `filter` (SQL on pg_constraint):
/// name and whether it is validated.
async fn target_constraints(pair: &Pair, filter: &str) -> Vec<(String, bool)> {
    pair.target
        .client("app")
        .await
        .query(
            &format!(
                "SELECT conname::text, convalidated FROM pg_constraint WHERE {filter} ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Every index of the public schema on `cluster`, with its definition and
/// whether it is the table's replica identity.
async fn index_definitions(cluster: &Cluster) -> Vec<String> {
    cluster
        .client("app")
        .await
        .query(
            "SELECT x.indexname::text || ': ' || x.indexdef
                    || CASE WHEN i.indisreplident THEN ' (replica identity)' ELSE '' END
               FROM pg_indexes x
               JOIN pg_index i ON i.indexrelid = (quote_ident(x.schemaname) || '.' || quote_ident(x.indexname))::regclass
              WHERE x.schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_large_table_is_split_into_chunks_that_several_workers_share() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE big (id bigint PRIMARY KEY, pad text);
         CREATE INDEX big_pad ON big (pad);
         ALTER TABLE big ADD CONSTRAINT big_id_positive CHECK (id > 0);
         CREATE TABLE child (id int PRIMARY KEY, big_id bigint CONSTRAINT child_big REFERENCES big (id));
         CREATE TABLE small_a (id int PRIMARY KEY);
         CREATE TABLE small_b (id int PRIMARY KEY);
         CREATE TABLE ident (id int NOT NULL, code text NOT NULL CONSTRAINT ident_code UNIQUE);
         CREATE UNIQUE INDEX ident_id ON ident (id);
         ALTER TABLE ident REPLICA IDENTITY USING INDEX ident_id;
         CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (1000);
         CREATE TABLE parted_high PARTITION OF parted FOR VALUES FROM (1000) TO (3000);
         CREATE INDEX parted_v ON parted (v);",
    )
    .await;
    let indexes_before = index_definitions(&pair.target).await;
    // A constraint the target holds NOT VALID stays so.
    pair.target
        .execute(
            "app",
            "ALTER TABLE small_a ADD CONSTRAINT small_a_lt CHECK (id < 100) NOT VALID",
        )
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO big SELECT g, md5(g::text) || repeat('x', 100) FROM generate_series(1, 60000) g;
             INSERT INTO small_a SELECT generate_series(1, 10);
             INSERT INTO child SELECT g, g * 3 FROM generate_series(1, 1000) g;
             INSERT INTO small_b SELECT generate_series(1, 3);
             INSERT INTO ident SELECT g, 'c' || g || repeat('-', 50) FROM generate_series(1, 20000) g;
             INSERT INTO parted SELECT g, md5(g::text) FROM generate_series(1, 2999) g;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        "[copy]\nworkers = 3\nchunk_mb = 1\ndrop_indexes = true\nanalyze = true\n",
    );
    let out = run_cutover(&["--config", config.to_str().unwrap(), "copy"], &[]);
    assert_eq!(out.code, 0, "{}", out.all_output());
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("public.big "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    let chunks: u64 = line.split_whitespace().nth(7).unwrap().parse().unwrap();
    assert!(chunks >= 5, "a ~10 MB table in 1 MB chunks: {line}");
    for table in ["big", "child", "small_a", "small_b", "ident", "parted"] {
        let (source, target) = pair.rows(table).await;
        assert_eq!(source, target, "{table}");
    }
    // The keys were dropped for the load too (big's, referenced by child's
    // foreign key, dropped first); the replica identity index was kept.
    let dropped = |table: &str| {
        out.stderr
            .lines()
            .find(|l| {
                l.contains("indexes and keys dropped")
                    && l.contains(&format!("table=public.{table} "))
            })
            .unwrap_or_else(|| panic!("no drop logged for {table}:\n{}", out.stderr))
            .to_owned()
    };
    assert!(
        dropped("big").contains("indexes=1 keys=1"),
        "{}",
        dropped("big")
    );
    assert!(
        dropped("ident").contains("indexes=0 keys=1"),
        "{}",
        dropped("ident")
    );
    // Every index, key and the replica identity are back as they were.
    assert_eq!(index_definitions(&pair.target).await, indexes_before);
    // The small tables were copied together, in one target transaction,
    // and kept their keys (nothing logged for them).
    assert!(
        !out.stderr
            .lines()
            .any(|l| l.contains("indexes and keys dropped") && l.contains("table=public.small_a ")),
        "a small table's keys were dropped:\n{}",
        out.stderr
    );
    let transactions: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(DISTINCT x) FROM (SELECT xmin::text AS x FROM small_a UNION ALL SELECT xmin::text FROM small_b
                UNION ALL SELECT xmin::text FROM child) t",
        )
        .await;
    assert_eq!(transactions, 1, "the small tables were not copied together");
    // CHECK and FOREIGN KEY constraints dropped for the load are back and
    // validated; the one that was NOT VALID is back as it was.
    let constraints = target_constraints(&pair, "contype IN ('c', 'f') AND conrelid <> 0").await;
    assert_eq!(
        constraints,
        vec![
            ("big_id_positive".to_string(), true),
            ("child_big".to_string(), true),
            ("small_a_lt".to_string(), false)
        ]
    );
    // The secondary index dropped for the load is back, and ANALYZE ran.
    let index: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'big_pad'",
        )
        .await;
    assert_eq!(index, 1, "the secondary index was not rebuilt");
    let analyzed: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'big' AND last_analyze IS NOT NULL",
        )
        .await;
    assert_eq!(analyzed, 1, "ANALYZE did not run");
}

/// Hundreds of small tables: copied many to a target transaction (at most
/// 256), each reconciled on its own.
#[tokio::test]
async fn many_small_tables_are_copied_many_to_a_transaction() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let tables: Vec<String> = (0..300).map(|i| format!("s{i:03}")).collect();
    let schema: String = tables
        .iter()
        .map(|t| format!("CREATE TABLE {t} (id int PRIMARY KEY, v text);"))
        .collect();
    pair.both(&schema).await;
    let rows: String = tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "INSERT INTO {t} SELECT g, '{t}' FROM generate_series(1, {}) g;",
                i % 7
            )
        })
        .collect();
    pair.source.execute("app", &rows).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[copy]\nworkers = 1\n");
    let out = run_cutover(&["--config", config.to_str().unwrap(), "copy"], &[]);
    assert_eq!(out.code, 0, "{}", out.all_output());
    let union = tables
        .iter()
        .map(|t| format!("SELECT xmin::text AS x, '{t}' AS t, id, v FROM {t}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let transactions: i64 = pair
        .target
        .query_value("app", &format!("SELECT count(DISTINCT x) FROM ({union}) u"))
        .await;
    assert_eq!(
        transactions, 2,
        "300 small tables, at most 256 to a transaction"
    );
    for table in &tables {
        let (source, target) = pair.rows(table).await;
        assert_eq!(source, target, "{table}");
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("public.{table} ")))
            .unwrap_or_else(|| panic!("{table} is not reconciled:\n{}", out.stdout));
        assert_eq!(line.split_whitespace().nth(6), Some("0"), "{line}");
    }
}

/// Writes on the source while `cutover run` copies: after catch-up both
/// sides are equal, with no write lost and none applied twice (the keyless
/// REPLICA IDENTITY FULL table would show a doubled row).
#[tokio::test]
async fn writes_made_during_the_copy_arrive_through_the_stream_exactly_once() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint, note text);
         CREATE TABLE ledger (account bigint, amount bigint, at timestamptz);
         ALTER TABLE ledger REPLICA IDENTITY FULL;",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO accounts SELECT g, 1000, repeat('n', 50) FROM generate_series(1, 200000) g;
             INSERT INTO ledger SELECT g % 1000, 1, '2024-01-01' FROM generate_series(1, 100000) g;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[copy]\nworkers = 2\nchunk_mb = 2\n");

    // The writer runs from before the slot exists until well after the
    // first chunk landed on the target, so its writes straddle the snapshot.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = pair.source.client("app").await;
        let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let id = (i * 7919) % 200000 + 1;
                client
                    .batch_execute(&format!(
                        "BEGIN;
                         UPDATE accounts SET balance = balance - 1 WHERE id = {id};
                         INSERT INTO ledger VALUES ({id}, -1, now());
                         DELETE FROM accounts WHERE id = {} ;
                         INSERT INTO accounts VALUES ({}, {i}, 'new') ON CONFLICT (id) DO UPDATE SET note = 'again';
                         DELETE FROM ledger WHERE ctid = (SELECT ctid FROM ledger WHERE account = {} LIMIT 1);
                         COMMIT;",
                        200000 - i,
                        300000 + i % 50,
                        i % 1000
                    ))
                    .await
                    .expect("the writer's transaction");
                i += 1;
                done.store(i as u64, Ordering::Relaxed);
            }
        })
    };
    wait_for("the writer to start", WAIT, || async {
        (done.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let mut daemon = Daemon::start(&config, &["run"]);
    wait_for("the first copied rows on the target", WAIT, || async {
        let rows: i64 = pair
            .target
            .query_value("app", "SELECT count(*) FROM accounts")
            .await;
        (rows > 0).then_some(())
    })
    .await;
    let seen = done.load(Ordering::Relaxed);
    wait_for("200 more writes", WAIT, || async {
        (done.load(Ordering::Relaxed) > seen + 200).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    pair.wait_equal(&["accounts", "ledger"], WAIT).await;
    assert!(daemon.running(), "the daemon stopped:\n{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "SIGTERM must exit 0");
}

/// SIGKILL in the middle of a large table, restart: the unfinished table is
/// emptied and copied again from a new snapshot, finished ones keep their
/// rows, and the stream fills the rest; no duplicates, no holes.
#[tokio::test]
async fn a_copy_killed_midway_resumes_without_duplicates_or_holes() {
    // Transactions past 64 kB are streamed by the server (protocol 2).
    let pair =
        Pair::start(ClusterOptions::default().setting("logical_decoding_work_mem", "64kB")).await;
    pair.both(
        "CREATE TABLE events (kind int, payload text);
         ALTER TABLE events REPLICA IDENTITY FULL;
         CREATE TABLE tiny (id int PRIMARY KEY, v int);",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO events SELECT g % 10, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g;
             INSERT INTO tiny SELECT generate_series(1, 100), 0;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[copy]\nworkers = 1\nchunk_mb = 4\n");
    let mut daemon = Daemon::start(&config, &["run"]);
    // Some chunks of events committed on the target, not all of them.
    wait_for("part of the events table on the target", WAIT, || async {
        (target_rows(&pair, "events").await > 0).then_some(())
    })
    .await;
    // Writes between the first snapshot and the restart, to both tables.
    pair.source
        .execute(
            "app",
            "INSERT INTO events SELECT 99, 'during' FROM generate_series(1, 50);
             DELETE FROM events WHERE kind = 3 AND payload < '1';
             UPDATE tiny SET v = v + 1 WHERE id <= 10;",
        )
        .await;
    daemon.kill();
    let partial = target_rows(&pair, "events").await;
    assert!(
        partial < 400_000,
        "the copy finished before the kill; make events bigger"
    );
    pair.source
        .execute(
            "app",
            "INSERT INTO events SELECT 100, 'while down' FROM generate_series(1, 50);
             UPDATE tiny SET v = v + 1 WHERE id > 90;",
        )
        .await;
    // A streamed transaction that empties and refills tiny, then a row
    // after it: both are in tiny's new snapshot, so the stream must skip
    // the TRUNCATE for tiny, or it would wipe that row.
    pair.source
        .execute(
            "app",
            "BEGIN;
             TRUNCATE tiny;
             INSERT INTO tiny SELECT g, -1 FROM generate_series(1, 5000) g;
             COMMIT;
             INSERT INTO tiny VALUES (9999, 9999);",
        )
        .await;
    daemon.restart();
    pair.source
        .execute("app", "INSERT INTO events VALUES (101, 'after restart')")
        .await;
    pair.wait_equal(&["events", "tiny"], WAIT).await;
    assert!(
        daemon.log().contains("resuming the copy"),
        "the restart did not resume:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0));
    // Only the daemon's own slot is left; the resume's temporary one is gone.
    let slots: Vec<String> = pair
        .source
        .client("app")
        .await
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, vec!["cutover".to_string()]);
}

/// `copy.drop_indexes`: killed while a table loads without its keys and
/// indexes, the restarted daemon copies it again and puts every one back
/// before it streams (the upserts need the key).
#[tokio::test]
async fn a_copy_killed_with_its_indexes_dropped_rebuilds_them_on_resume() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE parent (id bigint PRIMARY KEY, pad text);
         CREATE INDEX parent_pad ON parent (pad);
         CREATE TABLE kid (id int PRIMARY KEY, parent_id bigint CONSTRAINT kid_parent REFERENCES parent (id),
                           CONSTRAINT kid_positive CHECK (id > 0));",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO parent SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 300000) g;
             INSERT INTO kid SELECT g, g FROM generate_series(1, 1000) g;",
        )
        .await;
    let before = index_definitions(&pair.target).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        "[copy]\nworkers = 1\nchunk_mb = 4\ndrop_indexes = true\n",
    );
    let mut daemon = Daemon::start(&config, &["run"]);
    wait_for("part of the parent table on the target", WAIT, || async {
        (target_rows(&pair, "parent").await > 0).then_some(())
    })
    .await;
    daemon.kill();
    assert!(
        target_rows(&pair, "parent").await < 300_000,
        "the copy finished before the kill; make parent bigger"
    );
    let during = index_definitions(&pair.target).await;
    assert!(
        !during.iter().any(|i| i.starts_with("parent_pkey:")),
        "the key was not dropped for the load: {during:?}"
    );
    pair.source
        .execute(
            "app",
            "UPDATE parent SET pad = 'changed' WHERE id <= 10;
             INSERT INTO kid VALUES (1001, 5);",
        )
        .await;
    daemon.restart();
    copy_over(&daemon).await;
    pair.wait_equal(&["parent", "kid"], WAIT).await;
    assert_eq!(index_definitions(&pair.target).await, before);
    let constraints = target_constraints(&pair, "conrelid = 'kid'::regclass").await;
    assert_eq!(
        constraints,
        vec![
            ("kid_parent".to_string(), true),
            ("kid_pkey".to_string(), true),
            ("kid_positive".to_string(), true)
        ]
    );
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

/// `copy.drop_indexes`: a foreign key is added back and validated as soon
/// as its two tables are copied, while other tables still load (here one
/// held by a lock on the target), not once every table is.
#[tokio::test]
async fn a_foreign_key_is_validated_as_soon_as_both_its_tables_are_copied() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE parent (id bigint PRIMARY KEY, pad text);
         CREATE TABLE kid (id bigint PRIMARY KEY,
                           parent_id bigint CONSTRAINT kid_parent REFERENCES parent (id), pad text);
         CREATE TABLE held (n int, body text);
         ALTER TABLE held REPLICA IDENTITY FULL;
         ALTER TABLE held ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO parent SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
             INSERT INTO kid SELECT g, 1 + g % 20000, md5(g::text) FROM generate_series(1, 20000) g;
             INSERT INTO held SELECT g, repeat(md5(g::text), 300) FROM generate_series(1, 100) g;",
        )
        .await;
    // The load of `held` (no index: loaded last) waits for this lock,
    // which lets the copy read the table but not write it.
    let mut lock = pair.target.client("app").await;
    let holding = lock.transaction().await.unwrap();
    holding
        .batch_execute("LOCK TABLE held IN SHARE MODE")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        "[copy]\nworkers = 2\nchunk_mb = 1\ndrop_indexes = true\n",
    );
    let mut daemon = Daemon::start(&config, &["copy"]);
    wait_for("kid_parent dropped for the load", WAIT, || async {
        daemon
            .log()
            .contains("CHECK and FOREIGN KEY constraints dropped for the load")
            .then_some(())
    })
    .await;
    wait_for("kid_parent validated while held waits", WAIT, || async {
        let constraints = target_constraints(&pair, "conname = 'kid_parent'").await;
        (constraints == vec![("kid_parent".to_string(), true)]).then_some(())
    })
    .await;
    assert_eq!(target_rows(&pair, "held").await, 0);
    assert!(daemon.running(), "{}", daemon.log());
    holding.rollback().await.unwrap();
    assert_eq!(daemon.wait(WAIT), Some(0), "{}", daemon.log());
    pair.wait_equal(&["parent", "kid", "held"], WAIT).await;
    assert_eq!(
        target_constraints(&pair, "conrelid IN ('kid'::regclass, 'parent'::regclass)").await,
        vec![
            ("kid_parent".to_string(), true),
            ("kid_pkey".to_string(), true),
            ("parent_pkey".to_string(), true)
        ]
    );
    // The two tables of the foreign key were vacuumed and analyzed before
    // it was validated (so that the check reads their indexes); `held`,
    // in no foreign key, was not (`analyze` is off).
    let maintained: Vec<(String, bool, bool)> = pair
        .target
        .client("app")
        .await
        .query(
            "SELECT relname::text, last_vacuum IS NOT NULL, last_analyze IS NOT NULL
               FROM pg_stat_user_tables ORDER BY relname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        maintained,
        vec![
            ("held".to_string(), false, false),
            ("kid".to_string(), true, true),
            ("parent".to_string(), true, true)
        ]
    );
}

/// `copy.drop_indexes`: killed after a key's index was built but before
/// the key was attached to it (the attach waits for a reader's lock), the
/// restarted daemon drops that index for the new load like the key, and
/// ends with the key and indexes exactly as they were.
#[tokio::test]
async fn a_key_index_built_but_not_attached_before_a_kill_is_rebuilt_as_the_key() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE parent (id bigint PRIMARY KEY, pad text);
         CREATE INDEX parent_pad ON parent (pad);",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO parent SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 200000) g",
        )
        .await;
    let before = index_definitions(&pair.target).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        "[copy]\nworkers = 2\nchunk_mb = 4\ndrop_indexes = true\n",
    );
    let mut daemon = Daemon::start(&config, &["run"]);
    wait_for("the key dropped for the load", WAIT, || async {
        daemon
            .log()
            .contains("indexes and keys dropped for the load")
            .then_some(())
    })
    .await;
    // A reader's lock: the load and the index builds go on, attaching
    // the key (ACCESS EXCLUSIVE) waits.
    let mut reader = pair.target.client("app").await;
    let reading = reader.transaction().await.unwrap();
    reading
        .batch_execute("LOCK TABLE parent IN ACCESS SHARE MODE")
        .await
        .unwrap();
    wait_for(
        "the key's index built, the key not attached",
        WAIT,
        || async {
            let built: i64 = pair
                .target
                .query_value(
                    "app",
                    "SELECT count(*) FROM pg_class WHERE relname = 'parent_pkey'",
                )
                .await;
            let attached = target_constraints(&pair, "conname = 'parent_pkey'").await;
            (built == 1 && attached.is_empty()).then_some(())
        },
    )
    .await;
    daemon.kill();
    reading.rollback().await.unwrap();
    pair.source
        .execute("app", "UPDATE parent SET pad = 'changed' WHERE id <= 10")
        .await;
    daemon.restart();
    copy_over(&daemon).await;
    pair.wait_equal(&["parent"], WAIT).await;
    assert_eq!(index_definitions(&pair.target).await, before);
    assert_eq!(
        target_constraints(&pair, "conrelid = 'parent'::regclass").await,
        vec![("parent_pkey".to_string(), true)]
    );
    let log = daemon.log();
    assert!(log.contains("resuming the copy"), "{log}");
    // Both starts dropped (and recorded) one index and one key: the
    // second did not take the key's index for an index of its own.
    assert_eq!(
        log.matches("indexes and keys dropped for the load table=public.parent indexes=1 keys=1")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{log}");
}

/// A table finished before the kill that references (by a foreign key on
/// the target) a table still unfinished is copied again with it: the
/// unfinished one cannot be emptied while the other keeps its rows.
#[tokio::test]
async fn a_resumed_copy_recopies_finished_tables_that_reference_unfinished_ones() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text);
         CREATE TABLE entries (id bigint PRIMARY KEY, account bigint REFERENCES accounts, memo text);",
    )
    .await;
    // entries is the bigger table, so it is copied (and finished) first.
    pair.source
        .execute(
            "app",
            "INSERT INTO accounts SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 300000) g;
             INSERT INTO entries SELECT g, 1 + g % 300000, repeat(md5(g::text), 3) FROM generate_series(1, 400000) g;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "[copy]\nworkers = 1\nchunk_mb = 4\n");
    let mut daemon = Daemon::start(&config, &["run"]);
    // Finished means counted and marked in the state, which the log says.
    wait_for("entries copied and accounts begun", WAIT, || async {
        (daemon.log().contains("table copied table=public.entries ")
            && target_rows(&pair, "accounts").await > 0)
            .then_some(())
    })
    .await;
    daemon.kill();
    let (entries, accounts) = (
        target_rows(&pair, "entries").await,
        target_rows(&pair, "accounts").await,
    );
    assert_eq!(entries, 400_000, "entries was not finished before the kill");
    assert!(accounts < 300_000, "accounts finished before the kill");
    pair.source
        .execute("app", "UPDATE entries SET memo = 'moved' WHERE id <= 10")
        .await;
    daemon.restart();
    pair.wait_equal(&["accounts", "entries"], WAIT).await;
    let log = daemon.log();
    assert!(
        log.contains("copied again: it references a table that is copied again"),
        "{log}"
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{log}");
}

/// A finished standalone load cannot be streamed from: `run` says so.
#[tokio::test]
async fn run_after_a_standalone_copy_explains_why_it_cannot_stream() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE t (id int PRIMARY KEY);").await;
    pair.source.execute("app", "INSERT INTO t VALUES (1)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let out = run_cutover(&["--config", config.to_str().unwrap(), "copy"], &[]);
    assert_eq!(out.code, 0, "{}", out.all_output());
    let out = run_cutover(&["--config", config.to_str().unwrap(), "run"], &[]);
    assert_eq!(out.code, 1, "{}", out.all_output());
    assert!(out.stderr.contains("cutover copy"), "{}", out.stderr);
}

/// The rows a chunk reports while it flows add up to the exact count the
/// target returns, in both formats and for an empty table, and they come
/// before the end: a watched copy does not sit at 0 rows for a whole chunk.
#[tokio::test]
async fn a_chunk_reports_its_rows_while_it_flows_and_they_add_up() {
    use cutover_replication::catalog::TableName;
    use cutover_replication::snapshot::{Chunk, CopyFormat, copy_chunk};
    let cluster = Cluster::start_with(ClusterOptions::default());
    for db in ["src", "dst"] {
        cluster.create_database(db).await;
        cluster
            .execute(
                db,
                "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE e (id int PRIMARY KEY, v text);",
            )
            .await;
    }
    // About 3 MB: a dozen forwarded messages of 256 KiB.
    cluster
        .execute(
            "src",
            "INSERT INTO t SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 30000) g",
        )
        .await;
    let source = cluster.client("src").await;
    let mut target = cluster.client("dst").await;
    let columns = vec!["id".to_owned(), "v".to_owned()];
    for format in [CopyFormat::Binary, CopyFormat::Text] {
        for (table, expected) in [("t", 30_000u64), ("e", 0)] {
            target
                .batch_execute(&format!("TRUNCATE {table}"))
                .await
                .unwrap();
            let name = TableName::new("public", table);
            let chunk = Chunk {
                table: name.clone(),
                source: name,
                first_page: 0,
                end_page: None,
                index: 0,
                pages: 0,
            };
            let mut reports: Vec<u64> = Vec::new();
            let stats = copy_chunk(&source, &mut target, &chunk, &columns, format, |_, rows| {
                reports.push(rows)
            })
            .await
            .unwrap();
            assert_eq!(stats.rows, expected, "{table} in {}", format.name());
            assert_eq!(
                reports.iter().sum::<u64>(),
                expected,
                "rows reported while {table} flowed in {}: {reports:?}",
                format.name()
            );
            if expected > 0 {
                assert!(
                    reports.len() > 5 && reports[0] > 0 && reports[0] < expected,
                    "rows come as the data flows, not at the end: {reports:?}"
                );
            }
        }
    }
}
