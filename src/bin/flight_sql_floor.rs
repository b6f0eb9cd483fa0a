//! The floor of the client path: the smallest Flight SQL server that answers what ADBC
//! sends for `cursor.execute(sql)` (prepare, execute, fetch, close), with one constant row
//! and no planning, policy or stations behind it. `benches/adbc.py` times the same client
//! calls against it beside the hub, so the hub's figures can be read against what the
//! driver, gRPC and loopback cost on their own.
//!
//! Run: `cargo run --release --bin flight_sql_floor` (prints `listening on HOST:PORT`).
//! Serves tonic's own server, as the hub does (HTTP/2 keepalive aside), with Nagle off.

#![allow(clippy::unwrap_used)] // a benchmark helper that cannot unwrap has failed

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandPreparedStatementQuery, CommandStatementQuery,
    ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{Action, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use futures::{Stream, TryStreamExt, stream};
use prost::Message;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

#[derive(Clone)]
struct Floor {
    batch: RecordBatch,
}

impl Floor {
    fn info(&self, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        let ticket = TicketStatementQuery {
            statement_handle: b"one".to_vec().into(),
        };
        let endpoint =
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        Ok(FlightInfo::new()
            .try_with_schema(self.batch.schema().as_ref())
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor))
    }
}

#[tonic::async_trait]
impl FlightSqlService for Floor {
    type FlightService = Floor;

    async fn get_flight_info_statement(
        &self,
        _query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(self.info(request.into_inner())?))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(self.info(request.into_inner())?))
    }

    async fn do_get_statement(
        &self,
        _ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let batch = self.batch.clone();
        let flight = FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(stream::once(async move { Ok(batch) }))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(flight)))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: railyard_engine::flight_sql::schema_ipc(self.batch.schema().as_ref())?,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Ok(())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let listener = TcpListener::bind(&listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let schema = Arc::new(Schema::new(vec![Field::new("one", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))])?;
    let incoming = stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.and_then(|(s, _)| {
            s.set_nodelay(true)?;
            Ok(s)
        });
        Some((conn, listener))
    });
    tonic::transport::Server::builder()
        .add_service(FlightServiceServer::new(Floor { batch }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
