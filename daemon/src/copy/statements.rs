//! The statements of the copy's drop and rebuild of indexes and
//! constraints on the target, and the catalog queries that record them
//! first. Pure: names are quoted by [`cutover_replication::sql`];
//! definitions come from the server's own `pg_get_constraintdef` and
//! `pg_get_indexdef`, which quote what they name.

use cutover_replication::catalog::TableName;
use cutover_replication::sql::Sql;

/// CHECK and FOREIGN KEY constraints: checked row by row during a load,
/// cheaper to validate once after it.
pub(super) const LOAD_CONSTRAINTS: &str = "
SELECT c.conname::text, pg_get_constraintdef(c.oid), NULL::text, NULL::text,
       rn.nspname::text, r.relname::text
  FROM pg_constraint c
  LEFT JOIN pg_class r ON r.oid = c.confrelid
  LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
 WHERE c.conrelid = $1::text::regclass AND c.contype IN ('c', 'f') AND c.conparentid = 0
 ORDER BY 1";

/// PRIMARY KEY and UNIQUE constraints: a B-tree built once by a sort after
/// the load costs a fraction of a million inserts into it. Kept: those a
/// foreign key still depends on (one from a table out of scope: the
/// in-scope ones are dropped first), the replica identity index (dropping
/// it would change what the table logs), and those inherited from a
/// partitioned parent (they go with the parent's).
pub(super) const KEY_CONSTRAINTS: &str = "
SELECT c.conname::text, pg_get_constraintdef(c.oid),
       CASE WHEN t.relkind <> 'p' THEN pg_get_indexdef(c.conindid) END,
       CASE WHEN t.relkind <> 'p' THEN x.relname::text END,
       NULL::text, NULL::text
  FROM pg_constraint c JOIN pg_index i ON i.indexrelid = c.conindid
  JOIN pg_class t ON t.oid = c.conrelid JOIN pg_class x ON x.oid = c.conindid
 WHERE c.conrelid = $1::text::regclass AND c.contype IN ('p', 'u') AND c.conparentid = 0
   AND NOT i.indisreplident
   AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = c.conindid)
 ORDER BY 1";

/// Indexes not backing a constraint, other than the replica identity index,
/// the partitions of a partitioned index (dropped with their parent) and
/// the indexes of keys already recorded as dropped (`$2`: a key's index
/// built but not yet attached when the daemon stopped; dropped as such).
pub(super) const SECONDARY_INDEXES: &str = "
SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), NULL::text, NULL::text,
       NULL::text, NULL::text
  FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
 WHERE i.indrelid = $1::text::regclass AND NOT i.indisprimary AND NOT i.indisreplident
   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
   AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
   AND NOT x.relname = ANY($2::text[])
 ORDER BY 1";

/// `ALTER TABLE t DROP CONSTRAINT IF EXISTS c`.
pub(super) fn drop_constraint(table: &TableName, name: &str) -> String {
    let mut sql = Sql::new("ALTER TABLE ");
    sql.table(table)
        .push(" DROP CONSTRAINT IF EXISTS ")
        .ident(name);
    sql.finish()
}

/// `DROP INDEX IF EXISTS <regclass>`: `index` is the server's own text of
/// an index's regclass (schema-qualified and quoted where needed), as
/// [`SECONDARY_INDEXES`] returns it.
pub(super) fn drop_index(index: &str) -> String {
    format!("DROP INDEX IF EXISTS {index}")
}

/// `DROP INDEX IF EXISTS "schema"."index"`.
pub(super) fn drop_index_in(schema: &str, index: &str) -> String {
    let mut sql = Sql::new("DROP INDEX IF EXISTS ");
    sql.ident(schema).push(".").ident(index);
    sql.finish()
}

/// An index's definition (`pg_get_indexdef`) made idempotent (`IF NOT
/// EXISTS`, so that a rebuild after a crash does not fail). The index of a
/// partitioned table is defined `ON ONLY` the parent (its partitions'
/// indexes were attached one by one): built without `ONLY`, it builds
/// them again too.
pub(super) fn build_index(definition: &str) -> String {
    definition
        .replacen(" ON ONLY ", " ON ", 1)
        .replacen("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1)
        .replacen(
            "CREATE UNIQUE INDEX ",
            "CREATE UNIQUE INDEX IF NOT EXISTS ",
            1,
        )
}

/// `ALTER TABLE t ADD CONSTRAINT k PRIMARY KEY|UNIQUE USING INDEX i`, with
/// the deferral of the key's definition (`pg_get_constraintdef`): the key
/// attached to the index built for it, without a second build.
pub(super) fn attach_key(table: &TableName, name: &str, definition: &str, index: &str) -> String {
    let kind = if definition.starts_with("PRIMARY KEY") {
        " PRIMARY KEY"
    } else {
        " UNIQUE"
    };
    let deferral = if definition.contains("INITIALLY DEFERRED") {
        " DEFERRABLE INITIALLY DEFERRED"
    } else if definition.contains("DEFERRABLE") {
        " DEFERRABLE"
    } else {
        ""
    };
    let mut sql = Sql::new("ALTER TABLE ");
    sql.table(table).push(" ADD CONSTRAINT ").ident(name);
    sql.push(kind)
        .push(" USING INDEX ")
        .ident(index)
        .push(deferral);
    sql.finish()
}

/// `ALTER TABLE t ADD CONSTRAINT c <definition>`, `NOT VALID` when asked
/// (a CHECK or FOREIGN KEY added without a scan under the strong lock,
/// validated after).
pub(super) fn add_constraint(
    table: &TableName,
    name: &str,
    definition: &str,
    not_valid: bool,
) -> String {
    let mut sql = Sql::new("ALTER TABLE ");
    sql.table(table).push(" ADD CONSTRAINT ").ident(name);
    sql.push(" ").push(definition);
    if not_valid {
        sql.push(" NOT VALID");
    }
    sql.finish()
}

/// `ALTER TABLE t VALIDATE CONSTRAINT c`.
pub(super) fn validate_constraint(table: &TableName, name: &str) -> String {
    let mut sql = Sql::new("ALTER TABLE ");
    sql.table(table).push(" VALIDATE CONSTRAINT ").ident(name);
    sql.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableName {
        TableName::new("Sales", "order lines")
    }

    #[test]
    fn constraints_are_dropped_added_and_validated_by_quoted_name() {
        assert_eq!(
            drop_constraint(&table(), "fk\"x"),
            "ALTER TABLE \"Sales\".\"order lines\" DROP CONSTRAINT IF EXISTS \"fk\"\"x\""
        );
        assert_eq!(
            add_constraint(&table(), "c", "CHECK ((n > 0))", true),
            "ALTER TABLE \"Sales\".\"order lines\" ADD CONSTRAINT \"c\" CHECK ((n > 0)) NOT VALID"
        );
        assert_eq!(
            add_constraint(&table(), "c", "CHECK ((n > 0))", false),
            "ALTER TABLE \"Sales\".\"order lines\" ADD CONSTRAINT \"c\" CHECK ((n > 0))"
        );
        assert_eq!(
            validate_constraint(&table(), "c"),
            "ALTER TABLE \"Sales\".\"order lines\" VALIDATE CONSTRAINT \"c\""
        );
    }

    #[test]
    fn a_key_is_attached_to_its_index_with_its_deferral() {
        assert_eq!(
            attach_key(&table(), "pk", "PRIMARY KEY (id)", "pk_idx"),
            "ALTER TABLE \"Sales\".\"order lines\" ADD CONSTRAINT \"pk\" PRIMARY KEY USING INDEX \"pk_idx\""
        );
        assert!(
            attach_key(
                &table(),
                "u",
                "UNIQUE (a) DEFERRABLE INITIALLY DEFERRED",
                "u_idx"
            )
            .ends_with(" UNIQUE USING INDEX \"u_idx\" DEFERRABLE INITIALLY DEFERRED")
        );
        assert!(
            attach_key(&table(), "u", "UNIQUE (a) DEFERRABLE", "u_idx")
                .ends_with(" USING INDEX \"u_idx\" DEFERRABLE")
        );
    }

    #[test]
    fn index_builds_are_idempotent_and_reach_partitions() {
        assert_eq!(
            build_index("CREATE INDEX i ON ONLY public.p USING btree (a)"),
            "CREATE INDEX IF NOT EXISTS i ON public.p USING btree (a)"
        );
        assert_eq!(
            build_index("CREATE UNIQUE INDEX k ON public.t USING btree (id)"),
            "CREATE UNIQUE INDEX IF NOT EXISTS k ON public.t USING btree (id)"
        );
        assert_eq!(
            drop_index_in("Sales", "k"),
            "DROP INDEX IF EXISTS \"Sales\".\"k\""
        );
        assert_eq!(
            drop_index("\"Sales\".i"),
            "DROP INDEX IF EXISTS \"Sales\".i"
        );
    }
}
