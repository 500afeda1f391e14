//! The dataset: its schema (created on both servers, the target's before
//! every contestant) and its rows (on the source, from a seed).
//!
//! Every value derives from `hashint8extended(row number, seed)`, so the
//! same seed and size give the same rows on every run.

/// The tables the snapshot copy moves.
pub const COPY_TABLES: &[&str] = &["beneficiaries", "documents", "payments"];

/// The tables of the apply and lag scenarios: the written table (shaped
/// like `beneficiaries`) and the marker table that times catch-up.
pub const STREAM_TABLES: &[&str] = &["bench_stream", "bench_marker"];

/// The tables of the large-transaction scenario.
pub const BULK_TABLES: &[&str] = &["bench_bulk", "bench_marker"];

/// Every table of the schema, dropped before it is created again.
pub const ALL_TABLES: &[&str] = &[
    "payments",
    "documents",
    "beneficiaries",
    "bench_marker",
    "bench_bulk",
    "bench_stream",
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
CREATE TABLE bench_stream (LIKE beneficiaries INCLUDING ALL);
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

/// Run once on the target before any contestant. A fresh cluster creates
/// each WAL segment, and writes it full of zeros, the first time it needs
/// it; later loads reuse the segments a checkpoint recycled. Without this,
/// whoever loads the target first pays for about 30 new segments (seen:
/// `cutover copy` 6.5 to 8.4 s in that place, 3.6 to 3.9 s in any other).
/// About 800 MB of WAL, more than any contestant writes between two
/// checkpoints; the checkpoint before the first contestant
/// (`Bench::settle`) recycles it,
/// so that every contestant finds its segments ready.
pub const WAL_WARMUP: &str = "
CREATE TABLE bench_wal_warmup AS
    SELECT repeat('w', 1000) AS filler FROM generate_series(1, 750000);
DROP TABLE bench_wal_warmup;";

/// Fills `bench_stream` on the source with `rows` rows (ids `1..=rows`),
/// the beneficiaries' over again when there are fewer of them: the rows
/// the backlog updates and deletes.
pub fn stream_seed(rows: i64) -> String {
    format!(
        "INSERT INTO bench_stream
         SELECT g, b.beneficiary_name, b.registration_date, b.location_code, b.programme_id,
                b.created_at, b.updated_at
           FROM generate_series(1, {rows}) g
           JOIN beneficiaries b
             ON b.id = 1 + (g - 1) % (SELECT count(*) FROM beneficiaries)"
    )
}

/// The backlog generator on the source: `changes` single-row changes of
/// `bench_stream`, a third each inserts, updates and deletes, interleaved,
/// committed every `per_txn` changes. `bench_stream` holds ids
/// `1..=seeded` with `seeded >= changes`: inserts take fresh ids above,
/// updates walk up from 1 and deletes walk down from `seeded`, so no
/// statement meets a row another one removed. Each statement must touch
/// exactly one row, so the backlog holds exactly `changes` changes.
pub const BACKLOG_PROCEDURE: &str = "
CREATE OR REPLACE PROCEDURE bench_backlog(changes bigint, per_txn int, seeded bigint, seed bigint)
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
                INSERT INTO bench_stream VALUES (
                    seeded + 1 + k, 'Backlog ' || to_hex(h), date '2024-01-01' + (h % 365)::int,
                    'LOC-' || lpad((h % 5000)::text, 4, '0'), 1 + (h % 200)::int, now(), now());
            WHEN 1 THEN
                UPDATE bench_stream
                   SET programme_id = 1 + (h % 200)::int,
                       location_code = 'LOC-' || lpad(((h >> 13) % 5000)::text, 4, '0'),
                       updated_at = now()
                 WHERE id = 1 + k;
            ELSE
                DELETE FROM bench_stream WHERE id = seeded - k;
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

/// `CALL bench_backlog(...)`.
pub fn backlog_call(changes: i64, per_txn: i64, seeded: i64, seed: i64) -> String {
    format!("CALL bench_backlog({changes}, {per_txn}, {seeded}, {seed})")
}

/// The `pgbench` script of the lag scenario: single-row updates of the
/// `seeded` rows of `bench_stream`.
pub fn pgbench_script(seeded: i64) -> String {
    format!(
        "\\set id random(1, {seeded})\nUPDATE bench_stream SET updated_at = now(), programme_id = 1 + :id % 200 WHERE id = :id;\n"
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
