//! The dataset: its schema (created on both servers, the target's before
//! every contestant) and its rows (on the source, from a seed).
//!
//! Every value derives from `hashint8extended(row number, seed)`, so the
//! same seed and size give the same rows on every run.

/// The tables the snapshot copy moves.
pub const COPY_TABLES: &[&str] = &["beneficiaries", "documents", "payments"];

/// The tables of the apply and lag scenarios: the written table and the
/// marker table that times catch-up and lag.
pub const STREAM_TABLES: &[&str] = &["beneficiaries", "bench_marker"];

/// The tables of the large-transaction scenario.
pub const BULK_TABLES: &[&str] = &["bench_bulk", "bench_marker"];

/// Every table of the schema, dropped before it is created again.
pub const ALL_TABLES: &[&str] = &[
    "payments",
    "documents",
    "beneficiaries",
    "bench_marker",
    "bench_bulk",
];

/// The schema, identical on both servers. `documents.body` is stored out
/// of line uncompressed (`EXTERNAL`), so its ~2 KB values are TOASTed.
pub const SCHEMA: &str = "
CREATE TABLE beneficiaries (
    id bigint PRIMARY KEY,
    beneficiary_name text NOT NULL,
    registration_date date NOT NULL,
    location_code text NOT NULL,
    programme_id int NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX beneficiaries_programme_id ON beneficiaries (programme_id);
CREATE TABLE documents (
    id bigint PRIMARY KEY,
    beneficiary_id bigint NOT NULL,
    body text NOT NULL
);
ALTER TABLE documents ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE payments (
    id bigint PRIMARY KEY,
    beneficiary_id bigint NOT NULL REFERENCES beneficiaries (id),
    amount numeric(12,2) NOT NULL,
    paid_on date NOT NULL
);
CREATE INDEX payments_beneficiary_id ON payments (beneficiary_id);
CREATE TABLE bench_marker (id bigint PRIMARY KEY, sent_at timestamptz NOT NULL);
CREATE TABLE bench_bulk (id bigint PRIMARY KEY, payload text NOT NULL);
";

/// Drops every benchmark table (the target's schema is recreated before
/// each contestant).
pub fn drop_schema() -> String {
    format!("DROP TABLE IF EXISTS {} CASCADE;", ALL_TABLES.join(", "))
}

/// Row counts of the dataset for `rows` beneficiaries.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// `beneficiaries` rows.
    pub beneficiaries: i64,
    /// `documents` rows (~2 KB each): a tenth.
    pub documents: i64,
    /// `payments` rows, each referencing a beneficiary of the lower half: a half.
    pub payments: i64,
}

impl Sizes {
    /// The sizes for `rows` beneficiaries.
    pub fn for_rows(rows: i64) -> Sizes {
        Sizes {
            beneficiaries: rows,
            documents: (rows / 10).max(1),
            payments: (rows / 2).max(1),
        }
    }
}

/// A non-negative 63-bit hash of `expr` under `seed`, as SQL.
fn hash(expr: &str, seed: i64) -> String {
    format!("(hashint8extended({expr}, {seed}) & 9223372036854775807)")
}

/// The statements that fill the source, in order.
pub fn generate(sizes: Sizes, seed: i64) -> Vec<(&'static str, String)> {
    let b = sizes.beneficiaries;
    let half = (b / 2).max(1);
    vec![
        (
            "beneficiaries",
            format!(
                "INSERT INTO beneficiaries
                 SELECT g,
                        (ARRAY['Amina','Bashir','Chloe','Dawit','Elena','Farah','Goran','Hana',
                               'Ibrahim','Jana','Kofi','Leila','Marco','Nadia','Omar','Priya'])[1 + (h & 15)]
                        || ' ' ||
                        (ARRAY['Abebe','Berisha','Costa','Diallo','Eriksen','Fofana','Garcia','Haddad',
                               'Ivanova','Jovanovic','Kamau','Lopez','Mensah','Nguyen','Okafor','Petrov'])[1 + ((h >> 4) & 15)]
                        || ' ' || to_hex(h >> 32),
                        date '2015-01-01' + ((h >> 8) & 4095)::int,
                        'LOC-' || lpad(((h >> 20) % 5000)::text, 4, '0'),
                        1 + ((h >> 36) % 200)::int,
                        timestamptz '2020-01-01 00:00:00+00' + ((h >> 12) & 134217727) * interval '1 second',
                        timestamptz '2020-01-01 00:00:00+00' + ((h >> 12) & 134217727) * interval '1 second'
                          + ((h >> 44) & 65535) * interval '1 minute'
                 FROM (SELECT g, {h} AS h FROM generate_series(1, {b}) g) s",
                h = hash("g", seed),
            ),
        ),
        (
            "documents",
            format!(
                "WITH pool AS (
                     SELECT string_agg(md5({seed}::text || ':' || i), '' ORDER BY i) AS p
                     FROM generate_series(1, 2000) i)
                 INSERT INTO documents
                 SELECT g, 1 + (h % {b}), substr(p, 1 + (h % 60000)::int, 2100)
                 FROM pool, (SELECT g, {h} AS h FROM generate_series(1, {d}) g) s",
                d = sizes.documents,
                h = hash("g", seed + 1),
            ),
        ),
        (
            "payments",
            format!(
                "INSERT INTO payments
                 SELECT g, 1 + (h % {half}), ((h >> 16) % 100000) / 100.0,
                        date '2020-01-01' + ((h >> 40) % 1500)::int
                 FROM (SELECT g, {h} AS h FROM generate_series(1, {p}) g) s",
                p = sizes.payments,
                h = hash("g", seed + 2),
            ),
        ),
        (
            "vacuum",
            // Hint bits and the visibility map set once, here, so that no
            // contestant pays for them.
            "VACUUM (FREEZE, ANALYZE) beneficiaries, documents, payments".to_owned(),
        ),
    ]
}

/// The backlog generator on the source: `changes` single-row changes of
/// `beneficiaries`, a third each inserts, updates and deletes, interleaved,
/// committed every `per_txn` changes. Each statement must touch exactly
/// one row, so the backlog holds exactly `changes` changes.
///
/// Inserts take fresh ids from `insert_from`; updates walk up from id 1
/// (distinct keys within one backlog); deletes walk down from
/// `delete_from`, above every id that `payments` references.
pub const BACKLOG_PROCEDURE: &str = "
CREATE OR REPLACE PROCEDURE bench_backlog(changes bigint, per_txn int, insert_from bigint,
                                          update_span bigint, delete_from bigint, seed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint := 0;
    k bigint;
    h bigint;
    touched bigint;
BEGIN
    WHILE i < changes LOOP
        k := i / 3;
        h := hashint8extended(i, seed) & 9223372036854775807;
        CASE i % 3
            WHEN 0 THEN
                INSERT INTO beneficiaries VALUES (
                    insert_from + k, 'Backlog ' || to_hex(h), date '2024-01-01' + (h % 365)::int,
                    'LOC-' || lpad((h % 5000)::text, 4, '0'), 1 + (h % 200)::int, now(), now());
            WHEN 1 THEN
                UPDATE beneficiaries
                   SET programme_id = 1 + (h % 200)::int,
                       location_code = 'LOC-' || lpad(((h >> 13) % 5000)::text, 4, '0'),
                       updated_at = now()
                 WHERE id = 1 + (k % update_span);
            ELSE
                DELETE FROM beneficiaries WHERE id = delete_from - k;
        END CASE;
        GET DIAGNOSTICS touched = ROW_COUNT;
        IF touched <> 1 THEN
            RAISE EXCEPTION 'backlog change % touched % rows', i, touched;
        END IF;
        i := i + 1;
        IF i % per_txn = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
    COMMIT;
END $$;
";

/// The largest backlog that four rounds (apply-1 and apply-100, each for
/// cutover and native) can delete from the upper half of `rows` without
/// running out: 4 × changes/3 ≤ rows/2.
pub fn max_changes(rows: i64) -> i64 {
    (rows * 3 / 8).max(3)
}

/// The arguments of `CALL bench_backlog(...)` for backlog number `round`.
pub fn backlog_call(rows: i64, changes: i64, per_txn: i64, round: i64, seed: i64) -> String {
    let per_kind = changes.div_ceil(3);
    let insert_from = rows + 1 + round * per_kind;
    let delete_from = rows - round * per_kind;
    let update_span = (rows / 2).max(1);
    format!(
        "CALL bench_backlog({changes}, {per_txn}, {insert_from}, {update_span}, {delete_from}, {})",
        seed + 100 + round
    )
}

/// The `pgbench` script of the lag scenario: single-row updates of the
/// lower half of `beneficiaries`.
pub fn pgbench_script(rows: i64) -> String {
    format!(
        "\\set id random(1, {})\nUPDATE beneficiaries SET updated_at = now(), programme_id = 1 + :id % 200 WHERE id = :id;\n",
        (rows / 2).max(1)
    )
}

/// The single large transaction of the memory scenario: rows of 1,000
/// bytes of text, `mb` MiB of them.
pub fn bulk_insert(mb: i64) -> (i64, String) {
    let rows = (mb * 1024 * 1024 / 1000).max(1);
    (
        rows,
        format!(
            "INSERT INTO bench_bulk SELECT g, rpad(md5(g::text), 1000, md5((g + 1)::text)) FROM generate_series(1, {rows}) g"
        ),
    )
}
