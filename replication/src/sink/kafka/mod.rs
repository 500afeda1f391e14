//! The Kafka sink: each stream's changes published as Debezium envelopes
//! ([`super::envelope`]), exactly once, with librdkafka's transactional
//! producer (docs/kafka.md).
//!
//! - **One Kafka transaction per batch.** A batch's messages and one
//!   progress record (the end of its last source transaction) are
//!   produced in one transaction on `<topic_prefix>.cutover.progress`. A
//!   consumer reading `read_committed` sees a batch whole or not at all.
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

use crate::change::{Change, Commit, PgTimestamp, SourceTransaction};
use crate::lsn::Lsn;
use crate::secret::Secret;
use crate::sink::Sink;
use crate::sink::envelope::{self, Message, Origin};
use crate::sink::filter::Filter;

mod error;
mod progress;

pub use error::FeedError;

/// The topic of progress records, after the prefix.
pub const PROGRESS_TOPIC: &str = "cutover.progress";

/// How long a call to the brokers may take before the session starts
/// again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// With nothing to publish, the position is committed this often at most
/// (the slot's acknowledgement follows it).
const IDLE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

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
        config.set_log_level(RDKafkaLogLevel::Warning);
        config
    }

    /// The full name of `topic` (after the prefix).
    pub fn topic(&self, topic: &str) -> String {
        if self.topic_prefix.is_empty() {
            topic.to_owned()
        } else {
            format!("{}.{topic}", self.topic_prefix)
        }
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
/// log.
#[derive(Clone, Debug)]
struct FeedContext;

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
        tracing::warn!(%error, "Kafka: {reason}");
    }
}

impl ConsumerContext for FeedContext {}

impl ProducerContext for FeedContext {
    type DeliveryOpaque = ();

    // A message that fails makes its transaction's commit fail: nothing
    // to do per message.
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
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
        let producer: ThreadedProducer<FeedContext> = base
            .clone()
            .set("transactional.id", format!("cutover.{key}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create_with_context(FeedContext)
            .map_err(|e| error::classify("configuring the producer", &e))?;
        let producer = Arc::new(producer);
        let admin: AdminClient<DefaultClientContext> = base
            .create()
            .map_err(|e| error::classify("configuring the admin client", &e))?;
        let meta: BaseConsumer<FeedContext> = base
            .clone()
            .set("allow.auto.create.topics", "false")
            .create_with_context(FeedContext)
            .map_err(|e| error::classify("configuring the metadata client", &e))?;
        let mut sink = KafkaSink {
            producer: Arc::clone(&producer),
            admin,
            meta: Arc::new(meta),
            progress_topic: settings.topic(PROGRESS_TOPIC),
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
        };
        sink.ensure_topic(&sink.progress_topic.clone(), 1).await?;
        blocking("taking the feed's transactional id", move || {
            producer
                .init_transactions(CALL_TIMEOUT)
                .map_err(|e| error::classify("taking the feed's transactional id", &e))
        })
        .await?;
        let (producer, topic, key) = (
            Arc::clone(&sink.producer),
            sink.progress_topic.clone(),
            sink.progress_key.clone(),
        );
        let last = blocking("reading the feed's progress", move || {
            let (_, high) = producer
                .client()
                .fetch_watermarks(&topic, 0, CALL_TIMEOUT)
                .map_err(|e| error::classify(format!("reading the end of {topic}"), &e))?;
            progress::last_committed(&base, &topic, &key, high, CALL_TIMEOUT)
        })
        .await?;
        if let Some(last) = last {
            sink.applied = last.max(floor);
            sink.durable = sink.applied;
        }
        tracing::info!(feed = %sink.progress_key, committed = ?last, start = %sink.applied, "Kafka feed ready");
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

    /// The messages of `changes` (of the transaction `commit`) that the
    /// filter takes, added to `out`.
    fn messages_of<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
        xid: u32,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        out: &mut Vec<Message>,
    ) {
        let commit_ms = commit_time.micros().div_euclid(1000) + PG_EPOCH_MS;
        let origin = Origin {
            server: self.feed.server,
            database: &self.feed.database,
            direction: self.feed.direction,
            xid,
            commit_ms,
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        for change in changes {
            if self.filter.wanted(change, commit_lsn) {
                out.extend(envelope::messages(change, &origin, now_ms, false));
            }
        }
    }

    /// Produces `messages` into the open Kafka transaction.
    async fn produce(
        &mut self,
        messages: &[Message],
        tally: &mut HashMap<String, (u64, u64)>,
    ) -> Result<(), FeedError> {
        for message in messages {
            let topic = self.settings.topic(&message.topic);
            let partitions = self.ensure_topic(&topic, self.settings.partitions).await?;
            // A keyless table's rows share partition 0, in order; a
            // truncate (no key) goes to every partition.
            let targets: Vec<Option<i32>> = match (&message.key, message.every_partition) {
                (_, true) => (0..partitions).map(Some).collect(),
                (Some(_), false) => vec![None],
                (None, false) => vec![Some(0)],
            };
            for partition in targets {
                self.send(&topic, message.key.as_deref(), &message.value, partition)
                    .await?;
            }
            let entry = tally.entry(topic).or_default();
            entry.0 += 1;
            entry.1 += (message.key.as_ref().map_or(0, String::len) + message.value.len()) as u64;
        }
        Ok(())
    }

    /// Sends one record, waiting while librdkafka's queue is full.
    async fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &str,
        partition: Option<i32>,
    ) -> Result<(), FeedError> {
        let txn = format!("{}-{}", self.session, self.txn);
        loop {
            let headers = OwnedHeaders::new().insert(Header {
                key: TXN_HEADER,
                value: Some(txn.as_str()),
            });
            let mut record = BaseRecord::<str, str>::to(topic)
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

    /// Begins a Kafka transaction.
    fn begin(&mut self) -> Result<(), FeedError> {
        self.txn += 1;
        self.producer
            .begin_transaction()
            .map_err(|e| error::classify("beginning a Kafka transaction", &e))
    }

    /// Ends the open Kafka transaction with the progress record of `end`
    /// and commits it.
    async fn commit(
        &mut self,
        end: Lsn,
        topics: HashMap<String, (u64, u64)>,
    ) -> Result<(), FeedError> {
        let record = envelope::progress(self.feed.direction, end);
        let (topic, key) = (self.progress_topic.clone(), self.progress_key.clone());
        self.send(&topic, Some(&key), &record, Some(0)).await?;
        let started = Instant::now();
        let producer = Arc::clone(&self.producer);
        blocking("committing a Kafka transaction", move || {
            producer
                .commit_transaction(CALL_TIMEOUT)
                .map_err(|e| error::classify("committing a Kafka transaction", &e))
        })
        .await?;
        self.applied = self.applied.max(end);
        self.durable = end;
        self.last_commit = Instant::now();
        if let Some(on_commit) = &self.on_commit {
            on_commit(&Committed {
                topics,
                commit_seconds: started.elapsed().as_secs_f64(),
                end,
            });
        }
        Ok(())
    }

    /// Aborts the open Kafka transaction after `err`, and returns `err`:
    /// the session starts again from the last committed progress.
    async fn abort(&self, err: FeedError) -> FeedError {
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

    /// Publishes `messages`, up to `end`, in one Kafka transaction.
    async fn publish(&mut self, messages: &[Message], end: Lsn) -> Result<(), FeedError> {
        self.begin()?;
        let mut topics = HashMap::new();
        let done = match self.produce(messages, &mut topics).await {
            Ok(()) => self.commit(end, topics).await,
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => Ok(()),
            Err(e) => Err(self.abort(e).await),
        }
    }

    /// Commits the position reached with nothing to publish.
    async fn commit_position(&mut self) -> Result<Lsn, FeedError> {
        if self.applied > self.durable {
            let end = self.applied;
            self.publish(&[], end).await?;
        }
        Ok(self.durable)
    }

    /// The position of the last committed Kafka transaction.
    pub fn committed(&self) -> Lsn {
        self.durable
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
        let mut messages = Vec::new();
        let mut end = None;
        for txn in transactions.iter().filter(|t| t.end_lsn > self.applied) {
            self.messages_of(
                &txn.changes,
                txn.xid,
                txn.commit_lsn,
                txn.commit_time,
                &mut messages,
            );
            end = Some(txn.end_lsn);
        }
        let Some(end) = end else {
            return Ok(self.applied);
        };
        if messages.is_empty() {
            // Nothing to publish (changes cutover skips): the position is
            // committed later, not a Kafka transaction per batch.
            self.applied = end;
            if self.last_commit.elapsed() >= IDLE_PROGRESS_EVERY {
                self.commit_position().await?;
            }
            return Ok(self.applied);
        }
        self.publish(&messages, end).await?;
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
        // One Kafka transaction, whatever the size: its messages become
        // visible whole.
        self.begin()?;
        let mut topics = HashMap::new();
        let produced = async {
            loop {
                let changes = reader.next_batch(batch_rows).map_err(spill)?;
                if changes.is_empty() {
                    break;
                }
                let mut messages = Vec::new();
                self.messages_of(
                    &changes,
                    commit.xid,
                    commit.commit_lsn,
                    commit.commit_time,
                    &mut messages,
                );
                self.produce(&messages, &mut topics).await?;
            }
            self.commit(commit.end_lsn, std::mem::take(&mut topics))
                .await
        }
        .await;
        match produced {
            Ok(()) => Ok(()),
            Err(e) => Err(self.abort(e).await),
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
        if self.last_commit.elapsed() >= IDLE_PROGRESS_EVERY {
            self.commit_position().await?;
        }
        Ok(self.durable)
    }

    async fn wait_durable(&mut self) -> Result<Lsn, FeedError> {
        self.commit_position().await
    }
}
