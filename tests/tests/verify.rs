//! `cutover verify` against real servers: under a concurrent write load it
//! reports no difference, time after time; every kind of difference made
//! on the target behind cutover's back is found with its key and column;
//! a target column of a wider type compares equal.

use std::time::Duration;

use cutover_tests::{ClusterOptions, Daemon, Outcome, Pair, Writer, run_cutover};

const WAIT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance int, note text);
ALTER TABLE accounts ALTER COLUMN note SET STORAGE EXTERNAL;
CREATE TABLE codes (code text COLLATE \"C\" PRIMARY KEY, label text);
CREATE TABLE audit (at int, what text);";

const SEED: &str = "
INSERT INTO accounts SELECT g, 'owner' || g, g * 10, CASE WHEN g % 10 = 0 THEN repeat('n', 4000) END
  FROM generate_series(1, 2000) g;
INSERT INTO codes SELECT 'c' || g, 'label' || g FROM generate_series(1, 300) g;
INSERT INTO codes VALUES ('Zed', 'upper'), ('a b', 'space'), (E'tab\\there', 'tab');
INSERT INTO audit SELECT g % 50, 'seen' FROM generate_series(1, 400) g;";

/// Updates, inserts and deletes on every table, some in multi-statement
/// transactions: the `n`th transaction of a writer.
fn load(n: u64) -> String {
    let id = 1 + n % 2500;
    match n % 5 {
        0 => format!(
            "INSERT INTO accounts VALUES ({id}, 'w{n}', {n}, NULL) ON CONFLICT (id) DO UPDATE SET balance = excluded.balance"
        ),
        1 => format!("UPDATE accounts SET balance = balance + 1 WHERE id = {id}"),
        2 => format!(
            "BEGIN; DELETE FROM accounts WHERE id = {id}; INSERT INTO audit VALUES ({n}, 'deleted'); COMMIT;"
        ),
        3 => format!(
            "UPDATE codes SET label = 'l{n}' WHERE code = 'c{}'",
            n % 300
        ),
        _ => format!(
            "BEGIN; INSERT INTO audit VALUES ({n}, 'x'); UPDATE accounts SET note = repeat('m', 3000) WHERE id = {id}; COMMIT;"
        ),
    }
}

/// Two servers with the schema, and the seed rows on the source.
async fn seeded() -> (Pair, tempfile::TempDir) {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.source.execute("app", SCHEMA).await;
    pair.target.execute("app", SCHEMA).await;
    pair.on_source(SEED).await;
    (pair, tempfile::tempdir().unwrap())
}

/// Schema on both sides, seed rows on the source, the copy done and the
/// stream caught up, then the daemon stopped: a migration ready to verify.
async fn migrated(pair: &Pair, dir: &std::path::Path, target_schema: &str) -> std::path::PathBuf {
    pair.source.execute("app", SCHEMA).await;
    pair.target.execute("app", target_schema).await;
    pair.on_source(SEED).await;
    let config = pair.config(dir, "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["accounts", "codes", "audit"], WAIT)
        .await;
    config
}

/// A `cutover verify` in the background, to be killed with SIGKILL.
struct Killable(std::process::Child);

impl Killable {
    fn verify(config: &std::path::Path) -> Killable {
        Killable(
            std::process::Command::new(cutover_tests::cli::cutover_bin())
                .args(["--config", config.to_str().unwrap(), "verify"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start cutover verify"),
        )
    }

    fn kill(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = self.0.wait();
    }
}

/// One table's entry in a verify report.
fn table_of(report: &serde_json::Value, name: &str) -> serde_json::Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("{name} in {report}"))
        .clone()
}

fn verify(config: &std::path::Path, format: &str) -> Outcome {
    verify_with(config, &["--format", format])
}

fn verify_with(config: &std::path::Path, args: &[&str]) -> Outcome {
    let mut all = vec!["--config", config.to_str().unwrap(), "verify"];
    all.extend_from_slice(args);
    run_cutover(&all, &[])
}

#[tokio::test]
async fn a_verify_under_concurrent_writes_reports_no_difference_time_after_time() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = migrated(&pair, dir.path(), SCHEMA).await;
    let writer = Writer::start(&pair, 0, load).await;
    let mut positions = Vec::new();
    for round in 0..4 {
        // Off the test's thread, so that the writer keeps writing.
        let path = config.clone();
        let outcome = tokio::task::spawn_blocking(move || verify(&path, "json"))
            .await
            .unwrap();
        assert_eq!(
            outcome.code,
            0,
            "round {round}: verify found a difference under load:\n{}",
            outcome.all_output()
        );
        let report: serde_json::Value = serde_json::from_str(&outcome.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", outcome.all_output()));
        assert_eq!(report["status"], "VALIDATED", "{}", outcome.stdout);
        assert_eq!(report["tables_verified"], 3);
        assert_eq!(report["differing_rows"], 0);
        assert!(report["total_source_rows"].as_u64().unwrap() > 2000);
        positions.push(report["lsn"].as_str().unwrap().to_owned());
    }
    let writes = writer.stop().await;
    assert!(writes > 50, "the writer made only {writes} transactions");
    // Each verify compared a later position: the load went on meanwhile.
    let mut sorted = positions.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), positions.len(), "{positions:?}");
    let saved = std::fs::read_to_string(dir.path().join("state/validation_report.json"))
        .expect("validation_report.json in the state directory");
    assert!(saved.contains("\"status\": \"VALIDATED\""), "{saved}");
}

#[tokio::test]
async fn each_difference_made_on_the_target_is_found_with_its_key_and_column() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = migrated(&pair, dir.path(), SCHEMA).await;
    // Behind cutover's back, on the target only.
    pair.target
        .execute(
            "app",
            "DELETE FROM accounts WHERE id = 17;
             INSERT INTO accounts VALUES (999999, 'ghost', 0, NULL);
             UPDATE accounts SET balance = -1 WHERE id = 42;
             UPDATE accounts SET note = repeat('x', 4000) WHERE id = 50;
             UPDATE codes SET label = 'tampered' WHERE code = E'tab\\there';
             INSERT INTO audit VALUES (3, 'seen');",
        )
        .await;
    let outcome = verify(&config, "human");
    let out = outcome.all_output();
    assert_eq!(outcome.code, 1, "{out}");
    for expected in [
        "missing on target: (id=17)",
        "extra on target: (id=999999)",
        "changed: (id=42) in balance",
        "changed: (id=50) in note",
        "changed: (code=tab\there) in label",
        "extra on target: (at=3, what=seen)",
        "FAILED: 6 rows differ",
    ] {
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
    }
    let json = verify(&config, "json");
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(report["status"], "FAILED");
    let accounts = table_of(&report, "public.accounts");
    assert_eq!(
        (
            accounts["missing"].as_u64(),
            accounts["extra"].as_u64(),
            accounts["changed"].as_u64()
        ),
        (Some(1), Some(1), Some(2))
    );
    assert_ne!(accounts["source_checksum"], accounts["target_checksum"]);

    // --repair writes exactly the differing rows, at the compared position.
    let target = pair.target.client("app").await;
    let xmin = "SELECT xmin::text FROM accounts WHERE id = 1";
    let before: String = target.query_one(xmin, &[]).await.unwrap().get(0);
    let repaired = verify_with(&config, &["--repair"]);
    let out = repaired.all_output();
    assert_eq!(repaired.code, 0, "{out}");
    for expected in [
        "repaired: inserted (id=17)",
        "repaired: deleted (id=999999)",
        "repaired: updated (id=42)",
        "repaired: updated (id=50)",
        "repaired: updated (code=tab\there)",
        "repaired: deleted (at=3, what=seen)",
        "REPAIRED: 6 differing rows",
    ] {
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
    }
    let after: String = target.query_one(xmin, &[]).await.unwrap().get(0);
    assert_eq!(after, before, "an equal row was written");
    let again = verify(&config, "json");
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(report["status"], "VALIDATED", "{}", again.all_output());
    // The repair carried cutover's origin, recorded at the compared
    // position: streaming goes on from there, nothing applied twice.
    let origin: Option<String> = pair
        .target
        .client("app")
        .await
        .query_one(
            "SELECT pg_replication_origin_progress('cutover_cutover', false)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let repaired_at = out
        .split("as of source LSN ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the compared LSN in the output");
    assert_eq!(origin.as_deref(), Some(repaired_at), "{out}");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source(
        "UPDATE accounts SET balance = 7 WHERE id <= 100; INSERT INTO audit VALUES (4, 'later');",
    )
    .await;
    pair.finish(&mut daemon, &["accounts", "codes", "audit"], WAIT)
        .await;
}

#[tokio::test]
async fn chunks_and_their_groups_find_every_difference_in_a_table_of_many_chunks() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Sparse keys from negative to positive over three chunks of 20,000
    // rows; a composite key whose first column barely changes; keys a
    // thousand apart; a case-insensitive column beside one of another
    // collation.
    pair.both(
        "CREATE TABLE sparse (id bigint PRIMARY KEY, a text, b text, n int, m int);
         CREATE TABLE pairs (k1 int, k2 bigint, v text, PRIMARY KEY (k1, k2));
         CREATE TABLE spaced (id bigint PRIMARY KEY, v int);
         CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE emails (id int PRIMARY KEY, email text COLLATE ci, code text COLLATE \"C\");",
    )
    .await;
    pair.on_source(
        "INSERT INTO sparse SELECT g * 7 - 200000, 'a' || g, 'b' || g, g, g FROM generate_series(1, 60000) g;
         UPDATE sparse SET a = 'x', b = ',y' WHERE id = 7 * 30000 - 200000;
         UPDATE sparse SET a = NULL, b = '' WHERE id = 7 * 40000 - 200000;
         UPDATE sparse SET n = NULL, m = 5 WHERE id = 7 * 50000 - 200000;
         INSERT INTO pairs SELECT g % 3, g, 'v' || g FROM generate_series(1, 45000) g;
         INSERT INTO spaced SELECT g * 1000, g FROM generate_series(1, 1500) g;
         INSERT INTO emails VALUES (1, 'Bob@x.io', 'a'), (2, 'ann@x.io', 'b');",
    )
    .await;
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["sparse", "pairs", "spaced", "emails"], WAIT)
        .await;
    // Behind cutover's back: the table's first row and the last of the
    // first chunk gone, the first of the second changed; rows before the
    // first key, in a gap between keys and after the last; and changes a
    // server's checksum must not miss: a comma moved from one field to
    // the next, NULL and the empty text swapped, NULL moved between two
    // integer columns.
    pair.target
        .execute(
            "app",
            "DELETE FROM sparse WHERE id IN (7 - 200000, 7 * 20000 - 200000);
             UPDATE sparse SET n = -1 WHERE id = 7 * 20001 - 200000;
             INSERT INTO sparse VALUES (-500000, 'before', NULL, 0, 0), (3, 'gap', NULL, 0, 0), (999999, 'after', NULL, 0, 0);
             UPDATE sparse SET a = 'x,', b = 'y' WHERE id = 7 * 30000 - 200000;
             UPDATE sparse SET a = '', b = NULL WHERE id = 7 * 40000 - 200000;
             UPDATE sparse SET n = 5, m = NULL WHERE id = 7 * 50000 - 200000;
             UPDATE pairs SET v = 'changed' WHERE (k1, k2) = (1, 30001);
             DELETE FROM pairs WHERE (k1, k2) = (2, 44999);
             UPDATE spaced SET v = -v WHERE id <= 1200000;
             UPDATE emails SET email = 'bob@x.io' WHERE id = 1;",
        )
        .await;
    let outcome = verify(&config, "json");
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    let report: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    let table = |name: &str| table_of(&report, name);
    let counts = |t: &serde_json::Value| {
        ["source_rows", "missing", "extra", "changed"].map(|k| t[k].as_u64().unwrap())
    };
    assert_eq!(
        counts(&table("public.sparse")),
        [60000, 2, 3, 4],
        "{report:#}"
    );
    assert_eq!(
        counts(&table("public.pairs")),
        [45000, 1, 0, 1],
        "{report:#}"
    );
    // Keys far apart, most rows changed: more groups differ than are
    // listed, and the chunk is read whole, each row counted once.
    let spaced = table("public.spaced");
    assert_eq!(counts(&spaced), [1500, 0, 0, 1200], "{report:#}");
    assert_eq!(spaced["equal"], 300, "{report:#}");
    // A case-insensitive column whose case changed, beside a column of
    // another collation: compared by bytes.
    assert_eq!(counts(&table("public.emails")), [2, 0, 0, 1], "{report:#}");
    let human = verify(&config, "human").all_output();
    for expected in [
        "missing on target: (id=-199993)",
        "missing on target: (id=-60000)",
        "changed: (id=-59993) in n",
        "extra on target: (id=-500000)",
        "extra on target: (id=3)",
        "extra on target: (id=999999)",
        "changed: (id=10000) in a, b",
        "changed: (id=80000) in a, b",
        "changed: (id=150000) in n, m",
        "changed: (id=1) in email",
        "changed: (k1=1, k2=30001) in v",
        "missing on target: (k1=2, k2=44999)",
    ] {
        assert!(
            human.contains(expected),
            "expected {expected:?} in:\n{human}"
        );
    }
    let repaired = verify_with(&config, &["--repair"]);
    assert_eq!(repaired.code, 0, "{}", repaired.all_output());
    let again = verify(&config, "human");
    assert_eq!(again.code, 0, "{}", again.all_output());
}

#[tokio::test]
async fn verify_of_one_group_compares_only_its_tables() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    migrated(&pair, dir.path(), SCHEMA).await;
    let config = pair.config(
        dir.path(),
        "[[group]]\nname = \"money\"\ntables = [\"public.accounts\"]\n[[group]]\nname = \"lookups\"\ntables = [\"public.codes\"]\n",
    );
    pair.target
        .execute(
            "app",
            "UPDATE accounts SET balance = -1 WHERE id = 42;
             UPDATE codes SET label = 'tampered' WHERE code = 'c7';",
        )
        .await;
    let outcome = verify_with(&config, &["--group", "lookups", "--format", "json"]);
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    let report: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(report["group"], "lookups", "{report:#}");
    let tables: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["public.codes"], "{report:#}");
    assert_eq!(report["differing_rows"], 1, "{report:#}");
    // The tables no group names: equal.
    let outcome = verify_with(&config, &["--group", "default"]);
    assert_eq!(outcome.code, 0, "{}", outcome.all_output());
    assert!(
        outcome
            .stdout
            .contains("verified 1 tables of group default"),
        "{}",
        outcome.stdout
    );
    // Repairing one group leaves the other's difference alone.
    let repaired = verify_with(&config, &["--group", "money", "--repair"]);
    assert_eq!(repaired.code, 0, "{}", repaired.all_output());
    assert!(
        repaired.stdout.contains("repaired: updated (id=42)"),
        "{}",
        repaired.stdout
    );
    let all = verify(&config, "json");
    let report: serde_json::Value = serde_json::from_str(&all.stdout).unwrap();
    assert_eq!(report["differing_rows"], 1, "{}", all.all_output());
    // A group that does not exist.
    let unknown = verify_with(&config, &["--group", "payments"]);
    assert_ne!(unknown.code, 0);
    assert!(
        unknown
            .stderr
            .contains("there is no group \"payments\": the groups are money, lookups, default"),
        "{}",
        unknown.all_output()
    );
}

#[tokio::test]
async fn a_target_column_of_a_wider_type_compares_equal() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let wider = "
CREATE TABLE accounts (id bigint PRIMARY KEY, owner varchar(200), balance bigint, note text);
CREATE TABLE codes (code text COLLATE \"C\" PRIMARY KEY, label text);
CREATE TABLE audit (at bigint, what text);";
    let config = migrated(&pair, dir.path(), wider).await;
    let outcome = verify(&config, "human");
    assert_eq!(outcome.code, 0, "{}", outcome.all_output());
    assert!(outcome.stdout.contains("VALIDATED"), "{}", outcome.stdout);
}

#[tokio::test]
async fn a_verify_beside_a_streaming_daemon_under_load_finds_nothing_and_the_daemon_goes_on() {
    let (pair, dir) = seeded().await;
    // The console (loopback, no password) is how verify holds the daemon.
    let config = pair.config(dir.path(), "allow_no_password = true\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    let writer = Writer::start(&pair, 0, load).await;
    for round in 0..3 {
        let path = config.clone();
        let outcome = tokio::task::spawn_blocking(move || verify(&path, "human"))
            .await
            .unwrap();
        assert_eq!(
            outcome.code,
            0,
            "round {round}: verify beside the daemon found a difference under load:\n{}\ndaemon:\n{}",
            outcome.all_output(),
            daemon.log()
        );
        assert!(outcome.stdout.contains("VALIDATED"), "{}", outcome.stdout);
    }
    let writes = writer.stop().await;
    assert!(writes > 50, "the writer made only {writes} transactions");
    // Released: the daemon applies everything written meanwhile.
    assert!(
        daemon.log().contains("applier held for a verify"),
        "{}",
        daemon.log()
    );
    pair.finish(&mut daemon, &["accounts", "codes", "audit"], WAIT)
        .await;
}

#[tokio::test]
async fn verify_says_what_to_do_before_the_copy_and_when_the_console_is_off() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    pair.both(SCHEMA).await;
    let config = pair.config(dir.path(), "");
    let outcome = verify(&config, "human");
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    assert!(
        outcome
            .stderr
            .contains("the snapshot copy has not finished"),
        "{}",
        outcome.all_output()
    );
    // A daemon without a console cannot be held.
    let mut daemon = Daemon::start_streaming(&config).await;
    let outcome = verify(&config, "human");
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    assert!(
        outcome.stderr.contains("admin console is off"),
        "{}",
        outcome.all_output()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn a_verify_killed_while_it_holds_the_daemon_never_leaves_it_held() {
    let (pair, dir) = seeded().await;
    let config = pair.config(dir.path(), "allow_no_password = true\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    let writer = Writer::start(&pair, 0, load).await;
    // A transaction open on the source: the verify's slot waits for it to
    // end, so the verify is killed while it holds the daemon.
    let open = pair.source.client("app").await;
    open.batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let verify = Killable::verify(&config);
    cutover_tests::wait_for("the verify to hold the daemon", WAIT, || async {
        daemon.log().contains("console: HOLD").then_some(())
    })
    .await;
    verify.kill();
    open.batch_execute("COMMIT").await.unwrap();
    cutover_tests::wait_for("the daemon to release the hold", WAIT, || async {
        daemon
            .log()
            .contains("the console connection holding the applier ended: released")
            .then_some(())
    })
    .await;
    writer.stop().await;
    // The hold ended with the verify's connection: everything written
    // reaches the target.
    pair.finish(&mut daemon, &["accounts", "codes", "audit"], WAIT)
        .await;
}

#[tokio::test]
async fn a_keyless_table_that_streams_only_inserts_is_kept_equal_by_repair() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = migrated(&pair, dir.path(), SCHEMA).await;
    // `audit` has no key: with the default keyless policy its deletes and
    // updates do not stream (they are reported as unstreamed rows).
    pair.on_source("DELETE FROM audit WHERE at = 7; UPDATE audit SET what = 'late' WHERE at = 8;")
        .await;
    let found = verify(&config, "human");
    assert_eq!(found.code, 1, "{}", found.all_output());
    let repaired = verify_with(&config, &["--repair"]);
    let out = repaired.all_output();
    assert_eq!(repaired.code, 0, "{out}");
    assert!(out.contains("repaired: deleted (at=7, what=seen)"), "{out}");
    assert!(
        out.contains("repaired: inserted (at=8, what=late)"),
        "{out}"
    );
    let again = verify(&config, "human");
    assert_eq!(again.code, 0, "{}", again.all_output());
    let (source, target) = pair.rows("audit").await;
    assert_eq!(source, target);
}

#[tokio::test]
async fn rows_whose_foreign_key_refers_to_nothing_on_the_target_are_found() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    pair.both(
        "CREATE TABLE parents (id int PRIMARY KEY);
         CREATE TABLE children (id int PRIMARY KEY, parent int REFERENCES parents (id), other int);",
    )
    .await;
    pair.on_source(
        "INSERT INTO parents SELECT generate_series(1, 10);
         INSERT INTO children SELECT g, g % 10 + 1, NULL FROM generate_series(1, 50) g;
         INSERT INTO children VALUES (51, NULL, NULL);",
    )
    .await;
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["parents", "children"], WAIT)
        .await;
    let clean = verify(&config, "human");
    assert_eq!(clean.code, 0, "{}", clean.all_output());
    assert!(
        clean
            .stdout
            .contains("1 foreign keys checked, 0 orphaned rows"),
        "{}",
        clean.stdout
    );
    // Behind cutover's back, as replica-mode writes can: no check fires.
    pair.target
        .execute(
            "app",
            "SET session_replication_role = replica; DELETE FROM parents WHERE id = 3;",
        )
        .await;
    let found = verify(&config, "human");
    let out = found.all_output();
    assert_eq!(found.code, 1, "{out}");
    assert!(out.contains("missing on target: (id=3)"), "{out}");
    assert!(
        out.contains("children_parent_fkey of public.children refers to no row of public.parents in 5 rows: (3)"),
        "{out}"
    );
}

#[tokio::test]
async fn a_verify_killed_midway_resumes_after_the_last_chunk_it_compared() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // An integer key is read in chunks; a text key is read whole and
    // records where it stands every 5,000 rows or so.
    pair.both(
        "CREATE TABLE big (id bigint PRIMARY KEY, v text);
         CREATE TABLE words (w text PRIMARY KEY, n int);",
    )
    .await;
    pair.on_source(
        "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
         INSERT INTO words SELECT md5(g::text), g FROM generate_series(1, 100000) g;",
    )
    .await;
    // Slow enough that the kill comes while both tables are half read.
    let config = pair.config(dir.path(), "[verify]\nrate = 40000\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["big", "words"], WAIT).await;
    // Differences at a chunk's edges (chunks are 20,000 source rows), in
    // the middle, and past the source's last key; in the text-keyed
    // table, on both sides of where it will have stopped.
    pair.target
        .execute(
            "app",
            "DELETE FROM big WHERE id IN (20000, 20001);
             UPDATE big SET v = 'x' WHERE id = 150000;
             INSERT INTO big VALUES (999999, 'extra');
             DELETE FROM words WHERE w = (SELECT w FROM words ORDER BY w COLLATE \"C\" OFFSET 10 LIMIT 1);
             UPDATE words SET n = -1 WHERE w = (SELECT w FROM words ORDER BY w COLLATE \"C\" OFFSET 90000 LIMIT 1);
             INSERT INTO words VALUES ('~ after every md5', 0);",
        )
        .await;
    let progress = dir.path().join("state/verify_progress.json");
    let verify = Killable::verify(&config);
    cutover_tests::wait_for(
        "the verify to compare a chunk of each table",
        WAIT,
        || async {
            let text = std::fs::read_to_string(&progress).ok()?;
            let saved: serde_json::Value = serde_json::from_str(&text).ok()?;
            let tables = saved["tables"].as_object()?;
            (tables.len() == 2).then_some(())
        },
    )
    .await;
    verify.kill();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress).unwrap()).unwrap();
    assert_eq!(
        saved["tables"]["public.words"]["done"], false,
        "killed half way: {saved}"
    );
    let outcome = verify_with(&config, &["--format", "json"]);
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    let report: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    let table = |name: &str| table_of(&report, name);
    // Every row counted once: nothing compared twice, nothing skipped.
    for (name, source_rows, target_rows) in [
        ("public.big", 200000, 199999),
        ("public.words", 100000, 100000),
    ] {
        let t = table(name);
        assert_eq!(t["source_rows"], source_rows, "{t}");
        assert_eq!(t["target_rows"], target_rows, "{t}");
        assert_eq!(
            t["compared_at"].as_array().map(Vec::len),
            Some(2),
            "the table was resumed at a second position: {t}"
        );
    }
    let counts = |t: &serde_json::Value| {
        (
            t["missing"].as_u64(),
            t["extra"].as_u64(),
            t["changed"].as_u64(),
        )
    };
    assert_eq!(counts(&table("public.big")), (Some(2), Some(1), Some(1)));
    assert_eq!(counts(&table("public.words")), (Some(1), Some(1), Some(1)));
    assert!(
        !progress.exists(),
        "the progress of a finished verify is removed"
    );
    // The next verify starts afresh.
    let again = verify_with(&config, &["--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(
        report["tables"][0]["compared_at"].as_array().map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn the_background_verifier_tracks_divergence_and_turns_health_red() {
    use cutover_tests::http::{get, listen_addr, metric};
    let (pair, dir) = seeded().await;
    let config = pair.config(
        dir.path(),
        "allow_no_password = true\n[verify]\ncontinuous = true\ncontinuous_rate = 1000000\nmax_divergent_ratio = 0.000001\n[[group]]\nname = \"lookups\"\ntables = [\"public.codes\"]\n",
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    let http = listen_addr(&dir.path().join("state")).await;
    let writer = Writer::start(&pair, 0, load).await;
    // Passes under load find nothing.
    cutover_tests::wait_for("a pass of the background verifier", WAIT, || async {
        let (_, body) = get(&http, "/metrics");
        (metric(&body, "cutover_verify_last_pass_timestamp_seconds")? > 0.0).then_some(())
    })
    .await;
    let (_, body) = get(&http, "/metrics");
    assert!(
        metric(&body, "cutover_verify_last_pass_timestamp_seconds").unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "cutover_divergent_rows{table=\"public.accounts\"}"),
        Some(0.0),
        "a difference under load:\n{body}\n{}",
        daemon.log()
    );
    writer.stop().await;
    // A row changed on the target behind cutover's back is found. (Under
    // cutover's repair origin: with groups configured, an application's
    // write on the target is a stray write, written back at once; this
    // one stands for what no stream shows, such as a bug in cutover.)
    // One statement at a time: a multi-statement string is one
    // transaction, which would commit after the reset, without the origin.
    let tamper = pair.target.client("app").await;
    for statement in [
        "SELECT pg_replication_origin_create('cutover_cutover_repair')
           WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'cutover_cutover_repair')",
        "SELECT pg_replication_origin_session_setup('cutover_cutover_repair')",
        "UPDATE codes SET label = 'tampered' WHERE code = 'c7'",
        "SELECT pg_replication_origin_session_reset()",
    ] {
        tamper.batch_execute(statement).await.unwrap();
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = get(&http, "/metrics");
        if metric(&body, "cutover_divergent_rows{table=\"public.codes\"}") == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the divergence did not show:\n{body}\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, health) = get(&http, "/health");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("verify.max_divergent_ratio"), "{health}");
    // Per group too: the table's group, and nothing in the others.
    cutover_tests::wait_for("the group's divergence to show", WAIT, || async {
        let (_, body) = get(&http, "/metrics");
        (metric(&body, "cutover_group_divergent_rows{group=\"lookups\"}")? == 1.0).then_some(())
    })
    .await;
    let (_, body) = get(&http, "/metrics");
    assert_eq!(
        metric(&body, "cutover_group_divergent_rows{group=\"default\"}"),
        Some(0.0),
        "{body}"
    );
    let status = run_cutover(&["--config", config.to_str().unwrap(), "status"], &[]);
    for expected in [
        "public.codes: 1 of 303 rows differ",
        "group lookups: 1 of 303 rows differ",
        "group default: 0 of",
    ] {
        assert!(
            status.stdout.contains(expected),
            "expected {expected:?} in:\n{}",
            status.all_output()
        );
    }
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn a_hold_released_by_force_cannot_be_moved_to_a_position() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    pair.both(SCHEMA).await;
    let config = pair.config(dir.path(), "allow_no_password = true\n");
    let mut daemon = Daemon::start_streaming(&config).await;
    let console = || async {
        let text = std::fs::read_to_string(dir.path().join("state/listen.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        cutover_tests::console(json["console"].as_str().unwrap()).await
    };
    let verify = console().await;
    let operator = console().await;
    verify.simple_query("HOLD").await.unwrap();
    let message = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string())
    };
    let other = message(operator.simple_query("HOLD").await.unwrap_err());
    assert!(other.contains("another verify holds"), "{other}");
    cutover_tests::wait_for("the applier to stop", WAIT, || async {
        let rows = verify.simple_query("SHOW HOLD").await.ok()?;
        rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("reached_lsn").map(|_| ()),
            _ => None,
        })
    })
    .await;
    operator.simple_query("RELEASE FORCE").await.unwrap();
    // The applier may have moved since: the position cannot be taken.
    let err = message(verify.simple_query("HOLD AT '0/1'").await.unwrap_err());
    assert!(err.contains("no HOLD of this connection"), "{err}");
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn a_repair_undoes_a_swap_of_unique_values_between_rows() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    pair.both("CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE, name text);")
        .await;
    pair.on_source(
        "INSERT INTO people SELECT g, 'p' || g || '@x', 'n' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["people"], WAIT).await;
    // On the target, rows 1 and 2 swap their emails, and row 3 takes the
    // email of a row the target lost.
    pair.target
        .execute(
            "app",
            "UPDATE people SET email = 'tmp' WHERE id = 1;
             UPDATE people SET email = 'p1@x' WHERE id = 2;
             UPDATE people SET email = 'p2@x' WHERE id = 1;
             DELETE FROM people WHERE id = 4;
             UPDATE people SET email = 'p4@x' WHERE id = 5;",
        )
        .await;
    let repaired = verify_with(&config, &["--repair"]);
    let out = repaired.all_output();
    assert_eq!(repaired.code, 0, "{out}");
    assert!(out.contains("REPAIRED: 4 differing rows"), "{out}");
    let again = verify(&config, "human");
    assert_eq!(again.code, 0, "{}", again.all_output());
    let (source, target) = pair.rows("people").await;
    assert_eq!(source, target);
}

/// Rows changed on the target behind cutover's back, none of which the
/// load of [`load`] ever writes: a label of a code it never updates, an
/// extra copy of an audit row (a table without a key), a row deleted from
/// a table it never touches.
const TAMPER: &str = "
UPDATE codes SET label = 'tampered' WHERE code = 'Zed';
INSERT INTO audit VALUES (-1, 'tampered');
DELETE FROM codes WHERE code = 'a b';";

#[tokio::test]
async fn a_repair_beside_a_streaming_daemon_under_load_fixes_what_differs_and_nothing_else() {
    let (pair, dir) = seeded().await;
    // Slow enough (about 3 s) to change the source while it compares.
    let config = pair.config(
        dir.path(),
        "allow_no_password = true\n[verify]\nrate = 1000\n",
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source("INSERT INTO codes VALUES ('c0x', 'new');")
        .await;
    pair.wait_equal(&["codes"], WAIT).await;
    let writer = Writer::start(&pair, 0, load).await;
    pair.target.execute("app", TAMPER).await;
    pair.target
        .execute(
            "app",
            "UPDATE codes SET label = 'tampered' WHERE code = 'c0x';",
        )
        .await;
    let path = config.clone();
    let repairing = tokio::task::spawn_blocking(move || verify_with(&path, &["--repair"]));
    // Once the small tables are compared (the position is taken), the
    // source changes a row found differing: the stream makes it equal
    // before the repair, which leaves it alone.
    let progress = dir.path().join("state/verify_progress.json");
    cutover_tests::wait_for("the verify to compare codes", WAIT, || async {
        let text = std::fs::read_to_string(&progress).ok()?;
        let saved: serde_json::Value = serde_json::from_str(&text).ok()?;
        (saved["tables"]["public.codes"]["done"] == true).then_some(())
    })
    .await;
    pair.on_source("UPDATE codes SET label = 'fresh' WHERE code = 'c0x';")
        .await;
    let outcome = repairing.await.unwrap();
    let out = outcome.all_output();
    assert_eq!(outcome.code, 0, "{out}\ndaemon:\n{}", daemon.log());
    assert!(out.contains("changed: (code=c0x) in label"), "{out}");
    for repaired in [
        "repaired: updated (code=Zed)",
        "repaired: inserted (code=a b)",
        "repaired: deleted (at=-1, what=tampered)",
    ] {
        assert!(out.contains(repaired), "{repaired} in:\n{out}");
    }
    assert!(
        out.contains("REPAIRED: of 4 rows differing at"),
        "the row the stream made equal is left alone: {out}"
    );
    assert_eq!(out.matches("repaired: ").count(), 3, "{out}");
    // Under load, with the daemon going on, nothing differs afterwards.
    let path = config.clone();
    let again = tokio::task::spawn_blocking(move || verify(&path, "human"))
        .await
        .unwrap();
    assert_eq!(again.code, 0, "{}", again.all_output());
    let writes = writer.stop().await;
    assert!(writes > 20, "the writer made only {writes} transactions");
    pair.finish(&mut daemon, &["accounts", "codes", "audit"], WAIT)
        .await;
    // The repairs carry an origin of their own, which the daemon's
    // session does not hold.
    let origins: String = pair
        .target
        .query_value(
            "app",
            "SELECT string_agg(roname, ' ' ORDER BY roname) FROM pg_replication_origin",
        )
        .await;
    assert!(origins.contains("_repair"), "{origins}");
}

#[tokio::test]
async fn the_background_verifier_with_repair_makes_the_target_equal_again() {
    use cutover_tests::http::{get, listen_addr, metric};
    let (pair, dir) = seeded().await;
    let config = pair.config(
        dir.path(),
        "[verify]\ncontinuous = true\nrepair = true\ncontinuous_rate = 1000000\n",
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    let http = listen_addr(&dir.path().join("state")).await;
    let writer = Writer::start(&pair, 0, load).await;
    pair.target.execute("app", TAMPER).await;
    cutover_tests::wait_for("the background verifier to repair", WAIT, || async {
        let (_, body) = get(&http, "/metrics");
        (metric(&body, "cutover_verify_repaired_rows_total")? >= 3.0).then_some(())
    })
    .await;
    let writes = writer.stop().await;
    assert!(writes > 20, "the writer made only {writes} transactions");
    let log = daemon.log();
    assert!(
        log.contains("the background verifier repaired: updated (code=Zed)"),
        "{log}"
    );
    pair.wait_equal(&["accounts", "codes", "audit"], WAIT).await;
    let (_, body) = get(&http, "/metrics");
    assert_eq!(
        metric(&body, "cutover_verify_repaired_rows_total"),
        Some(3.0),
        "each row repaired once, none that was equal:\n{body}"
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}
