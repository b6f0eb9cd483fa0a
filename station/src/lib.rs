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

pub mod error;
pub mod service;
pub mod source;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::{SQLOptions, SessionState};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use railyard_udfs::wire::FragmentTicket;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

pub use error::{Error, Result};
pub use service::StationService;
pub use source::{Format, TableFile};

/// Largest gRPC message a station accepts or sends (Flight batches are split below this).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Distinct fragment texts whose plans a station keeps (the hub sends the same fragment for
/// every run of a query).
const PLAN_CACHE_ENTRIES: usize = 1024;

/// A station: its name and its own DataFusion session over its tables.
pub struct Station {
    name: String,
    ctx: SessionContext,
    state: SessionState,
    /// Optimized plans of fragments seen before, by SQL text. Only plans without stable or
    /// volatile functions are kept (the optimizer folds `now()` into a constant).
    plans: Mutex<HashMap<String, LogicalPlan>>,
}

impl Station {
    /// Opens a station over `tables`. Fails, naming the file, if a table cannot be read.
    pub async fn open(name: impl Into<String>, tables: &[TableFile]) -> Result<Self> {
        let name = name.into();
        let config =
            railyard_udfs::fragment_session_config().with_target_partitions(partitions_for(tables));
        let ctx = railyard_udfs::fragment_context_with(config)?;
        for table in tables {
            table.register(&name, &ctx).await?;
        }
        let state = ctx.state();
        Ok(Self {
            name,
            ctx,
            state,
            plans: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
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

    /// Plans a fragment in the station's own session and starts executing it. Only queries
    /// are accepted: no DDL, no DML, no `SET`.
    pub async fn run_fragment(&self, ticket: &FragmentTicket) -> Result<SendableRecordBatchStream> {
        let planned = self.optimized_plan(&ticket.sql).await;
        let optimized = match planned {
            Ok(plan) => plan,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e, "fragment refused");
                return Err(e);
            }
        };
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, "fragment planned");
        let physical = self
            .state
            .query_planner()
            .create_physical_plan(&optimized, &self.state)
            .await?;
        Ok(execute_stream(physical, self.state.task_ctx())?)
    }

    async fn optimized_plan(&self, sql: &str) -> Result<LogicalPlan> {
        if let Some(plan) = self.cached(sql) {
            return Ok(plan);
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let logical = self.state.create_logical_plan(sql).await?;
        options.verify_plan(&logical)?;
        let optimized = self.state.optimize(&logical)?;
        if only_immutable_functions(&logical) {
            let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            if plans.len() >= PLAN_CACHE_ENTRIES {
                plans.clear();
            }
            plans.insert(sql.to_string(), optimized.clone());
        }
        Ok(optimized)
    }

    fn cached(&self, sql: &str) -> Option<LogicalPlan> {
        // The lock guards map operations only; after a panic the map is still valid.
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.get(sql).cloned()
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
    // Small fragments answer in well under a millisecond; Nagle's delay would dominate.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.and_then(|stream| {
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    });
    let service = FlightServiceServer::new(StationService::new(station))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
