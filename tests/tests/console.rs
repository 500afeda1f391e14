//! The admin console (psql and a driver against `[console] listen`) and
//! `cutover status`, while the daemon runs and after it stopped.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cutover_tests::cluster::bindir;
use cutover_tests::http::{get, metric};
use cutover_tests::{ClusterOptions, Daemon, Pair, run_cutover, wait_for};
use tokio_postgres::SimpleQueryMessage;

const WAIT: Duration = Duration::from_secs(120);
const PASSWORD: &str = "console-pw-9f3";

/// The console address the daemon recorded in its state directory.
async fn console_addr(state: &Path) -> String {
    wait_for("the console address in listen.json", WAIT, || async {
        let text = std::fs::read_to_string(state.join("listen.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["console"].as_str().map(str::to_owned)
    })
    .await
}

/// `psql -c command` against the console: (success, stdout, stderr).
fn psql(addr: &str, password: Option<&str>, command: &str) -> (bool, String, String) {
    psql_with(addr, password, command, &[])
}

/// [`psql`] with more libpq variables (`PGSSLMODE`...).
fn psql_with(
    addr: &str,
    password: Option<&str>,
    command: &str,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut cmd = Command::new(bindir().join("psql"));
    cmd.args([
        "-X", "-h", host, "-p", port, "-U", "ops", "-d", "cutover", "-c", command,
    ])
    .env_remove("PGPASSWORD")
    .env("PGCONNECT_TIMEOUT", "10")
    .envs(env.iter().copied());
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.arg("-w"),
    };
    let out = cmd.output().expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn console(addr: &str, password: &str) -> tokio_postgres::Client {
    try_console(addr, password)
        .await
        .expect("connect to the console with the password")
}

async fn try_console(
    addr: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let (client, connection) = tokio_postgres::Config::new()
        .host(host)
        .port(port.parse().unwrap())
        .user("ops")
        .dbname("cutover")
        .password(password)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The SQLSTATE and message a console login was refused with.
async fn refusal(addr: &str, password: &str) -> (String, String) {
    match try_console(addr, password).await {
        Ok(_) => panic!("the console let {password:?} in"),
        Err(err) => {
            let db = err
                .as_db_error()
                .unwrap_or_else(|| panic!("not a server error: {err:?}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

/// The first row of `command`, as (column, value) pairs.
async fn first_row(
    client: &tokio_postgres::Client,
    command: &str,
) -> Vec<(String, Option<String>)> {
    all_rows(client, command)
        .await
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{command} returned no row"))
}

async fn all_rows(
    client: &tokio_postgres::Client,
    command: &str,
) -> Vec<Vec<(String, Option<String>)>> {
    client
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), row.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn value(row: &[(String, Option<String>)], column: &str) -> Option<String> {
    row.iter()
        .find(|(c, _)| c == column)
        .unwrap_or_else(|| panic!("no column {column} in {row:?}"))
        .1
        .clone()
}

async fn target_count(pair: &Pair) -> i64 {
    pair.target
        .query_value("app", "SELECT count(*) FROM items")
        .await
}

#[tokio::test]
async fn psql_reads_the_console_and_pause_holds_the_applier_until_resume() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 100) g",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let env = [
        ("CUTOVER__CONSOLE__PASSWORD", PASSWORD),
        ("CUTOVER__STATE__LAG_SAMPLE_SECONDS", "1"),
    ];
    let mut daemon = Daemon::start_with_env(&config, &["run"], &env);
    let state = dir.path().join("state");
    let addr = console_addr(&state).await;
    pair.wait_equal(&["items"], WAIT).await;
    let client = console(&addr, PASSWORD).await;
    wait_for("the daemon to stream", WAIT, || async {
        let row = first_row(&client, "SHOW STATUS").await;
        (value(&row, "state").as_deref() == Some("streaming")).then_some(())
    })
    .await;

    // psql shows typed row sets as tables; case and semicolon do not matter.
    let (ok, out, err) = psql(&addr, Some(PASSWORD), "show status");
    assert!(ok, "psql SHOW STATUS failed: {err}");
    assert!(
        out.contains("state") && out.contains("lag_seconds"),
        "{out}"
    );
    assert!(out.contains("streaming"), "{out}");
    assert!(out.contains("(1 row)"), "{out}");
    let (ok, out, err) = psql(&addr, Some(PASSWORD), "SHOW TABLES;");
    assert!(ok, "psql SHOW TABLES failed: {err}");
    assert!(
        out.contains("public.items") && out.contains("copied"),
        "{out}"
    );
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));

    // A wrong password and no password are refused.
    let (ok, _, err) = psql(&addr, Some("wrong"), "SHOW STATUS");
    assert!(!ok, "a wrong password was accepted");
    assert!(err.to_lowercase().contains("password"), "{err}");
    let (ok, _, _) = psql(&addr, None, "SHOW STATUS");
    assert!(!ok, "no password was accepted");

    // An unknown command answers with the list of commands.
    let (ok, _, err) = psql(&addr, Some(PASSWORD), "SELECT 1");
    assert!(!ok);
    assert!(
        err.contains("unknown console command")
            && err.contains("SHOW HISTORY")
            && err.contains("RESUME"),
        "{err}"
    );

    // Typed columns, read through a driver.
    let status = client.simple_query("SHOW STATUS").await.unwrap();
    let SimpleQueryMessage::RowDescription(columns) = &status[0] else {
        panic!("no row description: {status:?}");
    };
    let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
    assert!(
        names.contains(&"applied_lsn") && names.contains(&"pid"),
        "{names:?}"
    );

    // PAUSE under a write workload: changes are received, not applied, and
    // lag in bytes and seconds rises in SHOW LAG and /metrics alike.
    client.simple_query("pause;").await.expect("PAUSE");
    let row = first_row(&client, "SHOW STATUS").await;
    assert_eq!(value(&row, "state").as_deref(), Some("paused"));
    assert_eq!(value(&row, "paused").as_deref(), Some("t"));
    assert!(value(&row, "applied_lsn").is_some(), "{row:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let source = pair.source.client("app").await;
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut id: i32 = 1000;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                source
                    .execute("INSERT INTO items VALUES ($1, 'while paused')", &[&id])
                    .await
                    .expect("write on the source");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            i64::from(id - 1000)
        })
    };
    let http = cutover_tests::http::listen_addr(&state).await;
    wait_for(
        "lag to rise in SHOW LAG and /metrics while paused",
        WAIT,
        || async {
            let row = first_row(&client, "SHOW LAG").await;
            let seconds: f64 = value(&row, "lag_seconds")?.parse().ok()?;
            let bytes: i64 = value(&row, "lag_bytes")?.parse().ok()?;
            let (_, body) = get(&http, "/metrics");
            let metric_seconds = metric(&body, "cutover_lag_seconds{direction=\"forward\"}")?;
            let metric_bytes = metric(&body, "cutover_lag_bytes{direction=\"forward\"}")?;
            (seconds >= 2.0 && bytes > 0 && metric_seconds >= 2.0 && metric_bytes > 0.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        target_count(&pair).await,
        100,
        "a change was applied while paused"
    );

    // `cutover status` asks the running daemon through the console.
    let config_arg = config.to_str().unwrap();
    let human = run_cutover(&["--config", config_arg, "status"], &env);
    assert_eq!(human.code, 0, "{}", human.all_output());
    assert!(human.stdout.contains("cutover: paused"), "{}", human.stdout);
    assert!(human.stdout.contains("public.items"), "{}", human.stdout);
    assert!(!human.all_output().contains(PASSWORD));
    let json = run_cutover(
        &["--config", config_arg, "status", "--format", "json"],
        &env,
    );
    assert_eq!(json.code, 0, "{}", json.all_output());
    let json: serde_json::Value = serde_json::from_str(&json.stdout).expect("status JSON");
    assert_eq!(json["running"], true);
    assert_eq!(json["source"], "daemon");
    assert_eq!(json["state"], "paused");
    assert!(json["lag"]["seconds"].as_f64().unwrap() >= 2.0, "{json}");
    assert_eq!(json["tables"][0]["table"], "public.items");
    assert_eq!(json["tables"][0]["rows_copied"], 100);

    // RESUME: the held changes arrive and lag returns to 0 everywhere.
    client.simple_query("Resume").await.expect("RESUME");
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("the writer");
    pair.wait_equal(&["items"], WAIT).await;
    assert_eq!(target_count(&pair).await, 100 + written);
    let row = first_row(&client, "show status").await;
    assert_eq!(value(&row, "state").as_deref(), Some("streaming"));
    let tables = all_rows(&client, "SHOW TABLES").await;
    assert_eq!(value(&tables[0], "inserts"), Some(written.to_string()));
    wait_for("lag back to 0 in SHOW LAG and /metrics", WAIT, || async {
        let row = first_row(&client, "SHOW LAG").await;
        let (_, body) = get(&http, "/metrics");
        let zero = value(&row, "lag_seconds").as_deref() == Some("0")
            && value(&row, "lag_bytes").as_deref() == Some("0")
            && metric(&body, "cutover_lag_seconds{direction=\"forward\"}") == Some(0.0)
            && metric(&body, "cutover_lag_bytes{direction=\"forward\"}") == Some(0.0);
        zero.then_some(())
    })
    .await;

    // The lag history holds samples, oldest first, and honours a count.
    let history = wait_for("two lag samples", WAIT, || async {
        let rows = all_rows(&client, "SHOW HISTORY ALL").await;
        (rows.len() >= 2).then_some(rows)
    })
    .await;
    let times: Vec<String> = history
        .iter()
        .map(|r| value(r, "sampled_at").unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "history is not oldest first");
    assert_eq!(all_rows(&client, "SHOW HISTORY 1").await.len(), 1);
    let error = client.simple_query("SHOW HISTORY zero").await.unwrap_err();
    let db = error.as_db_error().expect("an error from the console");
    assert_eq!(db.code().code(), "42601");
    assert!(db.message().contains("positive number"), "{db:?}");

    // Stopped: `status` reads the store.
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
    let stopped = run_cutover(
        &["--config", config_arg, "status", "--format", "json"],
        &env,
    );
    assert_eq!(stopped.code, 0, "{}", stopped.all_output());
    let json: serde_json::Value = serde_json::from_str(&stopped.stdout).expect("status JSON");
    assert_eq!(json["running"], false);
    assert_eq!(json["source"], "state store");
    assert_eq!(json["state"], "stopped");
    assert!(json["applied_lsn"].is_string(), "{json}");
    // With no daemon, the slot still holds WAL: status asks the source.
    assert!(
        json["lag"]["slot_retained_bytes"].as_i64().is_some(),
        "{json}"
    );
    assert_eq!(json["lag"]["wal_status"], "reserved", "{json}");
    assert!(json["lag"]["bytes"].as_i64().is_some(), "{json}");
    assert_eq!(json["tables"][0]["copy_state"], "copied");
    assert_eq!(json["tables"][0]["source_rows"], 100);
    let human = run_cutover(&["--config", config_arg, "status"], &env);
    assert!(
        human
            .stdout
            .contains("no daemon running; last recorded state: stopped"),
        "{}",
        human.stdout
    );
}

#[tokio::test]
async fn without_a_password_the_console_is_off_unless_explicitly_opened_on_loopback() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;

    // No password: no console, a warning, and `status` says how to fix it.
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start(&config, &["run"]);
    let state = dir.path().join("state");
    wait_for("the daemon to stream", WAIT, || async {
        daemon.log().contains("to=\"streaming\"").then_some(())
    })
    .await;
    assert!(
        daemon.log().contains("the admin console is off"),
        "{}",
        daemon.log()
    );
    let listen = std::fs::read_to_string(state.join("listen.json")).unwrap();
    assert!(!listen.contains("console"), "{listen}");
    let status = run_cutover(&["--config", config.to_str().unwrap(), "status"], &[]);
    assert_eq!(status.code, 1, "{}", status.all_output());
    assert!(
        status.stderr.contains("console is off") && status.stderr.contains("console.password"),
        "{}",
        status.stderr
    );
    assert_eq!(daemon.terminate(WAIT), Some(0));

    // Open on loopback when the config says so.
    let mut daemon = Daemon::start_with_env(
        &config,
        &["run"],
        &[("CUTOVER__CONSOLE__ALLOW_NO_PASSWORD", "true")],
    );
    let addr = console_addr(&state).await;
    let (ok, out, err) = wait_for("psql without a password", WAIT, || async {
        let (ok, out, err) = psql(&addr, None, "SHOW LAG");
        ok.then_some((ok, out, err))
    })
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("lag_bytes") && out.contains("wal_status"),
        "{out}"
    );
    assert!(
        daemon.log().contains("WITHOUT a password"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

#[tokio::test]
async fn password_guesses_are_refused_for_longer_each_time_per_address() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let mut daemon = Daemon::start_with_env(
        &config,
        &["run"],
        &[("CUTOVER__CONSOLE__PASSWORD", PASSWORD)],
    );
    let state = dir.path().join("state");
    let addr = console_addr(&state).await;
    let http = std::fs::read_to_string(state.join("listen.json")).unwrap();
    let http: serde_json::Value = serde_json::from_str(&http).unwrap();
    let http = http["http"].as_str().unwrap().to_owned();
    let client = console(&addr, PASSWORD).await;

    // A client that names itself logged in (a startup parameter of the
    // marker's name), fails the login (a SASL mechanism the console does
    // not offer) and sends a command right behind: not run.
    let mut bogus = vec![b'p'];
    let body = b"BOGUS\0\xff\xff\xff\xff";
    bogus.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    bogus.extend_from_slice(body);
    pipelined(&addr, b"cutover.authenticated\x001\0", &bogus, "PAUSE");
    let row = first_row(&client, "SHOW STATUS").await;
    assert_eq!(value(&row, "paused").as_deref(), Some("f"), "{row:?}");
    drop(client);

    // Three typos are free; the fourth wrong password refuses the address
    // for 1 s, the fifth (after that second) for 2 s, the right password
    // included.
    for attempt in 1..=4 {
        let (code, message) = refusal(&addr, &format!("guess-{attempt}")).await;
        assert_eq!(code, "28P01", "attempt {attempt}: {message}");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, _) = refusal(&addr, "guess-5").await;
    assert_eq!(code, "28P01");
    let (code, message) = refusal(&addr, PASSWORD).await;
    assert_eq!(code, "28000", "{message}");
    assert!(
        message.contains("too many failed password attempts from 127.0.0.1")
            && (message.contains("2 s more") || message.contains("1 s more")),
        "{message}"
    );
    let (_, body) = get(&http, "/metrics");
    assert_eq!(
        metric(&body, "cutover_console_failed_logins_total"),
        Some(5.0),
        "{body}"
    );

    // After the refusal the right password logs in, and the count starts
    // again: the next wrong one is not refused.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    drop(console(&addr, PASSWORD).await);
    let (code, _) = refusal(&addr, "guess-6").await;
    assert_eq!(code, "28P01");
    drop(console(&addr, PASSWORD).await);

    let log = daemon.log();
    assert!(log.contains("console: a wrong password"), "{log}");
    assert!(!log.contains(PASSWORD) && !log.contains("guess-"), "{log}");
    assert_eq!(daemon.terminate(WAIT), Some(0));
}

/// Sends a plain StartupMessage and, right behind it, `command` as a
/// simple query, then reads until the console closes the connection.
fn pipelined_after_refusal(addr: &str, command: &str) {
    pipelined(addr, b"", b"", command);
}

/// [`pipelined_after_refusal`] with more startup parameters
/// (`name\0value\0`...) and more messages between the startup and the
/// query.
fn pipelined(addr: &str, parameters: &[u8], between: &[u8], command: &str) {
    use std::io::{Read, Write};
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(b"user\0ops\0database\0cutover\0");
    startup.extend_from_slice(parameters);
    startup.push(0);
    let mut bytes = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&startup);
    bytes.extend_from_slice(between);
    bytes.push(b'Q');
    bytes.extend_from_slice(&((command.len() + 5) as u32).to_be_bytes());
    bytes.extend_from_slice(command.as_bytes());
    bytes.push(0);
    let mut socket = std::net::TcpStream::connect(addr).expect("connect to the console");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.write_all(&bytes).expect("send");
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    assert!(
        answer.windows(6).any(|w| w == b"SFATAL"),
        "not refused: {answer:?}"
    );
    // Let the console process whatever it read before checking.
    std::thread::sleep(Duration::from_millis(300));
}

/// The value of `name` in psql's aligned output of one row.
fn column(out: &str, name: &str) -> Option<String> {
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next()?.split('|').map(str::trim).collect();
    let index = header.iter().position(|h| *h == name)?;
    let row = lines.nth(1)?;
    row.split('|').nth(index).map(|v| v.trim().to_owned())
}

/// A self-signed certificate and its key, as PEM files in `dir`.
fn certificate(dir: &Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=cutover-console"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (tests/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn with_a_certificate_the_console_serves_tls_only_and_cutover_status_uses_it() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "console");
    let (other_cert, other_key) = certificate(dir.path(), "other");
    let config = pair.config(dir.path(), "");
    let check = |env: &[(&str, &str)]| {
        let mut all = vec![("CUTOVER__CONSOLE__PASSWORD", PASSWORD)];
        all.extend_from_slice(env);
        run_cutover(&["--config", config.to_str().unwrap(), "check"], &all)
    };

    // Bad settings stop the start, naming the key to fix.
    let out = check(&[("CUTOVER__CONSOLE__TLS_CERT", &cert)]);
    assert_eq!(out.code, 2, "{}", out.all_output());
    assert!(out.stderr.contains("console.tls_key"), "{}", out.stderr);
    let out = check(&[
        ("CUTOVER__CONSOLE__TLS_CERT", &cert),
        ("CUTOVER__CONSOLE__TLS_KEY", &other_key),
    ]);
    assert_eq!(out.code, 2, "{}", out.all_output());
    assert!(
        out.stderr.contains("console.tls_key") && out.stderr.contains("private key"),
        "{}",
        out.stderr
    );
    let missing = dir.path().join("missing.crt");
    let out = check(&[
        ("CUTOVER__CONSOLE__TLS_CERT", missing.to_str().unwrap()),
        ("CUTOVER__CONSOLE__TLS_KEY", &key),
    ]);
    assert_eq!(out.code, 2, "{}", out.all_output());
    assert!(out.stderr.contains("console.tls_cert"), "{}", out.stderr);
    // Beyond loopback without TLS, check warns.
    let out = check(&[("CUTOVER__CONSOLE__LISTEN", "0.0.0.0:0")]);
    assert!(
        out.all_output()
            .contains("listens on 0.0.0.0:0 without TLS"),
        "{}",
        out.all_output()
    );
    let out = check(&[
        ("CUTOVER__CONSOLE__LISTEN", "0.0.0.0:0"),
        ("CUTOVER__CONSOLE__TLS_CERT", &cert),
        ("CUTOVER__CONSOLE__TLS_KEY", &key),
    ]);
    assert!(
        !out.all_output()
            .contains("listens on 0.0.0.0:0 without TLS"),
        "{}",
        out.all_output()
    );

    let env = [
        ("CUTOVER__CONSOLE__PASSWORD", PASSWORD),
        ("CUTOVER__CONSOLE__TLS_CERT", cert.as_str()),
        ("CUTOVER__CONSOLE__TLS_KEY", key.as_str()),
    ];
    let mut daemon = Daemon::start_with_env(&config, &["run"], &env);
    let state = dir.path().join("state");
    let addr = console_addr(&state).await;

    // Plain text is refused, with the way to connect.
    let (ok, _, err) = psql_with(
        &addr,
        Some(PASSWORD),
        "SHOW STATUS",
        &[("PGSSLMODE", "disable")],
    );
    assert!(!ok, "a plain connection was served");
    assert!(
        err.contains("TLS only") && err.contains("sslmode=require"),
        "{err}"
    );
    // A command sent right behind a refused login is not run (pgwire
    // keeps reading after the FATAL).
    pipelined_after_refusal(&addr, "PAUSE");

    // Encrypted, and verified against the certificate as its own root.
    for env in [
        vec![("PGSSLMODE", "require")],
        vec![("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", cert.as_str())],
    ] {
        let (ok, out, err) = wait_for("psql over TLS", WAIT, || async {
            let (ok, out, err) = psql_with(&addr, Some(PASSWORD), "SHOW STATUS", &env);
            (ok || !err.contains("starting")).then_some((ok, out, err))
        })
        .await;
        assert!(ok, "{env:?}: {err}");
        assert!(out.contains("state"), "{out}");
    }
    // Another certificate is not the console's.
    let (ok, _, err) = psql_with(
        &addr,
        Some(PASSWORD),
        "SHOW STATUS",
        &[("PGSSLMODE", "verify-ca"), ("PGSSLROOTCERT", &other_cert)],
    );
    assert!(!ok, "verified against the wrong root");
    assert!(err.contains("certificate"), "{err}");

    let (ok, out, err) = psql_with(
        &addr,
        Some(PASSWORD),
        "SHOW STATUS",
        &[("PGSSLMODE", "require")],
    );
    assert!(ok, "{err}");
    assert_eq!(column(&out, "paused").as_deref(), Some("f"), "{out}");

    // cutover's own commands reach it over TLS, trusting that certificate.
    wait_for("cutover status to say streaming", WAIT, || async {
        let status = run_cutover(&["--config", config.to_str().unwrap(), "status"], &env);
        assert_eq!(status.code, 0, "{}", status.all_output());
        status.stdout.contains("streaming").then_some(())
    })
    .await;
    // ... and no other certificate.
    let status = run_cutover(
        &["--config", config.to_str().unwrap(), "status"],
        &[
            ("CUTOVER__CONSOLE__PASSWORD", PASSWORD),
            ("CUTOVER__CONSOLE__TLS_CERT", other_cert.as_str()),
            ("CUTOVER__CONSOLE__TLS_KEY", other_key.as_str()),
        ],
    );
    assert!(
        status.all_output().contains("certificate"),
        "{}",
        status.all_output()
    );
    assert!(daemon.log().contains("TLS only"), "{}", daemon.log());
    assert_eq!(daemon.terminate(WAIT), Some(0));
}
