//! Comparison of the rows two servers hold, and the policies that settle
//! writes made on both, with no I/O.
//!
//! `cutover verify` reads each table from both servers as of one source
//! position, in the same order and in the same text form, and feeds the
//! rows here:
//!
//! - [`row`]: a row of `COPY ... TO STDOUT` text output, split into its
//!   fields without copying them.
//! - [`fingerprint`]: a canonical hash of a row (blake3 over its `COPY`
//!   line, whose escaping tells every field and NULL apart), and an
//!   order-independent digest of a set of rows.
//! - [`repair`]: the write that undoes each difference.
//! - [`compare`]: the merge of the two sides' key-ordered rows into
//!   differences: missing on the target, extra on the target, changed
//!   columns; tables without a key are compared as multisets of rows.
//!
//! - [`policy`]: in a phased cutover or a parallel run, what to do with a
//!   change an application made on the side that is not its group's
//!   primary (a stray write) or that meets a row written on the other
//!   side (a conflict).
//!
//! Equal values must have equal text on both sides: the daemon reads every
//! column as text (`::text`) under the same session settings on both
//! servers, so an `int` compares equal to a `bigint` and a `varchar(n)` to
//! a `text`. Key order must not depend on either server's collation: keys
//! are compared as integers or as bytes ([`compare::KeyKind`]), and the
//! daemon orders text keys `COLLATE "C"` on both servers.

pub mod compare;
pub mod fingerprint;
pub mod policy;
pub mod repair;
pub mod row;
