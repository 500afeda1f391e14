//! The admin console: a PostgreSQL-protocol endpoint on `[console] listen`
//! that `psql` (or any driver, through the simple query protocol) talks to.
//!
//! ```text
//! SHOW STATUS | SHOW TABLES | SHOW LAG | SHOW HISTORY [n | ALL] | PAUSE | RESUME
//! ```
//!
//! Commands are case-insensitive, the trailing semicolon is optional, and
//! several may be sent at once separated by semicolons. Authentication is
//! SCRAM-SHA-256 with `console.password` (any user name), or none on a
//! loopback address when `console.allow_no_password = true`.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use cutover_replication::Lsn;
use cutover_replication::secret::Secret;
use futures_util::Sink;
use futures_util::stream;
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{ScramAuth, gen_salted_password, random_nonce};
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::query::SimpleQueryHandler;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use tokio::net::TcpListener;

use crate::config::ConsoleAuth;

mod guard;
use crate::live::{DaemonState, Status};
use crate::store::{Store, TableCopyState};

/// SCRAM iteration count (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// Samples `SHOW HISTORY` returns without a count.
const DEFAULT_HISTORY: usize = 100;

/// Every command, for the help text of an unknown one.
pub const COMMANDS: &str = "SHOW STATUS, SHOW TABLES, SHOW LAG, SHOW HISTORY [n | ALL], SHOW DIVERGENCE, SHOW CONFLICTS, SHOW SWITCH, SWITCH [GROUP name] [DRY RUN | VERIFY], ROLLBACK [GROUP name] [DRY RUN], ACCEPT, RESOLVE <id> USE SOURCE | TARGET, PAUSE, RESUME, HOLD [REVERSE] [AT 'lsn'], SHOW HOLD [REVERSE], RELEASE [REVERSE] [FORCE]";

/// A parsed console command.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Status,
    Tables,
    Lag,
    History(Option<usize>),
    Pause,
    Resume,
    /// A verify's hold: `HOLD`, or `HOLD AT 'lsn'` (see `crate::hold`);
    /// with `REVERSE`, of the stream that applies the target's changes to
    /// the source beside the forward one (`[[group]]`s).
    Hold(Option<Lsn>, bool),
    /// `RELEASE` (this connection's hold), `RELEASE FORCE` (anyone's).
    Release(bool, bool),
    ShowHold(bool),
    Divergence,
    Conflicts,
    Switch,
    /// `SWITCH`, `ROLLBACK`: the daemon moves the writes.
    Move(crate::switch::journal::Kind, crate::switch::Options),
    /// `ACCEPT`: the acceptance `cutover accept` wrote is recorded in the
    /// store the daemon holds.
    Accept,
    /// `RESOLVE <id> USE SOURCE | TARGET`: a parked stray write settled
    /// by an operator.
    Resolve(u64, &'static str),
}

/// Parses one command (no semicolons), case-insensitively.
fn parse(text: &str) -> Result<Command, String> {
    let words: Vec<String> = text.split_whitespace().map(str::to_uppercase).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", "STATUS"] => Ok(Command::Status),
        ["SHOW", "TABLES"] => Ok(Command::Tables),
        ["SHOW", "LAG"] => Ok(Command::Lag),
        ["SHOW", "HISTORY"] => Ok(Command::History(Some(DEFAULT_HISTORY))),
        ["SHOW", "HISTORY", "ALL"] => Ok(Command::History(None)),
        ["SHOW", "HISTORY", n] => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Command::History(Some(n))),
            _ => Err(format!(
                "SHOW HISTORY takes a positive number of samples or ALL, not {n:?}"
            )),
        },
        ["SHOW", "HOLD"] => Ok(Command::ShowHold(false)),
        ["SHOW", "HOLD", "REVERSE"] => Ok(Command::ShowHold(true)),
        ["SHOW", "DIVERGENCE"] => Ok(Command::Divergence),
        ["SHOW", "CONFLICTS"] => Ok(Command::Conflicts),
        ["SHOW", "SWITCH"] => Ok(Command::Switch),
        ["ACCEPT"] => Ok(Command::Accept),
        ["RESOLVE", id, "USE", side] => {
            let id = id.parse::<u64>().map_err(|_| {
                format!("RESOLVE takes the number SHOW CONFLICTS gives a stray write, not {id:?}")
            })?;
            match *side {
                "SOURCE" => Ok(Command::Resolve(id, "source")),
                "TARGET" => Ok(Command::Resolve(id, "target")),
                other => Err(format!(
                    "RESOLVE {id} USE takes SOURCE or TARGET, not {other:?}"
                )),
            }
        }
        ["RESOLVE", ..] => Err("RESOLVE <id> USE SOURCE | TARGET".into()),
        ["SWITCH", rest @ ..] | ["ROLLBACK", rest @ ..] => {
            let kind = if words[0] == "SWITCH" {
                crate::switch::journal::Kind::Switch
            } else {
                crate::switch::journal::Kind::Rollback
            };
            let mut options = crate::switch::Options::default();
            // Group names are lowercase (`[[group]]` checks them).
            let rest = match rest {
                ["GROUP", name, more @ ..] => {
                    options.group = Some(name.to_lowercase());
                    more
                }
                ["GROUP"] => {
                    return Err(format!("{} GROUP takes a group's name", words[0]));
                }
                other => other,
            };
            match rest {
                [] => {}
                ["DRY", "RUN"] => options.dry_run = true,
                ["VERIFY"] if kind == crate::switch::journal::Kind::Switch => options.verify = true,
                ["DRY", "RUN", "VERIFY"] if kind == crate::switch::journal::Kind::Switch => {
                    options.dry_run = true;
                    options.verify = true;
                }
                _ => {
                    return Err(format!(
                        "{} takes DRY RUN{}, not {:?}",
                        words[0],
                        if kind == crate::switch::journal::Kind::Switch {
                            " and VERIFY"
                        } else {
                            ""
                        },
                        rest.join(" ")
                    ));
                }
            }
            Ok(Command::Move(kind, options))
        }
        ["HOLD"] => Ok(Command::Hold(None, false)),
        ["HOLD", "REVERSE"] => Ok(Command::Hold(None, true)),
        ["HOLD", "REVERSE", "AT", lsn] => lsn
            .trim_matches('\'')
            .parse::<Lsn>()
            .map(|lsn| Command::Hold(Some(lsn), true))
            .map_err(|_| {
                format!("HOLD REVERSE AT takes a WAL position like '0/16B3748', not {lsn}")
            }),
        ["HOLD", "AT", lsn] => lsn
            .trim_matches('\'')
            .parse::<Lsn>()
            .map(|lsn| Command::Hold(Some(lsn), false))
            .map_err(|_| format!("HOLD AT takes a WAL position like '0/16B3748', not {lsn}")),
        ["RELEASE"] => Ok(Command::Release(false, false)),
        ["RELEASE", "FORCE"] => Ok(Command::Release(true, false)),
        ["RELEASE", "REVERSE"] => Ok(Command::Release(false, true)),
        ["RELEASE", "REVERSE", "FORCE"] => Ok(Command::Release(true, true)),
        ["PAUSE"] => Ok(Command::Pause),
        ["RESUME"] => Ok(Command::Resume),
        _ => Err(format!(
            "unknown console command {:?}; the commands are: {COMMANDS}",
            text.trim()
        )),
    }
}

/// Every command of a query string parsed, as the console answers it
/// (the fuzz target's entry).
pub(crate) fn parse_all(query: &str) -> Vec<Result<String, String>> {
    commands(query)
        .into_iter()
        .map(|text| parse(text).map(|command| format!("{command:?}")))
        .collect()
}

/// Splits a query string into its commands (empty statements dropped).
fn commands(query: &str) -> Vec<&str> {
    query
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Serves the console until the process ends; with `tls`, over TLS only.
pub async fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    store: Store,
    auth: ConsoleAuth,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let guard = Arc::new(guard::Guard::new(
        tls.is_some(),
        status.metrics.console_failed_logins.clone(),
    ));
    let queries = Arc::new(Queries { status, store });
    let acceptor = tls.map(pgwire::tokio::TlsAcceptor::from);
    match auth {
        ConsoleAuth::Password(password) => {
            let source = Arc::new(ConsolePassword(password));
            let startup = move || {
                let mut scram = ScramAuth::new(Arc::clone(&source) as Arc<dyn AuthSource>);
                scram.set_iterations(SCRAM_ITERATIONS);
                SASLAuthStartupHandler::new(Arc::new(parameters())).with_scram(scram)
            };
            accept(
                listener,
                acceptor,
                Handlers {
                    queries,
                    startup,
                    guard,
                },
            )
            .await;
        }
        ConsoleAuth::Open => {
            let startup = || OpenStartup;
            accept(
                listener,
                acceptor,
                Handlers {
                    queries,
                    startup,
                    guard,
                },
            )
            .await;
        }
        ConsoleAuth::Disabled => {}
    }
}

async fn accept<S, F>(
    listener: TcpListener,
    acceptor: Option<pgwire::tokio::TlsAcceptor>,
    handlers: Handlers<F>,
) where
    S: StartupHandler + 'static,
    F: Fn() -> S + Send + Sync + 'static,
{
    let handlers = Arc::new(handlers);
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let handlers = Arc::clone(&handlers);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let queries = Arc::clone(&handlers.queries);
                    if let Err(err) =
                        pgwire::tokio::process_socket(socket, acceptor, handlers).await
                    {
                        tracing::debug!(%peer, error = %err, "console connection ended");
                    }
                    // A verify's hold never outlives its connection.
                    if queries.status.hold.release(Some(&peer.to_string())) {
                        tracing::info!(%peer, "the console connection holding the applier ended: released");
                    }
                    if let Some(beside) = queries.status.beside()
                        && beside.hold.release(Some(&peer.to_string()))
                    {
                        tracing::info!(%peer, "the console connection holding the reverse stream's applier ended: released");
                    }
                });
            }
            Err(err) => {
                // Out of file descriptors and the like: wait, keep serving.
                tracing::warn!(error = %err, "console: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

fn parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = format!("cutover {}", env!("CARGO_PKG_VERSION"));
    parameters.is_superuser = false;
    parameters
}

/// The handlers of one console: the queries, and a fresh login handler per
/// connection (the SCRAM exchange keeps per-connection state) behind the
/// guard they share.
struct Handlers<F> {
    queries: Arc<Queries>,
    startup: F,
    guard: Arc<guard::Guard>,
}

impl<S, F> PgWireServerHandlers for Handlers<F>
where
    S: StartupHandler + 'static,
    F: Fn() -> S + Send + Sync,
{
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.queries)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(guard::Guarded {
            inner: (self.startup)(),
            guard: Arc::clone(&self.guard),
        })
    }
}

/// Loopback without a password, as the config explicitly allows.
struct OpenStartup;

impl NoopStartupHandler for OpenStartup {}

/// The console password for SCRAM (any user name).
#[derive(Debug)]
struct ConsolePassword(Secret);

#[async_trait]
impl AuthSource for ConsolePassword {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        // A fresh salt per login; the salted password is derived on demand
        // so that only the configured secret is kept in memory.
        let salt = random_nonce().into_bytes();
        let salted = gen_salted_password(self.0.expose(), &salt, SCRAM_ITERATIONS);
        Ok(Password::new(Some(salt), salted))
    }
}

/// Answers the console's commands from the daemon's status and store.
struct Queries {
    status: Arc<Status>,
    store: Store,
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let peer = client.socket_addr();
        if !client.metadata().contains_key(guard::AUTHENTICATED) {
            tracing::warn!(%peer, "console: a command on a connection that did not log in: refused");
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".to_owned(),
                "28000".to_owned(),
                "log in first".to_owned(),
            ))));
        }
        let mut responses = Vec::new();
        for text in commands(query) {
            let command = match parse(text) {
                Ok(command) => command,
                Err(message) => {
                    // Like PostgreSQL, the first error ends the query string.
                    responses.push(error("42601", message));
                    break;
                }
            };
            if command == Command::Accept {
                match self.record_acceptance().await {
                    Ok(()) => {
                        tracing::info!(%peer, "console: the acceptance is recorded in the store");
                        responses.push(Response::Execution(Tag::new("ACCEPT")));
                        continue;
                    }
                    Err(message) => {
                        responses.push(error("XX000", message));
                        break;
                    }
                }
            }
            if let Command::Resolve(id, side) = command {
                match self.store.choose_side(id, side).await {
                    Ok(Some(record)) => {
                        tracing::info!(%peer, id, side, table = %record.table, key = %record.key, "console: RESOLVE: the {side}'s row is written over the other server's");
                        let mut table = Table::new(&[
                            ("id", Type::INT8),
                            ("table", Type::TEXT),
                            ("key", Type::TEXT),
                            ("resolution", Type::TEXT),
                        ]);
                        table.push(vec![
                            Cell::Int(Some(saturating_i64(record.id))),
                            Cell::Text(Some(record.table)),
                            Cell::Text(Some(record.key)),
                            Cell::Text(Some(record.resolution)),
                        ]);
                        responses.push(table.response());
                        continue;
                    }
                    Ok(None) => {
                        responses.push(error(
                            "22023",
                            format!("no stray write {id} is parked: SHOW CONFLICTS lists them (resolution parked)"),
                        ));
                        break;
                    }
                    Err(err) => {
                        responses.push(error("XX000", format!("the state store: {err}")));
                        break;
                    }
                }
            }
            if let Command::Move(kind, options) = command {
                tracing::info!(%peer, kind = kind.name(), ?options, "console: the daemon is asked to move the writes");
                match self.status.desk.ask(kind, options).await {
                    Ok(summary) => {
                        let mut table = Table::new(&[("summary", Type::JSON)]);
                        table.push(vec![Cell::Text(Some(
                            serde_json::to_string(&summary).unwrap_or_default(),
                        ))]);
                        responses.push(table.response());
                        continue;
                    }
                    Err(message) => {
                        responses.push(error("XX000", message));
                        break;
                    }
                }
            }
            match self.answer(command, &peer.to_string()) {
                Ok(response) => responses.push(response),
                Err(message) => {
                    responses.push(error("XX000", message));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

fn error(code: &str, message: String) -> Response {
    Response::Error(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        code.to_owned(),
        message,
    )))
}

impl Queries {
    /// Records in the store the acceptance `cutover accept` wrote beside
    /// the validation report.
    async fn record_acceptance(&self) -> Result<(), String> {
        let path = self
            .store
            .dir()
            .join(crate::switch::finish::ACCEPTANCE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "reading {}: {e} (run `cutover accept` first)",
                path.display()
            )
        })?;
        let acceptance: crate::switch::journal::Acceptance = serde_json::from_str(&text)
            .map_err(|e| format!("{} is unreadable: {e}", path.display()))?;
        let mut state = self
            .store
            .switch_state()
            .map_err(|e| format!("reading the state store: {e}"))?;
        state.acceptance = Some(acceptance);
        self.store
            .put_switch_state(&state)
            .await
            .map_err(|e| format!("writing the state store: {e}"))?;
        self.status.set_switch(state);
        Ok(())
    }

    fn answer(&self, command: Command, peer: &str) -> Result<Response, String> {
        match command {
            Command::Status => Ok(self.show_status()),
            Command::Tables => self.show_tables(),
            Command::Lag => Ok(self.show_lag()),
            Command::History(limit) => self.show_history(limit),
            Command::Pause => {
                let changed = self.status.set_paused(true);
                tracing::info!(%peer, changed, "console: PAUSE (the applier holds; the stream keeps its position)");
                Ok(Response::Execution(Tag::new("PAUSE")))
            }
            Command::Resume => {
                let changed = self.status.set_paused(false);
                tracing::info!(%peer, changed, "console: RESUME");
                Ok(Response::Execution(Tag::new("RESUME")))
            }
            Command::Hold(position, reverse) => {
                let held = self.held(reverse)?;
                let state = held.state();
                if state != DaemonState::Streaming {
                    return Err(format!(
                        "the daemon is {}: a verify holds a streaming daemon only{}",
                        state.name(),
                        if state == DaemonState::Paused {
                            " (RESUME it first)"
                        } else {
                            ""
                        }
                    ));
                }
                tracing::info!(%peer, ?position, reverse, "console: HOLD (a verify takes the position of the server written)");
                match position {
                    None => held.hold.arm(peer),
                    Some(lsn) => held.hold.hold_at(peer, lsn),
                }
                .map_err(|e| e.to_string())?;
                Ok(Response::Execution(Tag::new("HOLD")))
            }
            Command::Release(force, reverse) => {
                tracing::info!(%peer, force, reverse, "console: RELEASE");
                self.held(reverse)?
                    .hold
                    .release(if force { None } else { Some(peer) });
                Ok(Response::Execution(Tag::new("RELEASE")))
            }
            Command::Move(..) | Command::Accept | Command::Resolve(..) => {
                Err("answered apart".into())
            }
            Command::Divergence => {
                let mut table = Table::new(&[
                    ("table", Type::TEXT),
                    ("rows_checked", Type::INT8),
                    ("divergent_rows", Type::INT8),
                    ("compared_at", Type::PG_LSN),
                    ("checked_at", Type::TIMESTAMPTZ),
                    ("samples", Type::TEXT),
                ]);
                for (name, d) in self.status.view().divergence {
                    table.push(vec![
                        Cell::Text(Some(name)),
                        Cell::Int(Some(saturating_i64(d.rows_checked))),
                        Cell::Int(Some(saturating_i64(d.divergent_rows))),
                        Cell::Text(d.compared_at.map(|l| l.to_string())),
                        Cell::Text(Some(timestamp(d.checked_at))),
                        Cell::Text(Some(d.samples.join("; "))),
                    ]);
                }
                Ok(table.response())
            }
            Command::Conflicts => {
                let mut table = Table::new(&[
                    ("id", Type::INT8),
                    ("kind", Type::TEXT),
                    ("side", Type::TEXT),
                    ("group", Type::TEXT),
                    ("table", Type::TEXT),
                    ("op", Type::TEXT),
                    ("key", Type::TEXT),
                    ("lsn", Type::PG_LSN),
                    ("committed_at", Type::TIMESTAMPTZ),
                    ("resolution", Type::TEXT),
                    ("resolved_at", Type::PG_LSN),
                ]);
                let records = self.store.conflicts().map_err(|e| e.to_string())?;
                for c in records {
                    table.push(vec![
                        Cell::Int(Some(saturating_i64(c.id))),
                        Cell::Text(Some(c.kind)),
                        Cell::Text(Some(c.side)),
                        Cell::Text(Some(c.group)),
                        Cell::Text(Some(c.table)),
                        Cell::Text(Some(c.op)),
                        Cell::Text(Some(c.key)),
                        Cell::Text(Some(c.lsn.to_string())),
                        Cell::Text(Some(c.committed_at)),
                        Cell::Text(Some(c.resolution)),
                        Cell::Text(c.resolved_at.map(|l| l.to_string())),
                    ]);
                }
                Ok(table.response())
            }
            Command::Switch => {
                // One row per step of the last switch or rollback.
                let view = self.status.view();
                let mut table = Table::new(&[
                    ("kind", Type::TEXT),
                    ("id", Type::INT8),
                    ("state", Type::TEXT),
                    ("primary_server", Type::TEXT),
                    ("window_seconds", Type::TEXT),
                    ("step", Type::TEXT),
                ]);
                if let Some(switch) = view.switch {
                    for line in &switch.journal {
                        table.push(vec![
                            Cell::Text(Some(switch.kind.to_owned())),
                            Cell::Int(Some(saturating_i64(switch.id))),
                            Cell::Text(Some(switch.state.to_owned())),
                            Cell::Text(Some(view.primary.to_owned())),
                            Cell::Text(switch.window_seconds.map(|w| format!("{w:.3}"))),
                            Cell::Text(Some(line.trim().to_owned())),
                        ]);
                    }
                }
                Ok(table.response())
            }
            Command::ShowHold(reverse) => {
                let held = self.held(reverse)?;
                let hold = held.hold.current();
                let mut table = Table::new(&[
                    ("hold", Type::TEXT),
                    ("position", Type::PG_LSN),
                    ("reached_lsn", Type::PG_LSN),
                ]);
                table.push(vec![
                    Cell::Text(Some(hold.name().to_owned())),
                    Cell::Text(hold.limit().map(|l| l.to_string())),
                    Cell::Text(held.hold.reached().map(|l| l.to_string())),
                ]);
                Ok(table.response())
            }
        }
    }

    /// The stream a hold command is for: the daemon's, or with `REVERSE`
    /// the one beside it.
    fn held(&self, reverse: bool) -> Result<Arc<Status>, String> {
        if !reverse {
            return Ok(Arc::clone(&self.status));
        }
        self.status.beside().ok_or_else(|| {
            "no reverse stream runs beside the daemon's: it runs with [[group]]s, once the copy is done".to_owned()
        })
    }

    fn show_status(&self) -> Response {
        let view = self.status.view();
        let mut table = Table::new(&[
            ("state", Type::TEXT),
            ("paused", Type::BOOL),
            ("direction", Type::TEXT),
            ("primary_server", Type::TEXT),
            ("slot", Type::TEXT),
            ("applied_lsn", Type::PG_LSN),
            ("lag_bytes", Type::INT8),
            ("lag_seconds", Type::FLOAT8),
            ("transactions_applied", Type::INT8),
            ("last_error", Type::TEXT),
            ("last_error_at", Type::TIMESTAMPTZ),
            ("started_at", Type::TIMESTAMPTZ),
            ("pid", Type::INT4),
            ("moved_groups", Type::TEXT),
            ("kafka_committed_lsn", Type::PG_LSN),
        ]);
        let row = vec![
            Cell::Text(Some(view.state.name().to_owned())),
            Cell::Bool(self.status.paused()),
            Cell::Text(Some(view.direction.to_string())),
            Cell::Text(Some(view.primary.to_owned())),
            Cell::Text(Some(view.slot)),
            Cell::Text(view.applied_lsn),
            Cell::Int(view.lag.bytes.map(saturating_i64)),
            Cell::Float(Some(view.lag.seconds)),
            Cell::Int(Some(saturating_i64(view.transactions_applied))),
            Cell::Text(view.last_error.as_ref().map(|e| e.message.clone())),
            Cell::Text(view.last_error.as_ref().map(|e| timestamp(e.at))),
            Cell::Text(Some(timestamp(view.started_at))),
            Cell::Int4(i32::try_from(view.pid).ok()),
            Cell::Text(Some(view.moved_groups.join(","))),
            Cell::Text(view.kafka_committed_lsn),
        ];
        table.push(row);
        table.response()
    }

    fn show_tables(&self) -> Result<Response, String> {
        let copies = self
            .store
            .table_copies()
            .map_err(|e| format!("reading the state store: {e}"))?;
        let applied = self.status.view().tables;
        let mut names: Vec<String> = copies.iter().map(|c| c.name.to_string()).collect();
        for name in applied.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        let mut table = Table::new(&[
            ("table_name", Type::TEXT),
            ("copy_state", Type::TEXT),
            ("rows_copied", Type::INT8),
            ("source_rows", Type::INT8),
            ("target_rows", Type::INT8),
            ("inserts", Type::INT8),
            ("updates", Type::INT8),
            ("deletes", Type::INT8),
            ("truncates", Type::INT8),
            ("written_to", Type::TEXT),
            ("rejected", Type::INT8),
        ]);
        for name in names {
            let copy = copies.iter().find(|c| c.name.to_string() == name);
            let counts = applied.get(&name).cloned().unwrap_or_default();
            table.push(vec![
                Cell::Text(Some(name.clone())),
                Cell::Text(Some(
                    copy.map(|c| copy_state_name(c.state))
                        .unwrap_or("not copied")
                        .to_owned(),
                )),
                Cell::Int(copy.map(|c| saturating_i64(c.rows_copied))),
                Cell::Int(copy.and_then(|c| c.source_count)),
                Cell::Int(copy.and_then(|c| c.target_count)),
                Cell::Int(Some(saturating_i64(counts.inserts))),
                Cell::Int(Some(saturating_i64(counts.updates))),
                Cell::Int(Some(saturating_i64(counts.deletes))),
                Cell::Int(Some(saturating_i64(counts.truncates))),
                Cell::Text(copy.and_then(|c| c.target.as_ref()).map(|t| t.to_string())),
                Cell::Int(copy.and_then(|c| c.rejected.as_ref()).map(|r| r.total())),
            ]);
        }
        Ok(table.response())
    }

    fn show_lag(&self) -> Response {
        let view = self.status.view();
        let mut table = Table::new(&[
            ("lag_bytes", Type::INT8),
            ("lag_seconds", Type::FLOAT8),
            ("applied_lsn", Type::PG_LSN),
            ("source_lsn", Type::PG_LSN),
            ("slot_retained_bytes", Type::INT8),
            ("wal_status", Type::TEXT),
            ("slot_safe_wal_bytes", Type::INT8),
            ("sampled_at", Type::TIMESTAMPTZ),
        ]);
        table.push(vec![
            Cell::Int(view.lag.bytes.map(saturating_i64)),
            Cell::Float(Some(view.lag.seconds)),
            Cell::Text(view.applied_lsn),
            Cell::Text(view.lag.source_lsn),
            Cell::Int(view.lag.slot_retained_bytes.map(saturating_i64)),
            Cell::Text(view.lag.wal_status),
            Cell::Int(view.lag.slot_safe_wal_bytes),
            Cell::Text(view.lag.sampled_at.map(timestamp)),
        ]);
        table.response()
    }

    fn show_history(&self, limit: Option<usize>) -> Result<Response, String> {
        let samples = self
            .store
            .lag_history(self.status.direction(), limit.unwrap_or(usize::MAX))
            .map_err(|e| format!("reading the state store: {e}"))?;
        let mut table = Table::new(&[
            ("sampled_at", Type::TIMESTAMPTZ),
            ("lag_bytes", Type::INT8),
            ("lag_seconds", Type::FLOAT8),
        ]);
        for sample in samples {
            table.push(vec![
                Cell::Text(Some(timestamp_millis(sample.at_ms))),
                Cell::Int(sample.bytes.map(saturating_i64)),
                Cell::Float(Some(sample.seconds)),
            ]);
        }
        Ok(table.response())
    }
}

/// The name a table's copy state has in the console and `cutover status`.
pub fn copy_state_name(state: TableCopyState) -> &'static str {
    match state {
        TableCopyState::Pending => "pending",
        TableCopyState::Copying => "copying",
        TableCopyState::Copied => "copied",
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Unix seconds as PostgreSQL prints a `timestamptz` in UTC.
pub fn timestamp(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string())
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

/// Unix milliseconds as PostgreSQL prints a `timestamptz` in UTC.
pub fn timestamp_millis(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string())
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

/// One value of a result row.
enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
    Int4(Option<i32>),
    Float(Option<f64>),
    Bool(bool),
}

/// A typed result set under construction.
struct Table {
    schema: Arc<Vec<FieldInfo>>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    fn new(columns: &[(&str, Type)]) -> Table {
        let schema = columns
            .iter()
            .map(|(name, ty)| {
                FieldInfo::new(
                    (*name).to_owned(),
                    None,
                    None,
                    ty.clone(),
                    FieldFormat::Text,
                )
            })
            .collect();
        Table {
            schema: Arc::new(schema),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Cell>) {
        self.rows.push(row);
    }

    fn response(self) -> Response {
        let schema = Arc::clone(&self.schema);
        let mut encoder = DataRowEncoder::new(Arc::clone(&schema));
        let rows: Vec<PgWireResult<DataRow>> = self
            .rows
            .into_iter()
            .map(|row| {
                for cell in row {
                    match cell {
                        Cell::Text(v) => encoder.encode_field(&v)?,
                        Cell::Int(v) => encoder.encode_field(&v)?,
                        Cell::Int4(v) => encoder.encode_field(&v)?,
                        Cell::Float(v) => encoder.encode_field(&v)?,
                        Cell::Bool(v) => encoder.encode_field(&v)?,
                    }
                }
                Ok(encoder.take_row())
            })
            .collect();
        Response::Query(QueryResponse::new(schema, stream::iter(rows)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_case_insensitive_and_semicolons_optional() {
        assert_eq!(parse("show status"), Ok(Command::Status));
        assert_eq!(parse("  Show   Tables "), Ok(Command::Tables));
        assert_eq!(parse("pause"), Ok(Command::Pause));
        assert_eq!(parse("SHOW HISTORY 5"), Ok(Command::History(Some(5))));
        assert_eq!(parse("show history all"), Ok(Command::History(None)));
        assert_eq!(
            parse("SHOW HISTORY"),
            Ok(Command::History(Some(DEFAULT_HISTORY)))
        );
        assert_eq!(commands("SHOW LAG;"), vec!["SHOW LAG"]);
        assert_eq!(commands("pause ; resume;;"), vec!["pause", "resume"]);
    }

    #[test]
    fn an_unknown_command_lists_the_commands() {
        let err = parse("SELECT 1").unwrap_err();
        assert!(err.contains("SELECT 1"), "{err}");
        assert!(err.contains(COMMANDS), "{err}");
        assert!(parse("SHOW HISTORY -3").is_err());
        assert!(parse("SHOW HISTORY 0").is_err());
    }

    #[test]
    fn timestamps_print_as_postgres_does() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00+00");
        assert_eq!(
            timestamp_millis(1_764_000_000_123),
            "2025-11-24 16:00:00.123+00"
        );
    }
}
