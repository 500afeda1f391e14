//! The harness itself: clusters start, accept SQL, restart, and run
//! side by side without colliding.

use std::time::Duration;

use cutover_tests::{Cluster, ClusterOptions, wait_for};

#[tokio::test]
async fn a_cluster_runs_with_logical_wal_and_test_settings() {
    let cluster =
        Cluster::start_with(ClusterOptions::default().setting("logical_decoding_work_mem", "64kB"));
    let wal_level: String = cluster.query_value("postgres", "SHOW wal_level").await;
    assert_eq!(wal_level, "logical");
    let work_mem: String = cluster
        .query_value("postgres", "SHOW logical_decoding_work_mem")
        .await;
    assert_eq!(work_mem, "64kB");
    let db = cluster.create_database("fresh").await;
    cluster
        .execute(
            &db,
            "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1), (2)",
        )
        .await;
    let count: i64 = cluster.query_value(&db, "SELECT count(*) FROM t").await;
    assert_eq!(count, 2);
}

#[tokio::test]
async fn parallel_clusters_get_their_own_ports_and_directories() {
    let clusters: Vec<Cluster> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(Cluster::start)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ports: Vec<u16> = clusters.iter().map(Cluster::port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    for cluster in &clusters {
        let port: String = cluster.query_value("postgres", "SHOW port").await;
        assert_eq!(port, cluster.port().to_string());
    }
}

#[tokio::test]
async fn a_restarted_cluster_keeps_its_data_and_port() {
    let mut cluster = Cluster::start();
    cluster
        .execute(
            "postgres",
            "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')",
        )
        .await;
    let before: i32 = cluster
        .query_value("postgres", "SELECT pg_backend_pid()")
        .await;
    cluster.restart();
    let value: String = wait_for(
        "the restarted server to answer",
        Duration::from_secs(30),
        || async {
            let client = tokio_postgres::connect(
                &cluster.conninfo("postgres", "postgres"),
                tokio_postgres::NoTls,
            )
            .await
            .ok()?;
            tokio::spawn(client.1);
            client
                .0
                .query_one("SELECT v FROM kept", &[])
                .await
                .ok()
                .map(|r| r.get(0))
        },
    )
    .await;
    assert_eq!(value, "x");
    let after: i32 = cluster
        .query_value("postgres", "SELECT pg_backend_pid()")
        .await;
    assert_ne!(
        before, after,
        "a new server process answers after the restart"
    );
}
