//! `cutover`: move a live PostgreSQL database to a new server with
//! near-zero downtime and a safe way back.
//!
//! Exit codes: 0 success, 1 the operation failed (or `check` found
//! something blocking), 2 bad usage or configuration.

use cutover::{
    check, config, copy, demo, direction, live, metrics, run, serve, status, store, switch, tail,
    verify,
};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Exit code: the operation failed, or `check` found a blocking problem.
const EXIT_FAILURE: u8 = 1;
/// Exit code: bad usage or configuration.
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "cutover",
    version,
    about = "Move a live PostgreSQL database to a new server with near-zero downtime and a safe way back"
)]
struct Cli {
    /// Config file (TOML). Every key can also be set as CUTOVER__SECTION__KEY.
    #[arg(
        long,
        short,
        global = true,
        env = "CUTOVER_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace) or a tracing filter;
    /// RUST_LOG is used when this is not given.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole journey on two throwaway local clusters, with live output:
    /// check, run, status, verify, switch, rollback, verify, accept,
    /// cleanup, under an application's writes (`make demo`). Takes no
    /// config.
    Demo(demo::DemoOptions),
    /// Preflight both servers before anything changes; exit 1 if anything blocks.
    Check {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
        /// Count rows exactly on both servers (scans every table in scope).
        #[arg(long)]
        count: bool,
    },
    /// The daemon: copy the snapshot if not done, then stream changes to the
    /// target until stopped (SIGTERM or SIGINT finish the batch in flight).
    Run {
        /// The source lost the slot (invalidated by max_slot_wal_keep_size,
        /// or dropped): make it again, bring the target to its snapshot by
        /// comparing and repairing (no new copy), then stream.
        #[arg(long)]
        resync: bool,
    },
    /// Copy the snapshot of the tables in scope to the target, and only that
    /// (`cutover run` copies and then streams).
    Copy,
    /// What the migration is doing: state, lag, tables, last error. Asks the
    /// running daemon through its admin console, or reads the state store
    /// when no daemon runs.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// List the stray writes and conflicts recorded (with `[[group]]`s),
    /// or settle a parked one: `conflicts resolve ID --use source|target`
    /// writes that server's row over the other's.
    Conflicts {
        /// What to do: nothing (list) or `resolve`.
        #[command(subcommand)]
        action: Option<ConflictAction>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// Prove that the target holds exactly what the source held at one
    /// source position (reported), while the application keeps writing;
    /// exit 1 when a row differs. Needs the snapshot copy done; beside a
    /// running daemon, its admin console on.
    Verify {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
        /// Make every differing target row equal to the source (at the
        /// compared position, or beside a running daemon at a later one
        /// where the rows are read again); exit 0 when all are repaired.
        #[arg(long)]
        repair: bool,
        /// Compare only the tables of this `[[group]]` (`default`: those
        /// no group names).
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
    /// Move the application's writes to the target: check, prepare the way
    /// back, fence the source, drain, set sequences, open the target.
    /// Beside a running daemon it asks the daemon (through its console),
    /// which then streams in reverse; with no daemon, `cutover run`
    /// started afterwards does. Resumes an interrupted switch.
    Switch {
        /// Check and print what each step would do; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Run a verify now rather than rely on the last one.
        #[arg(long)]
        verify: bool,
        /// Move only this `[[group]]`'s writes (phased cutover); the other
        /// groups keep their primary.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// Move the writes back to the source, the same way (the target
    /// fenced, the reverse stream drained, sequences set back); the
    /// forward stream then goes on without copying again.
    Rollback {
        /// Check and print what each step would do; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Move only this `[[group]]`'s writes back to the source.
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// Record the formal acceptance of the migration (who, in which role,
    /// the last verify, the retention period) in acceptance.json beside
    /// validation_report.json.
    Accept {
        /// Who accepts.
        #[arg(long, value_name = "NAME")]
        by: String,
        /// In which role.
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
    /// Drop what cutover made on both servers (slots, publications,
    /// origins, event triggers, triggers, fences, the cutover schema), after
    /// acceptance; never user data; safe to run twice.
    Cleanup {
        /// Without acceptance, or with a switch under way: gives up the way
        /// back.
        #[arg(long)]
        force: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// Print the decoded change stream of the source as JSON lines.
    Tail {
        /// Read this existing slot instead of a temporary one; it is not
        /// advanced unless --advance is given.
        #[arg(long, value_name = "NAME")]
        slot: Option<String>,
        /// Confirm the transactions printed, so the slot moves past them.
        #[arg(long, requires = "slot")]
        advance: bool,
        /// Publication to stream (default: replication.publication; created
        /// for the tables in scope when missing).
        #[arg(long, value_name = "NAME")]
        publication: Option<String>,
        /// Stop after this many changes.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// mimalloc in place of glibc's malloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The state directory holds row data (spilled transactions, refused
    // changes, verify samples): everything cutover creates is its user's
    // only. The operator's commands get the umask cutover was started with.
    let started_with = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    switch::hooks::set_umask(started_with.bits());
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Check { .. }
        | Command::Tail { .. }
        | Command::Status { .. }
        | Command::Conflicts { .. } => "warn",
        _ => "info",
    };
    if let Err(message) = init_logging(cli.log_format, cli.log_level.as_deref(), default_level) {
        eprintln!("error: --log-level: {message}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Command::Demo(options) = &cli.command {
        return demo::main(options);
    }
    let config = match config::load(cli.config.as_deref()).and_then(config::RawConfig::validate) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // A Kafka feed alone (no [target]) runs, checks, tails and reports;
    // what needs a target server says so before anything starts.
    let needs_target = matches!(
        cli.command,
        Command::Copy
            | Command::Conflicts { .. }
            | Command::Verify { .. }
            | Command::Switch { .. }
            | Command::Rollback { .. }
            | Command::Accept { .. }
            | Command::Cleanup { .. }
    );
    if needs_target && let Err(err) = config.target() {
        eprintln!("error: {err}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            // Handled before the config is read.
            Command::Demo(_) => ExitCode::SUCCESS,
            Command::Check { format, count } => {
                let report = check::run(
                    &config,
                    check::CheckOptions {
                        exact_counts: count,
                    },
                )
                .await;
                match format {
                    OutputFormat::Human => print!("{}", report.to_human()),
                    OutputFormat::Json => println!("{}", report.to_json()),
                }
                if report.blocking > 0 {
                    ExitCode::from(EXIT_FAILURE)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Command::Run { resync } => {
                let store = match store::Store::open(&config.state_dir) {
                    Ok(store) => store,
                    Err(err) => {
                        eprintln!("error: {err}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                // A switch interrupted before its new primary opened is
                // undone, one interrupted after is finished; then the
                // daemon streams away from the primary.
                let direction = match switch::settle(&config, &store).await {
                    Ok(direction) => direction,
                    Err(err) => {
                        eprintln!("error: {err}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                if !resync && store.resync_pending().unwrap_or(false) {
                    eprintln!(
                        "error: a `cutover run --resync` began and did not finish: the target may lack changes the new slot will never bring; run `cutover run --resync` again"
                    );
                    return ExitCode::from(EXIT_FAILURE);
                }
                if resync {
                    match verify::resync::resync(&config, &store).await {
                        Ok(done) => print!("{done}"),
                        Err(err) => {
                            eprintln!("error: {err}");
                            return ExitCode::from(EXIT_FAILURE);
                        }
                    }
                }
                let status = std::sync::Arc::new(live::Status::new(&direction.slot(&config.slot), direction));
                match store.switch_state() {
                    Ok(state) => status.set_switch(state),
                    Err(err) => {
                        eprintln!("error: {err}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                }
                if let Err(err) = serve::start(&config, &store, &status).await {
                    eprintln!("error: {err}");
                    return ExitCode::from(EXIT_FAILURE);
                }
                let result = run_daemon(&config, &store, status).await;
                serve::stopped(&store);
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        if let run::RunError::Copy(copy::CopyError::Variance(_)) = &err
                            && let Ok(tables) = store.table_copies()
                        {
                            print!("{}", copy::reconciliation(&tables));
                        }
                        tracing::error!(error = %err, "stopped");
                        eprintln!("error: {err}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            }
            Command::Copy => {
                let store = match store::Store::open(&config.state_dir) {
                    Ok(store) => store,
                    Err(err) => {
                        eprintln!("error: {err}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                let metrics = metrics::Metrics::new();
                let result = tokio::select! {
                    result = copy::run(&config, &store, copy::CopyMode::Standalone, &metrics) => result,
                    () = shutdown_signal() => {
                        eprintln!("interrupted: the copy resumes where it can when run again");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                match result {
                    Ok(outcome) => {
                        print!("{}", copy::reconciliation(&outcome.tables));
                        ExitCode::SUCCESS
                    }
                    Err(err) => {
                        if let Ok(tables) = store.table_copies()
                            && !tables.is_empty()
                        {
                            print!("{}", copy::reconciliation(&tables));
                        }
                        eprintln!("error: {err}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            }
            Command::Verify {
                format,
                repair,
                group,
            } => match verify::run(&config, repair, group.as_deref()).await {
                Ok(report) => print_as(
                    format,
                    &report,
                    verify::Report::to_human,
                    report.status != verify::Verdict::Failed,
                ),
                Err(err) => failed(err),
            },
            Command::Switch {
                dry_run,
                verify,
                group,
                format,
            } => {
                let options = switch::Options { dry_run, verify, group };
                switch_command(&config, switch::journal::Kind::Switch, options, format).await
            }
            Command::Rollback { dry_run, group, format } => {
                let options = switch::Options { dry_run, verify: false, group };
                switch_command(&config, switch::journal::Kind::Rollback, options, format).await
            }
            Command::Accept { by, role } => match switch::finish::accept(&config, &by, &role).await {
                Ok(acceptance) => {
                    println!(
                        "accepted by {} ({}) at {} on the verify {} at {}; keep the old server until {} ({} days); then `cutover cleanup`",
                        acceptance.accepted_by,
                        acceptance.role,
                        acceptance.accepted_at,
                        acceptance.last_verify.status,
                        acceptance.last_verify.lsn,
                        acceptance.keep_old_server_until,
                        acceptance.retention_days
                    );
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(EXIT_FAILURE)
                }
            },
            Command::Cleanup { force, format } => {
                match switch::finish::cleanup(&config, force).await {
                    Ok(cleaned) => {
                        print_as(format, &cleaned, switch::finish::Cleaned::to_human, true)
                    }
                    Err(err) => failed(err),
                }
            }
            Command::Conflicts { action, format } => conflicts_command(&config, action, format).await,
            Command::Status { format } => match status::run(&config).await {
                Ok(summary) => print_as(format, &summary, status::Summary::to_human, true),
                Err(err) => failed(err),
            },
            Command::Tail {
                slot,
                advance,
                publication,
                limit,
            } => {
                let options = tail::TailOptions {
                    slot,
                    advance,
                    publication,
                    limit,
                };
                match tail::run(&config, options).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("error: {err}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            }
        }
    })
}

/// Waits for `run` to end, passing the daemon's stop on to it, and
/// stopping it for a switch asked through the console: its result, and the
/// request that stopped it, if one did.
async fn until_ended<R>(
    run: impl std::future::Future<Output = R>,
    requests: &mut Option<tokio::sync::mpsc::UnboundedReceiver<switch::desk::Request>>,
    stop_rx: &mut tokio::sync::watch::Receiver<bool>,
    run_stop_tx: &tokio::sync::watch::Sender<bool>,
) -> (R, Option<switch::desk::Request>) {
    tokio::pin!(run);
    let mut asked = None;
    loop {
        tokio::select! {
            result = &mut run => return (result, asked),
            request = async {
                match requests.as_mut() {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            }, if asked.is_none() => match request {
                Some(request) => {
                    tracing::info!(kind = request.kind.name(), "stopping the stream for a {} asked through the console", request.kind.name());
                    asked = Some(request);
                    let _ = run_stop_tx.send(true);
                }
                // The console's desk is gone: nothing more to wait for.
                None => *requests = None,
            },
            // Once the signal's task has said stop, it is gone: its sender
            // dropped, `changed` fails at once, and matching that too would
            // spin this loop through the shutdown.
            Ok(()) = stop_rx.changed() => {
                let _ = run_stop_tx.send(*stop_rx.borrow());
            }
        }
    }
}

/// After a failure that starting again cannot cure (the slot lost): up
/// and failed until SIGTERM, so that /health, /metrics, the console and
/// the status page say what happened and what to do, instead of a
/// supervisor restarting the daemon into the same error again and again.
/// A switch or rollback asked meanwhile is answered with the failure.
async fn failed_until_stopped(
    err: &run::RunError,
    requests: &mut Option<tokio::sync::mpsc::UnboundedReceiver<switch::desk::Request>>,
    stop_rx: &mut tokio::sync::watch::Receiver<bool>,
) {
    tracing::error!(error = %err, "starting again cannot help: this daemon stays up, failed, so that /health and `cutover status` say what happened and what to do; stop it (SIGTERM) first");
    while !*stop_rx.borrow() {
        tokio::select! {
            request = async {
                match requests.as_mut() {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            } => match request {
                Some(request) => {
                    let _ = request.reply.send(Err(format!(
                        "the daemon failed and only waits to be stopped: {err}"
                    )));
                }
                None => *requests = None,
            },
            changed = stop_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// The daemon's loop: streams away from the primary until SIGTERM; a
/// switch or rollback asked through the console stops the stream, runs
/// with the store this process holds, and the loop streams again in the
/// direction it leaves.
async fn run_daemon(
    config: &config::Config,
    store: &store::Store,
    status: std::sync::Arc<live::Status>,
) -> Result<(), run::RunError> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested: finishing the batch in flight");
        let _ = stop_tx.send(true);
    });
    let mut requests = status.desk.take();
    loop {
        let direction = status.direction();
        // This run's own stop: the daemon's shutdown, or a switch.
        let (run_stop_tx, run_stop_rx) = tokio::sync::watch::channel(*stop_rx.borrow());
        if config.verify.continuous && direction == direction::Direction::Reverse {
            tracing::warn!(
                "verify.continuous: the background verifier compares the target to the source, which is not the primary since the switch; it is off while the stream runs in reverse"
            );
        }
        let verifier = (config.verify.continuous && direction == direction::Direction::Forward)
            .then(|| {
                tokio::spawn(verify::continuous::run(
                    config.clone(),
                    store.clone(),
                    std::sync::Arc::clone(&status),
                    run_stop_rx.clone(),
                ))
            });
        let run = run::run(config, store, run_stop_rx, std::sync::Arc::clone(&status));
        let (result, asked) = until_ended(run, &mut requests, &mut stop_rx, &run_stop_tx).await;
        if let Some(verifier) = verifier {
            verifier.abort();
        }
        let Some(request) = asked else {
            if let Err(err) = &result
                && err.slot_lost()
            {
                failed_until_stopped(err, &mut requests, &mut stop_rx).await;
            }
            return result;
        };
        if let Err(err) = result {
            let _ = request.reply.send(Err(format!(
                "the stream stopped on an error before the {}: {err}",
                request.kind.name()
            )));
            return Err(err);
        }
        // Under way from here (`cutover_switch_in_progress`): the state
        // read back below says how it ended.
        status.metrics.switch_in_progress.set(1);
        let done = switch::run_with_store(config, store, request.kind, request.options).await;
        match store.switch_state() {
            Ok(state) => {
                let direction = state.direction();
                status.set_stream(&direction.slot(&config.slot), direction);
                status.set_switch(state);
            }
            // How it ended is unknown here; the next start settles it.
            Err(_) => status.metrics.switch_in_progress.set(0),
        }
        let _ = request.reply.send(
            done.map(|summary| switch::Summary {
                by_daemon: true,
                ..summary
            })
            .map_err(|e| e.to_string()),
        );
        if *stop_rx.borrow() {
            return Ok(());
        }
    }
}

/// `cutover switch` and `cutover rollback`.
async fn switch_command(
    config: &config::Config,
    kind: switch::journal::Kind,
    options: switch::Options,
    format: OutputFormat,
) -> ExitCode {
    let outcome = match switch::run(config, kind, options.clone()).await {
        // A daemon runs: it switches itself, asked through its console.
        Err(switch::SwitchError::DaemonRunning(..))
            if status::console_address(&config.state_dir).is_some() =>
        {
            ask_daemon(config, kind, options).await
        }
        other => other.map_err(|e| e.to_string()),
    };
    match outcome {
        Ok(summary) => {
            let done = !matches!(summary.outcome, switch::journal::Outcome::Undone { .. });
            print_as(format, &summary, switch::Summary::to_human, done)
        }
        Err(err) => failed(err),
    }
}

/// Prints `value` for a person (`human`) or as JSON; exit 0 when `ok`.
fn print_as<T: serde::Serialize>(
    format: OutputFormat,
    value: &T,
    human: impl FnOnce(&T) -> String,
    ok: bool,
) -> ExitCode {
    match format {
        OutputFormat::Human => print!("{}", human(value)),
        OutputFormat::Json => match serde_json::to_string_pretty(value) {
            Ok(json) => println!("{json}"),
            Err(err) => return failed(format!("cannot encode the output as JSON: {err}")),
        },
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

/// Says what failed on stderr; exit 1.
fn failed(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(EXIT_FAILURE)
}

/// A switch or rollback asked of the running daemon through its console.
async fn ask_daemon(
    config: &config::Config,
    kind: switch::journal::Kind,
    options: switch::Options,
) -> Result<switch::Summary, String> {
    let Some(addr) = status::console_address(&config.state_dir) else {
        return Err("the daemon's console address is not recorded".into());
    };
    let client = status::connect_console(addr, config, "cutover switch")
        .await
        .map_err(|e| format!("a daemon runs; its console at {addr} did not answer: {e}"))?;
    let mut command = kind.name().to_uppercase();
    if let Some(group) = &options.group {
        command.push_str(&format!(" GROUP {group}"));
    }
    if options.dry_run {
        command.push_str(" DRY RUN");
    }
    if options.verify {
        command.push_str(" VERIFY");
    }
    let rows = status::rows(&client, &command).await?;
    let text = rows
        .first()
        .and_then(|row| status::text(row, "summary"))
        .ok_or_else(|| format!("{command}: the daemon answered nothing"))?;
    serde_json::from_str(&text).map_err(|e| format!("{command}: unreadable answer: {e}"))
}

/// `cutover conflicts resolve`.
#[derive(Debug, clap::Subcommand)]
enum ConflictAction {
    /// Settle parked stray write ID: the chosen server's row is written
    /// over the other's (by the running daemon, or by the next `cutover
    /// run`).
    Resolve {
        /// Its number, as `cutover conflicts` lists it.
        id: u64,
        /// The server whose row wins.
        #[arg(long = "use", value_enum)]
        side: ChosenSide,
    },
}

/// A server, as `--use` names it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ChosenSide {
    /// The source's row wins.
    Source,
    /// The target's row wins.
    Target,
}

/// `cutover conflicts`: through the running daemon's console, or the state
/// store when none runs.
async fn conflicts_command(
    config: &config::Config,
    action: Option<ConflictAction>,
    format: OutputFormat,
) -> ExitCode {
    match action {
        None => match status::run(config).await {
            Ok(summary) => print_as(
                format,
                &summary.stray_writes,
                |strays| {
                    let mut out = String::new();
                    if strays.is_empty() {
                        out.push_str("no stray write or conflict recorded\n");
                    }
                    for s in strays {
                        out.push_str(&s.line());
                        out.push('\n');
                    }
                    out
                },
                true,
            ),
            Err(err) => failed(err),
        },
        Some(ConflictAction::Resolve { id, side }) => {
            let side = match side {
                ChosenSide::Source => "source",
                ChosenSide::Target => "target",
            };
            match store::Store::open(&config.state_dir) {
                Ok(store) => match store.choose_side(id, side).await {
                    Ok(Some(record)) => {
                        println!(
                            "#{id} {} {}: the {side}'s row will be written over the other server's when `cutover run` runs next",
                            record.table, record.key
                        );
                        ExitCode::SUCCESS
                    }
                    Ok(None) => failed(format!(
                        "no stray write {id} is parked: `cutover conflicts` lists them (resolution parked)"
                    )),
                    Err(err) => failed(err),
                },
                Err(store::StoreError::Locked { .. }) => {
                    let Some(addr) = status::console_address(&config.state_dir) else {
                        return failed(
                            "a daemon holds the state store and its console is off: RESOLVE needs it (set console.password and restart it)",
                        );
                    };
                    let command = format!("RESOLVE {id} USE {}", side.to_uppercase());
                    let answer = async {
                        let client = status::connect_console(addr, config, "cutover conflicts")
                            .await
                            .map_err(|e| format!("its console at {addr} did not answer: {e}"))?;
                        status::rows(&client, &command).await
                    }
                    .await;
                    match answer {
                        Ok(rows) => {
                            let row = rows.first();
                            println!(
                                "#{id} {} {}: the daemon writes the {side}'s row over the other server's",
                                row.and_then(|r| status::text(r, "table"))
                                    .unwrap_or_default(),
                                row.and_then(|r| status::text(r, "key")).unwrap_or_default()
                            );
                            ExitCode::SUCCESS
                        }
                        Err(err) => failed(err),
                    }
                }
                Err(err) => failed(err),
            }
        }
    }
}

/// Threads of the async runtime: `TOKIO_WORKER_THREADS`, else one.
///
/// cutover's work between the servers is light (decode, batch, forward
/// bytes) and waits on the network; the servers it sits between need the
/// cores. Measured with `make bench SCENARIO=apply-1` on 2 cores, a second
/// runtime thread halved the apply rate by the wake-ups it costs.
fn worker_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn init_logging(format: LogFormat, level: Option<&str>, default_level: &str) -> Result<(), String> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).map_err(|e| e.to_string())?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::future::Future;
    use std::time::Duration;

    use tokio::sync::watch;

    /// The daemon told to stop waits for its stream to end without
    /// spinning: the signal's task is gone once it has said stop.
    #[tokio::test]
    async fn a_stopping_daemon_waits_for_its_stream_without_spinning() {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let (run_stop_tx, run_stop_rx) = watch::channel(false);
        stop_tx.send(true).unwrap();
        drop(stop_tx);
        let polls = Cell::new(0);
        let mut finishing = Box::pin(tokio::time::sleep(Duration::from_millis(100)));
        let run = std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            finishing.as_mut().poll(cx)
        });
        let ((), asked) = super::until_ended(run, &mut None, &mut stop_rx, &run_stop_tx).await;
        assert!(asked.is_none());
        assert!(*run_stop_rx.borrow(), "the stop reached the stream");
        assert!(
            polls.get() < 10,
            "the stream was polled {} times in 100 ms",
            polls.get()
        );
    }
}
