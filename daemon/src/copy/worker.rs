//! One copy worker: imports the snapshot, copies the chunks it is given
//! and reports each one committed on the target.

use std::sync::Arc;

use cutover_replication::catalog::{self, TableName};
use cutover_replication::client::describe;
use cutover_replication::snapshot::{self, ChunkError};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::progress::CopyProgress;

use super::CopyError;
use super::orchestration::{TablePlan, query, unrewritten};
use super::rebuild::{build_key_index, rebuild_index, rebuild_key, restore_constraint};
use super::scheduler::{Rebuild, Report, Task, WorkQueue, streaming};

#[allow(clippy::too_many_arguments)]
pub(super) async fn worker(
    id: usize,
    source: Client,
    mut target: Client,
    queue: &WorkQueue,
    plans: Arc<Vec<TablePlan>>,
    tx: mpsc::UnboundedSender<Report>,
    progress: CopyProgress,
    analyze: bool,
) -> Result<(), CopyError> {
    loop {
        let Some(task) = queue.next().await else {
            break;
        };
        let started = std::time::Instant::now();
        let what = task.describe(&plans);
        progress.worker(id, &what);
        match task {
            Task::Rebuild { plan, item } => {
                let p = &plans[plan];
                match &item {
                    Rebuild::Key(key) => build_key_index(&target, &p.table.name, key).await?,
                    Rebuild::Index(index) => rebuild_index(&target, index).await?,
                    Rebuild::Check(check) => {
                        // A CHECK constraint that fails is an error (never `Some`).
                        restore_constraint(&target, &p.table.name, check).await?;
                    }
                }
                let _ = tx.send(Report::Rebuilt { plan, item });
            }
            Task::Finalize { plan, keys, vacuum } => {
                let name = plans[plan].target_name();
                for key in &keys {
                    rebuild_key(&target, name, key).await?;
                }
                if vacuum {
                    target
                        .batch_execute(&format!("VACUUM (ANALYZE) {}", name.quoted()))
                        .await
                        .map_err(query("target", format!("vacuuming {name}")))?;
                } else if analyze {
                    target
                        .batch_execute(&format!("ANALYZE {}", name.quoted()))
                        .await
                        .map_err(query("target", format!("analyzing {name}")))?;
                }
                let target_rows = catalog::count_rows(&target, name)
                    .await
                    .map_err(query("target", format!("counting {name}")))?;
                let _ = tx.send(Report::Finalized { plan, target_rows });
            }
            Task::ForeignKey { table, constraint } => {
                let left = restore_constraint(&target, &table, &constraint).await?;
                let _ = tx.send(Report::ForeignKeyRestored {
                    table,
                    name: constraint.name,
                    left,
                });
            }
            Task::Chunk { plan, chunk } => {
                let p = &plans[plan];
                let mut streamed = 0;
                let stats = match &p.mapping {
                    Some(mapping) => {
                        let transaction = target.transaction().await.map_err(query(
                            "target",
                            format!("opening a transaction for {}", mapping.target),
                        ))?;
                        let stats = snapshot::copy_chunk_mapped_in(
                            &source,
                            &transaction,
                            &chunk,
                            mapping,
                            streaming(&tx, plan, &mut streamed),
                        )
                        .await
                        .map_err(|err| chunk_error(&p.table.name, chunk.index, &err))?;
                        transaction.commit().await.map_err(query(
                            "target",
                            format!("committing a chunk of {}", mapping.target),
                        ))?;
                        stats
                    }
                    None => snapshot::copy_chunk(
                        &source,
                        &mut target,
                        &chunk,
                        &p.columns,
                        p.format,
                        streaming(&tx, plan, &mut streamed),
                    )
                    .await
                    .map_err(|err| chunk_error(&p.table.name, chunk.index, &err))?,
                };
                unrewritten(&source, &[&p.table.name]).await?;
                queue.loaded(plan);
                let _ = tx.send(Report::ChunkDone {
                    plan,
                    rows: stats.rows,
                    bytes: stats.bytes,
                    streamed,
                });
            }
            Task::Count { plan } => {
                let p = &plans[plan];
                let rows = count_in_snapshot(&source, &p.table.name).await?;
                unrewritten(&source, &[&p.table.name]).await?;
                let _ = tx.send(Report::Counted { plan, rows });
            }
            Task::Bundle(items) => {
                let transaction = target
                    .transaction()
                    .await
                    .map_err(query("target", "opening a transaction for small tables"))?;
                let mut done = Vec::with_capacity(items.len());
                for (plan, chunk) in &items {
                    let (plan, p) = (*plan, &plans[*plan]);
                    let mut streamed = 0;
                    let stats = match &p.mapping {
                        Some(mapping) => {
                            snapshot::copy_chunk_mapped_in(
                                &source,
                                &transaction,
                                chunk,
                                mapping,
                                streaming(&tx, plan, &mut streamed),
                            )
                            .await
                        }
                        None => {
                            snapshot::copy_chunk_in(
                                &source,
                                &transaction,
                                chunk,
                                &p.columns,
                                p.format,
                                streaming(&tx, plan, &mut streamed),
                            )
                            .await
                        }
                    }
                    .map_err(|err| chunk_error(&p.table.name, chunk.index, &err))?;
                    let rows = count_in_snapshot(&source, &p.table.name).await?;
                    done.push((plan, stats, rows, streamed));
                }
                let names: Vec<&TableName> = items
                    .iter()
                    .map(|(plan, _)| &plans[*plan].table.name)
                    .collect();
                unrewritten(&source, &names).await?;
                transaction.commit().await.map_err(query(
                    "target",
                    format!("committing {} small tables", items.len()),
                ))?;
                for (plan, stats, rows, streamed) in done {
                    let _ = tx.send(Report::ChunkDone {
                        plan,
                        rows: stats.rows,
                        bytes: stats.bytes,
                        streamed,
                    });
                    let _ = tx.send(Report::Counted { plan, rows });
                }
            }
        }
        tracing::debug!(worker = id, task = %what, ms = started.elapsed().as_millis() as u64, "copy task done");
    }
    progress.worker(id, "done");
    // Leave the snapshot transaction cleanly.
    let _ = source.batch_execute("COMMIT").await;
    Ok(())
}

pub(super) fn chunk_error(table: &TableName, index: usize, err: &ChunkError) -> CopyError {
    let (side, source) = match err {
        ChunkError::Source { source, .. } => ("source", source),
        ChunkError::Target { source, .. } => ("target", source),
    };
    // Only the target's resources are the migration's to free.
    let hint = matches!(err, ChunkError::Target { .. })
        .then(|| source.code())
        .flatten()
        .and_then(|code| cutover_replication::sink::postgres::resource_hint(code.code()))
        .map(|hint| format!("; {hint}"))
        .unwrap_or_default();
    CopyError::Chunk {
        table: table.clone(),
        index,
        detail: format!("{side}: {}{hint}", describe(source)),
        transient: super::lost_connection(source),
    }
}

/// A table's rows in the snapshot the worker's source connection holds.
pub(super) async fn count_in_snapshot(
    source: &Client,
    table: &TableName,
) -> Result<i64, CopyError> {
    catalog::count_rows(source, table)
        .await
        .map_err(query("source", format!("counting {table} in the snapshot")))
}
