//! A small Flight SQL client: what `railyard sql`, the demo and the tests use to talk to a
//! hub exactly as any researcher's client would.

use std::path::Path;
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
    /// The headers `inner` sends with every call, for the calls made around it.
    headers: Vec<(String, String)>,
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

    /// What the answer's metadata says beside its rows, one line each: the groups withheld
    /// below k at each station and at the hub (`railyard.withheld`), and the ε each station
    /// charged (`railyard.epsilon`). Empty when there is nothing to say.
    pub fn notes(&self) -> Vec<String> {
        let metadata = self.schema.metadata();
        let mut notes = Vec::new();
        if let Some(withheld) = metadata
            .get(railyard_engine::withheld::WITHHELD_METADATA)
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        {
            let stations = withheld["stations"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let mut parts: Vec<String> = Vec::new();
            let mut total = 0;
            for (station, n) in &stations {
                match n.as_u64() {
                    Some(0) => {}
                    Some(n) => {
                        total += n;
                        parts.push(format!("{n} at {station}"));
                    }
                    // The station may not say: fewer than k rows in all, possibly none.
                    None => parts.push(format!(
                        "groups of fewer than k units (patients, or rows) in all (possibly none) at {station}"
                    )),
                }
            }
            let at_hub = withheld["hub"].as_u64().unwrap_or(0);
            if at_hub > 0 {
                total += at_hub;
                parts.push(format!("{at_hub} merged at the hub"));
            }
            if !parts.is_empty() {
                notes.push(format!(
                    "withheld below the group-size threshold k: {}{}; the answer covers only \
                     the released groups",
                    if total > 0 {
                        format!("{total} group(s) counted, ")
                    } else {
                        String::new()
                    },
                    parts.join(", ")
                ));
            }
        }
        if let Some(epsilon) = metadata
            .get(railyard_engine::hub::EPSILON_METADATA)
            .and_then(|t| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t).ok()
            })
        {
            let parts: Vec<String> = epsilon
                .iter()
                .map(|(s, e)| format!("{} at {s}", e.as_f64().unwrap_or(f64::NAN)))
                .collect();
            notes.push(format!("ε charged: {}", parts.join(", ")));
        }
        notes
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
    /// Connects to `grpc://host:port` (or `http://host:port`), without authentication.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, None, None).await
    }

    /// Connects to `grpc://host:port`, or to `grpc+tls://host:port` trusting only the CA
    /// certificate in `ca` (the hub's certificate must name `host`), sending `token` as a
    /// bearer token with every call.
    pub async fn connect_with(url: &str, ca: Option<&Path>, token: Option<&str>) -> Result<Self> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("grpc+tls://") {
            let ca = ca.with_context(|| {
                format!("{url} is a TLS address: give the collaboration's CA certificate (--ca)")
            })?;
            (rest, Some(railyard_net::tls::trusting(ca)?))
        } else if let Some(rest) = url
            .strip_prefix("grpc://")
            .or_else(|| url.strip_prefix("http://"))
        {
            let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
            let loopback = host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if token.is_some() && !loopback {
                bail!("refusing to send a bearer token in plaintext to {url}: use grpc+tls://");
            }
            (rest, None)
        } else {
            bail!(
                "hub address must look like grpc://HOST:PORT or grpc+tls://HOST:PORT, got '{url}'"
            )
        };
        let endpoint = Endpoint::from_shared(format!("http://{rest}"))
            .with_context(|| format!("invalid hub address '{url}'"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let channel = match tls {
            Some(config) => {
                // The certificate must name the host the researcher typed.
                let host = rest
                    .rsplit_once(':')
                    .map_or(rest, |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                endpoint
                    .connect_with_connector(railyard_net::conn::connector(
                        rest.to_string(),
                        host.to_string(),
                        config,
                        railyard_net::Expect::Host,
                    ))
                    .await
            }
            None => endpoint.connect().await,
        }
        .map_err(|e| anyhow::anyhow!(railyard_net::error::chain(&e)))
        .with_context(|| format!("cannot connect to the hub at {url}"))?;
        let flight = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
            .max_decoding_message_size(railyard_engine::MAX_MESSAGE_BYTES);
        let mut client = Self {
            inner: FlightSqlServiceClient::new_from_inner(flight),
            headers: Vec::new(),
        };
        if let Some(token) = token {
            client.set_header("authorization", format!("Bearer {token}"));
        }
        Ok(client)
    }

    fn set_header(&mut self, key: &str, value: String) {
        self.inner.set_header(key, value.clone());
        self.headers.retain(|(k, _)| k != key);
        self.headers.push((key.to_string(), value));
    }

    /// Names the researcher this client asks as, to a `railyard local --named-researchers`
    /// hub (any other hub ignores the name).
    pub fn as_researcher(&mut self, name: &str) {
        self.set_header(
            railyard_engine::flight_sql::RESEARCHER_HEADER,
            name.to_string(),
        );
    }

    /// Runs one SQL statement and collects its answer.
    pub async fn query(&mut self, sql: &str) -> Result<Answer> {
        let info = self
            .inner
            .execute(sql.to_string(), None)
            .await
            .map_err(flight_error)?;
        self.fetch(info).await
    }

    /// Runs one serialized Substrait plan (`CommandStatementSubstraitPlan`) and collects its
    /// answer; with `explain`, its `EXPLAIN FEDERATED`.
    pub async fn query_substrait(&mut self, plan: Vec<u8>, explain: bool) -> Result<Answer> {
        use arrow_flight::sql::{CommandStatementSubstraitPlan, ProstMessageExt, SubstraitPlan};
        use prost::Message;
        let command = CommandStatementSubstraitPlan {
            plan: Some(SubstraitPlan {
                plan: plan.into(),
                version: String::new(),
            }),
            transaction_id: None,
        };
        let descriptor = arrow_flight::FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
        let mut request = tonic::Request::new(descriptor);
        let mut headers = self.headers.clone();
        if explain {
            headers.push((
                railyard_engine::substrait::EXPLAIN_HEADER.to_string(),
                railyard_engine::substrait::EXPLAIN_FEDERATED.to_string(),
            ));
        }
        for (key, value) in headers {
            let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes())
                .with_context(|| format!("'{key}' is not a header name"))?;
            let value = value
                .parse()
                .with_context(|| format!("the value of header '{key}' is not valid"))?;
            request.metadata_mut().insert(key, value);
        }
        let info = self
            .inner
            .inner_mut()
            .get_flight_info(request)
            .await
            .map_err(|status| flight_error(FlightError::Tonic(Box::new(status))))?
            .into_inner();
        self.fetch(info).await
    }

    /// Collects the answer a `FlightInfo` points to.
    async fn fetch(&mut self, info: arrow_flight::FlightInfo) -> Result<Answer> {
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
