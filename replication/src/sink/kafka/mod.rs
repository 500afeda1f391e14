//! The Kafka sink: each stream's changes published as Debezium envelopes
//! ([`super::envelope`]), exactly once, with librdkafka's transactional
//! producer (docs/kafka.md).
//!
//! - **Whole source transactions per Kafka transaction.** The batches the
//!   stream hands over go into the open Kafka transaction, which is
//!   committed every 100 ms under load (or 16 MB), at once when the
//!   stream goes idle, at the end of a spilled transaction and whenever
//!   the stream needs its position durable,
//!   with one progress record (the end of its last source transaction) on
//!   `<topic_prefix>.cutover.progress`. A consumer reading
//!   `read_committed` sees a source transaction whole or not at all, and
//!   the apply never waits on a Kafka commit per batch.
//! - **Resume from Kafka's word.** On connect the producer takes the
//!   feed's transactional id (`cutover.<slot>.<direction>`), which fences
//!   an earlier session and aborts what it left open; then the last
//!   committed progress record is read back. Transactions ending at or
//!   before it are skipped, as the PostgreSQL sink skips what its
//!   replication origin holds.
//! - **Durable is committed.** [`Sink::durable`] is the end of the last
//!   transaction Kafka committed (`acks=all`); the stream acknowledges the
//!   slot only up to the least durable position of its sinks.
//! - **Topics and keys.** A row goes to `<topic_prefix>.<schema>.<table>`
//!   under its key's columns, so every key's changes stay in one
//!   partition, in order; a table without a key uses partition 0; a
//!   truncate goes to every partition of its table's topic, so that each
//!   partition's readers see it in order with that partition's keys.
//!   Topics missing are created (`partitions`, `replication_factor`).
//! - **Which changes.** Those the stream's [`Filter`] takes: the same as
//!   the PostgreSQL sink beside it applies.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::change::{Change, ChangeKind, Commit, PgTimestamp, SourceTransaction};
use crate::lsn::Lsn;
use crate::secret::Secret;
use crate::sink::Sink;
use crate::sink::envelope::{self, Batch, Encoder, Origin, SnapshotMark};
use crate::sink::filter::Filter;

mod error;
mod progress;
mod snapshot;

pub use error::FeedError;

/// The topic of progress records, after the prefix.
pub const PROGRESS_TOPIC: &str = "cutover.progress";

/// How long a call to the brokers may take before the session starts
/// again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// With nothing to publish, the position is committed this often at most
/// (the slot's acknowledgement follows it).
const IDLE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The producer's setting that bounds a Kafka transaction's life.
const TRANSACTION_TIMEOUT: &str = "transaction.timeout.ms";

/// What cutover asks for unless `[kafka.properties]` says otherwise.
const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 900_000;

/// Under load, an open Kafka transaction is committed once this old (when
/// the stream goes idle, at once). 250 ms measured no faster than 100
/// (docs/benchmarks.md)...
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// ...or once it holds this many bytes of values.
const COMMIT_BYTES: usize = 16 << 20;

/// The Kafka transaction open: what it holds so far.
#[derive(Debug)]
struct Open {
    /// Per topic: messages and bytes.
    topics: HashMap<String, (u64, u64)>,
    /// When it was begun.
    since: Instant,
    /// Bytes of values produced into it.
    bytes: usize,
}

/// `[kafka]`: where and how the feed publishes.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Put before every topic's name (`<prefix>.<schema>.<table>`).
    pub topic_prefix: String,
    /// Partitions of the topics cutover creates.
    pub partitions: i32,
    /// Replication factor of the topics cutover creates (-1: the
    /// brokers' default).
    pub replication_factor: i32,
    /// librdkafka properties passed through (TLS, SASL, compression...).
    pub properties: Vec<(String, String)>,
    /// `sasl.password`, kept out of logs.
    pub sasl_password: Option<Secret>,
    /// `ssl.key.password`, kept out of logs.
    pub ssl_key_password: Option<Secret>,
    /// `sasl.oauthbearer.client.secret`, kept out of logs.
    pub oauthbearer_client_secret: Option<Secret>,
    /// Publish the initial copy's rows (`r` events) before the changes.
    pub snapshot: bool,
}

impl KafkaSettings {
    /// The client settings every client of the feed shares.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // Producers of other languages (Java's) pick partitions with
        // murmur2: the same key lands in the same partition whoever
        // writes it.
        config.set("partitioner", "murmur2_random");
        // librdkafka queues up to 1 GB by default: the feed keeps its
        // memory bounded like the rest of the daemon.
        config.set("queue.buffering.max.kbytes", "65536");
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        if let Some(password) = &self.sasl_password {
            config.set("sasl.password", password.expose());
        }
        if let Some(password) = &self.ssl_key_password {
            config.set("ssl.key.password", password.expose());
        }
        if let Some(secret) = &self.oauthbearer_client_secret {
            config.set("sasl.oauthbearer.client.secret", secret.expose());
        }
        config.set_log_level(RDKafkaLogLevel::Warning);
        config
    }

    /// The full name of `topic` (after the prefix).
    pub fn topic(&self, topic: &str) -> String {
        envelope::prefixed(&self.topic_prefix, topic)
    }
}

/// Which stream of which migration a feed publishes, for its
/// transactional id, its progress key and the envelope's `source`.
#[derive(Clone, Debug)]
pub struct FeedId {
    /// The migration: the slot the copy ran under.
    pub migration: String,
    /// `forward` or `reverse`.
    pub direction: &'static str,
    /// The server the stream reads (`source` or `target`).
    pub server: &'static str,
    /// Its database.
    pub database: String,
}

impl FeedId {
    /// The progress record's key, and the producer's transactional id
    /// after `cutover.`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.migration, self.direction)
    }
}

/// What one committed Kafka transaction carried, for the metrics.
#[derive(Debug, Default)]
pub struct Committed {
    /// Per topic: messages and bytes (keys and values).
    pub topics: HashMap<String, (u64, u64)>,
    /// How long the commit took.
    pub commit_seconds: f64,
    /// The position it covers.
    pub end: Lsn,
}

/// Called after each committed Kafka transaction.
pub type CommittedFn = dyn Fn(&Committed) + Send + Sync;

/// The client context: librdkafka's logs and errors go to the daemon's
/// log, and the first error an operator must fix that librdkafka reports
/// on its own (a delivery refused, credentials refused while connecting)
/// is kept: the call that fails next says only that it timed out, or that
/// the transaction is in an error state.
#[derive(Debug, Default)]
struct FeedContext {
    definite: std::sync::Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl FeedContext {
    /// Keeps `error` when it is one an operator must fix.
    fn note(&self, error: &KafkaError) {
        if let Some(code) = error.rdkafka_error_code()
            && error::fix_of(code).is_some()
            && let Ok(mut kept) = self.definite.lock()
            && kept.is_none()
        {
            *kept = Some((code, error.to_string()));
        }
    }

    /// `err`, made definite with its fix when librdkafka reported an error
    /// an operator must fix.
    fn sharpen(&self, err: FeedError) -> FeedError {
        if !err.transient {
            return err;
        }
        let kept = self.definite.lock().ok().and_then(|k| k.clone());
        match kept.and_then(|(code, detail)| error::fix_of(code).map(|fix| (detail, fix))) {
            Some((detail, fix)) => {
                FeedError::definite(err.what, format!("{detail} ({})", err.detail), fix)
            }
            None => err,
        }
    }
}

impl ClientContext for FeedContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.note(&error);
        tracing::warn!(%error, "Kafka: {reason}");
    }
}

impl ConsumerContext for FeedContext {}

impl ProducerContext for FeedContext {
    type DeliveryOpaque = ();

    // A message that fails makes its transaction's commit fail; its own
    // error is kept when it names what to fix (a topic's ACL, a message
    // too large).
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.note(error);
        }
    }
}

/// One stream's Kafka feed.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<FeedContext>>,
    admin: AdminClient<DefaultClientContext>,
    /// For metadata requests that create nothing.
    meta: Arc<BaseConsumer<FeedContext>>,
    settings: KafkaSettings,
    feed: FeedId,
    filter: Filter,
    /// Changes into messages, and the batch they are encoded into (kept
    /// between batches for its buffers).
    encoder: Encoder,
    batch: Batch,
    progress_topic: String,
    progress_key: String,
    /// The end of the last source transaction published (or passed over,
    /// having nothing to publish).
    applied: Lsn,
    /// The end of the last source transaction Kafka committed.
    durable: Lsn,
    last_commit: Instant,
    /// Topics known to exist, with their partition counts.
    topics: HashMap<String, i32>,
    on_commit: Option<Arc<CommittedFn>>,
    /// This session's name, and the Kafka transaction open in it: each
    /// record carries `<session>-<n>` in its `cutover.txn` header.
    session: String,
    txn: u64,
    /// `<session>-<txn>`, the `cutover.txn` header of the open transaction.
    txn_id: String,
    /// How far the snapshot is published (carried by every progress
    /// record once the feed publishes one).
    snapshot: Option<SnapshotMark>,
    /// The feed had a committed progress record when it connected.
    resumed: bool,
    /// The Kafka transaction open, if one is.
    open: Option<Open>,
    /// `transaction.timeout.ms`: the brokers abort a transaction older.
    transaction_timeout: Duration,
}

/// The header naming a record's Kafka transaction. A `read_committed`
/// consumer has no use for it; one that reads uncommitted records (or a
/// cluster that does not isolate transactions, like librdkafka's mock) can
/// keep only the transactions whose progress record it sees.
pub const TXN_HEADER: &str = "cutover.txn";

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("feed", &self.feed)
            .field("applied", &self.applied)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    what: &str,
    call: impl FnOnce() -> Result<T, FeedError> + Send + 'static,
) -> Result<T, FeedError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|e| Err(FeedError::transient(what, e.to_string())))
}

impl KafkaSink {
    /// Connects the feed `feed`: takes its transactional id (fencing an
    /// earlier session) and reads back its last committed position; with
    /// none, it starts at `floor` (the stream's first position).
    pub async fn connect(
        settings: KafkaSettings,
        feed: FeedId,
        filter: Filter,
        floor: Lsn,
    ) -> Result<KafkaSink, FeedError> {
        let base = settings.client_config();
        let key = feed.key();
        let mut producer_config = base.clone();
        if !settings
            .properties
            .iter()
            .any(|(k, _)| k == TRANSACTION_TIMEOUT)
        {
            // librdkafka's default, 60 s, bounds how long one source
            // transaction may take to publish: the brokers abort a longer
            // one. 15 minutes is the brokers' default ceiling.
            producer_config.set(
                TRANSACTION_TIMEOUT,
                DEFAULT_TRANSACTION_TIMEOUT_MS.to_string(),
            );
        }
        let transaction_timeout = settings
            .properties
            .iter()
            .find(|(k, _)| k == TRANSACTION_TIMEOUT)
            .and_then(|(_, v)| v.parse().ok())
            .map_or(
                Duration::from_millis(DEFAULT_TRANSACTION_TIMEOUT_MS),
                Duration::from_millis,
            );
        let producer: ThreadedProducer<FeedContext> = producer_config
            .set("transactional.id", format!("cutover.{key}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create_with_context(FeedContext::default())
            .map_err(|e| error::classify("configuring the producer", &e))?;
        let producer = Arc::new(producer);
        let admin: AdminClient<DefaultClientContext> = base
            .create()
            .map_err(|e| error::classify("configuring the admin client", &e))?;
        let meta: BaseConsumer<FeedContext> = base
            .clone()
            .set("allow.auto.create.topics", "false")
            .create_with_context(FeedContext::default())
            .map_err(|e| error::classify("configuring the metadata client", &e))?;
        let mut sink = KafkaSink {
            producer: Arc::clone(&producer),
            admin,
            meta: Arc::new(meta),
            progress_topic: settings.topic(PROGRESS_TOPIC),
            encoder: Encoder::new(&settings.topic_prefix, feed.server, &feed.database),
            batch: Batch::default(),
            settings,
            progress_key: key,
            feed,
            filter,
            applied: floor,
            durable: floor,
            last_commit: Instant::now(),
            topics: HashMap::new(),
            on_commit: None,
            session: session_name(),
            txn: 0,
            txn_id: String::new(),
            snapshot: None,
            resumed: false,
            open: None,
            transaction_timeout,
        };
        sink.ensure_topic(&sink.progress_topic.clone(), 1).await?;
        let context = Arc::clone(producer.context());
        blocking("taking the feed's transactional id", move || {
            producer
                .init_transactions(CALL_TIMEOUT)
                .map_err(|e| error::classify("taking the feed's transactional id", &e))
        })
        .await
        .map_err(|e| context.sharpen(e))?;
        let (topic, key) = (sink.progress_topic.clone(), sink.progress_key.clone());
        let last = blocking("reading the feed's progress", move || {
            progress::last_committed(&base, &topic, &key, CALL_TIMEOUT)
        })
        .await?;
        if let Some(last) = &last {
            sink.applied = last.end.max(floor);
            sink.durable = sink.applied;
            sink.snapshot = last.snapshot.clone();
            sink.resumed = true;
        }
        tracing::info!(feed = %sink.progress_key, committed = ?last.map(|l| l.end), start = %sink.applied, "Kafka feed ready");
        Ok(sink)
    }

    /// Calls `on_commit` after each committed Kafka transaction.
    pub fn on_commit(&mut self, on_commit: Arc<CommittedFn>) {
        self.on_commit = Some(on_commit);
    }

    /// The partitions of `topic` as the cluster's metadata lists them (0:
    /// no such topic). Asked through a consumer, whose metadata requests
    /// never make the brokers create a topic with their defaults.
    async fn partitions_of(&self, topic: &str) -> Result<i32, FeedError> {
        let (meta, name) = (Arc::clone(&self.meta), topic.to_owned());
        blocking("reading the cluster's metadata", move || {
            let metadata = meta
                .fetch_metadata(Some(&name), CALL_TIMEOUT)
                .map_err(|e| error::classify(format!("reading topic {name}"), &e))?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            Ok(i32::try_from(count).unwrap_or(i32::MAX))
        })
        .await
    }

    /// Makes `topic` exist, with `partitions` if it is made here; keeps
    /// its partition count. A topic that exists is used as it is.
    async fn ensure_topic(&mut self, topic: &str, partitions: i32) -> Result<i32, FeedError> {
        if let Some(count) = self.topics.get(topic) {
            return Ok(*count);
        }
        let existing = self.partitions_of(topic).await?;
        if existing > 0 {
            self.topics.insert(topic.to_owned(), existing);
            return Ok(existing);
        }
        let what = format!("making topic {topic}");
        let mut new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.settings.replication_factor),
        );
        if topic == self.progress_topic {
            // The last record of each feed is all that is read back.
            new = new.set("cleanup.policy", "compact");
        }
        let created = self
            .admin
            .create_topics(
                [&new],
                &AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT)),
            )
            .await
            .map_err(|e| error::classify(&what, &e))?;
        for result in created {
            match result {
                Ok(_) => tracing::info!(topic, partitions, "Kafka topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(match error::fix_of(code) {
                        Some(fix) => FeedError::definite(what, code.to_string(), fix),
                        None => FeedError::transient(what, code.to_string()),
                    });
                }
            }
        }
        // A topic just made takes a moment to show in the metadata.
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let count = self.partitions_of(topic).await?;
            if count > 0 {
                self.topics.insert(topic.to_owned(), count);
                return Ok(count);
            }
            if Instant::now() > deadline {
                return Err(FeedError::transient(
                    what,
                    "the topic made does not show in the cluster's metadata",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The messages of `changes` (of the transaction `xid`) that the
    /// filter takes, added to `out`.
    fn messages_of<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a Change>,
        xid: u32,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        out: &mut Batch,
    ) {
        let commit_ms = commit_time.micros().div_euclid(1000) + PG_EPOCH_MS;
        let origin = Origin {
            direction: self.feed.direction,
            xid,
            commit_ms,
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        for change in changes {
            if !self.filter.wanted(change, commit_lsn) {
                continue;
            }
            match &change.kind {
                // A truncate is published for the tables the target
                // truncates: those the filter takes.
                ChangeKind::Truncate {
                    relations,
                    cascade,
                    restart_identity,
                } if relations
                    .iter()
                    .any(|r| !self.filter.takes(&r.name, commit_lsn)) =>
                {
                    let taken = Change {
                        kind: ChangeKind::Truncate {
                            relations: relations
                                .iter()
                                .filter(|r| self.filter.takes(&r.name, commit_lsn))
                                .cloned()
                                .collect(),
                            cascade: *cascade,
                            restart_identity: *restart_identity,
                        },
                        ..change.clone()
                    };
                    self.encoder.encode(&taken, &origin, now_ms, false, out);
                }
                _ => self.encoder.encode(change, &origin, now_ms, false, out),
            }
        }
    }

    /// Produces `batch` into the open Kafka transaction.
    async fn produce(
        &mut self,
        batch: &Batch,
        tally: &mut HashMap<String, (u64, u64)>,
    ) -> Result<(), FeedError> {
        // Consecutive messages mostly share a topic: its partitions are
        // looked up, and its messages counted, once per run of them.
        let mut current: Option<&Arc<str>> = None;
        let mut partitions = 0;
        let mut run = (0, 0);
        for record in batch.records() {
            if current.is_none_or(|topic| !Arc::ptr_eq(topic, record.topic)) {
                if let Some(topic) = current {
                    count(tally, topic, run);
                }
                partitions = self
                    .ensure_topic(record.topic, self.settings.partitions)
                    .await?;
                current = Some(record.topic);
                run = (0, 0);
            }
            let topic = &**record.topic;
            // A keyless table's rows share partition 0, in order; a
            // truncate (no key) goes to every partition.
            match (record.key, record.every_partition) {
                (_, true) => {
                    for partition in 0..partitions {
                        self.send(topic, record.key, record.value, Some(partition))
                            .await?;
                    }
                }
                (Some(key), false) => self.send(topic, Some(key), record.value, None).await?,
                (None, false) => self.send(topic, None, record.value, Some(0)).await?,
            }
            run.0 += 1;
            run.1 += (record.key.map_or(0, <[u8]>::len) + record.value.len()) as u64;
        }
        if let Some(topic) = current {
            count(tally, topic, run);
        }
        Ok(())
    }

    /// Sends one record, waiting while librdkafka's queue is full.
    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        partition: Option<i32>,
    ) -> Result<(), FeedError> {
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: TXN_HEADER,
                value: Some(self.txn_id.as_str()),
            });
            let mut record = BaseRecord::<[u8], [u8]>::to(topic)
                .payload(value)
                .headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(error::classify(format!("producing to {topic}"), &e)),
            }
        }
    }

    /// Opens a Kafka transaction unless one is open.
    fn open(&mut self) -> Result<(), FeedError> {
        if self.open.is_none() {
            self.txn += 1;
            self.txn_id = format!("{}-{}", self.session, self.txn);
            self.producer
                .begin_transaction()
                .map_err(|e| error::classify("beginning a Kafka transaction", &e))?;
            self.open = Some(Open {
                topics: HashMap::new(),
                since: Instant::now(),
                bytes: 0,
            });
        }
        Ok(())
    }

    /// Produces `batch` into the open Kafka transaction (opened if none
    /// is); aborts it on a failure.
    async fn add(&mut self, batch: &Batch) -> Result<(), FeedError> {
        self.open()?;
        let mut tally = self
            .open
            .as_mut()
            .map(|o| std::mem::take(&mut o.topics))
            .unwrap_or_default();
        let produced = self.produce(batch, &mut tally).await;
        if let Some(open) = self.open.as_mut() {
            open.topics = tally;
            open.bytes += batch.bytes();
        }
        match produced {
            Ok(()) => Ok(()),
            Err(e) => Err(self.abort(e).await),
        }
    }

    /// Whether the position reached is due to be committed: the open
    /// transaction is old or large enough, or, with nothing published
    /// since the last commit, the position has waited long enough.
    fn due(&self) -> bool {
        match &self.open {
            Some(open) => open.since.elapsed() >= COMMIT_EVERY || open.bytes >= COMMIT_BYTES,
            None => {
                self.applied > self.durable && self.last_commit.elapsed() >= IDLE_PROGRESS_EVERY
            }
        }
    }

    /// Ends the open Kafka transaction (opened if none is) with the
    /// progress record of the position reached, and commits it; aborts it
    /// on a failure.
    async fn commit(&mut self) -> Result<(), FeedError> {
        self.open()?;
        let end = self.applied;
        let record = envelope::progress(self.feed.direction, end, self.snapshot.as_ref());
        let (topic, key) = (self.progress_topic.clone(), self.progress_key.clone());
        if let Err(e) = self
            .send(&topic, Some(key.as_bytes()), record.as_bytes(), Some(0))
            .await
        {
            return Err(self.abort(e).await);
        }
        let started = Instant::now();
        let producer = Arc::clone(&self.producer);
        let committed = blocking("committing a Kafka transaction", move || {
            // rdkafka's flush before the commit polls in steps of 100 ms
            // whatever arrives: wait for the deliveries here (the
            // producer's own thread serves them), so that its flush finds
            // nothing left and the commit costs one round trip.
            let deadline = Instant::now() + CALL_TIMEOUT;
            while producer.in_flight_count() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
            producer
                .commit_transaction(CALL_TIMEOUT)
                .map_err(|e| error::classify("committing a Kafka transaction", &e))
        })
        .await;
        if let Err(e) = committed {
            return Err(self.abort(e).await);
        }
        let open = self.open.take();
        tracing::debug!(
            feed = %self.progress_key,
            txn = self.txn,
            %end,
            ms = started.elapsed().as_millis() as u64,
            messages = open.as_ref().map_or(0, |o| o.topics.values().map(|(n, _)| n).sum::<u64>()),
            "Kafka transaction committed"
        );
        self.durable = end;
        self.last_commit = Instant::now();
        if let Some(on_commit) = &self.on_commit {
            on_commit(&Committed {
                topics: open.map(|o| o.topics).unwrap_or_default(),
                commit_seconds: started.elapsed().as_secs_f64(),
                end,
            });
        }
        Ok(())
    }

    /// Aborts the open Kafka transaction after `err`, and returns `err`:
    /// the session starts again from the last committed progress.
    async fn abort(&mut self, err: FeedError) -> FeedError {
        let err = self.producer.context().sharpen(err);
        self.open = None;
        let producer = Arc::clone(&self.producer);
        let aborted = blocking("aborting a Kafka transaction", move || {
            producer
                .abort_transaction(CALL_TIMEOUT)
                .map_err(|e| error::classify("aborting a Kafka transaction", &e))
        })
        .await;
        if let Err(e) = aborted {
            // The next session's producer aborts it when it takes the
            // transactional id.
            tracing::debug!(error = %e, "the Kafka transaction could not be aborted here");
        }
        err
    }

    /// Publishes `batch`, up to `end`, and commits at once.
    async fn publish(&mut self, batch: &Batch, end: Lsn) -> Result<(), FeedError> {
        if !batch.is_empty() {
            self.add(batch).await?;
        }
        self.applied = self.applied.max(end);
        self.commit().await
    }

    /// The position of the last committed Kafka transaction.
    pub fn committed(&self) -> Lsn {
        self.durable
    }

    /// The body of a spilled transaction, read back in pieces, into the
    /// open Kafka transaction, committed at its end.
    async fn publish_spilled(
        &mut self,
        reader: &mut crate::spill::SpillReader,
        commit: &Commit,
        batch_rows: usize,
    ) -> Result<(), FeedError> {
        let spill = |e: crate::spill::SpillError| {
            FeedError::transient("reading a large transaction from disk", e.to_string())
        };
        loop {
            let changes = match reader.next_batch(batch_rows) {
                Ok(changes) => changes,
                Err(e) => return Err(self.abort(spill(e)).await),
            };
            if changes.is_empty() {
                break;
            }
            let mut batch = std::mem::take(&mut self.batch);
            batch.clear();
            self.messages_of(
                &changes,
                commit.xid,
                commit.commit_lsn,
                commit.commit_time,
                &mut batch,
            );
            let added = self.add(&batch).await;
            self.batch = batch;
            added?;
        }
        self.applied = commit.end_lsn;
        self.commit().await
    }
}

/// Adds a run of messages to one topic to the tally.
fn count(tally: &mut HashMap<String, (u64, u64)>, topic: &str, (messages, bytes): (u64, u64)) {
    match tally.get_mut(topic) {
        Some(entry) => {
            entry.0 += messages;
            entry.1 += bytes;
        }
        None => {
            tally.insert(topic.to_owned(), (messages, bytes));
        }
    }
}

/// A name for this session of the feed, unique enough to tell its
/// transactions from another session's: the time and the process.
fn session_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}{:x}", nanos, std::process::id())
}

/// 2000-01-01 in milliseconds since the Unix epoch.
const PG_EPOCH_MS: i64 = 946_684_800_000;

impl Sink for KafkaSink {
    type Error = FeedError;

    async fn apply(&mut self, transactions: &[SourceTransaction]) -> Result<Lsn, FeedError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let mut end = None;
        let applied = self.applied;
        for txn in transactions.iter().filter(|t| t.end_lsn > applied) {
            self.messages_of(
                &txn.changes,
                txn.xid,
                txn.commit_lsn,
                txn.commit_time,
                &mut batch,
            );
            end = Some(txn.end_lsn);
        }
        let Some(end) = end else {
            self.batch = batch;
            return Ok(self.applied);
        };
        // Whole source transactions go into the open Kafka transaction,
        // committed when due: the apply does not wait on Kafka's commit
        // per batch. With nothing to publish (changes cutover skips) only
        // the position moves.
        let added = if batch.is_empty() {
            Ok(())
        } else {
            self.add(&batch).await
        };
        self.batch = batch;
        added?;
        self.applied = end;
        if self.due() {
            self.commit().await?;
        }
        Ok(self.applied)
    }

    async fn apply_spilled(
        &mut self,
        path: &Path,
        commit: &Commit,
        batch_rows: usize,
    ) -> Result<(), FeedError> {
        if commit.end_lsn <= self.applied {
            return Ok(());
        }
        let spill = |e: crate::spill::SpillError| {
            FeedError::transient("reading a large transaction from disk", e.to_string())
        };
        let mut reader = crate::spill::SpillReader::open(path).map_err(spill)?;
        let started = Instant::now();
        match self.publish_spilled(&mut reader, commit, batch_rows).await {
            // The brokers abort a transaction older than its timeout; the
            // same transaction would fail again the same way.
            Err(e) if started.elapsed() >= self.transaction_timeout => Err(FeedError::definite(
                format!(
                    "publishing source transaction {} (committed at {}), spilled to disk for its size",
                    commit.xid, commit.commit_lsn
                ),
                format!(
                    "it took {:.0} s, longer than transaction.timeout.ms ({} s), and the brokers aborted it: {e}",
                    started.elapsed().as_secs_f64(),
                    self.transaction_timeout.as_secs()
                ),
                "raise transaction.timeout.ms in [kafka.properties] and the brokers' transaction.max.timeout.ms above the time this transaction takes: one source transaction is one Kafka transaction",
            )),
            other => other,
        }
    }

    fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool {
        self.filter.wanted(change, commit_lsn)
    }

    fn applied(&self) -> Lsn {
        self.applied
    }

    fn durable(&self) -> Lsn {
        self.durable
    }

    fn flush_pending(&self) -> bool {
        self.applied > self.durable
    }

    async fn refresh_durable(&mut self) -> Result<Lsn, FeedError> {
        // Asked when the stream has nothing waiting: what the open
        // transaction holds is committed now, not when it is due.
        if self.open.is_some() || self.due() {
            self.commit().await?;
        }
        Ok(self.durable)
    }

    async fn wait_durable(&mut self) -> Result<Lsn, FeedError> {
        if self.applied > self.durable || self.open.is_some() {
            self.commit().await?;
        }
        Ok(self.durable)
    }
}

/// What `cutover check` learns of the cluster without producing anything.
#[derive(Debug)]
pub struct Probe {
    /// Brokers in the cluster's metadata.
    pub brokers: usize,
    /// The feed's topics that exist (`<prefix>.` topics).
    pub topics: Vec<String>,
}

/// Asks the cluster for its metadata with the feed's settings (servers,
/// TLS, SASL): whether it answers, and which of the feed's topics exist.
/// Takes no transactional id: a running feed is not fenced.
pub async fn probe(settings: &KafkaSettings) -> Result<Probe, FeedError> {
    let what = format!("asking the brokers {} for their metadata", settings.brokers);
    let consumer: BaseConsumer<FeedContext> = settings
        .client_config()
        .set("allow.auto.create.topics", "false")
        .create_with_context(FeedContext::default())
        .map_err(|e| error::classify(&what, &e))?;
    let prefix = settings.topic("");
    blocking(&what.clone(), move || {
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| error::classify(&what, &e))?;
        Ok(Probe {
            brokers: metadata.brokers().len(),
            topics: metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|t| t.starts_with(&prefix))
                .collect(),
        })
    })
    .await
}
