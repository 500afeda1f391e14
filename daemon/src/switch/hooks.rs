//! The operator's commands around a switch (`[switch] fence_command`,
//! `unfence_command`, `repoint_command`): shell commands run with the
//! step's facts in the environment, for PgBouncer's `PAUSE` and `RESUME`,
//! a load balancer or DNS. A command that fails (or runs over
//! [`HOOK_TIMEOUT`]) fails its step; its output is logged, never a
//! password: the environment names servers by host, port and database.

use std::time::Duration;

use cutover_replication::conninfo::ConnInfo;

use super::SwitchError;
use super::journal::{Kind, Server};

/// The longest a command may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// The facts given to a command.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// Switch or rollback.
    pub kind: Kind,
    /// `fence`, `open` or `undo`.
    pub step: &'static str,
    /// The new primary's connection (host, port and database are given).
    pub new_primary: &'a ConnInfo,
    /// The old primary's.
    pub old_primary: &'a ConnInfo,
    /// The fence's position, once taken.
    pub fence_lsn: Option<String>,
}

/// The umask cutover was started with, which the operator's commands run
/// under (cutover's own is 077).
static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Records the umask cutover was started with.
pub fn set_umask(mask: u32) {
    let _ = UMASK.set(mask);
}

/// Runs `command` (from config key `key`) under `sh -c` with the facts.
pub async fn run(
    key: &'static str,
    command: &str,
    facts: &Facts<'_>,
) -> Result<String, SwitchError> {
    let server = |prefix: &str, info: &ConnInfo, name: Server| {
        vec![
            (format!("CUTOVER_{prefix}"), name.name().to_owned()),
            (format!("CUTOVER_{prefix}_HOST"), info.host().to_string()),
            (format!("CUTOVER_{prefix}_PORT"), info.port().to_string()),
            (
                format!("CUTOVER_{prefix}_DBNAME"),
                info.dbname().unwrap_or_default().to_owned(),
            ),
        ]
    };
    let mut env = vec![
        ("CUTOVER_KIND".to_owned(), facts.kind.name().to_owned()),
        ("CUTOVER_STEP".to_owned(), facts.step.to_owned()),
        (
            "CUTOVER_FENCE_LSN".to_owned(),
            facts.fence_lsn.clone().unwrap_or_default(),
        ),
    ];
    env.extend(server("NEW_PRIMARY", facts.new_primary, facts.kind.to()));
    env.extend(server("OLD_PRIMARY", facts.old_primary, facts.kind.from()));
    let mut child = tokio::process::Command::new("sh");
    let script = match UMASK.get() {
        Some(mask) => format!("umask {mask:03o}\n{command}"),
        None => command.to_owned(),
    };
    child.arg("-c").arg(script).envs(env).kill_on_drop(true);
    let output = tokio::time::timeout(HOOK_TIMEOUT, child.output())
        .await
        .map_err(|_| SwitchError::Hook {
            key,
            detail: format!("still running after {HOOK_TIMEOUT:?}: it was stopped"),
        })?
        .map_err(|e| SwitchError::Hook {
            key,
            detail: format!("could not start `sh -c`: {e}"),
        })?;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    if !output.status.success() {
        return Err(SwitchError::Hook {
            key,
            detail: format!(
                "exited with {}: {}",
                output.status,
                if stderr.is_empty() { &stdout } else { &stderr }
            ),
        });
    }
    tracing::info!(key, %stdout, %stderr, "operator command ran");
    Ok(format!("{key} ran"))
}
