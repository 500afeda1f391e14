//! DDL on the source, at its exact place in the stream.
//!
//! Logical decoding carries no DDL: native replication stops or diverges
//! when the source's tables change under it. cutover installs two event
//! triggers on the source (`ddl_command_end` for `ALTER TABLE` and `CREATE
//! TABLE`, `sql_drop` for `DROP TABLE`; creating them needs superuser).
//! Each records one event in `cutover.events` (see [`crate::events`])
//! naming the table, the statement, and the table's columns as they are
//! after it, so that the applier meets the change between the
//! transaction's changes before and after it, as [`DdlChange`].
//!
//! What the applier does with it is `[ddl] policy`: with `stop` (the
//! default) a change the target does not have yet stops the stream with
//! the statement and the fix; with `additive` the additive changes (a new
//! column, a widened type) are made on the target in the apply transaction,
//! at that position. A destructive change (a dropped table or column, a
//! narrowed type, a column added with a volatile default, whose values the
//! source wrote without logging them) stops the stream in both.
//!
//! The trigger functions only read the catalog and record the event. They
//! have no EXCEPTION block: one that caught an error would hide a DDL
//! change from the stream.
//!
//! `cutover cleanup` removes the triggers and their functions.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::catalog::TableName;
use crate::sql::{quote_ident, quote_literal};

/// The event triggers' names (and their functions', in
/// [`crate::events::SCHEMA`]).
pub const TRIGGERS: [&str; 2] = ["cutover_ddl", "cutover_ddl_drop"];

/// What the applier does with DDL on the source (`[ddl] policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DdlPolicy {
    /// A change the target does not have yet stops the stream with the
    /// statement and the fix.
    #[default]
    Stop,
    /// New columns and widened types are made on the target at the
    /// statement's position; the rest stops as with `Stop`.
    Additive,
}

/// A column as the source has it after the statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlColumn {
    /// Its name.
    pub name: String,
    /// `format_type()`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// `NOT NULL`.
    pub not_null: bool,
    /// `pg_get_expr()` of its default, if any.
    pub default: Option<String>,
    /// The value rows that existed before the column was added read
    /// (`attmissingval` as an array literal), if it was added with a
    /// non-volatile default.
    pub missing: Option<String>,
    /// A generated column.
    pub generated: bool,
}

/// One DDL statement on a table, as the source's trigger reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlChange {
    /// `ALTER TABLE` or `DROP TABLE`.
    pub tag: String,
    /// The table.
    pub table: TableName,
    /// The statement as the client sent it.
    pub statement: String,
    /// The table's columns after it; `None` for a dropped table.
    pub columns: Option<Vec<DdlColumn>>,
    /// Whether the table is in the migration's scope (decided on the
    /// source from `replication.tables` and `exclude`).
    #[serde(default)]
    pub in_scope: bool,
    /// For a new table: its primary key's columns, if it has one.
    #[serde(default)]
    pub primary_key: Option<Vec<String>>,
    /// For a new table: the publication the trigger added it to, if any
    /// (none: `replication.keyless = "refuse"` and it has no key).
    #[serde(default)]
    pub published: Option<String>,
    /// `ALTER TABLE ... DROP COLUMN`: the column dropped (reported as
    /// dropped, so that it is known whatever the applier remembers).
    #[serde(default)]
    pub dropped_column: Option<String>,
}

/// What the source-side triggers need to know of the migration.
#[derive(Clone, Debug)]
pub struct Capture {
    /// A SQL condition over `t.s` (schema) and `t.n` (table name) true for
    /// the tables in scope ([`crate::catalog::Scope::sql_condition`]).
    pub scope_condition: String,
    /// The publication of tables whose every change streams.
    pub publication: String,
    /// The publication of keyless tables whose inserts stream, when
    /// `replication.keyless = "append_only"`.
    pub inserts_publication: Option<String>,
}

fn functions_sql(capture: &Capture) -> String {
    let schema = quote_ident(crate::events::SCHEMA);
    let in_scope = &capture.scope_condition;
    let keyless = match &capture.inserts_publication {
        Some(name) => format!(
            "IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {name}) THEN
               EXECUTE format('ALTER PUBLICATION %I ADD TABLE ONLY %I.%I', {name}, r.schema_name, rel.relname);
               published := {name};
             END IF;",
            name = quote_literal(name),
        ),
        None => "published := NULL;".to_owned(),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.partitions (
    partition_schema text, partition_name text, root_schema text NOT NULL, root_name text NOT NULL,
    parent_schema text NOT NULL, parent_name text NOT NULL, bound text NOT NULL, constraint_def text NOT NULL,
    PRIMARY KEY (partition_schema, partition_name));
REVOKE ALL ON {schema}.partitions FROM PUBLIC;
CREATE OR REPLACE FUNCTION {schema}.cutover_register_tree(root oid) RETURNS void LANGUAGE sql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $cutover$
  DELETE FROM {schema}.partitions p USING pg_class r JOIN pg_namespace rn ON rn.oid = r.relnamespace
   WHERE r.oid = root AND p.root_schema = rn.nspname AND p.root_name = r.relname;
  INSERT INTO {schema}.partitions
  SELECT n.nspname, c.relname, rn.nspname, r.relname, pn.nspname, pc.relname,
         pg_get_expr(c.relpartbound, c.oid), pg_get_partition_constraintdef(c.oid)
    FROM pg_partition_tree(root) t
    JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_class r ON r.oid = root JOIN pg_namespace rn ON rn.oid = r.relnamespace
    JOIN pg_class pc ON pc.oid = t.parentrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
   WHERE t.level > 0
  ON CONFLICT (partition_schema, partition_name) DO UPDATE
     SET root_schema = excluded.root_schema, root_name = excluded.root_name,
         parent_schema = excluded.parent_schema, parent_name = excluded.parent_name,
         bound = excluded.bound, constraint_def = excluded.constraint_def;
$cutover$;
CREATE OR REPLACE FUNCTION {schema}.cutover_ddl() RETURNS event_trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $cutover$
DECLARE
  r record;
  rel record;
  leaf record;
  gone record;
  scoped boolean;
  published text;
  key text[];
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands()
            WHERE object_type IN ('table', 'table column') AND schema_name IS NOT NULL AND NOT in_extension LOOP
    SELECT c.relname::text AS relname, c.relispartition, c.relpersistence INTO rel
      FROM pg_class c WHERE c.oid = r.objid;
    scoped := NOT rel.relispartition AND rel.relpersistence = 'p' AND r.schema_name <> {cutover_schema}
              AND (SELECT {in_scope} FROM (SELECT r.schema_name::text AS s, rel.relname AS n) AS t);
    -- A partition created or attached in a published tree gets cutover's
    -- TRUNCATE trigger now, in this transaction (see `partition`).
    FOR leaf IN SELECT t.relid FROM pg_partition_tree(pg_partition_root(r.objid)) t
                 WHERE t.level > 0
                   AND EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace pn ON pn.oid = p.pronamespace
                                WHERE pn.nspname = {cutover_schema} AND p.proname = {partition_trigger})
                   AND EXISTS (SELECT 1 FROM pg_publication_tables pt
                                 JOIN pg_namespace rn ON rn.nspname = pt.schemaname
                                 JOIN pg_class rc ON rc.relnamespace = rn.oid AND rc.relname = pt.tablename
                                WHERE rc.oid = pg_partition_root(r.objid) AND pt.pubname = {main_literal})
                   AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = t.relid AND g.tgname = {partition_trigger}) LOOP
      EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
                     {partition_trigger}, leaf.relid::regclass, {cutover_schema}, {partition_trigger});
    END LOOP;
    -- A partition detached from a published tree takes its rows out of the
    -- root: recorded as that partition's truncate. Then the tree's
    -- partitions, bounds and constraints are recorded again.
    IF EXISTS (SELECT 1 FROM pg_publication_tables pt
                 JOIN pg_namespace rn ON rn.nspname = pt.schemaname
                 JOIN pg_class rc ON rc.relnamespace = rn.oid AND rc.relname = pt.tablename
                WHERE rc.oid = pg_partition_root(r.objid) AND pt.pubname = {main_literal}) THEN
      FOR gone IN SELECT p.* FROM {schema}.partitions p
                    JOIN pg_class rc ON rc.oid = pg_partition_root(r.objid)
                    JOIN pg_namespace rn ON rn.oid = rc.relnamespace
                   WHERE p.root_schema = rn.nspname AND p.root_name = rc.relname
                     AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(rc.oid) t
                                       JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                                      WHERE n.nspname = p.partition_schema AND c.relname = p.partition_name) LOOP
        INSERT INTO {events} (kind, payload) VALUES ('truncate_partition', json_build_object(
          'partition', json_build_object('schema', gone.partition_schema, 'name', gone.partition_name),
          'root', json_build_object('schema', gone.root_schema, 'name', gone.root_name),
          'parent', json_build_object('schema', gone.parent_schema, 'name', gone.parent_name),
          'bound', gone.bound, 'constraint', gone.constraint_def)::text);
      END LOOP;
      PERFORM {schema}.cutover_register_tree(pg_partition_root(r.objid));
    END IF;
    published := NULL;
    key := (SELECT array_agg(a.attname::text ORDER BY k.ord)
              FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = r.objid AND i.indisprimary AND i.indimmediate);
    -- A new table in scope is published in its own transaction, so that
    -- its first rows stream.
    IF r.command_tag = 'CREATE TABLE' AND scoped THEN
      -- A publication dropped by hand must not make the application's
      -- CREATE TABLE fail: the table is then reported unpublished.
      IF key IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {main_literal}) THEN
          EXECUTE format('ALTER PUBLICATION %I ADD TABLE ONLY %I.%I', {main_literal}, r.schema_name, rel.relname);
          published := {main_literal};
        END IF;
      ELSE
        {keyless}
      END IF;
    END IF;
    INSERT INTO {events} (kind, payload) VALUES ('ddl', json_build_object(
      'tag', r.command_tag,
      'table', json_build_object('schema', r.schema_name, 'name', rel.relname),
      'statement', current_query(),
      'in_scope', coalesce(scoped, false),
      'primary_key', key,
      'published', published,
      'columns', (SELECT coalesce(json_agg(json_build_object(
                     'name', a.attname,
                     'type', format_type(a.atttypid, a.atttypmod),
                     'not_null', a.attnotnull,
                     'default', pg_get_expr(d.adbin, d.adrelid),
                     'missing', CASE WHEN a.atthasmissing THEN a.attmissingval::text END,
                     'generated', a.attgenerated <> '') ORDER BY a.attnum), '[]'::json)
                    FROM pg_attribute a
                    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                   WHERE a.attrelid = r.objid AND a.attnum > 0 AND NOT a.attisdropped))::text);
  END LOOP;
END $cutover$;
CREATE OR REPLACE FUNCTION {schema}.cutover_ddl_drop() RETURNS event_trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $cutover$
DECLARE
  r record;
  gone record;
  partition boolean;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_dropped_objects()
            WHERE object_type = 'table' AND NOT is_temporary AND original LOOP
    partition := false;
    -- A partition of a published tree dropped: its rows leave the root,
    -- as with its truncate.
    FOR gone IN DELETE FROM {schema}.partitions p
                 WHERE p.partition_schema = r.schema_name AND p.partition_name = r.object_name
                RETURNING p.* LOOP
      partition := true;
      INSERT INTO {events} (kind, payload) VALUES ('truncate_partition', json_build_object(
        'partition', json_build_object('schema', gone.partition_schema, 'name', gone.partition_name),
        'root', json_build_object('schema', gone.root_schema, 'name', gone.root_name),
        'parent', json_build_object('schema', gone.parent_schema, 'name', gone.parent_name),
        'bound', gone.bound, 'constraint', gone.constraint_def)::text);
      -- Its siblings' constraints (a default partition's) change with it.
      IF to_regclass(format('%I.%I', gone.root_schema, gone.root_name)) IS NOT NULL THEN
        PERFORM {schema}.cutover_register_tree(to_regclass(format('%I.%I', gone.root_schema, gone.root_name)));
      END IF;
    END LOOP;
    INSERT INTO {events} (kind, payload) VALUES ('ddl', json_build_object(
      'tag', 'DROP TABLE',
      'table', json_build_object('schema', r.schema_name, 'name', r.object_name),
      'statement', current_query(),
      'in_scope', NOT partition AND r.schema_name <> {cutover_schema}
                  AND (SELECT {in_scope} FROM (SELECT r.schema_name::text AS s, r.object_name::text AS n) AS t),
      'columns', NULL)::text);
  END LOOP;
  FOR r IN SELECT * FROM pg_event_trigger_dropped_objects()
            WHERE object_type = 'table column' AND NOT is_temporary AND original LOOP
    INSERT INTO {events} (kind, payload) VALUES ('ddl', json_build_object(
      'tag', 'ALTER TABLE',
      'table', json_build_object('schema', r.address_names[1], 'name', r.address_names[2]),
      'statement', current_query(),
      'in_scope', r.address_names[1] <> {cutover_schema}
                  AND (SELECT {in_scope} FROM (SELECT r.address_names[1] AS s, r.address_names[2] AS n) AS t),
      'dropped_column', r.address_names[3],
      'columns', NULL)::text);
  END LOOP;
END $cutover$;",
        main_literal = quote_literal(&capture.publication),
        events = crate::events::table().quoted(),
        cutover_schema = quote_literal(crate::events::SCHEMA),
        partition_trigger = quote_literal(crate::partition::TRIGGER),
    )
}

/// Installs (or replaces) the DDL event triggers on the source. Needs
/// superuser; returns `Ok(false)` when the role may not, so that the
/// caller can say what is not captured.
pub async fn install(client: &Client, capture: &Capture) -> Result<bool, tokio_postgres::Error> {
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    if !superuser {
        return Ok(false);
    }
    crate::events::install(client, &capture.publication).await?;
    let schema = quote_ident(crate::events::SCHEMA);
    // Replaced whole, in one transaction: no DDL goes uncaptured between.
    let installed = client
        .batch_execute(&format!(
            "BEGIN;
             CREATE SCHEMA IF NOT EXISTS {schema};
             {}
             DROP EVENT TRIGGER IF EXISTS cutover_ddl; DROP EVENT TRIGGER IF EXISTS cutover_ddl_drop;
             CREATE EVENT TRIGGER cutover_ddl ON ddl_command_end
               WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
               EXECUTE FUNCTION {schema}.cutover_ddl();
             CREATE EVENT TRIGGER cutover_ddl_drop ON sql_drop WHEN TAG IN ('DROP TABLE', 'ALTER TABLE')
               EXECUTE FUNCTION {schema}.cutover_ddl_drop();
             COMMIT;",
            functions_sql(capture)
        ))
        .await;
    if let Err(err) = installed {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(err);
    }
    // The partitions of the published trees, as they are now: a dropped or
    // detached one is told by what was recorded here.
    client
        .execute(
            &format!(
                "SELECT {schema}.cutover_register_tree(c.oid)
                   FROM pg_publication_tables pt
                   JOIN pg_namespace n ON n.nspname = pt.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                  WHERE pt.pubname = $1 AND c.relkind = 'p'"
            ),
            &[&capture.publication],
        )
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back() {
        let content = br#"{"tag":"ALTER TABLE","table":{"schema":"public","name":"t"},
            "statement":"alter table t add column c int default 5",
            "columns":[{"name":"id","type":"integer","not_null":true,"default":null,"missing":null,"generated":false},
                       {"name":"c","type":"integer","not_null":false,"default":"5","missing":"{5}","generated":false}]}"#;
        let change: DdlChange = serde_json::from_slice(content).unwrap();
        assert_eq!(change.table, TableName::new("public", "t"));
        let columns = change.columns.unwrap();
        assert_eq!(columns[1].missing.as_deref(), Some("{5}"));
    }
}
