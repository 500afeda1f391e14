//! What the table-group tests share (`tests/tests/phased.rs`,
//! `tests/tests/policies.rs`): the schema and its rows, configs with
//! `[[group]]`s, the daemon streaming both ways, and the writes the
//! applications make.

use std::path::Path;
use std::time::Duration;

use crate::{ClusterOptions, Daemon, Outcome, Pair};

/// How long a group test waits for what it expects.
pub const WAIT: Duration = Duration::from_secs(120);

pub const SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance int);
CREATE TABLE codes (code text PRIMARY KEY, label text);
CREATE TABLE ledger (id bigserial PRIMARY KEY, n bigint NOT NULL);";

pub const GROUPS: &str = "allow_no_password = true\n[[group]]\nname = \"money\"\ntables = [\"public.accounts\", \"public.ledger\"]\n";

/// Updates on the source, the application's own writes.
pub fn load(n: u64) -> String {
    format!(
        "UPDATE accounts SET balance = balance + 1 WHERE id = {}",
        1 + n % 50
    )
}

/// One ledger row, keyed by its sequence.
pub fn ledger(n: u64) -> String {
    format!("INSERT INTO ledger (n) VALUES ({n})")
}

/// `cutover` with `args` and `config`, on a blocking thread (the
/// applications go on writing meanwhile).
pub async fn cutover(config: &Path, args: &[&str]) -> Outcome {
    cutover_with(config, args, None).await
}

/// [`cutover`] with `CUTOVER_FAILPOINT` set to `failpoint`.
pub async fn cutover_with(config: &Path, args: &[&str], failpoint: Option<&str>) -> Outcome {
    crate::cli::cutover_beside(config, args, failpoint).await
}

/// Updates of the default group's table on the source, all along.
pub fn codes_load(n: u64) -> String {
    format!(
        "UPDATE codes SET label = 'load{n}' WHERE code = 'c{}'",
        20 + n % 20
    )
}

/// The ledger's `n`s on the server `client` is connected to.
pub async fn ledger_ns(client: &tokio_postgres::Client) -> Vec<i64> {
    client
        .query("SELECT n FROM ledger ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The pair with [`SCHEMA`] on both and rows on the source, and a config
/// with [`GROUPS`] and `extra`.
pub async fn seeded(dir: &Path, extra: &str) -> (Pair, std::path::PathBuf) {
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
pub async fn watching(daemon: &Daemon) {
    crate::wait_for("the reverse stream", WAIT, || async {
        daemon
            .log()
            .contains("streaming slot=cutover_reverse")
            .then_some(())
    })
    .await;
}

/// The one value of `sql` on the server `client` is connected to.
pub async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The daemon, streaming both ways, and a client of each server.
pub async fn streaming(
    pair: &Pair,
    config: &Path,
) -> (Daemon, tokio_postgres::Client, tokio_postgres::Client) {
    let daemon = Daemon::start_streaming(config).await;
    watching(&daemon).await;
    (
        daemon,
        pair.source.client("app").await,
        pair.target.client("app").await,
    )
}

/// [`seeded`] on servers that keep commit times, with `groups`.
pub async fn timestamped(dir: &Path, groups: &str) -> (Pair, std::path::PathBuf) {
    let options = ClusterOptions::default().setting("track_commit_timestamp", "on");
    let pair = Pair::start(options).await;
    pair.both(SCHEMA).await;
    pair.on_source(
        "INSERT INTO accounts SELECT g, 'owner' || g, 100 FROM generate_series(1, 50) g;
         INSERT INTO codes SELECT 'c' || g, 'label' || g FROM generate_series(1, 50) g;",
    )
    .await;
    let config = pair.config(dir, groups);
    (pair, config)
}

/// Writes on the server `client` is connected to until `stop`: each
/// transaction `statement(n)`, and every 25th also `stray(n)` when given;
/// returns how many committed.
pub fn traffic(
    client: tokio_postgres::Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    statement: fn(u64) -> String,
    stray: Option<fn(u64) -> String>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            client.batch_execute(&statement(n)).await.unwrap();
            if let Some(stray) = stray.filter(|_| n % 25 == 0) {
                client.batch_execute(&stray(n)).await.unwrap();
            }
        }
        n
    })
}
