//! What the sink knows of the target's tables (described once per source
//! description of the table), and the statements it prepared.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Statement;

use super::PostgresSink;
use super::error::{ApplyError, is_transient_sqlstate, session_error};
use crate::catalog::TableName;
use crate::change::Relation;
use crate::sql::quote_ident;

/// A target table as the applier needs it.
#[derive(Debug, Clone)]
pub(super) struct TargetTable {
    /// The source's description it was read for: a new one (the source
    /// changed the table) is described again.
    pub(super) relation: Arc<Relation>,
    /// Column name → `format_type()`.
    pub(super) types: HashMap<String, String>,
    /// Primary key columns on the target.
    pub(super) primary_key: Vec<String>,
    /// The primary key is `DEFERRABLE`: it cannot arbitrate `ON CONFLICT`,
    /// and a source transaction may have permuted its values, so rows of a
    /// `REPLICA IDENTITY FULL` table are located by their whole old value.
    pub(super) key_deferrable: bool,
    /// `GENERATED ALWAYS AS IDENTITY` columns: written with `OVERRIDING
    /// SYSTEM VALUE`, and never by an UPDATE (PostgreSQL refuses it), so a
    /// row whose such column changes is replaced.
    pub(super) identity_always: Vec<String>,
    /// `DEFERRABLE` unique and primary keys, by columns. Under
    /// `session_replication_role = replica` PostgreSQL never checks them
    /// (the recheck is a trigger), so the applier does (invariant 12).
    pub(super) deferrable_keys: Vec<Vec<String>>,
    /// A partitioned table: `TRUNCATE` cannot take `ONLY`.
    pub(super) partitioned: bool,
    /// Columns whose target type may not hold every value of the type the
    /// source now sends (built-in types only): column, source type,
    /// target type. Named in the error when the target refuses a value.
    pub(super) narrower: Vec<(String, String, String)>,
}

impl TargetTable {
    /// The table's own rows in a statement: `ONLY` it, so that rows of
    /// tables inheriting from it are never touched (a partitioned table's
    /// rows are all in its partitions, where ONLY would find none).
    pub(super) fn only(&self, table: &TableName) -> String {
        crate::catalog::own_rows(table, self.partitioned)
    }

    /// ` OVERRIDING SYSTEM VALUE` when an INSERT of `names` writes a
    /// `GENERATED ALWAYS` identity column.
    pub(super) fn overriding(&self, names: &[&str]) -> &'static str {
        if names
            .iter()
            .any(|n| self.identity_always.iter().any(|a| a == n))
        {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    }

    /// Whether rows are deleted by key and inserted again instead of
    /// upserted: when writing `names` under `keys` would UPDATE a
    /// `GENERATED ALWAYS` identity column, or the key is deferrable.
    pub(super) fn replaces(&self, names: &[&str], keys: &[&str]) -> bool {
        // A deferrable key cannot arbitrate ON CONFLICT either.
        self.key_deferrable
            || names
                .iter()
                .any(|n| !keys.contains(n) && self.identity_always.iter().any(|a| a == n))
    }
}

/// How rows of a relation are identified: the indexes of its key columns,
/// or `None` for a keyless table (matched on the whole old row).
pub(super) type KeySpec = Option<Vec<usize>>;

/// The key of a relation: its replica identity key; for REPLICA IDENTITY
/// FULL (where pgoutput flags every column) the target's primary key.
pub(super) fn key_spec(relation: &Relation, target: &TargetTable) -> KeySpec {
    if relation.replica_identity == 'f' {
        // A deferrable key may hold duplicates inside a source transaction
        // (a swap, a shift): only the whole old row says which row moved.
        if target.primary_key.is_empty() || target.key_deferrable {
            return None;
        }
        let indexes: Option<Vec<usize>> = target
            .primary_key
            .iter()
            .map(|k| relation.columns.iter().position(|c| &c.name == k))
            .collect();
        return indexes;
    }
    let indexes: Vec<usize> = relation.key_indexes().collect();
    (!indexes.is_empty()).then_some(indexes)
}

impl PostgresSink {
    pub(super) async fn target_table(
        &mut self,
        relation: &Arc<Relation>,
    ) -> Result<Arc<TargetTable>, ApplyError> {
        if let Some(table) = self.tables.get(&relation.name) {
            if Arc::ptr_eq(&table.relation, relation) {
                return Ok(Arc::clone(table));
            }
            if *table.relation == **relation {
                // The same description read again (a spilled transaction):
                // remember this copy, compared by pointer from now on.
                let mut same = (**table).clone();
                same.relation = Arc::clone(relation);
                let same = Arc::new(same);
                self.tables.insert(relation.name.clone(), Arc::clone(&same));
                return Ok(same);
            }
        }
        // First use, or the source described the table again (a column
        // added, dropped or of another type): read the target again.
        let mut described = self.describe_target(relation).await?;
        described.relation = Arc::clone(relation);
        let table = Arc::new(described);
        self.tables
            .insert(relation.name.clone(), Arc::clone(&table));
        Ok(table)
    }

    /// Reads what the applier needs of a target table.
    pub(super) async fn describe_target(
        &self,
        relation: &Relation,
    ) -> Result<TargetTable, ApplyError> {
        let name = relation.name.quoted();
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attidentity = 'a',
                        a.attgenerated <> ''
                   FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&name],
            )
            .await
            .map_err(|err| match err.as_db_error() {
                Some(db) if !is_transient_sqlstate(db.code().code()) => ApplyError::Schema(format!(
                    "table {} is missing on the target ({}): create it with the source's definition",
                    relation.name,
                    db.message()
                )),
                _ => session_error(format!("reading the columns of {}", relation.name))(err),
            })?;
        let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let identity_always: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get(0))
            .collect();
        let generated: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, bool>(3))
            .map(|r| r.get(0))
            .collect();
        let row = self
            .client
            .query_one(
                "SELECT c.relkind = 'p',
                        (SELECT array_agg(a.attname::text ORDER BY k.ord)
                           FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                          WHERE i.indrelid = c.oid AND i.indisprimary),
                        coalesce((SELECT NOT i.indimmediate FROM pg_index i
                                   WHERE i.indrelid = c.oid AND i.indisprimary), false),
                        (SELECT array_agg(array_to_string(ARRAY(
                                  SELECT quote_ident(a.attname) FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord)
                                    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum
                                   ORDER BY u.ord), ','))
                           FROM pg_constraint k
                          WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u') AND k.condeferrable)
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&name],
            )
            .await
            .map_err(session_error(format!("reading the keys of {}", relation.name)))?;
        let missing: Vec<&str> = relation
            .columns
            .iter()
            .filter(|c| !types.contains_key(&c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(ApplyError::Schema(format!(
                "table {} on the target lacks column(s) {} that the source sends: add them (ALTER TABLE ... ADD COLUMN) and restart",
                relation.name,
                missing.join(", ")
            )));
        }
        let computed: Vec<&str> = relation
            .columns
            .iter()
            .filter(|c| generated.contains(&c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !computed.is_empty() {
            return Err(ApplyError::Schema(format!(
                "column(s) {} of {} are generated on the target but plain on the source, which sends their values: \
                 make them plain columns on the target (ALTER TABLE ... ALTER COLUMN ... DROP EXPRESSION) \
                 or generated on the source too, and restart",
                computed.join(", "),
                relation.name
            )));
        }
        // Built-in types have the same OIDs everywhere: the target spells
        // the source's types, and they are compared with its own.
        let spelled = self.spelled_types(relation).await?;
        let narrower = relation
            .columns
            .iter()
            .zip(spelled)
            .filter_map(|(column, source)| {
                let source = source?;
                let target = types.get(&column.name)?;
                (crate::catalog::type_fit(&source, target) == crate::catalog::TypeFit::Incompatible)
                    .then(|| (column.name.clone(), source, target.clone()))
            })
            .collect();
        Ok(TargetTable {
            narrower,
            relation: Arc::new(relation.clone()),
            types,
            primary_key: row.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
            key_deferrable: row.get(2),
            identity_always,
            deferrable_keys: row
                .get::<_, Option<Vec<String>>>(3)
                .unwrap_or_default()
                .iter()
                .map(|list| crate::catalog::split_quoted_list(list))
                .collect(),
            partitioned: row.get(0),
        })
    }
    /// The source's type of each column of `relation` as the target spells
    /// it (`format_type`), for built-in types, which have the same OIDs on
    /// every server; `None` for the others.
    pub(super) async fn spelled_types(
        &self,
        relation: &Relation,
    ) -> Result<Vec<Option<String>>, ApplyError> {
        let oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = relation.columns.iter().map(|c| c.type_modifier).collect();
        Ok(self
            .client
            .query(
                "SELECT CASE WHEN t.oid < 16384 THEN format_type(t.oid, t.typmod) END
                   FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, n) ORDER BY t.n",
                &[&oids, &mods],
            )
            .await
            .map_err(session_error(format!("reading the types of {}", relation.name)))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Forgets what the applier knows of the target's tables (an operator
    /// may have changed them): they are described again on next use.
    pub(super) fn forget_descriptions(&mut self) {
        self.tables.clear();
        self.statements.clear();
    }

    /// A refused value, with the columns of its table whose target type is
    /// narrower than the source's and the statement that widens them.
    pub(super) fn explained(&self, mut err: ApplyError) -> ApplyError {
        let ApplyError::Refused {
            table,
            detail,
            sqlstate,
            ..
        } = &mut err
        else {
            return err;
        };
        let narrower = self
            .tables
            .get(table)
            .map(|t| t.narrower.as_slice())
            .unwrap_or_default();
        if narrower.is_empty() || !sqlstate.starts_with("22") {
            return err;
        }
        let columns: Vec<String> = narrower
            .iter()
            .map(|(c, source, target)| {
                format!("{c} is {target} on the target but {source} on the source")
            })
            .collect();
        let fixes: Vec<String> = narrower
            .iter()
            .map(|(c, source, _)| {
                format!(
                    "ALTER TABLE {} ALTER COLUMN {} TYPE {source};",
                    table.quoted(),
                    quote_ident(c)
                )
            })
            .collect();
        *detail = format!(
            "{detail}; {}: widen on the target ({}) and restart",
            columns.join(", "),
            fixes.join(" ")
        );
        err
    }

    /// [`PostgresSink::statement`] for callers that report a failed statement
    /// as the change's refusal.
    pub(super) async fn prepared(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(super) async fn statement(&mut self, sql: &str) -> Result<Statement, ApplyError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self
            .client
            .prepare(sql)
            .await
            .map_err(|err| match err.as_db_error() {
                // A server going away (57P01 and the like) is not the
                // statement's fault: retry.
                Some(db) if !is_transient_sqlstate(db.code().code()) => {
                    ApplyError::Schema(format!("{} (preparing: {sql})", db.message()))
                }
                _ => session_error("preparing a statement")(err),
            })?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}
