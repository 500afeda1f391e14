//! `cutover demo`, the README's first command, on a small dataset: the
//! whole journey works, and it leaves nothing running; `--keep` leaves
//! the servers and the daemon up and says how to reach and stop them.

use cutover_tests::cli::run_cutover;
use cutover_tests::http::get;

/// The demo's directory, from its first line.
fn demo_dir(stdout: &str) -> std::path::PathBuf {
    let first = stdout.lines().next().unwrap_or_default();
    // "... clusters in <dir>": the last word.
    let dir = first.rsplit(' ').next().unwrap_or_default();
    assert!(dir.contains("/cutover-demo-"), "{first}");
    std::path::PathBuf::from(dir)
}

/// The servers' ports, from the demo's second and third lines.
fn ports(stdout: &str) -> Vec<u16> {
    stdout
        .lines()
        .filter_map(|l| {
            let url = l
                .trim_start()
                .strip_prefix("source  ")
                .or_else(|| l.trim_start().strip_prefix("target  "))?;
            let port = url
                .strip_prefix("postgres://postgres@127.0.0.1:")?
                .split('/')
                .next()?;
            port.parse().ok()
        })
        .collect()
}

/// Whether something listens on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Processes whose command line names `dir`.
fn processes_in(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-af", &format!("{}/", dir.display())])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_walks_the_whole_journey_and_leaves_nothing_running() {
    let out = run_cutover(&["demo", "--rows", "2000"], &[]);
    let said = out.all_output();
    assert_eq!(out.code, 0, "{said}");
    for step in [
        "── 1. preflight: cutover check",
        "0 blocking",
        "table copied table=public.beneficiaries rows=2000",
        "streaming: lag",
        "── 5. switch the writes to the target: cutover switch",
        "primary: target",
        "── 7. roll back to the source: cutover rollback",
        "primary: source",
        "accepted by cutover demo (demonstration)",
        "source: dropped",
        "switch: writes unavailable for",
        "every one on both servers",
        "nothing left running",
    ] {
        assert!(
            said.contains(step),
            "the demo did not say {step:?}:\n{said}"
        );
    }
    assert_eq!(
        said.matches("VALIDATED: the target holds exactly").count(),
        2,
        "{said}"
    );
    let dir = demo_dir(&out.stdout);
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert_eq!(processes_in(&dir), Vec::<String>::new());
    let ports = ports(&out.stdout);
    assert_eq!(ports.len(), 2, "{said}");
    assert!(
        !ports.iter().any(|p| listening(*p)),
        "a server still runs: {ports:?}"
    );
}

#[test]
fn with_keep_the_servers_and_the_daemon_stay_up_and_it_says_how_to_stop_them() {
    let out = run_cutover(&["demo", "--rows", "500", "--keep"], &[]);
    let said = out.all_output();
    assert_eq!(out.code, 0, "{said}");
    let dir = demo_dir(&out.stdout);
    let line = |label: &str| {
        said.lines()
            .find_map(|l| l.trim_start().strip_prefix(label).map(str::trim))
            .unwrap_or_else(|| panic!("no {label:?} line:\n{said}"))
            .to_owned()
    };
    // The status page answers, and both servers run.
    let page = line("status page");
    let addr = page
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let (code, body) = get(&addr, "/");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("streaming"), "{body}");
    // The last move, the rollback, with its window and its journal.
    for shown in [
        "<h2>rollback #2",
        "id=\"window\"",
        "<li>fence ",
        "<li>open ",
    ] {
        assert!(
            body.contains(shown),
            "the status page lacks {shown:?}:\n{body}"
        );
    }
    assert_eq!(processes_in(&dir).len(), 1, "the daemon runs");
    let ports = ports(&out.stdout);
    assert_eq!(ports.len(), 2, "{said}");
    assert!(
        ports.iter().all(|p| listening(*p)),
        "both servers run: {ports:?}"
    );
    assert!(line("source server").starts_with("psql "), "{said}");
    assert!(line("admin console").contains("dbname=cutover"), "{said}");
    // What it says stops everything.
    let stop = line("stop it all");
    let done = std::process::Command::new("sh")
        .args(["-c", &stop])
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{stop}: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !processes_in(&dir).is_empty() || ports.iter().any(|p| listening(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            processes_in(&dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
