//! Running the `cutover` binary the way an operator does.
//!
//! The binary is found through `CUTOVER_BIN`, else next to the test
//! executable (`target/<profile>/cutover`); `make test` builds it first.

use std::path::PathBuf;
use std::process::Command;

/// Environment variable naming the `cutover` binary to test.
pub const BIN_ENV: &str = "CUTOVER_BIN";

/// The `cutover` binary under test.
pub fn cutover_bin() -> PathBuf {
    if let Some(path) = std::env::var_os(BIN_ENV) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/cutover, or
    // target/<profile>/bench → target/<profile>/cutover.
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the executable's directory");
    let bin = if dir.join("cutover").is_file() {
        dir.join("cutover")
    } else {
        dir.parent()
            .expect("the test executable lives in target/<profile>/deps")
            .join("cutover")
    };
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p cutover` (make test does) or set {BIN_ENV}",
        bin.display()
    );
    bin
}

/// What a run of `cutover` printed and how it exited.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Outcome {
    /// Everything printed, for "never contains" assertions.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cutover --config config args` on a blocking thread, so that the
/// test's application tasks go on writing meanwhile, with
/// `CUTOVER_FAILPOINT` set to `failpoint` when given.
pub async fn cutover_beside(
    config: &std::path::Path,
    args: &[&str],
    failpoint: Option<&str>,
) -> Outcome {
    let mut all = vec!["--config".to_owned(), config.to_str().unwrap().to_owned()];
    all.extend(args.iter().map(|a| a.to_string()));
    let failpoint = failpoint.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = failpoint
            .as_deref()
            .map(|f| vec![("CUTOVER_FAILPOINT", f)])
            .unwrap_or_default();
        run_cutover(&all, &env)
    })
    .await
    .expect("the cutover command's thread")
}

/// Runs `cutover` with `args` and extra environment variables. Variables
/// of the test process starting with `CUTOVER__` are removed so a
/// developer's shell cannot change a test's outcome.
pub fn run_cutover(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new(cutover_bin());
    cmd.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("CUTOVER__") || name == "CUTOVER_CONFIG" || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let out = cmd.output().expect("run the cutover binary");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes a config file into `dir` and returns its path.
pub fn write_config(dir: &std::path::Path, text: &str) -> PathBuf {
    let path = dir.join("cutover.toml");
    std::fs::write(&path, text).expect("write the test config");
    path
}
