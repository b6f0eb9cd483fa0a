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

use std::future::Future;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::execution::SendableRecordBatchStream;
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

/// A station: its name and its own DataFusion session over its tables.
pub struct Station {
    name: String,
    ctx: SessionContext,
}

impl Station {
    /// Opens a station over `tables`. Fails, naming the file, if a table cannot be read.
    pub async fn open(name: impl Into<String>, tables: &[TableFile]) -> Result<Self> {
        let name = name.into();
        let ctx = railyard_udfs::fragment_context()?;
        for table in tables {
            table.register(&name, &ctx).await?;
        }
        Ok(Self { name, ctx })
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
        let options = datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let planned = self.ctx.sql_with_options(&ticket.sql, options).await;
        let df = match planned {
            Ok(df) => df,
            Err(e) => {
                warn!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, error = %e.strip_backtrace(), "fragment refused");
                return Err(e.into());
            }
        };
        info!(station = %self.name, query_id = %ticket.query_id, fragment = ticket.fragment, researcher = %ticket.researcher, "fragment planned");
        Ok(df.execute_stream().await?)
    }
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
