//! The running daemon, asked through its admin console to hold the target
//! at the compared position while the verify takes its snapshot (the
//! protocol is in [`crate::hold`]).

use std::time::Duration;

use cutover_replication::Lsn;
use cutover_replication::client::describe;
use tokio_postgres::Client;

use crate::config::Config;
use crate::live::Status;
use crate::status::{connect_console, console_address, rows, text};

use super::VerifyError;

/// How long the applier may take to finish its batch in flight.
const ARM_WAIT: Duration = Duration::from_secs(120);
/// How long the daemon may take to apply what the source committed before
/// the compared position (it may be behind).
const CATCH_UP_WAIT: Duration = Duration::from_secs(3600);

fn console_error(detail: String) -> VerifyError {
    VerifyError::Daemon(detail)
}

/// The console of the daemon that holds the state store, and the groups
/// moved to the target.
pub(super) async fn connect(config: &Config) -> Result<(Client, Vec<String>), VerifyError> {
    let Some(addr) = console_address(&config.state_dir) else {
        return Err(console_error(format!(
            "a daemon holds {} but its admin console is off: set console.password (or console.password_file) in its config and restart it, so that verify can hold it at the compared position",
            config.state_dir.display()
        )));
    };
    let client = connect_console(addr, config, "cutover verify")
        .await
        .map_err(|e| console_error(format!("its console at {addr} did not answer: {e}")))?;
    let status = rows(&client, "SHOW STATUS").await.map_err(console_error)?;
    let state = status
        .first()
        .and_then(|row| text(row, "state"))
        .unwrap_or_default();
    let direction = status
        .first()
        .and_then(|row| text(row, "direction"))
        .unwrap_or_default();
    if direction == "reverse" {
        return Err(VerifyError::Switched);
    }
    if state != "streaming" {
        return Err(console_error(format!(
            "the daemon is {state}: verify compares a streaming migration (wait until the copy is done; RESUME a paused daemon)"
        )));
    }
    let moved = status
        .first()
        .and_then(|row| text(row, "moved_groups"))
        .unwrap_or_default()
        .split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((client, moved))
}

/// Sends `command` and waits until the daemon's applier stopped under it;
/// returns where.
async fn hold(
    client: &Client,
    command: &str,
    wait: Duration,
    reverse: bool,
) -> Result<Lsn, VerifyError> {
    client
        .simple_query(command)
        .await
        .map_err(|e| console_error(format!("{command}: {}", describe(&e))))?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut said = tokio::time::Instant::now();
    loop {
        let show = if reverse {
            "SHOW HOLD REVERSE"
        } else {
            "SHOW HOLD"
        };
        let hold = rows(client, show).await.map_err(console_error)?;
        let row = hold.first();
        if row.and_then(|r| text(r, "hold")).as_deref() == Some("off") {
            return Err(console_error(
                "the daemon's hold was released (an operator sent RELEASE FORCE): run verify again"
                    .into(),
            ));
        }
        if let Some(reached) = row
            .and_then(|r| text(r, "reached_lsn"))
            .and_then(|l| l.parse().ok())
        {
            return Ok(reached);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(console_error(format!(
                "the daemon did not stop under `{command}` within {wait:?}: it may be far behind the source (see cutover status)"
            )));
        }
        if said.elapsed() > Duration::from_secs(10) {
            tracing::info!(
                command,
                "waiting for the daemon to reach the compared position"
            );
            said = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ` REVERSE` for the reverse stream's commands.
fn of(reverse: bool) -> &'static str {
    if reverse { " REVERSE" } else { "" }
}

/// `HOLD`: the daemon applies nothing new (with `reverse`, its reverse
/// stream). Waits while another verify (the background verifier) holds it.
pub(super) async fn arm(client: &Client, reverse: bool) -> Result<Lsn, VerifyError> {
    let deadline = tokio::time::Instant::now() + ARM_WAIT;
    loop {
        match hold(client, &format!("HOLD{}", of(reverse)), ARM_WAIT, reverse).await {
            Err(VerifyError::Daemon(message))
                if message.contains("another verify holds")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// `HOLD AT 'at'`: the daemon applies what commits before `at`, then
/// nothing.
pub(super) async fn hold_at(client: &Client, at: Lsn, reverse: bool) -> Result<Lsn, VerifyError> {
    hold(
        client,
        &format!("HOLD{} AT '{at}'", of(reverse)),
        CATCH_UP_WAIT,
        reverse,
    )
    .await
}

/// `RELEASE`: the daemon goes on.
pub(super) async fn release(client: &Client, reverse: bool) -> Result<(), VerifyError> {
    let command = format!("RELEASE{}", of(reverse));
    client
        .simple_query(&command)
        .await
        .map(|_| ())
        .map_err(|e| console_error(format!("{command}: {}", describe(&e))))
}

/// Who holds the daemon's applier, and how: a verify through the daemon's
/// console, or the background verifier inside the daemon.
pub(super) enum Holder<'a> {
    /// `cutover verify` beside a running daemon (with `true`: its reverse
    /// stream).
    Console(&'a Client, bool),
    /// The background verifier ([`super::continuous`]).
    InProcess {
        /// The daemon's live state, which holds the hold.
        status: &'a Status,
        /// The name the hold is taken under.
        owner: &'static str,
    },
}

impl Holder<'_> {
    /// The applier applies nothing new; returns what it had applied.
    /// Waits while another holder has it.
    pub(super) async fn arm(&self) -> Result<Lsn, VerifyError> {
        match self {
            Holder::Console(client, reverse) => arm(client, *reverse).await,
            Holder::InProcess { status, owner } => {
                while status.hold.arm(owner).is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                self.reached(ARM_WAIT).await
            }
        }
    }

    /// The applier applies what commits before `at`, then nothing; returns
    /// where it stopped.
    pub(super) async fn hold_at(&self, at: Lsn) -> Result<Lsn, VerifyError> {
        match self {
            Holder::Console(client, reverse) => hold_at(client, at, *reverse).await,
            Holder::InProcess { status, owner } => {
                status
                    .hold
                    .hold_at(owner, at)
                    .map_err(|e| VerifyError::Daemon(e.to_string()))?;
                self.reached(CATCH_UP_WAIT).await
            }
        }
    }

    /// The applier goes on.
    pub(super) async fn release(&self) -> Result<(), VerifyError> {
        match self {
            Holder::Console(client, reverse) => release(client, *reverse).await,
            Holder::InProcess { status, owner } => {
                status.hold.release(Some(owner));
                Ok(())
            }
        }
    }

    async fn reached(&self, wait: Duration) -> Result<Lsn, VerifyError> {
        let Holder::InProcess { status, owner } = self else {
            return Err(console_error("not held in process".into()));
        };
        status.hold.wait_reached(owner, wait).await.ok_or_else(|| {
            console_error(format!(
                "the applier did not stop for {owner} within {wait:?} (or its hold was released by force)"
            ))
        })
    }
}
