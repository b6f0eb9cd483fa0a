//! Running fragments: the Flight-client operator and the hub's physical planner.
//!
//! ```text
//!   FragmentNode (logical) ──FragmentPlanner──▶ FragmentExec, one partition
//!                                                 a DoGet(ticket) per station, all
//!                                                 spawned at once, bounded by a deadline
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightData, Ticket};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::limit::GlobalLimitExec;
use datafusion::physical_plan::stream::{RecordBatchReceiverStream, RecordBatchStreamAdapter};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use futures::StreamExt;
use futures::stream::BoxStream;
use railyard_contract::FragmentTicket;
use railyard_planner::{FederationPlanner, Fragment, FragmentNode, ThresholdNode};
use tokio::time::{Instant, timeout_at};
use tonic::Code;
use tracing::warn;

use crate::error::StationFailure;
use crate::station_client::StationClient;
use crate::withheld::{ThresholdExec, Withheld};

/// Who runs a query and how long a station may take: fixed per query.
#[derive(Debug, Clone)]
pub struct QueryContext {
    pub query_id: String,
    pub researcher: String,
    pub fragment_timeout: Duration,
    /// The number the query's first planned fragment carries: 1, or the number after the
    /// query's `train(...)` calls, which are its first fragments.
    pub first_fragment: usize,
    /// The collaboration the researcher asks in.
    pub collaboration: String,
    /// The ε the researcher chose (`SET railyard.epsilon`), for DP fragments; without one
    /// each station uses its policy's default.
    pub epsilon: Option<f64>,
    /// The groups the answer leaves out, as the stations and the hub's threshold report them.
    pub withheld: Withheld,
}

/// Physical operator that runs one fragment at every station of its table; its one
/// partition streams every station's answer as it arrives. (One partition per station cost
/// the hub a task, a channel and a partial-aggregate stream per station.)
///
/// The operator is planned without knowing who asks; the hub assigns the query's identity
/// with [`FragmentExec::with_query`] before executing (see [`assign_query`]), so one shared
/// session serves all queries.
#[derive(Debug, Clone)]
pub struct FragmentExec {
    fragment: Arc<Fragment>,
    stations: Vec<StationClient>,
    query: Option<QueryContext>,
    /// How each station's fetch went, for this query (see [`Outcomes`]).
    outcomes: Arc<Outcomes>,
    properties: Arc<PlanProperties>,
}

/// How far each station's fetch of one fragment got, so that when stations fail, the error
/// the query reports is the first station's in station order (the one a check round before
/// the run would have reported), whichever failed first in time.
#[derive(Debug)]
struct Outcomes {
    states: std::sync::Mutex<Vec<Outcome>>,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Nothing known yet.
    Pending,
    /// Its first batch arrived, or it finished: it did not refuse the fragment.
    Passed,
    Failed(StationFailure),
}

impl Outcomes {
    fn new(stations: usize) -> Self {
        Self {
            states: std::sync::Mutex::new(vec![Outcome::Pending; stations]),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn set(&self, station: usize, outcome: Outcome) {
        // The lock guards a vector update only; after a panic it is still valid.
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = states.get_mut(station) {
            if matches!(state, Outcome::Failed(_)) {
                return;
            }
            *state = outcome;
        }
        drop(states);
        self.changed.notify_waiters();
    }

    /// Records that `station` passed, unless something is known of it already.
    fn passed(&self, station: usize) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        match states.get_mut(station) {
            Some(state @ Outcome::Pending) => *state = Outcome::Passed,
            _ => return,
        }
        drop(states);
        self.changed.notify_waiters();
    }

    /// Records that `station` failed with `failure`, waits until every station before it
    /// has passed or failed, and returns the first failure in station order.
    async fn failed(&self, station: usize, failure: StationFailure) -> StationFailure {
        self.set(station, Outcome::Failed(failure.clone()));
        loop {
            let changed = self.changed.notified();
            {
                let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
                let before = &states[..station.min(states.len())];
                if !before.iter().any(|s| matches!(s, Outcome::Pending)) {
                    return before
                        .iter()
                        .find_map(|s| match s {
                            Outcome::Failed(f) => Some(f.clone()),
                            _ => None,
                        })
                        .unwrap_or(failure);
                }
            }
            changed.await;
        }
    }
}

impl FragmentExec {
    pub fn new(fragment: Arc<Fragment>, stations: Vec<StationClient>) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&fragment.schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        let outcomes = Arc::new(Outcomes::new(stations.len()));
        Self {
            fragment,
            stations,
            query: None,
            outcomes,
            properties: Arc::new(properties),
        }
    }

    /// The fragment's ticket for each of its stations (once a query is assigned).
    pub fn tickets(&self) -> Vec<(StationClient, FragmentTicket)> {
        let Some(query) = &self.query else {
            return Vec::new();
        };
        self.stations
            .iter()
            .map(|s| (s.clone(), self.ticket(query)))
            .collect()
    }

    /// What this fragment's `DoGet` (and `check`) carries on behalf of `query`.
    fn ticket(&self, query: &QueryContext) -> FragmentTicket {
        FragmentTicket {
            query_id: query.query_id.clone(),
            fragment: self.fragment.id + query.first_fragment - 1,
            researcher: query.researcher.clone(),
            collaboration: query.collaboration.clone(),
            epsilon: query.epsilon,
            sql: self.fragment.sql.clone(),
            train: None,
        }
    }

    /// The same operator, sent on behalf of `query`.
    pub fn with_query(&self, query: QueryContext) -> Self {
        Self {
            query: Some(query),
            outcomes: Arc::new(Outcomes::new(self.stations.len())),
            ..self.clone()
        }
    }
}

/// Gives every [`FragmentExec`] in `plan` the identity of the query it belongs to.
pub fn assign_query(
    plan: Arc<dyn ExecutionPlan>,
    query: &QueryContext,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    Ok(plan
        .transform_up(|node| {
            if let Some(exec) = node.downcast_ref::<QueryJobExec>() {
                return Ok(Transformed::yes(
                    Arc::new(exec.with_query(query.clone())) as _
                ));
            }
            if let Some(exec) = node.downcast_ref::<ThresholdExec>() {
                return Ok(Transformed::yes(
                    Arc::new(exec.with_tally(query.withheld.clone())) as _,
                ));
            }
            Ok(match node.downcast_ref::<FragmentExec>() {
                Some(exec) => Transformed::yes(Arc::new(exec.with_query(query.clone())) as _),
                None => Transformed::no(node),
            })
        })?
        .data)
}

/// Whether any operator of `plan` satisfies `test`.
fn any_node(plan: &Arc<dyn ExecutionPlan>, test: impl Fn(&Arc<dyn ExecutionPlan>) -> bool) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        found = test(node);
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// Whether `plan` releases thresholded groups (an aggregate fragment, a statistics call, the
/// hub's threshold), whose answer therefore says how many it withheld.
pub fn reports_withheld(plan: &Arc<dyn ExecutionPlan>) -> bool {
    any_node(plan, |node| {
        node.downcast_ref::<QueryJobExec>().is_some()
            || node.downcast_ref::<ThresholdExec>().is_some()
            || node.downcast_ref::<FragmentExec>().is_some_and(|f| {
                matches!(
                    f.fragment.kind,
                    railyard_planner::FragmentKind::PartialAggregate { .. }
                )
            })
    })
}

/// Whether a fragment of `plan` must be checked at every station before any runs (see
/// `Hub::plan`): a differentially private one (it charges ε), or one a vertical table's join
/// station answers (its members release pseudonymized rows to it).
pub fn has_fragment_checked_first(plan: &Arc<dyn ExecutionPlan>) -> bool {
    any_node(plan, |node| {
        node.downcast_ref::<FragmentExec>().is_some_and(|f| {
            matches!(
                f.fragment.kind,
                railyard_planner::FragmentKind::DpAggregate { .. }
            ) || f.stations.iter().any(StationClient::is_local)
        })
    })
}

/// Every (station, ticket) a planned query will send, in fragment order.
pub fn query_tickets(plan: &Arc<dyn ExecutionPlan>) -> Vec<(StationClient, FragmentTicket)> {
    let mut out = Vec::new();
    let _ = plan.apply(|node| {
        if let Some(exec) = node.downcast_ref::<FragmentExec>() {
            out.extend(exec.tickets());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out.sort_by_key(|(s, t)| (t.fragment, s.name.clone()));
    out
}

impl DisplayAs for FragmentExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.stations.iter().map(|s| s.name.as_ref()).collect();
        write!(
            f,
            "FragmentExec: #{} at [{}]: {}",
            self.fragment.id,
            names.join(", "),
            self.fragment.sql
        )
    }
}

/// The parts of [`ExecutionPlan`] every hub leaf operator (no children, no expressions, its
/// properties in a `properties` field) implements the same way.
macro_rules! leaf_exec {
    ($name:literal) => {
        fn name(&self) -> &str {
            $name
        }

        fn properties(&self) -> &std::sync::Arc<datafusion::physical_plan::PlanProperties> {
            &self.properties
        }

        fn children(&self) -> Vec<&std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
            vec![]
        }

        fn apply_expressions(
            &self,
            _f: &mut dyn FnMut(
                &std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>,
            ) -> datafusion::common::Result<
                datafusion::common::tree_node::TreeNodeRecursion,
            >,
        ) -> datafusion::common::Result<datafusion::common::tree_node::TreeNodeRecursion> {
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        }

        fn with_new_children(
            self: std::sync::Arc<Self>,
            children: Vec<std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan>>,
        ) -> datafusion::common::Result<std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan>>
        {
            if !children.is_empty() {
                return Err(datafusion::error::DataFusionError::Internal(format!(
                    "{} has no children",
                    $name
                )));
            }
            Ok(self)
        }
    };
}
pub(crate) use leaf_exec;

/// What a [`QueryJobExec`] runs: one batch over its full schema, computed on behalf of a
/// query (the statistics functions' rounds, `railyard.budget`'s questions to the stations).
pub trait QueryJob: fmt::Debug + Send + Sync {
    /// How the operator shows in a physical plan.
    fn describe(&self) -> String;
    /// Computes the batch (its columns are the full schema the operator was made with).
    fn run(
        &self,
        query: QueryContext,
    ) -> futures::future::BoxFuture<'static, DfResult<RecordBatch>>;
    /// Whether it starts containers at the stations (a train): such a plan starts only when
    /// its answer is claimed, never ahead of it.
    fn starts_containers(&self) -> bool {
        false
    }
}

/// A leaf that runs a [`QueryJob`] when executed: one partition, one batch, projected. Like
/// a [`FragmentExec`] it is planned without knowing who asks, and [`assign_query`] gives it
/// the query's identity.
#[derive(Debug, Clone)]
pub struct QueryJobExec {
    job: Arc<dyn QueryJob>,
    projection: Option<Vec<usize>>,
    query: Option<QueryContext>,
    properties: Arc<PlanProperties>,
}

impl QueryJobExec {
    pub fn new(
        job: Arc<dyn QueryJob>,
        full: &SchemaRef,
        projection: Option<Vec<usize>>,
    ) -> DfResult<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(full.project(p)?),
            None => Arc::clone(full),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Ok(Self {
            job,
            projection,
            query: None,
            properties: Arc::new(properties),
        })
    }

    /// The same operator, run on behalf of `query`.
    pub fn with_query(&self, query: QueryContext) -> Self {
        Self {
            query: Some(query),
            ..self.clone()
        }
    }

    /// Whether its job starts containers at the stations.
    pub fn starts_containers(&self) -> bool {
        self.job.starts_containers()
    }
}

/// A table whose rows a [`QueryJob`] computes when the plan runs: its scan is a
/// [`QueryJobExec`] (the statistics functions, `railyard.budget`, `train(...)`).
#[derive(Debug)]
pub struct JobTable {
    job: Arc<dyn QueryJob>,
    schema: SchemaRef,
    kind: datafusion::datasource::TableType,
}

impl JobTable {
    /// A table of `schema` (the job's full output) shown as `kind`.
    pub fn new(
        job: Arc<dyn QueryJob>,
        schema: SchemaRef,
        kind: datafusion::datasource::TableType,
    ) -> Self {
        Self { job, schema, kind }
    }
}

#[async_trait]
impl datafusion::catalog::TableProvider for JobTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.kind
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(QueryJobExec::new(
            Arc::clone(&self.job),
            &self.schema,
            projection.cloned(),
        )?))
    }
}

impl DisplayAs for QueryJobExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.job.describe())
    }
}

impl ExecutionPlan for QueryJobExec {
    leaf_exec!("QueryJobExec");

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "{} has one partition, not {partition}",
                self.job.describe()
            )));
        }
        let Some(query) = self.query.clone() else {
            return Err(DataFusionError::Internal(format!(
                "{} was executed without a query identity",
                self.job.describe()
            )));
        };
        let run = self.job.run(query);
        let projection = self.projection.clone();
        let schema = self.properties.eq_properties.schema().clone();
        let run = async move {
            let batch = run.await?;
            match projection {
                Some(p) => Ok(batch.project(&p)?),
                None => Ok(batch),
            }
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(run),
        )))
    }
}

impl ExecutionPlan for FragmentExec {
    leaf_exec!("FragmentExec");

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "FragmentExec has one partition, not {partition}"
            )));
        }
        let query = self.query.as_ref().ok_or_else(|| {
            DataFusionError::Internal("a fragment was executed without a query identity".into())
        })?;
        let schema = Arc::clone(&self.fragment.schema);
        let mut builder =
            RecordBatchReceiverStream::builder(Arc::clone(&schema), 2 * self.stations.len().max(1));
        let timeout = query.fragment_timeout;
        // Every station is spawned at once, so all start as soon as the plan starts; their
        // batches arrive on one stream, in whatever order they come. Each fetch runs on a
        // task of its own that dropping the stream does not abort (the first station's
        // refusal ends the query): every station the fragment was planned for is still
        // asked, and decides and audits it, whatever the timing. A fetch stops at its next
        // batch once nobody reads the stream; a panic still reaches the stream.
        for (index, station) in self.stations.iter().enumerate() {
            let station = station.clone();
            let tx = builder.tx();
            let ticket = self.ticket(query);
            let schema = Arc::clone(&schema);
            let withheld = query.withheld.clone();
            let outcomes = Arc::clone(&self.outcomes);
            let fetch_one = async move {
                let deadline = Instant::now() + timeout;
                let fragment = ticket.fragment;
                let result = fetch(&station, ticket, Some(&schema), deadline, |batch| {
                    outcomes.passed(index);
                    let tx = tx.clone();
                    async move { tx.send(Ok(batch)).await.is_ok() }
                })
                .await;
                if result.is_ok() {
                    outcomes.passed(index);
                }
                if let Ok(announced) = &result
                    && let Some(n) = crate::withheld::announced(announced)
                {
                    withheld.station(&station.name, n);
                }
                if let Err(failure) = result {
                    let failure = match failure {
                        Fetch::Timeout => StationFailure::Timeout {
                            station: station.name.to_string(),
                            fragment,
                            timeout,
                        },
                        Fetch::Failed(f) => f,
                    };
                    // The first station's failure in station order, as a check round would
                    // have reported it.
                    let failure = outcomes.failed(index, failure).await;
                    let _ = tx
                        .send(Err(DataFusionError::External(Box::new(failure))))
                        .await;
                }
            };
            let detached = tokio::spawn(fetch_one);
            builder.spawn(async move {
                match detached.await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => Err(DataFusionError::Internal(format!(
                        "a station's fetch did not finish: {e}"
                    ))),
                }
            });
        }
        Ok(builder.build())
    }
}

enum Fetch {
    Timeout,
    Failed(StationFailure),
}

/// Runs one ticket at every station in `stations` concurrently and collects each one's
/// batches (in the order of `stations`). The first failure, in that order, is the error.
/// Each station's count of withheld groups goes to `withheld`, if given.
pub(crate) async fn fetch_all(
    stations: &[StationClient],
    ticket: &FragmentTicket,
    schema: &SchemaRef,
    timeout: Duration,
    withheld: Option<&Withheld>,
) -> Result<Vec<Vec<RecordBatch>>, StationFailure> {
    let answers = futures::future::join_all(
        stations
            .iter()
            .map(|station| fetch_collect(station, ticket, Some(schema), timeout)),
    )
    .await;
    answers
        .into_iter()
        .zip(stations)
        .map(|(answer, station)| {
            answer.map(|(announced, batches)| {
                if let (Some(tally), Some(n)) = (withheld, crate::withheld::announced(&announced)) {
                    tally.station(&station.name, n);
                }
                batches
            })
        })
        .collect()
}

/// Runs one ticket at one station and collects its answer: the schema the station
/// announced and its batches, checked against `schema` if one is given.
pub(crate) async fn fetch_collect(
    station: &StationClient,
    ticket: &FragmentTicket,
    schema: Option<&SchemaRef>,
    timeout: Duration,
) -> Result<(SchemaRef, Vec<RecordBatch>), StationFailure> {
    let batches = std::sync::Mutex::new(Vec::new());
    let result = fetch(
        station,
        ticket.clone(),
        schema,
        Instant::now() + timeout,
        |batch| {
            // Only this future pushes; the lock cannot be poisoned by another holder.
            batches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(batch);
            std::future::ready(true)
        },
    )
    .await;
    match result {
        Ok(schema) => Ok((
            schema,
            batches.into_inner().unwrap_or_else(|p| p.into_inner()),
        )),
        Err(Fetch::Timeout) => Err(StationFailure::Timeout {
            station: station.name.to_string(),
            fragment: ticket.fragment,
            timeout,
        }),
        Err(Fetch::Failed(f)) => Err(f),
    }
}

/// Runs one fragment at one station, checking every batch against the expected schema (if
/// one is given) and handing it to `sink` (which returns false once the consumer is gone).
/// Returns the schema the station announced.
async fn fetch<F, Fut>(
    station: &StationClient,
    ticket: FragmentTicket,
    schema: Option<&SchemaRef>,
    deadline: Instant,
    sink: F,
) -> Result<SchemaRef, Fetch>
where
    F: Fn(RecordBatch) -> Fut,
    Fut: Future<Output = bool>,
{
    let name = station.name.to_string();
    let fragment = ticket.fragment;
    let failed = |code: Code, message: String| {
        Fetch::Failed(StationFailure::Failed {
            station: name.clone(),
            fragment,
            code,
            message,
        })
    };
    let from_status = |s: tonic::Status| {
        Fetch::Failed(StationFailure::from_status(
            &name,
            &station.url,
            fragment,
            &s,
        ))
    };
    let conformed = |batch: RecordBatch| match schema {
        Some(schema) => conform(batch, schema).map_err(|message| {
            Fetch::Failed(StationFailure::Protocol {
                station: name.clone(),
                fragment,
                message,
            })
        }),
        None => Ok(batch),
    };
    station.ensure_online().map_err(Fetch::Failed)?;
    let flight = match station.link() {
        Ok(flight) => flight,
        Err(join) => {
            // The hub's own join station answers in-process, whole.
            let (announced, batches) = timeout_at(deadline, join.run(&ticket))
                .await
                .map_err(|_| Fetch::Timeout)?
                .map_err(Fetch::Failed)?;
            for batch in batches {
                if !sink(conformed(batch)?).await {
                    break;
                }
            }
            return Ok(announced);
        }
    };
    let announced = |stream: &Answer| {
        stream
            .schema()
            .cloned()
            .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()))
    };
    // A connection that fails before the first batch arrives is retried once, for a
    // fragment whose second run releases the same thing and spends nothing (see
    // [`retryable`]); a failure after a batch was handed on is never retried.
    let mut retried = false;
    loop {
        let mut handed_on = false;
        let attempt = async {
            let response = timeout_at(
                deadline,
                flight.clone().do_get(Ticket::new(ticket.to_bytes())),
            )
            .await
            .map_err(|_| Fetch::Timeout)?
            .map_err(from_status)?;
            let mut stream: Answer = railyard_net::flight_data::Decoder::new(
                response
                    .into_inner()
                    .map(|r| r.map_err(FlightError::from))
                    .boxed(),
            );
            loop {
                let next = timeout_at(deadline, stream.next())
                    .await
                    .map_err(|_| Fetch::Timeout)?;
                let batch = match next {
                    None => return Ok(announced(&stream)),
                    Some(Err(FlightError::Tonic(status))) => return Err(from_status(*status)),
                    Some(Err(e)) => return Err(failed(Code::Internal, e.to_string())),
                    Some(Ok(batch)) => batch,
                };
                handed_on = true;
                if !sink(conformed(batch)?).await {
                    return Ok(announced(&stream));
                }
            }
        };
        match attempt.await {
            Err(Fetch::Failed(StationFailure::Unreachable { .. }))
                if !retried
                    && !handed_on
                    && Instant::now() + RETRY_PAUSE < deadline
                    && retryable(&ticket) =>
            {
                retried = true;
                warn!(station = %name, query_id = %ticket.query_id, fragment, "connection failed; retrying the fragment once");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            answer => return answer,
        }
    }
}

/// A station's answer as the hub reads it.
type Answer =
    railyard_net::flight_data::Decoder<BoxStream<'static, Result<FlightData, FlightError>>>;

/// How long the hub waits before it retries a fragment whose connection failed (a
/// restarted station's listener, or an outbound station's new tunnel, is up by then).
pub(crate) const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Whether a fragment may be sent to a station a second time after its connection failed:
/// only when a second run releases the same thing and spends nothing. A train never is
/// (it may have started a container and counted toward the station's limits), nor a
/// differentially private fragment (its first run may have charged ε before the connection
/// failed, and a second would charge again and release a second noisy answer). A DP
/// fragment is recognised by the station half of a DP aggregate in its SQL, which is what
/// makes a station treat it as one; the test is textual, so it errs towards not retrying.
pub(crate) fn retryable(ticket: &FragmentTicket) -> bool {
    ticket.train.is_none() && !ticket.sql.to_ascii_lowercase().contains("partial_dp_")
}

/// Gives a station's batch the fragment's expected schema (names are positional), refusing
/// any difference in column count or type.
fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    if batch.num_columns() != schema.fields().len() {
        return Err(format!(
            "{} columns instead of {}",
            batch.num_columns(),
            schema.fields().len()
        ));
    }
    for (got, want) in batch.schema().fields().iter().zip(schema.fields()) {
        if got.data_type() != want.data_type() {
            return Err(format!(
                "column '{}' is {} instead of {}",
                want.name(),
                got.data_type(),
                want.data_type()
            ));
        }
    }
    RecordBatch::try_new(Arc::clone(schema), batch.columns().to_vec()).map_err(|e| e.to_string())
}

/// Plans [`FragmentNode`]s into [`FragmentExec`]s, and [`ThresholdNode`]s into
/// [`ThresholdExec`]s.
#[derive(Debug)]
struct FragmentPlanner {
    stations: Arc<Vec<StationClient>>,
}

#[async_trait]
impl ExtensionPlanner for FragmentPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
        if let Some(threshold) = node.as_any().downcast_ref::<ThresholdNode>() {
            let [input] = physical_inputs else {
                return Err(DataFusionError::Internal(
                    "Threshold has one input".to_string(),
                ));
            };
            return Ok(Some(Arc::new(ThresholdExec::try_new(
                Arc::clone(input),
                threshold.min_group_size,
            )?)));
        }
        let Some(node) = node.as_any().downcast_ref::<FragmentNode>() else {
            return Ok(None);
        };
        let fragment = Arc::clone(&node.fragment);
        let stations = fragment
            .stations
            .iter()
            .map(|name| {
                self.stations
                    .iter()
                    .find(|s| s.name.as_ref() == name)
                    .cloned()
                    .ok_or_else(|| {
                        DataFusionError::Plan(format!("station '{name}' is not connected"))
                    })
            })
            .collect::<DfResult<Vec<_>>>()?;
        let fetch = fragment.fetch;
        let mut exec: Arc<dyn ExecutionPlan> = Arc::new(FragmentExec::new(fragment, stations));
        if let Some(n) = fetch {
            exec = Arc::new(GlobalLimitExec::new(exec, 0, Some(n)));
        }
        Ok(Some(exec))
    }
}

/// The hub's query planner: DataFusion's optimized plan is split into fragments, then
/// planned physically with fragments becoming [`FragmentExec`]s.
pub struct FederatedQueryPlanner {
    pub planner: Arc<FederationPlanner>,
    pub stations: Arc<Vec<StationClient>>,
}

impl fmt::Debug for FederatedQueryPlanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FederatedQueryPlanner")
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl QueryPlanner for FederatedQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        crate::guards::refuse_huge_constants(logical_plan)?;
        let federated = self.planner.federate(logical_plan).await?;
        let plan = crate::guards::cap_string_concat(federated.plan)?;
        let planner =
            DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(FragmentPlanner {
                stations: Arc::clone(&self.stations),
            })]);
        planner.create_physical_plan(&plan, session).await
    }
}
