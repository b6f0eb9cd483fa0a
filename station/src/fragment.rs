//! Approving and running one fragment: plan it in the station's own session, check it
//! against the policy, run it, hold the result to the release rules, audit, release.
//!
//! ```text
//!   ticket.sql ─▶ plan (cached by text) ─▶ railyard_policy::check ─▶ optimize ─▶ Approved
//!   Approved ─▶ execute ─▶ railyard_policy::release ─▶ audit record (durable) ─▶ batches
//!                 │ DP release:    private::run_dp   (ε charged before it runs)
//!                 └ train ticket:  train_run::run_train
//! ```
//!
//! Every refusal and failure is audited before its error is returned; the error names the
//! rule, or a failure category that never quotes a data value.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use futures::TryStreamExt;
use railyard_audit::{Decision, Entry};
use railyard_contract::{CheckAnswer, FragmentTicket, ReleaseKind};
use railyard_policy::release::failure_category;
use railyard_policy::{Refusal, Release, gate};
use tracing::{info, warn};

use crate::{Error, Result, Station};

/// Distinct fragment texts whose plans a station keeps (the hub sends the same fragment for
/// every run of a query).
const PLAN_CACHE_ENTRIES: usize = 1024;

/// A fragment plan that passed the policy, optimized, with what it may release.
#[derive(Debug, Clone)]
pub(crate) struct Approved {
    pub plan: LogicalPlan,
    pub table: String,
    pub release: Release,
    /// The query-set auditor's domain, when it watches the release.
    pub audit: Option<String>,
}

impl Station {
    /// Checks a fragment against the policy without running it. A refusal is audited.
    pub async fn check_fragment(&self, ticket: &FragmentTicket) -> Result<CheckAnswer> {
        if let Some(call) = &ticket.train {
            // The input is counted now, so that a station with too few rows stops the query
            // before any station starts a container.
            let (approved, id, columns) = self.approve_train(ticket, call).await?;
            let k = self.train_input(ticket, &approved, &id, false).await?.1;
            return Ok(CheckAnswer {
                release: ReleaseKind::Train,
                min_group_size: k,
                epsilon: None,
                train_output: Some(columns),
            });
        }
        let approved = self.approve(ticket).await?;
        let epsilon = match &approved.release {
            // Nothing is charged by a check; a query the budget cannot cover stops here.
            Release::Dp(release) => Some(self.dp_terms(ticket, release, false).await?.0.epsilon()),
            _ => None,
        };
        Ok(CheckAnswer {
            release: approved.release.kind(),
            min_group_size: approved.release.min_group_size(),
            epsilon,
            train_output: None,
        })
    }

    /// Plans a fragment in the station's own session, checks it against the policy, runs
    /// it, applies the release rules, writes the audit record (durably), and only then
    /// returns the batches to release. Only queries are accepted: no DDL, no DML, no `SET`.
    pub async fn run_fragment(&self, ticket: &FragmentTicket) -> Result<SendableRecordBatchStream> {
        self.within_rate(ticket).await?;
        if let Some(call) = &ticket.train {
            return self.run_train(ticket, call).await;
        }
        let (approved, rebound) = match self.rebound(ticket) {
            Some((approved, physical)) => (approved, Some(physical)),
            None => (self.approve(ticket).await?, None),
        };
        if let Release::Dp(release) = &approved.release {
            return self.run_dp(ticket, &approved, release).await;
        }
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, "fragment approved");
        let run = match rebound {
            Some(physical) => self.execute_physical(physical).await,
            None => self.execute_kept(&ticket.sql, &approved).await,
        };
        let batches = match run {
            Ok(batches) => batches,
            Err(e) => return Err(self.failure(ticket, None, &e).await),
        };
        let schema = railyard_policy::release::released_schema(approved.plan.schema().inner());
        let released = match railyard_policy::release::release(
            &self.name,
            &approved.table,
            &approved.release,
            batches,
            self.threshold_key(),
        ) {
            Ok(released) => released,
            Err(e) => {
                return Err(match Error::from_release(&self.name, e) {
                    Error::Refused(refusal) => self.refuse(ticket, refusal, None).await,
                    other => other,
                });
            }
        };
        if let Some(domain) = &approved.audit {
            self.audit_query_sets(ticket, &approved, domain, released.sets)
                .await?;
        }
        self.audit(Entry {
            rows: released.released,
            suppressed: released.suppressed,
            ..Entry::for_ticket(ticket, Decision::Allowed)
        })
        .await?;
        // A grouped answer says how many groups it left out (the hub reports the count to
        // the researcher); the batches carry the same schema as the stream.
        let (schema, batches) = if approved.release.kind() == ReleaseKind::Groups {
            let schema = railyard_policy::release::announcing_withheld(&schema, released.announced);
            let batches = released
                .batches
                .into_iter()
                .map(|b| {
                    b.with_schema(Arc::clone(&schema))
                        .map_err(DataFusionError::from)
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            (schema, batches)
        } else {
            (schema, released.batches)
        };
        Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
    }

    /// The query-set auditor on a release about to leave: refused (audited, rule
    /// `differencing`) when its sets are too close to what the researcher was released
    /// before; otherwise its sets are committed before it leaves. A store that cannot be
    /// written refuses too (fails closed).
    async fn audit_query_sets(
        &self,
        ticket: &FragmentTicket,
        approved: &Approved,
        domain: &str,
        sets: Vec<railyard_policy::release::ReleasedUnits>,
    ) -> Result<()> {
        let max_sets = self.policy.max_query_sets;
        let release = crate::queryset::Release {
            researcher: railyard_contract::researcher_or_local(&ticket.researcher),
            collaboration: railyard_contract::collaboration_or_default(&ticket.collaboration),
            domain,
            table: &approved.table,
            query_id: &ticket.query_id,
            fragment: ticket.fragment,
            k: approved.release.min_group_size(),
        };
        // Every run of a query after its first releases sets the store already holds: that
        // decision needs no disk, so it is taken here rather than on a blocking thread (two
        // thread hand-offs per fragment). Anything else is decided below.
        let outcome =
            match self
                .querysets
                .audit_in_memory(release, &sets, max_sets, self.threshold_key())
            {
                Some(audited) => Ok(audited),
                None => self.audit_query_sets_on_disk(release, sets, max_sets).await,
            };
        match outcome {
            Ok(crate::queryset::Audited::Allowed) => Ok(()),
            Ok(crate::queryset::Audited::Refused(refusal)) => {
                Err(self.refuse(ticket, refusal, None).await)
            }
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, error = %e, "the query-set store cannot be written");
                let entry = Entry {
                    rule: Some("query_set_store"),
                    ..record_of(ticket, Decision::Failed, None)
                };
                self.audit(entry).await?;
                Err(Error::Failed {
                    station: self.name.clone(),
                    category: "the query-set auditor's store cannot be written, so nothing is released",
                })
            }
        }
    }

    /// The query-set auditor's decision on a release that reads or writes its store, on a
    /// blocking thread.
    async fn audit_query_sets_on_disk(
        &self,
        release: crate::queryset::Release<'_>,
        sets: Vec<railyard_policy::release::ReleasedUnits>,
        max_sets: u64,
    ) -> Result<crate::queryset::Audited> {
        let store = Arc::clone(&self.querysets);
        let key = self.threshold_key().clone();
        // The blocking thread needs owned copies of what the release names.
        let owned: [String; 5] = [
            release.researcher,
            release.collaboration,
            release.domain,
            release.table,
            release.query_id,
        ]
        .map(str::to_string);
        let (fragment, k) = (release.fragment, release.k);
        crate::blocking(&self.name, move || {
            let [researcher, collaboration, domain, table, query_id] = &owned;
            let release = crate::queryset::Release {
                researcher,
                collaboration,
                domain,
                table,
                query_id,
                fragment,
                k,
            };
            store
                .audit(release, &sets, max_sets, &key)
                .map_err(|e| Error::Internal {
                    station: String::new(),
                    message: e.to_string(),
                })
        })
        .await
    }

    /// Refuses (audited, rule `rate_limit`) a fragment beyond the policy's
    /// `max_fragments_per_minute` for its researcher.
    pub(crate) async fn within_rate(&self, ticket: &FragmentTicket) -> Result<()> {
        let limit = self.policy.max_fragments_per_minute;
        let researcher = railyard_contract::researcher_or_local(&ticket.researcher);
        if !self.recent.admit(researcher, limit) {
            let refusal = gate::rate_limited(&self.name, limit);
            return Err(self.refuse(ticket, refusal, None).await);
        }
        Ok(())
    }

    /// Writes an audit record (durably).
    pub(crate) async fn audit(&self, entry: Entry<'_>) -> Result<()> {
        self.audit.append(entry).await?;
        Ok(())
    }

    /// Audits a refusal and returns its error.
    pub(crate) async fn refuse(
        &self,
        ticket: &FragmentTicket,
        refusal: Refusal,
        image: Option<&str>,
    ) -> Error {
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, rule = %refusal.rule, "fragment refused");
        let entry = Entry {
            rule: Some(refusal.rule.as_str()),
            ..record_of(ticket, Decision::Refused, image)
        };
        match self.audit(entry).await {
            Ok(()) => Error::Refused(refusal),
            Err(e) => e,
        }
    }

    /// Audits a fragment that failed while running and returns its error, which names a
    /// category but never the value that failed.
    pub(crate) async fn failure(
        &self,
        ticket: &FragmentTicket,
        image: Option<&str>,
        e: &DataFusionError,
    ) -> Error {
        let category = failure_category(e);
        warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "fragment failed");
        let entry = Entry {
            rule: Some(category),
            ..record_of(ticket, Decision::Failed, image)
        };
        match self.audit(entry).await {
            Ok(()) => Error::Failed {
                station: self.name.clone(),
                category,
            },
            Err(e) => e,
        }
    }

    /// Runs an approved plan.
    pub(crate) async fn execute(
        &self,
        plan: &LogicalPlan,
    ) -> Result<Vec<RecordBatch>, DataFusionError> {
        let (physical, task) = self.physical_plan(plan).await?;
        execute_stream(physical, task)?.try_collect().await
    }

    /// Runs the approved plan of the fragment `sql`, from its physical plan kept from an
    /// earlier run when there is one (see `kept.rs`). A plan kept by its text is also kept
    /// for its shape, when it is a model round (see `rebind.rs`).
    async fn execute_kept(
        &self,
        sql: &str,
        approved: &Approved,
    ) -> Result<Vec<RecordBatch>, DataFusionError> {
        let plan = &approved.plan;
        let (physical, task) = match self.kept.get(sql)? {
            Some(physical) => (physical, railyard_udfs::query_task(&self.state)?),
            None => {
                let (physical, task) = self.physical_plan(plan).await?;
                let kept = if railyard_policy::check::only_immutable_functions(plan) {
                    self.kept.keep(sql, plan, &physical)?
                } else {
                    None
                };
                match kept {
                    Some(kept) => {
                        self.rebinder.keep(sql, approved, &kept);
                        (kept, task)
                    }
                    None => (physical, task),
                }
            }
        };
        execute_stream(physical, task)?.try_collect().await
    }

    /// Runs a physical plan made ready by [`Self::rebound`].
    async fn execute_physical(
        &self,
        physical: Arc<dyn ExecutionPlan>,
    ) -> Result<Vec<RecordBatch>, DataFusionError> {
        execute_stream(physical, railyard_udfs::query_task(&self.state)?)?
            .try_collect()
            .await
    }

    /// The approval and physical plan of a model round that differs from a fragment run
    /// before only in its coefficients (see `rebind.rs`), if `ticket` is one (not for a
    /// text approved as it is). A plan that cannot be made ready is planned from its text.
    pub(crate) fn rebound(
        &self,
        ticket: &FragmentTicket,
    ) -> Option<(Approved, Arc<dyn ExecutionPlan>)> {
        let approved_as_is = {
            let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            plans.contains_key(&ticket.sql)
        };
        if approved_as_is {
            return None;
        }
        self.rebinder.rebind(&ticket.sql).ok().flatten()
    }

    /// The physical plan of an approved plan.
    pub(crate) async fn physical_plan(
        &self,
        plan: &LogicalPlan,
    ) -> Result<(Arc<dyn ExecutionPlan>, Arc<TaskContext>), DataFusionError> {
        let physical = self
            .state
            .query_planner()
            .create_physical_plan(plan, &self.state)
            .await?;
        let physical = self.file_schemas.supply(physical).await?;
        // Projections run without DataFusion's per-run expression metrics, which nothing
        // here reads (`lean_projection`).
        let physical = railyard_udfs::lean_projection::without_metrics(physical)?;
        Ok((physical, railyard_udfs::query_task(&self.state)?))
    }

    /// The logical plan of a fragment's SQL: a query, never DDL, DML or `SET`.
    pub(crate) async fn plan_sql(&self, ticket: &FragmentTicket) -> Result<LogicalPlan> {
        let who = format!("station '{}'", self.name);
        if let Err(refusal) = railyard_policy::limits::check_statement(&ticket.sql, &who) {
            return Err(self.refuse(ticket, refusal, None).await);
        }
        let logical = match self.state.create_logical_plan(&ticket.sql).await {
            Ok(plan) => plan,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "fragment does not plan");
                return Err(e.into());
            }
        };
        railyard_policy::check::verify_query(&logical)?;
        Ok(logical)
    }

    /// The approved, optimized plan of a fragment, or its refusal (audited).
    pub(crate) async fn approve(&self, ticket: &FragmentTicket) -> Result<Approved> {
        if let Some(approved) = self.cached(&ticket.sql) {
            return Ok(approved);
        }
        let logical = self.plan_sql(ticket).await?;
        let checked = match railyard_policy::check(&logical, &self.policy, &self.name) {
            Ok(checked)
                if matches!(checked.release, Release::Pseudonymized { .. }) && !self.keyed =>
            {
                return Err(self
                    .refuse(ticket, gate::no_collaboration_secret(&self.name), None)
                    .await);
            }
            Ok(checked) => checked,
            Err(refusal) => return Err(self.refuse(ticket, refusal, None).await),
        };
        let approved = Approved {
            plan: self.state.optimize(&checked.plan)?,
            table: checked.table,
            release: checked.release,
            audit: checked.audit,
        };
        if railyard_policy::check::only_immutable_functions(&logical) {
            // The lock guards map operations only; after a panic the map is still valid.
            let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            if plans.len() >= PLAN_CACHE_ENTRIES {
                plans.clear();
            }
            plans.insert(ticket.sql.clone(), approved.clone());
        }
        Ok(approved)
    }

    fn cached(&self, sql: &str) -> Option<Approved> {
        // The lock guards map operations only; after a panic the map is still valid.
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.get(sql).cloned()
    }
}

/// The audit record of `decision` on `ticket`; for a train, `image` (its id once resolved)
/// in place of the name the ticket asked for.
pub(crate) fn record_of<'a>(
    ticket: &'a FragmentTicket,
    decision: Decision,
    image: Option<&'a str>,
) -> Entry<'a> {
    let entry = Entry::for_ticket(ticket, decision);
    Entry {
        train: image.or(entry.train),
        ..entry
    }
}
