//! `cutover demo` (`make demo`): the whole journey on two throwaway local
//! clusters, with live output. It makes a sample migration
//! (beneficiaries, documents and payments) and an application that keeps
//! writing to whichever server is the primary, then runs the real
//! commands one after another, as an operator would, and prints what each
//! says: `check`, `run` (the copy, then streaming with lag), `status`,
//! `verify`, `switch`, the application's writes on the new primary
//! flowing back, `rollback`, `verify` again, `accept` and `cleanup`. It
//! ends with a summary and leaves nothing running, unless `--keep`.

mod app;
mod servers;

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use servers::Server;

/// `cutover demo`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Beneficiaries in the sample migration (documents: a tenth as many,
    /// payments: half as many).
    #[arg(long, default_value_t = 200_000, value_name = "N")]
    pub rows: i64,
    /// Leave the clusters and the daemon running at the end (before
    /// `cleanup`), and print how to reach them.
    #[arg(long)]
    pub keep: bool,
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The machine lacks what the demo needs, or a server would not start.
    #[error("{0}")]
    Setup(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// A step of the journey went wrong.
    #[error("{step}: {message}")]
    Step {
        /// The step.
        step: String,
        /// What happened.
        message: String,
    },
}

fn step_error(step: &str, message: impl std::fmt::Display) -> DemoError {
    DemoError::Step {
        step: step.to_owned(),
        message: message.to_string(),
    }
}

/// Runs the demo; exit 0 when the whole journey worked.
pub fn main(options: &DemoOptions) -> ExitCode {
    if options.rows < 10 {
        eprintln!("error: --rows {}: at least 10", options.rows);
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let root =
        std::env::temp_dir().join(format!("cutover-demo-{}-{nanos:08x}", std::process::id()));
    let result = runtime.block_on(async {
        tokio::select! {
            // First, so that Ctrl-C is caught from the start: the journey
            // is dropped, which stops the daemon and the servers.
            biased;
            _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
            result = run(options, &root) => result,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(DemoError::Interrupted) => {
            let _ = std::fs::remove_dir_all(&root);
            eprintln!(
                "\ndemo interrupted: the daemon and the servers are stopped, {} removed",
                root.display()
            );
            ExitCode::from(1)
        }
        Err(err) => {
            // The servers and the daemon are stopped; their logs stay.
            eprintln!(
                "\ndemo failed: {err}\nnothing is left running; the logs are in {} (cutover.log, source/server.log, target/server.log)",
                root.display()
            );
            ExitCode::from(1)
        }
    }
}

/// What the journey measured, for the summary.
#[derive(Debug, Default)]
struct Tally {
    steps: Vec<(String, Duration)>,
    switch_window: Option<String>,
    rollback_window: Option<String>,
}

/// The demo's directory, the servers and the daemon.
struct Demo {
    root: PathBuf,
    config: PathBuf,
    exe: PathBuf,
    tally: Tally,
    daemon: Option<tokio::process::Child>,
}

/// Prints `text` indented under a step.
fn indented(text: &str) {
    for line in text.trim_end().lines() {
        println!("    {line}");
    }
}

impl Demo {
    /// Runs `cutover --config <demo> args`, prints what it says; an error
    /// when it fails.
    async fn cutover(&mut self, title: &str, args: &[&str]) -> Result<String, DemoError> {
        println!("\n── {title}: cutover {} ──", args.join(" "));
        let started = Instant::now();
        // What the command says, not its progress log.
        let out = tokio::process::Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .args(["--log-level", "warn"])
            .args(args)
            .output()
            .await
            .map_err(|e| step_error(title, format!("running cutover: {e}")))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        indented(&said);
        self.tally.steps.push((title.to_owned(), started.elapsed()));
        if !out.status.success() {
            return Err(step_error(
                title,
                format!("cutover {} exited with {}", args.join(" "), out.status),
            ));
        }
        Ok(said)
    }

    /// `cutover status --format json`, parsed.
    async fn status(&self) -> Option<serde_json::Value> {
        let out = tokio::process::Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--format", "json"])
            .output()
            .await
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Stops the daemon (SIGTERM: it finishes the batch in flight).
    async fn stop_daemon(&mut self) -> Result<(), DemoError> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        if let Some(pid) = daemon.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(60), daemon.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(step_error(
                "stopping the daemon",
                format!("it exited with {status}; its log: {}", self.log().display()),
            )),
            _ => {
                let _ = daemon.kill().await;
                Err(step_error("stopping the daemon", "it did not stop in 60 s"))
            }
        }
    }

    fn log(&self) -> PathBuf {
        self.root.join("cutover.log")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // A failed demo leaves no daemon behind.
        if let Some(daemon) = &mut self.daemon {
            let _ = daemon.start_kill();
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE beneficiaries (
    id bigint PRIMARY KEY,
    beneficiary_name text NOT NULL,
    registration_date date NOT NULL,
    location_code text NOT NULL,
    programme_id int NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE documents (
    id bigint PRIMARY KEY,
    beneficiary_id bigint NOT NULL,
    body text NOT NULL
);
CREATE TABLE payments (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    beneficiary_id bigint NOT NULL REFERENCES beneficiaries (id),
    amount numeric(12,2) NOT NULL,
    paid_on date NOT NULL
);
CREATE INDEX payments_beneficiary_id ON payments (beneficiary_id);
";

/// The sample data, on the source.
fn sample(rows: i64) -> String {
    let (documents, payments) = ((rows / 10).max(1), (rows / 2).max(1));
    format!(
        "INSERT INTO beneficiaries
             SELECT g, 'Beneficiary ' || g, date '2015-01-01' + (g % 3650)::int,
                    'LOC-' || lpad((g % 5000)::text, 4, '0'), 1 + (g % 200)::int,
                    now() - (g % 1000) * interval '1 hour', now()
             FROM generate_series(1::bigint, {rows}) g;
         INSERT INTO documents
             SELECT g, 1 + (g * 7919) % {rows}, repeat(md5(g::text), 40)
             FROM generate_series(1::bigint, {documents}) g;
         INSERT INTO payments (id, beneficiary_id, amount, paid_on)
             SELECT g, 1 + (g * 104729) % {rows}, (g % 100000) / 100.0,
                    date '2020-01-01' + (g % 1500)::int
             FROM generate_series(1::bigint, {payments}) g;
         SELECT setval(pg_get_serial_sequence('payments', 'id'), {payments});
         ANALYZE;"
    )
}

async fn client(server: &Server, dbname: &str) -> Result<tokio_postgres::Client, DemoError> {
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/{dbname}?sslmode=disable",
        server.port
    );
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .map_err(|e| DemoError::Setup(format!("connecting to the {} server: {e}", server.name)))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn sql(server: &Server, text: &str) -> Result<(), DemoError> {
    client(server, "app")
        .await?
        .batch_execute(text)
        .await
        .map_err(|e| DemoError::Setup(format!("on the {} server: {}", server.name, db_message(&e))))
}

/// The server's own message for `e`, not just "db error".
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_owned())
}

async fn count(server: &Server, table: &str) -> Result<i64, DemoError> {
    client(server, "app")
        .await?
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|row| row.get(0))
        .map_err(|e| {
            DemoError::Setup(format!(
                "counting {table} on the {} server: {}",
                server.name,
                db_message(&e)
            ))
        })
}

/// The `write-unavailability window X s` a switch or rollback printed.
fn window(said: &str) -> Option<String> {
    let at = said.find("write-unavailability window")?;
    let rest = said[at + "write-unavailability window".len()..].trim_start_matches(':');
    Some(
        rest.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

async fn run(options: &DemoOptions, root: &std::path::Path) -> Result<(), DemoError> {
    let started = Instant::now();
    let bindir = servers::bindir()?;
    let run_as = servers::server_user()?;
    let root = root.to_owned();
    // A new directory (an existing one, or a link, is refused).
    std::fs::create_dir(&root)
        .map_err(|e| DemoError::Setup(format!("creating {}: {e}", root.display())))?;
    // The servers' user must reach its directories inside.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| DemoError::Setup(format!("{}: {e}", root.display())))?;
    println!(
        "cutover demo: the whole journey on two throwaway PostgreSQL clusters in {}",
        root.display()
    );
    let (mut source, mut target) = (
        Server::start(&root, "source", &bindir, run_as)?,
        Server::start(&root, "target", &bindir, run_as)?,
    );
    println!("  source  {}", source.url());
    println!("  target  {}", target.url());
    for server in [&source, &target] {
        client(server, "postgres")
            .await?
            .batch_execute("CREATE DATABASE app")
            .await
            .map_err(|e| {
                DemoError::Setup(format!("creating the app database: {}", db_message(&e)))
            })?;
        sql(server, SCHEMA).await?;
    }
    let made = Instant::now();
    sql(&source, &sample(options.rows)).await?;
    println!(
        "  sample migration on the source: {} beneficiaries, {} documents, {} payments (made in {:.1} s); the target has the schema, empty",
        options.rows,
        (options.rows / 10).max(1),
        (options.rows / 2).max(1),
        made.elapsed().as_secs_f64()
    );
    let config = root.join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\n\n[target]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\nlag_sample_seconds = 1\n\n\
             [replication]\ntables = [\"public.*\"]\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n\
             [console]\nlisten = \"127.0.0.1:0\"\nallow_no_password = true\n",
            source.url(),
            target.url(),
            root.join("state").display()
        ),
    )
    .map_err(|e| DemoError::Setup(format!("writing {}: {e}", config.display())))?;
    println!("  config: {}", config.display());
    let exe = std::env::current_exe()
        .map_err(|e| DemoError::Setup(format!("finding the cutover binary: {e}")))?;
    let mut demo = Demo {
        root: root.clone(),
        config,
        exe,
        tally: Tally::default(),
        daemon: None,
    };
    let app = app::App::start(source.url(), target.url(), options.rows);
    println!("  application: writing payments on the primary, about 100 transactions a second");

    demo.cutover("1. preflight", &["check"]).await?;

    // 2. The daemon: the copy, then streaming.
    println!(
        "\n── 2. copy, then stream: cutover run (in the background; its log: {}) ──",
        demo.log().display()
    );
    let log = std::fs::File::create(demo.log())
        .map_err(|e| DemoError::Setup(format!("creating the daemon's log: {e}")))?;
    let run_started = Instant::now();
    demo.daemon = Some(
        tokio::process::Command::new(&demo.exe)
            .arg("--config")
            .arg(&demo.config)
            // Its log says when the copy is done, whatever RUST_LOG says.
            .args(["--log-level", "info", "run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| step_error("cutover run", e))?,
    );
    let mut shown = 0;
    let streaming_at = loop {
        // The copy's progress, as the daemon logs it.
        let text = std::fs::read_to_string(demo.log()).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("table copied"))
            .skip(shown)
        {
            if let Some(at) = line.find("table copied") {
                println!(
                    "    {:>5.1} s  {}",
                    run_started.elapsed().as_secs_f64(),
                    &line[at..]
                );
            }
            shown += 1;
        }
        if text.contains("to=\"streaming\"") {
            break run_started.elapsed();
        }
        if let Some(daemon) = &mut demo.daemon
            && let Ok(Some(status)) = daemon.try_wait()
        {
            return Err(step_error(
                "cutover run",
                format!("the daemon exited ({status}):\n{text}"),
            ));
        }
        if run_started.elapsed() > Duration::from_secs(600) {
            return Err(step_error("cutover run", "not streaming after 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "    {:>5.1} s  streaming: the copy is done, changes flow",
        streaming_at.as_secs_f64()
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(status) = demo.status().await {
            println!(
                "    {:>5.1} s  {}: lag {:.1} s, {} bytes of WAL to apply; {} transactions applied",
                run_started.elapsed().as_secs_f64(),
                status["state"].as_str().unwrap_or("?"),
                status["lag"]["seconds"].as_f64().unwrap_or(0.0),
                status["lag"]["bytes"].as_i64().unwrap_or(0),
                status["transactions_applied"].as_i64().unwrap_or(0)
            );
        }
    }
    demo.tally
        .steps
        .push(("2. copy, then stream".into(), run_started.elapsed()));

    demo.cutover("3. watch", &["status"]).await?;
    demo.cutover("4. prove the target equal", &["verify"])
        .await?;

    let said = demo
        .cutover("5. switch the writes to the target", &["switch"])
        .await?;
    app.write_to_target(true);
    demo.tally.switch_window = window(&said);
    // 6. The application writes on the new primary; the reverse stream
    // carries it back.
    println!("\n── 6. writes on the new primary flow back to the old one ──");
    let before = app.seen.committed.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on_target = app.seen.committed.load(std::sync::atomic::Ordering::SeqCst) - before;
    // The application goes on writing: what the target held then must
    // reach the source.
    let back = Instant::now();
    let on_new = count(&target, "payments").await?;
    let mut on_source = count(&source, "payments").await?;
    while on_source < on_new && back.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        on_source = count(&source, "payments").await?;
    }
    println!(
        "    the application committed {on_target} payments on the target in 3 s; the target held {on_new} payments, and the source has them {:.2} s later",
        back.elapsed().as_secs_f64()
    );
    if on_source < on_new {
        return Err(step_error(
            "6. writes flow back",
            "the source did not catch up with the target in 60 s",
        ));
    }
    demo.cutover("6. watch the reverse stream", &["status"])
        .await?;

    let said = demo
        .cutover("7. roll back to the source", &["rollback"])
        .await?;
    app.write_to_target(false);
    demo.tally.rollback_window = window(&said);
    tokio::time::sleep(Duration::from_secs(1)).await;
    demo.cutover("8. prove the target equal again", &["verify"])
        .await?;
    demo.cutover(
        "9. sign off",
        &["accept", "--by", "cutover demo", "--role", "demonstration"],
    )
    .await?;

    let seen = app.stop().await;
    let committed = seen.committed.load(std::sync::atomic::Ordering::SeqCst);
    let refused = seen.refused.load(std::sync::atomic::Ordering::SeqCst);
    let gap = seen
        .longest_gap_us
        .load(std::sync::atomic::Ordering::SeqCst) as f64
        / 1e6;
    // Every payment the application committed is on both servers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let expected = (options.rows / 2).max(1) + committed as i64;
    loop {
        let (s, t) = (
            count(&source, "payments").await?,
            count(&target, "payments").await?,
        );
        if s == expected && t == expected {
            break;
        }
        if Instant::now() > deadline {
            return Err(step_error(
                "the application's writes",
                format!(
                    "{expected} payments expected on both servers; the source has {s}, the target {t}"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    if options.keep {
        source.keep = true;
        target.keep = true;
        let listen = std::fs::read_to_string(root.join("state/listen.json")).unwrap_or_default();
        let listen: serde_json::Value = serde_json::from_str(&listen).unwrap_or_default();
        let daemon = demo.daemon.take();
        summary(&demo.tally, options, committed, refused, gap, started);
        println!("\nLeft running (--keep):");
        println!("  source server    {}", source.psql());
        println!("  target server    {}", target.psql());
        if let Some(console) = listen["console"].as_str() {
            let (host, port) = console.rsplit_once(':').unwrap_or((console, "6433"));
            println!("  admin console    psql \"host={host} port={port} user=ops dbname=cutover\"");
        }
        if let Some(http) = listen["http"].as_str() {
            println!("  status page      http://{http}/   (and /metrics, /health)");
        }
        println!(
            "  cutover          {} --config {} status",
            demo.exe.display(),
            demo.config.display()
        );
        if let Some(pid) = daemon.as_ref().and_then(tokio::process::Child::id) {
            println!(
                "  stop it all      kill {pid}; {}; {}",
                source.stop_command(),
                target.stop_command()
            );
        }
        println!("  then             rm -rf {}", root.display());
        // The daemon outlives this process.
        std::mem::forget(daemon);
        return Ok(());
    }

    demo.stop_daemon().await?;
    demo.cutover("10. clean up", &["cleanup"]).await?;
    summary(&demo.tally, options, committed, refused, gap, started);
    source.stop();
    target.stop();
    drop(demo);
    let _ = std::fs::remove_dir_all(&root);
    println!("  nothing left running; {} removed", root.display());
    Ok(())
}

fn summary(
    tally: &Tally,
    options: &DemoOptions,
    committed: u64,
    refused: u64,
    gap: f64,
    started: Instant,
) {
    println!("\n── summary ──");
    for (step, took) in &tally.steps {
        println!("  {step:<40} {:>7.1} s", took.as_secs_f64());
    }
    let rows = options.rows + (options.rows / 10).max(1) + (options.rows / 2).max(1);
    println!("  rows migrated: {rows}");
    if let Some(window) = &tally.switch_window {
        println!("  switch: writes unavailable for {window} (cutover's measure, fence to open)");
    }
    if let Some(window) = &tally.rollback_window {
        println!("  rollback: writes unavailable for {window}");
    }
    println!(
        "  the application committed {committed} transactions, every one on both servers; {refused} attempts were refused while a switch moved the primary (longest wait {gap:.2} s, as the application saw it)"
    );
    println!(
        "  the whole demo took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_window_is_read_from_what_switch_prints() {
        let said =
            "checks...\nswitch 1 done, write-unavailability window 0.081 s\n  preflight 0.085 s";
        assert_eq!(super::window(said).as_deref(), Some("0.081 s"));
        let said = "write-unavailability window: 0.066 s (fence to new primary open)";
        assert_eq!(super::window(said).as_deref(), Some("0.066 s"));
        assert_eq!(super::window("nothing"), None);
    }
}
