//! The hub: the federated catalog, per-query sessions, and query execution. `SET
//! railyard.epsilon` is in `epsilon`, what the hub keeps of the announced policies in
//! `policies`.

mod cache;
mod epsilon;
mod policies;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::TableType;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{SQLOptions, SessionState};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use railyard_planner::{
    FederatedCatalog, FederationPlanner, explain_batch, strip_explain_federated,
};
use tracing::info;

use railyard_contract::{CheckAnswer, FragmentTicket};

use crate::board::{STATIONS_TABLE, StationBoard, StationsTable};
use crate::error::StationFailure;
use crate::error::{Error, Result};
use crate::exec::{FederatedQueryPlanner, QueryContext, assign_query, query_tickets};
use crate::params;
use crate::station_client::{StationAddress, StationClient};
use crate::train;
use crate::vertical::{self, VerticalSpec};
use crate::withheld::{WITHHELD_METADATA, Withheld};
pub use epsilon::EPSILON_SETTING;
use epsilon::{epsilon_answer, epsilon_setting};
use policies::{planner_policy, register_policies};

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// How long one station may take to deliver one fragment, start to end.
    pub fragment_timeout: Duration,
    /// How long to keep retrying to reach a station at start-up.
    pub connect_patience: Duration,
    /// Partitions of the hub's own execution. The hub mostly merges partial states (a few
    /// rows per group and station), where one partition avoids repartitioning overhead;
    /// raise it for hubs that join large row-level fragments.
    pub merge_partitions: usize,
    /// Vertically partitioned tables: each is served by a join station the hub runs.
    pub vertical: Vec<VerticalSpec>,
    /// Where the hub keeps its state: each join station's audit log is
    /// `DIR/<table>-join/audit.jsonl`. Required when `vertical` is not empty.
    pub data_dir: Option<PathBuf>,
    /// How long the hub waits for one station's containerized train (`train(...)`); each
    /// station also enforces its own time limit.
    pub train_timeout: Duration,
    /// The collaboration this hub's researchers ask in (stations keep DP budgets per
    /// researcher, collaboration and table).
    pub collaboration: String,
    /// The federated tables this hub serves (`None`: every table its stations announce);
    /// a station's other tables stay invisible to its researchers.
    pub tables: Option<Vec<String>>,
    /// How the hub reaches stations that are not at plaintext `grpc://` addresses.
    pub transport: crate::station_client::Transport,
    /// Queries one researcher may start per minute (0: no limit); hub.toml's
    /// `max_queries_per_minute`. Each station may limit its fragments too.
    pub max_queries_per_minute: u64,
    /// An open hub (`railyard local`, no tokens) takes the researcher's name from the
    /// client's `x-railyard-researcher` header instead of calling everyone `local`: for
    /// test corpora that need a fresh query-set memory per test. Anyone who can reach the
    /// port can then choose a name (and its fresh DP budget), so never on a shared machine.
    pub named_researchers: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            fragment_timeout: Duration::from_secs(60),
            connect_patience: Duration::from_secs(10),
            merge_partitions: 1,
            vertical: Vec::new(),
            data_dir: None,
            train_timeout: Duration::from_secs(600),
            collaboration: railyard_contract::DEFAULT_COLLABORATION.to_string(),
            tables: None,
            transport: crate::station_client::Transport::default(),
            max_queries_per_minute: 0,
            named_researchers: false,
        }
    }
}

/// A planned query: either a physical plan to run or an answer already computed at the hub
/// (`EXPLAIN FEDERATED`).
pub enum Planned {
    /// A plan to run, the metadata its answer's schema carries (the ε a DP query spends,
    /// under [`EPSILON_METADATA`]), and, for a plan with thresholded releases, the tally of
    /// the groups they withhold (reported under [`WITHHELD_METADATA`] once it has run).
    Plan(
        Arc<dyn ExecutionPlan>,
        Arc<datafusion::execution::TaskContext>,
        HashMap<String, String>,
        Option<Withheld>,
    ),
    Batches(SchemaRef, Vec<RecordBatch>),
}

/// The schema metadata key of a DP query's answer: a JSON object of the ε each station
/// charges, e.g. `{"station_a": 0.5, "station_b": 0.5}`.
pub const EPSILON_METADATA: &str = "railyard.epsilon";

impl Planned {
    /// The answer's schema as known before it runs (a plan's withheld groups are added to
    /// its metadata by [`Planned::run`]).
    pub fn schema(&self) -> SchemaRef {
        match self {
            Planned::Plan(plan, _, metadata, _) if !metadata.is_empty() => Arc::new(
                plan.schema()
                    .as_ref()
                    .clone()
                    .with_metadata(metadata.clone()),
            ),
            Planned::Plan(plan, ..) => plan.schema(),
            Planned::Batches(schema, _) => Arc::clone(schema),
        }
    }

    /// Whether running it starts containers at the stations (it calls `train(...)`).
    pub fn runs_trains(&self) -> bool {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let Planned::Plan(plan, ..) = self else {
            return false;
        };
        let mut found = false;
        let _ = plan.apply(|node| {
            if node
                .downcast_ref::<crate::exec::QueryJobExec>()
                .is_some_and(|j| j.starts_containers())
            {
                found = true;
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        found
    }

    /// Runs the plan (station fragments are sent now). A plan whose answer reports withheld
    /// groups runs to its end first: the count is part of the answer's schema, which is sent
    /// before its rows, and is known only once every station has answered.
    pub async fn run(self) -> Result<SendableRecordBatchStream> {
        match self {
            Planned::Plan(plan, task, mut metadata, Some(withheld)) => {
                use futures::TryStreamExt;
                let batches: Vec<RecordBatch> = execute_stream(Arc::clone(&plan), task)?
                    .try_collect()
                    .await?;
                if let Some(text) = withheld.metadata() {
                    metadata.insert(WITHHELD_METADATA.to_string(), text);
                }
                let schema = Arc::new(plan.schema().as_ref().clone().with_metadata(metadata));
                let batches = batches
                    .into_iter()
                    .map(|b| b.with_schema(Arc::clone(&schema)))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(datafusion::error::DataFusionError::from)?;
                Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
            }
            Planned::Plan(plan, task, metadata, None) => {
                let stream = execute_stream(Arc::clone(&plan), task)?;
                if metadata.is_empty() {
                    return Ok(stream);
                }
                use futures::StreamExt;
                let schema = Arc::new(plan.schema().as_ref().clone().with_metadata(metadata));
                let with = Arc::clone(&schema);
                let stream = stream
                    .map(move |batch| batch.and_then(|b| Ok(b.with_schema(Arc::clone(&with))?)));
                Ok(Box::pin(
                    datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                        schema, stream,
                    ),
                ))
            }
            Planned::Batches(schema, batches) => {
                Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
            }
        }
    }
}

/// Asks every station whether its policy accepts its fragments, before any is run: a query
/// one station refuses releases nothing from any station. The first refusal (in fragment,
/// then station order) is the error.
/// Returns each station's ε for the query's DP fragments (empty if it has none).
async fn check_at_stations(
    plan: &Arc<dyn ExecutionPlan>,
    timeout: Duration,
) -> Result<BTreeMap<String, f64>> {
    let tickets = query_tickets(plan);
    let answers = check_tickets(&tickets, timeout).await?;
    let mut epsilon: BTreeMap<String, f64> = BTreeMap::new();
    for ((station, _), answer) in tickets.iter().zip(answers) {
        if let Some(e) = answer.epsilon {
            *epsilon.entry(station.name.to_string()).or_default() += e;
        }
    }
    Ok(epsilon)
}

/// Plans a statement in `state` for `query`: verified (a query only), its fragments checked
/// at their stations where they must be (nothing runs yet; see [`checked_first`]), the ε
/// they would charge in the answer's metadata.
async fn plan_statement(
    state: &SessionState,
    statement: DfStatement,
    query: &QueryContext,
    trains: bool,
) -> Result<Planned> {
    let logical = state.statement_to_plan(statement).await?;
    plan_logical(state, logical, query, trains).await
}

/// Plans a logical plan (of a statement, or of a Substrait plan) as [`plan_statement`] does.
async fn plan_logical(
    state: &SessionState,
    logical: datafusion::logical_expr::LogicalPlan,
    query: &QueryContext,
    trains: bool,
) -> Result<Planned> {
    query_only().verify_plan(&logical)?;
    let physical = state.create_physical_plan(&logical).await?;
    let physical = railyard_udfs::lean_projection::without_metrics(physical)?;
    plan_physical(state, physical, query, trains).await
}

/// Whether a planned query's fragments are checked at every station before any runs, so
/// that one refusal anywhere means nothing ran anywhere: when a fragment spends ε (a DP
/// aggregate: its check also says how much, and a query the budget cannot cover starts
/// nowhere), when the query starts containers (`trains`), and when a fragment goes to a
/// vertical table's join station (whose members release pseudonymized rows to it).
/// Every other fragment is checked by its station as it runs it, which is the same check
/// (the station re-plans and checks whatever it is sent, every time): a refusal then fails
/// the query, and what another station released to the hub for it is dropped there.
fn checked_first(plan: &Arc<dyn ExecutionPlan>, trains: bool) -> bool {
    trains || crate::exec::has_fragment_checked_first(plan)
}

/// Finishes planning a physical plan for `query`: its identity assigned, its fragments
/// checked first where they must be ([`checked_first`]).
async fn plan_physical(
    state: &SessionState,
    physical: Arc<dyn ExecutionPlan>,
    query: &QueryContext,
    trains: bool,
) -> Result<Planned> {
    let physical = assign_query(physical, query)?;
    let epsilon = if checked_first(&physical, trains) {
        check_at_stations(&physical, query.fragment_timeout).await?
    } else {
        BTreeMap::new()
    };
    let mut metadata = HashMap::new();
    if !epsilon.is_empty() {
        // A map of numbers always serializes.
        let text = serde_json::to_string(&epsilon).expect("a map of ε serializes");
        metadata.insert(EPSILON_METADATA.to_string(), text);
    }
    let task = railyard_udfs::query_task(state)?;
    let withheld = crate::exec::reports_withheld(&physical).then(|| query.withheld.clone());
    Ok(Planned::Plan(physical, task, metadata, withheld))
}

/// What a researcher may run: a query, never DDL, DML or a statement (`SET` of ε is
/// recognised before planning).
fn query_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Asks each station whether its policy accepts its ticket, concurrently; the first refusal
/// (in the order given) is the error. Returns the answers in the order given.
pub(crate) async fn check_tickets(
    tickets: &[(StationClient, FragmentTicket)],
    timeout: Duration,
) -> Result<Vec<CheckAnswer>> {
    let answers = futures::future::join_all(tickets.iter().map(|(station, ticket)| async move {
        match tokio::time::timeout(timeout, station.check(ticket)).await {
            Ok(answer) => answer,
            Err(_) => Err(StationFailure::Timeout {
                station: station.name.to_string(),
                fragment: ticket.fragment,
                timeout,
            }
            .into()),
        }
    }))
    .await;
    // An accepted check's answer (release kind, the station's k) is informational: the hub's
    // own threshold was planned from the policies the stations announced at connect, and
    // every station applies its own k to what it releases regardless. The first failure, a
    // refusal included, is the error.
    let mut accepted = Vec::with_capacity(answers.len());
    for answer in answers {
        accepted.push(answer?);
    }
    Ok(accepted)
}

/// The researcher-facing coordinator of a federation.
pub struct Hub {
    stations: Arc<Vec<StationClient>>,
    catalog: FederatedCatalog,
    planner: Arc<FederationPlanner>,
    base: SessionState,
    options: HubOptions,
    /// Each researcher's `SET railyard.epsilon`.
    epsilon: Mutex<HashMap<String, f64>>,
    /// When each researcher's recent queries started (`max_queries_per_minute`).
    recent: railyard_policy::gate::RateWindow,
    /// Which stations are online (shared with every rebuild of this hub).
    board: Arc<StationBoard>,
    /// The digest of what each station announced when this hub was built.
    announced: BTreeMap<String, String>,
    /// Plans kept by statement text.
    plans: cache::PlanCache,
    /// Statements parsed, by their text.
    parsed: cache::ParseCache,
    /// Plans prepares made, waiting for their runs.
    prepared: cache::PreparedPlans,
}

impl Hub {
    /// Connects to every station and builds the federated catalog from what they announce.
    pub async fn connect(addresses: &[StationAddress], mut options: HubOptions) -> Result<Self> {
        let board = Arc::clone(
            options
                .transport
                .board
                .get_or_insert_with(StationBoard::new),
        );
        let mut announced = BTreeMap::new();
        let mut stations = Vec::new();
        let mut catalog = FederatedCatalog::new();
        // Every station's announced policies, for railyard.policies.
        let mut policies = Vec::new();
        // Members of a vertical table are read through its join station, not by the planner.
        let mut members: BTreeMap<String, Vec<vertical::Member>> = BTreeMap::new();
        for address in addresses {
            if stations
                .iter()
                .any(|s: &StationClient| s.name.as_ref() == address.name)
            {
                return Err(Error::BadRequest(format!(
                    "station '{}' is configured twice",
                    address.name
                )));
            }
            let client =
                StationClient::connect(address, options.connect_patience, &options.transport)
                    .await?;
            let served = |table: &str| {
                options
                    .tables
                    .as_ref()
                    .is_none_or(|t| t.iter().any(|t| t == table))
            };
            let announcement = client.announcement().await?;
            board.seen(&address.name, &announcement);
            announced.insert(address.name.clone(), announcement.digest());
            let table_policies: Vec<_> = announcement
                .policies
                .into_iter()
                .filter(|p| served(&p.table))
                .collect();
            for (table, schema) in announcement.tables {
                if !served(&table) {
                    continue;
                }
                let policy = table_policies.iter().find(|p| p.table == table).cloned();
                if let Some(spec) = options.vertical.iter().find(|v| v.name == table) {
                    if !spec.members.is_empty() && !spec.members.contains(&address.name) {
                        return Err(Error::BadRequest(format!(
                            "vertical table '{table}': station '{}' serves a table of that \
                             name but is not among its members ({}); list it as a member or \
                             leave it out of this collaboration",
                            address.name,
                            spec.members.join(", ")
                        )));
                    }
                    members.entry(table).or_default().push(vertical::Member {
                        client: client.clone(),
                        schema,
                        policy,
                    });
                } else {
                    catalog.add(&client.name, &table, schema)?;
                    if let Some(p) = &policy {
                        catalog.set_policy(&client.name, &table, planner_policy(p));
                    }
                }
            }
            policies.extend(
                table_policies
                    .into_iter()
                    .map(|p| (address.name.clone(), p)),
            );
            stations.push(client);
        }
        for spec in &options.vertical {
            let announced = members.get(&spec.name);
            if let Some(missing) = spec.members.iter().find(|m| {
                announced.is_none_or(|a| !a.iter().any(|a| a.client.name.as_ref() == m.as_str()))
            }) {
                return Err(Error::BadRequest(format!(
                    "vertical table '{}': member station '{missing}' does not serve a table \
                     of that name",
                    spec.name
                )));
            }
            let Some(dir) = &options.data_dir else {
                return Err(Error::BadRequest(format!(
                    "vertical table '{}' needs a hub data directory for its join station's \
                     audit log",
                    spec.name
                )));
            };
            let join = vertical::start(
                spec,
                members.remove(&spec.name).unwrap_or_default(),
                &dir.join(format!("{}-join", spec.name)).join("audit.jsonl"),
                options.fragment_timeout,
            )?;
            let name = join.client.name.to_string();
            for (table, schema) in join.client.tables().await? {
                catalog.add(&name, &table, schema)?;
            }
            for p in join.client.policy().await? {
                catalog.set_policy(&name, &p.table, planner_policy(&p));
                policies.push((name.clone(), p));
            }
            catalog.set_vertical(&spec.name, join.layout.clone());
            stations.push(join.client);
        }
        check_references(&policies)?;
        let planner = Arc::new(FederationPlanner::new(&catalog)?);
        let config = SessionConfig::new()
            .with_target_partitions(options.merge_partitions.max(1))
            .with_information_schema(true)
            .with_default_catalog_and_schema("datafusion", "public");
        let stations = Arc::new(stations);
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_query_planner(Arc::new(FederatedQueryPlanner {
                planner: Arc::clone(&planner),
                stations: Arc::clone(&stations),
            }))
            .build();
        let mut ctx = SessionContext::new_with_state(state);
        railyard_udfs::dp::register(&mut ctx)?;
        railyard_udfs::capped::register(&ctx);
        railyard_udfs::capped::register_concat(&ctx);
        ctx.register_udaf(railyard_udfs::checked_sum::udaf());
        let tables: BTreeMap<String, _> = catalog
            .tables()
            .into_iter()
            .map(|t| (t.name().to_string(), t))
            .collect();
        for (name, table) in &tables {
            ctx.register_table(name.as_str(), Arc::clone(table) as _)?;
        }
        register_policies(&ctx, &policies)?;
        ctx.register_table(
            format!("railyard.{}", crate::budget::BUDGET_TABLE).as_str(),
            Arc::new(crate::budget::budget_table(Arc::clone(&stations))),
        )?;
        ctx.register_table(
            format!("railyard.{STATIONS_TABLE}").as_str(),
            Arc::new(StationsTable {
                board: Arc::clone(&board),
                stations: addresses.iter().map(|a| a.name.clone()).collect(),
                served: options.tables.clone(),
            }),
        )?;
        info!(
            stations = stations.len(),
            tables = tables.len(),
            "hub catalog ready"
        );
        // Queries with train(...) calls get their own function holding the outputs; this
        // one only explains itself if reached.
        ctx.register_udtf(
            train::TRAIN_FUNCTION,
            Arc::new(train::TrainOutputs::default()),
        );
        crate::stats::register(
            &ctx,
            Arc::new(crate::stats::StatsEnv {
                stations: Arc::clone(&stations),
                tables,
            }),
        );
        Ok(Self {
            stations,
            catalog,
            planner,
            base: ctx.state(),
            options,
            epsilon: Mutex::new(HashMap::new()),
            recent: Default::default(),
            board,
            announced,
            plans: Default::default(),
            parsed: Default::default(),
            prepared: Default::default(),
        })
    }

    /// The board of this hub's stations (`railyard.stations`).
    pub fn board(&self) -> &Arc<StationBoard> {
        &self.board
    }

    /// Asks every station for its announcement, each within `timeout`, and records on the
    /// board who answered (a query that needs a station that did not fails at once from
    /// now on). True if a station that answered announces something else than this hub's
    /// catalog was built from (a table, a schema, a policy): the caller should build a new
    /// hub.
    pub async fn probe(&self, timeout: Duration) -> bool {
        let answers =
            futures::future::join_all(self.stations.iter().filter(|s| !s.is_local()).map(
                |s| async move { (s, tokio::time::timeout(timeout, s.announcement()).await) },
            ))
            .await;
        let mut stale = false;
        for (station, answer) in answers {
            match answer {
                Ok(Ok(announcement)) => {
                    self.board.seen(&station.name, &announcement);
                    stale |=
                        self.announced.get(station.name.as_ref()) != Some(&announcement.digest());
                }
                Ok(Err(e)) => self.board.lost(&station.name, e.to_string()),
                Err(_) => self
                    .board
                    .lost(&station.name, format!("no answer within {timeout:?}")),
            }
        }
        stale
    }

    pub fn options(&self) -> &HubOptions {
        &self.options
    }

    pub fn catalog(&self) -> &FederatedCatalog {
        &self.catalog
    }

    pub fn station_names(&self) -> Vec<String> {
        self.stations.iter().map(|s| s.name.to_string()).collect()
    }

    /// Plans `sql` for `researcher` and has every station check its fragments against its
    /// policy (nothing runs yet). All queries share one session; who asks is attached to the
    /// plan's fragments afterwards.
    pub async fn plan(&self, sql: &str, researcher: &str) -> Result<Planned> {
        self.within_rate(researcher)?;
        if let Some(planned) = self.prepared.take(researcher, sql) {
            return Ok(planned);
        }
        let (mut statement, explain_federated) = self.parse(sql)?;
        let parameters = params::number_placeholders(&mut statement)?;
        if parameters > 0 {
            return Err(Error::BadRequest(format!(
                "the statement has {parameters} parameter{} and no values were bound: prepare \
                 it and bind one row of values (in Python: cursor.execute(sql, \
                 parameters=(…)))",
                if parameters == 1 { "" } else { "s" }
            )));
        }
        let calls = train::calls(&statement)?;
        self.plan_parsed(statement, calls, explain_federated, researcher)
            .await
    }

    /// Refuses (rule `rate_limit`) a query beyond `max_queries_per_minute` for its
    /// researcher; counts it otherwise.
    fn within_rate(&self, researcher: &str) -> Result<()> {
        let limit = self.options.max_queries_per_minute;
        if self.recent.admit(researcher, limit) {
            return Ok(());
        }
        Err(Error::Limit(railyard_policy::Refusal {
            rule: railyard_policy::Rule::RateLimit,
            message: format!(
                "the hub runs at most {limit} queries per minute for one researcher \
                 (max_queries_per_minute); wait and ask again"
            ),
        }))
    }

    /// `sql` held to the statement limits and parsed, and whether it was `EXPLAIN
    /// FEDERATED` (which is stripped); a text parsed before is taken from `parsed`.
    fn parse(&self, sql: &str) -> Result<(DfStatement, bool)> {
        if let Some(parsed) = self.parsed.get(sql) {
            return Ok(parsed);
        }
        railyard_policy::limits::check_statement(sql, "the hub").map_err(Error::Limit)?;
        let (text, explain_federated) = match strip_explain_federated(sql) {
            Some(inner) => (inner, true),
            None => (sql, false),
        };
        let dialect = self.base.config().options().sql_parser.dialect;
        let parsed = (
            self.base.sql_to_statement(text, &dialect)?,
            explain_federated,
        );
        self.parsed.keep(sql, &parsed);
        Ok(parsed)
    }

    async fn plan_parsed(
        &self,
        statement: DfStatement,
        calls: Vec<train::TrainArgs>,
        explain_federated: bool,
        researcher: &str,
    ) -> Result<Planned> {
        if let Some(setting) = epsilon_setting(&statement)? {
            return Ok(self.set_epsilon(researcher, setting));
        }
        let mut trains = Vec::new();
        for call in &calls {
            let input = train::plan_input(&self.base, call).await?;
            trains.push(train::resolve(call, &input, &self.catalog, &self.stations)?);
        }
        // Train calls are the query's fragments 1..=n; the planned ones follow.
        let query = self.query_context(researcher, trains.len() + 1);
        if explain_federated {
            if !trains.is_empty() {
                // The query around the calls plans over their outputs, which exist only
                // once the trains have run; the explanation stops at the calls.
                let batch = train::explain_batch(&trains)?;
                return Ok(Planned::Batches(batch.schema(), vec![batch]));
            }
            let logical = self.base.statement_to_plan(statement).await?;
            return self.explain(&logical, &query).await;
        }
        if !trains.is_empty() {
            let query_only = |s: &DfStatement| {
                matches!(s, DfStatement::Statement(s)
                    if matches!(s.as_ref(), datafusion::sql::sqlparser::ast::Statement::Query(_)))
            };
            let is_query = match &statement {
                DfStatement::Explain(e) => query_only(&e.statement),
                other => query_only(other),
            };
            if !is_query {
                return Err(Error::BadRequest(
                    "only a query (SELECT …) may call train(...)".to_string(),
                ));
            }
            // Every station of every call accepts, and says which columns its image
            // declares, before anything starts; the trains run when the plan is executed.
            let tickets = train::tickets(&trains, &query);
            let answers = check_tickets(&tickets, self.options.fragment_timeout).await?;
            let tables = train::tables(&trains, &answers, self.options.train_timeout)?;
            let mut state = self.base.clone();
            state.register_udtf(
                train::TRAIN_FUNCTION,
                Arc::new(train::TrainOutputs {
                    outputs: calls.into_iter().zip(tables).collect(),
                }),
            );
            return plan_statement(&state, statement, &query, true).await;
        }
        self.plan_kept(statement, &query).await
    }

    /// Plans a statement as [`plan_statement`] does, reusing the plan kept for the same text
    /// (see `cache`) and keeping a new one if it may be reused.
    async fn plan_kept(&self, statement: DfStatement, query: &QueryContext) -> Result<Planned> {
        let text = statement.to_string();
        if let Some(kept) = self.plans.get(&text) {
            let physical = datafusion::physical_plan::execution_plan::reset_plan_states(kept)?;
            return plan_physical(&self.base, physical, query, false).await;
        }
        let logical = self.base.statement_to_plan(statement).await?;
        query_only().verify_plan(&logical)?;
        let state = self.session_for(&logical);
        let physical = state.create_physical_plan(&logical).await?;
        let physical = railyard_udfs::lean_projection::without_metrics(physical)?;
        if matches!(state, Cow::Borrowed(_)) {
            self.plans.keep(text, &physical);
        }
        plan_physical(&state, physical, query, false).await
    }

    /// The session to plan `logical` in: the hub's own when every function is immutable;
    /// for a plan calling `now()`, `current_date`, `random()` or another function that is
    /// not, a copy whose start time is now. DataFusion folds `now()` and the like into
    /// constants while optimizing, at the session's start time: this query's, not the hub's.
    /// Only plans made in the hub's own session may be kept (see `cache`).
    fn session_for(
        &self,
        logical: &datafusion::logical_expr::LogicalPlan,
    ) -> Cow<'_, SessionState> {
        if railyard_policy::check::only_immutable_functions(logical) {
            return Cow::Borrowed(&self.base);
        }
        let mut state = self.base.clone();
        state.mark_start_execution();
        Cow::Owned(state)
    }

    /// A new query of `researcher`'s, whose planned fragments are numbered from
    /// `first_fragment`.
    fn query_context(&self, researcher: &str, first_fragment: usize) -> QueryContext {
        QueryContext {
            query_id: uuid::Uuid::new_v4().to_string(),
            researcher: researcher.to_string(),
            fragment_timeout: self.options.fragment_timeout,
            first_fragment,
            collaboration: self.options.collaboration.clone(),
            epsilon: self.researcher_epsilon(researcher),
            withheld: Withheld::default(),
        }
    }

    /// `EXPLAIN FEDERATED` of a logical plan: its fragments, what leaves each station, the
    /// merge, and the ε each DP fragment would charge.
    async fn explain(
        &self,
        logical: &datafusion::logical_expr::LogicalPlan,
        query: &QueryContext,
    ) -> Result<Planned> {
        query_only().verify_plan(logical)?;
        let optimized = self.session_for(logical).optimize(logical)?;
        let federated = self.planner.federate(&optimized).await?;
        let epsilon = self.explain_epsilon(&federated, query).await?;
        let batch = explain_batch(&federated, &epsilon)?;
        Ok(Planned::Batches(batch.schema(), vec![batch]))
    }

    /// Plans a serialized Substrait plan for `researcher` exactly as [`Hub::plan`] plans a
    /// statement: the same fragments, station checks, refusals and rate limit; with
    /// `explain_federated`, its `EXPLAIN FEDERATED`. See [`crate::substrait`].
    pub async fn plan_substrait(
        &self,
        plan: &[u8],
        explain_federated: bool,
        researcher: &str,
    ) -> Result<Planned> {
        self.within_rate(researcher)?;
        self.planned_substrait(plan, explain_federated, researcher)
            .await
    }

    /// The schema a prepared Substrait plan announces; the stations check its fragments
    /// (nothing runs). Not counted against the rate limit: running it is.
    pub async fn prepare_substrait(
        &self,
        plan: &[u8],
        explain_federated: bool,
        researcher: &str,
    ) -> Result<SchemaRef> {
        Ok(self
            .planned_substrait(plan, explain_federated, researcher)
            .await?
            .schema())
    }

    async fn planned_substrait(
        &self,
        plan: &[u8],
        explain_federated: bool,
        researcher: &str,
    ) -> Result<Planned> {
        let logical = crate::substrait::logical_plan(&self.base, plan).await?;
        let query = self.query_context(researcher, 1);
        if explain_federated {
            return self.explain(&logical, &query).await;
        }
        let state = self.session_for(&logical);
        plan_logical(&state, logical, &query, false).await
    }

    /// The ε `researcher` chose, if any.
    fn researcher_epsilon(&self, researcher: &str) -> Option<f64> {
        // The lock guards a map operation only; after a panic the map is still valid.
        let settings = self.epsilon.lock().unwrap_or_else(|p| p.into_inner());
        settings.get(researcher).copied()
    }

    /// Applies `SET railyard.epsilon` for `researcher` and answers with the setting.
    fn set_epsilon(&self, researcher: &str, setting: Option<f64>) -> Planned {
        let mut settings = self.epsilon.lock().unwrap_or_else(|p| p.into_inner());
        match setting {
            Some(e) => settings.insert(researcher.to_string(), e),
            None => settings.remove(researcher),
        };
        epsilon_answer(setting)
    }

    /// For `EXPLAIN FEDERATED`: the ε each station would charge for each DP fragment, as the
    /// stations answer a check (which spends nothing; a query the budget cannot cover is
    /// refused here already).
    async fn explain_epsilon(
        &self,
        federated: &railyard_planner::FederatedPlan,
        query: &QueryContext,
    ) -> Result<HashMap<(usize, String), f64>> {
        let mut tickets = Vec::new();
        let mut keys = Vec::new();
        for f in &federated.fragments {
            if !matches!(f.kind, railyard_planner::FragmentKind::DpAggregate { .. }) {
                continue;
            }
            for name in &f.stations {
                let Some(station) = self.stations.iter().find(|s| s.name.as_ref() == name) else {
                    continue;
                };
                tickets.push((
                    station.clone(),
                    FragmentTicket {
                        query_id: query.query_id.clone(),
                        fragment: f.id + query.first_fragment - 1,
                        researcher: query.researcher.clone(),
                        collaboration: query.collaboration.clone(),
                        epsilon: query.epsilon,
                        sql: f.sql.clone(),
                        train: None,
                    },
                ));
                keys.push((f.id, name.clone()));
            }
        }
        if tickets.is_empty() {
            return Ok(HashMap::new());
        }
        let answers = check_tickets(&tickets, self.options.fragment_timeout).await?;
        Ok(keys
            .into_iter()
            .zip(answers)
            .filter_map(|(k, a)| a.epsilon.map(|e| (k, e)))
            .collect())
    }

    /// The schema a prepared statement announces; the stations check the query's fragments
    /// (nothing runs, no train starts).
    ///
    /// Returns the answer's schema and the parameters' (`$1`, `$2`, … with the types
    /// DataFusion infers; `Null` where it infers none). A statement with parameters is only
    /// planned for its columns here: its values are bound with [`Hub::bind`], and the
    /// statement they make is checked when it is run.
    pub async fn prepare(&self, sql: &str, researcher: &str) -> Result<(SchemaRef, SchemaRef)> {
        let (mut statement, explain_federated) = self.parse(sql)?;
        let parameters = params::number_placeholders(&mut statement)?;
        if parameters > 0 {
            let (logical, types) = self.parameter_types(&statement, parameters).await?;
            let answer = if explain_federated {
                railyard_planner::explain_schema()
            } else {
                Arc::new(logical.schema().as_arrow().clone())
            };
            let fields: Vec<arrow::datatypes::Field> = types
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    arrow::datatypes::Field::new(
                        format!("${}", i + 1),
                        t.unwrap_or(arrow::datatypes::DataType::Null),
                        true,
                    )
                })
                .collect();
            return Ok((answer, Arc::new(arrow::datatypes::Schema::new(fields))));
        }
        let no_parameters = Arc::new(arrow::datatypes::Schema::empty());
        if let Some(setting) = epsilon_setting(&statement)? {
            // Preparing a SET applies nothing.
            return Ok((epsilon_answer(setting).schema(), no_parameters));
        }
        let calls = train::calls(&statement)?;
        let planned = self
            .plan_parsed(statement, calls, explain_federated, researcher)
            .await?;
        let schema = planned.schema();
        // A client runs what it prepared at once: the run takes this plan (see `cache`).
        self.prepared.keep(researcher, sql, planned);
        Ok((schema, no_parameters))
    }

    /// The statement `sql` (prepared with parameters) with `values` (one row, a column per
    /// parameter) written into it as literals: the text to run. Each value is cast to the
    /// type DataFusion infers for its parameter; a wrong count or type is a bad request.
    pub async fn bind(&self, sql: &str, values: &RecordBatch) -> Result<String> {
        let (mut statement, explain_federated) = self.parse(sql)?;
        let parameters = params::number_placeholders(&mut statement)?;
        if parameters == 0 && values.num_columns() == 0 {
            return Ok(sql.to_string());
        }
        let types = if parameters == 0 {
            Vec::new()
        } else {
            self.parameter_types(&statement, parameters).await?.1
        };
        params::bind(&mut statement, parameters, &types, values)?;
        let text = statement.to_string();
        Ok(if explain_federated {
            format!("EXPLAIN FEDERATED {text}")
        } else {
            text
        })
    }

    /// The logical plan of a statement with `count` parameters, and each parameter's type
    /// as DataFusion infers it.
    async fn parameter_types(
        &self,
        statement: &DfStatement,
        count: usize,
    ) -> Result<(
        datafusion::logical_expr::LogicalPlan,
        Vec<Option<arrow::datatypes::DataType>>,
    )> {
        let logical = self.base.statement_to_plan(statement.clone()).await?;
        query_only().verify_plan(&logical)?;
        let mut types = logical.get_parameter_types()?;
        let types = (1..=count)
            .map(|i| types.remove(&format!("${i}")).flatten())
            .collect();
        Ok((logical, types))
    }

    /// Plans and starts `sql`.
    pub async fn execute(&self, sql: &str, researcher: &str) -> Result<SendableRecordBatchStream> {
        self.plan(sql, researcher).await?.run().await
    }

    /// Plans, runs and collects `sql`.
    pub async fn collect(&self, sql: &str, researcher: &str) -> Result<Vec<RecordBatch>> {
        use futures::TryStreamExt;
        let stream = self.execute(sql, researcher).await?;
        Ok(stream.try_collect().await?)
    }

    /// The tables a client may list: (catalog, schema, table, type, arrow schema).
    pub async fn list_tables(&self) -> Result<Vec<(String, String, String, String, SchemaRef)>> {
        let mut out = Vec::new();
        let catalogs = self.base.catalog_list();
        for catalog_name in catalogs.catalog_names() {
            let Some(catalog) = catalogs.catalog(&catalog_name) else {
                continue;
            };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else {
                    continue;
                };
                for table_name in schema.table_names() {
                    let Some(table) = schema.table(&table_name).await? else {
                        continue;
                    };
                    let kind = match table.table_type() {
                        TableType::Base => "TABLE",
                        TableType::View => "VIEW",
                        TableType::Temporary => "LOCAL TEMPORARY",
                    };
                    out.push((
                        catalog_name.clone(),
                        schema_name.clone(),
                        table_name,
                        kind.to_string(),
                        table.schema(),
                    ));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        Ok(out)
    }
}

/// Refuses a reference table that the stations do not all hold identically: one station's
/// different copy (another vocabulary release) would silently change every join through it.
fn check_references(policies: &[(String, railyard_contract::TablePolicyInfo)]) -> Result<()> {
    let mut by_table: BTreeMap<&str, Vec<(&str, Option<&str>)>> = BTreeMap::new();
    for (station, p) in policies {
        by_table
            .entry(p.table.as_str())
            .or_default()
            .push((station.as_str(), p.reference.as_deref()));
    }
    for (table, copies) in by_table {
        let Some(first) = copies.iter().find_map(|(_, h)| *h) else {
            continue;
        };
        let differ: Vec<&str> = copies
            .iter()
            .filter(|(_, h)| *h != Some(first))
            .map(|(s, _)| *s)
            .collect();
        if !differ.is_empty() {
            let holders: Vec<&str> = copies
                .iter()
                .filter(|(_, h)| *h == Some(first))
                .map(|(s, _)| *s)
                .collect();
            return Err(Error::BadRequest(format!(
                "reference table '{table}' is not the same at every station: {} hold one copy, \
                 {} another copy or a table of patient data by that name; every station must \
                 serve the identical file or relation",
                holders.join(", "),
                differ.join(", ")
            )));
        }
    }
    Ok(())
}
