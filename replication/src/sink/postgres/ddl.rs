//! The source's DDL and partition truncates, applied at their place in the
//! stream (see [`crate::ddl`] and [`crate::partition`]).

use std::collections::HashMap;

use super::PostgresSink;
use super::error::{ApplyError, session_error};
use crate::catalog::TableName;
use crate::client::describe;
use crate::lsn::Lsn;
use crate::sql::quote_ident;

/// `CREATE TABLE` for a table new on the source: its columns with their
/// types, `NOT NULL` and generation expressions, and its primary key.
/// Defaults, other constraints and indexes are the operator's to add.
pub(super) fn create_table_sql(
    table: &TableName,
    columns: &[crate::ddl::DdlColumn],
    primary_key: Option<&[String]>,
) -> String {
    let mut parts: Vec<String> = columns
        .iter()
        .map(|c| {
            let mut part = format!("{} {}", quote_ident(&c.name), c.type_name);
            match (&c.default, c.generated) {
                (Some(expression), true) => {
                    part.push_str(&format!(" GENERATED ALWAYS AS ({expression}) STORED"))
                }
                _ if c.not_null => part.push_str(" NOT NULL"),
                _ => {}
            }
            part
        })
        .collect();
    if let Some(key) = primary_key {
        parts.push(format!(
            "PRIMARY KEY ({})",
            key.iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    format!("CREATE TABLE {} ({});", table.quoted(), parts.join(", "))
}

impl PostgresSink {
    /// Follows DDL on a source table in scope at its place in the stream:
    /// checks that the target has every column the source now has, of a
    /// type that holds its values, and with the `additive` policy adds or
    /// widens what it lacks, inside the apply transaction. Anything else
    /// stops with the statement and the fix (see [`crate::ddl`]).
    pub(super) async fn apply_ddl(
        &mut self,
        ddl: &crate::ddl::DdlChange,
        lsn: Lsn,
    ) -> Result<(), ApplyError> {
        use crate::catalog::{TypeFit, type_fit};
        tracing::debug!(?ddl, "DDL on the source");
        let quoted = ddl.table.quoted();
        let stop = |problem: String, fix: String| ApplyError::Ddl {
            table: ddl.table.clone(),
            lsn,
            statement: ddl.statement.trim().to_owned(),
            problem,
            fix,
        };
        if let Some(column) = &ddl.dropped_column {
            let has: bool = self
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute
                                     WHERE attrelid = to_regclass($1) AND attname = $2
                                       AND attnum > 0 AND NOT attisdropped)",
                    &[&quoted, column],
                )
                .await
                .map_err(session_error(format!(
                    "reading the columns of {}",
                    ddl.table
                )))?
                .get(0);
            if !has {
                return Ok(());
            }
            return Err(stop(
                format!(
                    "the source dropped column {column}; cutover never drops a column on the target"
                ),
                format!(
                    "drop it on the target if it should go (ALTER TABLE {quoted} DROP COLUMN {};), then restart",
                    quote_ident(column)
                ),
            ));
        }
        let Some(columns) = &ddl.columns else {
            // A table the target never had (a partition of a tree out of
            // scope, a table created and dropped on the source alone):
            // nothing of it to keep or drop.
            let exists = self.target_has(&ddl.table).await?;
            if !exists {
                return Ok(());
            }
            return Err(stop(
                "the source dropped the table; cutover never drops a table on the target".into(),
                format!(
                    "drop it on the target if it should go (DROP TABLE {quoted};), take it out of replication.tables, and restart"
                ),
            ));
        };
        if ddl.tag != "ALTER TABLE" && ddl.tag != "CREATE TABLE" {
            return Err(stop(
                format!(
                    "a {} in scope: the rows it wrote were written before cutover's trigger could publish the table, and are not in the stream",
                    ddl.tag
                ),
                "create the table on the target and copy its rows (or copy the whole migration again), take care that the publication holds it, check with cutover verify, and restart".into(),
            ));
        }
        if ddl.tag == "CREATE TABLE" {
            if ddl.published.is_none() {
                return Err(stop(
                    "a new table in scope without a primary key, which replication.keyless does not let cutover publish as it is".into(),
                    format!(
                        "give it a primary key, or REPLICA IDENTITY FULL, on the source and add it to the publication (ALTER PUBLICATION ... ADD TABLE ONLY {quoted};), create it on the target, and restart"
                    ),
                ));
            }
            let exists = self.target_has(&ddl.table).await?;
            if !exists {
                let create = create_table_sql(&ddl.table, columns, ddl.primary_key.as_deref());
                if self.ddl != crate::ddl::DdlPolicy::Additive {
                    return Err(stop(
                        "a new table in scope that the target does not have".into(),
                        format!(
                            "{create} on the target, then restart (or set ddl.policy = \"additive\" to let cutover create it)"
                        ),
                    ));
                }
                tracing::info!(table = %ddl.table, "following DDL on the source: creating a new table in scope");
                self.client.batch_execute(&create).await.map_err(|err| {
                    stop(
                        format!("the target refused {create}: {}", describe(&err)),
                        "create the table on the target by hand, then restart".into(),
                    )
                })?;
                self.forget_table(&ddl.table);
                return Ok(());
            }
        }
        let exists = self.target_has(&ddl.table).await?;
        if !exists {
            return Err(stop(
                "the target has no table of this name (renamed on the source?)".into(),
                format!("create or rename it on the target to {quoted}, then restart"),
            ));
        }
        let target: HashMap<String, String> = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&quoted],
            )
            .await
            .map_err(session_error(format!(
                "reading the columns of {}",
                ddl.table
            )))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Columns the source had before the statement (as it last described
        // the table) and has no more: dropped on the source.
        if let Some(known) = self.tables.get(&ddl.table) {
            let dropped: Vec<&str> = known
                .relation
                .columns
                .iter()
                .filter(|c| !columns.iter().any(|d| d.name == c.name))
                .map(|c| c.name.as_str())
                .filter(|c| target.contains_key(*c))
                .collect();
            if !dropped.is_empty() {
                return Err(stop(
                    format!(
                        "the source dropped column(s) {}; cutover never drops a column on the target",
                        dropped.join(", ")
                    ),
                    format!(
                        "drop them on the target if they should go ({}), then restart",
                        dropped
                            .iter()
                            .map(|c| format!(
                                "ALTER TABLE {quoted} DROP COLUMN {};",
                                quote_ident(c)
                            ))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                ));
            }
        }
        // A rename looks like a column dropped and another added: following
        // it as an addition would leave the renamed column's values behind.
        let lowered = ddl.statement.to_ascii_lowercase();
        if ddl.tag == "ALTER TABLE" && lowered.contains(" rename ") {
            let renamed = columns
                .iter()
                .any(|c| !c.generated && !target.contains_key(&c.name));
            if renamed {
                return Err(stop(
                    "a rename on the source; the target has no column or table of the new name"
                        .into(),
                    "rename it the same way on the target, then restart".into(),
                ));
            }
        }
        let mut statements: Vec<String> = Vec::new();
        let mut lacking: Vec<String> = Vec::new();
        for column in columns.iter().filter(|c| !c.generated) {
            let name = quote_ident(&column.name);
            match target.get(&column.name) {
                Some(current) => match type_fit(&column.type_name, current) {
                    TypeFit::Same | TypeFit::Widens => {}
                    TypeFit::Incompatible => {
                        let widen = format!(
                            "ALTER TABLE {quoted} ALTER COLUMN {name} TYPE {};",
                            column.type_name
                        );
                        let using = ddl.statement.to_ascii_lowercase().contains(" using ");
                        if using {
                            return Err(stop(
                                format!(
                                    "column {} changed type with USING: the source rewrote its values, and the rewritten values are not in the stream",
                                    column.name
                                ),
                                format!(
                                    "change it the same way on the target ({widen} with the same USING), check with cutover verify, and restart"
                                ),
                            ));
                        }
                        if type_fit(current, &column.type_name) != TypeFit::Widens {
                            return Err(stop(
                                format!(
                                    "column {} is now {} on the source, which the target's {current} cannot hold, and which is not a widening of it",
                                    column.name, column.type_name
                                ),
                                format!(
                                    "change it on the target ({widen}), check its values with cutover verify, and restart"
                                ),
                            ));
                        }
                        lacking.push(format!(
                            "column {} widened to {}",
                            column.name, column.type_name
                        ));
                        statements.push(widen);
                    }
                },
                None => {
                    if column.default.is_some() && column.missing.is_none() {
                        return Err(stop(
                            format!(
                                "column {} was added with a default that PostgreSQL computed row by row (a volatile default): the source rewrote the table, and those values are not in the stream",
                                column.name
                            ),
                            "add the column on the target and copy its values (or copy the table again), check with cutover verify, and restart".to_owned(),
                        ));
                    }
                    let mut add = format!(
                        "ALTER TABLE {quoted} ADD COLUMN {name} {}",
                        column.type_name
                    );
                    if let Some(missing) = &column.missing {
                        // The value the source's existing rows read: a
                        // constant, so the target stores it once too.
                        add.push_str(&format!(
                            " DEFAULT ({}::{}[])[1]",
                            crate::sql::quote_literal(missing),
                            column.type_name
                        ));
                        if column.not_null {
                            add.push_str(" NOT NULL");
                        }
                    }
                    add.push(';');
                    if column.missing.is_some() {
                        add.push_str(&format!(
                            " ALTER TABLE {quoted} ALTER COLUMN {name} DROP DEFAULT;"
                        ));
                    }
                    lacking.push(format!("column {} ({})", column.name, column.type_name));
                    statements.push(add);
                }
            }
        }
        if statements.is_empty() {
            self.forget_table(&ddl.table);
            return Ok(());
        }
        if self.ddl != crate::ddl::DdlPolicy::Additive {
            return Err(stop(
                format!("the target lacks {}", lacking.join(", ")),
                format!(
                    "{} on the target, then restart (or set ddl.policy = \"additive\" to let cutover make additive changes)",
                    statements.join(" ")
                ),
            ));
        }
        tracing::info!(table = %ddl.table, statement = %ddl.statement.trim(), changes = %lacking.join(", "), "following DDL on the source");
        self.client
            .batch_execute(&statements.join(" "))
            .await
            .map_err(|err| {
                stop(
                    format!(
                        "the target refused {}: {}",
                        statements.join(" "),
                        describe(&err)
                    ),
                    "make the change on the target by hand, then restart".into(),
                )
            })?;
        self.forget_table(&ddl.table);
        Ok(())
    }

    /// Whether the target has a table of this name.
    pub(super) async fn target_has(&self, table: &TableName) -> Result<bool, ApplyError> {
        Ok(self
            .client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await
            .map_err(session_error(format!("looking up {table} on the target")))?
            .get(0))
    }

    /// Forgets the description of one table (its statements too).
    pub(super) fn forget_table(&mut self, table: &TableName) {
        if self.tables.remove(table).is_some() {
            self.statements.clear();
        }
    }

    /// Empties on the target the rows of a partition the source truncated:
    /// the same partition where the target has it (same name and bound,
    /// under a parent and root of the same names), else the rows of the
    /// root that the partition's constraint holds.
    pub(super) async fn truncate_partition(
        &mut self,
        truncate: &crate::partition::PartitionTruncate,
        lsn: Lsn,
    ) -> Result<(), ApplyError> {
        let same: Option<bool> = self
            .client
            .query_opt(
                "SELECT c.relkind = 'p'
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_inherits i ON i.inhrelid = c.oid
                   JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
                   JOIN pg_class r ON r.oid = pg_partition_root(c.oid) JOIN pg_namespace rn ON rn.oid = r.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relispartition
                    AND pg_get_expr(c.relpartbound, c.oid) = $3
                    AND pn.nspname = $4 AND p.relname = $5 AND rn.nspname = $6 AND r.relname = $7",
                &[
                    &truncate.partition.schema,
                    &truncate.partition.name,
                    &truncate.bound,
                    &truncate.parent.schema,
                    &truncate.parent.name,
                    &truncate.root.schema,
                    &truncate.root.name,
                ],
            )
            .await
            .map_err(session_error(format!(
                "looking up partition {} on the target",
                truncate.partition
            )))?
            .map(|row| row.get(0));
        let sql = match same {
            Some(partitioned) => format!(
                "TRUNCATE {}",
                crate::catalog::own_rows(&truncate.partition, partitioned)
            ),
            None if truncate.hashed() => {
                return Err(ApplyError::Schema(format!(
                    "the source truncated hash partition {} ({}) of {}, and the target has no partition of that name and bound under {}: \
                     the rows of a hash partition cannot be told apart on a table partitioned differently. \
                     Empty them by hand on the target (they are the source's {} rows, gone from the source), \
                     or partition the target's {} like the source's, then run cutover verify and restart",
                    truncate.partition,
                    truncate.bound,
                    truncate.root,
                    truncate.parent,
                    truncate.partition,
                    truncate.root
                )));
            }
            // The constraint is the source's own rendering of the
            // partition's bounds over the root's columns (no value of a
            // row is built into it).
            None => format!(
                "DELETE FROM {} WHERE {}",
                truncate.root.quoted(),
                truncate.constraint
            ),
        };
        // One statement, by the extended protocol.
        self.client
            .execute(sql.as_str(), &[])
            .await
            .map(|_| ())
            .map_err(|err| match err.as_db_error() {
                Some(db) => ApplyError::Refused {
                    op: "truncate",
                    table: truncate.partition.clone(),
                    key: format!("(partition of {})", truncate.root),
                    lsn,
                    detail: db.message().to_owned(),
                    sqlstate: db.code().code().to_owned(),
                },
                None => session_error(format!("emptying partition {}", truncate.partition))(err),
            })
    }
}
