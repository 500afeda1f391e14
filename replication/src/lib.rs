//! The replication side of cutover: everything that speaks to PostgreSQL.
//!
//! - [`lsn`]: WAL positions.
//! - [`apply`]: applying source transactions to the target.
//! - [`conninfo`]: connection strings, one parser for every connection.
//! - [`tls`]: TLS with libpq's `sslmode` semantics.
//! - [`client`]: regular SQL connections with actionable errors.
//! - [`catalog`]: what the servers hold: tables, keys, columns, sequences.
//! - [`secret`]: passwords that never print.
//! - [`session`]: the replication protocol session (startup, TLS,
//!   authentication, slot commands).
//! - [`stream`]: the replication stream with its status updates.
//! - [`pgoutput`]: decoding of the pgoutput messages into events.
//! - [`value`]: typed views of column values.
//! - [`slot`]: slot inspection and publications over SQL.
//! - [`snapshot`]: the snapshot copy's chunks and data path.
//! - [`spill`]: streamed transactions written to disk until they commit.
//! - [`error`]: replication errors, transient or definite.

pub mod apply;
pub mod catalog;
pub mod client;
pub mod conninfo;
pub mod ddl;
pub mod error;
pub mod events;
pub mod lsn;
pub mod partition;
pub mod pgoutput;
pub mod secret;
pub mod session;
pub mod slot;
pub mod snapshot;
pub mod spill;
pub mod stream;
pub mod tls;
pub mod value;

pub use conninfo::ConnInfo;
pub use lsn::Lsn;
pub use secret::Secret;
