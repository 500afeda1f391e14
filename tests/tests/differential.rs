//! The randomized differential test: random transactions over every table
//! shape on the source while `cutover run` streams and is killed at random
//! moments; at the end every table is compared row by row.
//!
//! `CUTOVER_DIFF_SEED` replays a seed (a failure prints the one it ran);
//! `CUTOVER_DIFF_TRANSACTIONS` sets how many transactions run (a few
//! hundred by default, as `make test` runs it; thousands for a long run).

use std::time::Duration;

use cutover_tests::{ClusterOptions, Daemon, Pair};

const WAIT: Duration = Duration::from_secs(300);

/// xorshift64*: small, seeded, the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const SCHEMA: &str = "
CREATE TABLE plain (id int PRIMARY KEY, v text, n int);
CREATE TABLE composite (a int, b text, v int, PRIMARY KEY (a, b));
CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE, v text);
ALTER TABLE deferred REPLICA IDENTITY FULL;
CREATE TABLE keyless (x int, y text);
ALTER TABLE keyless REPLICA IDENTITY FULL;
CREATE TABLE parted (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE parted_a PARTITION OF parted FOR VALUES IN ('a');
CREATE TABLE parted_b PARTITION OF parted FOR VALUES IN ('b');
CREATE TABLE parted_rest PARTITION OF parted DEFAULT;
CREATE TABLE ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text, len int GENERATED ALWAYS AS (length(v)) STORED);
CREATE TABLE toasty (id int PRIMARY KEY, body text, n int);
ALTER TABLE toasty ALTER COLUMN body SET STORAGE EXTERNAL;";

const TABLES: &[&str] = &[
    "plain",
    "composite",
    "deferred",
    "keyless",
    "parted",
    "ident",
    "toasty",
];

/// One random statement on one table.
fn statement(rng: &mut Rng) -> String {
    let k = rng.below(60) + 1;
    let j = rng.below(60) + 1;
    let n = rng.below(1_000_000);
    match rng.below(24) {
        0 | 1 => format!(
            "INSERT INTO plain VALUES ({k}, 'p{n}', {n}) ON CONFLICT (id) DO UPDATE SET v = excluded.v"
        ),
        2 => format!(
            "UPDATE plain SET n = n + 1, v = 'u{n}' WHERE id % 7 = {}",
            k % 7
        ),
        3 => format!("DELETE FROM plain WHERE id = {k}"),
        // A key change; fails (and the transaction with it) on a collision.
        4 => format!("UPDATE plain SET id = {} WHERE id = {k}", k + 100),
        5 => format!(
            "INSERT INTO composite VALUES ({k}, '{}', {n}) ON CONFLICT DO NOTHING",
            rng.pick(&["x", "y", "z"])
        ),
        6 => format!("UPDATE composite SET b = b || '!' WHERE a = {k} AND length(b) < 4"),
        7 => format!("DELETE FROM composite WHERE a = {k}"),
        // ON CONFLICT cannot arbitrate on a deferrable key.
        8 => format!(
            "INSERT INTO deferred SELECT {k}, 'd{n}' WHERE NOT EXISTS (SELECT 1 FROM deferred WHERE id = {k})"
        ),
        // Swap two keys, shift a block by one, rotate three.
        9 => format!(
            "UPDATE deferred SET id = CASE id WHEN {k} THEN {j} ELSE {k} END WHERE id IN ({k}, {j}) AND {k} <> {j}"
        ),
        10 => format!(
            "UPDATE deferred SET id = id + 1 WHERE id BETWEEN {k} AND {k} + 5 AND NOT EXISTS (SELECT 1 FROM deferred WHERE id = {k} + 6)"
        ),
        11 => format!(
            "UPDATE deferred SET id = CASE id WHEN {k} THEN {k} + 1 WHEN {k} + 1 THEN {k} + 2 ELSE {k} END, v = v || '*' WHERE id IN ({k}, {k} + 1, {k} + 2)"
        ),
        12 => format!("DELETE FROM deferred WHERE id = {k}"),
        13 => format!("INSERT INTO keyless VALUES ({k}, 'k{n}'), ({k}, 'k{n}')"),
        14 => format!(
            "UPDATE keyless SET y = y || '+' WHERE ctid = (SELECT ctid FROM keyless WHERE x = {k} LIMIT 1)"
        ),
        15 => format!(
            "DELETE FROM keyless WHERE ctid = (SELECT ctid FROM keyless WHERE x = {k} LIMIT 1)"
        ),
        16 => format!(
            "INSERT INTO parted VALUES ({k}, '{}', 'r{n}') ON CONFLICT DO NOTHING",
            rng.pick(&["a", "b", "c", "d"])
        ),
        // Moves rows across partitions.
        17 => format!(
            "UPDATE parted SET region = '{}' WHERE id = {k} AND NOT EXISTS (SELECT 1 FROM parted WHERE id = {k} AND region = '{}')",
            rng.pick(&["a", "b", "c"]),
            "c"
        ),
        18 => format!("DELETE FROM parted WHERE id = {k}"),
        19 => format!("INSERT INTO ident (v) VALUES ('i{n}')"),
        20 => format!("UPDATE ident SET id = DEFAULT WHERE id % 11 = {}", k % 11),
        21 => format!("UPDATE ident SET v = v || 'x' WHERE id % 5 = {}", k % 5),
        22 => format!(
            "INSERT INTO toasty VALUES ({k}, (SELECT string_agg(md5(g::text || '{n}'), '') FROM generate_series(1, 100) g), 0) ON CONFLICT (id) DO UPDATE SET n = toasty.n + 1"
        ),
        // The TOASTed body unchanged: by a plain update and a key change.
        _ => {
            if rng.chance(50) {
                format!("UPDATE toasty SET n = n + 1 WHERE id = {k}")
            } else {
                format!(
                    "UPDATE toasty SET id = {} WHERE id = {k} AND NOT EXISTS (SELECT 1 FROM toasty WHERE id = {})",
                    k + 200,
                    k + 200
                )
            }
        }
    }
}

/// One random transaction: a few statements, sometimes with a savepoint
/// rolled back, a truncate, or a large bulk that is streamed while in
/// progress.
fn transaction(rng: &mut Rng) -> String {
    let mut sql = String::from("BEGIN;");
    for _ in 0..=rng.below(4) {
        sql.push_str(&statement(rng));
        sql.push(';');
    }
    if rng.chance(10) {
        sql.push_str("SAVEPOINT s;");
        sql.push_str(&statement(rng));
        sql.push(';');
        sql.push_str("ROLLBACK TO SAVEPOINT s;");
        sql.push_str(&statement(rng));
        sql.push(';');
    }
    if rng.chance(3) {
        let table = rng.pick(&["plain", "keyless", "parted_b", "parted", "composite"]);
        sql.push_str(&format!("TRUNCATE {table};"));
    }
    if rng.chance(2) {
        let base = 10_000 + rng.below(1_000) * 10_000;
        sql.push_str(&format!(
            "INSERT INTO plain SELECT g, repeat('bulk', 10), g FROM generate_series({base}, {base} + 3000) g ON CONFLICT DO NOTHING;
             INSERT INTO keyless SELECT g, 'bulk' FROM generate_series(1, 2000) g;
             DELETE FROM plain WHERE id BETWEEN {base} AND {base} + 1000;"
        ));
    }
    sql.push_str("COMMIT;");
    sql
}

#[tokio::test]
async fn random_transactions_over_every_table_shape_end_equal_across_kills() {
    let seed: u64 = std::env::var("CUTOVER_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    let count: u64 = std::env::var("CUTOVER_DIFF_TRANSACTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    eprintln!(
        "differential: seed {seed}, {count} transactions (CUTOVER_DIFF_SEED={seed} replays it)"
    );
    let mut rng = Rng(seed);

    let pair =
        Pair::start(ClusterOptions::default().setting("logical_decoding_work_mem", "64kB")).await;
    pair.both(SCHEMA).await;
    // Rows before the copy, so that the seam is crossed too.
    let source = pair.source.client("app").await;
    for _ in 0..20 {
        let _ = source.batch_execute(&transaction(&mut rng)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        "[apply]\nbatch_rows = 200\nqueue_transactions = 50\n",
    );
    let mut daemon = Daemon::start(&config, &["run"]);
    let (mut committed, mut failed, mut kills) = (0u64, 0u64, 0u64);
    for _ in 0..count {
        let sql = transaction(&mut rng);
        match source.batch_execute(&sql).await {
            Ok(()) => committed += 1,
            Err(_) => {
                // A collision the source refused: the transaction is gone.
                let _ = source.batch_execute("ROLLBACK").await;
                failed += 1;
            }
        }
        if rng.chance(3) {
            daemon.kill();
            kills += 1;
            daemon.restart();
        }
    }
    eprintln!(
        "differential: seed {seed}: {committed} committed, {failed} refused by the source, {kills} kills"
    );
    let tables: Vec<&str> = TABLES.to_vec();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if !daemon.running() {
            panic!("seed {seed}: the daemon stopped:\n{}", daemon.log());
        }
        let mut equal = true;
        for table in &tables {
            let (source, target) = pair.rows(table).await;
            if source != target {
                equal = false;
                break;
            }
        }
        if equal {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let log = daemon.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "seed {seed}: the daemon's last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            pair.wait_equal(&tables, Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sizes = Vec::new();
    for table in TABLES {
        sizes.push(format!(
            "{table} {}",
            cutover_tests::table_rows(&pair.target, table).await.len()
        ));
    }
    eprintln!("differential: seed {seed}: equal: {}", sizes.join(", "));
    let duplicates: i64 = pair
        .target
        .query_value(
            "app",
            "SELECT count(*) FROM (SELECT id FROM deferred GROUP BY id HAVING count(*) > 1) d",
        )
        .await;
    assert_eq!(duplicates, 0, "seed {seed}: duplicate keys on the target");
    assert!(daemon.running(), "seed {seed}:\n{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "seed {seed}");
}
