//! The end of a migration: `cutover accept` records the formal sign-off,
//! `cutover cleanup` removes what cutover made on both servers.

use cutover_replication::cleanup::{self, Names};

use crate::config::Config;
use crate::console::timestamp;
use crate::coverage;
use crate::direction::Direction;
use crate::store::{Store, StoreError, now_secs};
use crate::verify;

use super::journal::{Acceptance, LastVerify, Server};
use super::{SwitchError, connect};

/// The acceptance record, in the state directory beside
/// `validation_report.json`.
pub const ACCEPTANCE_FILE: &str = "acceptance.json";

/// `cutover accept --by NAME --role ROLE`: records who accepted the
/// migration, when, on which verify, and how long the old server is kept.
/// Refused unless the last verify is `VALIDATED`.
pub async fn accept(config: &Config, by: &str, role: &str) -> Result<Acceptance, SwitchError> {
    if by.trim().is_empty() || role.trim().is_empty() {
        return Err(SwitchError::Refused(
            "accept: --by and --role name who accepts and in which role (\"Jane Doe\", \"data owner\")".into(),
        ));
    }
    let path = config.state_dir.join(verify::REPORT_FILE);
    let report: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .ok_or_else(|| {
            SwitchError::Refused(format!(
                "accept: no verify on record ({} is missing or unreadable): run `cutover verify` first",
                path.display()
            ))
        })?;
    let field = |name: &str| report[name].as_str().unwrap_or_default().to_owned();
    let last_verify = LastVerify {
        status: field("status"),
        lsn: field("lsn"),
        date: field("date"),
    };
    if last_verify.status != "VALIDATED" {
        return Err(SwitchError::Refused(format!(
            "accept: the last verify ({}, at {}) is {}: accept a migration proven equal (`cutover verify` until VALIDATED)",
            last_verify.date, last_verify.lsn, last_verify.status
        )));
    }
    // A running daemon holds the store: it records the file there.
    let store = match Store::open(&config.state_dir) {
        Ok(store) => Some(store),
        Err(StoreError::Locked { .. }) => None,
        Err(err) => return Err(err.into()),
    };
    let mut state = match &store {
        Some(store) => Some(store.switch_state()?),
        None => None,
    };
    let now = now_secs();
    let retention = config.switch.retention_days;
    let acceptance = Acceptance {
        migration_id: field("migration_id"),
        accepted_by: by.trim().to_owned(),
        role: role.trim().to_owned(),
        accepted_at: timestamp(now),
        primary: state.as_ref().map(|s| s.primary),
        last_verify,
        retention_days: retention,
        keep_old_server_until: timestamp(now + u64::from(retention) * 86_400),
    };
    let file = config.state_dir.join(ACCEPTANCE_FILE);
    let json =
        serde_json::to_vec_pretty(&acceptance).map_err(|e| SwitchError::Refused(e.to_string()))?;
    std::fs::write(&file, json)
        .map_err(|e| SwitchError::Refused(format!("writing {}: {e}", file.display())))?;
    match (&store, state.as_mut()) {
        (Some(store), Some(state)) => {
            state.acceptance = Some(acceptance.clone());
            store.put_switch_state(state).await?;
        }
        // The running daemon records it in the store it holds.
        _ => record_by_daemon(config).await?,
    }
    Ok(acceptance)
}

/// Asks the running daemon to record the acceptance file in its store.
async fn record_by_daemon(config: &Config) -> Result<(), SwitchError> {
    let Some(addr) = crate::status::console_address(&config.state_dir) else {
        return Err(SwitchError::Refused(format!(
            "the acceptance is in {} but a daemon holds the state store and its console is off: run `cutover accept` again with the daemon stopped, or with its console on",
            config.state_dir.join(ACCEPTANCE_FILE).display()
        )));
    };
    let client = crate::status::connect_console(addr, config, "cutover accept")
        .await
        .map_err(|e| SwitchError::Refused(format!("the daemon's console at {addr}: {e}")))?;
    crate::status::rows(&client, "ACCEPT")
        .await
        .map_err(SwitchError::Refused)?;
    Ok(())
}

/// The acceptance on record, if any.
pub fn acceptance(config: &Config) -> Option<Acceptance> {
    let text = std::fs::read_to_string(config.state_dir.join(ACCEPTANCE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// What `cutover cleanup` removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cleaned {
    /// Per server, each object dropped.
    pub source: Vec<String>,
    /// The target's.
    pub target: Vec<String>,
    /// The server that took writes.
    pub primary: Server,
}

impl Cleaned {
    /// For a person.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        for (server, dropped) in [("source", &self.source), ("target", &self.target)] {
            out.push_str(&format!("{server}: "));
            if dropped.is_empty() {
                out.push_str("nothing of cutover's left\n");
            } else {
                out.push_str(&format!("dropped {} objects\n", dropped.len()));
                for object in dropped {
                    out.push_str(&format!("  {object}\n"));
                }
            }
        }
        out.push_str(&format!(
            "nothing streams any more; the {} is the primary, and the {} is no longer fenced nor kept current: point nothing at it\n",
            self.primary.name(),
            self.primary.other().name()
        ));
        out
    }
}

/// `cutover cleanup`: drops what cutover made on both servers, after
/// acceptance (or with `force`); never user data; safe to run twice.
pub async fn cleanup(config: &Config, force: bool) -> Result<Cleaned, SwitchError> {
    let store = match Store::open(&config.state_dir) {
        Ok(store) => store,
        Err(StoreError::Locked { .. }) => {
            return Err(SwitchError::DaemonRunning(
                config.state_dir.display().to_string(),
                "cleanup drops the slots it streams from",
            ));
        }
        Err(err) => return Err(err.into()),
    };
    let mut state = store.switch_state()?;
    if let Some(journal) = state.in_progress()
        && !force
    {
        return Err(SwitchError::OtherUnderWay(journal.command()));
    }
    if acceptance(config).is_none() && !force {
        return Err(SwitchError::Refused(
            "cleanup: the migration is not accepted: `cutover accept --by NAME --role ROLE` first (or cleanup --force, which gives up the way back)".into(),
        ));
    }
    let migration = store
        .copy_run()?
        .map_or_else(|| config.slot.clone(), |run| run.slot);
    let mut names = Names::default();
    for direction in [Direction::Forward, Direction::Reverse] {
        names.slots.push(direction.slot(&migration));
        names.origins.push(direction.origin(&migration));
        let publication = direction.publication(&config.publication);
        names
            .publications
            .push(coverage::inserts_publication(&publication));
        names.publications.push(publication);
    }
    names.slots.push(config.slot.clone());
    names.origins.push(Direction::repair_origin(&migration));
    let mut dropped = Vec::new();
    for server in [Server::Source, Server::Target] {
        let client = connect(config, server).await?;
        let removed = cleanup::remove(&client, &names)
            .await
            .map_err(|e| SwitchError::Query {
                server: server.name(),
                what: e.what,
                detail: e.detail,
            })?;
        for object in &removed.dropped {
            tracing::info!(server = server.name(), object, "dropped");
        }
        dropped.push(removed.dropped);
    }
    state.cleaned_at = Some(now_secs());
    store.put_switch_state(&state).await?;
    let target = dropped.pop().unwrap_or_default();
    let source = dropped.pop().unwrap_or_default();
    Ok(Cleaned {
        source,
        target,
        primary: state.primary,
    })
}
