//! The Railyard station: a sovereign Arrow Flight service over a data holder's own tables.
//!
//! A station never executes a plan it did not build itself. It receives a fragment as SQL
//! text inside a Flight ticket, plans it with its own DataFusion session against its own
//! tables (and the `partial_<agg>` functions from `railyard-udfs`), and streams the
//! resulting Arrow batches back.
//!
//! ```text
//!   hub ── DoGet(ticket: {query_id, fragment, researcher, sql}) ──▶ StationService
//!                                                                     │ parse + plan (own session)
//!                                                                     │ execute over CSV / Parquet
//!   hub ◀──────────── Arrow IPC record batches (FlightData) ──────────┘
//! ```
//!
//! Layout: [`source`] (the station's files as tables), [`service`] (the Flight service),
//! [`serve`] (run it on a listener until shutdown), [`error`] (errors and their one mapping
//! to gRPC statuses).

pub mod audit;
pub mod check;
pub mod dp;
pub mod error;
pub mod ledger;
pub mod policy;
pub mod postgres;
pub mod service;
pub mod source;
pub mod train;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SQLOptions, SessionState};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use railyard_udfs::glm_terms::GlmLayout;
use railyard_udfs::pseudonym::Pseudonym;
use railyard_udfs::wire::{BudgetInfo, CheckAnswer, FragmentTicket, TablePolicyInfo, TrainCall};
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use audit::AuditLog;
pub use check::{ROWS_COLUMN, Refusal, Release};
pub use error::{Error, Result, Upstream};
pub use policy::{Policy, Visibility};
pub use service::StationService;
pub use source::{Format, TableFile};

/// Largest gRPC message a station accepts or sends (Flight batches are split below this).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Distinct fragment texts whose plans a station keeps (the hub sends the same fragment for
/// every run of a query).
const PLAN_CACHE_ENTRIES: usize = 1024;

/// How a station is governed: its policy and where its audit log lives.
#[derive(Debug, Clone)]
pub struct StationConfig {
    pub policy: Policy,
    /// The audit log file (created with its directory if missing).
    pub audit_log: PathBuf,
    /// The secret shared by a collaboration's stations (never by its hub) that keys the
    /// pseudonyms of `join_key` columns; without one the station links no vertical table.
    pub collaboration_secret: Option<Arc<[u8]>>,
}

/// A fragment plan that passed the policy, optimized, with what it may release.
#[derive(Debug, Clone)]
struct Approved {
    plan: LogicalPlan,
    table: String,
    release: Release,
}

/// A station: its name, its own DataFusion session over its tables, its policy and its
/// audit log.
pub struct Station {
    name: String,
    ctx: SessionContext,
    state: SessionState,
    policy: Policy,
    /// Whether the station holds a collaboration secret (can compute pseudonyms).
    keyed: bool,
    /// Whether some table reads other stations (and needs the ticket while it plans).
    federated_tables: bool,
    audit: AuditLog,
    /// Approved plans of fragments seen before, by SQL text. Only plans without stable or
    /// volatile functions are kept (the optimizer folds `now()` into a constant).
    plans: Mutex<HashMap<String, Approved>>,
    /// Runs containerized trains (Docker is reached on the first train only).
    trains: train::Trains,
    /// The privacy ledger (ε spent), if the policy has a `[dp]` budget.
    ledger: Option<ledger::Ledger>,
}

impl Station {
    /// Opens a station over `tables`. Fails, naming the file, if a table cannot be read, and
    /// naming the line, if the policy names a column a table does not have.
    pub async fn open(
        name: impl Into<String>,
        tables: &[TableFile],
        config: StationConfig,
    ) -> Result<Self> {
        Self::open_with(name, tables, Vec::new(), config).await
    }

    /// Opens a station over files and PostgreSQL relations. Fails naming the table if one
    /// cannot be read.
    pub async fn open_sources(
        name: impl Into<String>,
        tables: &[TableFile],
        postgres: &[postgres::PostgresSource],
        config: StationConfig,
    ) -> Result<Self> {
        let name = name.into();
        let mut providers: Vec<(String, Arc<dyn TableProvider>)> = Vec::new();
        for source in postgres {
            let table = postgres::PostgresTable::open(&name, source).await?;
            providers.push((source.name.clone(), Arc::new(table)));
        }
        Self::open_inner(name, tables, providers, false, config).await
    }

    /// Opens a station over `tables` and over tables that read other stations (`providers`,
    /// by name): the hub's join station serves a vertical table this way.
    pub async fn open_with(
        name: impl Into<String>,
        tables: &[TableFile],
        providers: Vec<(String, Arc<dyn TableProvider>)>,
        config: StationConfig,
    ) -> Result<Self> {
        let federated = !providers.is_empty();
        Self::open_inner(name.into(), tables, providers, federated, config).await
    }

    async fn open_inner(
        name: String,
        tables: &[TableFile],
        providers: Vec<(String, Arc<dyn TableProvider>)>,
        federated_tables: bool,
        config: StationConfig,
    ) -> Result<Self> {
        let session =
            railyard_udfs::fragment_session_config().with_target_partitions(partitions_for(tables));
        let ctx = railyard_udfs::fragment_context_with(session)?;
        if let Some(secret) = &config.collaboration_secret {
            let keyed = Pseudonym::keyed(Arc::clone(secret))
                .map_err(|e| Error::BadRequest(format!("station '{name}': {e}")))?;
            ctx.register_udf(keyed.udf());
        }
        for table in tables {
            table.register(&name, &ctx).await?;
        }
        for (table, provider) in providers {
            ctx.register_table(table.as_str(), provider)?;
        }
        let audit = AuditLog::open(&config.audit_log, &name)?;
        // Trains work beside the audit log, in the station's data directory.
        let work = config
            .audit_log
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("trains"), |d| d.join("trains"));
        let work = std::path::absolute(&work).unwrap_or(work);
        // The privacy ledger lives beside the audit log.
        let ledger = match &config.policy.dp {
            Some(_) => Some(ledger::Ledger::open(
                &config
                    .audit_log
                    .parent()
                    .unwrap_or(std::path::Path::new(""))
                    .join("ledger.sqlite"),
            )?),
            None => None,
        };
        let trains = train::Trains::new(
            &name,
            work,
            usize::try_from(config.policy.trains.max_concurrent).unwrap_or(usize::MAX),
        );
        let state = ctx.state();
        let station = Self {
            name,
            ctx,
            state,
            policy: config.policy,
            keyed: config.collaboration_secret.is_some(),
            federated_tables,
            audit,
            plans: Mutex::new(HashMap::new()),
            trains,
            ledger,
        };
        for (table, schema) in station.tables().await? {
            station.policy.validate_table(&table, &schema)?;
        }
        Ok(station)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// The station's tables and their schemas, sorted by name.
    pub async fn tables(&self) -> Result<Vec<(String, SchemaRef)>> {
        let mut out = Vec::new();
        let catalog = self.ctx.catalog("datafusion").ok_or_else(|| {
            Error::BadRequest("the station's default catalog is missing".to_string())
        })?;
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            for table in schema.table_names() {
                if let Some(provider) = schema.table(&table).await? {
                    out.push((table, provider.schema()));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The policy of every table, resolved per column, as the station announces it.
    pub async fn policy_info(&self) -> Result<Vec<TablePolicyInfo>> {
        Ok(self
            .tables()
            .await?
            .into_iter()
            .map(|(table, schema)| TablePolicyInfo {
                min_group_size: self.policy.min_group_size(&table),
                model_min_rows: self.policy.model_min_rows(&table),
                survival_time_resolution: self.policy.survival_time_resolution(&table),
                allow_vertical: self.policy.allow_vertical(&table),
                columns: schema
                    .fields()
                    .iter()
                    .map(|f| {
                        let v = self.policy.visibility(&table, f.name());
                        (f.name().clone(), v.to_string())
                    })
                    .collect(),
                table,
            })
            .collect())
    }

    /// Checks a fragment against the policy without running it. A refusal is audited. A
    /// station whose tables read other stations (the hub's join station) also plans the
    /// fragment physically, which has those stations check their parts.
    pub async fn check_fragment(&self, ticket: &FragmentTicket) -> Result<CheckAnswer> {
        if let Some(call) = &ticket.train {
            // The input is counted now, so that a station with too few rows stops the query
            // before any station starts a container.
            let (approved, id) = self.approve_train(ticket, call).await?;
            let k = self.train_input(ticket, &approved, &id, false).await?.1;
            return Ok(CheckAnswer {
                release: "train".to_string(),
                min_group_size: k,
                epsilon: None,
            });
        }
        let approved = self.approve(ticket).await?;
        if self.federated_tables
            && let Err(e) = self.physical_plan(&approved.plan, ticket).await
        {
            return Err(self.upstream_failure(ticket, e)?);
        }
        Ok(match approved.release {
            Release::Rows => CheckAnswer {
                release: "rows".to_string(),
                min_group_size: 1,
                epsilon: None,
            },
            Release::Groups { k, .. } | Release::Survival { k, .. } => CheckAnswer {
                release: "groups".to_string(),
                min_group_size: k,
                epsilon: None,
            },
            Release::Model { k, .. } => CheckAnswer {
                release: "model".to_string(),
                min_group_size: k,
                epsilon: None,
            },
            Release::Pseudonymized { k } => CheckAnswer {
                release: "pseudonymized".to_string(),
                min_group_size: k,
                epsilon: None,
            },
            Release::TrainInput { k } => CheckAnswer {
                release: "train".to_string(),
                min_group_size: k,
                epsilon: None,
            },
            Release::Dp(release) => {
                // Nothing is charged by a check; a query the budget cannot cover stops here.
                let (noise, _) = self.dp_terms(ticket, &release, false)?;
                CheckAnswer {
                    release: "dp".to_string(),
                    min_group_size: 1,
                    epsilon: Some(noise.epsilon()),
                }
            }
        })
    }

    /// The ε of a DP fragment and its noise, refused (audited) if the ε is not allowed or
    /// the researcher's budget cannot cover it. With `charge`, the ε is charged to the
    /// ledger (durably) and the spend afterwards is returned too.
    fn dp_terms(
        &self,
        ticket: &FragmentTicket,
        release: &dp::DpRelease,
        charge: bool,
    ) -> Result<(dp::NoisePlan, f64)> {
        let refuse = |rule: &'static str, message: String| {
            info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, rule, "DP fragment refused");
            self.record(ticket, audit::Decision::Refused, Some(rule), 0, 0)?;
            Err(Error::Refused(Refusal { rule, message }))
        };
        let (Some(policy), Some(ledger)) = (&self.policy.dp, &self.ledger) else {
            return refuse(
                "dp",
                format!(
                    "policy: station '{}' answers no differentially private aggregates (its \
                     policy has no [dp] budget)",
                    self.name
                ),
            );
        };
        let epsilon = ticket.epsilon.unwrap_or(policy.epsilon);
        if !(epsilon.is_finite() && epsilon > 0.0 && epsilon <= policy.max_epsilon) {
            return refuse(
                "dp_epsilon",
                format!(
                    "policy: station '{}' accepts a query ε above 0 and at most {} (dp.max_epsilon)",
                    self.name, policy.max_epsilon
                ),
            );
        }
        let noise = dp::plan_noise(release, epsilon)
            .map_err(|e| Error::BadRequest(format!("station '{}': {e}", self.name)))?;
        let over = |spent: f64| {
            format!(
                "policy: station '{}' cannot spend ε = {} on table '{}' for researcher '{}' \
                 in collaboration '{}': {spent} of the budget {} is spent (dp.budget)",
                self.name,
                noise.epsilon(),
                release.table,
                researcher_of(ticket),
                ticket.collaboration(),
                policy.budget
            )
        };
        if !charge {
            let spent = ledger.spent(
                researcher_of(ticket),
                ticket.collaboration(),
                &release.table,
            )?;
            if spent + noise.epsilon() > policy.budget + 1e-9 {
                return refuse("dp_budget", over(spent));
            }
            return Ok((noise, spent));
        }
        let charged = ledger.charge(
            ledger::Charge {
                researcher: researcher_of(ticket),
                collaboration: ticket.collaboration(),
                table: &release.table,
                query_id: &ticket.query_id,
                fragment: ticket.fragment as u64,
                epsilon: noise.epsilon(),
            },
            policy.budget,
        )?;
        match charged {
            ledger::Charged::Committed { spent } => Ok((noise, spent)),
            ledger::Charged::OverBudget { spent } => refuse("dp_budget", over(spent)),
        }
    }

    /// Runs a DP fragment: the ε is charged (durably) first, then the aggregate runs, the
    /// states are completed to the public keys and noised, the release is audited with its
    /// ε, and only then returned.
    async fn run_dp(
        &self,
        ticket: &FragmentTicket,
        approved: &Approved,
        release: &dp::DpRelease,
    ) -> Result<SendableRecordBatchStream> {
        let (noise, spent) = self.dp_terms(ticket, release, true)?;
        let epsilon = noise.epsilon();
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, epsilon, spent, "DP fragment charged");
        let failed = |category: &'static str| {
            self.append(
                ticket,
                None,
                audit::Decision::Failed,
                Some(category),
                0,
                0,
                Some(epsilon),
            )?;
            Err(Error::Failed {
                station: self.name.clone(),
                category,
            })
        };
        let batches = match self.execute(&approved.plan, ticket).await {
            Ok(batches) => batches,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "DP fragment failed");
                return failed(failure_category(&e));
            }
        };
        // No await from here to the release: OpenDP's measurements are not Send.
        let noised = match dp::add_noise(release, &noise, &batches) {
            Ok(batch) => batch,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "DP noise failed");
                return failed("a computation failed");
            }
        };
        let rows = noised.num_rows() as u64;
        self.append(
            ticket,
            None,
            audit::Decision::Allowed,
            None,
            rows,
            0,
            Some(epsilon),
        )?;
        let schema = noised.schema();
        Ok(Box::pin(MemoryStream::try_new(vec![noised], schema, None)?))
    }

    /// The DP budget of `researcher` in `collaboration` on every table of the station
    /// (empty if the station answers no DP aggregates).
    pub async fn budget(&self, researcher: &str, collaboration: &str) -> Result<Vec<BudgetInfo>> {
        let (Some(policy), Some(ledger)) = (&self.policy.dp, &self.ledger) else {
            return Ok(Vec::new());
        };
        let researcher = researcher_or_local(researcher);
        let collaboration = railyard_udfs::wire::collaboration_or_default(collaboration);
        let mut out = Vec::new();
        for (table, _) in self.tables().await? {
            if self.policy.joined(&table) {
                continue;
            }
            out.push(BudgetInfo {
                spent: ledger.spent(researcher, collaboration, &table)?,
                table,
                budget: policy.budget,
                max_query_epsilon: policy.max_epsilon,
                default_epsilon: policy.epsilon,
            });
        }
        Ok(out)
    }

    /// Plans a fragment in the station's own session, checks it against the policy, runs
    /// it, applies the group-size threshold, writes the audit record (durably), and only
    /// then returns the batches to release. Only queries are accepted: no DDL, no DML, no
    /// `SET`.
    pub async fn run_fragment(&self, ticket: &FragmentTicket) -> Result<SendableRecordBatchStream> {
        if let Some(call) = &ticket.train {
            return self.run_train(ticket, call).await;
        }
        let approved = self.approve(ticket).await?;
        if let Release::Dp(release) = &approved.release {
            return self.run_dp(ticket, &approved, release).await;
        }
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, "fragment approved");
        let batches = match self.execute(&approved.plan, ticket).await {
            Ok(batches) => batches,
            Err(e) if Upstream::of(&e).is_some() => {
                return Err(self.upstream_failure(ticket, e)?);
            }
            Err(e) => {
                let category = failure_category(&e);
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "fragment failed");
                self.record(ticket, audit::Decision::Failed, Some(category), 0, 0)?;
                return Err(Error::Failed {
                    station: self.name.clone(),
                    category,
                });
            }
        };
        let schema = approved.plan.schema().inner().clone();
        let (batches, released, suppressed) = match release(&self.name, &approved, batches)? {
            Ok(kept) => kept,
            Err(refusal) => {
                self.record(ticket, audit::Decision::Refused, Some(refusal.rule), 0, 0)?;
                return Err(Error::Refused(refusal));
            }
        };
        self.record(ticket, audit::Decision::Allowed, None, released, suppressed)?;
        Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
    }

    fn record(
        &self,
        ticket: &FragmentTicket,
        decision: audit::Decision,
        rule: Option<&str>,
        rows: u64,
        suppressed: u64,
    ) -> Result<()> {
        let train = ticket.train.as_ref().map(|t| t.image.as_str());
        self.append(ticket, train, decision, rule, rows, suppressed, None)
    }

    /// Writes an audit record (durably): for a train, the image (its id once resolved);
    /// for a DP release, the ε charged.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        ticket: &FragmentTicket,
        train: Option<&str>,
        decision: audit::Decision,
        rule: Option<&str>,
        rows: u64,
        suppressed: u64,
        epsilon: Option<f64>,
    ) -> Result<()> {
        self.audit.append(audit::Entry {
            researcher: researcher_of(ticket),
            query_id: &ticket.query_id,
            fragment: ticket.fragment as u64,
            sql: &ticket.sql,
            train,
            args: ticket.train.as_ref().map(|t| t.args.as_str()),
            decision,
            rule,
            rows,
            suppressed,
            epsilon,
        })?;
        Ok(())
    }

    /// Checks a train request: the station runs trains at all, its arguments are JSON, its
    /// input passes the policy (rows over `public` and `aggregate` columns), and its image
    /// is on the allowlist. Returns the approved input plan and the image id. Nothing is
    /// started. A refusal is audited.
    async fn approve_train(
        &self,
        ticket: &FragmentTicket,
        call: &TrainCall,
    ) -> Result<(Approved, String)> {
        let refuse = |rule: &'static str, message: String, image: Option<&str>| {
            let refusal = Refusal { rule, message };
            info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, rule, "train refused");
            let image = image.or(Some(call.image.as_str()));
            self.append(
                ticket,
                image,
                audit::Decision::Refused,
                Some(rule),
                0,
                0,
                None,
            )?;
            Err(Error::Refused(refusal))
        };
        if self.policy.trains.allowed.is_empty() {
            return refuse(
                "trains",
                format!(
                    "policy: station '{}' runs no trains (its policy allows no train image)",
                    self.name
                ),
                None,
            );
        }
        if call.args.len() > train::MAX_ARGS_BYTES {
            return Err(Error::BadRequest(format!(
                "station '{}': a train's arguments may be at most {} bytes",
                self.name,
                train::MAX_ARGS_BYTES
            )));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&call.args) {
            return Err(Error::BadRequest(format!(
                "station '{}': the train's arguments are not JSON ({e})",
                self.name
            )));
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let logical = self.state.create_logical_plan(&ticket.sql).await?;
        options.verify_plan(&logical)?;
        let checked = match check::check_train_input(&logical, &self.policy, &self.name) {
            Ok(checked) => checked,
            Err(refusal) => return refuse(refusal.rule, refusal.message, None),
        };
        // An image the station does not have and one it does not allow are refused alike:
        // the answer tells nobody which images a station holds.
        let not_allowed = || {
            format!(
                "policy: station '{}' runs only the train images its policy allows; '{}' is \
                 not one of them",
                self.name, call.image
            )
        };
        let id = match self.trains.resolve(&call.image).await {
            Ok(id) => id,
            Err(train::TrainError::NoImage) => {
                return refuse("train_image", not_allowed(), None);
            }
            Err(e) => return Err(self.train_failure(ticket, Some(&call.image), e)?),
        };
        if !self.policy.allows_train(&id) {
            return refuse("train_image", not_allowed(), Some(&id));
        }
        let approved = Approved {
            plan: self.state.optimize(&checked.plan)?,
            table: checked.table,
            release: checked.release,
        };
        Ok((approved, id))
    }

    /// Reads a train's approved input, refusing it (audited) below the table's k rows.
    /// Returns the input (if `keep`; otherwise its rows are only counted) and k.
    async fn train_input(
        &self,
        ticket: &FragmentTicket,
        approved: &Approved,
        id: &str,
        keep: bool,
    ) -> Result<(Vec<RecordBatch>, u64)> {
        let Release::TrainInput { k } = approved.release else {
            unreachable!("a train's input is approved as one");
        };
        let read = async {
            let (physical, task) = self.physical_plan(&approved.plan, ticket).await?;
            let mut stream = execute_stream(physical, task)?;
            let (mut kept, mut rows) = (Vec::new(), 0u64);
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                rows += batch.num_rows() as u64;
                if keep {
                    kept.push(batch);
                }
            }
            Ok::<_, DataFusionError>((kept, rows))
        };
        let (input, rows) = match read.await {
            Ok(read) => read,
            Err(e) => {
                let category = failure_category(&e);
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "train input failed");
                self.append(
                    ticket,
                    Some(id),
                    audit::Decision::Failed,
                    Some(category),
                    0,
                    0,
                    None,
                )?;
                return Err(Error::Failed {
                    station: self.name.clone(),
                    category,
                });
            }
        };
        if rows < k {
            let refusal = Refusal {
                rule: "min_group_size",
                message: format!(
                    "policy: station '{}' requires a train's input from table '{}' to cover \
                     at least {k} rows; this one covers fewer",
                    self.name, approved.table
                ),
            };
            self.append(
                ticket,
                Some(id),
                audit::Decision::Refused,
                Some(refusal.rule),
                0,
                0,
                None,
            )?;
            return Err(Error::Refused(refusal));
        }
        Ok((input, k))
    }

    /// Runs a train: its approved input is read, handed to the container, and the checked
    /// output is audited with the image id and arguments, and released.
    async fn run_train(
        &self,
        ticket: &FragmentTicket,
        call: &TrainCall,
    ) -> Result<SendableRecordBatchStream> {
        let (approved, id) = self.approve_train(ticket, call).await?;
        let (input, _) = self.train_input(ticket, &approved, &id, true).await?;
        let rows: u64 = input.iter().map(|b| b.num_rows() as u64).sum();
        let schema = input
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| approved.plan.schema().inner().clone());
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, image = %id, rows, "train approved");
        match self
            .trains
            .run(&id, &call.args, schema, input, &self.policy.trains)
            .await
        {
            Ok((schema, batches)) => {
                let released = batches.iter().map(|b| b.num_rows() as u64).sum();
                self.append(
                    ticket,
                    Some(&id),
                    audit::Decision::Allowed,
                    None,
                    released,
                    0,
                    None,
                )?;
                Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
            }
            Err(train::TrainError::Output { rule, why }) => {
                self.append(
                    ticket,
                    Some(&id),
                    audit::Decision::Refused,
                    Some(rule),
                    0,
                    0,
                    None,
                )?;
                Err(Error::Refused(Refusal {
                    rule,
                    message: format!("policy: station '{}' {why}", self.name),
                }))
            }
            Err(e) => Err(self.train_failure(ticket, Some(&id), e)?),
        }
    }

    /// Audits a train that could not run or did not finish, and returns its error (fixed
    /// text for the researcher; the audit record has the category, e.g. the exit code).
    fn train_failure(
        &self,
        ticket: &FragmentTicket,
        image: Option<&str>,
        e: train::TrainError,
    ) -> Result<Error> {
        let (message, category) = match e {
            train::TrainError::Failed { message, category } => (message, category),
            train::TrainError::NoImage => (
                "has no such train image".to_string(),
                "no such image".to_string(),
            ),
            train::TrainError::Output { why, rule } => (why, rule.to_string()),
        };
        self.append(
            ticket,
            image,
            audit::Decision::Failed,
            Some(&category),
            0,
            0,
            None,
        )?;
        Ok(Error::Train {
            station: self.name.clone(),
            message,
        })
    }

    /// Runs an approved plan.
    async fn execute(
        &self,
        plan: &LogicalPlan,
        ticket: &FragmentTicket,
    ) -> Result<Vec<RecordBatch>, DataFusionError> {
        let (physical, task) = self.physical_plan(plan, ticket).await?;
        execute_stream(physical, task)?.try_collect().await
    }

    /// The physical plan of an approved plan. The ticket travels in the session's
    /// configuration, so a table that is itself federated (the hub's join station) sends its
    /// own fragments on behalf of the same query and researcher.
    async fn physical_plan(
        &self,
        plan: &LogicalPlan,
        ticket: &FragmentTicket,
    ) -> Result<(Arc<dyn ExecutionPlan>, Arc<TaskContext>), DataFusionError> {
        // Only a station with such tables pays for its own copy of the session.
        let with_ticket;
        let state = if self.federated_tables {
            let mut state = self.state.clone();
            state.config_mut().set_extension(Arc::new(ticket.clone()));
            with_ticket = state;
            &with_ticket
        } else {
            &self.state
        };
        let physical = state
            .query_planner()
            .create_physical_plan(plan, state)
            .await?;
        Ok((physical, state.task_ctx()))
    }

    /// Audits and returns the failure or refusal of a station this one reads, or `e`
    /// itself if it is not one.
    fn upstream_failure(&self, ticket: &FragmentTicket, e: DataFusionError) -> Result<Error> {
        let Some(upstream) = Upstream::of(&e) else {
            return Ok(e.into());
        };
        let (decision, what) = if upstream.refused {
            (audit::Decision::Refused, "a station it reads refused")
        } else {
            (audit::Decision::Failed, "a station it reads failed")
        };
        warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %upstream.message, "{what}");
        self.record(ticket, decision, Some(what), 0, 0)?;
        Ok(Error::Upstream(upstream.clone()))
    }

    /// The approved, optimized plan of a fragment, or its refusal (audited).
    async fn approve(&self, ticket: &FragmentTicket) -> Result<Approved> {
        if let Some(approved) = self.cached(&ticket.sql) {
            return Ok(approved);
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let logical = match self.state.create_logical_plan(&ticket.sql).await {
            Ok(plan) => plan,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "fragment does not plan");
                return Err(e.into());
            }
        };
        options.verify_plan(&logical)?;
        let checked = match check::check(&logical, &self.policy, &self.name) {
            Ok(checked)
                if matches!(checked.release, Release::Pseudonymized { .. }) && !self.keyed =>
            {
                let refusal = Refusal {
                    rule: "collaboration_secret",
                    message: format!(
                        "policy: station '{}' holds no collaboration secret, so it cannot \
                         pseudonymize join keys",
                        self.name
                    ),
                };
                self.record(ticket, audit::Decision::Refused, Some(refusal.rule), 0, 0)?;
                return Err(Error::Refused(refusal));
            }
            Ok(checked) => checked,
            Err(refusal) => {
                info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, rule = refusal.rule, "fragment refused");
                self.record(ticket, audit::Decision::Refused, Some(refusal.rule), 0, 0)?;
                return Err(Error::Refused(refusal));
            }
        };
        let approved = Approved {
            plan: self.state.optimize(&checked.plan)?,
            table: checked.table,
            release: checked.release,
        };
        if only_immutable_functions(&logical) {
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

/// The researcher a ticket names (`local` if none).
fn researcher_of(ticket: &FragmentTicket) -> &str {
    researcher_or_local(&ticket.researcher)
}

/// `researcher`, or `local` if it is empty.
fn researcher_or_local(researcher: &str) -> &str {
    if researcher.is_empty() {
        "local"
    } else {
        researcher
    }
}

type Kept = (Vec<RecordBatch>, u64, u64);

/// Applies the fragment's release rule to its result: the batches to release with the
/// number of groups released and suppressed, or the refusal of the whole release.
fn release(
    station: &str,
    approved: &Approved,
    batches: Vec<RecordBatch>,
) -> Result<std::result::Result<Kept, Refusal>> {
    let table = &approved.table;
    let refuse = |rule: &'static str, why: String| {
        Ok(Err(Refusal {
            rule,
            message: format!("policy: station '{station}' {why}"),
        }))
    };
    match &approved.release {
        // Row-level public values, or groups over public columns only (k = 1): nothing
        // to withhold (an empty global aggregate still answers, with its zero count).
        Release::Rows | Release::Groups { k: 1, .. } => {
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            Ok(Ok((batches, rows, 0)))
        }
        Release::Pseudonymized { k } => {
            let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            if rows < *k {
                return refuse(
                    "min_group_size",
                    format!(
                        "requires a pseudonymized release of table '{table}' to cover at least {k} rows; this one covers fewer"
                    ),
                );
            }
            Ok(Ok((batches, rows, 0)))
        }
        Release::Groups { k, global } | Release::Survival { k, global } => {
            let (kept, released, suppressed) = apply_threshold(batches, *k)?;
            if *global && released == 0 {
                return refuse(
                    "min_group_size",
                    format!(
                        "requires every released aggregate of table '{table}' to cover at least {k} rows; this one covers fewer"
                    ),
                );
            }
            if matches!(approved.release, Release::Survival { .. })
                && kept
                    .iter()
                    .any(|b| b.num_columns() >= 2 && b.column(b.num_columns() - 2).null_count() > 0)
            {
                return refuse(
                    "survival_events",
                    format!(
                        "cannot pool the survival times of table '{table}' into released times of at least {k} deaths each"
                    ),
                );
            }
            Ok(Ok((kept, released, suppressed)))
        }
        Release::TrainInput { .. } => Err(Error::BadRequest(
            "internal: a train's input is never released".to_string(),
        )),
        Release::Dp(_) => Err(Error::BadRequest(
            "internal: a DP release is noised, not thresholded".to_string(),
        )),
        Release::Model {
            k,
            min_rows,
            parameters,
        } => {
            let terms = batches
                .iter()
                .find(|b| b.num_rows() > 0)
                .and_then(|b| b.column(0).as_list_opt::<i32>())
                .and_then(|l| railyard_udfs::glm_terms::list_values(l, 0));
            let layout = GlmLayout { q: *parameters };
            let Some(terms) = terms.filter(|t| t.len() == layout.len()) else {
                return Err(Error::BadRequest(
                    "internal: a model fragment returned no terms of the expected length".into(),
                ));
            };
            let n = terms[GlmLayout::N];
            let needed = (*min_rows).max(*k) as f64;
            if n < needed {
                return refuse(
                    "model_min_rows",
                    format!(
                        "requires a model over table '{table}' to use at least {needed} complete rows; this one uses fewer"
                    ),
                );
            }
            if 3.0 * *parameters as f64 > n {
                return refuse(
                    "model_parameters",
                    format!(
                        "allows at most one model parameter per three complete rows of table '{table}'; this model has {parameters} parameters and too few rows"
                    ),
                );
            }
            let k = *k as f64;
            for (j, nonzero) in terms[layout.nonzero()].iter().enumerate() {
                let zero = n - nonzero;
                if *nonzero < k || (zero > 0.0 && zero < k) {
                    return refuse(
                        "model_level",
                        format!(
                            "requires every design column of a model over table '{table}' (a covariate, or a level of a categorical one) to be non-zero on at least {k} rows and zero on none or at least {k}; design column {} is not",
                            j + 1
                        ),
                    );
                }
            }
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            Ok(Ok((batches, rows, 0)))
        }
    }
}

/// Keeps the groups whose row count (the last column) is at least `k`; returns the kept
/// batches, the groups kept and the groups suppressed.
fn apply_threshold(batches: Vec<RecordBatch>, k: u64) -> Result<(Vec<RecordBatch>, u64, u64)> {
    let mut kept = Vec::with_capacity(batches.len());
    let (mut released, mut suppressed) = (0u64, 0u64);
    for batch in batches {
        let rows = batch
            .columns()
            .last()
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "internal: the aggregate has no {ROWS_COLUMN} column of type Int64"
                ))
            })?;
        let keep: BooleanArray = rows
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= 0 && n as u64 >= k)))
            .collect();
        let n = keep.true_count() as u64;
        released += n;
        suppressed += batch.num_rows() as u64 - n;
        if n as usize == batch.num_rows() {
            kept.push(batch);
        } else if n > 0 {
            kept.push(filter_record_batch(&batch, &keep).map_err(DataFusionError::from)?);
        }
    }
    Ok((kept, released, suppressed))
}

/// A failure category that names no data value (execution errors can quote the value that
/// failed to parse or cast; that text stays in the station's own log).
fn failure_category(e: &DataFusionError) -> &'static str {
    match e.find_root() {
        DataFusionError::ArrowError(a, _) => match a.as_ref() {
            arrow::error::ArrowError::DivideByZero => "division by zero",
            arrow::error::ArrowError::CastError(_) | arrow::error::ArrowError::ParseError(_) => {
                "a value could not be converted"
            }
            arrow::error::ArrowError::ComputeError(_)
            | arrow::error::ArrowError::ArithmeticOverflow(_) => "a computation failed",
            _ => "reading or computing failed",
        },
        DataFusionError::ResourcesExhausted(_) => "resources exhausted",
        DataFusionError::IoError(_) | DataFusionError::ObjectStore(_) => {
            "the station could not read its data"
        }
        _ => "execution failed",
    }
}

/// Bytes of data per partition a station aims for.
const BYTES_PER_PARTITION: u64 = 16 * 1024 * 1024;

/// How many partitions a station's queries use: one per [`BYTES_PER_PARTITION`] of its
/// files, at most one per core. Small stations answer fastest from one partition (no
/// repartitioning between the two aggregation phases); large ones use every core.
fn partitions_for(tables: &[TableFile]) -> usize {
    let bytes: u64 = tables
        .iter()
        .filter_map(|t| std::fs::metadata(&t.path).ok())
        .map(|m| m.len())
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (bytes.div_ceil(BYTES_PER_PARTITION) as usize).clamp(1, cores)
}

/// Whether every function in `plan` gives the same result whenever it runs (so its
/// optimized plan, with constants folded, may be reused).
fn only_immutable_functions(plan: &LogicalPlan) -> bool {
    let mut immutable = true;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility != Volatility::Immutable
                {
                    immutable = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    immutable
}

/// Serves `station` over Arrow Flight on `listener` until `shutdown` resolves.
pub async fn serve(
    station: Arc<Station>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_incoming(station, railyard_net::serve::plaintext(listener), shutdown).await
}

/// Serves the station's Flight service on already established connections until `shutdown`:
/// mutual-TLS connections accepted from the hub, or (outbound mode) the connection the
/// station dialed to the hub.
pub async fn serve_incoming<I, IO, IE>(
    station: Arc<Station>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: futures::Stream<Item = std::result::Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let service = FlightServiceServer::new(StationService::new(station))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    railyard_net::serve::serve(tonic::service::Routes::new(service), incoming, shutdown).await?;
    Ok(())
}
