//! The benchmark harness of `make bench` (docs/benchmarks.md).
//!
//! Two throwaway clusters from the test harness, one dataset generated
//! from a seed, and every scenario run for `cutover` and for what a user
//! would otherwise pick, alternately, on the same clusters. Every figure
//! comes from a wall clock around a whole operation, from the servers'
//! own LSNs, or from `/proc`; none is typed in.

pub mod context;
pub mod dataset;
pub mod kafka;
pub mod report;
pub mod scenarios;
pub mod switch;
pub mod verify;
