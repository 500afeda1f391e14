//! Field mappings (`[[map]]`): each checked against both servers (the
//! tables, every target column fed, the keys, and every expression and
//! condition parsed and typed by the target), its inverse against the
//! servers swapped, and what a one-way table means for a rollback.

use cutover_replication::catalog::Table;
use cutover_replication::mapping::{self, MappingError};
use tokio_postgres::Client;

use super::report::{Finding, Report, Severity};
use crate::config::Config;

fn refused(report: &mut Report, server: &'static str, err: &MappingError) {
    report.add(Finding {
        severity: Severity::Blocking,
        code: "mapping",
        server,
        subject: Some(err.key.clone()),
        problem: err.message.clone(),
        fix: Some("correct the [[map]] in the config (the problem says how)".into()),
    });
}

/// Checks every `[[map]]`, and its inverse.
pub(super) async fn map_checks(
    report: &mut Report,
    source: &Client,
    target: &Client,
    config: &Config,
    in_scope: &[Table],
) -> Result<(), tokio_postgres::Error> {
    if config.mappings.is_empty() {
        return Ok(());
    }
    for spec in &config.mappings {
        if !in_scope.iter().any(|t| t.name == spec.source) {
            report.add(Finding {
                severity: Severity::Blocking,
                code: "mapping",
                server: "source",
                subject: Some(spec.key("source")),
                problem: format!(
                    "{} is not a table in scope: a mapping reads a table that replication.tables takes in",
                    spec.source
                ),
                fix: Some("fix map.source, or add the table to replication.tables".into()),
            });
        }
    }
    if let Some((index, table)) = crate::config::maps::written_twice(&config.mappings, |t| {
        in_scope.iter().any(|s| s.name == *t)
    }) {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "mapping",
            server: "source",
            subject: Some(format!("map[{index}].target")),
            problem: format!(
                "{table} is also a table in scope on the source, copied under its own name: both would write it"
            ),
            fix: Some("take it out of scope (replication.exclude), or map to another table".into()),
        });
    }
    let forward = mapping::resolve_all(&config.mappings, source, target).await?;
    let mappings = match forward {
        Ok(mappings) => mappings,
        Err(err) => {
            refused(report, "target", &err);
            return Ok(());
        }
    };
    let inverses: Vec<_> = config
        .mappings
        .iter()
        .filter_map(|m| m.inverted())
        .collect();
    if let Err(err) = mapping::resolve_all(&inverses, target, source).await? {
        let err = MappingError {
            key: format!("{} (its inverse)", err.key),
            message: err.message,
        };
        refused(report, "source", &err);
    }
    for mapping in &mappings {
        if let Some(entry) = report.tables.iter_mut().find(|t| t.name == mapping.source) {
            entry.on_target = true;
            entry.written_to = Some(mapping.target.clone());
        }
    }
    for (spec, mapping) in config.mappings.iter().zip(&mappings) {
        let fed: Vec<String> = mapping
            .columns
            .iter()
            .map(|c| {
                if c.expr == cutover_replication::sql::quote_ident(&c.name) {
                    c.name.clone()
                } else {
                    format!("{} = {}", c.name, c.expr)
                }
            })
            .collect();
        let unused: Vec<&str> = mapping
            .source_columns
            .iter()
            .map(|c| c.name.as_str())
            .filter(|c| !mapping.uses.iter().any(|u| u == c))
            .collect();
        report.add(Finding {
            severity: Severity::Info,
            code: "mapping",
            server: "target",
            subject: Some(spec.key("target")),
            problem: format!(
                "{} is written to {} ({}); rows rejected by {}{}",
                mapping.source,
                mapping.target,
                fed.join(", "),
                if mapping.rejects.is_empty() {
                    "nothing".to_owned()
                } else {
                    mapping
                        .rejects
                        .iter()
                        .map(|(r, _)| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                if unused.is_empty() {
                    String::new()
                } else {
                    format!("; source column(s) not carried: {}", unused.join(", "))
                }
            ),
            fix: None,
        });
        let full = in_scope
            .iter()
            .find(|t| t.name == mapping.source)
            .is_some_and(|t| {
                t.replica_identity == cutover_replication::catalog::ReplicaIdentity::Full
            });
        if !full {
            let large: Vec<String> = source
                .query(
                    "SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attlen = -1 AND a.attstorage IN ('x', 'e') AND a.attname = ANY($2::text[])
                      ORDER BY a.attnum",
                    &[&mapping.source.quoted(), &mapping.uses],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .filter(|c: &String| !mapping.patchable(&[c.as_str()]))
                .collect();
            if !large.is_empty() {
                report.add(Finding {
                    severity: Severity::Warning,
                    code: "mapping_needs_whole_rows",
                    server: "source",
                    subject: Some(spec.key("columns")),
                    problem: format!(
                        "the mapping of {} computes with column(s) {}: if their values can exceed about 2 kB (TOASTed), an UPDATE that leaves such a value alone does not send it, and would stop the stream",
                        mapping.source,
                        large.join(", ")
                    ),
                    fix: Some(format!(
                        "ALTER TABLE {} REPLICA IDENTITY FULL; on the source (the old row then carries them), or map those columns as they are",
                        mapping.source.quoted()
                    )),
                });
            }
        }
        if spec.inverse.is_none() {
            report.add(Finding {
                severity: Severity::Warning,
                code: "one_way_mapping",
                server: "target",
                subject: Some(spec.key("inverse")),
                problem: format!(
                    "{} has no inverse: after a switch, changes the application makes to {} are not carried back to {}, and a rollback loses them",
                    spec.source, spec.target, spec.source
                ),
                fix: Some(format!(
                    "give [map.inverse] an expression per column of {} over the columns of {}, or accept that rollback will not carry this table's changes",
                    spec.source, spec.target
                )),
            });
        }
    }
    Ok(())
}
