//! `make bench`: cutover side by side with native logical replication,
//! `pg_dump | pg_restore` and pgcopydb, on two throwaway clusters with the
//! same settings for every contestant. Prints a table with the ratio of
//! cutover to each peer and writes the figures as JSON. Not a test: it
//! asserts nothing about timings (docs/benchmarks.md).

use std::path::PathBuf;
use std::process::Command;

use clap::{Parser, ValueEnum};
use cutover_tests::bench::context::{Bench, SETTINGS};
use cutover_tests::bench::report::Report;
use cutover_tests::bench::scenarios;
use cutover_tests::cli::cutover_bin;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Copy,
    #[value(name = "apply-1")]
    Apply1,
    #[value(name = "apply-100")]
    Apply100,
    Lag,
    Memory,
    Verify,
    Switch,
    Kafka,
}

#[derive(Debug, Parser)]
#[command(about = "cutover benchmarks against native logical replication, pg_dump and pgcopydb")]
struct Args {
    /// The scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// `beneficiaries` rows of the dataset (documents: a tenth, payments: a half).
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,
    /// The dataset's seed.
    #[arg(long, default_value_t = 42)]
    seed: i64,
    /// Rounds per scenario; contestants alternate their order between rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Parallel workers for contestants that have them.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Changes in the backlog of the apply scenarios.
    #[arg(long, default_value_t = 200_000)]
    changes: i64,
    /// pgbench rate of the lag scenario (transactions per second).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Duration of the lag scenario, seconds.
    #[arg(long, default_value_t = 60)]
    lag_seconds: u32,
    /// Switch and rollback pairs of the switch scenario.
    #[arg(long, default_value_t = 10)]
    pairs: usize,
    /// Size of the single transaction of the memory scenario, MiB.
    #[arg(long, default_value_t = 1024)]
    bulk_mb: i64,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Keep the work directory (the daemons' configs and logs; run with
    /// `CUTOVER_TEST_LOG=debug` for per-batch timings) instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(problem) = args.check() {
        eprintln!("error: {problem}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the async runtime");
    runtime.block_on(run(args));
}

impl Args {
    /// Refuses what no scenario can run with, naming the argument.
    fn check(&self) -> Result<(), String> {
        let at_least = |name: &str, value: i64, least: i64| {
            if value < least {
                Err(format!("--{name} {value}: it must be at least {least}"))
            } else {
                Ok(())
            }
        };
        at_least("rows", self.rows, 100)?;
        at_least("rounds", self.rounds as i64, 1)?;
        at_least("workers", self.workers as i64, 1)?;
        at_least("changes", self.changes, 3)?;
        at_least("rate", i64::from(self.rate), 1)?;
        at_least("lag-seconds", i64::from(self.lag_seconds), 1)?;
        at_least("pairs", self.pairs as i64, 1)?;
        at_least("bulk-mb", self.bulk_mb, 1)
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn run(args: Args) {
    let work = tempfile::Builder::new()
        .prefix("cutover-bench-")
        .tempdir_in("/tmp")
        .expect("a work directory");
    // Removed when dropped at the end, unless kept.
    let (_work, work_dir) = if args.keep {
        let kept = work.keep();
        println!("work directory kept: {}", kept.display());
        (None, kept)
    } else {
        let dir = work.path().to_owned();
        (Some(work), dir)
    };
    println!("cutover benchmark: {:?}", args);
    let bench = Bench::start(work_dir, args.workers, args.rows, args.seed).await;
    let mut report = Report::default();
    let memory_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let source = bench.src().await;
    let version: String = source
        .query_one("SELECT version()", &[])
        .await
        .expect("version")
        .get(0);
    let date: String = source
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI UTC')",
            &[],
        )
        .await
        .expect("now")
        .get(0);
    report.environment = vec![
        ("date".into(), date),
        (
            "cores".into(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        ("memory".into(), memory_total),
        ("postgresql".into(), version),
        (
            "cutover".into(),
            command_output(&cutover_bin().to_string_lossy(), &["--version"]),
        ),
        (
            "pgcopydb".into(),
            command_output("pgcopydb", &["--version"])
                .lines()
                .find(|l| l.starts_with("pgcopydb version"))
                .unwrap_or("not installed")
                .to_owned(),
        ),
        (
            "settings".into(),
            SETTINGS
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("rows".into(), args.rows.to_string()),
        ("seed".into(), args.seed.to_string()),
        ("workers".into(), args.workers.to_string()),
    ];
    for (k, v) in &report.environment {
        println!("  {k}: {v}");
    }
    println!("dataset: {} rows, seed {}", args.rows, args.seed);
    scenarios::prepare(&bench).await;
    let wants = |s: Scenario| args.scenario == Scenario::All || args.scenario == s;
    for round in 0..args.rounds {
        if wants(Scenario::Copy) {
            scenarios::copy(&bench, &mut report, round).await;
        }
        if wants(Scenario::Apply1) {
            scenarios::apply(&bench, &mut report, args.changes, 1, round).await;
        }
        if wants(Scenario::Apply100) {
            scenarios::apply(&bench, &mut report, args.changes, 100, round).await;
        }
        if wants(Scenario::Lag) {
            scenarios::lag(&bench, &mut report, args.rate, args.lag_seconds, round).await;
        }
        if wants(Scenario::Verify) {
            cutover_tests::bench::verify::verify(&bench, &mut report, round).await;
        }
        if wants(Scenario::Kafka) {
            cutover_tests::bench::kafka::kafka(&bench, &mut report, args.changes, round).await;
        }
        if wants(Scenario::Switch) {
            cutover_tests::bench::switch::switch(&bench, &mut report, args.pairs, args.rate, round)
                .await;
        }
    }
    if wants(Scenario::Memory) {
        scenarios::memory(&bench, &mut report, args.bulk_mb).await;
    }
    println!("\n{}", report.table());
    if let Some(parent) = args.json.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let json = serde_json::to_string_pretty(&report.to_json()).expect("encode the results");
    std::fs::write(&args.json, json).expect("write the JSON results");
    println!("results: {}", args.json.display());
}
