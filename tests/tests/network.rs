//! Network faults made by the kernel, not by a proxy: each server behind
//! its own network namespace ([`cutover_tests::netns`]), and its link
//! black-holed (packets dropped, no RST), cut one way, or too slow for its
//! load, during the stream and during the copy. cutover must notice the
//! dead peer within the keepalive settings of its connection strings
//! (libpq's `keepalives_*` and `tcp_user_timeout`), reconnect, resume,
//! and leave the servers equal.
//!
//! Needs root; without it each test says it is skipped (under `CI` it
//! fails instead).

use std::time::{Duration, Instant};

use cutover_tests::netns::{Netns, or_skip};
use cutover_tests::{ClusterOptions, Daemon, Pair, Writer, wait_for, write_config};

const WAIT: Duration = Duration::from_secs(120);

/// What the connection strings ask of TCP: a silent peer is dead after
/// 1 s + 2 probes of 1 s, unacknowledged data after 3 s; a connection
/// attempt gives up after 2 s.
const TCP: &str = "keepalives_idle=1&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=3000&connect_timeout=2";

/// How long noticing may take: the settings above, the stream's and the
/// applier's own turns, and a loaded 2-core machine. cutover's defaults
/// (30 s of silence, then 3 probes 10 s apart; 60 s unacknowledged) would
/// take more than twice as long.
const NOTICE: Duration = Duration::from_secs(25);

async fn servers_behind_namespaces(test: &str) -> Option<(Pair, Netns, Netns)> {
    let source_ns = or_skip(test)?;
    let target_ns = or_skip(test)?;
    // The old walsender of a black-holed stream holds the slot until the
    // server gives up on its connection: soon, here.
    let options = |ns: &Netns| {
        ClusterOptions::default()
            .setting("wal_sender_timeout", "5s")
            .in_netns(ns)
    };
    let pair = Pair::start_each(options(&source_ns), options(&target_ns)).await;
    Some((pair, source_ns, target_ns))
}

fn config(dir: &std::path::Path, pair: &Pair) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            "[source]\nurl = \"{}&{TCP}\"\n[target]\nurl = \"{}&{TCP}\"\n\
             [state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n",
            pair.source.url("app", "postgres", None),
            pair.target.url("app", "postgres", None),
            dir.join("state").display()
        ),
    )
}

/// Waits until the daemon's log, past `from`, holds `needle`; returns
/// how long that took from `since`.
async fn logged(
    daemon: &Daemon,
    from: usize,
    needle: &str,
    since: Instant,
    within: Duration,
) -> Duration {
    wait_for(needle, within, || async {
        let log = daemon.log();
        log.get(from..)?.contains(needle).then(|| since.elapsed())
    })
    .await
}

fn write(n: u64) -> String {
    format!(
        "INSERT INTO items VALUES ({n}, repeat('x', 200), 0); UPDATE items SET hits = hits + 1 WHERE id = {};",
        n.saturating_sub(7).max(1)
    )
}

/// Waits until the target holds the first `inserts` rows the writer
/// committed (the writer goes on).
async fn caught_up(pair: &Pair, inserts: u64) {
    wait_for("the target to catch up", WAIT, || async {
        let rows: i64 = pair
            .target
            .query_value("app", "SELECT count(*) FROM items")
            .await;
        (rows as u64 >= inserts).then_some(())
    })
    .await;
}

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, body text, hits int NOT NULL);";

#[tokio::test]
async fn black_holes_one_way_cuts_and_a_slow_link_during_the_stream_lose_nothing() {
    let test = "network::stream";
    let Some((pair, source_ns, target_ns)) = servers_behind_namespaces(test).await else {
        return;
    };
    pair.both(SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pair);
    let mut daemon = Daemon::start_streaming(&config).await;
    // The writer reaches the source over its unix socket: the
    // application is not behind the faults, cutover is.
    let writer = Writer::start(&pair, 0, write).await;
    writer.advance(100, WAIT).await;

    // 1. The source's link goes silent both ways.
    let from = daemon.log().len();
    let cut = Instant::now();
    source_ns.black_hole();
    let noticed = logged(&daemon, from, "reconnecting", cut, NOTICE).await;
    eprintln!("source black hole noticed after {noticed:.1?}");
    // Attempts while it lasts fail (connect_timeout), and are retried.
    let from = daemon.log().len();
    logged(&daemon, from, "reconnecting", cut, WAIT).await;
    source_ns.heal();
    caught_up(&pair, writer.done()).await;

    // 2. The target receives, but its replies are dropped: the applier's
    // connection is dead as far as cutover can tell.
    let from = daemon.log().len();
    let cut = Instant::now();
    target_ns.drop_replies();
    let noticed = logged(&daemon, from, "reconnecting", cut, NOTICE).await;
    eprintln!("target's one-way cut noticed after {noticed:.1?}");
    target_ns.heal();
    caught_up(&pair, writer.done()).await;

    // 3. Links too slow for the load: delay, and drops when their queues
    // overflow. netem's random loss and delay where the kernel has it.
    target_ns.throttle("1mbit", "20ms");
    match source_ns.netem(&["loss", "3%", "delay", "30ms", "10ms"]) {
        Ok(()) => eprintln!("netem: 3% loss and 30 ms delay on the source's link"),
        Err(why) => {
            eprintln!(
                "netem is not available here ({why}): loss and delay come from throttled links only"
            );
            source_ns.throttle("1mbit", "20ms");
        }
    }
    writer.advance(300, WAIT).await;
    source_ns.heal();
    target_ns.heal();
    let written = writer.stop().await;
    pair.wait_equal(&["items"], WAIT).await;
    let rows: i64 = pair
        .target
        .query_value("app", "SELECT count(*) FROM items")
        .await;
    assert_eq!(rows as u64, written, "every insert arrived once");
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn a_one_way_cut_during_the_copy_is_noticed_and_the_copy_resumes() {
    let test = "network::copy";
    let Some((pair, source_ns, _target_ns)) = servers_behind_namespaces(test).await else {
        return;
    };
    pair.both(SCHEMA).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, repeat('x', 200), 0 FROM generate_series(1, 100000) g",
        )
        .await;
    // About 20 MB over a 40 Mbit/s link: the copy takes seconds.
    source_ns.throttle("40mbit", "50ms");
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pair);
    let mut daemon = Daemon::start(&config, &["run"]);
    wait_for("the copy to start", WAIT, || async {
        daemon.log().contains("to=\"copying\"").then_some(())
    })
    .await;
    let from = daemon.log().len();
    let cut = Instant::now();
    source_ns.drop_replies();
    let noticed = logged(&daemon, from, "the copy lost a connection", cut, NOTICE).await;
    eprintln!("the source's one-way cut during the copy noticed after {noticed:.1?}");
    source_ns.heal();
    wait_for("the daemon to stream", WAIT, || async {
        let log = daemon.log();
        assert!(!log.contains("error:"), "the daemon failed:\n{log}");
        log.contains("to=\"streaming\"").then_some(())
    })
    .await;
    pair.source
        .execute("app", "UPDATE items SET hits = 1 WHERE id % 1000 = 0")
        .await;
    pair.wait_equal(&["items"], WAIT).await;
    assert!(daemon.running(), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}

#[tokio::test]
async fn a_black_hole_during_a_switch_undoes_it_within_its_bound_and_the_next_one_succeeds() {
    let test = "network::switch";
    let Some((pair, _source_ns, target_ns)) = servers_behind_namespaces(test).await else {
        return;
    };
    pair.both(SCHEMA).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed', 0 FROM generate_series(1, 1000) g",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pair);
    // The fence command takes the target's link down, once: the switch
    // has fenced the source and must now drain to an unreachable target.
    let armed = dir.path().join("armed");
    std::fs::write(&armed, "").unwrap();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap()
            + &format!(
                "[switch]\nmax_lag_seconds = 3\nfence_command = \"if [ -e {0} ]; then rm {0}; ip -n {1} link set eth0 down; fi\"\n",
                armed.display(),
                target_ns.name()
            ),
    )
    .unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["items"], WAIT).await;

    let started = Instant::now();
    let failed = cutover_tests::cli::cutover_beside(&config, &["switch", "--verify"], None).await;
    let took = started.elapsed();
    let out = failed.all_output();
    eprintln!("the switch into a black hole ended after {took:.1?}:\n{out}");
    assert_eq!(failed.code, 1, "{out}");
    // Bounded: without the bound it would wait for as long as the hole
    // lasts (this test's whole run).
    assert!(took < Duration::from_secs(60), "{took:?}\n{out}");
    assert!(
        out.contains("the target did not take what was committed before the fence within 6 s"),
        "{out}"
    );
    assert!(!armed.exists(), "the fence command did not run:\n{out}");
    // Undone: the source takes writes again; nothing is lost.
    pair.source
        .execute(
            "app",
            "INSERT INTO items VALUES (5000, 'after the undo', 0)",
        )
        .await;
    let status = cutover_tests::run_cutover(&["--config", config.to_str().unwrap(), "status"], &[]);
    assert!(
        status.stdout.contains("switch 1 undone"),
        "{}",
        status.all_output()
    );
    target_ns.heal();
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["items"], WAIT).await;
    let switched = cutover_tests::cli::cutover_beside(&config, &["switch", "--verify"], None).await;
    assert_eq!(switched.code, 0, "{}", switched.all_output());
    assert!(
        switched.all_output().contains("primary: target"),
        "{}",
        switched.all_output()
    );
}
