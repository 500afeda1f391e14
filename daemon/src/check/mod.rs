//! `cutover check`: the preflight of both servers before anything changes.
//!
//! It only reads. Each probe adds [`Finding`]s to the [`Report`]; a probe
//! that cannot run (a server unreachable) becomes a blocking finding, and
//! the other server is still checked, so one run shows everything that
//! stands in the way.

mod groups;
mod kafka;
mod maps;
pub mod report;
mod tables;

use cutover_replication::catalog::{self, Table};
use cutover_replication::client::{self, describe};
use cutover_replication::ddl::DdlPolicy;
use cutover_replication::{slot, sql};
use tokio_postgres::Client;

use crate::config::{Config, ConsoleAuth, Server};
pub use report::{Finding, Report, Severity};
use report::{ServerReport, Usage};

/// Options of `cutover check`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckOptions {
    /// Count rows exactly (a full scan of every table in scope).
    pub exact_counts: bool,
}

/// Runs every probe and returns the finished report.
pub async fn run(config: &Config, options: CheckOptions) -> Report {
    let mut report = Report::default();
    report.source.endpoint = config.source.conninfo.endpoint();
    if let Some(target) = &config.target {
        report.target.endpoint = target.conninfo.endpoint();
    }

    // A Kafka feed alone has no target: the source's probes, the local
    // ones and the brokers'.
    let (source, target) = tokio::join!(connect(&config.source), async {
        match &config.target {
            Some(target) => Some(connect(target).await),
            None => None,
        }
    });
    let source = record_connection(&mut report, &config.source, source);
    let target = match (&config.target, target) {
        (Some(server), Some(result)) => record_connection(&mut report, server, result),
        _ => {
            report.add(Finding {
                severity: Severity::Info,
                code: "feed_alone",
                server: "local",
                subject: Some("target".into()),
                problem: "no [target]: the [kafka] feed runs alone (no copy; the feed starts with the changes from the slot's creation)".into(),
                fix: None,
            });
            None
        }
    };

    // The stream's own connection (`replication=database`): it needs the
    // REPLICATION attribute and a free WAL sender, and a pooler in front
    // of the server (PgBouncer) takes SQL but not the replication
    // protocol.
    if source.is_some() {
        replication_connection(
            &mut report,
            &config.source,
            Severity::Blocking,
            "the stream",
        )
        .await;
    }
    if let (Some(_), Some(server)) = (&target, &config.target) {
        replication_connection(
            &mut report,
            server,
            Severity::Warning,
            "the reverse stream after the switch (the way back)",
        )
        .await;
    }

    let mut source_facts = None;
    if let Some(client) = &source {
        match probe_server(client, &config.source).await {
            Ok(facts) => {
                source_checks(&mut report, &facts, config);
                commit_time_checks(&mut report, &facts, config, "source");
                report.source = facts.report.clone();
                source_facts = Some(facts);
            }
            Err(err) => probe_failed(&mut report, "source", &err),
        }
    }
    let mut target_facts = None;
    if let (Some(client), Some(server)) = (&target, &config.target) {
        match probe_server(client, server).await {
            Ok(facts) => {
                target_checks(&mut report, &facts, config);
                commit_time_checks(&mut report, &facts, config, "target");
                report.target = facts.report.clone();
                target_facts = Some(facts);
            }
            Err(err) => probe_failed(&mut report, "target", &err),
        }
    }
    if let (Some(s), Some(t), Some(source_client), Some(target_client)) =
        (&source_facts, &target_facts, &source, &target)
        && s.system_identifier.is_some()
        && s.system_identifier == t.system_identifier
    {
        // A restored base backup or a cloned disk shares the system
        // identifier of the server it was copied from: only a session seen
        // from both sides proves they are one server.
        let same_server = same_server(source_client, target_client).await;
        let sysid = s.system_identifier.as_deref().unwrap_or("?");
        match same_server {
            Some(false) => report.add(Finding {
                severity: Severity::Warning,
                code: "target_cloned_from_source",
                server: "target",
                subject: Some("target.url".into()),
                problem: format!(
                    "the target shares the source's system identifier ({sysid}) but is another server: it was built from a copy of the source (a restored base backup, a cloned disk); its tables may hold the source's rows of that time"
                ),
                fix: Some(
                    "cutover copies into empty tables: TRUNCATE them on the target, or set copy.truncate_target = true"
                        .into(),
                ),
            }),
            Some(true) | None if s.database == t.database => report.add(Finding {
                severity: Severity::Blocking,
                code: "same_database",
                server: "target",
                subject: Some("target.url".into()),
                problem: format!(
                    "source and target are the same database ({} on server {sysid})",
                    s.database
                ),
                fix: Some("point target.url at the new server's database".into()),
            }),
            _ => {}
        }
    }

    if let Some(source_client) = &source {
        let source_tables = match catalog::tables(source_client).await {
            Ok(tables) => Some(tables),
            Err(err) => {
                probe_failed(&mut report, "source", &err);
                None
            }
        };
        if let Some(source_tables) = source_tables {
            let in_scope = tables::scope_tables(&mut report, config, source_tables);
            let facts = source_facts.as_ref();
            if let Err(err) = tables::source_table_checks(
                &mut report,
                source_client,
                config,
                &in_scope,
                facts
                    .map(|f| f.report.superuser == Some(true))
                    .unwrap_or(false),
            )
            .await
            {
                probe_failed(&mut report, "source", &err);
            }
            // A mapped table is checked through its mapping, not by name.
            let same_shape: Vec<Table> = in_scope
                .iter()
                .filter(|t| !config.mappings.iter().any(|m| m.source == t.name))
                .cloned()
                .collect();
            if let Some(target_client) = &target
                && let Err(err) =
                    tables::target_table_checks(&mut report, target_client, &same_shape).await
            {
                probe_failed(&mut report, "target", &err);
            }
            if let Some(target_client) = &target
                && let Err(err) =
                    maps::map_checks(&mut report, source_client, target_client, config, &in_scope)
                        .await
            {
                probe_failed(&mut report, "target", &err);
            }
            if options.exact_counts
                && let Err(err) =
                    tables::exact_counts(&mut report, source_client, target.as_ref()).await
            {
                probe_failed(&mut report, "source", &err);
            }
            if let Err(err) = tables::sequence_checks(
                &mut report,
                source_client,
                target.as_ref(),
                config,
                &in_scope,
            )
            .await
            {
                probe_failed(&mut report, "source", &err);
            }
            if let Err(err) =
                slot_and_publication(&mut report, source_client, config, &in_scope).await
            {
                probe_failed(&mut report, "source", &err);
            }
            if let Err(err) =
                groups::group_checks(&mut report, source_client, config, &in_scope).await
            {
                probe_failed(&mut report, "source", &err);
            }
        }
    }
    local_checks(&mut report, config);
    kafka::kafka_checks(&mut report, config).await;
    report.finish();
    report
}

/// What `cutover run` needs on this machine: a writable state directory
/// and free listen addresses.
fn local_checks(report: &mut Report, config: &Config) {
    let dir = &config.state_dir;
    // The directory, or the nearest ancestor that exists (run creates the rest).
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    let probe = existing.join(format!(".cutover-check-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(err) => report.add(Finding {
            severity: Severity::Blocking,
            code: "state_dir_not_writable",
            server: "local",
            subject: Some("state.dir".into()),
            problem: format!(
                "cannot write to {} ({err}), where cutover keeps its state",
                existing.display()
            ),
            fix: Some(format!(
                "create {} owned by the user that runs cutover, or set state.dir",
                dir.display()
            )),
        }),
    }
    if let Ok(meta) = std::fs::metadata(dir) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = meta.permissions().mode() & 0o777;
        let mine = meta.uid() == nix::unistd::getuid().as_raw();
        let found = if mode & 0o022 != 0 || !mine {
            Some((
                Severity::Blocking,
                "state_dir_open_to_others",
                format!(
                    "{} (mode {mode:03o}, owner uid {}) can be written by others, or is not cutover's user's: it holds row data and what cutover trusts, and cutover run refuses it",
                    dir.display(),
                    meta.uid()
                ),
                format!("chown <cutover's user> {0}; chmod 700 {0}", dir.display()),
            ))
        } else if mode & 0o077 != 0 {
            Some((
                Severity::Info,
                "state_dir_readable_by_others",
                format!(
                    "{} (mode {mode:03o}) can be read by others: it holds row data (spilled transactions, refused changes, verify samples); cutover run makes it 700",
                    dir.display()
                ),
                format!("chmod 700 {}", dir.display()),
            ))
        } else {
            None
        };
        if let Some((severity, code, problem, fix)) = found {
            report.add(Finding {
                severity,
                code,
                server: "local",
                subject: Some("state.dir".into()),
                problem,
                fix: Some(fix),
            });
        }
    }
    if !matches!(config.console_auth, ConsoleAuth::Disabled)
        && config.console_tls.is_none()
        && !config.console_listen.ip().is_loopback()
    {
        report.add(Finding {
            severity: Severity::Warning,
            code: "console_without_tls",
            server: "local",
            subject: Some("console.listen".into()),
            problem: format!(
                "the admin console listens on {} without TLS: the password exchange (SCRAM) does not reveal the password, but every command and answer crosses the network in clear text",
                config.console_listen
            ),
            fix: Some(
                "set console.tls_cert and console.tls_key (PEM files), or listen on a loopback address and reach it through SSH"
                    .into(),
            ),
        });
    }
    for (key, addr) in [
        ("http.listen", config.http_listen),
        ("console.listen", config.console_listen),
    ] {
        if let Err(err) = std::net::TcpListener::bind(addr) {
            report.add(Finding {
                severity: Severity::Warning,
                code: "listen_address_unavailable",
                server: "local",
                subject: Some(key.into()),
                problem: format!(
                    "cannot listen on {addr} ({err}); cutover run would fail to serve it"
                ),
                fix: Some(format!(
                    "stop what holds {addr} or set {key} to a free address"
                )),
            });
        }
    }
}

async fn connect(server: &Server) -> Result<Client, client::ConnectError> {
    tracing::debug!(server = server.role, conninfo = %server.conninfo, "connecting");
    client::connect(&server.conninfo).await
}

fn record_connection(
    report: &mut Report,
    server: &Server,
    result: Result<Client, client::ConnectError>,
) -> Option<Client> {
    match result {
        Ok(client) => {
            let entry = if server.role == "source" {
                &mut report.source
            } else {
                &mut report.target
            };
            entry.connected = true;
            Some(client)
        }
        Err(err) => {
            report.add(Finding {
                severity: Severity::Blocking,
                code: "connect",
                server: server.role,
                subject: Some(format!("{}.url", server.role)),
                problem: format!("cannot connect to {}: {}", err.endpoint, err.detail),
                fix: err.hint.clone(),
            });
            None
        }
    }
}

/// Opens a replication connection (`replication=database`) to `server`,
/// as `for_what` will; a finding of `severity` when it cannot.
async fn replication_connection(
    report: &mut Report,
    server: &Server,
    severity: Severity,
    for_what: &str,
) {
    let Err(err) = cutover_replication::session::Session::connect(&server.conninfo).await else {
        return;
    };
    let no_sender = matches!(
        &err,
        cutover_replication::error::ReplicationError::Connect(connect)
            if connect.failure == cutover_replication::client::ConnectFailure::Unavailable
    );
    let fix = if no_sender {
        // too_many_connections: for a replication connection, the WAL
        // senders are what is full.
        "no WAL sender is free: raise max_wal_senders (a restart), or end the replication connections it has (pg_stat_replication)".to_owned()
    } else {
        err.hint().unwrap_or_else(|| {
            "point the url at the server itself, not at a connection pooler (the replication protocol does not pass through PgBouncer), and give the role REPLICATION".to_owned()
        })
    };
    report.add(Finding {
        severity,
        code: "replication_connect",
        server: server.role,
        subject: Some(format!("{}.url", server.role)),
        problem: format!(
            "a database connection works, but {for_what} cannot open a replication connection: {}",
            match &err {
                cutover_replication::error::ReplicationError::Connect(connect) =>
                    format!("cannot connect to {}: {}", connect.endpoint, connect.detail),
                other => other.to_string(),
            }
        ),
        fix: Some(fix),
    });
}

fn probe_failed(report: &mut Report, server: &'static str, err: &tokio_postgres::Error) {
    let permission = err
        .as_db_error()
        .is_some_and(|db| *db.code() == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
    report.add(Finding {
        severity: Severity::Blocking,
        code: "probe_failed",
        server,
        subject: None,
        problem: format!("a catalog query failed: {}", describe(err)),
        fix: permission.then(|| {
            "grant the role cutover logs in as read access to the catalogs and tables in scope"
                .to_owned()
        }),
    });
}

/// Whether two connections reach one server: the source session takes a
/// random advisory lock (it writes nothing and lasts a moment), and the
/// target is asked whether it sees that lock held by that session. `None`
/// when the probe itself fails.
async fn same_server(source: &Client, target: &Client) -> Option<bool> {
    let key: i64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| {
            (d.as_nanos() as i64 ^ i64::from(std::process::id()) << 32) & 0x3fff_ffff_ffff_ffff
        })
        .unwrap_or(0x5eed_c0de);
    let pid: i32 = source
        .query_one(
            "SELECT pg_backend_pid() FROM (SELECT pg_try_advisory_lock($1::int8)) AS l",
            &[&key],
        )
        .await
        .ok()?
        .get(0);
    let seen = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1
                              AND classid = ($2::int8 >> 32)::oid AND objid = ($2::int8 & 4294967295)::oid)",
            &[&pid, &key],
        )
        .await
        .ok()
        .map(|r| r.get::<_, bool>(0));
    let _ = source
        .execute("SELECT pg_advisory_unlock($1::int8)", &[&key])
        .await;
    seen
}

/// Facts about one server that later probes compare.
struct ServerFacts {
    report: ServerReport,
    system_identifier: Option<String>,
    database: String,
    can_create_in_db: bool,
    /// May SET session_replication_role (superuser, or granted on 15+).
    can_set_replica_role: bool,
    /// May use replication origins (superuser, or granted).
    can_use_origins: bool,
    /// `track_commit_timestamp` is on.
    commit_times: bool,
}

const SERVER_SQL: &str = "
SELECT current_setting('server_version'), current_setting('server_version_num')::int4,
       current_setting('wal_level'),
       current_setting('max_replication_slots')::int4,
       (SELECT count(*) FROM pg_replication_slots)::int4,
       current_setting('max_wal_senders')::int4,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int4,
       current_user::text, r.rolsuper, r.rolreplication,
       current_setting('max_slot_wal_keep_size'),
       current_database()::text,
       has_database_privilege(current_database(), 'CREATE'),
       has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')
         AND has_function_privilege('pg_replication_origin_create(text)', 'EXECUTE'),
       current_setting('track_commit_timestamp') = 'on'
  FROM pg_roles r WHERE r.rolname = current_user";

async fn probe_server(
    client: &Client,
    server: &Server,
) -> Result<ServerFacts, tokio_postgres::Error> {
    let row = client.query_one(SERVER_SQL, &[]).await?;
    let version_num: i32 = row.get(1);
    let superuser: bool = row.get(8);
    // pg_control_system() is restricted on some installations; the
    // same-database check then falls back to nothing rather than failing.
    let system_identifier = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get::<_, String>(0));
    let can_set_replica_role = superuser
        || (version_num >= 150000
            && client
                .query_one(
                    "SELECT has_parameter_privilege('session_replication_role', 'SET')",
                    &[],
                )
                .await?
                .get::<_, bool>(0));
    let report = ServerReport {
        endpoint: server.conninfo.endpoint(),
        connected: true,
        version: Some(row.get(0)),
        version_num: Some(version_num),
        wal_level: Some(row.get(2)),
        replication_slots: Some(Usage {
            max: row.get(3),
            used: row.get(4),
        }),
        wal_senders: Some(Usage {
            max: row.get(5),
            used: row.get(6),
        }),
        role: Some(row.get(7)),
        superuser: Some(superuser),
        replication: Some(row.get(9)),
        max_slot_wal_keep_size: Some(row.get(10)),
    };
    Ok(ServerFacts {
        report,
        system_identifier,
        database: row.get(11),
        can_create_in_db: row.get(12),
        can_set_replica_role,
        can_use_origins: superuser || row.get::<_, bool>(13),
        commit_times: row.get(14),
    })
}

/// A group whose policy compares commit times needs them kept on both
/// servers.
fn commit_time_checks(
    report: &mut Report,
    facts: &ServerFacts,
    config: &Config,
    server: &'static str,
) {
    let groups = config.groups.comparing_commit_times();
    if groups.is_empty() || facts.commit_times {
        return;
    }
    report.add(Finding {
        severity: Severity::Blocking,
        code: "commit_timestamps_off",
        server,
        subject: Some("track_commit_timestamp".into()),
        problem: format!(
            "group {} compares commit times (policy last_write_wins or bidirectional), and the {server} does not keep them",
            groups.join(", ")
        ),
        fix: Some(format!(
            "ALTER SYSTEM SET track_commit_timestamp = on;  -- then restart the {server}"
        )),
    });
}

fn source_checks(report: &mut Report, facts: &ServerFacts, config: &Config) {
    let server = "source";
    let r = &facts.report;
    let role = r.role.clone().unwrap_or_default();
    if r.superuser == Some(true) {
        report.add(Finding {
            severity: Severity::Info,
            code: "ddl_captured",
            server,
            subject: Some("ddl.policy".into()),
            problem: format!(
                "cutover run adds event triggers (cutover_ddl, cutover_ddl_drop) that report ALTER TABLE and DROP TABLE in the stream; ddl.policy = \"{}\": {}",
                match config.ddl {
                    DdlPolicy::Stop => "stop",
                    DdlPolicy::Additive => "additive",
                },
                match config.ddl {
                    DdlPolicy::Stop => "a change the target does not have yet stops the stream with the statement and the fix",
                    DdlPolicy::Additive => "new columns and widened types are made on the target; anything else stops the stream",
                }
            ),
            fix: None,
        });
    } else {
        report.add(Finding {
            severity: Severity::Warning,
            code: "ddl_not_captured",
            server,
            subject: Some("ddl.policy".into()),
            problem: format!(
                "role {role} is not a superuser and cannot create event triggers: DDL on the source is not reported in the stream; a table the source changes is described again when its rows arrive, and a change the target cannot take stops the stream then"
            ),
            fix: Some("make the changes on the target first, then on the source; or run cutover as a superuser on the source".into()),
        });
    }
    if r.version_num.is_some_and(|v| v < 100000) {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "version",
            server,
            subject: None,
            problem: format!(
                "PostgreSQL {} has no pgoutput logical replication",
                r.version.as_deref().unwrap_or("?")
            ),
            fix: Some("upgrade the source to PostgreSQL 10 or later".into()),
        });
    }
    if r.wal_level.as_deref() != Some("logical") {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "wal_level",
            server,
            subject: Some("wal_level".into()),
            problem: format!(
                "wal_level is '{}'; logical decoding needs 'logical'",
                r.wal_level.as_deref().unwrap_or("?")
            ),
            fix: Some(
                "ALTER SYSTEM SET wal_level = logical;\nthen restart the source server".into(),
            ),
        });
    }
    if let Some(senders) = r.wal_senders
        && senders.free() < 1
    {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "no_free_sender",
            server,
            subject: Some("max_wal_senders".into()),
            problem: format!("all {} WAL senders are busy", senders.max),
            fix: Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {};\nthen restart the source server",
                senders.max + 2
            )),
        });
    }
    if r.superuser != Some(true) && r.replication != Some(true) {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "no_replication_privilege",
            server,
            subject: Some(format!("role {role}")),
            problem: "the role may not start logical replication (needs REPLICATION or superuser)"
                .into(),
            fix: Some(format!(
                "ALTER ROLE {} REPLICATION;",
                sql::quote_ident(&role)
            )),
        });
    }
    if r.max_slot_wal_keep_size.as_deref() == Some("-1") {
        report.add(Finding {
            severity: Severity::Info,
            code: "unbounded_wal_retention",
            server,
            subject: Some("max_slot_wal_keep_size".into()),
            problem: format!(
                "the slot {:?} may retain unbounded WAL while cutover is stopped; watch the source's disk",
                config.slot
            ),
            fix: Some("ALTER SYSTEM SET max_slot_wal_keep_size = '100GB';  -- a size the disk can hold\nSELECT pg_reload_conf();".into()),
        });
    }
}

fn target_checks(report: &mut Report, facts: &ServerFacts, config: &Config) {
    let server = "target";
    // With groups, `run` streams the target's own changes from the start
    // (the stray-write watcher): what the way back needs is needed now.
    let (later, when) = if config.groups.is_empty() {
        (Severity::Warning, "after the switch")
    } else {
        (
            Severity::Blocking,
            "from the start ([[group]]s are configured: run watches the target for stray writes)",
        )
    };
    let r = &facts.report;
    let role = sql::quote_ident(r.role.as_deref().unwrap_or_default());
    if !facts.can_set_replica_role {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "cannot_set_replica_role",
            server,
            subject: Some("session_replication_role".into()),
            problem: "the apply session runs with session_replication_role = replica (so triggers and foreign keys do not fire twice), which this role may not set".into(),
            fix: Some(if r.version_num.unwrap_or(0) >= 150000 {
                format!("GRANT SET ON PARAMETER session_replication_role TO {role};")
            } else {
                format!("ALTER ROLE {role} SUPERUSER;  -- before PostgreSQL 15 only superusers may set it")
            }),
        });
    }
    if !facts.can_use_origins {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "cannot_use_replication_origins",
            server,
            subject: None,
            problem: "the role may not use replication origins, which record the applied position with each transaction".into(),
            fix: Some(format!(
                "GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text), pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone), pg_replication_origin_progress(text, boolean) TO {role};"
            )),
        });
    }
    if !facts.can_create_in_db && r.superuser != Some(true) {
        report.add(Finding {
            severity: later,
            code: "cannot_create_publication",
            server,
            subject: Some(format!("database {}", facts.database)),
            problem: format!(
                "the role may not create the publication the reverse stream needs {when}"
            ),
            fix: Some(format!(
                "GRANT CREATE ON DATABASE {} TO {role};",
                sql::quote_ident(&facts.database)
            )),
        });
    }
    if r.wal_level.as_deref() != Some("logical") {
        report.add(Finding {
            severity: later,
            code: "wal_level",
            server,
            subject: Some("wal_level".into()),
            problem: format!(
                "wal_level is '{}': the reverse stream that makes rollback safe needs 'logical' on the target, {when}",
                r.wal_level.as_deref().unwrap_or("?")
            ),
            fix: Some("ALTER SYSTEM SET wal_level = logical;\nthen restart the target server before the switch".into()),
        });
    }
    if r.superuser != Some(true) && r.replication != Some(true) {
        report.add(Finding {
            severity: later,
            code: "no_replication_privilege",
            server,
            subject: Some(format!("role {}", r.role.as_deref().unwrap_or_default())),
            problem: format!(
                "the role may not replicate; the reverse stream needs REPLICATION {when}"
            ),
            fix: Some(format!("ALTER ROLE {role} REPLICATION;")),
        });
    }
}

async fn slot_and_publication(
    report: &mut Report,
    client: &Client,
    config: &Config,
    in_scope: &[Table],
) -> Result<(), tokio_postgres::Error> {
    let slot = client
        .query_opt(
            "SELECT plugin::text, database::text, active, wal_status, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, slot_type
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await?;
    // A slot of our name is reused: only a new one needs a free place.
    if slot.is_none()
        && let Some(slots) = report.source.replication_slots
        && slots.free() < 1
    {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "no_free_slot",
            server: "source",
            subject: Some("max_replication_slots".into()),
            problem: format!(
                "all {} replication slots are taken and the slot {:?} does not exist yet",
                slots.max, config.slot
            ),
            fix: Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {};\nthen restart the source server (or drop an unused slot)",
                slots.max + 2
            )),
        });
    }
    let our_db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    if let Some(row) = slot {
        let plugin: Option<String> = row.get(0);
        let database: Option<String> = row.get(1);
        let active: bool = row.get(2);
        let wal_status: Option<String> = row.get(3);
        let confirmed: Option<String> = row.get(4);
        let retained: Option<i64> = row.get(5);
        let subject = Some(format!("slot {}", config.slot));
        let drop_fix = format!(
            "SELECT pg_drop_replication_slot({});  -- or set replication.slot to another name",
            cutover_replication::sql::quote_literal(&config.slot)
        );
        let (severity, code, problem, fix) = if plugin.as_deref() != Some("pgoutput")
            || database.as_deref() != Some(&our_db)
        {
            (
                Severity::Blocking,
                "slot_mismatch",
                format!(
                    "a slot of this name exists for plugin {} in database {}, not pgoutput in {our_db}",
                    plugin.as_deref().unwrap_or("(physical)"),
                    database.as_deref().unwrap_or("(none)")
                ),
                Some(drop_fix),
            )
        } else if wal_status.as_deref() == Some("lost") {
            (
                Severity::Blocking,
                "slot_invalidated",
                "the slot was invalidated (its WAL was removed): changes since it fell behind are gone to it".into(),
                Some(format!(
                    "after the copy: `cutover run --resync` makes it again and repairs the target by comparing it with the source, without a new copy; before one: {drop_fix}"
                )),
            )
        } else if active {
            (
                Severity::Blocking,
                "slot_in_use",
                "the slot is in use by another connection (another cutover, or a leftover subscriber)".into(),
                Some("stop the other consumer; see SELECT active_pid FROM pg_replication_slots".into()),
            )
        } else {
            (
                Severity::Info,
                "slot_exists",
                format!(
                    "the slot exists (confirmed up to {}, retaining {}): cutover run resumes from it",
                    confirmed.as_deref().unwrap_or("?"),
                    report::human_bytes(retained.unwrap_or(0))
                ),
                None,
            )
        };
        report.add(Finding {
            severity,
            code,
            server: "source",
            subject,
            problem,
            fix,
        });
    }

    let publication = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await?;
    let subject = Some(format!("publication {}", config.publication));
    match publication {
        Some(row) => {
            let all_tables: bool = row.get(0);
            let published: Vec<(String, String)> = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&config.publication],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let missing: Vec<String> = in_scope
                .iter()
                .filter(|t| !t.partitioned)
                .filter(|t| {
                    !published
                        .iter()
                        .any(|(s, n)| *s == t.name.schema && *n == t.name.name)
                })
                .map(|t| t.name.to_string())
                .collect();
            let problem = if all_tables {
                "the publication exists FOR ALL TABLES: cutover run uses it as it is".to_owned()
            } else if missing.is_empty() {
                "the publication exists and covers the tables in scope".to_owned()
            } else {
                format!(
                    "the publication exists but lacks {} table(s) in scope ({}): cutover run will add them",
                    missing.len(),
                    abbreviate(&missing)
                )
            };
            let gaps = slot::publication_gaps(client, &config.publication).await?;
            if gaps.is_empty() {
                report.add(Finding {
                    severity: Severity::Info,
                    code: "publication_exists",
                    server: "source",
                    subject,
                    problem,
                    fix: None,
                });
            } else {
                report.add(Finding {
                    severity: Severity::Blocking,
                    code: "publication_filtered",
                    server: "source",
                    subject,
                    problem: format!(
                        "the publication exists but would not send every change ({}): cutover run refuses to use it",
                        gaps.join("; ")
                    ),
                    fix: Some(slot::publication_gaps_fix(&config.publication)),
                });
            }
        }
        None => {
            let row = client
                .query_one(
                    "SELECT r.rolsuper, has_database_privilege(current_database(), 'CREATE')
                       FROM pg_roles r WHERE r.rolname = current_user",
                    &[],
                )
                .await?;
            let (superuser, can_create): (bool, bool) = (row.get(0), row.get(1));
            let oids: Vec<u32> = in_scope.iter().map(|t| t.oid).collect();
            let not_owned: Vec<String> = client
                .query(
                    "SELECT n.nspname::text || '.' || c.relname::text FROM pg_class c
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.oid = ANY($1::oid[]) AND NOT pg_has_role(c.relowner, 'USAGE')
                      ORDER BY 1",
                    &[&oids],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !superuser && (!can_create || !not_owned.is_empty()) {
                let tables = in_scope
                    .iter()
                    .map(|t| t.name.quoted())
                    .collect::<Vec<_>>()
                    .join(", ");
                report.add(Finding {
                    severity: Severity::Blocking,
                    code: "cannot_create_publication",
                    server: "source",
                    subject,
                    problem: if can_create {
                        format!(
                            "cutover run creates the publication, which needs ownership of every table; the role does not own {}",
                            abbreviate(&not_owned)
                        )
                    } else {
                        "cutover run creates the publication, which needs CREATE on the database".into()
                    },
                    fix: Some(format!(
                        "create it as the tables' owner or a superuser:\nCREATE PUBLICATION {} FOR TABLE {tables} WITH (publish_via_partition_root = true);",
                        sql::quote_ident(&config.publication)
                    )),
                });
            }
        }
    }
    Ok(())
}

fn abbreviate(names: &[String]) -> String {
    const SHOWN: usize = 5;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!(
            "{} and {} more",
            names[..SHOWN].join(", "),
            names.len() - SHOWN
        )
    }
}
