//! Table groups in `run`: with `[[group]]`s configured, writes an
//! application makes on the target while the source is the primary
//! (stray writes) are written back over with the source's rows, recorded
//! and counted; a switch and a rollback beside the watcher lose nothing
//! and take none of the new primary's writes for stray ones.

use std::path::Path;
use std::time::Duration;

use cutover_tests::http::{get, listen_addr, metric};
use cutover_tests::{App, ClusterOptions, Daemon, Outcome, Pair, Writer, run_cutover};

const WAIT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance int);
CREATE TABLE codes (code text PRIMARY KEY, label text);
CREATE TABLE ledger (id bigserial PRIMARY KEY, n bigint NOT NULL);";

const GROUPS: &str = "allow_no_password = true\n[[group]]\nname = \"money\"\ntables = [\"public.accounts\", \"public.ledger\"]\n";

/// Updates on the source, the application's own writes.
fn load(n: u64) -> String {
    format!(
        "UPDATE accounts SET balance = balance + 1 WHERE id = {}",
        1 + n % 50
    )
}

/// One ledger row, keyed by its sequence.
fn ledger(n: u64) -> String {
    format!("INSERT INTO ledger (n) VALUES ({n})")
}

async fn cutover(config: &Path, args: &[&str]) -> Outcome {
    let mut all = vec!["--config".to_owned(), config.to_str().unwrap().to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        run_cutover(&all, &[])
    })
    .await
    .unwrap()
}

async fn seeded(dir: &Path, extra: &str) -> (Pair, std::path::PathBuf) {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(SCHEMA).await;
    pair.on_source(
        "INSERT INTO accounts SELECT g, 'owner' || g, 100 FROM generate_series(1, 500) g;
         INSERT INTO codes SELECT 'c' || g, 'label' || g FROM generate_series(1, 50) g;",
    )
    .await;
    let config = pair.config(dir, &format!("{GROUPS}{extra}"));
    (pair, config)
}

/// Waits until the daemon's reverse stream (which sees stray writes on
/// the target) streams.
async fn watching(daemon: &Daemon) {
    cutover_tests::wait_for("the reverse stream", WAIT, || async {
        daemon
            .log()
            .contains("streaming slot=cutover_reverse")
            .then_some(())
    })
    .await;
}

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
    assert!(out.contains("stray writes on the target: "), "{out}");
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
            .contains("stray writes on the target: 8 (6 written back over with the source's rows)"),
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
        out.contains("stray writes on the target: 1 "),
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
