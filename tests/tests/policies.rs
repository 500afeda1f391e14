//! The group policies on writes to the same keys from both servers:
//! `manual` parks and an operator resolves, `last_write_wins` keeps the
//! later write (and is refused without commit timestamps),
//! `bidirectional` takes writes on both servers and ends both with the
//! later one.

use std::path::Path;
use std::time::Duration;

use cutover_tests::Daemon;
use cutover_tests::groups::*;

/// Three groups, one per policy: `manual` (accounts), `last_write_wins`
/// (codes) and `primary_wins` (ledger, the default group).
const POLICIES: &str = "allow_no_password = true
[[group]]
name = \"money\"
tables = [\"public.accounts\"]
policy = \"manual\"
[[group]]
name = \"codes\"
tables = [\"public.codes\"]
policy = \"last_write_wins\"
";

/// The status record of the stray write to `table` under `key`.
async fn record(config: &Path, table: &str, key: &str) -> Option<String> {
    let listed = cutover(config, &["conflicts"]).await;
    listed
        .stdout
        .lines()
        .find(|l| l.contains(&format!("{table} ")) && l.contains(key))
        .map(str::to_owned)
}

#[tokio::test]
async fn each_policy_settles_writes_to_the_same_keys_from_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = timestamped(dir.path(), POLICIES).await;
    let checked = cutover(&config, &["check"]).await;
    assert!(
        !checked.all_output().contains("track_commit_timestamp"),
        "{}",
        checked.all_output()
    );
    let (mut daemon, source, target) = streaming(&pair, &config).await;

    // last_write_wins: the source writes c6 and it reaches the target;
    // then an application writes c6 on the target, later: the target's
    // row wins and is carried to the source (primary_wins would undo it).
    source
        .batch_execute("UPDATE codes SET label = 'source first' WHERE code = 'c6'")
        .await
        .unwrap();
    pair.wait_equal(&["codes"], WAIT).await;
    target
        .batch_execute("UPDATE codes SET label = 'target later' WHERE code = 'c6'")
        .await
        .unwrap();
    // ... and for c7 the target writes first and the source after: the
    // source's later row stays on both.
    target
        .batch_execute("UPDATE codes SET label = 'target first' WHERE code = 'c7'")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE codes SET label = 'source later' WHERE code = 'c7'")
        .await
        .unwrap();
    // primary_wins: the ledger's stray row is undone.
    target.batch_execute(&ledger(42)).await.unwrap();
    // manual: a stray write on the target is parked, both rows left.
    target
        .batch_execute("UPDATE accounts SET owner = 'target says' WHERE id = 5")
        .await
        .unwrap();

    cutover_tests::wait_for("every stray write settled", WAIT, || async {
        let listed = cutover(&config, &["conflicts"]).await.stdout;
        (listed.contains("carried over")
            && listed.contains("parked")
            && listed.matches("public.ledger").count() == 1
            && !listed.contains("pending"))
        .then_some(())
    })
    .await;
    pair.wait_equal(&["codes", "ledger"], WAIT).await;
    let label = |code: &'static str| {
        let source = &source;
        async move {
            one(
                source,
                &format!("SELECT label FROM codes WHERE code = '{code}'"),
            )
            .await
        }
    };
    assert_eq!(label("c6").await, "target later");
    assert_eq!(label("c7").await, "source later");
    let c6 = record(&config, "public.codes", "(code=c6)").await.unwrap();
    assert!(c6.contains("carried over"), "{c6}");
    let ledger_row = record(&config, "public.ledger", "(id=1)").await.unwrap();
    assert!(ledger_row.contains("written back"), "{ledger_row}");
    assert_eq!(
        one(&target, "SELECT count(*)::text FROM ledger").await,
        "0",
        "the primary_wins stray row stayed"
    );

    // The parked write: both rows as they were, until an operator
    // chooses.
    let parked = record(&config, "public.accounts", "(id=5)").await.unwrap();
    assert!(parked.contains("parked"), "{parked}");
    assert_eq!(
        one(&source, "SELECT owner FROM accounts WHERE id = 5").await,
        "owner5"
    );
    assert_eq!(
        one(&target, "SELECT owner FROM accounts WHERE id = 5").await,
        "target says"
    );
    let id = parked
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    // The group does not move while a stray write of it waits.
    let refused = cutover(&config, &["switch", "--group", "money"]).await;
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .all_output()
            .contains("group money has 1 stray writes not settled"),
        "{}",
        refused.all_output()
    );
    // The verify report keeps it, and finds the row differing (once the
    // daemon streams again after the refused move).
    let verified =
        cutover_tests::wait_for("a verify beside the streaming daemon", WAIT, || async {
            let verified = cutover(&config, &["verify"]).await;
            (!verified.all_output().contains("the daemon is copying")).then_some(verified)
        })
        .await;
    let out = verified.all_output();
    assert_eq!(verified.code, 1, "{out}");
    assert!(
        out.contains("stray writes and conflicts recorded:")
            && out.contains(&format!(
                "#{id} target public.accounts update (id=5): parked"
            )),
        "{out}"
    );
    let wrong = cutover(
        &config,
        &["conflicts", "resolve", "999999", "--use", "target"],
    )
    .await;
    assert_ne!(wrong.code, 0);
    assert!(
        wrong
            .all_output()
            .contains("no stray write 999999 is parked"),
        "{}",
        wrong.all_output()
    );
    let resolved = cutover(&config, &["conflicts", "resolve", &id, "--use", "target"]).await;
    assert_eq!(resolved.code, 0, "{}", resolved.all_output());
    pair.wait_equal(&["accounts"], WAIT).await;
    assert_eq!(
        one(&source, "SELECT owner FROM accounts WHERE id = 5").await,
        "target says",
        "the operator's choice was not written over the source"
    );
    cutover_tests::wait_for("the choice recorded", WAIT, || async {
        record(&config, "public.accounts", "(id=5)")
            .await
            .filter(|r| r.contains("chose target"))
    })
    .await;
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn last_write_wins_without_commit_timestamps_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = seeded(dir.path(), "").await;
    let config_text = std::fs::read_to_string(&config).unwrap().replace(
        "name = \"money\"",
        "name = \"money\"\npolicy = \"last_write_wins\"",
    );
    std::fs::write(&config, config_text).unwrap();
    let checked = cutover(&config, &["check"]).await;
    let out = checked.all_output();
    assert_ne!(checked.code, 0, "{out}");
    assert!(
        out.contains("group money compares commit times (policy last_write_wins or bidirectional)")
            && out.contains("ALTER SYSTEM SET track_commit_timestamp = on"),
        "{out}"
    );
    drop(pair);
}

#[tokio::test]
async fn a_bidirectional_group_takes_writes_on_both_servers_and_the_later_write_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (pair, config) = timestamped(
        dir.path(),
        "allow_no_password = true\n[[group]]\nname = \"codes\"\ntables = [\"public.codes\"]\npolicy = \"bidirectional\"\n",
    )
    .await;
    let (mut daemon, source, target) = streaming(&pair, &config).await;
    // Each server's writes reach the other; none is stray.
    source
        .batch_execute("UPDATE codes SET label = 'from the source' WHERE code = 'c1'")
        .await
        .unwrap();
    target
        .batch_execute("UPDATE codes SET label = 'from the target' WHERE code = 'c2'; INSERT INTO codes VALUES ('t1', 'new on the target')")
        .await
        .unwrap();
    pair.wait_equal(&["codes"], WAIT).await;
    assert_eq!(
        one(&source, "SELECT label FROM codes WHERE code = 't1'").await,
        "new on the target"
    );
    // Writes to the same keys on both servers that cross in the streams:
    // made while the daemon is stopped, so that each stream meets the
    // other server's write when it delivers.
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    target
        .batch_execute("UPDATE codes SET label = 'target first' WHERE code = 'c5'")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE codes SET label = 'source later' WHERE code = 'c5'; UPDATE codes SET label = 'source first' WHERE code = 'c6'")
        .await
        .unwrap();
    target
        .batch_execute("UPDATE codes SET label = 'target later' WHERE code = 'c6'; DELETE FROM codes WHERE code = 'c7'")
        .await
        .unwrap();
    // A delete wins over a concurrent update, whichever came first.
    source
        .batch_execute("DELETE FROM codes WHERE code = 'c8'; UPDATE codes SET label = 'source before the delete' WHERE code = 'c9'")
        .await
        .unwrap();
    target
        .batch_execute("UPDATE codes SET label = 'target after the delete' WHERE code = 'c8'; DELETE FROM codes WHERE code = 'c9'")
        .await
        .unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    watching(&daemon).await;
    // And writes from both sides at once for a while.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    fn either(n: u64) -> String {
        format!(
            "UPDATE codes SET label = 'burst{n}' WHERE code = 'c{}'",
            10 + n % 5
        )
    }
    let a = traffic(
        pair.source.client("app").await,
        std::sync::Arc::clone(&stop),
        either,
        None,
    );
    let b = traffic(
        pair.target.client("app").await,
        std::sync::Arc::clone(&stop),
        either,
        None,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    a.await.unwrap();
    b.await.unwrap();
    pair.wait_equal(&["codes", "accounts"], WAIT).await;
    for client in [&source, &target] {
        assert_eq!(
            one(client, "SELECT label FROM codes WHERE code = 'c5'").await,
            "source later"
        );
        assert_eq!(
            one(client, "SELECT label FROM codes WHERE code = 'c6'").await,
            "target later"
        );
        assert_eq!(
            one(client, "SELECT count(*)::text FROM codes WHERE code = 'c7'").await,
            "0"
        );
    }
    let listed = cutover(&config, &["conflicts"]).await.stdout;
    assert!(
        listed.contains("public.codes update (code=c5)") && listed.contains("kept source"),
        "{listed}"
    );
    assert!(
        listed.contains("public.codes update (code=c6)") && listed.contains("kept target"),
        "{listed}"
    );
    assert!(!listed.contains("stray"), "{listed}");
    // Nothing to move for a group both servers write.
    let refused = cutover(&config, &["switch", "--group", "codes"]).await;
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .all_output()
            .contains("group codes is bidirectional"),
        "{}",
        refused.all_output()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}
