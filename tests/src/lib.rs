//! Shared test harness for cutover's integration tests and benchmarks:
//! real, throwaway PostgreSQL clusters ([`cluster`]) and the `cutover`
//! binary run as an operator runs it ([`cli`]).
//!
//! No database is mocked. Tests wait on conditions ([`cluster::wait_for`]),
//! never on fixed sleeps, and never assert a timing.

pub mod app;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod groups;
pub mod http;
pub mod kafka;
pub mod netns;
pub mod proxy;
pub mod writer;

pub use app::App;
pub use cli::{Outcome, run_cutover, write_config};
pub use cluster::{Cluster, ClusterOptions, wait_for};
pub use daemon::Daemon;
pub use proxy::Proxy;
pub use writer::Writer;

/// A source and a target cluster, started in parallel, each with a fresh
/// database named `app`.
#[derive(Debug)]
pub struct Pair {
    /// The server migrated from.
    pub source: Cluster,
    /// The server migrated to.
    pub target: Cluster,
}

impl Pair {
    /// Starts both clusters with the same options.
    pub async fn start(options: ClusterOptions) -> Pair {
        Pair::start_each(options.clone(), options).await
    }

    /// Starts the source with `source_options` and the target with
    /// `target_options`.
    pub async fn start_each(
        source_options: ClusterOptions,
        target_options: ClusterOptions,
    ) -> Pair {
        let source = std::thread::spawn(move || Cluster::start_with(source_options));
        let target = Cluster::start_with(target_options);
        let source = source
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        source.create_database("app").await;
        target.create_database("app").await;
        Pair { source, target }
    }
}

impl Pair {
    /// A config file for this pair (in `dir`), with `extra` TOML appended.
    pub fn config(&self, dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
        write_config(
            dir,
            &format!(
                "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n{extra}",
                self.source.url("app", "postgres", None),
                self.target.url("app", "postgres", None),
                dir.join("state").display()
            ),
        )
    }

    /// Runs the same SQL on both servers (schema setup).
    pub async fn both(&self, sql: &str) {
        self.source.execute("app", sql).await;
        self.target.execute("app", sql).await;
    }

    /// The rows of `table` on each side, as sorted text: equal lists mean
    /// equal tables, duplicates included.
    pub async fn rows(&self, table: &str) -> (Vec<String>, Vec<String>) {
        (
            table_rows(&self.source, table).await,
            table_rows(&self.target, table).await,
        )
    }

    /// Waits until every table in `tables` is equal on both sides.
    pub async fn wait_equal(&self, tables: &[&str], timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut differing = None;
            for table in tables {
                let (source, target) = self.rows(table).await;
                if source != target {
                    differing = Some((table.to_string(), source, target));
                    break;
                }
            }
            let Some((table, source, target)) = differing else {
                return;
            };
            if tokio::time::Instant::now() >= deadline {
                let only_source: Vec<&String> = source
                    .iter()
                    .filter(|r| !target.contains(r))
                    .take(5)
                    .collect();
                let only_target: Vec<&String> = target
                    .iter()
                    .filter(|r| !source.contains(r))
                    .take(5)
                    .collect();
                panic!(
                    "{table} differs after {timeout:?}: source {} rows, target {} rows; only on source: {only_source:?}; only on target: {only_target:?}",
                    source.len(),
                    target.len()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Runs `sql` on the source's `app` database, failing the test with
    /// the statement.
    pub async fn on_source(&self, sql: &str) {
        self.source
            .client("app")
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("source: {sql}: {e}"));
    }

    /// Waits until the daemon applied everything the source wrote so far
    /// (every table of `tables` equal on both sides), checks that it is
    /// still running, and stops it cleanly.
    pub async fn finish(&self, daemon: &mut Daemon, tables: &[&str], timeout: std::time::Duration) {
        self.wait_equal(tables, timeout).await;
        assert!(daemon.running(), "the daemon stopped:\n{}", daemon.log());
        assert_eq!(daemon.terminate(timeout), Some(0), "{}", daemon.log());
    }
}

/// `SELECT __row::text FROM table __row ORDER BY 1` (an alias no column takes).
pub async fn table_rows(cluster: &Cluster, table: &str) -> Vec<String> {
    cluster
        .client("app")
        .await
        .query(
            &format!("SELECT __row::text FROM {table} __row ORDER BY 1"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("reading {table} on port {}: {e}", cluster.port()))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A connection to a daemon's admin console at `addr` (`host:port`),
/// opened without a password (`console.allow_no_password`).
pub async fn console(addr: &str) -> tokio_postgres::Client {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let (client, connection) = tokio_postgres::Config::new()
        .host(host)
        .port(port.parse().expect("a port"))
        .user("ops")
        .dbname("cutover")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the console");
    tokio::spawn(connection);
    client
}
