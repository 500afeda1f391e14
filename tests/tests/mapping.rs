//! Field mappings (`[[map]]`): a table shaped like the seed's
//! `beneficiaries` written to a differently shaped `people` table on the
//! target (a renamed key, a code mapped through a lookup table that only
//! the target has, a derived flag, a dropped column, rows without a name
//! rejected and counted), through the copy, the stream, `verify`, and a
//! switch and rollback with an inverse mapping.

use std::time::Duration;

use cutover_tests::{ClusterOptions, Daemon, Pair, run_cutover, wait_for};

const WAIT: Duration = Duration::from_secs(90);

/// The source's table, and a copy of the target's lookup table in a
/// schema out of scope, from which the test computes what the target must
/// hold without cutover's help.
const SOURCE: &str = "
CREATE TABLE beneficiaries (
    id bigint PRIMARY KEY,
    beneficiary_name text,
    registration_date date NOT NULL,
    location_code text NOT NULL,
    programme_id int NOT NULL,
    legacy_flags text
);
CREATE SCHEMA lookup;
CREATE TABLE lookup.location_map (old_code text PRIMARY KEY, region text NOT NULL);
INSERT INTO lookup.location_map VALUES ('LOC-1', 'north'), ('LOC-2', 'south'), ('LOC-3', 'east');
INSERT INTO beneficiaries
     SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'Beneficiary ' || g END,
            date '2015-01-01' + (g * 37 % 3650)::int, 'LOC-' || (g % 4),
            CASE WHEN g = 77 THEN 999 ELSE 1 + g % 5 END, 'flags ' || g
       FROM generate_series(1, 200) g;
";

/// The target's tables: the new shape, and the lookup table.
const TARGET: &str = "
CREATE TABLE location_map (old_code text PRIMARY KEY, region text NOT NULL);
INSERT INTO location_map VALUES ('LOC-1', 'north'), ('LOC-2', 'south'), ('LOC-3', 'east');
CREATE TABLE people (
    person_id bigint PRIMARY KEY,
    full_name text NOT NULL,
    region text,
    registered date NOT NULL,
    is_recent boolean NOT NULL,
    programme_id int NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT now()
);
";

const MAP: &str = r#"
[[map]]
source = "public.beneficiaries"
target = "public.people"
where = "beneficiary_name IS NOT NULL"
[map.columns]
person_id = "id"
full_name = "beneficiary_name"
region = "(SELECT region FROM location_map WHERE old_code = location_code)"
registered = "registration_date"
is_recent = "registration_date >= date '2020-01-01'"
[map.reject]
unknown_programme = "programme_id > 900"
"#;

/// What `people` must hold, computed on the source from its own rows.
const EXPECTED: &str = "
SELECT id, beneficiary_name, (SELECT region FROM lookup.location_map WHERE old_code = location_code),
       registration_date, registration_date >= date '2020-01-01', programme_id
  FROM beneficiaries
 WHERE beneficiary_name IS NOT NULL AND NOT programme_id > 900";

const ACTUAL: &str =
    "SELECT person_id, full_name, region, registered, is_recent, programme_id FROM people";

async fn rows(cluster: &cutover_tests::Cluster, sql: &str) -> Vec<String> {
    cluster
        .client("app")
        .await
        .query(&format!("SELECT r::text FROM ({sql}) r ORDER BY 1"), &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_mapped(pair: &Pair) {
    let mut last = (Vec::new(), Vec::new());
    let done = tokio::time::timeout(WAIT, async {
        loop {
            let expected = rows(&pair.source, EXPECTED).await;
            let actual = rows(&pair.target, ACTUAL).await;
            if expected == actual {
                return;
            }
            last = (expected, actual);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if done.is_err() {
        let (expected, actual) = last;
        let missing: Vec<&String> = expected
            .iter()
            .filter(|r| !actual.contains(r))
            .take(5)
            .collect();
        let extra: Vec<&String> = actual
            .iter()
            .filter(|r| !expected.contains(r))
            .take(5)
            .collect();
        panic!(
            "people differs from the source as mapped: expected {} rows, found {}; missing {missing:?}; extra {extra:?}",
            expected.len(),
            actual.len()
        );
    }
}

async fn rejected(pair: &Pair) -> Vec<String> {
    rows(&pair.target, "SELECT key, reason FROM cutover.rejected").await
}

#[tokio::test]
async fn a_mapped_table_is_copied_and_streamed_through_its_mapping_with_every_rejected_row_counted()
{
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.on_source(SOURCE).await;
    pair.target.execute("app", TARGET).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        &format!("allow_no_password = true\n[replication]\ntables = [\"public.*\"]\n{MAP}"),
    );

    let check = run_cutover(&["--config", config.to_str().unwrap(), "check"], &[]);
    assert_eq!(check.code, 0, "{}", check.all_output());

    let mut daemon = Daemon::start_streaming(&config).await;
    wait_mapped(&pair).await;
    // 20 rows without a name, one in an unknown programme.
    let recorded = rejected(&pair).await;
    assert_eq!(recorded.len(), 21, "{recorded:?}");
    assert!(
        recorded.contains(&"({77},unknown_programme)".to_owned()),
        "{recorded:?}"
    );
    assert!(
        recorded.contains(&"({10},where)".to_owned()),
        "{recorded:?}"
    );
    let log = daemon.log_of_this_start();
    assert!(log.contains("rejected"), "{log}");

    for sql in [
        // A new row, a new rejected row.
        "INSERT INTO beneficiaries VALUES (1001, 'New', '2024-05-01', 'LOC-1', 2, 'x'),
                                          (1002, NULL, '2024-05-01', 'LOC-2', 2, 'x')",
        // Out of the filter: deleted on the target, recorded.
        "UPDATE beneficiaries SET beneficiary_name = NULL WHERE id IN (1, 2)",
        // Into the filter: inserted, the record gone.
        "UPDATE beneficiaries SET beneficiary_name = 'Named at last' WHERE id IN (10, 20)",
        // A code mapped anew, a column the mapping drops.
        "UPDATE beneficiaries SET location_code = 'LOC-3', legacy_flags = 'gone' WHERE id = 3",
        // The key the mapping renames changes, then the row goes.
        "UPDATE beneficiaries SET id = 5000 WHERE id = 4",
        "UPDATE beneficiaries SET id = 5001 WHERE id = 30",
        "DELETE FROM beneficiaries WHERE id IN (5, 40, 5000)",
        // Several changes to one key in one transaction.
        "BEGIN; UPDATE beneficiaries SET beneficiary_name = NULL WHERE id = 6;
                UPDATE beneficiaries SET beneficiary_name = 'Back' WHERE id = 6;
                UPDATE beneficiaries SET programme_id = 950 WHERE id = 7; COMMIT;",
    ] {
        pair.on_source(sql).await;
    }
    wait_mapped(&pair).await;
    let recorded = rejected(&pair).await;
    for expected in [
        "({1},where)",
        "({2},where)",
        "({1002},where)",
        "({5001},where)",
        "({7},unknown_programme)",
    ] {
        assert!(
            recorded.contains(&expected.to_owned()),
            "{expected} not in {recorded:?}"
        );
    }
    for gone in [
        "({10},where)",
        "({20},where)",
        "({30},where)",
        "({40},where)",
        "({6},where)",
    ] {
        assert!(
            !recorded.contains(&gone.to_owned()),
            "{gone} still in {recorded:?}"
        );
    }
    // Every source row is on the target or recorded as rejected, once.
    let source_rows: i64 = pair
        .source
        .query_value("app", "SELECT count(*) FROM beneficiaries")
        .await;
    let target_rows: i64 = pair
        .target
        .query_value("app", "SELECT count(*) FROM people")
        .await;
    assert_eq!(source_rows, target_rows + recorded.len() as i64);

    // verify compares the target with the source as mapped, beside the
    // running daemon, and reconciles every row.
    let verify = run_cutover(&["--config", config.to_str().unwrap(), "verify"], &[]);
    let out = verify.all_output();
    assert_eq!(verify.code, 0, "{out}");
    assert!(out.contains("VALIDATED"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("public.beneficiaries -> public.people"))
        .unwrap_or_else(|| panic!("no reconciliation line: {out}"));
    let figures: Vec<&str> = line.split_whitespace().skip(3).collect();
    assert_eq!(
        figures,
        [
            source_rows.to_string(),
            recorded.len().to_string(),
            target_rows.to_string(),
            target_rows.to_string(),
            "0".to_owned()
        ],
        "{out}"
    );
    assert!(out.contains("rejected by unknown_programme: 2"), "{out}");
    let report = std::fs::read_to_string(dir.path().join("state/validation_report.json")).unwrap();
    assert!(
        report.contains("\"written_to\": \"public.people\""),
        "{report}"
    );

    // A target that drifted from the mapping is caught, row by row.
    pair.target
        .execute(
            "app",
            "UPDATE people SET full_name = 'Someone else' WHERE person_id = 3;
             DELETE FROM people WHERE person_id = 8;
             INSERT INTO people (person_id, full_name, registered, is_recent, programme_id) VALUES (424242, 'Stray', '2020-01-01', true, 1);
             DELETE FROM cutover.rejected WHERE key = '{1}';",
        )
        .await;
    let verify = run_cutover(&["--config", config.to_str().unwrap(), "verify"], &[]);
    let out = verify.all_output();
    assert_eq!(verify.code, 1, "{out}");
    for expected in [
        "changed: (person_id=3) in full_name",
        "missing on target: (person_id=8)",
        "extra on target: (person_id=424242)",
        "1 rejected rows disagree with their record",
        "FAILED",
    ] {
        assert!(out.contains(expected), "{expected:?} not in {out}");
    }
    pair.target
        .execute(
            "app",
            "DELETE FROM people WHERE person_id = 424242;
             INSERT INTO cutover.rejected (map, key, reason) VALUES ('public.beneficiaries', '{1}', 'where');",
        )
        .await;
    pair.on_source(
        "UPDATE beneficiaries SET beneficiary_name = beneficiary_name WHERE id IN (3, 8)",
    )
    .await;
    wait_mapped(&pair).await;

    // A TRUNCATE empties the target table and its records.
    pair.on_source("TRUNCATE beneficiaries; INSERT INTO beneficiaries VALUES (1, NULL, '2020-01-01', 'LOC-1', 1, NULL), (2, 'Two', '2020-01-01', 'LOC-9', 1, NULL)").await;
    wait_mapped(&pair).await;
    wait_for("the records to follow the truncate", WAIT, || async {
        (rejected(&pair).await == vec!["({1},where)".to_owned()]).then_some(())
    })
    .await;
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// The inverse of [`MAP`]: `people` written back to `beneficiaries` by the
/// reverse stream after a switch, the region mapped back to a code through
/// the source's own copy of the lookup table.
const INVERSE: &str = r#"
[map.inverse]
id = "person_id"
beneficiary_name = "full_name"
registration_date = "registered"
location_code = "coalesce((SELECT min(l.old_code) FROM lookup.location_map l WHERE l.region = src.region), 'LOC-0')"
"#;

/// A second table mapped one way only.
const ONE_WAY: &str = r#"
[[map]]
source = "public.notes"
target = "public.memos"
[map.columns]
memo_id = "id"
text = "body"
"#;

#[tokio::test]
async fn a_switch_and_rollback_carry_a_mapped_table_back_through_its_inverse() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.on_source(SOURCE).await;
    pair.on_source(
        "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'one')",
    )
    .await;
    pair.target.execute("app", TARGET).await;
    pair.target
        .execute(
            "app",
            "CREATE TABLE memos (memo_id int PRIMARY KEY, text text)",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        &format!("allow_no_password = true\n[replication]\ntables = [\"public.*\"]\n{MAP}{INVERSE}{ONE_WAY}"),
    );
    let check = run_cutover(&["--config", config.to_str().unwrap(), "check"], &[]);
    let out = check.all_output();
    assert_eq!(check.code, 0, "{out}");
    assert!(out.contains("public.notes has no inverse"), "{out}");

    let mut daemon = Daemon::start_streaming(&config).await;
    wait_mapped(&pair).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    let plan = run_cutover(
        &[
            "--config",
            config.to_str().unwrap(),
            "switch",
            "--dry-run",
            "--verify",
        ],
        &[],
    );
    let out = plan.all_output();
    assert_eq!(plan.code, 0, "{out}");
    assert!(
        out.contains("public.notes -> public.memos has no [map.inverse]"),
        "{out}"
    );
    assert!(out.contains("a rollback will not carry them"), "{out}");
    assert!(
        !out.contains("public.beneficiaries -> public.people has no"),
        "{out}"
    );

    let switched = run_cutover(
        &["--config", config.to_str().unwrap(), "switch", "--verify"],
        &[],
    );
    assert_eq!(switched.code, 0, "{}", switched.all_output());

    // The application writes the new shape on the target.
    pair.target
        .execute(
            "app",
            "INSERT INTO people (person_id, full_name, region, registered, is_recent, programme_id)
                  VALUES (5555, 'Born on the target', 'south', '2025-01-02', true, 3);
             UPDATE people SET region = 'east', full_name = 'Renamed' WHERE person_id = 11;
             UPDATE people SET region = NULL WHERE person_id = 13;
             DELETE FROM people WHERE person_id = 12;
             INSERT INTO memos VALUES (9, 'stays on the target');",
        )
        .await;
    let mut daemon = Daemon::start_streaming(&config).await;
    let back =
        "SELECT id, beneficiary_name, registration_date, location_code, programme_id, legacy_flags
                  FROM beneficiaries WHERE id IN (11, 12, 13, 5555)";
    let expected = vec![
        "(11,Renamed,2015-01-01,LOC-3,2,\"flags 11\")".to_owned(),
        "(13,\"Beneficiary 13\",2016-01-02,LOC-0,4,\"flags 13\")".to_owned(),
        "(5555,\"Born on the target\",2025-01-02,LOC-2,3,)".to_owned(),
    ];
    let registered: Vec<String> = rows(
        &pair.source,
        "SELECT registration_date::text FROM beneficiaries WHERE id IN (11, 13)",
    )
    .await;
    let expected: Vec<String> = expected
        .into_iter()
        .map(|r| {
            let date = |i: usize| registered[i].trim_matches(['(', ')']).to_owned();
            r.replace("2015-01-01", &date(0))
                .replace("2016-01-02", &date(1))
        })
        .collect();
    let _ = tokio::time::timeout(WAIT, async {
        while rows(&pair.source, back).await != expected {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(
        rows(&pair.source, back).await,
        expected,
        "the target's changes on the source, in its shape:\n{}",
        daemon.log()
    );
    assert_eq!(
        rows(&pair.source, "SELECT id FROM notes").await,
        vec!["(1)".to_owned()],
        "a one-way table is not written back"
    );
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    // And back: the source is primary again, and streams through the
    // mapping as before.
    let rolled = run_cutover(&["--config", config.to_str().unwrap(), "rollback"], &[]);
    assert_eq!(rolled.code, 0, "{}", rolled.all_output());
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source(
        "UPDATE beneficiaries SET beneficiary_name = 'After the rollback' WHERE id = 14;
                    UPDATE beneficiaries SET beneficiary_name = NULL WHERE id = 15",
    )
    .await;
    wait_mapped(&pair).await;
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// Large values (TOASTed) that an UPDATE leaves alone are not sent: a
/// column the mapping copies as it is stays as it is on the target; one an
/// expression needs comes from the old row under REPLICA IDENTITY FULL;
/// without it, the stream stops and says so (and `check` warned first).
#[tokio::test]
async fn unchanged_large_values_are_kept_taken_from_the_old_row_or_stop_the_stream_with_the_fix() {
    let pair = Pair::start(ClusterOptions::default()).await;
    for table in ["docs", "docs_full", "docs_x"] {
        pair.on_source(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, title text, body text);
             ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL;
             INSERT INTO {table} SELECT g, 'title ' || g, repeat(g::text, 3000) FROM generate_series(1, 5) g;"
        ))
        .await;
        pair.target
            .execute(
                "app",
                &format!("CREATE TABLE {table}_pages (page_id int PRIMARY KEY, title text, body text, size int)"),
            )
            .await;
    }
    pair.on_source("ALTER TABLE docs_full REPLICA IDENTITY FULL")
        .await;
    let map = |table: &str, size: &str| {
        format!(
            "[[map]]\nsource = \"public.{table}\"\ntarget = \"public.{table}_pages\"\nwhere = \"title IS NOT NULL\"\n[map.columns]\npage_id = \"id\"\ntitle = \"upper(title)\"\nbody = \"body\"\nsize = \"{size}\"\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(
        dir.path(),
        &format!(
            "{}{}{}",
            map("docs", "length(title)"),
            map("docs_full", "length(body)"),
            map("docs_x", "length(body)")
        ),
    );
    let check = run_cutover(&["--config", config.to_str().unwrap(), "check"], &[]);
    let out = check.all_output();
    assert_eq!(check.code, 0, "{out}");
    assert!(
        out.contains("the mapping of public.docs_x computes with column(s) title, body:"),
        "{out}"
    );
    // A column copied as it is needs no value it was not sent; under
    // REPLICA IDENTITY FULL the old row has them all.
    assert!(
        out.contains("the mapping of public.docs computes with column(s) title:"),
        "{out}"
    );
    assert!(
        !out.contains("the mapping of public.docs_full computes"),
        "{out}"
    );
    assert!(out.contains("mapped to public.docs_x_pages"), "{out}");
    assert!(!out.contains("MISSING ON TARGET"), "{out}");

    let mut daemon = Daemon::start_streaming(&config).await;
    pair.on_source(
        "UPDATE docs SET title = 'renamed' WHERE id = 1;
         UPDATE docs SET title = NULL WHERE id = 2;
         UPDATE docs_full SET title = 'renamed' WHERE id = 1;
         UPDATE docs_full SET body = 'short' WHERE id = 2;",
    )
    .await;
    let pages = "SELECT page_id, title, md5(body), size FROM ";
    let expect = |table: &str| {
        format!(
            "SELECT id, upper(title), md5(body), {} FROM {table} WHERE title IS NOT NULL",
            if table == "docs" {
                "length(title)"
            } else {
                "length(body)"
            }
        )
    };
    for table in ["docs", "docs_full"] {
        let _ = tokio::time::timeout(WAIT, async {
            while rows(&pair.target, &format!("{pages}{table}_pages")).await
                != rows(&pair.source, &expect(table)).await
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert_eq!(
            rows(&pair.target, &format!("{pages}{table}_pages")).await,
            rows(&pair.source, &expect(table)).await,
            "{table}:\n{}",
            daemon.log()
        );
    }

    // An expression over a large value the UPDATE does not send.
    pair.on_source("UPDATE docs_x SET title = 'renamed' WHERE id = 1")
        .await;
    let log = wait_for("the stream to stop on docs_x", WAIT, || async {
        let log = daemon.log();
        log.contains("left column(s) body unchanged").then_some(log)
    })
    .await;
    assert!(
        log.contains("ALTER TABLE \"public\".\"docs_x\" REPLICA IDENTITY FULL"),
        "{log}"
    );
    assert!(log.contains("cutover run --resync"), "{log}");
    let title: String = pair
        .target
        .query_value("app", "SELECT title FROM docs_x_pages WHERE page_id = 1")
        .await;
    assert_eq!(title, "TITLE 1", "nothing of the change was written");
    daemon.kill();
}

/// A lost slot and `run --resync`: the changes made while the daemon was
/// down reach the mapped table, which is loaded again through its mapping
/// (its rejected rows recorded anew), and the stream goes on from there.
#[tokio::test]
async fn resync_loads_a_mapped_table_again_through_its_mapping() {
    let pair =
        Pair::start(ClusterOptions::default().setting("max_slot_wal_keep_size", "1MB")).await;
    pair.on_source(SOURCE).await;
    pair.target.execute("app", TARGET).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), MAP);
    let mut daemon = Daemon::start_streaming(&config).await;
    wait_mapped(&pair).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());

    pair.on_source(
        "INSERT INTO beneficiaries VALUES (900, 'While down', '2024-01-01', 'LOC-1', 1, NULL),
                                          (901, NULL, '2024-01-01', 'LOC-1', 1, NULL);
         UPDATE beneficiaries SET beneficiary_name = NULL WHERE id = 1;
         UPDATE beneficiaries SET beneficiary_name = 'Named' WHERE id = 10;
         DELETE FROM beneficiaries WHERE id IN (2, 20);",
    )
    .await;
    pair.source.lose_slot("app", "cutover").await;

    let mut daemon = Daemon::start(&config, &["run", "--resync"]);
    wait_for("the resync and the stream", WAIT, || async {
        let log = daemon.log_of_this_start();
        assert!(!log.contains("error:"), "the resync failed:\n{log}");
        log.contains("to=\"streaming\"").then_some(())
    })
    .await;
    let log = daemon.log_of_this_start();
    assert!(
        log.contains("public.beneficiaries -> public.people: loaded again through its mapping (200 source rows)"),
        "{log}"
    );
    wait_mapped(&pair).await;
    let recorded = rejected(&pair).await;
    for expected in ["({1},where)", "({901},where)", "({77},unknown_programme)"] {
        assert!(
            recorded.contains(&expected.to_owned()),
            "{expected} not in {recorded:?}"
        );
    }
    for gone in ["({10},where)", "({20},where)"] {
        assert!(
            !recorded.contains(&gone.to_owned()),
            "{gone} still in {recorded:?}"
        );
    }
    pair.on_source("UPDATE beneficiaries SET beneficiary_name = 'After' WHERE id = 30")
        .await;
    wait_mapped(&pair).await;
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

/// A mapped row is never written changed behind the operator's back: a
/// value too long for its target column stops the stream (a cast would
/// cut it), and so does a key change that leaves a large value unsent
/// (the old key's other columns are not in the WAL).
#[tokio::test]
async fn a_value_too_long_and_a_key_change_without_its_large_value_stop_the_stream() {
    for case in ["too long", "key change"] {
        let pair = Pair::start(ClusterOptions::default()).await;
        pair.on_source(
            "CREATE TABLE docs (id int PRIMARY KEY, code text, body text);
             ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
             INSERT INTO docs SELECT g, 'c' || g, repeat(g::text, 3000) FROM generate_series(1, 5) g;",
        )
        .await;
        pair.target
            .execute(
                "app",
                "CREATE TABLE pages (page_id int PRIMARY KEY, code varchar(5), body text)",
            )
            .await;
        let dir = tempfile::tempdir().unwrap();
        let config = pair.config(
            dir.path(),
            "[[map]]\nsource = \"docs\"\ntarget = \"pages\"\n[map.columns]\npage_id = \"id\"\n",
        );
        let mut daemon = Daemon::start_streaming(&config).await;
        let (change, said) = match case {
            "too long" => (
                "INSERT INTO docs VALUES (6, 'much too long', 'b')",
                "value too long for type character varying(5)",
            ),
            _ => (
                "UPDATE docs SET id = 100 WHERE id = 3",
                "changes a row's key and leaves a large",
            ),
        };
        let expected = rows_of_source(&pair).await;
        pair.on_source(change).await;
        let log = wait_for(&format!("the stream to stop ({case})"), WAIT, || async {
            let log = daemon.log();
            log.contains(said).then_some(log)
        })
        .await;
        assert!(log.contains("public.docs"), "{log}");
        let rows: Vec<String> =
            rows(&pair.target, "SELECT page_id, code, md5(body) FROM pages").await;
        assert_eq!(rows, expected, "nothing of the change was written ({case})");
        daemon.kill();
    }
}

/// The source's rows 1 to 5 as the mapping writes them.
async fn rows_of_source(pair: &Pair) -> Vec<String> {
    rows(
        &pair.source,
        "SELECT id, code, md5(body) FROM docs WHERE id <= 5",
    )
    .await
}
