//! A Kafka cluster for the feed's tests: librdkafka's mock cluster, in the
//! test's process, speaking the Kafka protocol on loopback (no broker is
//! installable on these machines). The daemon connects to it as to any
//! cluster; the test reads the topics back with a `read_committed`
//! consumer, as a downstream service would.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

/// A mock cluster, up while this lives.
pub struct Kafka {
    /// The cluster; errors are injected through it.
    pub cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("bootstrap", &self.bootstrap())
            .finish()
    }
}

/// One message read back.
#[derive(Clone, Debug)]
pub struct Event {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its key, parsed (`Null`: none).
    pub key: Value,
    /// Its value, parsed.
    pub value: Value,
    /// Its Kafka transaction (the `cutover.txn` header).
    pub txn: String,
}

impl Kafka {
    /// A cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> Kafka {
        Kafka {
            cluster: MockCluster::new(brokers).expect("librdkafka's mock cluster"),
        }
    }

    /// Makes `topic` with `partitions`, as an operator would before the
    /// feed starts (the mock cluster has no CreateTopics for cutover to
    /// use).
    pub fn topic(&self, topic: &str, partitions: i32) {
        self.cluster
            .create_topic(topic, partitions, 1)
            .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    }

    /// The feed's topics for the tests' tables under `prefix`.
    pub fn topics(&self, prefix: &str, tables: &[&str]) {
        self.topic(&format!("{prefix}.cutover.progress"), 1);
        for table in tables {
            self.topic(&format!("{prefix}.public.{table}"), 3);
        }
    }

    /// `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The `[kafka]` section of a config for this cluster.
    pub fn config(&self, prefix: &str) -> String {
        format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\nreplication_factor = 1\n",
            self.bootstrap()
        )
    }

    /// What a `read_committed` consumer of the topics whose names start
    /// with `prefix.` reads, per partition in order, from the beginning to
    /// each partition's end.
    ///
    /// The mock cluster does not isolate transactions: an aborted one's
    /// records stay readable (its Fetch reports no aborted transaction and
    /// its EndTxn writes no marker). What a real cluster does is done here
    /// instead: a record counts only when its Kafka transaction (its
    /// `cutover.txn` header) committed, which the feed's progress record,
    /// produced last in each transaction, says. A record the mock kept of
    /// a transaction that never committed is dropped, as a real cluster
    /// would drop it.
    pub fn read(&self, prefix: &str) -> Vec<Event> {
        let all = self.read_uncommitted(prefix);
        let committed: std::collections::HashSet<&str> = all
            .iter()
            .filter(|e| e.topic.ends_with(".cutover.progress"))
            .map(|e| e.txn.as_str())
            .collect();
        all.iter()
            .filter(|e| committed.contains(e.txn.as_str()))
            .cloned()
            .collect()
    }

    /// Every record of the topics whose names start with `prefix.`, as
    /// the mock cluster keeps them.
    pub fn read_uncommitted(&self, prefix: &str) -> Vec<Event> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "cutover-tests")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .create()
            .expect("a consumer");
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("the cluster's metadata");
        let mut assignment = TopicPartitionList::new();
        let mut open = 0;
        for topic in metadata.topics() {
            if !topic.name().starts_with(&format!("{prefix}.")) {
                continue;
            }
            for partition in topic.partitions() {
                assignment
                    .add_partition_offset(topic.name(), partition.id(), Offset::Beginning)
                    .unwrap();
                open += 1;
            }
        }
        if open == 0 {
            return Vec::new();
        }
        consumer.assign(&assignment).unwrap();
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while open > 0 {
            assert!(
                Instant::now() < deadline,
                "reading the topics back timed out"
            );
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => open -= 1,
                Some(Err(e)) => panic!("reading the topics back: {e}"),
                Some(Ok(message)) => events.push(Event {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    // Rows' keys are JSON; the progress records' are names.
                    key: message.key().map_or(Value::Null, |k| {
                        serde_json::from_slice(k).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(k).into_owned())
                        })
                    }),
                    value: serde_json::from_slice(message.payload().unwrap_or(b"null"))
                        .unwrap_or(Value::Null),
                    txn: message
                        .headers()
                        .and_then(|h| {
                            (0..h.count())
                                .map(|i| h.get(i))
                                .find(|h| h.key == "cutover.txn")
                                .and_then(|h| h.value)
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        })
                        .unwrap_or_default(),
                }),
            }
        }
        events
    }
}

/// The row events of `topic`, grouped by key in the order a consumer of
/// each partition reads them.
pub fn by_key(events: &[Event], topic: &str) -> BTreeMap<String, Vec<Value>> {
    let mut keys: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for event in events
        .iter()
        .filter(|e| e.topic == topic && !e.key.is_null())
    {
        keys.entry(event.key.to_string())
            .or_default()
            .push(event.value.clone());
    }
    keys
}
