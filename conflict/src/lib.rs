//! Comparison of the rows two servers hold, with no I/O.
//!
//! `cutover verify` reads each table from both servers as of one source
//! position, in the same order and in the same text form, and feeds the
//! rows here:
//!
//! - [`row`]: a row of `COPY ... TO STDOUT` text output, split into its
//!   fields without copying them.
//! - [`fingerprint`]: a canonical hash of a row (blake3 over its fields,
//!   each length-prefixed, NULL distinct from every value), and an
//!   order-independent digest of a set of rows.
//! - [`repair`]: the write that undoes each difference.
//! - [`compare`]: the merge of the two sides' key-ordered rows into
//!   differences: missing on the target, extra on the target, changed
//!   columns; tables without a key are compared as multisets of rows.
//!
//! Equal values must have equal text on both sides: the daemon reads every
//! column as text (`::text`) under the same session settings on both
//! servers, so an `int` compares equal to a `bigint` and a `varchar(n)` to
//! a `text`. Key order must not depend on either server's collation: keys
//! are compared as integers or as bytes ([`compare::KeyKind`]), and the
//! daemon orders text keys `COLLATE "C"` on both servers.

pub mod compare;
pub mod fingerprint;
pub mod repair;
pub mod row;
