//! Stray writes written back: under `primary_wins`, a row an application
//! wrote on the target (which is not its group's primary) is made equal
//! to the source's again.
//!
//! The stray-write watcher ([`crate::run`]) hands over the rows the
//! target's stream showed an application writing. They are repaired the
//! way `verify --repair` repairs beside a daemon ([`super::beside`]): the
//! forward applier is held at a fresh source position, each row is read
//! again by key on both sides there, and only the rows that still differ
//! are written, in the repair origin, which no stream sends back. A
//! truncated table is compared whole and repaired the same way.

use std::collections::HashMap;

use cutover_conflict::repair::Fix;
use cutover_conflict::row::Row;
use cutover_replication::Lsn;
use cutover_replication::catalog::TableName;

use crate::config::Config;
use crate::live::Status;

use super::daemon::Holder;
use super::table::Plan;
use super::{VerifyError, beside, continuous, plans};

/// The hold's owner, in logs and `SHOW HOLD`.
const OWNER: &str = "the stray-write watcher";

/// A row an application wrote on the side that is not the primary: the
/// columns its change carried (by name, as text; `None` for NULL). An
/// unchanged TOASTed value is left out.
#[derive(Clone, Debug)]
pub struct Stray {
    /// Its table.
    pub table: TableName,
    /// Its columns.
    pub fields: Vec<(String, Option<Vec<u8>>)>,
}

/// What writing the stray rows back did.
#[derive(Debug, Default)]
pub struct WrittenBack {
    /// The source position the rows were read again and written at
    /// (`None`: no row to read).
    pub at: Option<Lsn>,
    /// Per stray row (in the order given), its key as reports show it
    /// (`(id=1)`, or the whole row of a table without a key), and whether
    /// a row was written (`false`: it was equal to the source's again).
    pub rows: Vec<(String, bool)>,
    /// Per table compared whole (and repaired), the source rows compared.
    pub tables: HashMap<TableName, u64>,
}

/// Writes the source's rows back over `strays`, and compares `whole`
/// (truncated) tables whole and repairs them, holding the forward applier
/// of `status` meanwhile.
pub async fn write_back(
    config: &Config,
    status: &Status,
    strays: &[Stray],
    whole: &[TableName],
) -> Result<WrittenBack, VerifyError> {
    let plans = plans(config, None).await?;
    let plan_of = |table: &TableName| plans.iter().find(|p| &p.table().name == table);
    let mut done = WrittenBack::default();
    // A table compared whole: truncated, or a row of a table without a
    // key whose change left a value out (it cannot be found by value).
    let mut whole: Vec<TableName> = whole.to_vec();
    let mut work: Vec<(&Plan, Vec<Fix>)> = Vec::new();
    let mut keys = Vec::with_capacity(strays.len());
    for stray in strays {
        let Some(plan) = plan_of(&stray.table) else {
            return Err(VerifyError::MissingTable(stray.table.clone()));
        };
        let Some(row) = row_of(plan, stray) else {
            if !whole.contains(&stray.table) {
                whole.push(stray.table.clone());
            }
            keys.push((plan, None));
            continue;
        };
        keys.push((plan, Some(plan.key_text(&row))));
        match work.iter_mut().find(|(p, _)| std::ptr::eq(*p, plan)) {
            Some((_, fixes)) => fixes.push(Fix::Update(row)),
            None => work.push((plan, vec![Fix::Update(row)])),
        }
    }
    let holder = Holder::InProcess {
        status,
        owner: OWNER,
    };
    // A watcher stopped mid-way (the stream ended under it) never leaves
    // the applier held.
    let _released = Release(status);
    let mut written: HashMap<String, Vec<String>> = HashMap::new();
    if !work.is_empty() {
        let repaired = beside::repair(config, &holder, &work).await?;
        done.at = Some(repaired.at);
        written = repaired.rows;
    }
    for (plan, key) in keys {
        let table = plan.table().name.to_string();
        let row = match key {
            Some(key) => {
                let was_written = written
                    .get(&table)
                    .is_some_and(|rows| rows.iter().any(|r| r.ends_with(&key)));
                (key, was_written)
            }
            None => (format!("(a row of {table})"), true),
        };
        done.rows.push(row);
    }
    for table in &whole {
        let Some(plan) = plan_of(table) else {
            return Err(VerifyError::MissingTable(table.clone()));
        };
        let found = continuous::compare(config, status, plan, true, OWNER).await?;
        done.at = done.at.max(found.compared_at);
        done.tables.insert(table.clone(), found.rows_checked);
    }
    Ok(done)
}

/// When the row under a stray write's key was last committed on the
/// server a config reads (its source).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowTime {
    /// No row under that key there.
    Absent,
    /// Committed then, microseconds since 2000-01-01.
    At(i64),
    /// A row whose commit time the server does not know (older than its
    /// commit timestamps, or a table without a key).
    Unknown,
}

/// For each of `strays`, in order, when the row under its key was last
/// committed on the server `config` reads (`track_commit_timestamp` must
/// be on there).
pub async fn commit_times(config: &Config, strays: &[Stray]) -> Result<Vec<RowTime>, VerifyError> {
    let plans = plans(config, None).await?;
    let source = super::connect(config, "source").await?;
    let mut times = vec![RowTime::Unknown; strays.len()];
    for plan in &plans {
        if plan.layout().is_keyless() {
            continue;
        }
        let mine: Vec<(usize, Row)> = strays
            .iter()
            .enumerate()
            .filter(|(_, s)| s.table == plan.table().name)
            .filter_map(|(i, s)| row_of(plan, s).map(|row| (i, row)))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let rows: Vec<&Row> = mine.iter().map(|(_, row)| row).collect();
        let found = source
            .query(&plan.commit_times_sql(&rows), &[])
            .await
            .map_err(|e| VerifyError::Query {
                role: "source",
                what: format!("reading when rows of {} were committed", plan.table().name),
                detail: cutover_replication::client::describe(&e),
            })?;
        let unreadable = |e: tokio_postgres::Error| VerifyError::Query {
            role: "source",
            what: format!("reading when rows of {} were committed", plan.table().name),
            detail: cutover_replication::client::describe(&e),
        };
        for (i, _) in &mine {
            times[*i] = RowTime::Absent;
        }
        for r in &found {
            let ord: i64 = r.try_get(0).map_err(unreadable)?;
            let at: Option<i64> = r.try_get(1).map_err(unreadable)?;
            if let Some((i, _)) = usize::try_from(ord - 1).ok().and_then(|o| mine.get(o)) {
                times[*i] = at.map_or(RowTime::Unknown, RowTime::At);
            }
        }
    }
    Ok(times)
}

/// Releases the watcher's hold of the applier when dropped.
struct Release<'a>(&'a Status);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.hold.release(Some(OWNER));
    }
}

/// The row to read again for `stray`: its key's columns (every column of
/// a table without a key) in the plan's order; `None` when a column it
/// needs was left out of the change.
fn row_of(plan: &Plan, stray: &Stray) -> Option<Row> {
    let layout = plan.layout();
    let needed = if layout.is_keyless() {
        &layout.names[..]
    } else {
        &layout.names[..layout.key.len()]
    };
    let mut values = Vec::with_capacity(needed.len());
    for name in needed {
        let (_, value) = stray.fields.iter().find(|(n, _)| n == name)?;
        values.push(value.as_deref());
    }
    Some(Row::from_fields(values))
}
