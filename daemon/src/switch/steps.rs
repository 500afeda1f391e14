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
use super::journal::{Journal, Kind, Outcome, Step, StreamStart, SwitchState};
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
}

impl<'a> Ctx<'a> {
    pub(super) async fn new(
        config: &'a Config,
        store: &'a Store,
        kind: Kind,
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
        })
    }

    pub(super) fn old_name(&self) -> &'static str {
        self.kind.from().name()
    }

    pub(super) fn new_name(&self) -> &'static str {
        self.kind.to().name()
    }

    fn facts(&self, step: &'static str, journal: &Journal) -> Facts<'_> {
        Facts {
            kind: self.kind,
            step,
            new_primary: &self.old_config.target.conninfo,
            old_primary: &self.old_config.source.conninfo,
            fence_lsn: journal.fence_lsn.map(|l| l.to_string()),
        }
    }

    /// The tables in scope on the old primary.
    pub(super) async fn old_tables(&self) -> Result<Vec<TableName>, SwitchError> {
        Ok(copy::tables_in_scope(&self.old, &self.old_config)
            .await
            .map_err(|e| SwitchError::Query {
                server: self.old_name(),
                what: "listing the tables in scope".into(),
                detail: e.to_string(),
            })?
            .into_iter()
            .map(|t| t.name)
            .collect())
    }

    /// The sequences in scope on the old primary: matched by the table
    /// patterns, or owned by a table in scope.
    pub(super) async fn sequences(&self) -> Result<Vec<TableName>, SwitchError> {
        let tables = self.old_tables().await?;
        Ok(catalog::sequences(&self.old)
            .await
            .map_err(query(self.old_name(), "listing sequences"))?
            .into_iter()
            .filter(|s| {
                self.config.scope.contains(&s.name)
                    || s.owned_by.as_ref().is_some_and(|o| tables.contains(o))
            })
            .map(|s| s.name)
            .collect())
    }

    /// The old direction streamed up to `until` on the old primary.
    pub(super) async fn drain(&self, until: Lsn) -> Result<(), SwitchError> {
        let status = Arc::new(Status::new(&self.old_config.slot, self.old_direction));
        let plan =
            run::stream_plan(self.config, self.store, self.old_direction, &status.metrics).await?;
        run::drain(&self.old_config, self.store, &status, &plan, until).await?;
        Ok(())
    }

    /// The old primary's WAL insert position.
    pub(super) async fn old_position(&self) -> Result<Lsn, SwitchError> {
        let text: String = self
            .old
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(query(self.old_name(), "reading the WAL position"))?
            .get(0);
        text.parse().map_err(|_| SwitchError::Query {
            server: self.old_name(),
            what: "reading the WAL position".into(),
            detail: format!("unreadable position {text}"),
        })
    }

    /// Runs one step; returns what it did.
    pub(super) async fn step(
        &mut self,
        step: Step,
        state: &mut SwitchState,
        journal: &mut Journal,
        options: Options,
    ) -> Result<String, SwitchError> {
        match step {
            Step::Preflight => self.preflight(options).await,
            Step::PrepareReturn => self.prepare_return(journal).await,
            Step::Fence => self.fence(journal).await,
            Step::Drain => self.drain_to_fence(state, journal).await,
            Step::Sequences => self.carry_sequences().await,
            Step::Open => self.open(state, journal).await,
            Step::Stream => self.stream(state, journal).await,
        }
    }

    async fn prepare_return(&self, journal: &mut Journal) -> Result<String, SwitchError> {
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
        // Made by this journal before a crash: kept as made.
        let made_here = journal.stream.as_ref().is_some_and(|s| s.created);
        let (start, created) = match existing {
            Some(existing) => (
                existing
                    .confirmed_flush
                    .or(journal.stream.as_ref().map(|s| s.start))
                    .unwrap_or(Lsn::ZERO),
                made_here,
            ),
            None => {
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
            hooks::run("fence_command", command, &self.facts("fence", journal)).await?;
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
        let removed = fence::remove(&self.new).await?;
        let mut detail = format!("the {} takes writes", self.new_name());
        if removed > 0 {
            detail.push_str(&format!(" ({removed} fence triggers taken down there)"));
        }
        if let Some(command) = &self.config.switch.repoint_command {
            hooks::run("repoint_command", command, &self.facts("open", journal)).await?;
            detail.push_str("; repoint_command ran");
        }
        if let Some(command) = &self.config.switch.unfence_command {
            hooks::run("unfence_command", command, &self.facts("open", journal)).await?;
            detail.push_str("; unfence_command ran");
        }
        state.primary = self.kind.to();
        Ok(detail)
    }

    async fn stream(
        &self,
        state: &mut SwitchState,
        journal: &Journal,
    ) -> Result<String, SwitchError> {
        let Some(start) = journal.stream.clone() else {
            return Err(SwitchError::Refused(
                "the journal has no slot for the new direction: run the command again".into(),
            ));
        };
        let detail = format!(
            "`cutover run` streams {} from {} (slot {})",
            self.new_direction, start.start, start.slot
        );
        state.set_stream(self.new_direction, Some(start));
        // The old direction's slot: everything it held is applied, and the
        // old primary takes no write but cutover's from now on.
        let old_slot = self.old_config.slot.clone();
        let dropped = self
            .old
            .query_opt(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                  WHERE slot_name = $1 AND NOT active",
                &[&old_slot],
            )
            .await
            .map_err(query(self.old_name(), format!("dropping slot {old_slot}")))?
            .is_some();
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

    /// Undoes a journal whose new primary did not open: the fence comes
    /// down, `unfence_command` runs, a slot this journal made is dropped.
    pub(super) async fn undo(
        &mut self,
        state: &mut SwitchState,
        mut journal: Journal,
        reason: String,
    ) -> Result<Journal, SwitchError> {
        if journal.begun(Step::Fence) {
            let removed = fence::remove(&self.old).await?;
            tracing::warn!(
                removed,
                "the {}'s fence is down: it takes writes again",
                self.old_name()
            );
            if let Some(command) = &self.config.switch.unfence_command {
                hooks::run("unfence_command", command, &self.facts("undo", &journal)).await?;
            }
        }
        if let Some(stream) = &journal.stream
            && stream.created
        {
            self.new
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                      WHERE slot_name = $1 AND NOT active",
                    &[&stream.slot],
                )
                .await
                .map_err(query(
                    self.new_name(),
                    format!("dropping slot {}", stream.slot),
                ))?;
        }
        journal.outcome = Outcome::Undone { reason };
        state.journal = Some(journal.clone());
        self.store.put_switch_state(state).await?;
        Ok(journal)
    }

    /// What each step would do, after the checks (`--dry-run`).
    pub(super) async fn plan(
        &mut self,
        state: &SwitchState,
        options: Options,
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
        ])
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
