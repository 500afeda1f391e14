//! Table groups (`[[group]]`): each table in scope in exactly one group,
//! each group's patterns matching a table, and the foreign keys that cross
//! from one group to another.

use cutover_replication::catalog::{self, Table};
use tokio_postgres::Client;

use super::report::{Finding, Report, Severity};
use crate::config::Config;

/// Records each table's group and reports what is wrong with the groups.
pub(super) async fn group_checks(
    report: &mut Report,
    client: &Client,
    config: &Config,
    in_scope: &[Table],
) -> Result<(), tokio_postgres::Error> {
    if config.groups.is_empty() {
        return Ok(());
    }
    let mut two_groups = Vec::new();
    for table in &mut report.tables {
        table.group = match config.groups.of(&table.name) {
            Ok(group) => Some(group.to_owned()),
            Err(two) => {
                two_groups.push(Finding {
                    severity: Severity::Blocking,
                    code: "table_in_two_groups",
                    server: "source",
                    subject: Some(table.name.to_string()),
                    problem: two.to_string(),
                    fix: Some(format!(
                        "change the tables of group {:?} or {:?} so that one of them leaves it out",
                        two.first, two.second
                    )),
                });
                None
            }
        };
    }
    for finding in two_groups {
        report.add(finding);
    }
    for (i, group) in config.groups.iter().enumerate() {
        for (j, pattern) in group.tables.iter().enumerate() {
            if !in_scope.iter().any(|t| pattern.matches(&t.name)) {
                report.add(Finding {
                    severity: Severity::Blocking,
                    code: "group_pattern_matches_nothing",
                    server: "source",
                    subject: Some(format!("group[{i}].tables[{j}]")),
                    problem: format!(
                        "the pattern {:?} of group {:?} matches no table in scope",
                        pattern.as_str(),
                        group.name
                    ),
                    fix: Some(
                        "fix the pattern (schema.table, * and ? as wildcards, case-sensitive), or bring the table into replication.tables"
                            .into(),
                    ),
                });
            }
        }
    }
    let group_of = |table: &catalog::TableName| {
        report
            .tables
            .iter()
            .find(|t| &t.name == table)
            .and_then(|t| t.group.clone())
    };
    let mut crossing = Vec::new();
    for key in catalog::foreign_keys(client).await? {
        if let (Some(child), Some(parent)) = (group_of(&key.table), group_of(&key.references))
            && child != parent
        {
            crossing.push(Finding {
                severity: Severity::Warning,
                code: "foreign_key_between_groups",
                server: "source",
                subject: Some(key.table.to_string()),
                problem: format!(
                    "{} (group {child:?}) references {} (group {parent:?}) through {}: a phased cutover that moves one of the two groups without the other leaves the key across two servers, which neither can enforce",
                    key.table, key.references, key.constraint
                ),
                fix: Some(format!(
                    "put both tables in one group, or move groups {child:?} and {parent:?} together"
                )),
            });
        }
    }
    for finding in crossing {
        report.add(finding);
    }
    Ok(())
}
