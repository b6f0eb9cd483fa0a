//! The hub's join station: the station that serves a vertical table, assembled from the pure
//! rules of `railyard-policy` and a `railyard-audit` log, and called in-process.
//!
//! ```text
//!   hub planner ─ fragment ticket ─▶ JoinStation::check / run
//!                                      │ plan the SQL in its own session (the ticket rides in
//!                                      │   the session config: the scan asks the members)
//!                                      │ railyard_policy::check  (the strictest members' policy)
//!                                      │ execute: VerticalTable scan → members → join
//!                                      │ railyard_policy::release (k on joined rows, models)
//!                                      │ audit record (hash chain, fsync)
//!   partial states ◀───────────────────┘
//! ```
//!
//! It is a station in every rule but transport: the same check, thresholds, model rules and
//! audit records as a station's, over the joined rows, which never leave it. It holds no
//! collaboration secret (it pseudonymizes nothing), no DP budget and runs no trains.

use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use railyard_audit::{AuditLog, Decision, Entry};
use railyard_contract::{CheckAnswer, FragmentTicket, TablePolicyInfo};
use railyard_policy::release::{ThresholdKey, failure_category, released_schema};
use railyard_policy::{Checked, Policy, Refusal, Release, gate};
use tonic::Code;
use tracing::{info, warn};

use crate::error::StationFailure;

/// A failure of a member station that the join station's table read, carried through
/// DataFusion as an external error. Its message is the member's own, which names no data
/// value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Upstream {
    /// The member's policy refused its part, with this rule.
    pub refused: Option<String>,
    pub message: String,
}

impl Upstream {
    /// The upstream failure at the root of `e`, if that is what `e` is.
    fn of(e: &DataFusionError) -> Option<&Upstream> {
        match e.find_root() {
            DataFusionError::External(inner) => inner.downcast_ref::<Upstream>(),
            _ => None,
        }
    }
}

/// The join station of one vertical table.
pub(crate) struct JoinStation {
    name: String,
    table: String,
    schema: SchemaRef,
    state: SessionState,
    policy: Policy,
    audit: AuditLog,
    /// Keys the noisy margin of its thresholds; drawn per hub process (the join station
    /// keeps no state of its own beyond its audit log).
    threshold_key: ThresholdKey,
}

impl fmt::Debug for JoinStation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinStation")
            .field("name", &self.name)
            .field("table", &self.table)
            .finish()
    }
}

impl JoinStation {
    /// A join station named `name` serving `table` (the vertical table's provider) under
    /// `policy`, auditing to `audit`.
    pub fn open(
        name: String,
        table: String,
        provider: Arc<dyn TableProvider>,
        policy: Policy,
        audit: AuditLog,
    ) -> datafusion::error::Result<Self> {
        let ctx: SessionContext = railyard_udfs::fragment_context()?;
        let schema = provider.schema();
        ctx.register_table(table.as_str(), provider)?;
        let threshold_key = ThresholdKey::new(rand::random(), policy.threshold_noise)
            .with_dominance(policy.model_dominance);
        Ok(Self {
            name,
            table,
            schema,
            state: ctx.state(),
            policy,
            audit,
            threshold_key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tables(&self) -> Vec<(String, SchemaRef)> {
        vec![(self.table.clone(), Arc::clone(&self.schema))]
    }

    pub fn policy_info(&self) -> Vec<TablePolicyInfo> {
        vec![self.policy.announce(&self.table, &self.schema)]
    }

    /// Checks a fragment without running it: the policy, then the physical plan, which has
    /// every member check its part. A refusal is audited.
    pub async fn check(&self, ticket: &FragmentTicket) -> Result<CheckAnswer, StationFailure> {
        let checked = self.approve(ticket).await?;
        let state = self.state_for(ticket);
        if let Err(e) = self.physical(&checked, &state).await {
            return Err(self.plan_failure(ticket, e).await);
        }
        Ok(CheckAnswer {
            release: checked.release.kind(),
            min_group_size: checked.release.min_group_size(),
            epsilon: None,
            train_output: None,
        })
    }

    /// Runs a fragment over the joined rows and returns what its release lets leave, with
    /// the fragment's schema, after its audit record is durable.
    pub async fn run(
        &self,
        ticket: &FragmentTicket,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), StationFailure> {
        let checked = self.approve(ticket).await?;
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, "fragment approved");
        let state = self.state_for(ticket);
        let physical = match self.physical(&checked, &state).await {
            Ok(physical) => physical,
            Err(e) => return Err(self.plan_failure(ticket, e).await),
        };
        let task = match railyard_udfs::query_task(&state) {
            Ok(task) => task,
            Err(e) => return Err(self.run_failure(ticket, e).await),
        };
        let batches: Vec<RecordBatch> = match execute_stream(physical, task) {
            Ok(stream) => match stream.try_collect().await {
                Ok(batches) => batches,
                Err(e) => return Err(self.run_failure(ticket, e).await),
            },
            Err(e) => return Err(self.run_failure(ticket, e).await),
        };
        let schema = released_schema(checked.plan.schema().inner());
        match railyard_policy::release::release(
            &self.name,
            &checked.table,
            &checked.release,
            batches,
            &self.threshold_key,
        ) {
            Ok(released) => {
                self.audit(
                    ticket,
                    Decision::Allowed,
                    None,
                    released.released,
                    released.suppressed,
                )
                .await?;
                // Like a station, a grouped answer says how many groups it left out.
                let schema = match checked.release.kind() {
                    railyard_contract::ReleaseKind::Groups => {
                        railyard_policy::release::announcing_withheld(&schema, released.announced)
                    }
                    _ => schema,
                };
                Ok((schema, released.batches))
            }
            Err(railyard_policy::ReleaseError::Refused(refusal)) => {
                Err(self.refuse(ticket, refusal).await)
            }
            Err(railyard_policy::ReleaseError::Internal(message)) => Err(StationFailure::Failed {
                station: self.name.clone(),
                fragment: ticket.fragment,
                code: Code::Internal,
                message: format!("internal error: {message}"),
            }),
        }
    }

    /// The session with the ticket in its configuration: the vertical table's scan sends
    /// the members their fragments on behalf of the same query and researcher.
    fn state_for(&self, ticket: &FragmentTicket) -> SessionState {
        let mut state = self.state.clone();
        state.config_mut().set_extension(Arc::new(ticket.clone()));
        state
    }

    async fn physical(
        &self,
        checked: &Checked,
        state: &SessionState,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let plan = state.optimize(&checked.plan)?;
        state
            .query_planner()
            .create_physical_plan(&plan, state)
            .await
    }

    /// The checked plan of a fragment, or its refusal (audited).
    async fn approve(&self, ticket: &FragmentTicket) -> Result<Checked, StationFailure> {
        let invalid = |e: DataFusionError| StationFailure::Failed {
            station: self.name.clone(),
            fragment: ticket.fragment,
            code: Code::InvalidArgument,
            message: e.strip_backtrace(),
        };
        if ticket.train.is_some() {
            return Err(self.refuse(ticket, gate::no_trains(&self.name)).await);
        }
        let who = format!("station '{}'", self.name);
        if let Err(refusal) = railyard_policy::limits::check_statement(&ticket.sql, &who) {
            return Err(self.refuse(ticket, refusal).await);
        }
        let logical = self
            .state
            .create_logical_plan(&ticket.sql)
            .await
            .map_err(invalid)?;
        railyard_policy::check::verify_query(&logical).map_err(invalid)?;
        let checked = match railyard_policy::check(&logical, &self.policy, &self.name) {
            Ok(c) if matches!(c.release, Release::Pseudonymized { .. }) => {
                return Err(self
                    .refuse(ticket, gate::no_collaboration_secret(&self.name))
                    .await);
            }
            Ok(c) if matches!(c.release, Release::Dp(_)) => {
                return Err(self.refuse(ticket, gate::no_dp(&self.name)).await);
            }
            Ok(c) => c,
            Err(refusal) => return Err(self.refuse(ticket, refusal).await),
        };
        Ok(checked)
    }

    async fn refuse(&self, ticket: &FragmentTicket, refusal: Refusal) -> StationFailure {
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, rule = %refusal.rule, "fragment refused");
        if let Err(e) = self
            .audit(ticket, Decision::Refused, Some(refusal.rule.as_str()), 0, 0)
            .await
        {
            return e;
        }
        StationFailure::Refused {
            station: self.name.clone(),
            fragment: ticket.fragment,
            rule: refusal.rule.as_str().to_string(),
            message: refusal.to_string(),
        }
    }

    /// A plan that failed while the members were asked: their refusal or failure, audited;
    /// otherwise the planning error itself.
    async fn plan_failure(&self, ticket: &FragmentTicket, e: DataFusionError) -> StationFailure {
        if Upstream::of(&e).is_some() {
            return self.run_failure(ticket, e).await;
        }
        StationFailure::Failed {
            station: self.name.clone(),
            fragment: ticket.fragment,
            code: Code::InvalidArgument,
            message: e.strip_backtrace(),
        }
    }

    /// A fragment that failed while running, audited: a member's refusal stays a refusal
    /// with the member's message; any other failure names a category, never a value.
    async fn run_failure(&self, ticket: &FragmentTicket, e: DataFusionError) -> StationFailure {
        let fragment = ticket.fragment;
        let (decision, rule, failure) = match Upstream::of(&e) {
            Some(Upstream {
                refused: Some(rule),
                message,
            }) => (
                Decision::Refused,
                "a station it reads refused",
                StationFailure::Refused {
                    station: self.name.clone(),
                    fragment,
                    rule: rule.clone(),
                    message: message.clone(),
                },
            ),
            Some(Upstream { message, .. }) => (
                Decision::Failed,
                "a station it reads failed",
                StationFailure::Failed {
                    station: self.name.clone(),
                    fragment,
                    code: Code::Aborted,
                    message: message.clone(),
                },
            ),
            None => {
                let category = failure_category(&e);
                (
                    Decision::Failed,
                    category,
                    StationFailure::Failed {
                        station: self.name.clone(),
                        fragment,
                        code: Code::Aborted,
                        message: format!(
                            "{category} while running the fragment (the station's log has the detail)"
                        ),
                    },
                )
            }
        };
        warn!(station = %self.name, query_id = %ticket.query_id, fragment, error = %e, "{rule}");
        if let Err(e) = self.audit(ticket, decision, Some(rule), 0, 0).await {
            return e;
        }
        failure
    }

    async fn audit(
        &self,
        ticket: &FragmentTicket,
        decision: Decision,
        rule: Option<&str>,
        rows: u64,
        suppressed: u64,
    ) -> Result<(), StationFailure> {
        let entry = Entry {
            rule,
            rows,
            suppressed,
            ..Entry::for_ticket(ticket, decision)
        };
        self.audit
            .append(entry)
            .await
            .map_err(|e| StationFailure::Failed {
                station: self.name.clone(),
                fragment: ticket.fragment,
                code: Code::Internal,
                message: format!("its audit log cannot be written: {e}"),
            })
    }
}
