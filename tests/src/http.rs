//! The daemon's HTTP endpoints as a test reads them: no HTTP client
//! dependency for two GET requests.

use std::io::{Read, Write};
use std::time::Duration;

/// `GET path` over HTTP/1.0: (status code, body).
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of the metric line starting with `series` (name and labels).
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The HTTP address a daemon recorded in its state directory
/// (`listen.json`), once it is there.
pub async fn listen_addr(state: &std::path::Path) -> String {
    crate::wait_for(
        "the HTTP address in listen.json",
        Duration::from_secs(120),
        || async {
            let text = std::fs::read_to_string(state.join("listen.json")).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            json["http"].as_str().map(str::to_owned)
        },
    )
    .await
}

/// `promtool check metrics` accepts the exposition (format and naming
/// lint); `make test` installs promtool (Debian package `prometheus`).
pub fn promtool_check(body: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (make test installs it: apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A password the trust-authenticated test servers ignore, given to a
/// daemon so that a test can check it shows nowhere.
pub const SECRET: &str = "sup3r-s3cret-pw";

/// Starts `cutover run` on `config` (whose state is in `dir/state`),
/// sampling lag every second, with [`SECRET`] as both servers' password;
/// returns it and its HTTP address once it streams.
pub async fn streaming_daemon(
    config: &std::path::Path,
    dir: &std::path::Path,
) -> (crate::Daemon, String) {
    let daemon = crate::Daemon::start_with_env(
        config,
        &["run"],
        &[
            ("CUTOVER__STATE__LAG_SAMPLE_SECONDS", "1"),
            ("CUTOVER__SOURCE__PASSWORD", SECRET),
            ("CUTOVER__TARGET__PASSWORD", SECRET),
        ],
    );
    let addr = listen_addr(&dir.join("state")).await;
    crate::wait_for("the daemon to stream", Duration::from_secs(120), || async {
        (get(&addr, "/ready").0 == 200).then_some(())
    })
    .await;
    (daemon, addr)
}
