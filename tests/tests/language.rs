//! Servers that speak another language: with `lc_messages` German, every
//! error is still understood (by its SQLSTATE and by what cutover was
//! doing, never by the English text of a message), and `check` opens the
//! stream's replication connection too, which can fail where a database
//! connection works.
//!
//! `make test` generates the `de_DE.UTF-8` locale (tests/install-deps.sh);
//! PostgreSQL's own German messages come with its server package.

use cutover_tests::{Cluster, ClusterOptions, run_cutover, write_config};
use serde_json::Value;

const GERMAN: &str = "de_DE.UTF-8";

fn german() -> ClusterOptions {
    let installed = std::process::Command::new("locale")
        .arg("-a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase())
        .unwrap_or_default();
    assert!(
        installed
            .lines()
            .any(|l| l == "de_de.utf8" || l == "de_de.utf-8"),
        "the {GERMAN} locale is not installed: make test generates it (tests/install-deps.sh, as root), or run `locale-gen {GERMAN}`"
    );
    ClusterOptions::default().setting("lc_messages", GERMAN)
}

fn check(config: &std::path::Path) -> (i32, Value) {
    let out = run_cutover(
        &[
            "--config",
            config.to_str().unwrap(),
            "check",
            "--format",
            "json",
        ],
        &[],
    );
    let report = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}):\n{}{}", out.stdout, out.stderr));
    (out.code, report)
}

fn replication_finding(report: &Value, server: &str) -> Option<Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "replication_connect" && f["server"] == server)
        .cloned()
}

#[tokio::test]
async fn check_opens_a_replication_connection_and_says_why_it_fails_in_any_language() {
    // The target has no WAL sender to give: the way back would fail.
    let source = Cluster::start_with(german());
    let target = Cluster::start_with(german().setting("max_wal_senders", "0"));
    for cluster in [&source, &target] {
        cluster.create_database("app").await;
        cluster
            .execute("app", "CREATE TABLE items (id int PRIMARY KEY);")
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = |user: &str| {
        write_config(
            dir.path(),
            &format!(
                "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n",
                source.url("app", user, None),
                target.url("app", "postgres", None),
                dir.path().join("state").display()
            ),
        )
    };
    let (code, report) = check(&config("postgres"));
    assert_eq!(code, 0, "{report:#}");
    assert!(
        replication_finding(&report, "source").is_none(),
        "{report:#}"
    );
    let finding = replication_finding(&report, "target")
        .unwrap_or_else(|| panic!("no finding for the target: {report:#}"));
    assert_eq!(finding["severity"], "warning", "{finding:#}");
    let problem = finding["problem"].as_str().unwrap();
    assert!(problem.contains("reverse stream"), "{problem}");
    // The server's own words are German; cutover understood them by
    // their SQLSTATE.
    assert!(problem.contains("SQLSTATE 53300"), "{problem}");
    assert!(!problem.contains("exceeds"), "not English: {problem}");
    let fix = finding["fix"].as_str().unwrap();
    assert!(fix.contains("max_wal_senders"), "{fix}");

    // A role without REPLICATION on the source: the stream cannot start.
    source
        .execute(
            "app",
            "CREATE ROLE plain LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO plain;",
        )
        .await;
    let (code, report) = check(&config("plain"));
    assert_eq!(code, 1, "{report:#}");
    let finding = replication_finding(&report, "source")
        .unwrap_or_else(|| panic!("no finding for the source: {report:#}"));
    assert_eq!(finding["severity"], "blocking", "{finding:#}");
    let problem = finding["problem"].as_str().unwrap();
    assert!(problem.contains("SQLSTATE 42501"), "{problem}");
    assert!(!problem.contains("must be"), "not English: {problem}");
    assert!(
        finding["fix"].as_str().unwrap().contains("REPLICATION"),
        "{finding:#}"
    );
}

#[tokio::test]
async fn a_missing_and_a_lost_slot_are_told_apart_in_german() {
    let source = Cluster::start_with(german().setting("max_slot_wal_keep_size", "1MB"));
    source.create_database("app").await;
    source
        .execute(
            "app",
            "CREATE TABLE items (id int PRIMARY KEY); CREATE PUBLICATION p FOR ALL TABLES;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n[replication]\npublication = \"p\"\n",
            source.url("app", "postgres", None),
            source.url("postgres", "postgres", None),
            dir.path().join("state").display()
        ),
    );
    let tail = |slot: &str| {
        run_cutover(
            &[
                "--config",
                config.to_str().unwrap(),
                "tail",
                "--slot",
                slot,
                "--publication",
                "p",
            ],
            &[],
        )
    };

    // A missing slot is found by cutover's own catalog query.
    let missing = tail("nope");
    assert_eq!(missing.code, 1, "{}", missing.all_output());
    assert!(
        missing
            .stderr
            .contains("replication slot \"nope\" does not exist"),
        "{}",
        missing.stderr
    );

    // A slot the source invalidates: more WAL than max_slot_wal_keep_size
    // behind, and checkpoints that remove it.
    source
        .execute(
            "app",
            "SELECT pg_create_logical_replication_slot('lost_one', 'pgoutput')",
        )
        .await;
    source.lose_slot("app", "lost_one").await;
    let lost = tail("lost_one");
    assert_eq!(lost.code, 1, "{}", lost.all_output());
    assert!(
        lost.stderr.contains("max_slot_wal_keep_size") && lost.stderr.contains("invalidated"),
        "the lost slot's fix: {}",
        lost.stderr
    );
    assert!(
        !lost.stderr.contains("the replication slot is gone"),
        "{}",
        lost.stderr
    );
    assert!(
        !lost.stderr.contains("can no longer"),
        "not English: {}",
        lost.stderr
    );

    // A publication the stream names and the source does not have (42704
    // while streaming, in German): told apart from a missing slot.
    source
        .execute(
            "app",
            "SELECT pg_create_logical_replication_slot('no_pub', 'pgoutput');
             INSERT INTO items VALUES (42);",
        )
        .await;
    let gone = run_cutover(
        &[
            "--config",
            config.to_str().unwrap(),
            "tail",
            "--slot",
            "no_pub",
            "--publication",
            "gone",
        ],
        &[],
    );
    assert_eq!(gone.code, 1, "{}", gone.all_output());
    assert!(
        gone.stderr.contains("42704")
            && gone
                .stderr
                .contains("the publication was dropped or renamed"),
        "the missing publication's fix: {}",
        gone.stderr
    );
    assert!(
        !gone.stderr.contains("replication slot is gone"),
        "{}",
        gone.stderr
    );
}
