//! `cutover tail` prints what would be replicated, one JSON line per
//! change, from a temporary slot that disappears with it.

use std::process::Stdio;
use std::time::Duration;

use cutover_tests::cli::cutover_bin;
use cutover_tests::{Cluster, wait_for, write_config};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn tail_prints_each_change_as_a_json_line() {
    let source = Cluster::start();
    source.create_database("app").await;
    source
        .execute(
            "app",
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, tags text[], meta jsonb);
             ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
             CREATE TABLE ignored (id int PRIMARY KEY);",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"postgres://nobody@127.0.0.1:1/elsewhere\"\n[replication]\ntables = [\"public.docs\"]\n",
            source.url("app", "postgres", None)
        ),
    );
    let child = tokio::process::Command::new(cutover_bin())
        .args(["--config", config.to_str().unwrap(), "tail", "--limit", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start cutover tail");
    wait_for("tail's temporary slot to be streaming", WAIT, || async {
        let active: i64 = source
            .query_value("app", "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cutover\\_tail\\_%' AND active AND temporary")
            .await;
        (active == 1).then_some(())
    })
    .await;
    let big = "b".repeat(5000);
    let sql = source.client("app").await;
    sql.execute(
        "INSERT INTO docs VALUES (1, 'first', $1, '{x,\"y z\"}', '{\"n\": 1}')",
        &[&big],
    )
    .await
    .unwrap();
    for statement in [
        "INSERT INTO ignored VALUES (1)",
        "UPDATE docs SET title = 'second' WHERE id = 1",
        "UPDATE docs SET id = 2 WHERE id = 1",
        "DELETE FROM docs WHERE id = 2",
        "TRUNCATE docs",
    ] {
        sql.batch_execute(statement).await.unwrap();
    }
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("tail stops after --limit changes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tail failed:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("created publication \"cutover\" for 1 table"),
        "{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let ops: Vec<&str> = lines.iter().map(|l| l["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        ["insert", "update", "update", "delete", "truncate"],
        "{stdout}"
    );
    for line in &lines {
        for field in [
            "lsn",
            "commit_lsn",
            "xid",
            "op",
            "schema",
            "table",
            "key",
            "old",
            "new",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
        assert_eq!(
            (line["schema"].as_str(), line["table"].as_str()),
            (Some("public"), Some("docs"))
        );
        let lsn = line["lsn"].as_str().unwrap();
        assert!(lsn.parse::<cutover_replication::Lsn>().is_ok(), "{lsn}");
        assert!(line["commit_lsn"].as_str().unwrap() >= "0/0");
        assert!(line["xid"].as_u64().unwrap() > 0);
    }
    let insert = &lines[0];
    assert_eq!(insert["key"], serde_json::json!({"id": 1}));
    assert_eq!(insert["new"]["tags"], serde_json::json!(["x", "y z"]));
    assert_eq!(insert["new"]["meta"], serde_json::json!({"n": 1}));
    assert_eq!(insert["new"]["body"].as_str().unwrap().len(), 5000);
    let unchanged = &lines[1];
    assert_eq!(unchanged["new"]["title"], "second");
    assert_eq!(
        unchanged["new"]["body"],
        serde_json::json!({"unchanged_toast": true}),
        "marked, not nulled"
    );
    let key_change = &lines[2];
    assert_eq!(key_change["old"], serde_json::json!({"id": 1}));
    assert_eq!(key_change["key"], serde_json::json!({"id": 1}));
    assert_eq!(key_change["new"]["id"], 2);
    assert_eq!(lines[3]["key"], serde_json::json!({"id": 2}));
    assert_eq!(lines[3]["new"], Value::Null);
    assert_eq!(
        (
            lines[4]["cascade"].as_bool(),
            lines[4]["restart_identity"].as_bool()
        ),
        (Some(false), Some(false))
    );

    // The server drops a temporary slot when its walsender exits, which
    // may be a moment after tail's connection closed.
    wait_for("the temporary slot to be gone with tail", WAIT, || async {
        let left: i64 = source
            .query_value(
                "app",
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cutover\\_tail\\_%'",
            )
            .await;
        (left == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn tail_on_a_missing_slot_says_so() {
    let source = Cluster::start();
    source.create_database("app").await;
    source
        .execute("app", "CREATE TABLE t (id int PRIMARY KEY)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"postgres://nobody@127.0.0.1:1/elsewhere\"\n",
            source.url("app", "postgres", None)
        ),
    );
    let outcome = cutover_tests::run_cutover(
        &[
            "--config",
            config.to_str().unwrap(),
            "tail",
            "--slot",
            "nope",
        ],
        &[],
    );
    assert_eq!(outcome.code, 1);
    assert!(
        outcome
            .stderr
            .contains("replication slot \"nope\" does not exist"),
        "{}",
        outcome.stderr
    );
}
