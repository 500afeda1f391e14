//! Copy progress a person can watch: bars per worker and overall (rows,
//! bytes, rate, ETA) on a terminal, a log line every few seconds otherwise.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a log line is written when stdout is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shared progress of one copy; cheap to clone into workers.
#[derive(Clone)]
pub struct CopyProgress {
    inner: Arc<Inner>,
}

struct Inner {
    bars: Option<Bars>,
    tables: Vec<String>,
    estimated_rows: u64,
    rows: AtomicU64,
    bytes: AtomicU64,
    tables_done: AtomicUsize,
    started: Instant,
    last_log: Mutex<Instant>,
}

struct Bars {
    overall: ProgressBar,
    workers: Vec<ProgressBar>,
    _multi: MultiProgress,
}

impl std::fmt::Debug for CopyProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyProgress")
            .field("rows", &self.inner.rows.load(Ordering::Relaxed))
            .field("bytes", &self.inner.bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl CopyProgress {
    /// Progress over `tables` (name, estimated rows) with `workers` workers.
    pub fn new(tables: Vec<(String, u64)>, workers: usize) -> CopyProgress {
        let estimated_rows: u64 = tables.iter().map(|(_, rows)| rows).sum();
        let bars = std::io::stdout().is_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
            let overall = multi.add(ProgressBar::new(estimated_rows.max(1)));
            overall.set_style(
                ProgressStyle::with_template(
                    "copy {bar:40} {human_pos}/{human_len} rows  {msg}  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let workers = (0..workers)
                .map(|i| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(&format!("  worker {}: {{msg}}", i + 1))
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.enable_steady_tick(Duration::from_millis(500));
                    bar
                })
                .collect();
            Bars {
                overall,
                workers,
                _multi: multi,
            }
        });
        CopyProgress {
            inner: Arc::new(Inner {
                bars,
                tables: tables.into_iter().map(|(name, _)| name).collect(),
                estimated_rows,
                rows: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                tables_done: AtomicUsize::new(0),
                started: Instant::now(),
                last_log: Mutex::new(Instant::now()),
            }),
        }
    }

    /// Rows committed for a table.
    pub fn rows(&self, _table: usize, rows: u64) {
        self.inner.rows.fetch_add(rows, Ordering::Relaxed);
        if let Some(bars) = &self.inner.bars {
            bars.overall.inc(rows);
        }
        self.maybe_log();
    }

    /// Bytes moved for a table.
    pub fn bytes(&self, _table: usize, bytes: u64) {
        let total = self.inner.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bars) = &self.inner.bars {
            bars.overall
                .set_message(format!("{:.1} MB", total as f64 / 1_048_576.0));
        }
        self.maybe_log();
    }

    /// What a worker is doing.
    pub fn worker(&self, id: usize, what: &str) {
        if let Some(bar) = self.inner.bars.as_ref().and_then(|b| b.workers.get(id)) {
            bar.set_message(what.to_owned());
        }
    }

    /// A table is finished.
    pub fn table_done(&self, table: usize) {
        let done = self.inner.tables_done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(bars) = &self.inner.bars {
            bars.overall.println(format!(
                "copied {} ({done}/{} tables)",
                self.inner.tables[table],
                self.inner.tables.len()
            ));
        }
    }

    /// The copy is over (or stopped).
    pub fn finish(&self) {
        if let Some(bars) = &self.inner.bars {
            for bar in &bars.workers {
                bar.finish_and_clear();
            }
            bars.overall.finish();
        }
        let elapsed = self.inner.started.elapsed().as_secs_f64().max(0.001);
        let rows = self.inner.rows.load(Ordering::Relaxed);
        let bytes = self.inner.bytes.load(Ordering::Relaxed);
        tracing::info!(
            rows,
            mb = format!("{:.1}", bytes as f64 / 1_048_576.0),
            seconds = format!("{elapsed:.1}"),
            rows_per_second = (rows as f64 / elapsed) as u64,
            "copy finished"
        );
    }

    fn maybe_log(&self) {
        if self.inner.bars.is_some() {
            return;
        }
        let Ok(mut last) = self.inner.last_log.try_lock() else {
            return;
        };
        if last.elapsed() < LOG_EVERY {
            return;
        }
        *last = Instant::now();
        let elapsed = self.inner.started.elapsed().as_secs_f64().max(0.001);
        let rows = self.inner.rows.load(Ordering::Relaxed);
        let rate = rows as f64 / elapsed;
        let eta = if self.inner.estimated_rows > rows && rate > 0.0 {
            format!("{:.0}s", (self.inner.estimated_rows - rows) as f64 / rate)
        } else {
            "?".into()
        };
        tracing::info!(
            rows,
            estimated_rows = self.inner.estimated_rows,
            mb = format!(
                "{:.1}",
                self.inner.bytes.load(Ordering::Relaxed) as f64 / 1_048_576.0
            ),
            rows_per_second = rate as u64,
            tables_done = self.inner.tables_done.load(Ordering::Relaxed),
            tables = self.inner.tables.len(),
            eta,
            "copy progress"
        );
    }
}
