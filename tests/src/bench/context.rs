//! What every scenario shares: the two clusters, the `cutover` binary,
//! contestant setup and teardown, and the measuring instruments (wall
//! clocks, the servers' LSNs, peak RSS from `/proc`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cluster::{Cluster, ClusterOptions};
use crate::daemon::Daemon;

/// The database every contestant works in.
pub const DB: &str = "bench";

/// The server settings of both clusters, for every contestant (on top of
/// the harness's: `wal_level = logical`, 16 slots and senders). Durable
/// like a production server: `fsync` and full-page writes on.
pub const SETTINGS: &[(&str, &str)] = &[
    ("fsync", "on"),
    ("full_page_writes", "on"),
    ("shared_buffers", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    ("max_worker_processes", "16"),
    ("max_logical_replication_workers", "8"),
    ("max_sync_workers_per_subscription", "2"),
    ("logical_decoding_work_mem", "64MB"),
    // A re-enabled subscription's worker starts at once, not 5 s later.
    ("wal_retrieve_retry_interval", "100ms"),
];

/// How long any wait of the benchmark may take before it gives up.
pub const PATIENCE: Duration = Duration::from_secs(1800);

/// The clusters and what the scenarios need to run contestants on them.
#[derive(Debug)]
pub struct Bench {
    /// The server migrated from.
    pub source: Cluster,
    /// The server migrated to.
    pub target: Cluster,
    /// Scratch space: configs, state directories, logs.
    pub work: PathBuf,
    /// Parallel workers for every contestant that has them.
    pub workers: usize,
    /// `beneficiaries` rows of the dataset.
    pub rows: i64,
    /// The dataset's seed.
    pub seed: i64,
}

impl Bench {
    /// Starts both clusters with [`SETTINGS`] and creates [`DB`] on each.
    pub async fn start(work: PathBuf, workers: usize, rows: i64, seed: i64) -> Bench {
        let mut options = ClusterOptions::default();
        for (name, value) in SETTINGS {
            options = options.setting(name, value);
        }
        let source_options = options.clone();
        let source = std::thread::spawn(move || Cluster::start_with(source_options));
        let target = Cluster::start_with(options);
        let source = source
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        source.create_database(DB).await;
        target.create_database(DB).await;
        Bench {
            source,
            target,
            work,
            workers,
            rows,
            seed,
        }
    }

    /// A superuser connection to the source's [`DB`].
    pub async fn src(&self) -> Client {
        self.source.client(DB).await
    }

    /// A superuser connection to the target's [`DB`].
    pub async fn tgt(&self) -> Client {
        self.target.client(DB).await
    }

    /// Runs `sql` (several statements allowed) on the source.
    pub async fn on_source(&self, sql: &str) {
        self.source.execute(DB, sql).await;
    }

    /// Runs `sql` (several statements allowed) on the target.
    pub async fn on_target(&self, sql: &str) {
        self.target.execute(DB, sql).await;
    }

    /// Before each contestant: both servers checkpointed and no autovacuum
    /// worker running (the previous contestant's bulk load sets them off),
    /// so that no contestant pays for another's leftovers.
    pub async fn settle(&self) {
        for cluster in [&self.source, &self.target] {
            cluster.execute(DB, "CHECKPOINT").await;
            let client = cluster.client(DB).await;
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                let busy: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
                        &[],
                    )
                    .await
                    .expect("ask for autovacuum workers")
                    .get(0);
                if busy == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// A fresh directory under the work directory.
    pub fn fresh_dir(&self, name: &str) -> PathBuf {
        let dir = self.work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a benchmark directory");
        dir
    }

    /// A `cutover` config for `tables`, with its own state directory.
    pub fn cutover_config(&self, name: &str, slot: &str, tables: &[&str]) -> PathBuf {
        let dir = self.fresh_dir(name);
        let tables: Vec<String> = tables.iter().map(|t| format!("\"public.{t}\"")).collect();
        let text = format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\n\
             [replication]\nslot = \"{slot}\"\npublication = \"{slot}\"\ntables = [{}]\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n\
             [copy]\nworkers = {}\n",
            self.source.url(DB, "postgres", None),
            self.target.url(DB, "postgres", None),
            dir.join("state").display(),
            tables.join(", "),
            self.workers,
        );
        let path = dir.join("cutover.toml");
        std::fs::write(&path, text).expect("write the benchmark config");
        path
    }

    /// Starts `cutover run` and waits until it streams.
    pub async fn start_cutover(&self, config: &Path) -> Daemon {
        let mut daemon = Daemon::start(config, &["run"]);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if daemon.log_of_this_start().contains("to=\"streaming\"") {
                return daemon;
            }
            assert!(
                daemon.running(),
                "cutover run exited before streaming:\n{}",
                daemon.log()
            );
            assert!(Instant::now() < deadline, "cutover never streamed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Removes what a `cutover run` left: its slot and publication on the
    /// source, its replication origin on the target.
    pub async fn drop_cutover(&self, slot: &str) {
        self.on_source(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}';
             DROP PUBLICATION IF EXISTS \"{slot}\";"
        ))
        .await;
        self.on_target(&format!(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname LIKE 'cutover_{slot}%';"
        ))
        .await;
    }

    /// A native subscription (and its publication) for `tables`; waits
    /// until every table is ready when `copy_data`.
    pub async fn create_subscription(&self, name: &str, tables: &[&str], copy_data: bool) {
        self.on_source(&format!(
            "DROP PUBLICATION IF EXISTS {name}; CREATE PUBLICATION {name} FOR TABLE {};",
            tables.join(", ")
        ))
        .await;
        self.on_target(&format!(
            "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {name} WITH (copy_data = {copy_data})",
            self.source.conninfo(DB, "postgres")
        ))
        .await;
        self.wait_subscription_ready(name, tables.len()).await;
    }

    /// Waits until the subscription's tables are all in state `r` (ready).
    pub async fn wait_subscription_ready(&self, name: &str, tables: usize) {
        let target = self.tgt().await;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready: i64 = target
                .query_one(
                    "SELECT count(*) FILTER (WHERE sr.srsubstate = 'r')
                       FROM pg_subscription_rel sr JOIN pg_subscription s ON s.oid = sr.srsubid
                      WHERE s.subname = $1",
                    &[&name],
                )
                .await
                .expect("read pg_subscription_rel")
                .get(0);
            if ready as usize == tables {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "subscription {name} never got ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drops a native subscription (and its slot) and its publication.
    pub async fn drop_subscription(&self, name: &str) {
        self.on_target(&format!("DROP SUBSCRIPTION IF EXISTS {name}"))
            .await;
        self.on_source(&format!("DROP PUBLICATION IF EXISTS {name}"))
            .await;
    }

    /// The replication origin through which a native subscription applies.
    pub async fn subscription_origin(&self, name: &str) -> String {
        self.tgt()
            .await
            .query_one(
                "SELECT 'pg_' || oid FROM pg_subscription WHERE subname = $1",
                &[&name],
            )
            .await
            .expect("read pg_subscription")
            .get(0)
    }

    /// The source's current WAL position, in bytes.
    pub async fn source_lsn(client: &Client) -> u64 {
        let text: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("pg_current_wal_lsn")
            .get(0);
        parse_lsn(&text)
    }

    /// Waits until `probe` (SQL returning one boolean on the target) holds.
    pub async fn wait_target(&self, probe: &str) -> Duration {
        let target = self.tgt().await;
        let started = Instant::now();
        loop {
            let done: bool = target
                .query_one(probe, &[])
                .await
                .unwrap_or_else(|e| panic!("{probe}: {e}"))
                .get(0);
            if done {
                return started.elapsed();
            }
            assert!(started.elapsed() < PATIENCE, "never true: {probe}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `count(*)` and an order-independent checksum of `table` on a side.
    pub async fn fingerprint(client: &Client, table: &str) -> (i64, String) {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(hashtext(t::text)::numeric), 0)::text FROM {table} t"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("fingerprint {table}: {e}"));
        (row.get(0), row.get(1))
    }

    /// Whether `table` holds the same rows on both sides.
    pub async fn equal(&self, table: &str) -> bool {
        let (source, target) = (self.src().await, self.tgt().await);
        Bench::fingerprint(&source, table).await == Bench::fingerprint(&target, table).await
    }
}

/// `X/Y` to bytes.
pub fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// Peak resident memory of a process, polled from `/proc/<pid>/status`
/// (`VmHWM` is the kernel's own high-water mark, so a short poll interval
/// only matters for the last moments before exit).
#[derive(Debug)]
pub struct PeakRss {
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    /// Starts watching `pid`.
    pub fn watch(pid: u32) -> PeakRss {
        let peak_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (peak, halt) = (Arc::clone(&peak_kb), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match vm_hwm_kb(pid) {
                    Some(kb) => {
                        peak.fetch_max(kb, Ordering::Relaxed);
                    }
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PeakRss {
            peak_kb,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak so far, in MiB.
    pub fn peak_mb(&self) -> f64 {
        self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// Stops watching; the peak in MiB.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak_mb()
    }
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Clock ticks per second of `/proc/<pid>/stat` times: the kernel's
/// USER_HZ, 100 on every Linux architecture this runs on (reading it
/// through `sysconf` would need `unsafe`, which the workspace denies).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user and system, seconds) used by each side of a contestant:
/// every process of the source cluster, of the target cluster, and the
/// tool's own processes (the benchmark's children that exited meanwhile).
///
/// A cluster's figure is its postmaster's own time, the time of the
/// children it has reaped (`cutime`, `cstime`: backends, parallel and
/// replication workers that came and went) and the time of its live
/// children, so nothing short-lived is missed whatever the timing. Wall
/// clocks on a shared two-core machine move by tens of percent from round
/// to round; CPU time moves much less, and says what each contestant
/// costs the servers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuUse {
    /// Every process of the source cluster.
    pub source: f64,
    /// Every process of the target cluster.
    pub target: f64,
    /// The tool's processes (`cutover`, `pg_dump`, `pg_restore`,
    /// `pgcopydb`; none for native replication, which runs in the target).
    pub tool: f64,
}

impl CpuUse {
    /// The three together.
    pub fn total(&self) -> f64 {
        self.source + self.target + self.tool
    }

    /// What was used since `earlier`.
    pub fn since(&self, earlier: &CpuUse) -> CpuUse {
        CpuUse {
            source: self.source - earlier.source,
            target: self.target - earlier.target,
            tool: self.tool - earlier.tool,
        }
    }

    /// `source 1.20 + target 2.40 + tool 0.50 CPU-s`.
    pub fn describe(&self) -> String {
        format!(
            "source {:.2} + target {:.2} + tool {:.2} CPU-s",
            self.source, self.target, self.tool
        )
    }
}

impl Bench {
    /// The CPU time used so far by both clusters and by the benchmark's
    /// reaped children; subtract two readings ([`CpuUse::since`]).
    pub fn cpu_now(&self) -> CpuUse {
        let own = proc_stat("self");
        CpuUse {
            source: cluster_cpu(&self.source.data_dir()),
            target: cluster_cpu(&self.target.data_dir()),
            tool: own
                .map(|s| s.children_ticks as f64 / TICKS_PER_SECOND)
                .unwrap_or(0.0),
        }
    }

    /// [`Bench::cpu_now`] with the CPU of `running`, a tool process that
    /// has not exited (a process's time reaches its parent's reaped
    /// children's only when it exits): for a reading taken while it runs.
    pub fn cpu_now_with(&self, running: u32) -> CpuUse {
        let mut cpu = self.cpu_now();
        cpu.tool += proc_stat(&running.to_string())
            .map(|s| s.own_ticks as f64 / TICKS_PER_SECOND)
            .unwrap_or(0.0);
        cpu
    }
}

/// The fields of `/proc/<pid>/stat` the CPU meter uses.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    ppid: u32,
    /// utime + stime.
    own_ticks: u64,
    /// cutime + cstime: reaped children.
    children_ticks: u64,
}

fn proc_stat(pid: &str) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume
    // after the last ')'. Then: state ppid ... utime(14) stime cutime cstime.
    let rest: Vec<&str> = text
        .get(text.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(field(4)?).ok()?,
        own_ticks: field(14)? + field(15)?,
        children_ticks: field(16)? + field(17)?,
    })
}

/// CPU seconds of a cluster: its postmaster (whose pid is the first line
/// of `postmaster.pid`), what it reaped, and its live children.
fn cluster_cpu(data_dir: &Path) -> f64 {
    let Some(postmaster) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return 0.0;
    };
    let mut ticks = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some(stat) = proc_stat(pid).filter(|s| s.ppid == postmaster) {
                ticks += stat.own_ticks;
            }
        }
    }
    // Read last: a child reaped after the scan above counts here, once
    // more at worst (one child's time, never a lost one).
    if let Some(stat) = proc_stat(&postmaster.to_string()) {
        ticks += stat.own_ticks + stat.children_ticks;
    }
    ticks as f64 / TICKS_PER_SECOND
}

/// `pgbench` running `script` on the bench database at `port`: 4 clients,
/// 2 threads, `rate` transactions per second, for `seconds`.
pub fn pgbench(port: u16, script: &Path, rate: u64, seconds: u64) -> std::process::Command {
    let mut command = std::process::Command::new(crate::cluster::bindir().join("pgbench"));
    command
        .args(["-n", "-c", "4", "-j", "2", "-R", &rate.to_string()])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            DB,
        ]);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spends `cpu` of this process's CPU time, by the kernel's CPU clock
    /// (not the wall clock, which a loaded machine stretches), within a
    /// minute.
    fn burn(cpu: Duration) {
        use nix::time::{ClockId, clock_gettime};
        let now = || Duration::from(clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap());
        let (started, wall) = (now(), Instant::now());
        let mut x = 0u64;
        while now() - started < cpu && wall.elapsed() < Duration::from_secs(60) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }

    #[test]
    fn proc_stat_reads_the_parent_and_counts_own_and_reaped_children_time() {
        let before = proc_stat("self").expect("read /proc/self/stat");
        assert_eq!(before.ppid, std::os::unix::process::parent_id());
        burn(Duration::from_millis(300));
        // A child that burns CPU, waited for: its time moves to ours.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .expect("run sh");
        assert!(status.success());
        let after = proc_stat("self").expect("read /proc/self/stat");
        // 300 ms of CPU is 30 ticks; allow for a loaded machine.
        assert!(
            after.own_ticks >= before.own_ticks + 15,
            "own {} -> {}",
            before.own_ticks,
            after.own_ticks
        );
        assert!(
            after.children_ticks >= before.children_ticks + 10,
            "children {} -> {}",
            before.children_ticks,
            after.children_ticks
        );
    }

    #[test]
    fn cpu_use_subtracts_and_adds_per_side() {
        let earlier = CpuUse {
            source: 1.0,
            target: 2.0,
            tool: 0.5,
        };
        let later = CpuUse {
            source: 1.5,
            target: 4.0,
            tool: 1.25,
        };
        let used = later.since(&earlier);
        assert_eq!(
            used,
            CpuUse {
                source: 0.5,
                target: 2.0,
                tool: 0.75
            }
        );
        assert_eq!(used.total(), 3.25);
        assert_eq!(
            used.describe(),
            "source 0.50 + target 2.00 + tool 0.75 CPU-s"
        );
    }
}
