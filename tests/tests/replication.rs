//! The replication client against real servers: every pgoutput message
//! kind decoded from real WAL, status updates, keepalives, TLS with SCRAM,
//! the password methods, and the errors that must stop a migration.

use std::time::Duration;

use cutover_replication::change::{ChangeKind, Datum, OldRow};
use cutover_replication::client::ConnectFailure;
use cutover_replication::conninfo::ConnInfo;
use cutover_replication::error::ReplicationError;
use cutover_replication::pgoutput::{Decoder, Event};
use cutover_replication::session::{PgOutputOptions, Session, SnapshotAction};
use cutover_replication::slot;
use cutover_replication::stream::{ReplicationStream, StreamMessage};
use cutover_replication::{Lsn, Secret};
use cutover_tests::{Cluster, ClusterOptions, wait_for};

const WAIT: Duration = Duration::from_secs(60);

fn conninfo(cluster: &Cluster, user: &str) -> ConnInfo {
    ConnInfo::parse(&cluster.conninfo("app", user)).expect("a valid connection string")
}

async fn source(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start_with(options);
    cluster.create_database("app").await;
    cluster
}

/// Reads and decodes until `done` says so, returning every event.
async fn collect(
    stream: &mut ReplicationStream,
    decoder: &mut Decoder,
    done: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match stream
                .next()
                .await
                .expect("the stream keeps going")
                .expect("the stream is open")
            {
                StreamMessage::XLogData {
                    wal_start, data, ..
                } => {
                    let event = decoder.decode(wal_start, data).expect("real WAL decodes");
                    let finished = done(&event);
                    events.push(event);
                    if finished {
                        return;
                    }
                }
                StreamMessage::Keepalive { .. } => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; events so far: {events:#?}"));
    events
}

fn is_marker(event: &Event, text: &str) -> bool {
    matches!(event, Event::Message(m) if m.prefix == "marker" && &m.content[..] == text.as_bytes())
}

fn changes(events: &[Event]) -> Vec<&cutover_replication::change::Change> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn text(datum: &Datum) -> &str {
    match datum {
        Datum::Text(b) => std::str::from_utf8(b).expect("utf-8"),
        other => panic!("expected a text value, got {other:?}"),
    }
}

#[tokio::test]
async fn every_pgoutput_message_kind_decodes_from_a_real_server() {
    let cluster =
        source(ClusterOptions::default().setting("logical_decoding_work_mem", "64kB")).await;
    cluster
        .execute(
            "app",
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE TABLE items (id int PRIMARY KEY, body text, feeling mood, big text);
             ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
             CREATE TABLE full_rows (a int, b text);
             ALTER TABLE full_rows REPLICA IDENTITY FULL;
             CREATE TABLE parent (id serial PRIMARY KEY);
             CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent);
             CREATE TABLE bulk (id int PRIMARY KEY, filler text);
             CREATE PUBLICATION pub FOR TABLE items, full_rows, parent, child, bulk;
             SELECT pg_replication_origin_create('elsewhere');",
        )
        .await;
    let mut session = Session::connect(&conninfo(&cluster, "postgres"))
        .await
        .expect("replication session");
    let created = session
        .create_slot("every_kind", true, SnapshotAction::Nothing)
        .await
        .expect("slot");
    assert!(created.snapshot.is_none());

    let sql = cluster.client("app").await;
    let big = "x".repeat(10_000);
    sql.execute(
        "INSERT INTO items VALUES (1, 'first', 'happy', $1)",
        &[&big],
    )
    .await
    .unwrap();
    sql.batch_execute(
        "UPDATE items SET body = 'second' WHERE id = 1;
         UPDATE items SET id = 2 WHERE id = 1;
         INSERT INTO full_rows VALUES (1, 'one');
         UPDATE full_rows SET b = 'uno' WHERE a = 1;
         DELETE FROM full_rows WHERE a = 1;
         DELETE FROM items WHERE id = 2;
         INSERT INTO parent DEFAULT VALUES;
         INSERT INTO child (parent_id) VALUES (1);
         TRUNCATE parent, child RESTART IDENTITY CASCADE;
         BEGIN; SELECT pg_logical_emit_message(true, 'app', 'inside'); INSERT INTO items VALUES (10, 'with message', 'sad', 'b'); COMMIT;
         SELECT pg_logical_emit_message(false, 'app', 'outside');",
    )
    .await
    .unwrap();
    // A transaction carrying a replication origin, as cutover's applier writes them.
    sql.batch_execute(
        "SELECT pg_replication_origin_session_setup('elsewhere');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/ABCDEF', now());
         INSERT INTO items VALUES (20, 'from elsewhere', 'sad', 'b');
         COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .await
    .unwrap();
    // A column added mid-stream.
    sql.batch_execute("ALTER TABLE items ADD COLUMN extra int; INSERT INTO items VALUES (30, 'wider', 'happy', 'b', 7);")
        .await
        .unwrap();
    // Transactions bigger than logical_decoding_work_mem: one commits (with
    // a savepoint rolled back), one aborts.
    sql.batch_execute(
        "BEGIN;
         INSERT INTO bulk SELECT g, repeat('y', 100) FROM generate_series(1, 3000) g;
         SAVEPOINT s; INSERT INTO bulk SELECT g, repeat('z', 100) FROM generate_series(5001, 8000) g; ROLLBACK TO s;
         INSERT INTO bulk VALUES (9999, 'last');
         COMMIT;
         BEGIN; INSERT INTO bulk SELECT g, repeat('w', 100) FROM generate_series(10001, 13000) g; ROLLBACK;
         SELECT pg_logical_emit_message(false, 'marker', 'end');",
    )
    .await
    .unwrap();

    let options = PgOutputOptions::for_server(session.server_version_num(), vec!["pub".into()]);
    assert!(
        options.streaming && options.proto_version == 2,
        "PostgreSQL 14+ streams"
    );
    let mut stream = session
        .start_replication("every_kind", created.consistent_point, &options)
        .await
        .expect("START_REPLICATION");
    let mut decoder = Decoder::new();
    let events = collect(&mut stream, &mut decoder, |e| is_marker(e, "end")).await;
    let all = changes(&events);

    // Begin/Commit: changes of a plain transaction carry its commit LSN.
    let Some(Event::Begin { final_lsn, xid, .. }) =
        events.iter().find(|e| matches!(e, Event::Begin { .. }))
    else {
        panic!("no Begin")
    };
    let first = all[0];
    assert_eq!(
        (first.commit_lsn, first.xid, first.ordinal),
        (Some(*final_lsn), *xid, 0)
    );
    let commit = events
        .iter()
        .find_map(|e| match e {
            Event::Commit(c) => Some(c),
            _ => None,
        })
        .expect("a Commit");
    assert_eq!(commit.commit_lsn, *final_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);

    // Relation and Type: the enum column's type is described.
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Type(t) if t.name == "mood")),
        "a Type message for the enum"
    );
    let ChangeKind::Insert { relation, new } = &first.kind else {
        panic!("first change is the insert: {first:?}")
    };
    assert_eq!(relation.name.to_string(), "public.items");
    assert_eq!(
        text(&new.0[3]).len(),
        10_000,
        "the TOASTed value arrives whole on insert"
    );

    // UPDATE leaving the TOASTed column unchanged: marked, not null.
    let ChangeKind::Update { old: None, new, .. } = &all[1].kind else {
        panic!("{:?}", all[1])
    };
    assert_eq!(text(&new.0[1]), "second");
    assert_eq!(new.0[3], Datum::UnchangedToast);

    // Primary-key UPDATE: the old key comes along.
    let ChangeKind::Update {
        old: Some(OldRow::Key(old)),
        new,
        ..
    } = &all[2].kind
    else {
        panic!("{:?}", all[2])
    };
    assert_eq!((text(&old.0[0]), text(&new.0[0])), ("1", "2"));

    // REPLICA IDENTITY FULL: whole old rows on UPDATE and DELETE.
    let ChangeKind::Update {
        old: Some(OldRow::Full(old)),
        ..
    } = &all[4].kind
    else {
        panic!("{:?}", all[4])
    };
    assert_eq!((text(&old.0[0]), text(&old.0[1])), ("1", "one"));
    let ChangeKind::Delete {
        old: OldRow::Full(old),
        ..
    } = &all[5].kind
    else {
        panic!("{:?}", all[5])
    };
    assert_eq!(text(&old.0[1]), "uno");
    let ChangeKind::Delete {
        old: OldRow::Key(old),
        ..
    } = &all[6].kind
    else {
        panic!("{:?}", all[6])
    };
    assert_eq!(text(&old.0[0]), "2");

    // TRUNCATE with both flags, both tables.
    let truncate = all
        .iter()
        .find(|c| matches!(c.kind, ChangeKind::Truncate { .. }))
        .expect("a truncate");
    let ChangeKind::Truncate {
        relations,
        cascade,
        restart_identity,
    } = &truncate.kind
    else {
        unreachable!()
    };
    assert!(*cascade && *restart_identity);
    let names: Vec<String> = relations.iter().map(|r| r.name.name.clone()).collect();
    assert!(
        names.contains(&"parent".to_owned()) && names.contains(&"child".to_owned()),
        "{names:?}"
    );

    // Logical messages, transactional and not.
    let messages: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.prefix == "app" => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].transactional
            && &messages[0].content[..] == b"inside"
            && messages[0].xid.is_some()
    );
    assert!(!messages[1].transactional && &messages[1].content[..] == b"outside");

    // The origin of a transaction applied by a replication origin.
    assert!(events.iter().any(|e| matches!(e, Event::Origin { name, origin_lsn } if name == "elsewhere" && *origin_lsn == "0/ABCDEF".parse::<Lsn>().unwrap())));
    let from_elsewhere = all
        .iter()
        .find(|c| matches!(&c.kind, ChangeKind::Insert { new, .. } if text(&new.0[0]) == "20"))
        .unwrap();
    assert_eq!(from_elsewhere.origin.as_deref(), Some("elsewhere"));

    // A column added mid-stream: a new Relation replaces the old one.
    let wider = all
        .iter()
        .find(|c| matches!(&c.kind, ChangeKind::Insert { new, .. } if text(&new.0[0]) == "30"))
        .unwrap();
    let ChangeKind::Insert { relation, new } = &wider.kind else {
        unreachable!()
    };
    assert_eq!(relation.columns.len(), 5);
    assert_eq!(
        (relation.columns[4].name.as_str(), text(&new.0[4])),
        ("extra", "7")
    );

    // Streamed transactions: chunks, a subtransaction abort, a commit, and an abort.
    let starts = events
        .iter()
        .filter(|e| matches!(e, Event::StreamStart { .. }))
        .count();
    assert!(
        starts >= 2,
        "large transactions arrive in several streamed blocks, got {starts}"
    );
    let committed = events
        .iter()
        .find_map(|e| match e {
            Event::StreamCommit(c) => Some(c),
            _ => None,
        })
        .expect("a Stream Commit");
    let streamed: Vec<_> = all.iter().filter(|c| c.xid == committed.xid).collect();
    assert!(
        streamed.iter().all(|c| c.commit_lsn.is_none()),
        "streamed changes learn their commit LSN at Stream Commit"
    );
    let sub_aborts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::StreamAbort { xid, subxid } if *xid == committed.xid && subxid != xid => {
                Some(*subxid)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        sub_aborts.len(),
        1,
        "the rolled-back savepoint is a subtransaction abort"
    );
    let surviving = streamed
        .iter()
        .filter(|c| !sub_aborts.contains(&c.subxid))
        .count();
    assert_eq!(
        surviving, 3001,
        "3000 rows plus the last one survive the savepoint rollback"
    );
    let ordinals: Vec<u64> = streamed.iter().map(|c| c.ordinal).collect();
    assert!(
        ordinals.windows(2).all(|w| w[1] == w[0] + 1),
        "ordinals continue across blocks"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::StreamAbort { xid, subxid } if xid == subxid && *xid != committed.xid)),
        "the rolled-back large transaction is a Stream Abort"
    );
    stream.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn status_updates_are_monotonic_and_only_the_consumer_advances_the_slot() {
    let cluster = source(ClusterOptions::default()).await;
    cluster
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await;
    let mut session = Session::connect(&conninfo(&cluster, "postgres"))
        .await
        .unwrap();
    let created = session
        .create_slot("durable", false, SnapshotAction::Nothing)
        .await
        .unwrap();
    let sql = cluster.client("app").await;
    // Separate statements: a multi-statement query would be one transaction,
    // whose commit is decoded after the non-transactional marker.
    for statement in [
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (2)",
        "SELECT pg_logical_emit_message(false, 'marker', 'end')",
    ] {
        sql.batch_execute(statement).await.unwrap();
    }
    let options = PgOutputOptions::for_server(session.server_version_num(), vec!["pub".into()]);
    let mut stream = session
        .start_replication("durable", created.consistent_point, &options)
        .await
        .unwrap();
    let events = collect(&mut stream, &mut Decoder::new(), |e| is_marker(e, "end")).await;
    let commits: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Commit(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(commits.len(), 2);

    // Reading alone never confirms anything.
    stream.send_status().await.unwrap();
    let confirmed = |expected: Lsn| {
        let sql = &sql;
        async move {
            let state = slot::slot_state(sql, "durable").await.unwrap().unwrap();
            (state.confirmed_flush == Some(expected)).then_some(())
        }
    };
    assert!(
        stream.feedback().write() > created.consistent_point,
        "received data moves the write position"
    );
    assert_eq!(stream.feedback().flush(), created.consistent_point);
    wait_for("the slot to stay at its start", WAIT, || {
        confirmed(created.consistent_point)
    })
    .await;

    // The consumer confirms the first commit, then tries to go back.
    stream.set_flushed(commits[0].end_lsn);
    stream.send_status().await.unwrap();
    wait_for("the slot to reach the first commit", WAIT, || {
        confirmed(commits[0].end_lsn)
    })
    .await;
    stream.set_flushed(created.consistent_point);
    assert_eq!(
        stream.feedback().flush(),
        commits[0].end_lsn,
        "flush never moves backward"
    );
    stream.set_flushed(commits[1].end_lsn);
    let before = stream.feedback();
    stream.send_status().await.unwrap();
    wait_for("the slot to reach the second commit", WAIT, || {
        confirmed(commits[1].end_lsn)
    })
    .await;
    assert!(stream.feedback().flush() >= before.flush());
    let session = stream.stop().await.expect("stop returns the session");
    drop(session);
}

#[tokio::test]
async fn an_idle_stream_stays_connected_by_its_status_updates() {
    let cluster = source(ClusterOptions::default().setting("wal_sender_timeout", "2s")).await;
    cluster
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await;
    let mut session = Session::connect(&conninfo(&cluster, "postgres"))
        .await
        .unwrap();
    let created = session
        .create_slot("idle", true, SnapshotAction::Nothing)
        .await
        .unwrap();
    let options = PgOutputOptions::for_server(session.server_version_num(), vec!["pub".into()]);
    let mut stream = session
        .start_replication("idle", created.consistent_point, &options)
        .await
        .unwrap();
    assert!(
        stream.status_interval() <= Duration::from_millis(700),
        "a third of wal_sender_timeout"
    );
    // Idle for several timeouts: the server would drop a silent consumer.
    tokio::time::timeout(WAIT, async {
        while stream.statuses_sent() < 8 {
            let message = stream
                .next()
                .await
                .expect("the server keeps the idle stream");
            assert!(message.is_some());
        }
    })
    .await
    .expect("status updates go out on their own");
    let active: bool = cluster
        .query_value(
            "app",
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'idle'",
        )
        .await;
    assert!(
        active,
        "still streaming after {} status updates",
        stream.statuses_sent()
    );
}

#[tokio::test]
async fn buffered_messages_come_whole_and_in_order_and_the_stream_stops_cleanly() {
    let cluster = source(ClusterOptions::default()).await;
    cluster
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await;
    let mut session = Session::connect(&conninfo(&cluster, "postgres"))
        .await
        .unwrap();
    let created = session
        .create_slot("buffered", true, SnapshotAction::Nothing)
        .await
        .unwrap();
    // 200 transactions of 100 rows, written before streaming starts: the
    // server sends them as fast as it decodes, many to a socket read.
    let sql = cluster.client("app").await;
    for batch in 0..200 {
        sql.batch_execute(&format!(
            "INSERT INTO t SELECT g, repeat('x', 50) FROM generate_series({}, {}) g",
            batch * 100 + 1,
            batch * 100 + 100
        ))
        .await
        .unwrap();
    }
    sql.batch_execute("SELECT pg_logical_emit_message(false, 'marker', 'end')")
        .await
        .unwrap();
    let options = PgOutputOptions::for_server(session.server_version_num(), vec!["pub".into()]);
    let mut stream = session
        .start_replication("buffered", created.consistent_point, &options)
        .await
        .unwrap();
    let mut decoder = Decoder::new();
    let (mut ids, mut from_buffer, mut last_lsn) = (Vec::new(), 0usize, Lsn::default());
    tokio::time::timeout(WAIT, async {
        loop {
            // The reader's pattern: what is buffered first, else wait.
            // A reader that is busy elsewhere (the daemon's is, applying)
            // finds data piled up when it reads again; this one sleeps
            // instead, or on a fast machine it would keep up with the
            // walsender and get one message per read (seen: 8,721 of
            // 20,400 from the buffer).
            let message = match stream.next_buffered().expect("buffered messages parse") {
                Some(message) => {
                    from_buffer += 1;
                    message
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    stream
                        .next()
                        .await
                        .expect("the stream keeps going")
                        .expect("the stream is open")
                }
            };
            let StreamMessage::XLogData {
                wal_start, data, ..
            } = message
            else {
                continue;
            };
            // (Some messages carry no position: 0/0.)
            if wal_start != Lsn::default() {
                assert!(wal_start >= last_lsn, "{wal_start} after {last_lsn}");
                last_lsn = wal_start;
            }
            let event = decoder.decode(wal_start, data).expect("real WAL decodes");
            if is_marker(&event, "end") {
                return;
            }
            if let Event::Change(change) = &event
                && let ChangeKind::Insert { new, .. } = &change.kind
            {
                ids.push(text(&new.0[0]).parse::<i64>().expect("an id"));
            }
        }
    })
    .await
    .expect("every change arrives");
    assert_eq!(
        ids,
        (1..=20_000).collect::<Vec<i64>>(),
        "every row once, in order"
    );
    assert!(
        from_buffer > 10_000,
        "most messages came from the buffer without a wait: {from_buffer}"
    );
    // Whatever the buffer still holds, the stream reports and stops cleanly.
    stream.set_flushed(last_lsn);
    stream.send_status().await.unwrap();
    stream.stop().await.expect("stop returns the session");
}

#[tokio::test]
async fn scram_over_tls_with_a_generated_certificate_and_channel_binding() {
    let cluster = source(ClusterOptions::default().tls().password_auth()).await;
    cluster
        .execute(
            "app",
            "CREATE ROLE rep LOGIN REPLICATION PASSWORD 'tls-secret'",
        )
        .await;
    let ca = cluster.ca_cert();
    let url = |host: &str, password: &str, extra: &str| {
        format!(
            "postgres://rep:{password}@{host}:{}/app?sslmode=verify-full&sslrootcert={}{extra}",
            cluster.port(),
            ca.display()
        )
    };
    for host in ["localhost", "127.0.0.1"] {
        let info = ConnInfo::parse(&url(host, "tls-secret", "&channel_binding=require")).unwrap();
        let mut session = Session::connect(&info)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert!(session.is_tls());
        let identity = session.identify_system().await.unwrap();
        assert_eq!(identity.dbname.as_deref(), Some("app"));
        assert!(!identity.xlogpos.is_zero());
    }

    let wrong = Session::connect(&ConnInfo::parse(&url("localhost", "not-it", "")).unwrap())
        .await
        .unwrap_err();
    let ReplicationError::Connect(err) = &wrong else {
        panic!("{wrong:?}")
    };
    assert_eq!(err.failure, ConnectFailure::Authentication);
    assert!(!wrong.is_transient());
    assert!(
        wrong.to_string().contains("password authentication failed"),
        "{wrong}"
    );
    assert!(!format!("{wrong} {wrong:?}").contains("not-it"));

    // The server refuses plain connections here, so sslmode=disable fails.
    let mut plain = ConnInfo::parse(&format!(
        "host=127.0.0.1 port={} dbname=app user=rep sslmode=disable",
        cluster.port()
    ))
    .unwrap();
    plain.set_password(Secret::new("tls-secret"));
    let refused = Session::connect(&plain).await.unwrap_err();
    assert!(refused.to_string().contains("pg_hba.conf"), "{refused}");

    // A CA that did not sign the server's certificate is refused.
    let other = Cluster::start_with(ClusterOptions::default().tls());
    let bad_ca = format!(
        "postgres://rep:tls-secret@localhost:{}/app?sslmode=verify-ca&sslrootcert={}",
        cluster.port(),
        other.ca_cert().display()
    );
    let untrusted = Session::connect(&ConnInfo::parse(&bad_ca).unwrap())
        .await
        .unwrap_err();
    assert!(
        untrusted.to_string().contains("TLS handshake failed"),
        "{untrusted}"
    );
}

#[tokio::test]
async fn md5_and_cleartext_password_methods_authenticate() {
    for method in ["md5", "password"] {
        let cluster = source(ClusterOptions::default().host_auth(method)).await;
        cluster
            .execute("app", "SET password_encryption = 'md5'; CREATE ROLE rep LOGIN REPLICATION PASSWORD 'pw-1'")
            .await;
        let mut info = conninfo(&cluster, "rep");
        let missing = Session::connect(&info).await.unwrap_err();
        assert!(
            missing.to_string().contains("none is configured"),
            "{method}: {missing}"
        );
        info.set_password(Secret::new("pw-1"));
        let mut session = Session::connect(&info)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        session.identify_system().await.unwrap();
    }
}

#[tokio::test]
async fn missing_slot_publication_and_privilege_are_definite_errors() {
    let cluster = source(ClusterOptions::default()).await;
    cluster
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE plain LOGIN;",
        )
        .await;
    let info = conninfo(&cluster, "postgres");

    let session = Session::connect(&info).await.unwrap();
    let options = PgOutputOptions::for_server(session.server_version_num(), vec!["pub".into()]);
    let err = session
        .start_replication("no_such_slot", Lsn::ZERO, &options)
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.sqlstate(), err.is_transient()),
        ("slot_missing", Some("42704"), false),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("cutover run --resync"));

    let mut session = Session::connect(&info).await.unwrap();
    let created = session
        .create_slot("nopub", true, SnapshotAction::Nothing)
        .await
        .unwrap();
    let mut stream = session
        .start_replication("nopub", created.consistent_point, &options)
        .await
        .unwrap();
    cluster.execute("app", "INSERT INTO t VALUES (1)").await;
    let err = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(err) = stream.next().await {
                return err;
            }
        }
    })
    .await
    .expect("the missing publication is reported");
    assert_eq!(
        (err.kind(), err.is_transient()),
        ("publication_missing", false),
        "{err}"
    );

    let denied = Session::connect(&conninfo(&cluster, "plain"))
        .await
        .unwrap_err();
    assert!(!denied.is_transient(), "{denied}");
    assert!(denied.to_string().contains("replication"), "{denied}");
}

#[tokio::test]
async fn an_exported_snapshot_is_importable_and_a_stopped_server_is_transient() {
    let mut cluster = source(ClusterOptions::default()).await;
    cluster
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);",
        )
        .await;
    let mut session = Session::connect(&conninfo(&cluster, "postgres"))
        .await
        .unwrap();
    let created = session
        .create_slot("snap", false, SnapshotAction::Export)
        .await
        .unwrap();
    let name = created.snapshot.clone().expect("an exported snapshot");
    cluster.execute("app", "INSERT INTO t VALUES (2)").await;
    let sql = cluster.client("app").await;
    sql.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{name}'"
    ))
    .await
    .expect("the snapshot is importable while the slot's session waits");
    let seen: i64 = sql
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen, 1,
        "the snapshot predates the second insert, which the stream will carry"
    );
    sql.batch_execute("COMMIT").await.unwrap();
    drop(sql);
    session.drop_slot("snap", false).await.unwrap();
    drop(session);

    cluster.stop();
    let err = Session::connect(&conninfo(&cluster, "postgres"))
        .await
        .unwrap_err();
    assert!(
        err.is_transient(),
        "a stopped server is worth retrying: {err}"
    );
}

#[tokio::test]
async fn unix_sockets_protocol_1_and_encryption_without_verification() {
    let cluster = source(ClusterOptions::default().tls()).await;
    cluster
        .execute(
            "app",
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t;",
        )
        .await;
    // Over the unix socket (never TLS), with pgoutput protocol 1.
    let socket = ConnInfo::parse(&format!(
        "host={} port={} dbname=app user=postgres sslmode=require",
        cluster.socket_dir().display(),
        cluster.port()
    ))
    .unwrap();
    let mut session = Session::connect(&socket)
        .await
        .expect("unix socket session");
    assert!(!session.is_tls());
    let created = session
        .create_slot("v1", true, SnapshotAction::Nothing)
        .await
        .unwrap();
    cluster
        .execute("app", "INSERT INTO t VALUES (1, 'one')")
        .await;
    cluster
        .execute(
            "app",
            "SELECT pg_logical_emit_message(false, 'marker', 'end')",
        )
        .await;
    let options = PgOutputOptions {
        proto_version: 1,
        publications: vec!["pub".into()],
        messages: true,
        streaming: false,
    };
    let mut stream = session
        .start_replication("v1", created.consistent_point, &options)
        .await
        .unwrap();
    let events = collect(&mut stream, &mut Decoder::new(), |e| is_marker(e, "end")).await;
    let inserted = changes(&events);
    assert_eq!(inserted.len(), 1);
    let ChangeKind::Insert { new, .. } = &inserted[0].kind else {
        panic!()
    };
    assert_eq!(text(&new.0[1]), "one");

    // sslmode=require without sslrootcert: encrypted, certificate not checked.
    for mode in ["require", "prefer"] {
        let info = ConnInfo::parse(&format!(
            "host=127.0.0.1 port={} dbname=app user=postgres sslmode={mode}",
            cluster.port()
        ))
        .unwrap();
        let session = Session::connect(&info)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(
            session.is_tls(),
            "{mode} encrypts when the server offers TLS"
        );
    }
    // verify-full without any root certificate is refused before connecting.
    let info = ConnInfo::parse(&format!(
        "host=127.0.0.1 port={} dbname=app user=postgres sslmode=verify-full",
        cluster.port()
    ))
    .unwrap();
    let err = Session::connect(&info).await.unwrap_err();
    assert!(err.to_string().contains("sslrootcert"), "{err}");
}

#[tokio::test]
async fn sessions_installing_cutovers_schema_at_once_all_succeed() {
    // The copy and the lag sampler both make cutover's schema when they
    // start; `IF NOT EXISTS` alone lets two sessions collide on the
    // catalog's unique index.
    let cluster = source(ClusterOptions::default()).await;
    for round in 0..5 {
        let database = format!("race{round}");
        cluster.create_database(&database).await;
        cluster
            .execute(&database, "CREATE PUBLICATION cutover")
            .await;
        let mut installs = Vec::new();
        for _ in 0..8 {
            let client = cluster.client(&database).await;
            installs.push(tokio::spawn(async move {
                cutover_replication::events::install(&client, "cutover").await
            }));
        }
        for install in installs {
            install
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        }
    }
}

#[tokio::test]
async fn the_apply_session_waits_for_an_origin_an_ending_session_still_holds() {
    use cutover_replication::sink::postgres::PostgresSink;
    let cluster = Cluster::start();
    cluster.create_database("app").await;
    // A session holds the origin, as the backend of a session that just
    // ended does until it has exited; it lets go after a second.
    let holder = cluster.client("app").await;
    holder
        .batch_execute(
            "SELECT pg_replication_origin_create('held'); SELECT pg_replication_origin_session_setup('held');",
        )
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        holder
            .batch_execute("SELECT pg_replication_origin_session_reset()")
            .await
            .unwrap();
    });
    let info = ConnInfo::parse(&cluster.conninfo("app", "postgres")).unwrap();
    let sink = PostgresSink::connect(&info, "held", Default::default(), Vec::new()).await;
    assert!(sink.is_ok(), "{:?}", sink.err());
    release.await.unwrap();
}
