//! The switch's first step: everything checked before anything changes,
//! then the last catch-up while the application still writes.

use cutover_replication::catalog::TableName;

use crate::verify::{self, Verdict};

use super::journal::Kind;
use super::steps::Ctx;
use super::{Options, SwitchError, query};

impl Ctx<'_> {
    /// The checks; every blocking problem at once, each with its fix.
    pub(super) async fn checks(&mut self, options: &Options) -> Result<String, SwitchError> {
        let mut problems = Vec::new();
        let new = self.new_name();
        let old = self.old_name();
        // The snapshot copy first: nothing to switch to before it.
        if !self.store.copy_run()?.is_some_and(|run| run.finished) {
            problems.push(
                "the snapshot copy has not finished: let `cutover run` copy and stream first"
                    .into(),
            );
        }

        // The new primary is read by the new direction.
        let row = self
            .new
            .query_one(
                "SELECT current_setting('wal_level'),
                        (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user),
                        current_setting('max_replication_slots')::int
                          - (SELECT count(*) FROM pg_replication_slots)::int,
                        EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
                        current_setting('max_wal_senders')::int",
                &[&self.new_config.slot],
            )
            .await
            .map_err(query(new, "reading its replication settings"))?;
        let wal_level: String = row.get(0);
        if wal_level != "logical" {
            problems.push(format!(
                "{new}: wal_level is {wal_level}, the way back needs logical: ALTER SYSTEM SET wal_level = logical; then restart the {new}"
            ));
        }
        if !row.get::<_, Option<bool>>(1).unwrap_or(false) {
            problems.push(format!(
                "{new}: cutover's role may not replicate: ALTER ROLE <the {new}'s user> REPLICATION;"
            ));
        }
        let free: i32 = row.get(2);
        let exists: bool = row.get(3);
        if free < 1 && !exists {
            problems.push(format!(
                "{new}: no free replication slot (max_replication_slots): raise it and restart, or drop an unused slot"
            ));
        }
        if row.get::<_, i32>(4) < 1 {
            problems.push(format!(
                "{new}: max_wal_senders is 0: raise it and restart the {new}"
            ));
        }

        // Sequences: read on the old primary, set on the new one.
        let sequences = self.sequences().await?;
        for sequence in &sequences {
            let name = sequence.quoted();
            let readable: bool = self
                .old
                .query_one("SELECT has_sequence_privilege($1, 'SELECT')", &[&name])
                .await
                .map_err(query(old, format!("checking sequence {sequence}")))?
                .get(0);
            if !readable {
                problems.push(format!(
                    "{old}: sequence {sequence} is not readable: GRANT SELECT ON SEQUENCE {name} TO <cutover's user>;"
                ));
            }
            let settable: Option<bool> = self
                .new
                .query_one(
                    "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL
                                 ELSE has_sequence_privilege($1, 'SELECT,UPDATE') END",
                    &[&name],
                )
                .await
                .map_err(query(new, format!("checking sequence {sequence}")))?
                .get(0);
            match settable {
                None => problems.push(format!(
                    "{new}: sequence {sequence} is missing: create it there (CREATE SEQUENCE {name};) so that it can be set"
                )),
                Some(false) => problems.push(format!(
                    "{new}: sequence {sequence} cannot be set: GRANT SELECT, UPDATE ON SEQUENCE {name} TO <cutover's user>;"
                )),
                Some(true) => {}
            }
        }

        // The fence is a trigger on every table in scope of the old
        // primary.
        let tables = self.old_tables().await?;
        let names: Vec<String> = tables.iter().map(TableName::quoted).collect();
        let unfenceable: Vec<String> = self
            .old
            .query(
                "SELECT n FROM unnest($1::text[]) AS n WHERE NOT has_table_privilege(n, 'TRIGGER')",
                &[&names],
            )
            .await
            .map_err(query(old, "checking the TRIGGER privilege"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !unfenceable.is_empty() {
            problems.push(format!(
                "{old}: the fence needs the TRIGGER privilege on {}: GRANT TRIGGER ON ... TO <cutover's user>; (or run as their owner)",
                unfenceable.join(", ")
            ));
        }

        // The target is proven equal before it takes the writes.
        let verified = match self.kind {
            Kind::Switch => match self.last_verify(options).await {
                Ok(verified) => verified,
                Err(problem) => {
                    problems.push(problem);
                    String::new()
                }
            },
            Kind::Rollback => {
                "verify not asked for a rollback (it compares the target to the source)".into()
            }
        };
        if !problems.is_empty() {
            return Err(SwitchError::Preflight(problems));
        }
        Ok(format!(
            "the {new} can be replicated from; {} sequences; {} tables to fence; {verified}",
            sequences.len(),
            tables.len()
        ))
    }

    /// A group moves with none of its stray writes unsettled: the new
    /// primary's stream is read up to now first, so that every stray
    /// write made there while it was not the group's primary is
    /// recorded; one still to settle would be settled against the new
    /// primary's rows after the move.
    async fn settled(&self, group: &str) -> Result<(), SwitchError> {
        let now = super::steps::insert_position(&self.new, self.new_name()).await?;
        let status = std::sync::Arc::new(crate::live::Status::new(
            &self.new_config.slot,
            self.new_direction,
        ));
        let plan =
            crate::run::stream_plan(self.config, self.store, self.new_direction, &status.metrics)
                .await?;
        crate::run::drain(&self.new_config, self.store, &status, &plan, now).await?;
        let unsettled: Vec<String> = self
            .store
            .conflicts()?
            .into_iter()
            .filter(|c| c.group == group)
            .filter(|c| matches!(c.resolution.as_str(), "pending" | "parked" | "failed"))
            .map(|c| {
                format!(
                    "#{} {} {} {} ({})",
                    c.id, c.side, c.table, c.key, c.resolution
                )
            })
            .collect();
        if unsettled.is_empty() {
            return Ok(());
        }
        Err(SwitchError::Refused(format!(
            "group {group} has {} stray writes not settled, which its move would settle against the new primary's rows: {}; let `cutover run` settle the pending ones (parked or failed ones need `cutover conflicts resolve ID --use source|target`), then move the group again",
            unsettled.len(),
            unsettled.join(", ")
        )))
    }

    /// The last verify's verdict, or a new one with `--verify`.
    async fn last_verify(&self, options: &Options) -> Result<String, String> {
        if options.verify {
            let report = verify::run_with_store(
                self.config,
                self.store.clone(),
                false,
                self.group.as_deref(),
            )
            .await
            .map_err(|e| format!("verify: {e}"))?;
            return match report.status {
                Verdict::Validated => Ok(format!("verify VALIDATED at {}", report.lsn)),
                other => Err(format!(
                    "verify found {} differing rows and {} orphaned rows ({other:?}): `cutover verify` shows them, `cutover verify --repair` fixes them",
                    report.differing_rows, report.orphaned_rows
                )),
            };
        }
        let path = self.config.state_dir.join(verify::REPORT_FILE);
        let text = std::fs::read_to_string(&path).map_err(|_| {
            format!(
                "no verify on record ({} is missing): run `cutover verify`, or switch with --verify to run one now",
                path.display()
            )
        })?;
        let report: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is unreadable ({e}): run `cutover verify`",
                path.display()
            )
        })?;
        let status = report["status"].as_str().unwrap_or_default();
        let lsn = report["lsn"].as_str().unwrap_or_default();
        // A group moves on a verify of every table or of that group.
        let compared = report["group"].as_str();
        if compared.is_some() && compared != self.group.as_deref() {
            return Err(format!(
                "the last verify compared group {} only: run `cutover verify{}`, or switch with --verify",
                compared.unwrap_or_default(),
                self.group
                    .as_deref()
                    .map(|g| format!(" --group {g}"))
                    .unwrap_or_default()
            ));
        }
        if status != "VALIDATED" {
            return Err(format!(
                "the last verify ({}, at {lsn}) is {status}: run `cutover verify` (and `--repair`) until it is VALIDATED, or switch with --verify",
                report["date"].as_str().unwrap_or_default()
            ));
        }
        let divergent: Vec<String> = self
            .store
            .divergences()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|(_, d)| d.divergent_rows > 0)
            .filter(|(table, _)| {
                self.group.as_deref().is_none_or(|g| {
                    table.split_once('.').is_none_or(|(schema, name)| {
                        self.config.groups.group_of(&TableName::new(schema, name)) == g
                    })
                })
            })
            .map(|(table, d)| format!("{table} ({} rows)", d.divergent_rows))
            .collect();
        if !divergent.is_empty() {
            return Err(format!(
                "the background verifier last found rows that differ in {}: `cutover verify` to see them",
                divergent.join(", ")
            ));
        }
        Ok(format!(
            "last verify VALIDATED at {lsn} ({})",
            report["date"].as_str().unwrap_or_default()
        ))
    }

    /// Step 1: the checks, then the last catch-up, within
    /// `switch.max_lag_seconds`.
    pub(super) async fn preflight(&mut self, options: &Options) -> Result<String, SwitchError> {
        if let Some(group) = self.group.clone() {
            self.settled(&group).await?;
        }
        let checks = self.checks(options).await?;
        let now = self.old_position().await?;
        let started = std::time::Instant::now();
        let max_lag = self.config.switch.max_lag;
        match tokio::time::timeout(max_lag, self.drain(now)).await {
            Ok(result) => result?,
            Err(_) => return Err(SwitchError::TooFarBehind(max_lag.as_secs())),
        }
        Ok(format!(
            "{checks}; caught up to {now} in {:.3} s",
            started.elapsed().as_secs_f64()
        ))
    }
}
