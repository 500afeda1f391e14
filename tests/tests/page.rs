//! The status page at `/`, loaded in a real headless browser (Chromium,
//! which `make test` installs) while `cutover run` streams.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cutover_tests::http::get;
use cutover_tests::{ClusterOptions, Pair, wait_for};

const WAIT: Duration = Duration::from_secs(120);

/// The browser: `CUTOVER_CHROMIUM`, or Chromium on PATH.
fn chromium() -> String {
    if let Ok(path) = std::env::var("CUTOVER_CHROMIUM") {
        return path;
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("Chromium is not installed: make test installs it (apt-get install chromium), or set CUTOVER_CHROMIUM")
        .to_owned()
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn browse(profile: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            // Root in a container has no user namespace to sandbox into.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run Chromium");
    assert!(
        out.status.success(),
        "Chromium failed on {url}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_status_page_shows_a_streaming_migration_in_a_browser() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         CREATE TABLE \"odd <name>\" (id int PRIMARY KEY);",
    )
    .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 300) g;
             INSERT INTO \"odd <name>\" SELECT generate_series(1, 20);",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");
    let secret = cutover_tests::http::SECRET;
    let (mut daemon, addr) = cutover_tests::http::streaming_daemon(&config, dir.path()).await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'new' FROM generate_series(1001, 1040) g;
             UPDATE items SET v = 'changed' WHERE id <= 10;",
        )
        .await;
    pair.wait_equal(&["items"], WAIT).await;
    // Two lag samples or more: the chart is drawn.
    wait_for("the lag chart", WAIT, || async {
        let (code, body) = get(&addr, "/");
        assert_eq!(code, 200, "{body}");
        body.contains("id=\"chart-seconds\"").then_some(())
    })
    .await;

    assert_eq!(get(&addr, "/live"), (200, "alive\n".to_owned()));
    let url = format!("http://{addr}/");
    let profile = dir.path().join("chromium");
    let dom = browse(&profile, &url, &["--dump-dom"]);
    for shown in [
        r#"id="state">streaming<"#,
        "forward: source → target",
        r#"id="primary">source<"#,
        "<td>public.items</td><td>copied</td>",
        "<td>public.items</td><td>40</td><td>10</td><td>0</td><td>0</td>",
        "300 of 300",
        // Names are escaped, not markup.
        "<td>public.odd &lt;name&gt;</td>",
        "<polyline points=\"0.0,",
        "No switch yet",
    ] {
        assert!(dom.contains(shown), "the page lacks {shown:?}:\n{dom}");
    }
    assert!(!dom.contains(secret), "the page shows a password");
    assert!(
        !dom.contains("<name>"),
        "a name was taken as markup:\n{dom}"
    );

    // As a phone shows it.
    let shot = dir.path().join("status-page.png");
    browse(
        &profile,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=412,1600",
        ],
    );
    let png = std::fs::read(&shot).expect("Chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("CUTOVER_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    assert_eq!(daemon.terminate(WAIT), Some(0), "{}", daemon.log());
}
