//! A small Flight SQL client: what `railyard sql`, the demo and the tests use to talk to a
//! hub exactly as any researcher's client would.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use std::sync::Arc;
use tonic::transport::{Channel, Endpoint};

/// A connection to a hub's Flight SQL endpoint.
#[derive(Debug, Clone)]
pub struct HubClient {
    inner: FlightSqlServiceClient<Channel>,
}

/// A query's answer: its schema (also when there are no rows) and its batches.
#[derive(Debug, Clone)]
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Answer {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// The answer as an aligned text table.
    pub fn to_table(&self) -> Result<String> {
        if self.batches.is_empty() {
            let empty = RecordBatch::new_empty(Arc::clone(&self.schema));
            return Ok(arrow::util::pretty::pretty_format_batches(&[empty])?.to_string());
        }
        Ok(arrow::util::pretty::pretty_format_batches(&self.batches)?.to_string())
    }
}

impl HubClient {
    /// Connects to `grpc://host:port` (or `http://host:port`).
    pub async fn connect(url: &str) -> Result<Self> {
        let http = match url.strip_prefix("grpc://") {
            Some(rest) => format!("http://{rest}"),
            None if url.starts_with("http://") => url.to_string(),
            None => bail!("hub address must look like grpc://HOST:PORT, got '{url}'"),
        };
        let channel = Endpoint::from_shared(http)
            .with_context(|| format!("invalid hub address '{url}'"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to the hub at {url}"))?;
        let flight = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
            .max_decoding_message_size(railyard_engine::MAX_MESSAGE_BYTES);
        Ok(Self {
            inner: FlightSqlServiceClient::new_from_inner(flight),
        })
    }

    /// Runs one SQL statement and collects its answer.
    pub async fn query(&mut self, sql: &str) -> Result<Answer> {
        let info = self
            .inner
            .execute(sql.to_string(), None)
            .await
            .map_err(flight_error)?;
        let schema: SchemaRef = Arc::new(
            info.clone()
                .try_decode_schema()
                .unwrap_or_else(|_| Schema::empty()),
        );
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let Some(ticket) = endpoint.ticket else {
                continue;
            };
            let stream: FlightRecordBatchStream =
                self.inner.do_get(ticket).await.map_err(flight_error)?;
            let mut part: Vec<RecordBatch> = stream.map_err(flight_error).try_collect().await?;
            batches.append(&mut part);
        }
        Ok(Answer { schema, batches })
    }
}

/// Turns a Flight error into one line a person can act on: the server's message, without
/// the transport's wrapping.
fn flight_error(e: FlightError) -> anyhow::Error {
    match e {
        FlightError::Tonic(status) => {
            anyhow::anyhow!("{} ({:?})", status.message(), status.code())
        }
        FlightError::Arrow(arrow::error::ArrowError::ExternalError(inner)) => {
            match inner.downcast::<tonic::Status>() {
                Ok(status) => anyhow::anyhow!("{} ({:?})", status.message(), status.code()),
                Err(other) => anyhow::anyhow!("{other}"),
            }
        }
        other => anyhow::anyhow!("{other}"),
    }
}
