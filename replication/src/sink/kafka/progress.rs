//! The feed's progress records: where each stream of a migration stands in
//! Kafka. Each Kafka transaction of the feed carries one, keyed by the
//! feed (`<slot>.<direction>`), on the single partition of
//! `<topic_prefix>.cutover.progress`; the last one committed says which
//! source transactions Kafka holds.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::lsn::Lsn;
use crate::sink::envelope::SnapshotMark;

use super::error::{FeedError, classify};

/// The last committed progress of the feed `key` on `topic`, read with a
/// `read_committed` consumer once no transaction begun before the call is
/// still open (another feed's, sharing the partition, could hide the
/// feed's last record behind it). Blocking.
///
/// The feed's own producer has finished its transactions before this is
/// called (`init_transactions`), so every record of the feed is below the
/// partition's end as it is now, uncommitted records included.
pub(super) fn last_committed(
    base: &ClientConfig,
    topic: &str,
    key: &str,
    wait: Duration,
) -> Result<Option<Progress>, FeedError> {
    let what = format!("reading the feed's progress from {topic}");
    // librdkafka asks for offsets with the client's isolation level, and
    // its default is read_committed: the end, uncommitted records
    // included, needs a read_uncommitted client.
    let end: BaseConsumer = base
        .clone()
        .set("isolation.level", "read_uncommitted")
        .create()
        .map_err(|e| classify(&what, &e))?;
    let (_, high) = end
        .fetch_watermarks(topic, 0, wait)
        .map_err(|e| classify(&what, &e))?;
    let consumer: BaseConsumer = base
        .clone()
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("group.id", format!("cutover.{key}.progress"))
        .create()
        .map_err(|e| classify(&what, &e))?;
    let deadline = Instant::now() + wait;
    // The last stable offset: below it, every transaction is decided.
    let low = loop {
        let (low, stable) = consumer
            .fetch_watermarks(topic, 0, wait)
            .map_err(|e| classify(&what, &e))?;
        if stable >= high {
            break low;
        }
        if Instant::now() > deadline {
            return Err(FeedError::transient(
                what,
                format!(
                    "a transaction on the progress topic stays open (its last stable offset is {stable}, its end {high}); another producer has not finished"
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if high <= low {
        return Ok(None);
    }
    // From the end backwards, in growing windows: the topic is compacted,
    // but a long feed leaves many records before compaction runs.
    let mut window = 1024_i64;
    loop {
        let start = (high - window).max(low);
        let found = scan(&consumer, topic, key, start, deadline).map_err(|e| match e {
            Scan::Kafka(e) => classify(&what, &e),
            Scan::Timeout => FeedError::transient(&what, "no answer before the timeout"),
            Scan::Bad(detail) => FeedError::definite(
                &what,
                detail,
                "the progress topic holds a record under the feed's key that cutover did not write: give the feed its own kafka.topic_prefix",
            ),
        })?;
        if found.is_some() || start == low {
            return Ok(found);
        }
        window = window.saturating_mul(8);
    }
}

/// Why a scan stopped.
enum Scan {
    Kafka(KafkaError),
    Timeout,
    Bad(String),
}

/// The feed's last position among the records from `start` to the end.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    key: &str,
    start: i64,
    deadline: Instant,
) -> Result<Option<Progress>, Scan> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(start))
        .map_err(Scan::Kafka)?;
    consumer.assign(&assignment).map_err(Scan::Kafka)?;
    let mut found = None;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            None if Instant::now() > deadline => return Err(Scan::Timeout),
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(found),
            Some(Err(e)) => return Err(Scan::Kafka(e)),
            Some(Ok(message)) if message.key() == Some(key.as_bytes()) => {
                let payload = message.payload().unwrap_or_default();
                found = Some(parse(payload).ok_or_else(|| {
                    Scan::Bad(format!(
                        "the record at offset {} is not a progress record: {}",
                        message.offset(),
                        String::from_utf8_lossy(&payload[..payload.len().min(200)])
                    ))
                })?);
            }
            // Another feed's record.
            Some(Ok(_)) => {}
        }
    }
}

/// What a progress record holds: a position, and how far the snapshot is
/// published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Progress {
    /// The end of the last source transaction published.
    pub(super) end: Lsn,
    /// The snapshot's mark, when the feed publishes one.
    pub(super) snapshot: Option<SnapshotMark>,
}

/// The progress a record holds.
fn parse(payload: &[u8]) -> Option<Progress> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let end = value.get("end_lsn")?.as_u64().map(Lsn::from_u64)?;
    let snapshot = match value.get("snapshot") {
        None => None,
        Some(mark) if mark == "done" => Some(SnapshotMark::Done),
        Some(mark) => Some(SnapshotMark::At {
            table: crate::catalog::TableName::new(
                mark.get("schema")?.as_str()?,
                mark.get("table")?.as_str()?,
            ),
            block: mark.get("block")?.as_u64()?,
        }),
    };
    Some(Progress { end, snapshot })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_record_reads_back_and_anything_else_does_not() {
        let at = Lsn::from_u64(0x1_0000_0010);
        let record = crate::sink::envelope::progress("forward", at, None);
        assert_eq!(
            parse(record.as_bytes()),
            Some(Progress {
                end: at,
                snapshot: None
            })
        );
        for mark in [
            SnapshotMark::Done,
            SnapshotMark::At {
                table: crate::catalog::TableName::new("public", "accounts.eu"),
                block: 1024,
            },
        ] {
            let record = crate::sink::envelope::progress("forward", at, Some(&mark));
            assert_eq!(
                parse(record.as_bytes()),
                Some(Progress {
                    end: at,
                    snapshot: Some(mark)
                })
            );
        }
        assert_eq!(parse(b"{\"end_lsn\":\"x\"}"), None);
        assert_eq!(parse(b"not json"), None);
    }
}
