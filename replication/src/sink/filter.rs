//! Which changes of a stream a sink writes: the same for every sink of a
//! stream, so that the PostgreSQL target and the Kafka feed carry the same
//! changes (docs/kafka.md).
//!
//! A change is left out when it carries an origin the stream skips (the
//! other direction's own writes, cutover's repairs: nothing loops), when
//! its table's copy already holds it (the per-table seam, `copied_at`), or
//! when the route gives its table to the other server (table groups).

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::TableName;
use crate::change::{Change, ChangeKind};
use crate::lsn::Lsn;

/// Whether a change to a table, committed at a position of the server
/// read, is applied: its primary at that position is the server read.
#[derive(Clone)]
pub struct Route(pub Arc<RouteFn>);

/// The function a [`Route`] calls.
pub type RouteFn = dyn Fn(&TableName, Lsn) -> bool + Send + Sync;

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Route")
    }
}

/// The changes a stream's sinks write.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Per table, the commit position from which its changes are not in
    /// its copy. Looked up for every change: hashed with foldhash (seeded
    /// per process), not SipHash.
    copied_at: HashMap<TableName, Lsn, foldhash::fast::RandomState>,
    /// Origins whose changes are not written.
    skip_origins: Vec<String>,
    /// Which tables are written, per commit position (`None`: all).
    route: Option<Route>,
}

impl Filter {
    /// Every change but those `skip_origins` made or `copied_at` holds.
    pub fn new(copied_at: HashMap<TableName, Lsn>, skip_origins: Vec<String>) -> Filter {
        Filter {
            copied_at: copied_at.into_iter().collect(),
            skip_origins,
            route: None,
        }
    }

    /// Writes only the changes `route` takes.
    pub fn set_route(&mut self, route: Route) {
        self.route = Some(route);
    }

    /// Whether `change` carries an origin that is skipped.
    pub fn origin_skipped(&self, change: &Change) -> bool {
        change
            .origin
            .as_ref()
            .is_some_and(|origin| self.skip_origins.iter().any(|o| o.as_str() == &**origin))
    }

    /// Whether a change to `table` committed at `commit_lsn` is written by
    /// the table's seam (`copied_at`) and the route.
    pub fn takes(&self, table: &TableName, commit_lsn: Lsn) -> bool {
        self.seamed(table, commit_lsn)
            && self
                .route
                .as_ref()
                .is_none_or(|route| (route.0)(table, commit_lsn))
    }

    /// Whether `table`'s copy does not hold a change committed at
    /// `commit_lsn`.
    fn seamed(&self, table: &TableName, commit_lsn: Lsn) -> bool {
        self.copied_at.get(table).is_none_or(|at| commit_lsn >= *at)
    }

    /// Whether `change`, of a transaction committed at `commit_lsn`, is
    /// written.
    pub fn wanted(&self, change: &Change, commit_lsn: Lsn) -> bool {
        if self.origin_skipped(change) {
            return false;
        }
        let first = match &change.kind {
            ChangeKind::Insert { relation, .. }
            | ChangeKind::Update { relation, .. }
            | ChangeKind::Delete { relation, .. } => &relation.name,
            // A truncate is applied when any of its tables wants it; the
            // tables copied later are empty on the source at their snapshot
            // only if the truncate came before, so honour it per table.
            ChangeKind::Truncate { relations, .. } => {
                return relations.iter().any(|r| self.takes(&r.name, commit_lsn));
            }
            ChangeKind::TruncatePartition(truncate) => &truncate.root,
            // DDL on a table out of scope is not ours; on a table copied
            // after it, it is in the copy.
            ChangeKind::Ddl(ddl) => {
                return ddl.in_scope && self.takes(&ddl.table, commit_lsn);
            }
        };
        self.takes(first, commit_lsn)
    }

    /// The tables of `change` that the route alone keeps from being
    /// written: a change an application made (not one of the skipped
    /// origins) to a table whose primary is the other server. Empty when
    /// the change is written, or skipped for another reason.
    pub fn routed_away<'c>(&self, change: &'c Change, commit_lsn: Lsn) -> Vec<&'c TableName> {
        let Some(route) = &self.route else {
            return Vec::new();
        };
        if self.origin_skipped(change) {
            return Vec::new();
        }
        let tables: Vec<&TableName> = match &change.kind {
            ChangeKind::Insert { relation, .. }
            | ChangeKind::Update { relation, .. }
            | ChangeKind::Delete { relation, .. } => {
                // The common case, on the hot path: no allocation for a
                // change that is written.
                let table = &relation.name;
                return if self.seamed(table, commit_lsn) && !(route.0)(table, commit_lsn) {
                    vec![table]
                } else {
                    Vec::new()
                };
            }
            ChangeKind::Truncate { relations, .. } => relations.iter().map(|r| &r.name).collect(),
            ChangeKind::TruncatePartition(truncate) => vec![&truncate.root],
            ChangeKind::Ddl(ddl) if ddl.in_scope => vec![&ddl.table],
            ChangeKind::Ddl(_) => Vec::new(),
        };
        tables
            .into_iter()
            .filter(|t| self.seamed(t, commit_lsn) && !(route.0)(t, commit_lsn))
            .collect()
    }
}
