//! The hub's Arrow Flight SQL front: what ADBC, pyarrow and `railyard sql` talk to.
//!
//! `GetFlightInfo` for a statement plans it *and starts it*, and answers once its first
//! batch is there (so a station's refusal answers it): the rest streams while the client
//! receives the `FlightInfo` and comes back with `DoGet`.
//! A started query waits (bounded buffer, so at most a few batches are held) for its `DoGet`
//! for [`UNCLAIMED_AFTER`]; after that it is dropped and its stations are cancelled. A query
//! with `train(...)` calls is only planned and checked there: its containers start at
//! `DoGet`, so a client that never comes back has started none.
//!
//! The ticket carries the SQL next to the id of the started query, so a `DoGet` that comes
//! too late, twice, or to another hub behind a balancer simply runs the statement again.
//! A prepared statement's handle is its SQL text: nothing is held on the hub for it.
//!
//! A Substrait plan (`CommandStatementSubstraitPlan`, or prepared: ADBC's
//! `cursor.execute(plan_bytes)`) takes the same path with the plan in place of the text:
//! its prepared handle is the plan, marked, and its ticket carries the plan. The header
//! `x-railyard-explain: federated` asks for a plan's `EXPLAIN FEDERATED`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::Schema;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, ActionCreatePreparedSubstraitPlanRequest,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery,
    CommandStatementSubstraitPlan, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{Error, to_status};
use crate::hub::{Hub, Planned};
use crate::substrait::{EXPLAIN_FEDERATED, EXPLAIN_HEADER};
use crate::tokens::TokenStore;

/// Researcher identity in `railyard local` mode, where there is no authentication (the
/// name a station records for a ticket that names no researcher, too).
pub use railyard_contract::LOCAL_RESEARCHER;

static SQL_INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "Railyard hub");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.5");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, true);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0_i32);
    builder.append(SqlInfo::FlightSqlServerCancel, false);
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    // The static builder input above is well-formed; building it cannot fail.
    builder.build().expect("static SQL info builds")
});

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// How long a started query waits for its `DoGet`.
pub const UNCLAIMED_AFTER: Duration = Duration::from_secs(300);

/// A statement ticket: what it runs, and the id of the query `GetFlightInfo` started for it.
/// A SQL ticket is `{"started": …, "sql": …}`; a Substrait plan's carries the plan in hex
/// instead of the SQL, and whether its explanation was asked for.
#[derive(Debug, Serialize, Deserialize)]
struct StatementTicket {
    started: Option<String>,
    #[serde(default)]
    sql: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    substrait: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    explain: bool,
}

impl StatementTicket {
    fn new(started: Option<String>, query: &Query) -> Self {
        match query {
            Query::Sql(sql) => Self {
                started,
                sql: sql.clone(),
                substrait: None,
                explain: false,
            },
            Query::Substrait { plan, explain } => Self {
                started,
                sql: String::new(),
                substrait: Some(hex::encode(plan)),
                explain: *explain,
            },
        }
    }

    fn query(&self) -> Result<Query, Status> {
        match &self.substrait {
            None => Ok(Query::Sql(self.sql.clone())),
            Some(plan) => Ok(Query::Substrait {
                plan: hex::decode(plan)
                    .map_err(|_| Status::invalid_argument("not a statement ticket of this hub"))?
                    .into(),
                explain: self.explain,
            }),
        }
    }

    fn encode(&self) -> prost::bytes::Bytes {
        // A struct of strings and a flag always serializes.
        serde_json::to_vec(self)
            .expect("a statement ticket serializes")
            .into()
    }
}

/// What a statement runs.
#[derive(Debug, Clone)]
enum Query {
    Sql(String),
    /// A serialized Substrait plan; `explain`: its `EXPLAIN FEDERATED` instead.
    Substrait {
        plan: prost::bytes::Bytes,
        explain: bool,
    },
}

/// Marks a prepared handle that holds a Substrait plan (a SQL handle is the statement's
/// text, which never begins with a NUL byte). The byte after it is 1 for an explanation.
const SUBSTRAIT_HANDLE: &[u8] = b"\0railyard-substrait\0";

impl Query {
    /// The prepared statement handle that stands for it.
    fn handle(&self) -> prost::bytes::Bytes {
        match self {
            Query::Sql(sql) => sql.clone().into_bytes().into(),
            Query::Substrait { plan, explain } => {
                let mut handle = SUBSTRAIT_HANDLE.to_vec();
                handle.push(u8::from(*explain));
                handle.extend_from_slice(plan);
                handle.into()
            }
        }
    }

    /// The query a prepared statement handle stands for.
    fn from_handle(handle: &prost::bytes::Bytes) -> Result<Self, Status> {
        if let Some(rest) = handle.strip_prefix(SUBSTRAIT_HANDLE) {
            let Some((&explain, plan)) = rest.split_first() else {
                return Err(Status::invalid_argument(
                    "not a prepared statement of this hub",
                ));
            };
            return Ok(Query::Substrait {
                plan: handle.slice_ref(plan),
                explain: explain == 1,
            });
        }
        Ok(Query::Sql(handle_sql(handle)?.to_string()))
    }

    /// Plans it for `researcher` at `hub`.
    async fn plan(&self, hub: &Hub, researcher: &str) -> Result<Planned, Status> {
        match self {
            Query::Sql(sql) => hub.plan(sql, researcher).await,
            Query::Substrait { plan, explain } => {
                hub.plan_substrait(plan, *explain, researcher).await
            }
        }
        .map_err(to_status)
    }
}

/// Whether a Substrait request asks for its `EXPLAIN FEDERATED` ([`EXPLAIN_HEADER`]).
fn wants_explain<T>(request: &Request<T>) -> Result<bool, Status> {
    match request.metadata().get(EXPLAIN_HEADER) {
        None => Ok(false),
        Some(v) if v.to_str().ok() == Some(EXPLAIN_FEDERATED) => Ok(true),
        Some(_) => Err(Status::invalid_argument(format!(
            "the header {EXPLAIN_HEADER} takes one value, '{EXPLAIN_FEDERATED}'"
        ))),
    }
}

/// The plan of a Substrait command.
fn substrait_plan(
    plan: Option<arrow_flight::sql::SubstraitPlan>,
) -> Result<prost::bytes::Bytes, Status> {
    plan.map(|p| p.plan)
        .ok_or_else(|| Status::invalid_argument("the command carries no Substrait plan"))
}

/// A query started by `GetFlightInfo`, waiting for its `DoGet`.
struct Started {
    at: Instant,
    /// Who started it: only they may claim it.
    owner: Caller,
    work: Waiting,
}

/// What a started query's `DoGet` receives.
enum Waiting {
    /// The answer, already being computed.
    Running(SendableRecordBatchStream),
    /// A query with `train(...)` calls, planned and checked at every station: its
    /// containers start when `DoGet` claims it, not in `GetFlightInfo`.
    Trains(Planned),
}

/// A collaboration as the Flight SQL front sees it: its hub (whose catalog holds only the
/// collaboration's stations and tables) and its members.
#[derive(Clone)]
pub struct Collaboration {
    pub hub: Arc<Hub>,
    pub researchers: Vec<String>,
}

/// A token hub's collaborations, replaceable while it serves: `railyard hub` re-reads
/// hub.toml on SIGHUP, and builds a collaboration anew when its stations announce something
/// new. A call sees the collaborations as they are when it is authorized.
#[derive(Clone, Default)]
pub struct Collaborations(Arc<std::sync::RwLock<Arc<HashMap<String, Collaboration>>>>);

impl Collaborations {
    pub fn new(collaborations: HashMap<String, Collaboration>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(collaborations))))
    }

    /// The collaborations as they are now.
    pub fn current(&self) -> Arc<HashMap<String, Collaboration>> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces them all, from the next call on (calls already running finish on the hub
    /// they started with).
    pub fn replace(&self, collaborations: HashMap<String, Collaboration>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(collaborations);
    }

    /// Replaces one collaboration's hub, keeping its members (unless it is gone meanwhile).
    pub fn replace_hub(&self, name: &str, hub: Arc<Hub>) {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        if current.contains_key(name) {
            let mut next = HashMap::clone(&current);
            if let Some(c) = next.get_mut(name) {
                c.hub = hub;
            }
            *current = Arc::new(next);
        }
    }
}

/// Who may ask what.
#[derive(Clone)]
enum Access {
    /// `railyard local`: no authentication, one hub, researcher [`LOCAL_RESEARCHER`].
    Open(Arc<Hub>),
    /// Bearer tokens, each speaking for one researcher in one collaboration.
    Tokens {
        store: Arc<TokenStore>,
        collaborations: Collaborations,
    },
}

/// What a request presents: its `authorization` header, and the researcher it names
/// (`x-railyard-researcher`), which only an open hub that trusts it reads.
struct Presented {
    bearer: Option<String>,
    researcher: Option<String>,
}

/// The header that names the researcher to an open hub with `named_researchers`.
pub const RESEARCHER_HEADER: &str = "x-railyard-researcher";

/// The credentials of a request.
fn authorization<T>(request: &Request<T>) -> Presented {
    let header = |name: &str| {
        request
            .metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Presented {
        bearer: header("authorization"),
        researcher: header(RESEARCHER_HEADER),
    }
}

/// An authenticated caller: the hub of their collaboration and their name.
#[derive(Clone, PartialEq, Eq)]
struct Caller {
    collaboration: String,
    researcher: String,
}

/// The token of an `authorization` header: `Bearer <token>`, or the bare token.
pub fn bearer_token(header: &str) -> &str {
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or(header)
        .trim()
}

/// Who the bearer token in `header` (`Bearer <token>`, or the bare token) speaks for, and
/// the hub of their collaboration: the one check behind every authenticated front (Flight
/// SQL and the console). Refusals are `UNAUTHENTICATED` and never echo the token.
pub async fn verify_bearer(
    store: &Arc<TokenStore>,
    collaborations: &Collaborations,
    header: &str,
) -> Result<(Arc<Hub>, crate::tokens::Bearer), Status> {
    let token = bearer_token(header);
    // The lookup reads SQLite: on the blocking pool, never on an async worker. Every call
    // looks the token up, so a revocation refuses the token's very next call.
    let (store, token) = (Arc::clone(store), token.to_string());
    let bearer = tokio::task::spawn_blocking(move || store.verify(&token))
        .await
        .map_err(|e| {
            Status::internal(format!(
                "internal error: the token lookup did not finish: {e}"
            ))
        })?
        .map_err(|e| {
            tracing::error!("{e}");
            Status::internal("the hub cannot read its token database")
        })?
        .map_err(|refused| Status::unauthenticated(refused.to_string()))?;
    let collaborations = collaborations.current();
    let member = collaborations
        .get(&bearer.collaboration)
        .filter(|c| c.researchers.contains(&bearer.researcher));
    let Some(collaboration) = member else {
        return Err(Status::unauthenticated(format!(
            "researcher '{}' is not a member of collaboration '{}' in this hub's \
             configuration",
            bearer.researcher, bearer.collaboration
        )));
    };
    Ok((Arc::clone(&collaboration.hub), bearer))
}

/// Flight SQL service over a [`Hub`] (one per collaboration when tokens are required).
#[derive(Clone)]
pub struct HubFlightSql {
    access: Access,
    started: Arc<Mutex<HashMap<String, Started>>>,
}

impl HubFlightSql {
    /// No authentication: every caller is [`LOCAL_RESEARCHER`] (for `railyard local`).
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            access: Access::Open(hub),
            started: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Every call must carry `authorization: Bearer <token>`; a token's researcher sees and
    /// queries only their collaboration's hub, and only while the hub's configuration still
    /// lists them as a member.
    pub fn with_tokens(store: Arc<TokenStore>, collaborations: Collaborations) -> Self {
        Self {
            access: Access::Tokens {
                store,
                collaborations,
            },
            started: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The hub this call may use, and who is calling. Refusals are `UNAUTHENTICATED` and
    /// never echo the token.
    async fn authorize(&self, presented: Presented) -> Result<(Arc<Hub>, Caller), Status> {
        let (store, collaborations) = match &self.access {
            Access::Open(hub) => {
                let researcher = match presented.researcher {
                    Some(name) if hub.options().named_researchers => {
                        let valid = !name.is_empty()
                            && name.len() <= 64
                            && name
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
                        if !valid {
                            return Err(Status::invalid_argument(format!(
                                "{RESEARCHER_HEADER} must be 1 to 64 letters, digits, '.', '_', \
                                 '@' or '-'"
                            )));
                        }
                        name
                    }
                    _ => LOCAL_RESEARCHER.to_string(),
                };
                return Ok((
                    Arc::clone(hub),
                    Caller {
                        collaboration: String::new(),
                        researcher,
                    },
                ));
            }
            Access::Tokens {
                store,
                collaborations,
            } => (store, collaborations),
        };
        let Some(header) = presented.bearer else {
            return Err(Status::unauthenticated(
                crate::tokens::Refused::Missing.to_string(),
            ));
        };
        let (hub, bearer) = verify_bearer(store, collaborations, &header).await?;
        Ok((
            hub,
            Caller {
                collaboration: bearer.collaboration,
                researcher: bearer.researcher,
            },
        ))
    }

    /// Plans and starts `sql`, driving it into a small buffer so that the stations work
    /// before `DoGet` arrives (a query with `train(...)` calls waits for its `DoGet`).
    /// Returns the id under which it waits, and its schema.
    async fn start(
        &self,
        hub: &Hub,
        query: &Query,
        caller: Caller,
    ) -> Result<(String, arrow::datatypes::SchemaRef), Status> {
        let planned = query.plan(hub, &caller.researcher).await?;
        let (work, schema) = if planned.runs_trains() {
            let schema = planned.schema();
            (Waiting::Trains(planned), schema)
        } else {
            let mut batches = planned.run().await.map_err(to_status)?;
            let schema = batches.schema();
            // The first batch is awaited here, so that a station's refusal (most fragments
            // are checked as they run: Hub::plan) answers this call, as it would have
            // answered a check round before the run.
            let first = match batches.next().await {
                Some(Err(e)) => return Err(to_status(Error::from(e))),
                first => first,
            };
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                if let Some(batch) = first
                    && tx.send(batch).await.is_err()
                {
                    return;
                }
                while let Some(batch) = batches.next().await {
                    if tx.send(batch).await.is_err() {
                        // Nobody will read it (unclaimed and dropped): stop the stations.
                        return;
                    }
                }
            });
            let stream = Box::pin(RecordBatchStreamAdapter::new(
                Arc::clone(&schema),
                ReceiverStream::new(rx),
            ));
            (Waiting::Running(stream), schema)
        };
        let id = uuid::Uuid::new_v4().to_string();
        // The lock guards a map operation only; a poisoned lock means a panic mid-insert,
        // after which the map is still a valid map.
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        started.retain(|_, s| s.at.elapsed() < UNCLAIMED_AFTER);
        started.insert(
            id.clone(),
            Started {
                at: Instant::now(),
                owner: caller,
                work,
            },
        );
        Ok((id, schema))
    }

    fn claim(&self, id: &str, caller: &Caller) -> Option<Waiting> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if started.get(id).is_some_and(|s| &s.owner != caller) {
            // Someone else's query: they run the statement afresh under their own name.
            return None;
        }
        started
            .remove(id)
            .filter(|s| s.at.elapsed() < UNCLAIMED_AFTER)
            .map(|s| s.work)
    }

    async fn statement_info<T>(
        &self,
        query: &Query,
        request: Request<T>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let (hub, caller) = self.authorize(authorization(&request)).await?;
        let (id, schema) = self.start(&hub, query, caller).await?;
        let ticket = TicketStatementQuery {
            statement_handle: StatementTicket::new(Some(id), query).encode(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        info_with_schema(schema.as_ref()).map(|info| {
            info.with_endpoint(endpoint)
                .with_descriptor(descriptor)
                .with_ordered(true)
        })
    }

    fn batch_stream(batch: arrow::array::RecordBatch) -> Result<Response<DoGetStream>, Status> {
        let schema = batch.schema();
        let stream =
            railyard_net::flight_data::encode(schema, stream::once(async move { Ok(batch) }))
                .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    fn info_for<M: ProstMessageExt + Clone>(
        command: &M,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(command.as_any().encode_to_vec()));
        let info = info_with_schema(schema)?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }
}

/// `schema` as the IPC message a prepared statement's result carries (also the floor
/// server's, `src/bin/flight_sql_floor.rs`).
pub fn schema_ipc(schema: &Schema) -> Result<prost::bytes::Bytes, Status> {
    Ok(railyard_net::flight_data::schema_messages(schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .ipc
        .clone())
}

/// A `FlightInfo` announcing `schema` (the schema's message kept, see
/// `railyard_net::flight_data`).
fn info_with_schema(schema: &Schema) -> Result<FlightInfo, Status> {
    let mut info = FlightInfo::new();
    info.schema = schema_ipc(schema)?;
    Ok(info)
}

fn handle_sql(handle: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(handle)
        .map_err(|_| Status::invalid_argument("statement handle is not UTF-8 SQL"))
}

#[tonic::async_trait]
impl FlightSqlService for HubFlightSql {
    type FlightService = HubFlightSql;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let descriptor = request.get_ref().clone();
        let info = self
            .statement_info(&Query::Sql(query.query), request, descriptor)
            .await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_substrait_plan(
        &self,
        query: CommandStatementSubstraitPlan,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let query = Query::Substrait {
            plan: substrait_plan(query.plan)?,
            explain: wants_explain(&request)?,
        };
        let descriptor = request.get_ref().clone();
        let info = self.statement_info(&query, request, descriptor).await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let query = Query::from_handle(&query.prepared_statement_handle)?;
        let descriptor = request.get_ref().clone();
        let info = self.statement_info(&query, request, descriptor).await?;
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (hub, caller) = self.authorize(authorization(&request)).await?;
        let ticket: StatementTicket = serde_json::from_slice(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("not a statement ticket of this hub"))?;
        let batches = match ticket
            .started
            .as_deref()
            .and_then(|id| self.claim(id, &caller))
        {
            Some(Waiting::Running(batches)) => batches,
            Some(Waiting::Trains(planned)) => planned.run().await.map_err(to_status)?,
            None => ticket
                .query()?
                .plan(&hub, &caller.researcher)
                .await?
                .run()
                .await
                .map_err(to_status)?,
        };
        let schema = batches.schema();
        let stream = railyard_net::flight_data::encode(
            schema,
            batches.map_err(|e| FlightError::ExternalError(Box::new(e))),
        )
        .map_err(|e| match e {
            FlightError::ExternalError(inner) => {
                match inner.downcast::<datafusion::error::DataFusionError>() {
                    Ok(df) => to_status(Error::from(*df)),
                    Err(other) => Status::internal(other.to_string()),
                }
            }
            other => Status::from(other),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let query = Query::from_handle(&query.prepared_statement_handle)?;
        let ticket = TicketStatementQuery {
            statement_handle: StatementTicket::new(None, &query).encode(),
        };
        self.do_get_statement(ticket, request).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (hub, caller) = self.authorize(authorization(&request)).await?;
        let (schema, parameters) = hub
            .prepare(&query.query, &caller.researcher)
            .await
            .map_err(to_status)?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: schema_ipc(&schema)?,
            // Announced only when there are parameters: clients bind values when it is set.
            parameter_schema: if parameters.fields().is_empty() {
                Default::default()
            } else {
                schema_ipc(&parameters)?
            },
        })
    }

    async fn do_action_create_prepared_substrait_plan(
        &self,
        query: ActionCreatePreparedSubstraitPlanRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (hub, caller) = self.authorize(authorization(&request)).await?;
        let (plan, explain) = (substrait_plan(query.plan)?, wants_explain(&request)?);
        let schema = hub
            .prepare_substrait(&plan, explain, &caller.researcher)
            .await
            .map_err(to_status)?;
        let query = Query::Substrait { plan, explain };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.handle(),
            dataset_schema: schema_ipc(&schema)?,
            // A plan has no parameters: its values are written into it.
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // Handles are the SQL itself: nothing is held on the hub.
        Ok(())
    }

    /// Binds one row of parameter values: the answer's handle is the statement with the
    /// values written in as literals (nothing is kept at the hub), which the client runs.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let (hub, _caller) = self.authorize(authorization(&request)).await?;
        let sql = match Query::from_handle(&query.prepared_statement_handle)? {
            Query::Sql(sql) => sql,
            Query::Substrait { .. } => {
                return Err(Status::invalid_argument(
                    "a Substrait plan takes no parameter values: write them into the plan",
                ));
            }
        };
        // A batch whose buffers reach beyond its body is refused before arrow's reader,
        // which would panic on it, reads it.
        let stream = request
            .into_inner()
            .map_err(FlightError::from)
            .and_then(|data| async move { railyard_net::flight_data::check_body(data) });
        // At most a few rows are read: a statement binds one.
        let mut batches =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(stream);
        let (mut collected, mut rows) = (Vec::new(), 0usize);
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(|e| {
                Status::invalid_argument(format!("the parameter values do not decode: {e}"))
            })?;
            rows += batch.num_rows();
            if rows > 1 {
                return Err(Status::invalid_argument(
                    "a statement is run with one row of parameter values, not more",
                ));
            }
            collected.push(batch);
        }
        let Some(first) = collected.first() else {
            return Err(Status::invalid_argument("no parameter values were sent"));
        };
        let values = arrow::compute::concat_batches(&first.schema(), &collected)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let bound = hub.bind(&sql, &values).await.map_err(to_status)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(bound.into_bytes().into()),
        })
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(authorization(&request)).await?;
        let schema = query.into_builder().schema();
        Self::info_for(&query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (hub, _) = self.authorize(authorization(&request)).await?;
        let tables = hub.list_tables().await.map_err(to_status)?;
        let mut builder = query.into_builder();
        let mut seen = std::collections::BTreeSet::new();
        for (catalog, ..) in tables {
            if seen.insert(catalog.clone()) {
                builder.append(catalog);
            }
        }
        Self::batch_stream(
            builder
                .build()
                .map_err(|e| Status::internal(e.to_string()))?,
        )
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(authorization(&request)).await?;
        let schema = query.clone().into_builder().schema();
        Self::info_for(&query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (hub, _) = self.authorize(authorization(&request)).await?;
        let tables = hub.list_tables().await.map_err(to_status)?;
        let mut builder = query.into_builder();
        let mut seen = std::collections::BTreeSet::new();
        for (catalog, schema, ..) in tables {
            if seen.insert((catalog.clone(), schema.clone())) {
                builder.append(catalog, schema);
            }
        }
        Self::batch_stream(
            builder
                .build()
                .map_err(|e| Status::internal(e.to_string()))?,
        )
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(authorization(&request)).await?;
        let schema = query.clone().into_builder().schema();
        Self::info_for(&query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let (hub, _) = self.authorize(authorization(&request)).await?;
        let tables = hub.list_tables().await.map_err(to_status)?;
        let mut builder = query.into_builder();
        for (catalog, schema, table, kind, arrow_schema) in tables {
            builder
                .append(catalog, schema, table, kind, arrow_schema.as_ref())
                .map_err(Status::from)?;
        }
        Self::batch_stream(
            builder
                .build()
                .map_err(|e| Status::internal(e.to_string()))?,
        )
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(authorization(&request)).await?;
        let schema = query.into_builder().schema();
        Self::info_for(&query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(authorization(&request)).await?;
        let mut builder = query.into_builder();
        for kind in ["LOCAL TEMPORARY", "TABLE", "VIEW"] {
            builder.append(kind);
        }
        Self::batch_stream(
            builder
                .build()
                .map_err(|e| Status::internal(e.to_string()))?,
        )
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(authorization(&request)).await?;
        let schema = query.clone().into_builder(&SQL_INFO).schema();
        Self::info_for(&query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(authorization(&request)).await?;
        let batch = query
            .into_builder(&SQL_INFO)
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Self::batch_stream(batch)
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_and_tickets_give_back_what_they_stand_for() {
        let plan = Query::Substrait {
            plan: prost::bytes::Bytes::from_static(b"\x12\x00plan bytes, any \xff"),
            explain: true,
        };
        let sql = Query::Sql("SELECT 1".to_string());
        for query in [plan, sql] {
            let back = Query::from_handle(&query.handle()).expect("a handle of ours");
            assert_eq!(format!("{back:?}"), format!("{query:?}"));
            let ticket = StatementTicket::new(Some("id".to_string()), &query).encode();
            let ticket: StatementTicket = serde_json::from_slice(&ticket).expect("decodes");
            assert_eq!(ticket.started.as_deref(), Some("id"));
            let back = ticket.query().expect("a ticket of ours");
            assert_eq!(format!("{back:?}"), format!("{query:?}"));
        }
        // A SQL ticket keeps the form older hubs wrote.
        let old: StatementTicket =
            serde_json::from_str(r#"{"started": null, "sql": "SELECT 2"}"#).expect("decodes");
        assert!(matches!(old.query(), Ok(Query::Sql(s)) if s == "SELECT 2"));
        // The marker alone, and a ticket whose plan is not hex, are refused.
        let bare = prost::bytes::Bytes::from_static(SUBSTRAIT_HANDLE);
        assert_eq!(
            Query::from_handle(&bare).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let bad: StatementTicket =
            serde_json::from_str(r#"{"started": null, "substrait": "zz"}"#).expect("decodes");
        assert_eq!(
            bad.query().unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
