//! The `cutover` daemon as a child process the test controls: started,
//! killed with SIGKILL, stopped with SIGTERM, its log printed when a test
//! fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cli::cutover_bin;

/// A running `cutover` process.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    starts: usize,
    /// Where this start's lines begin in the log file.
    since: u64,
    config: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts `cutover --config <config> <args>`, output to a log file next
    /// to the config.
    pub fn start(config: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_env(config, args, &[])
    }

    /// [`Daemon::start`] with extra environment variables (such as
    /// `CUTOVER__SECTION__KEY` overrides).
    pub fn start_with_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon {
            child: None,
            log: config.with_extension("log"),
            starts: 0,
            since: 0,
            config: config.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the daemon log");
        self.starts += 1;
        self.since = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(cutover_bin())
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            // CUTOVER_TEST_LOG=debug shows more of the daemon in a failing test.
            .env(
                "RUST_LOG",
                std::env::var("CUTOVER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start cutover");
        self.child = Some(child);
    }

    /// Starts `cutover run` and waits until it streams (panics with its
    /// log if it stops on an error first).
    pub async fn start_streaming(config: &Path) -> Daemon {
        let daemon = Daemon::start(config, &["run"]);
        crate::wait_for("the daemon to stream", Duration::from_secs(120), || async {
            // Only this start's lines: the log file may hold earlier ones.
            let log = daemon.log_of_this_start();
            assert!(!log.contains("error:"), "the daemon failed:\n{log}");
            log.contains("to=\"streaming\"").then_some(())
        })
        .await;
        daemon
    }

    /// Starts it again with the same arguments.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
    }

    /// SIGKILL: no cleanup of any kind, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_ref()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        self.wait(timeout)
    }

    /// Waits for the process to exit by itself; `None` on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// What it logged since it was last started.
    pub fn log_of_this_start(&self) -> String {
        let log = self.log();
        log.get(self.since as usize..)
            .unwrap_or_default()
            .to_owned()
    }

    /// Everything it logged, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- cutover log ({} starts) ---\n{}--- end of cutover log ---",
                self.starts,
                self.log()
            );
        }
    }
}
