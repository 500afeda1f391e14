//! The steps of a switch or rollback, each safe to run again after a
//! crash (every one checks what is already done), and their undo.

use std::sync::Arc;

use cutover_replication::catalog::{self, TableName};
use cutover_replication::session::{Session, SnapshotAction};
use cutover_replication::{Lsn, fence, sequences, slot};
use tokio_postgres::Client;

use crate::config::Config;
use crate::copy;
use crate::direction::Direction;
use crate::live::Status;
use crate::run;
use crate::store::Store;

use super::hooks::{self, Facts};
use super::journal::{Flip, Journal, Kind, Outcome, Server, Step, StreamStart, SwitchState};
use super::{Options, SwitchError, connect, query};

/// What every step works with.
pub(super) struct Ctx<'a> {
    pub(super) config: &'a Config,
    pub(super) store: &'a Store,
    pub(super) kind: Kind,
    /// The direction streaming away from the old primary, and its config
    /// (read the old primary, write the new one).
    pub(super) old_direction: Direction,
    pub(super) old_config: Config,
    /// The direction streaming away from the new primary.
    pub(super) new_direction: Direction,
    pub(super) new_config: Config,
    /// Connections to the old and new primary.
    pub(super) old: Client,
    pub(super) new: Client,
    /// The table group moved (`None`: every table).
    pub(super) group: Option<String>,
}

impl<'a> Ctx<'a> {
    pub(super) async fn new(
        config: &'a Config,
        store: &'a Store,
        kind: Kind,
        group: Option<String>,
    ) -> Result<Ctx<'a>, SwitchError> {
        let old_direction = kind.from().streams();
        let new_direction = kind.to().streams();
        Ok(Ctx {
            config,
            store,
            kind,
            old_direction,
            old_config: config.for_direction(old_direction),
            new_direction,
            new_config: config.for_direction(new_direction),
            old: connect(config, kind.from()).await?,
            new: connect(config, kind.to()).await?,
            group,
        })
    }

    pub(super) fn old_name(&self) -> &'static str {
        self.kind.from().name()
    }

    pub(super) fn new_name(&self) -> &'static str {
        self.kind.to().name()
    }

    fn facts(&self, step: &'static str, journal: &Journal) -> Result<Facts<'_>, SwitchError> {
        Ok(Facts {
            kind: self.kind,
            step,
            new_primary: &self.old_config.target()?.conninfo,
            old_primary: &self.old_config.source.conninfo,
            fence_lsn: journal.fence_lsn.map(|l| l.to_string()),
        })
    }

    /// The tables in scope on the old primary (of the group moved).
    pub(super) async fn old_tables(&self) -> Result<Vec<TableName>, SwitchError> {
        group_tables(
            self.config,
            &self.old,
            &self.old_config,
            self.group.as_deref(),
        )
        .await
        .map_err(|detail| SwitchError::Query {
            server: self.old_name(),
            what: "listing the tables in scope".into(),
            detail,
        })
    }

    /// The sequences in scope on the old primary: matched by the table
    /// patterns, or owned by a table in scope.
    pub(super) async fn sequences(&self) -> Result<Vec<TableName>, SwitchError> {
        let tables = self.old_tables().await?;
        let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
        // Sequences a column default of a table in scope calls
        // (`DEFAULT nextval('s')` without `OWNED BY`).
        let defaults: Vec<TableName> = self
            .old
            .query(
                "SELECT DISTINCT n.nspname::text, c.relname::text
                   FROM pg_attrdef ad
                   JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                   JOIN pg_class c ON c.oid = d.refobjid AND c.relkind = 'S'
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE d.refclassid = 'pg_class'::regclass
                    AND ad.adrelid = ANY (SELECT t::regclass FROM unnest($1::text[]) AS t)",
                &[&names],
            )
            .await
            .map_err(query(
                self.old_name(),
                "listing the sequences of column defaults",
            ))?
            .iter()
            .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let mut sequences: Vec<TableName> = catalog::sequences(&self.old)
            .await
            .map_err(query(self.old_name(), "listing sequences"))?
            .into_iter()
            .filter(|s| {
                // A group moves the sequences its tables use; the whole
                // migration also those its patterns name.
                (self.group.is_none() && self.config.scope.contains(&s.name))
                    || s.owned_by.as_ref().is_some_and(|o| tables.contains(o))
                    || defaults.contains(&s.name)
            })
            .map(|s| s.name)
            .collect();
        sequences.dedup();
        Ok(sequences)
    }

    /// The old direction streamed up to `until` on the old primary.
    ///
    /// Bounded: the last catch-up left less than `switch.max_lag_seconds`
    /// to apply, so a drain that takes twice that is stuck (the new
    /// primary unreachable, its apply refused and retried) and fails the
    /// step; the switch is undone and the old primary takes writes again,
    /// instead of neither taking any for as long as the fault lasts.
    pub(super) async fn drain(&self, until: Lsn) -> Result<(), SwitchError> {
        let status = Arc::new(Status::new(&self.old_config.slot, self.old_direction));
        let limit = self.config.switch.max_lag.saturating_mul(2);
        let drain = async {
            // Planning reads the new primary too: retried like the stream.
            let plan = loop {
                match run::stream_plan(self.config, self.store, self.old_direction, &status.metrics)
                    .await
                {
                    Ok(plan) => break plan,
                    Err(err) if err.is_transient() => {
                        tracing::warn!(error = %err, "the drain cannot start yet; trying again in 1 s");
                        status.error(crate::live::ErrorKind::TargetTransient, &err.to_string());
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(err) => return Err(err),
                }
            };
            run::drain(&self.old_config, self.store, &status, &plan, until).await
        };
        match tokio::time::timeout(limit, drain).await {
            Ok(drained) => Ok(drained?),
            Err(_) => Err(SwitchError::DrainStuck {
                new: self.new_name(),
                seconds: limit.as_secs(),
                last_error: status.view().last_error.map(|e| e.message),
            }),
        }
    }

    /// The old primary's WAL insert position.
    pub(super) async fn old_position(&self) -> Result<Lsn, SwitchError> {
        insert_position(&self.old, self.old_name()).await
    }

    /// Runs one step; returns what it did.
    pub(super) async fn step(
        &mut self,
        step: Step,
        state: &mut SwitchState,
        journal: &mut Journal,
        options: &Options,
    ) -> Result<String, SwitchError> {
        match step {
            Step::Preflight => self.preflight(options).await,
            Step::PrepareReturn => self.prepare_return(state, journal).await,
            Step::Fence => self.fence(journal).await,
            Step::Drain => self.drain_to_fence(state, journal).await,
            Step::Sequences => self.carry_sequences().await,
            Step::Open => self.open(state, journal).await,
            Step::Stream => self.stream(state, journal).await,
        }
    }

    async fn prepare_return(
        &self,
        state: &mut SwitchState,
        journal: &mut Journal,
    ) -> Result<String, SwitchError> {
        let tables = copy::tables_in_scope(&self.new, &self.new_config)
            .await
            .map_err(|e| SwitchError::Query {
                server: self.new_name(),
                what: "listing the tables in scope".into(),
                detail: e.to_string(),
            })?;
        copy::ensure_publications(&self.new, self.store, &self.new_config, &tables)
            .await
            .map_err(|e| SwitchError::Query {
                server: self.new_name(),
                what: "making the publications of the way back".into(),
                detail: e.to_string(),
            })?;
        let publications = copy::publications(&self.new, &self.new_config)
            .await
            .map_err(|e| SwitchError::Query {
                server: self.new_name(),
                what: "reading publications".into(),
                detail: e.to_string(),
            })?;
        let name = self.new_config.slot.clone();
        let existing = slot::slot_state(&self.new, &name)
            .await
            .map_err(query(self.new_name(), "reading replication slots"))?;
        // Made by this journal before a crash (the intent below was
        // recorded first): kept as made, and dropped by an undo.
        let made_here = journal.stream.as_ref().is_some_and(|s| s.created);
        let (start, created) = match existing {
            Some(existing) => {
                let usable = existing.plugin.as_deref() == Some("pgoutput")
                    && !existing.temporary
                    && existing.wal_status.as_deref() != Some("lost");
                let confirmed = existing.confirmed_flush.filter(|_| usable).ok_or_else(|| {
                    SwitchError::Refused(format!(
                        "the {} has a slot {name} that the way back cannot stream from (plugin {:?}, wal_status {:?}): drop it (SELECT pg_drop_replication_slot('{name}');) and run the command again",
                        self.new_name(),
                        existing.plugin,
                        existing.wal_status
                    ))
                })?;
                // A slot made before (by the stray-write watcher, or a
                // move before this one) streams from here on: what an
                // application wrote there until now was not the
                // primary's, and must not reach the old primary (the
                // watcher wrote the primary's rows back over it).
                // A group's move leaves the way back where it streams: it
                // routes each change by its group's primary at its
                // position.
                let start = if made_here || self.group.is_some() {
                    confirmed
                } else {
                    slot::current_wal_lsn(&self.new)
                        .await
                        .map_err(query(self.new_name(), "reading the WAL position"))?
                        .max(confirmed)
                };
                (start, made_here)
            }
            None => {
                // The intent first: a crash after the slot is made leaves
                // the journal knowing it is this journal's to drop.
                journal.stream = Some(StreamStart {
                    slot: name.clone(),
                    start: Lsn::ZERO,
                    publications: publications.clone(),
                    created: true,
                });
                state.journal = Some(journal.clone());
                self.store.put_switch_state(state).await?;
                let mut session = Session::connect(&self.new_config.source.conninfo).await?;
                let created = session
                    .create_slot(&name, false, SnapshotAction::Nothing)
                    .await?;
                (created.consistent_point, true)
            }
        };
        journal.stream = Some(StreamStart {
            slot: name.clone(),
            start,
            publications: publications.clone(),
            created,
        });
        Ok(format!(
            "slot {name} on the {} from {start} (publications {}), before it takes a write",
            self.new_name(),
            publications.join(", ")
        ))
    }

    async fn fence(&self, journal: &Journal) -> Result<String, SwitchError> {
        let tables = self.old_tables().await?;
        let fenced = fence::install(
            &self.old,
            &tables,
            self.new_name(),
            self.config.switch.fence_wait,
        )
        .await?;
        if !fenced.ended.is_empty() {
            tracing::warn!(sessions = ?fenced.ended, "ended the sessions that kept a write open on the old primary past switch.fence_wait_seconds");
        }
        let mut detail = format!(
            "{} tables fenced on the {} ({} {})",
            fenced.tables,
            self.old_name(),
            fenced.tries,
            if fenced.tries == 1 { "try" } else { "tries" }
        );
        if !fenced.ended.is_empty() {
            detail.push_str(&format!(
                "; {} sessions ended: {}",
                fenced.ended.len(),
                fenced.ended.join(", ")
            ));
        }
        if let Some(command) = &self.config.switch.fence_command {
            hooks::run("fence_command", command, &self.facts("fence", journal)?).await?;
            detail.push_str("; fence_command ran");
        }
        Ok(detail)
    }

    async fn drain_to_fence(
        &self,
        state: &mut SwitchState,
        journal: &mut Journal,
    ) -> Result<String, SwitchError> {
        let fence_lsn = match journal.fence_lsn {
            Some(lsn) => lsn,
            None => {
                // Everything the old primary committed is before this.
                let lsn = self.old_position().await?;
                journal.fence_lsn = Some(lsn);
                state.journal = Some(journal.clone());
                self.store.put_switch_state(state).await?;
                lsn
            }
        };
        let started = std::time::Instant::now();
        self.drain(fence_lsn).await?;
        Ok(format!(
            "the {} holds everything the {} committed before {fence_lsn} (drained in {:.3} s)",
            self.new_name(),
            self.old_name(),
            started.elapsed().as_secs_f64()
        ))
    }

    async fn carry_sequences(&self) -> Result<String, SwitchError> {
        let names = self.sequences().await?;
        let set = sequences::carry_over(
            &self.old,
            self.old_name(),
            &self.new,
            self.new_name(),
            &names,
            self.config.switch.sequence_gap,
        )
        .await?;
        for s in &set {
            tracing::info!(sequence = %s.name, old_next = s.old_next, new_next = s.new_next, "sequence carried over");
        }
        Ok(match set.first() {
            None => "no sequence in scope".to_owned(),
            Some(first) => format!(
                "{} sequences set on the {} (e.g. {} next {})",
                set.len(),
                self.new_name(),
                first.name,
                first.new_next
            ),
        })
    }

    async fn open(
        &self,
        state: &mut SwitchState,
        journal: &Journal,
    ) -> Result<String, SwitchError> {
        if let Some(group) = &self.group {
            return self.open_group(group, state, journal).await;
        }
        let removed = fence::remove(&self.new).await?;
        let detail = self
            .opened(
                format!("the {} takes writes", self.new_name()),
                removed,
                journal,
            )
            .await?;
        state.primary = self.kind.to();
        // Every table moves: no group keeps a primary of its own (a group
        // moved there and back would otherwise still route by its moves).
        state.groups.clear();
        Ok(detail)
    }

    /// The open of a group: its tables' fence on the new primary (from
    /// an earlier move) taken down, and its move recorded at the old
    /// primary's fence position and the new primary's position now: each
    /// stream routes the group's changes by it.
    async fn open_group(
        &self,
        group: &str,
        state: &mut SwitchState,
        journal: &Journal,
    ) -> Result<String, SwitchError> {
        let Some(fenced_at) = journal.fence_lsn else {
            return Err(SwitchError::Refused(
                "the journal has no fence position: run the command again".into(),
            ));
        };
        // Recorded before anything opens: a change the application makes
        // on the new primary from now on is after it (the insert
        // position: a commit made with synchronous_commit off may not be
        // written yet, and it is before this).
        let opened_at = insert_position(&self.new, self.new_name()).await?;
        let (source_from, target_from) = match self.kind.to() {
            Server::Target => (fenced_at, opened_at),
            Server::Source => (opened_at, fenced_at),
        };
        let flips = state.groups.entry(group.to_owned()).or_default();
        // Resumed after a crash past this point: recorded once.
        if flips.last().is_none_or(|f| f.primary != self.kind.to()) {
            flips.push(Flip {
                primary: self.kind.to(),
                source_from,
                target_from,
                at: crate::store::now_secs(),
            });
        }
        self.store.put_switch_state(state).await?;
        let tables = group_tables(self.config, &self.new, &self.new_config, Some(group))
            .await
            .map_err(|detail| SwitchError::Query {
                server: self.new_name(),
                what: "listing the group's tables".into(),
                detail,
            })?;
        let removed = fence::remove_tables(&self.new, &tables).await?;
        let detail = format!(
            "the {} takes group {group}'s writes (from {source_from} on the source, {target_from} on the target)",
            self.new_name()
        );
        self.opened(detail, removed, journal).await
    }

    /// The open's end: what it took down, then the operator's commands
    /// that point the application at the new primary.
    async fn opened(
        &self,
        mut detail: String,
        removed: usize,
        journal: &Journal,
    ) -> Result<String, SwitchError> {
        if removed > 0 {
            detail.push_str(&format!(" ({removed} fence triggers taken down there)"));
        }
        if let Some(command) = &self.config.switch.repoint_command {
            hooks::run("repoint_command", command, &self.facts("open", journal)?).await?;
            detail.push_str("; repoint_command ran");
        }
        if let Some(command) = &self.config.switch.unfence_command {
            hooks::run("unfence_command", command, &self.facts("open", journal)?).await?;
            detail.push_str("; unfence_command ran");
        }
        Ok(detail)
    }

    async fn stream(
        &self,
        state: &mut SwitchState,
        journal: &Journal,
    ) -> Result<String, SwitchError> {
        if let Some(group) = &self.group {
            // Both directions stream already, each routing the group by
            // its move: no slot changes hands.
            return Ok(format!(
                "`cutover run` streams both directions; group {group}'s changes flow {}",
                self.new_direction
            ));
        }
        let Some(start) = journal.stream.clone() else {
            return Err(SwitchError::Refused(
                "the journal has no slot for the new direction: run the command again".into(),
            ));
        };
        let detail = format!(
            "`cutover run` streams {} from {} (slot {})",
            self.new_direction, start.start, start.slot
        );
        // The old direction's slot (the copy's, or the one the last switch
        // made): everything it held is applied, and the old primary takes
        // no write but cutover's from now on.
        let old_slot = match state.stream(self.old_direction) {
            Some(stream) => stream.slot.clone(),
            None => self
                .store
                .copy_run()?
                .map_or_else(|| self.old_config.slot.clone(), |run| run.slot),
        };
        let dropped = self.drop_slot_when_free(&old_slot).await?;
        state.set_stream(self.new_direction, Some(start));
        state.set_stream(self.old_direction, None);
        Ok(if dropped {
            format!(
                "{detail}; slot {old_slot} dropped on the {}",
                self.old_name()
            )
        } else {
            detail
        })
    }

    /// Drops `slot` on the old primary once nothing streams from it (the
    /// drain's walsender may still be exiting); returns whether it
    /// existed.
    async fn drop_slot_when_free(&self, slot: &str) -> Result<bool, SwitchError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let active: Option<bool> = self
                .old
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(query(self.old_name(), "reading replication slots"))?
                .map(|r| r.get(0));
            match active {
                None => return Ok(false),
                Some(false) => {
                    self.old
                        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                        .await
                        .map_err(query(self.old_name(), format!("dropping slot {slot}")))?;
                    return Ok(true);
                }
                Some(true) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Some(true) => {
                    return Err(SwitchError::Refused(format!(
                        "slot {slot} on the {} is still streamed from: stop what reads it (see pg_replication_slots.active_pid) and run the command again to finish",
                        self.old_name()
                    )));
                }
            }
        }
    }

    /// What each step would do, after the checks (`--dry-run`).
    pub(super) async fn plan(
        &mut self,
        state: &SwitchState,
        options: &Options,
    ) -> Result<Vec<String>, SwitchError> {
        let checks = self.checks(options).await?;
        let tables = self.old_tables().await?;
        let sequences = self.sequences().await?;
        let lag = self.lag_bytes().await?;
        let hook = |name: &str, command: &Option<String>| match command {
            Some(c) => format!("; run {name}: {c}"),
            None => String::new(),
        };
        let _ = state;
        let one_way: Vec<String> = self
            .config
            .mappings
            .iter()
            .filter(|m| m.inverse.is_none())
            .map(|m| {
                format!(
                    "  one-way         {} -> {} has no [map.inverse]: changes made to {} are not carried back to {}{}",
                    m.source,
                    m.target,
                    m.target,
                    m.source,
                    if self.new_direction == Direction::Reverse {
                        ", and a rollback will not carry them"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        Ok(vec![
            format!(
                "  preflight       {checks}; catch up {lag} bytes of WAL while writes go on (at most switch.max_lag_seconds = {} s)",
                self.config.switch.max_lag.as_secs()
            ),
            format!(
                "  prepare_return  publication {} and slot {} on the {}",
                self.new_config.publication,
                self.new_config.slot,
                self.new_name()
            ),
            format!(
                "  fence           trigger cutover_fence on {} tables (and their partitions) of the {}; wait {} s for open writes, then end their sessions{}",
                tables.len(),
                self.old_name(),
                self.config.switch.fence_wait.as_secs(),
                hook("fence_command", &self.config.switch.fence_command)
            ),
            format!(
                "  drain           record the {}'s WAL position and apply everything before it",
                self.old_name()
            ),
            format!(
                "  sequences       set {} sequences on the {} (gap {})",
                sequences.len(),
                self.new_name(),
                self.config.switch.sequence_gap
            ),
            format!(
                "  open            take the {}'s fence down; it is primary{}{}",
                self.new_name(),
                hook("repoint_command", &self.config.switch.repoint_command),
                hook("unfence_command", &self.config.switch.unfence_command)
            ),
            format!(
                "  stream          `cutover run` streams {}; drop slot {} on the {}",
                self.new_direction,
                self.old_config.slot,
                self.old_name()
            ),
        ]
        .into_iter()
        .chain(one_way)
        .collect())
    }

    /// WAL the old direction's slot holds that the other side lacks.
    pub(super) async fn lag_bytes(&self) -> Result<i64, SwitchError> {
        let row = self
            .old
            .query_opt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.old_config.slot],
            )
            .await
            .map_err(query(self.old_name(), "reading the slot's lag"))?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0))
    }
}

/// Undoes a journal whose new primary did not open: the old primary's
/// fence comes down and `unfence_command` runs (with the old primary
/// alone reachable), and a slot this journal made on the new primary is
/// dropped (left with a warning when the new primary is unreachable).
pub(super) async fn undo(
    config: &Config,
    store: &Store,
    state: &mut SwitchState,
    mut journal: Journal,
    reason: String,
) -> Result<Journal, SwitchError> {
    let kind = journal.kind;
    let old_config = config.for_direction(kind.from().streams());
    if journal.begun(Step::Fence) {
        let old = connect(config, kind.from()).await?;
        let removed = match &journal.group {
            // Only the group's tables: the others' fences (from other
            // groups' moves) stay.
            Some(group) => {
                let tables = group_tables(config, &old, &old_config, Some(group))
                    .await
                    .map_err(|detail| SwitchError::Query {
                        server: kind.from().name(),
                        what: "listing the group's tables".into(),
                        detail,
                    })?;
                fence::remove_tables(&old, &tables).await?
            }
            None => fence::remove(&old).await?,
        };
        tracing::warn!(
            removed,
            "the {}'s fence is down: it takes writes again",
            kind.from().name()
        );
        if let Some(command) = &config.switch.unfence_command {
            let facts = Facts {
                kind,
                step: "undo",
                new_primary: &old_config.target()?.conninfo,
                old_primary: &old_config.source.conninfo,
                fence_lsn: journal.fence_lsn.map(|l| l.to_string()),
            };
            hooks::run("unfence_command", command, &facts).await?;
        }
    }
    if let Some(stream) = journal.stream.as_ref().filter(|s| s.created) {
        let dropped = async {
            let new = connect(config, kind.to()).await?;
            new.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = $1 AND NOT active",
                &[&stream.slot],
            )
            .await
            .map_err(query(
                kind.to().name(),
                format!("dropping slot {}", stream.slot),
            ))
        }
        .await;
        if let Err(err) = dropped {
            tracing::warn!(error = %err, slot = %stream.slot, "the slot made for the way back was left on the {}: drop it there (it holds WAL)", kind.to().name());
        }
    }
    journal.outcome = Outcome::Undone { reason };
    state.journal = Some(journal.clone());
    store.put_switch_state(state).await?;
    Ok(journal)
}

/// The tables in scope on the server `client` is connected to (read with
/// `side_config`), of `group` when given.
async fn group_tables(
    config: &Config,
    client: &Client,
    side_config: &Config,
    group: Option<&str>,
) -> Result<Vec<TableName>, String> {
    Ok(copy::tables_in_scope(client, side_config)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|t| t.name)
        .filter(|t| group.is_none_or(|g| config.groups.group_of(t) == g))
        .collect())
}

/// The WAL insert position of the server `client` is connected to: a
/// commit made with `synchronous_commit` off may not be written yet, and
/// it is before this.
pub(super) async fn insert_position(
    client: &Client,
    server: &'static str,
) -> Result<Lsn, SwitchError> {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(query(server, "reading the WAL position"))?;
    let text: String = row
        .try_get(0)
        .map_err(query(server, "reading the WAL position"))?;
    text.parse().map_err(|_| SwitchError::Query {
        server,
        what: "reading the WAL position".into(),
        detail: format!("unreadable position {text}"),
    })
}
