//! `cutover check` against real servers: it names what blocks a migration,
//! says how to fix it, exits 1 until it is fixed and 0 after, and never
//! shows a password.

use cutover_tests::{Cluster, ClusterOptions, Outcome, Pair, run_cutover, write_config};
use serde_json::Value;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    /// A config whose servers are given as written; state and listeners
    /// are kept out of the way.
    fn config(&self, source_url: &str, target_url: &str, extra: &str) -> String {
        let state = self.dir.path().join("state");
        let text = format!(
            "[source]\nurl = \"{source_url}\"\n[target]\nurl = \"{target_url}\"\n[state]\ndir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n{extra}",
            state.display()
        );
        write_config(self.dir.path(), &text).display().to_string()
    }

    /// [`Setup::config`] for both servers of `pair`, as superuser over TCP.
    fn pair_config(&self, pair: &Pair) -> String {
        self.config(
            &pair.source.url("app", "postgres", None),
            &pair.target.url("app", "postgres", None),
            "",
        )
    }

    fn check(&self, config: &str, args: &[&str], env: &[(&str, &str)]) -> Outcome {
        let mut all = vec!["--config", config, "check"];
        all.extend_from_slice(args);
        run_cutover(&all, env)
    }
}

fn json(outcome: &Outcome) -> Value {
    serde_json::from_str(&outcome.stdout).unwrap_or_else(|e| {
        panic!(
            "check --format json printed no JSON ({e}):\n{}\n{}",
            outcome.stdout, outcome.stderr
        )
    })
}

fn finding<'a>(report: &'a Value, code: &str, subject: &str) -> Option<&'a Value> {
    report["findings"]
        .as_array()
        .expect("findings is a list")
        .iter()
        .find(|f| f["code"] == code && f["subject"] == subject)
}

#[tokio::test]
async fn check_names_a_keyless_table_and_a_missing_column_then_passes_after_the_fixes() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.source
        .execute(
            "app",
            "CREATE TABLE orders (id bigint PRIMARY KEY, note text, amount numeric(10,2));
             CREATE TABLE audit (at timestamptz, msg text);
             INSERT INTO orders SELECT g, 'n', g FROM generate_series(1, 100) g;
             CREATE SEQUENCE invoice_no;",
        )
        .await;
    pair.target
        .execute(
            "app",
            "CREATE TABLE orders (id bigint PRIMARY KEY, note text);
             CREATE TABLE audit (at timestamptz, msg text);
             CREATE SEQUENCE invoice_no;",
        )
        .await;
    let setup = Setup::new();
    let config = setup.pair_config(&pair);
    // A keyless table blocks only when the config refuses keyless tables
    // (the default streams its inserts: see the schemas tests).
    let refuse = [("CUTOVER__REPLICATION__KEYLESS", "refuse")];

    let human = setup.check(&config, &[], &refuse);
    assert_eq!(
        human.code, 1,
        "blocking findings exit 1:\n{}{}",
        human.stdout, human.stderr
    );
    assert!(
        human
            .stdout
            .contains("public.audit: no primary key and REPLICA IDENTITY DEFAULT"),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("REPLICA IDENTITY FULL;"),
        "the fix is given:\n{}",
        human.stdout
    );
    assert!(
        human.stdout.contains(
            "public.orders.amount: the column amount (numeric(10,2)) is missing on the target"
        ),
        "{}",
        human.stdout
    );
    assert!(
        human
            .stdout
            .contains("ALTER TABLE \"public\".\"orders\" ADD COLUMN \"amount\" numeric(10,2);"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("2 blocking"), "{}", human.stdout);

    let report = json(&setup.check(&config, &["--format", "json"], &refuse));
    assert_eq!(report["blocking"], 2, "{report:#}");
    assert!(
        finding(&report, "no_replica_identity", "public.audit").is_some(),
        "{report:#}"
    );
    assert!(
        finding(&report, "missing_column", "public.orders.amount").is_some(),
        "{report:#}"
    );
    assert_eq!(report["source"]["wal_level"], "logical");
    let tables: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["audit", "orders"]);
    let sequences: Vec<&str> = report["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(sequences, ["invoice_no"]);

    pair.source
        .execute("app", "ALTER TABLE audit REPLICA IDENTITY FULL")
        .await;
    pair.target
        .execute("app", "ALTER TABLE orders ADD COLUMN amount numeric(10,2)")
        .await;
    let fixed = setup.check(&config, &["--count"], &refuse);
    assert_eq!(
        fixed.code, 0,
        "nothing blocks after the fixes:\n{}{}",
        fixed.stdout, fixed.stderr
    );
    assert!(fixed.stdout.contains("0 blocking"), "{}", fixed.stdout);
    assert!(
        fixed.stdout.contains("100 rows"),
        "--count counts exactly:\n{}",
        fixed.stdout
    );
    assert!(
        fixed.stdout.contains("replica identity FULL"),
        "{}",
        fixed.stdout
    );
}

#[tokio::test]
async fn check_flags_type_key_and_server_setting_problems() {
    let source = Cluster::start_with(ClusterOptions::default().wal_level("replica"));
    let target = Cluster::start();
    source.create_database("app").await;
    target.create_database("app").await;
    source
        .execute(
            "app",
            "CREATE TABLE items (id int PRIMARY KEY, code varchar(40), qty bigint)",
        )
        .await;
    target
        .execute("app", "CREATE TABLE items (id int, code varchar(10), qty bigint); INSERT INTO items VALUES (1, 'x', 1)")
        .await;
    let setup = Setup::new();
    let config = setup.config(
        &source.url("app", "postgres", None),
        &target.url("app", "postgres", None),
        "[replication]\ntables = [\"public.*\", \"sales.*\"]\n",
    );
    let outcome = setup.check(&config, &["--format", "json"], &[]);
    assert_eq!(outcome.code, 1);
    let report = json(&outcome);
    let wal = finding(&report, "wal_level", "wal_level").expect("wal_level finding");
    assert_eq!(wal["severity"], "blocking");
    assert!(
        wal["fix"]
            .as_str()
            .unwrap()
            .contains("ALTER SYSTEM SET wal_level = logical")
    );
    assert!(
        finding(&report, "incompatible_type", "public.items.code").is_some(),
        "{report:#}"
    );
    assert!(
        finding(&report, "target_key_mismatch", "public.items").is_some(),
        "{report:#}"
    );
    assert!(
        finding(&report, "target_not_empty", "public.items").is_some(),
        "{report:#}"
    );
    let unmatched = finding(&report, "pattern_matches_nothing", "replication.tables")
        .expect("unmatched pattern");
    assert!(
        unmatched["problem"]
            .as_str()
            .unwrap()
            .contains("\"sales.*\""),
        "{unmatched}"
    );
}

#[tokio::test]
async fn check_reports_unreachable_servers_and_missing_databases_in_one_line_each() {
    let source = Cluster::start();
    let setup = Setup::new();
    // A port nobody listens on: bind, note, release.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = setup.config(
        &source.url("nosuchdb", "postgres", None),
        &format!("postgres://postgres@127.0.0.1:{closed}/app?sslmode=disable"),
        "",
    );
    let outcome = setup.check(&config, &[], &[]);
    assert_eq!(outcome.code, 1);
    let line = |needle: &str| {
        outcome
            .stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{}", outcome.stdout))
            .to_owned()
    };
    let missing_db = line("source source.url");
    assert!(
        missing_db.contains("database \"nosuchdb\" does not exist"),
        "{missing_db}"
    );
    assert!(
        outcome.stdout.contains("create database \"nosuchdb\""),
        "{}",
        outcome.stdout
    );
    let unreachable = line("target target.url");
    assert!(
        unreachable.contains(&format!("127.0.0.1:{closed}/app")),
        "{unreachable}"
    );
    assert!(
        outcome.stdout.contains("is the server running"),
        "{}",
        outcome.stdout
    );
    assert!(!outcome.stderr.contains("panicked"), "{}", outcome.stderr);
}

#[tokio::test]
async fn config_mistakes_give_one_line_errors_naming_the_key() {
    let setup = Setup::new();
    let good = "postgres://u@127.0.0.1:1/app";

    let misspelled = setup.config(
        good,
        "postgres://u@127.0.0.1:2/app",
        "[replication]\nslott = \"x\"\n",
    );
    let outcome = setup.check(&misspelled, &[], &[]);
    assert_eq!(outcome.code, 2, "{outcome:?}");
    assert_eq!(
        outcome.stderr.trim().lines().count(),
        1,
        "one line: {}",
        outcome.stderr
    );
    assert!(
        outcome
            .stderr
            .contains("unknown config key replication.slott"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("did you mean replication.slot?"),
        "{}",
        outcome.stderr
    );

    let env_typo = setup.config(good, "postgres://u@127.0.0.1:2/app", "");
    let outcome = setup.check(&env_typo, &[], &[("CUTOVER__TARGET__URLL", "x")]);
    assert_eq!(outcome.code, 2, "{outcome:?}");
    assert!(
        outcome.stderr.contains("CUTOVER__TARGET__URLL"),
        "{}",
        outcome.stderr
    );

    let malformed = setup.config("postgres://u:hunter2@127.0.0.1:notaport/app", good, "");
    let outcome = setup.check(&malformed, &[], &[]);
    assert_eq!(outcome.code, 2, "{outcome:?}");
    assert_eq!(
        outcome.stderr.trim().lines().count(),
        1,
        "one line: {}",
        outcome.stderr
    );
    assert!(outcome.stderr.contains("source.url"), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("invalid port"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("hunter2"), "{}", outcome.stderr);

    let outcome = run_cutover(&["--config", "/nonexistent/cutover.toml", "check"], &[]);
    assert_eq!(outcome.code, 2);
    assert!(
        outcome.stderr.contains("/nonexistent/cutover.toml"),
        "{}",
        outcome.stderr
    );
}

#[tokio::test]
async fn passwords_from_the_url_the_environment_and_a_file_never_appear_in_any_output() {
    const URL_PASSWORD: &str = "Url-Secret-4471";
    const ENV_PASSWORD: &str = "Env-Secret-5582";
    const FILE_PASSWORD: &str = "File-Secret-6693";
    const WRONG_PASSWORD: &str = "Wrong-Secret-7704";
    let pair = Pair::start(ClusterOptions::default().password_auth()).await;
    pair.source
        .execute(
            "app",
            &format!("CREATE ROLE migrator LOGIN REPLICATION PASSWORD '{URL_PASSWORD}'; CREATE TABLE t (id int PRIMARY KEY)"),
        )
        .await;
    pair.target
        .execute(
            "app",
            &format!("CREATE ROLE migrator LOGIN PASSWORD '{ENV_PASSWORD}'; CREATE TABLE t (id int PRIMARY KEY)"),
        )
        .await;
    let setup = Setup::new();
    let secret_file = setup.dir.path().join("target-password");
    std::fs::write(&secret_file, format!("{FILE_PASSWORD}\n")).unwrap();

    let source_url = pair.source.url("app", "migrator", Some(URL_PASSWORD));
    let target_url = pair.target.url("app", "migrator", None);
    let via_env = setup.config(&source_url, &target_url, "");
    let env = [("CUTOVER__TARGET__PASSWORD", ENV_PASSWORD)];
    let mut outputs = Vec::new();
    for format in ["human", "json"] {
        let outcome = setup.check(&via_env, &["--format", format], &env);
        outputs.push(run_cutover(
            &[
                "--config",
                &via_env,
                "--log-level",
                "trace",
                "check",
                "--format",
                format,
            ],
            &env,
        ));
        outputs.push(run_cutover(
            &[
                "--config",
                &via_env,
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "check",
            ],
            &env,
        ));
        if format == "json" {
            let report = json(&outcome);
            assert_eq!(
                report["source"]["connected"], true,
                "the URL password authenticated: {report:#}"
            );
            assert_eq!(
                report["target"]["connected"], true,
                "the environment password authenticated: {report:#}"
            );
        }
        outputs.push(outcome);
    }

    // The target's password from a file: set the role's password to it first.
    pair.target
        .execute(
            "app",
            &format!("ALTER ROLE migrator PASSWORD '{FILE_PASSWORD}'"),
        )
        .await;
    let via_file = setup.config(&source_url, &target_url, "");
    let text = std::fs::read_to_string(&via_file).unwrap().replace(
        &format!("url = \"{target_url}\""),
        &format!(
            "url = \"{target_url}\"\npassword_file = \"{}\"",
            secret_file.display()
        ),
    );
    std::fs::write(&via_file, text).unwrap();
    let outcome = setup.check(&via_file, &["--format", "json"], &[]);
    assert_eq!(
        json(&outcome)["target"]["connected"],
        true,
        "the file password authenticated"
    );
    outputs.push(outcome);
    outputs.push(run_cutover(
        &["--config", &via_file, "--log-level", "trace", "check"],
        &[],
    ));

    // A wrong password: an error naming the failure, not the password.
    let wrong = setup.config(
        &pair.source.url("app", "migrator", Some(WRONG_PASSWORD)),
        &target_url,
        "",
    );
    let outcome = run_cutover(
        &["--config", &wrong, "--log-level", "trace", "check"],
        &[("CUTOVER__TARGET__PASSWORD", WRONG_PASSWORD)],
    );
    assert_eq!(outcome.code, 1);
    assert!(
        outcome.stdout.contains("password authentication failed"),
        "{}",
        outcome.stdout
    );
    outputs.push(outcome);

    for outcome in &outputs {
        let all = outcome.all_output();
        for secret in [URL_PASSWORD, ENV_PASSWORD, FILE_PASSWORD, WRONG_PASSWORD] {
            assert!(
                !all.contains(secret),
                "a password leaked into the output:\n{all}"
            );
        }
    }
}

#[tokio::test]
async fn a_filtered_publication_of_the_configured_name_blocks_check_and_run() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE orders (id bigint PRIMARY KEY, status text);")
        .await;
    // Someone else's publication under cutover's name: inserts only, and
    // only the open orders. Reusing it would drop every other change.
    pair.source
        .execute(
            "app",
            "CREATE PUBLICATION cutover FOR TABLE orders WHERE (status = 'open') WITH (publish = 'insert')",
        )
        .await;
    let setup = Setup::new();
    let config = setup.pair_config(&pair);
    let outcome = setup.check(&config, &["--format", "json"], &[]);
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    let report = json(&outcome);
    let found = finding(&report, "publication_filtered", "publication cutover")
        .unwrap_or_else(|| panic!("no publication_filtered finding: {report}"));
    let problem = found["problem"].as_str().unwrap();
    assert!(problem.contains("update, delete, truncate"), "{problem}");
    assert!(problem.contains("row filter"), "{problem}");

    let run = run_cutover(&["--config", &config, "run"], &[]);
    assert_eq!(run.code, 1, "{}", run.all_output());
    assert!(
        run.stderr
            .contains("publication \"cutover\" exists but would not send every change"),
        "{}",
        run.stderr
    );
    // Nothing was copied from a stream that would have been incomplete.
    let copied: i64 = pair
        .source
        .query_value("app", "SELECT count(*) FROM pg_replication_slots")
        .await;
    assert_eq!(copied, 0, "a slot was created for a refused publication");

    // Fixed as the finding says, both pass.
    pair.source
        .execute(
            "app",
            "ALTER PUBLICATION cutover SET TABLE orders; ALTER PUBLICATION cutover SET (publish = 'insert, update, delete, truncate')",
        )
        .await;
    let outcome = setup.check(&config, &[], &[]);
    assert_eq!(outcome.code, 0, "{}", outcome.all_output());
}

#[tokio::test]
async fn a_full_slot_table_blocks_only_when_the_configured_slot_must_be_created() {
    let pair = Pair::start(ClusterOptions::default().setting("max_replication_slots", "3")).await;
    pair.both("CREATE TABLE orders (id bigint PRIMARY KEY, status text);")
        .await;
    // Every slot taken, one of them cutover's own (an earlier run's): it
    // is reused, so nothing blocks.
    pair.source
        .execute(
            "app",
            "SELECT pg_create_physical_replication_slot('filler_1');
             SELECT pg_create_physical_replication_slot('filler_2');
             SELECT pg_create_logical_replication_slot('cutover', 'pgoutput');",
        )
        .await;
    let setup = Setup::new();
    let config = setup.pair_config(&pair);
    let outcome = setup.check(&config, &["--format", "json"], &[]);
    let report = json(&outcome);
    assert!(
        finding(&report, "no_free_slot", "max_replication_slots").is_none(),
        "the configured slot exists, yet: {report}"
    );
    assert_eq!(outcome.code, 0, "{}", outcome.all_output());

    // The same count without cutover's slot: a new one has no place.
    pair.source
        .execute(
            "app",
            "SELECT pg_drop_replication_slot('cutover');
             SELECT pg_create_physical_replication_slot('filler_3');",
        )
        .await;
    let outcome = setup.check(&config, &["--format", "json"], &[]);
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    let report = json(&outcome);
    let found = finding(&report, "no_free_slot", "max_replication_slots")
        .unwrap_or_else(|| panic!("no no_free_slot finding: {report}"));
    let problem = found["problem"].as_str().unwrap();
    assert!(problem.contains("all 3 replication slots"), "{problem}");
    assert!(
        found["fix"]
            .as_str()
            .unwrap()
            .contains("max_replication_slots = 5"),
        "{found}"
    );
}

#[tokio::test]
async fn a_target_cloned_from_the_source_is_told_apart_from_the_same_database() {
    let mut source = cutover_tests::Cluster::start();
    source.create_database("app").await;
    source
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);",
        )
        .await;
    // A restored base backup: the same system identifier, another server.
    let clone = source.clone_server();
    let setup = Setup::new();
    let cloned = setup.config(
        &source.url("app", "postgres", None),
        &clone.url("app", "postgres", None),
        "",
    );
    let report = json(&setup.check(&cloned, &["--format", "json"], &[]));
    assert!(
        finding(&report, "same_database", "target.url").is_none(),
        "a clone is another server: {report:#}"
    );
    let warning = finding(&report, "target_cloned_from_source", "target.url")
        .unwrap_or_else(|| panic!("the clone is named: {report:#}"));
    assert_eq!(warning["severity"], "warning", "{report:#}");
    // The same database reached another way (its unix socket) blocks.
    let same = setup.config(
        &source.url("app", "postgres", None),
        &format!(
            "host={} port={} dbname=app user=postgres",
            source.socket_dir().display(),
            source.port()
        ),
        "",
    );
    let outcome = setup.check(&same, &["--format", "json"], &[]);
    assert_eq!(outcome.code, 1, "{}", outcome.all_output());
    let report = json(&outcome);
    assert!(
        finding(&report, "same_database", "target.url").is_some(),
        "{report:#}"
    );
}

#[tokio::test]
async fn groups_put_each_table_in_one_group_and_foreign_keys_across_groups_are_reported() {
    let pair = Pair::start(ClusterOptions::default()).await;
    let schema = "
CREATE SCHEMA billing;
CREATE TABLE public.beneficiaries (id int PRIMARY KEY, name text);
CREATE TABLE billing.payments (id int PRIMARY KEY, beneficiary_id int REFERENCES public.beneficiaries (id));
CREATE TABLE billing.invoices (id int PRIMARY KEY, payment_id int REFERENCES billing.payments (id));
CREATE TABLE public.audit (id int PRIMARY KEY);";
    pair.both(schema).await;
    let setup = Setup::new();
    let with_groups = |groups: &str| {
        setup.config(
            &pair.source.url("app", "postgres", None),
            &pair.target.url("app", "postgres", None),
            &format!("[replication]\ntables = [\"public.*\", \"billing.*\"]\n{groups}"),
        )
    };

    // Two groups and the default: the key from billing.payments to
    // public.beneficiaries crosses groups, the one inside billing does not.
    let config = with_groups(
        "[[group]]\nname = \"billing\"\ntables = [\"billing.*\"]\n[[group]]\nname = \"registrations\"\ntables = [\"public.beneficiaries\"]\n",
    );
    let outcome = setup.check(&config, &["--format", "json"], &[]);
    let report = json(&outcome);
    assert_eq!(outcome.code, 0, "{report:#}");
    let group_of = |table: &str| {
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| {
                format!(
                    "{}.{}",
                    t["name"]["schema"].as_str().unwrap(),
                    t["name"]["name"].as_str().unwrap()
                ) == table
            })
            .map(|t| t["group"].clone())
            .unwrap_or_else(|| panic!("{table} in {report:#}"))
    };
    assert_eq!(group_of("billing.payments"), "billing");
    assert_eq!(group_of("public.beneficiaries"), "registrations");
    assert_eq!(group_of("public.audit"), "default");
    let crossing = finding(&report, "foreign_key_between_groups", "billing.payments")
        .expect("the key across groups");
    assert_eq!(crossing["severity"], "warning");
    let problem = crossing["problem"].as_str().unwrap();
    assert!(
        problem.contains(
            "(group \"billing\") references public.beneficiaries (group \"registrations\")"
        ),
        "{problem}"
    );
    assert!(
        finding(&report, "foreign_key_between_groups", "billing.invoices").is_none(),
        "{report:#}"
    );
    let human = setup.check(&config, &[], &[]).stdout;
    assert!(human.contains("group billing"), "{human}");

    // A table two groups claim, and a pattern that matches nothing.
    let config = with_groups(
        "[[group]]\nname = \"billing\"\ntables = [\"billing.*\", \"billing.refunds\"]\n[[group]]\nname = \"everything_public\"\ntables = [\"public.*\", \"billing.invoices\"]\n",
    );
    let outcome = setup.check(&config, &["--format", "json"], &[]);
    let report = json(&outcome);
    assert_eq!(outcome.code, 1, "{report:#}");
    let two =
        finding(&report, "table_in_two_groups", "billing.invoices").expect("a table in two groups");
    assert!(
        two["problem"]
            .as_str()
            .unwrap()
            .contains("in group \"billing\" and in group \"everything_public\""),
        "{two}"
    );
    let nothing = finding(
        &report,
        "group_pattern_matches_nothing",
        "group[0].tables[1]",
    )
    .expect("a pattern that matches nothing");
    assert!(
        nothing["problem"]
            .as_str()
            .unwrap()
            .contains("billing.refunds"),
        "{nothing}"
    );

    // Mistakes in the groups themselves stop before any server is asked.
    for (groups, key) in [
        ("[[group]]\ntables = [\"billing.*\"]\n", "group[0].name"),
        (
            "[[group]]\nname = \"billing\"\ntable = [\"billing.*\"]\n",
            "group[0].table",
        ),
        (
            "[[group]]\nname = \"default\"\ntables = [\"billing.*\"]\n",
            "group[0].name",
        ),
        ("[group]\nname = \"billing\"\n", "group"),
    ] {
        let outcome = setup.check(&with_groups(groups), &[], &[]);
        assert_eq!(outcome.code, 2, "{groups}: {outcome:?}");
        assert!(outcome.stderr.contains(key), "{groups}: {}", outcome.stderr);
        assert_eq!(
            outcome.stderr.trim().lines().count(),
            1,
            "{}",
            outcome.stderr
        );
    }
}

#[tokio::test]
async fn with_groups_the_target_must_stream_from_the_start() {
    let source = Cluster::start();
    let target = Cluster::start_with(ClusterOptions::default().wal_level("replica"));
    source.create_database("app").await;
    target.create_database("app").await;
    for cluster in [&source, &target] {
        cluster
            .execute("app", "CREATE TABLE items (id int PRIMARY KEY)")
            .await;
    }
    let setup = Setup::new();
    let config = |groups: &str| {
        setup.config(
            &source.url("app", "postgres", None),
            &target.url("app", "postgres", None),
            groups,
        )
    };
    let severity = |outcome: &Outcome| {
        let report = json(outcome);
        let finding = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["code"] == "wal_level" && f["server"] == "target")
            .cloned()
            .unwrap_or_else(|| panic!("a wal_level finding on the target in {report:#}"));
        (finding["severity"].clone(), finding["problem"].clone())
    };
    let plain = setup.check(&config(""), &["--format", "json"], &[]);
    assert_eq!(severity(&plain).0, "warning", "{}", plain.stdout);
    let grouped = setup.check(
        &config("[[group]]\nname = \"all\"\ntables = [\"public.*\"]\n"),
        &["--format", "json"],
        &[],
    );
    assert_eq!(grouped.code, 1, "{}", grouped.stdout);
    let (level, problem) = severity(&grouped);
    assert_eq!(level, "blocking");
    assert!(
        problem.as_str().unwrap().contains("stray writes"),
        "{problem}"
    );
}

#[tokio::test]
async fn the_state_directory_is_its_owners_only_and_one_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new();
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE t (id int PRIMARY KEY, v text);")
        .await;
    pair.on_source("INSERT INTO t VALUES (1, 'row data');")
        .await;
    let config = setup.pair_config(&pair);
    let state = setup.dir.path().join("state");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    // Made by cutover: the directory and what it writes there are its
    // user's only.
    let copied = run_cutover(&["--config", &config, "copy"], &[]);
    assert_eq!(copied.code, 0, "{}", copied.all_output());
    assert_eq!(mode(&state), 0o700);
    let conf = state.join("db").join("conf");
    assert!(conf.exists(), "sled's files are in {}", state.display());
    assert_eq!(mode(&conf), 0o600, "{}", conf.display());
    // A second load finds it done, and says so.
    let twice = run_cutover(&["--config", &config, "copy"], &[]);
    assert_eq!(twice.code, 0, "{}", twice.all_output());
    assert!(
        twice.stderr.contains("the copy is already done"),
        "{}",
        twice.all_output()
    );

    // Others may write to it: check blocks, and a command that opens it
    // refuses with the fix.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let checked = setup.check(&config, &["--format", "json"], &[]);
    assert_eq!(checked.code, 1, "{}", checked.all_output());
    let report = json(&checked);
    let found = finding(&report, "state_dir_open_to_others", "state.dir").expect("the finding");
    assert!(
        found["fix"].as_str().unwrap().contains("chmod 700"),
        "{found}"
    );
    let refused = run_cutover(&["--config", &config, "copy"], &[]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("others may write to it (mode 777)")
            && refused.stderr.contains("chmod 700"),
        "{}",
        refused.all_output()
    );

    // Readable by others (an earlier version made it so): said by check,
    // made the owner's only when opened.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let checked = setup.check(&config, &["--format", "json"], &[]);
    assert!(
        finding(&json(&checked), "state_dir_readable_by_others", "state.dir").is_some(),
        "{}",
        checked.all_output()
    );
    let again = run_cutover(&["--config", &config, "status"], &[]);
    assert_eq!(again.code, 0, "{}", again.all_output());
    assert_eq!(mode(&state), 0o700);
}
