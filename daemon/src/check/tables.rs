//! Table and sequence probes: what is in scope, whether each table can be
//! replicated (a key or a replica identity), and whether the target's
//! schema can receive it (table, columns, types, key, privileges).

use std::collections::{BTreeSet, HashMap};

use cutover_replication::catalog::{self, ReplicaIdentity, Table, TableName, TypeFit};
use cutover_replication::sql;
use tokio_postgres::Client;

use super::report::{Finding, Report, Severity, TableReport};
use crate::config::{Config, KeylessPolicy};
use crate::coverage::Coverage;

/// Keeps the tables in scope, records them in the report, and flags
/// include patterns that match nothing.
pub(super) fn scope_tables(report: &mut Report, config: &Config, all: Vec<Table>) -> Vec<Table> {
    let names: Vec<TableName> = all.iter().map(|t| t.name.clone()).collect();
    for pattern in config.scope.unmatched_includes(&names) {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "pattern_matches_nothing",
            server: "source",
            subject: Some("replication.tables".into()),
            problem: format!(
                "the pattern {:?} matches no table on the source",
                pattern.as_str()
            ),
            fix: Some(
                "fix the pattern (schema.table, * and ? as wildcards, case-sensitive) or remove it"
                    .into(),
            ),
        });
    }
    let in_scope: Vec<Table> = all
        .into_iter()
        .filter(|t| config.scope.contains(&t.name))
        .collect();
    if in_scope.is_empty() {
        report.add(Finding {
            severity: Severity::Blocking,
            code: "no_tables",
            server: "source",
            subject: Some("replication.tables".into()),
            problem: format!(
                "no table is in scope (tables = {:?}, after exclude)",
                config.include_patterns
            ),
            fix: Some("list the tables to migrate in replication.tables".into()),
        });
    }
    report.tables = in_scope
        .iter()
        .map(|t| TableReport {
            name: t.name.clone(),
            row_estimate: t.row_estimate,
            source_rows: None,
            target_rows: None,
            total_bytes: t.total_bytes,
            primary_key: t.primary_key.clone(),
            replica_identity: t.replica_identity.clone(),
            partitioned: t.partitioned,
            on_target: false,
            written_to: None,
            coverage: crate::coverage::coverage(t, config.keyless).map_or("refused", |c| c.name()),
            group: None,
        })
        .collect();
    in_scope
}

/// Whether each table can be replicated from the source.
pub(super) async fn source_table_checks(
    report: &mut Report,
    client: &Client,
    config: &Config,
    in_scope: &[Table],
    superuser: bool,
) -> Result<(), tokio_postgres::Error> {
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    let oids: Vec<u32> = in_scope.iter().map(|t| t.oid).collect();
    let readable: HashMap<u32, bool> = client
        .query(
            "SELECT c.oid, has_table_privilege(c.oid, 'SELECT') FROM pg_class c WHERE c.oid = ANY($1::oid[])",
            &[&oids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for table in in_scope {
        let subject = Some(table.name.to_string());
        let quoted = table.name.quoted();
        if table.unlogged {
            report.add(Finding {
                severity: Severity::Warning,
                code: "unlogged_table",
                server: "source",
                subject: subject.clone(),
                problem: crate::coverage::explain(Coverage::SnapshotOnly).into(),
                fix: Some(format!(
                    "ALTER TABLE {quoted} SET LOGGED;  -- to stream it (rewrites the table, and its writes are then logged)\nor: add {:?} to replication.exclude",
                    table.name.to_string()
                )),
            });
        } else if !crate::coverage::identified(table) {
            let why = match &table.replica_identity {
                ReplicaIdentity::Nothing => "REPLICA IDENTITY NOTHING",
                _ if table.primary_key_deferrable => {
                    "a DEFERRABLE primary key, which PostgreSQL does not use as replica identity"
                }
                _ => "no primary key and REPLICA IDENTITY DEFAULT",
            };
            let choices = format!(
                "ALTER TABLE {quoted} ADD PRIMARY KEY (...);  -- if some columns identify a row\nor: ALTER TABLE {quoted} REPLICA IDENTITY FULL;  -- or replication.keyless = \"replica_identity_full\" to let cutover do it"
            );
            let (severity, problem) = match config.keyless {
                KeylessPolicy::AppendOnly => (
                    Severity::Warning,
                    format!("{why}: {}", crate::coverage::explain(Coverage::InsertsOnly)),
                ),
                KeylessPolicy::ReplicaIdentityFull => (
                    Severity::Warning,
                    format!(
                        "{why}: cutover run will set REPLICA IDENTITY FULL on the source (replication.keyless = \"replica_identity_full\"): its UPDATEs and DELETEs then log the whole old row, and stream"
                    ),
                ),
                KeylessPolicy::Refuse => (
                    Severity::Blocking,
                    format!(
                        "{why}: its UPDATEs and DELETEs carry no row key, and replication.keyless = \"refuse\""
                    ),
                ),
            };
            report.add(Finding {
                severity,
                code: "no_replica_identity",
                server: "source",
                subject: subject.clone(),
                problem,
                fix: Some(choices),
            });
        } else if table.replica_identity == ReplicaIdentity::Full && table.primary_key.is_none() {
            report.add(Finding {
                severity: Severity::Warning,
                code: "replica_identity_full",
                server: "source",
                subject: subject.clone(),
                problem: "no primary key; REPLICA IDENTITY FULL matches UPDATEs and DELETEs on the whole old row, which is slow on large tables and ambiguous with duplicate rows".into(),
                fix: Some(format!("ALTER TABLE {quoted} ADD PRIMARY KEY (...);  -- if some columns identify a row")),
            });
        }
        if !superuser && !readable.get(&table.oid).copied().unwrap_or(false) {
            report.add(Finding {
                severity: Severity::Blocking,
                code: "cannot_read_table",
                server: "source",
                subject: subject.clone(),
                problem: format!(
                    "role {role} may not read the table, which the snapshot copy needs"
                ),
                fix: Some(format!(
                    "GRANT SELECT ON {quoted} TO {};",
                    sql::quote_ident(&role)
                )),
            });
        }
    }
    Ok(())
}

/// Whether the target's schema can receive each table.
pub(super) async fn target_table_checks(
    report: &mut Report,
    client: &Client,
    in_scope: &[Table],
) -> Result<(), tokio_postgres::Error> {
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    let targets: HashMap<TableName, Table> = catalog::tables(client)
        .await?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let oids: Vec<u32> = targets.values().map(|t| t.oid).collect();
    let writable: HashMap<u32, bool> = client
        .query(
            "SELECT c.oid, has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE')
                       AND has_table_privilege(c.oid, 'DELETE') AND has_table_privilege(c.oid, 'TRUNCATE')
                       AND has_table_privilege(c.oid, 'SELECT')
               FROM pg_class c WHERE c.oid = ANY($1::oid[])",
            &[&oids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for source in in_scope {
        let subject = Some(source.name.to_string());
        let quoted = source.name.quoted();
        let Some(target) = targets.get(&source.name) else {
            report.add(Finding {
                severity: Severity::Blocking,
                code: "missing_table",
                server: "target",
                subject,
                problem: "the table does not exist on the target; cutover copies data, not schema".into(),
                fix: Some(format!(
                    "create the schema on the target first, for example:\npg_dump --schema-only --table='{}' SOURCE_URL | psql TARGET_URL",
                    quoted.replace('\'', "'\\''")
                )),
            });
            continue;
        };
        if let Some(entry) = report.tables.iter_mut().find(|t| t.name == source.name) {
            entry.on_target = true;
        }
        for column in &source.columns {
            let column_subject = Some(format!("{}.{}", source.name, column.name));
            match target.column(&column.name) {
                None => report.add(Finding {
                    severity: Severity::Blocking,
                    code: "missing_column",
                    server: "target",
                    subject: column_subject,
                    problem: format!(
                        "the column {} ({}) is missing on the target",
                        column.name, column.type_name
                    ),
                    fix: Some(format!(
                        "ALTER TABLE {quoted} ADD COLUMN {} {};",
                        sql::quote_ident(&column.name),
                        column.type_name
                    )),
                }),
                Some(t) => {
                    if catalog::type_fit(&column.type_name, &t.type_name) == TypeFit::Incompatible {
                        report.add(Finding {
                            severity: Severity::Blocking,
                            code: "incompatible_type",
                            server: "target",
                            subject: column_subject.clone(),
                            problem: format!(
                                "the column is {} on the source but {} on the target, which cannot hold every source value",
                                column.type_name, t.type_name
                            ),
                            fix: Some(format!(
                                "ALTER TABLE {quoted} ALTER COLUMN {} TYPE {};",
                                sql::quote_ident(&column.name),
                                column.type_name
                            )),
                        });
                    }
                    if column.generated && !t.generated {
                        report.add(Finding {
                            severity: Severity::Blocking,
                            code: "generated_column",
                            server: "target",
                            subject: column_subject,
                            problem: "a generated column on the source is a plain column on the target: neither the copy nor logical decoding sends generated values, so it would stay NULL".into(),
                            fix: Some("define the column on the target with the same GENERATED ALWAYS AS (...) STORED expression".into()),
                        });
                    } else if t.generated && !column.generated {
                        report.add(Finding {
                            severity: Severity::Blocking,
                            code: "generated_on_target",
                            server: "target",
                            subject: column_subject,
                            problem: "a plain column on the source is generated on the target, which refuses the source's values".into(),
                            fix: Some(format!(
                                "ALTER TABLE {quoted} ALTER COLUMN {} DROP EXPRESSION;  -- or generate it on the source too",
                                sql::quote_ident(&column.name)
                            )),
                        });
                    }
                }
            }
        }
        for column in &target.columns {
            if source.column(&column.name).is_none()
                && column.not_null
                && !column.has_default
                && !column.generated
            {
                report.add(Finding {
                    severity: Severity::Blocking,
                    code: "target_extra_required_column",
                    server: "target",
                    subject: Some(format!("{}.{}", source.name, column.name)),
                    problem: "the target has a NOT NULL column without a default that the source lacks: every copied row would be refused".into(),
                    fix: Some(format!(
                        "ALTER TABLE {quoted} ALTER COLUMN {} DROP NOT NULL;  -- or give it a DEFAULT",
                        sql::quote_ident(&column.name)
                    )),
                });
            }
        }
        let source_key = match &source.replica_identity {
            ReplicaIdentity::Default => source.primary_key.clone(),
            ReplicaIdentity::Index { columns, .. } => Some(columns.clone()),
            _ => source.primary_key.clone(),
        };
        if let Some(key) = source_key {
            let wanted: BTreeSet<&String> = key.iter().collect();
            let has = target
                .primary_key
                .as_ref()
                .map(|k| k.iter().collect::<BTreeSet<_>>());
            if has.as_ref() != Some(&wanted) {
                let cols = key
                    .iter()
                    .map(|c| sql::quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ");
                report.add(Finding {
                    severity: Severity::Blocking,
                    code: "target_key_mismatch",
                    server: "target",
                    subject: subject.clone(),
                    problem: match &target.primary_key {
                        None => format!(
                            "the target has no primary key; applying changes needs one on ({})",
                            key.join(", ")
                        ),
                        Some(other) => format!(
                            "the target's primary key is ({}) but the source's row key is ({})",
                            other.join(", "),
                            key.join(", ")
                        ),
                    },
                    fix: Some(match &target.primary_key {
                        None => format!("ALTER TABLE {quoted} ADD PRIMARY KEY ({cols});"),
                        Some(_) => {
                            format!("make the target's primary key ({cols}), as on the source")
                        }
                    }),
                });
            }
        }
        // A DEFERRABLE key lets a source transaction permute its values
        // (swap, shift): the target's must be deferrable too, or the
        // applier's intermediate states would collide with it.
        for key in &source.deferrable_keys {
            if !target.deferrable_keys.contains(key) {
                report.add(Finding {
                    severity: Severity::Blocking,
                    code: "deferrable_key_mismatch",
                    server: "target",
                    subject: subject.clone(),
                    problem: format!(
                        "the source's key ({}) is DEFERRABLE, the target's is not: a transaction that permutes its values on the source cannot be replayed",
                        key.join(", ")
                    ),
                    fix: Some(format!(
                        "declare the target's constraint on ({}) DEFERRABLE, as on the source (ALTER TABLE {quoted} ALTER CONSTRAINT ... DEFERRABLE, or drop and add it)",
                        key.join(", ")
                    )),
                });
            }
        }
        if source.partitioned {
            report.add(Finding {
                severity: Severity::Info,
                code: "partitioned_table",
                server: "source",
                subject: subject.clone(),
                problem: format!(
                    "published through its root; cutover run adds a TRUNCATE trigger ({}.{}) to each of its partitions, because pgoutput does not send a TRUNCATE of one partition; cutover cleanup removes them{}",
                    cutover_replication::partition::SCHEMA,
                    cutover_replication::partition::TRIGGER,
                    if target.partitioned {
                        ""
                    } else {
                        ". The target is not partitioned: a TRUNCATE of one hash partition could not be applied there (the stream would stop and say so)"
                    }
                ),
                fix: Some("the run needs the TRIGGER privilege on the partitions (or their ownership) and CREATE on the database".into()),
            });
        }
        if source.has_inheritance_children {
            report.add(Finding {
                severity: Severity::Info,
                code: "inheritance_parent",
                server: "source",
                subject: subject.clone(),
                problem: "tables inherit from it: it is published, counted, copied and truncated ONLY for its own rows; its children are migrated if they are in scope themselves".into(),
                fix: None,
            });
        }
        if !writable.get(&target.oid).copied().unwrap_or(false) {
            report.add(Finding {
                severity: Severity::Blocking,
                code: "cannot_write_table",
                server: "target",
                subject: subject.clone(),
                problem: format!(
                    "role {role} may not SELECT, INSERT, UPDATE, DELETE and TRUNCATE the table"
                ),
                fix: Some(format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {quoted} TO {};",
                    sql::quote_ident(&role)
                )),
            });
        } else {
            let has_rows: bool = client
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {quoted})"), &[])
                .await?
                .get(0);
            if has_rows {
                report.add(Finding {
                    severity: Severity::Warning,
                    code: "target_not_empty",
                    server: "target",
                    subject,
                    problem: "the target table already holds rows; the snapshot copy expects an empty table".into(),
                    fix: Some(format!("TRUNCATE {quoted};  -- only if those rows are not wanted")),
                });
            }
        }
    }
    Ok(())
}

/// Exact counts on both sides (`--count`).
pub(super) async fn exact_counts(
    report: &mut Report,
    source: &Client,
    target: Option<&Client>,
) -> Result<(), tokio_postgres::Error> {
    for entry in &mut report.tables {
        entry.source_rows = Some(catalog::count_rows(source, &entry.name).await?);
        if entry.on_target
            && let Some(target) = target
        {
            let written = entry.written_to.as_ref().unwrap_or(&entry.name);
            entry.target_rows = Some(catalog::count_rows(target, written).await?);
        }
    }
    Ok(())
}

/// Sequences in scope (matched by the patterns or owned by a table in
/// scope), and whether the target has them for the switch to set.
pub(super) async fn sequence_checks(
    report: &mut Report,
    source: &Client,
    target: Option<&Client>,
    config: &Config,
    in_scope: &[Table],
) -> Result<(), tokio_postgres::Error> {
    let scope_names: BTreeSet<&TableName> = in_scope.iter().map(|t| &t.name).collect();
    let sequences: Vec<_> = catalog::sequences(source)
        .await?
        .into_iter()
        .filter(|s| {
            config.scope.contains(&s.name)
                || s.owned_by.as_ref().is_some_and(|o| scope_names.contains(o))
        })
        .collect();
    if let Some(target) = target {
        let on_target: BTreeSet<TableName> = catalog::sequences(target)
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect();
        for seq in &sequences {
            if !on_target.contains(&seq.name) {
                report.add(Finding {
                    severity: Severity::Warning,
                    code: "missing_sequence",
                    server: "target",
                    subject: Some(seq.name.to_string()),
                    problem: "the sequence is missing on the target; `cutover switch` sets sequences there".into(),
                    fix: Some(format!("CREATE SEQUENCE {} AS {};", seq.name.quoted(), seq.data_type)),
                });
            }
        }
    }
    report.sequences = sequences;
    Ok(())
}
