//! The replication side of cutover: everything that speaks to PostgreSQL.
//!
//! Connections and vocabulary:
//! - [`lsn`]: WAL positions.
//! - [`secret`]: passwords that never print.
//! - [`conninfo`]: connection strings, one parser for every connection.
//! - [`tls`]: TLS with libpq's `sslmode` semantics.
//! - [`client`]: regular SQL connections with actionable errors.
//! - [`error`]: replication errors, transient or definite.
//! - [`sql`]: the one way to build SQL: quoted names and literals, a small
//!   statement builder.
//! - [`catalog`]: what the servers hold: tables, keys, columns, sequences.
//!
//! The pipeline (docs/architecture.md, "Data flow"):
//! - [`change`]: the pipeline's own types, which the decoder produces and
//!   every consumer takes.
//! - [`value`]: typed views of column values.
//! - [`session`]: the replication protocol session (startup, TLS,
//!   authentication, slot commands).
//! - [`stream`]: the replication stream with its status updates.
//! - [`pgoutput`]: decoding of the pgoutput messages into changes.
//! - [`spill`]: streamed transactions written to disk until they commit.
//! - [`sink`]: where changes go, behind one delivery contract; the
//!   PostgreSQL sink.
//!
//! The source's side of a migration:
//! - [`slot`]: slot inspection and publications over SQL.
//! - [`snapshot`]: the snapshot copy's chunks and data path.
//! - [`events`]: the table through which cutover's triggers report events.
//! - [`partition`]: TRUNCATE of one partition, caught by a trigger.
//! - [`ddl`]: DDL on the source, caught by event triggers.
//!
//! The switch:
//! - [`fence`]: the write fence on a server that is no longer primary.
//! - [`sequences`]: sequences carried over to the new primary.
//! - [`cleanup`]: every object cutover made on a server, removed.
//!
//! Dependency rule inside the crate: `pgoutput` produces [`change`] types
//! and knows nothing of the sinks; [`sink`] consumes them and knows nothing
//! of the wire (`session`, `stream`, `pgoutput`).

pub mod catalog;
pub mod change;
pub mod cleanup;
pub mod client;
pub mod conninfo;
pub mod ddl;
pub mod error;
pub mod events;
pub mod fence;
pub mod lsn;
pub mod mapping;
pub mod partition;
pub mod pgoutput;
pub mod secret;
pub mod sequences;
pub mod session;
pub mod sink;
pub mod slot;
pub mod snapshot;
pub mod spill;
pub mod sql;
pub mod stream;
pub mod tls;
pub mod value;

pub use conninfo::ConnInfo;
pub use lsn::Lsn;
pub use secret::Secret;
