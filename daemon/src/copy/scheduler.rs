//! Which worker loads what, and when: chunks of big tables and bundles of
//! small ones, one table per worker while others wait, and the index and
//! constraint rebuilds each table needs once its last chunk is in.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cutover_replication::Lsn;
use cutover_replication::catalog::{Table, TableName};
use cutover_replication::snapshot::{self, Chunk};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::progress::CopyProgress;
use crate::store::{DroppedIndex, Store, TableCopy, TableCopyState};

use super::CopyError;
use super::orchestration::{TablePlan, query};
use super::rebuild::{Unvalidated, drop_indexes_and_keys, drop_load_constraints, rebuild_indexes};
use super::worker::worker;

/// A table is small when it fits in one chunk of at most this part of
/// `copy.chunk_mb`.
pub(super) const SMALL_TABLE_PART: u64 = 8;

/// At most this many small tables share a target transaction.
pub(super) const BUNDLE_TABLES: usize = 256;

/// A unit of work for a copy worker.
#[derive(Debug)]
pub(super) enum Task {
    /// One chunk of a table, in its own target transaction.
    Chunk { plan: usize, chunk: Chunk },
    /// A table's count in the snapshot, after its chunks.
    Count { plan: usize },
    /// Small tables, each in one chunk, copied and counted in one target
    /// transaction.
    Bundle(Vec<(usize, Chunk)>),
    /// A key, index or CHECK constraint dropped for the load, put back
    /// once the table is loaded.
    Rebuild { plan: usize, item: Rebuild },
    /// Once the table is loaded and its indexes built: its keys attached
    /// to their indexes, VACUUM (ANALYZE) when a foreign key dropped for
    /// the load joins it to another table (else ANALYZE, when configured),
    /// and the count on the target.
    Finalize {
        plan: usize,
        keys: Vec<DroppedIndex>,
        vacuum: bool,
    },
    /// A foreign key dropped for the load, added back and validated once
    /// both its tables are copied ([`ForeignKeys`]).
    ForeignKey {
        table: TableName,
        constraint: DroppedIndex,
    },
}

impl Task {
    /// What the task does, for the progress display and the log.
    pub(super) fn describe(&self, plans: &[TablePlan]) -> String {
        let name = |plan: &usize| plans[*plan].table.name.to_string();
        match self {
            Task::Chunk { plan, chunk } => format!("{} chunk {}", name(plan), chunk.index + 1),
            Task::Count { plan } => format!("{} counting", name(plan)),
            Task::Bundle(items) => format!("{} small tables", items.len()),
            Task::Rebuild { plan, item } => {
                let piece = match item {
                    Rebuild::Key(d) | Rebuild::Index(d) | Rebuild::Check(d) => &d.name,
                };
                format!("{} rebuilding {piece}", name(plan))
            }
            Task::Finalize { plan, keys, .. } if keys.is_empty() => {
                format!("{} counting on the target", name(plan))
            }
            Task::Finalize { plan, .. } => {
                format!("{} attaching keys, counting on the target", name(plan))
            }
            Task::ForeignKey { table, constraint } => {
                format!("{table} validating {}", constraint.name)
            }
        }
    }
}

/// What `copy.drop_indexes` dropped from a table, one piece.
#[derive(Debug, Clone)]
pub(super) enum Rebuild {
    Key(DroppedIndex),
    Index(DroppedIndex),
    Check(DroppedIndex),
}

/// A chunk's progress callback: its bytes and rows go to the coordinator
/// as they flow, and `streamed` keeps the rows reported.
pub(super) fn streaming<'a>(
    tx: &'a mpsc::UnboundedSender<Report>,
    plan: usize,
    streamed: &'a mut u64,
) -> impl FnMut(u64, u64) + 'a {
    move |bytes, rows| {
        *streamed += rows;
        let _ = tx.send(Report::Bytes { plan, bytes, rows });
    }
}

/// What a worker reports.
#[derive(Debug)]
pub(super) enum Report {
    ChunkDone {
        plan: usize,
        rows: u64,
        bytes: u64,
        /// Rows already shown by `Bytes` reports while the chunk flowed.
        streamed: u64,
    },
    Counted {
        plan: usize,
        rows: i64,
    },
    /// Data on its way, with the rows it holds (for progress only).
    Bytes {
        plan: usize,
        bytes: u64,
        rows: u64,
    },
    Rebuilt {
        plan: usize,
        item: Rebuild,
    },
    Finalized {
        plan: usize,
        target_rows: i64,
    },
    ForeignKeyRestored {
        table: TableName,
        name: String,
        left: Option<Unvalidated>,
    },
}

/// The workers' queue. Tasks are added while the copy runs (a loaded
/// table's rebuilds go to the front, so that it finishes soon), so an
/// idle worker waits for more until the queue is closed.
///
/// A worker takes the first task that does not load a table another
/// worker is loading, and shares a table only when nothing else is left.
/// Two loaders of one table contend on its indexes (each inserting into
/// the same btree pages, one of them in the middle of the other's key
/// range): `bench --scenario copy` showed a 1M-row table's chunk taking
/// 5.5 s beside its sibling against 2.6 s alone.
pub(super) struct WorkQueue {
    pub(super) tasks: Mutex<VecDeque<Task>>,
    /// Chunks being loaded, per table plan.
    pub(super) loading: Mutex<HashMap<usize, usize>>,
    pub(super) more: Notify,
    pub(super) closed: AtomicBool,
}

impl WorkQueue {
    pub(super) fn new(tasks: VecDeque<Task>) -> WorkQueue {
        WorkQueue {
            tasks: Mutex::new(tasks),
            loading: Mutex::new(HashMap::new()),
            more: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Task>> {
        self.tasks.lock().expect("the queue lock is never poisoned")
    }

    /// Adds tasks ahead of those waiting.
    pub(super) fn push_front(&self, tasks: Vec<Task>) {
        let mut queue = self.lock();
        for task in tasks.into_iter().rev() {
            queue.push_front(task);
        }
        drop(queue);
        self.more.notify_waiters();
    }

    /// The next task: the first that loads no table being loaded, else
    /// the first.
    pub(super) fn take(&self) -> Option<Task> {
        let mut tasks = self.lock();
        let mut loading = self
            .loading
            .lock()
            .expect("the queue lock is never poisoned");
        let free = |task: &Task| match task {
            Task::Chunk { plan, .. } => loading.get(plan).is_none_or(|n| *n == 0),
            _ => true,
        };
        let index = tasks.iter().position(free).unwrap_or(0);
        let task = tasks.remove(index)?;
        if let Task::Chunk { plan, .. } = &task {
            *loading.entry(*plan).or_default() += 1;
        }
        Some(task)
    }

    /// A chunk of `plan` is loaded.
    pub(super) fn loaded(&self, plan: usize) {
        let mut loading = self
            .loading
            .lock()
            .expect("the queue lock is never poisoned");
        if let Some(n) = loading.get_mut(&plan) {
            *n = n.saturating_sub(1);
        }
    }

    /// No task will be added: idle workers stop.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.more.notify_waiters();
    }

    pub(super) async fn next(&self) -> Option<Task> {
        loop {
            let more = self.more.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            if let Some(task) = self.take() {
                return Some(task);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            more.await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn copy_tables(
    config: &Config,
    store: &Store,
    source: &Client,
    target: &Client,
    plans: Vec<TablePlan>,
    copied_at: Lsn,
    sources: Vec<Client>,
    sinks: Vec<Client>,
    metrics: &Metrics,
) -> Result<(), CopyError> {
    let mut records: Vec<TableCopy> = Vec::with_capacity(plans.len());
    let mut remaining: Vec<u64> = Vec::with_capacity(plans.len());
    let mut chunks_of: Vec<Vec<Chunk>> = Vec::with_capacity(plans.len());
    let mut index_work: Vec<u64> = Vec::with_capacity(plans.len());
    for plan in &plans {
        index_work.push(index_work_of(target, plan.target_name(), &plan.table).await?);
        let chunks = snapshot::plan_chunks(
            source,
            &plan.table.name,
            plan.table.partitioned,
            config.copy.pages_per_chunk,
        )
        .await
        .map_err(query("source", format!("sizing {}", plan.table.name)))?;
        let mut record = store
            .table_copy(&plan.table.name)?
            .unwrap_or_else(|| TableCopy::pending(plan.table.name.clone(), copied_at));
        record.state = TableCopyState::Copying;
        record.copied_at = copied_at;
        record.chunks_total = chunks.len() as u64;
        record.chunks_done = 0;
        record.rows_copied = 0;
        record.bytes_copied = 0;
        record.source_count = None;
        record.target_count = None;
        record.format = Some(plan.format);
        // A mapped table keeps its keys: its rows are upserted on them.
        if config.copy.drop_indexes && plan.mapping.is_none() {
            drop_load_constraints(target, &mut record, store).await?;
        }
        store.put_table_copy(&record)?;
        remaining.push(chunks.len() as u64);
        records.push(record);
        chunks_of.push(chunks);
    }
    let small = |chunks: &[Chunk]| {
        chunks.len() == 1
            && chunks[0].pages <= u64::from(config.copy.pages_per_chunk) / SMALL_TABLE_PART
    };
    if config.copy.drop_indexes {
        // Every foreign key in scope is gone now: the keys they referenced
        // may go too. A small table keeps its own: rebuilding them would
        // cost more than the load saves.
        for ((record, chunks), plan) in records.iter_mut().zip(&chunks_of).zip(&plans) {
            if !small(chunks) && plan.mapping.is_none() {
                drop_indexes_and_keys(target, record, store).await?;
            }
        }
    }
    store.flush().await?;

    // Each table's chunks, then its count in the snapshot: a table is
    // finished (and kept by a resume) as soon as it can be, not at the end
    // of the whole copy. Small tables (one chunk of at most 1/8 of
    // `copy.chunk_mb`) go several to a task, copied and counted in one
    // target transaction: a commit, a flush and a round of the queue per
    // table would cost more than their rows.
    let mut queue = VecDeque::new();
    let mut bundle: Vec<(usize, Chunk)> = Vec::new();
    let mut bundle_pages = 0;
    let order = load_order(&index_work);
    let mut chunks_of: Vec<Option<Vec<Chunk>>> = chunks_of.into_iter().map(Some).collect();
    for i in order {
        let chunks = chunks_of[i].take().expect("each table once");
        if small(&chunks) {
            let chunk = chunks.into_iter().next().expect("one chunk");
            bundle_pages += chunk.pages;
            bundle.push((i, chunk));
            if bundle_pages >= u64::from(config.copy.pages_per_chunk)
                || bundle.len() >= BUNDLE_TABLES
            {
                queue.push_back(Task::Bundle(std::mem::take(&mut bundle)));
                bundle_pages = 0;
            }
            continue;
        }
        queue.extend(
            chunks
                .into_iter()
                .map(|chunk| Task::Chunk { plan: i, chunk }),
        );
        queue.push_back(Task::Count { plan: i });
    }
    if !bundle.is_empty() {
        queue.push_back(Task::Bundle(bundle));
    }

    let progress = CopyProgress::new(
        plans
            .iter()
            .map(|p| {
                (
                    p.table.name.to_string(),
                    p.table.row_estimate.unwrap_or(0).max(0) as u64,
                )
            })
            .collect(),
        sources.len(),
    );
    let queue = Arc::new(WorkQueue::new(queue));
    let plans = Arc::new(plans);
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let mut workers = JoinSet::new();
    for (id, (source, target)) in sources.into_iter().zip(sinks).enumerate() {
        let queue = Arc::clone(&queue);
        let plans = Arc::clone(&plans);
        let tx = tx.clone();
        let progress = progress.clone();
        let analyze = config.copy.analyze;
        workers.spawn(async move {
            worker(id, source, target, &queue, plans, tx, progress, analyze).await
        });
    }
    drop(tx);

    let joined = foreign_key_tables(&records);
    let mut counted: Vec<Option<i64>> = vec![None; plans.len()];
    // Rebuild steps still running per table; `None` until they are queued.
    let mut rebuilding: Vec<Option<usize>> = vec![None; plans.len()];
    let mut finished = 0;
    let mut foreign_keys = ForeignKeys::default();
    if plans.is_empty() {
        foreign_keys.queue_rest(store, target, &queue).await?;
    }
    let mut failure: Option<CopyError> = None;
    loop {
        tokio::select! {
            report = rx.recv() => {
                let Some(report) = report else { break };
                let plan = match report {
                    Report::Bytes { plan, bytes, rows } => {
                        progress.bytes(plan, bytes);
                        progress.rows(plan, rows);
                        metrics
                            .copy_bytes
                            .with_label_values(&[&records[plan].name.to_string()])
                            .inc_by(bytes);
                        continue;
                    }
                    Report::ChunkDone { plan, rows, bytes, streamed } => {
                        let record = &mut records[plan];
                        record.chunks_done += 1;
                        record.rows_copied += rows;
                        record.bytes_copied += bytes;
                        remaining[plan] -= 1;
                        // The exact count from the target settles the
                        // estimate shown while the chunk flowed.
                        progress.rows(plan, rows.saturating_sub(streamed));
                        metrics
                            .copy_rows
                            .with_label_values(&[&record.name.to_string()])
                            .inc_by(rows);
                        store.put_table_copy(record)?;
                        plan
                    }
                    Report::Counted { plan, rows } => {
                        counted[plan] = Some(rows);
                        plan
                    }
                    Report::Rebuilt { plan, item } => {
                        let record = &mut records[plan];
                        match &item {
                            // Its index only: the key is attached by Finalize.
                            Rebuild::Key(_) => {}
                            Rebuild::Index(d) => record.dropped_indexes.retain(|x| x.name != d.name),
                            Rebuild::Check(d) => record.dropped_constraints.retain(|x| x.name != d.name),
                        }
                        store.put_table_copy(record)?;
                        let left = rebuilding[plan].as_mut().expect("rebuilds are queued first");
                        *left -= 1;
                        if *left == 0 {
                            queue.push_front(vec![finalize(record, plan, &joined)]);
                        }
                        continue;
                    }
                    Report::Finalized { plan, target_rows } => {
                        let record = &mut records[plan];
                        // Finalize attached them.
                        record.dropped_keys.clear();
                        record.target_count = Some(target_rows);
                        record.state = TableCopyState::Copied;
                        store.put_table_copy(record)?;
                        store.flush().await?;
                        tracing::info!(
                            table = %record.name,
                            rows = record.rows_copied,
                            bytes = record.bytes_copied,
                            copied_at = %record.copied_at,
                            format = record.format.map(|f| f.name()).unwrap_or("?"),
                            "table copied"
                        );
                        progress.table_done(plan);
                        finished += 1;
                        queue.push_front(foreign_keys.ready(&records));
                        if finished == plans.len() {
                            foreign_keys.queue_rest(store, target, &queue).await?;
                        }
                        continue;
                    }
                    Report::ForeignKeyRestored { table, name, left } => {
                        if let Some(left) = left {
                            tracing::warn!(
                                %table,
                                constraint = %name,
                                error = %left.error,
                                "a foreign key stays NOT VALID: its referenced rows are not all on the target (a referenced table out of scope?); once they are, run: {}",
                                left.statement
                            );
                        }
                        match records.iter_mut().find(|r| r.name == table) {
                            Some(record) => {
                                record.dropped_constraints.retain(|d| d.name != name);
                                store.put_table_copy(record)?;
                            }
                            None => {
                                if let Some(mut record) = store.table_copy(&table)? {
                                    record.dropped_constraints.retain(|d| d.name != name);
                                    store.put_table_copy(&record)?;
                                }
                            }
                        }
                        if foreign_keys.restored() {
                            store.flush().await?;
                            queue.close();
                        }
                        continue;
                    }
                };
                if remaining[plan] == 0 && rebuilding[plan].is_none() && let Some(count) = counted[plan] {
                    let record = &mut records[plan];
                    record.source_count = Some(count);
                    store.put_table_copy(record)?;
                    let steps = rebuild_steps(record, plan);
                    rebuilding[plan] = Some(steps.len());
                    queue.push_front(if steps.is_empty() {
                        vec![finalize(record, plan, &joined)]
                    } else {
                        steps
                    });
                }
            }
            Some(joined) = workers.join_next() => {
                match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => { failure = Some(err); break; }
                    Err(join) => {
                        failure = Some(CopyError::Schema(format!("a copy worker stopped unexpectedly: {join}")));
                        break;
                    }
                }
            }
        }
    }
    progress.finish();
    if let Some(err) = failure {
        queue.close();
        workers.abort_all();
        return Err(err);
    }
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        if let Ok(Err(err)) = joined {
            // A rewrite found by any worker wins: the round is copied again.
            if failure.is_none() || matches!(err, CopyError::Rewritten(_)) {
                failure = Some(err);
            }
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    debug_assert_eq!(finished, plans.len());
    Ok(())
}

/// The steps that put back what `copy.drop_indexes` dropped from a loaded
/// table, but for its foreign keys (those wait for every table): its keys,
/// indexes and CHECK constraints, each its own task so that several
/// workers build them at once.
pub(super) fn rebuild_steps(record: &TableCopy, plan: usize) -> Vec<Task> {
    let keys = record.dropped_keys.iter().cloned().map(Rebuild::Key);
    let indexes = record.dropped_indexes.iter().cloned().map(Rebuild::Index);
    let checks = record
        .dropped_constraints
        .iter()
        .filter(|c| !c.definition.starts_with("FOREIGN KEY"))
        .cloned()
        .map(Rebuild::Check);
    keys.chain(indexes)
        .chain(checks)
        .map(|item| Task::Rebuild { plan, item })
        .collect()
}

/// How much index work loading a table costs on the target, for the load
/// order: its rows times its indexes and CHECK and FOREIGN KEY
/// constraints, maintained row by row during the load or (with
/// `copy.drop_indexes`) built and validated after it. Rows from the
/// source's statistics, or from its size where it has none (never
/// analyzed).
pub(super) async fn index_work_of(
    target: &Client,
    written: &TableName,
    table: &Table,
) -> Result<u64, CopyError> {
    let pieces: i64 = target
        .query_one(
            "SELECT (SELECT count(*) FROM pg_index WHERE indrelid = $1::text::regclass)
                  + (SELECT count(*) FROM pg_constraint
                      WHERE conrelid = $1::text::regclass AND contype IN ('c', 'f'))",
            &[&written.quoted()],
        )
        .await
        .map_err(query(
            "target",
            format!("counting the indexes of {written}"),
        ))?
        .get(0);
    let rows = match table.row_estimate {
        Some(rows) if rows >= 0 => rows as u64,
        _ => table.total_bytes.max(0) as u64 / 128,
    };
    Ok(rows * pieces.max(0) as u64)
}

/// The order in which tables are loaded: most index work first
/// ([`index_work_of`]), then biggest first. Where the target maintains
/// indexes during the load, a table's cost follows its rows and indexes
/// far more than its bytes (in `bench --scenario copy`, 25 MB with two
/// random-order indexes took 3.7 s where 42 MB of TOASTed text with one
/// took 1.5 s), and such a table in one chunk, left for last, is a tail
/// no other worker can share. With `copy.drop_indexes`, the same tables
/// leave the most to rebuild and validate: loaded first, their builds run
/// beside the loads of the others instead of alone at the end (1.2 s of
/// rebuilds and validation with one worker idle, before). Tables with
/// little index work, split in chunks, fill the gaps at the end.
pub(super) fn load_order(index_work: &[u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..index_work.len()).collect();
    // Stable: ties keep the biggest-first order of the plans.
    order.sort_by_key(|&i| std::cmp::Reverse(index_work[i]));
    order
}

/// The last step of a loaded table: its keys attached (their indexes are
/// built), the table vacuumed and analyzed when it is in `joined`, then
/// its count.
pub(super) fn finalize(record: &TableCopy, plan: usize, joined: &HashSet<TableName>) -> Task {
    Task::Finalize {
        plan,
        keys: record.dropped_keys.clone(),
        vacuum: joined.contains(&record.name),
    }
}

/// The tables at either end of a foreign key dropped for the load: each is
/// vacuumed and analyzed once loaded, before the key is validated.
///
/// Why: validating a foreign key runs an anti-join of the two tables
/// (`RI_Initial_Check`) planned like any query. On freshly loaded tables
/// the planner has no statistics and no visibility map, so it hashes the
/// whole referenced table in `maintenance_work_mem` (seen: 550-630 ms for
/// 500k rows against 1M on the benchmark's dataset). Vacuumed and
/// analyzed, both sides are read as index-only scans merged in key order
/// (130-150 ms); the VACUUM ANALYZE of both tables cost about 300 ms, and
/// leaves the tables with statistics, hint bits and a visibility map,
/// which the target would otherwise build under its first queries.
pub(super) fn foreign_key_tables(records: &[TableCopy]) -> HashSet<TableName> {
    let mut tables = HashSet::new();
    for record in records {
        for constraint in &record.dropped_constraints {
            if let Some(referenced) = &constraint.references {
                tables.insert(record.name.clone());
                tables.insert(referenced.clone());
            }
        }
    }
    tables
}

/// The foreign keys dropped for the load, on their way back. One is added
/// back and validated as soon as both its tables are copied (loaded, their
/// keys and indexes back), beside the loads of the others: validation
/// reads both tables whole, and waiting for every table would leave it
/// alone at the end of the copy. The rest (those of tables not copied now,
/// those referencing a table not copied now, and any recorded before their
/// referenced table was) go once every table is copied.
#[derive(Debug, Default)]
pub(super) struct ForeignKeys {
    /// (table, constraint) of those queued.
    pub(super) queued: std::collections::HashSet<(TableName, String)>,
    /// Queued and not yet back.
    pub(super) outstanding: usize,
    /// Every one is queued: the queue closes when the last is back.
    pub(super) all_queued: bool,
}

impl ForeignKeys {
    /// The tasks of the foreign keys whose two tables are now copied.
    pub(super) fn ready(&mut self, records: &[TableCopy]) -> Vec<Task> {
        let copied = |name: &TableName| {
            records
                .iter()
                .any(|r| &r.name == name && r.state == TableCopyState::Copied)
        };
        let mut tasks = Vec::new();
        for record in records.iter().filter(|r| r.state == TableCopyState::Copied) {
            for constraint in &record.dropped_constraints {
                let Some(referenced) = &constraint.references else {
                    continue;
                };
                if copied(referenced)
                    && self
                        .queued
                        .insert((record.name.clone(), constraint.name.clone()))
                {
                    tasks.push(Task::ForeignKey {
                        table: record.name.clone(),
                        constraint: constraint.clone(),
                    });
                }
            }
        }
        self.outstanding += tasks.len();
        tasks
    }

    /// Once every table is copied: queues the foreign keys not queued yet,
    /// on every table of the store (a table finished before a crash keeps
    /// its pending ones until here), after putting back anything else a
    /// crash left dropped on a table not copied now. Closes the queue when
    /// nothing is left to wait for.
    pub(super) async fn queue_rest(
        &mut self,
        store: &Store,
        target: &Client,
        queue: &WorkQueue,
    ) -> Result<(), CopyError> {
        let mut tasks = Vec::new();
        for mut record in store.table_copies()? {
            if !record.dropped_keys.is_empty() || !record.dropped_indexes.is_empty() {
                rebuild_indexes(target, &mut record).await?;
                store.put_table_copy(&record)?;
            }
            for constraint in &record.dropped_constraints {
                if self
                    .queued
                    .insert((record.name.clone(), constraint.name.clone()))
                {
                    tasks.push(Task::ForeignKey {
                        table: record.name.clone(),
                        constraint: constraint.clone(),
                    });
                }
            }
        }
        store.flush().await?;
        self.outstanding += tasks.len();
        self.all_queued = true;
        if self.outstanding == 0 {
            queue.close();
        } else {
            queue.push_front(tasks);
        }
        Ok(())
    }

    /// One is back; true when it was the last.
    pub(super) fn restored(&mut self) -> bool {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.all_queued && self.outstanding == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(plan: usize, index: usize) -> Task {
        let table = TableName::new("public", format!("t{plan}"));
        Task::Chunk {
            plan,
            chunk: Chunk {
                table: table.clone(),
                source: table,
                first_page: 0,
                end_page: None,
                index,
                pages: 1,
            },
        }
    }

    fn taken(queue: &WorkQueue) -> (usize, usize) {
        match queue.take() {
            Some(Task::Chunk { plan, chunk }) => (plan, chunk.index),
            Some(_) => panic!("not a chunk"),
            None => panic!("the queue is empty"),
        }
    }

    #[test]
    fn workers_load_different_tables_and_share_one_only_when_nothing_else_is_left() {
        let queue = WorkQueue::new(VecDeque::from([
            chunk(0, 0),
            chunk(0, 1),
            chunk(0, 2),
            chunk(1, 0),
        ]));
        assert_eq!(taken(&queue), (0, 0));
        // Table 0 is being loaded: the next worker takes table 1.
        assert_eq!(taken(&queue), (1, 0));
        // Both tables busy: table 0's next chunk rather than nothing.
        assert_eq!(taken(&queue), (0, 1));
        queue.loaded(0);
        queue.loaded(1);
        queue.loaded(0);
        assert_eq!(taken(&queue), (0, 2));
        assert!(queue.take().is_none());
    }
}
