//! What the copy sets up on the source before the slot: the publications
//! (the main one, and `<name>_inserts` for append-only keyless tables), the
//! partition TRUNCATE triggers and the DDL capture.

use cutover_replication::catalog::{Table, TableName};
use cutover_replication::{ddl, partition, slot};
use tokio_postgres::Client;

use crate::config::Config;
use crate::coverage;
use crate::store::Store;

use super::CopyError;
use super::orchestration::query;

/// The publications to stream from: the configured one, and the one of
/// tables whose inserts only stream when it exists (a migration begun
/// before it was made has none).
pub async fn publications(source: &Client, config: &Config) -> Result<Vec<String>, CopyError> {
    let inserts = coverage::inserts_publication(&config.publication);
    let mut names = vec![config.publication.clone()];
    if slot::publication_exists(source, &inserts)
        .await
        .map_err(query("source", "reading publications"))?
    {
        names.push(inserts);
    }
    Ok(names)
}

/// Sets up what the stream needs on the source: `replication.publication`
/// for the tables whose every change streams, its `_inserts` twin for the
/// keyless tables whose inserts only stream (their UPDATEs and DELETEs
/// must keep working on the source), `REPLICA IDENTITY FULL` where
/// `replication.keyless` asks for it, and a watch on every table whose
/// changes do not all stream (see [`coverage`]).
pub async fn ensure_publications(
    source: &Client,
    store: &Store,
    config: &Config,
    tables: &[Table],
) -> Result<(), CopyError> {
    let plan = coverage::Plan::new(tables, config.keyless);
    if !plan.refused.is_empty() {
        return Err(CopyError::Keyless(
            plan.refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    coverage::make_full(source, &plan.make_full)
        .await
        .map_err(query(
            "source",
            "setting REPLICA IDENTITY FULL (replication.keyless = \"replica_identity_full\"; needs ownership of the tables)",
        ))?;
    ensure_publication(source, &config.publication, &plan.full, PUBLISH_ALL).await?;
    let inserts = coverage::inserts_publication(&config.publication);
    // Made even while empty under append_only: a keyless table created
    // later joins it (see `ddl`).
    if !plan.inserts_only.is_empty()
        || config.keyless == crate::config::KeylessPolicy::AppendOnly
        || slot::publication_exists(source, &inserts)
            .await
            .map_err(query("source", "reading publications"))?
    {
        ensure_publication(source, &inserts, &plan.inserts_only, PUBLISH_INSERTS).await?;
    }
    // A table moved between the two (its key dropped or added since a
    // previous start) must not stay where UPDATE and DELETE fail or are
    // lost.
    for (publication, keep) in [
        (&config.publication, &plan.full),
        (&inserts, &plan.inserts_only),
    ] {
        if !slot::publication_exists(source, publication)
            .await
            .map_err(query("source", "reading publications"))?
        {
            continue;
        }
        let stray: Vec<TableName> = slot::publication_tables(source, publication)
            .await
            .map_err(query(
                "source",
                format!("reading publication {publication}"),
            ))?
            .into_iter()
            .filter(|t| config.scope.contains(t) && !keep.contains(t))
            .collect();
        slot::drop_publication_tables(source, publication, &stray)
            .await
            .map_err(query(
                "source",
                format!("taking tables out of publication {publication}"),
            ))?;
    }
    install_partition_triggers(source, config).await?;
    install_ddl_capture(source, config).await?;
    let partial: Vec<(&TableName, coverage::Coverage)> = plan.partial().collect();
    if !partial.is_empty() {
        let names: Vec<&TableName> = partial.iter().map(|(t, _)| *t).collect();
        let counts = coverage::write_counts(source, &names)
            .await
            .map_err(query("source", "reading table statistics"))?;
        for (table, coverage) in partial {
            tracing::warn!(%table, coverage = coverage.name(), "{}", coverage::explain(coverage));
            if store.watch(table)?.is_none() {
                let counted = counts.get(table).copied().unwrap_or_default();
                store.put_watch(&coverage::Watch::new(table.clone(), coverage, counted))?;
            }
        }
    }
    Ok(())
}

/// Puts cutover's TRUNCATE trigger on every partition of the published
/// partitioned tables that lacks it (see
/// [`cutover_replication::partition`]).
pub async fn install_partition_triggers(source: &Client, config: &Config) -> Result<(), CopyError> {
    let names = vec![
        config.publication.clone(),
        coverage::inserts_publication(&config.publication),
    ];
    let covered = partition::install_for_publications(source, &names)
        .await
        .map_err(query(
            "source",
            "adding cutover's TRUNCATE trigger to partitions (needs the TRIGGER privilege on them, or ownership, and CREATE on the database for the cutover schema)",
        ))?;
    if !covered.is_empty() {
        tracing::info!(
            partitions = covered.len(),
            "TRUNCATE trigger added to partitions: a TRUNCATE of one partition, which pgoutput does not send, reaches the target"
        );
    }
    Ok(())
}

/// Installs the event triggers that report DDL on the source in the stream
/// (see [`cutover_replication::ddl`]); without superuser, says what is not
/// captured.
pub(super) async fn install_ddl_capture(source: &Client, config: &Config) -> Result<(), CopyError> {
    let capture = ddl::Capture {
        scope_condition: config.scope.sql_condition("t.s", "t.n"),
        publication: config.publication.clone(),
        inserts_publication: (config.keyless == crate::config::KeylessPolicy::AppendOnly)
            .then(|| coverage::inserts_publication(&config.publication)),
    };
    let installed = ddl::install(source, &capture)
        .await
        .map_err(query("source", "installing cutover's DDL event triggers"))?;
    if !installed {
        tracing::warn!(
            "the source role is not a superuser: DDL on the source is not captured in the stream (event triggers need superuser); a column added or widened on the source is followed once its rows arrive, when the target has it, and anything else stops the stream when a change does not fit"
        );
    }
    Ok(())
}

/// What `replication.publication` publishes.
pub(super) const PUBLISH_ALL: &str = "insert, update, delete, truncate";

/// What the `_inserts` publication publishes.
pub(super) const PUBLISH_INSERTS: &str = "insert, truncate";

pub(super) async fn ensure_publication(
    source: &Client,
    name: &str,
    tables: &[TableName],
    publish: &str,
) -> Result<(), CopyError> {
    if slot::publication_exists(source, name)
        .await
        .map_err(query("source", "reading publications"))?
    {
        // Reused only if it sends every change it should: a filtered
        // publication would leave the target silently behind.
        let gaps = slot::publication_gaps(source, name)
            .await
            .map_err(query("source", format!("reading publication {name}")))?;
        let gaps: Vec<String> = if publish == PUBLISH_INSERTS {
            gaps.into_iter()
                .filter(|g| g != "it does not publish update, delete")
                .collect()
        } else {
            gaps
        };
        if !gaps.is_empty() {
            return Err(CopyError::PublicationGaps {
                name: name.to_owned(),
                gaps: gaps.join("; "),
            });
        }
        let added = slot::add_publication_tables(source, name, tables)
            .await
            .map_err(query(
                "source",
                format!("adding tables to publication {name}"),
            ))?;
        if !added.is_empty() {
            tracing::info!(
                publication = name,
                added = added.len(),
                "publication extended to the tables in scope"
            );
        }
    } else {
        slot::create_publication(source, name, tables, publish)
            .await
            .map_err(query(
                "source",
                format!(
                    "creating publication {name} (needs ownership of the tables, or superuser)"
                ),
            ))?;
        tracing::info!(
            publication = name,
            tables = tables.len(),
            publish,
            "publication created"
        );
    }
    Ok(())
}
