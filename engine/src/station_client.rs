//! The hub's connection to one station.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, Criteria};
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};

use railyard_contract::{CheckAnswer, FragmentTicket, TablePolicyInfo, actions};

use crate::error::{Result, StationFailure};
use crate::join_station::JoinStation;

/// Largest gRPC message the hub accepts from a station or sends to a client.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where a station listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationAddress {
    pub name: String,
    /// `grpc://host:port` (plaintext), `grpc+tls://host:port` (mutual TLS; the station's
    /// certificate must carry `name`), or `tunnel://name` (an outbound station that dials
    /// the hub).
    pub url: String,
}

/// What the hub needs beyond plaintext sockets to reach its stations.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// The hub's mutual-TLS client configuration (for `grpc+tls://` stations).
    pub tls: Option<Arc<railyard_net::rustls::ClientConfig>>,
    /// The outbound stations' connections (for `tunnel://` stations).
    pub tunnels: Option<railyard_net::Tunnels>,
    /// A secret the stations require of their hub (`railyard local` draws one per run),
    /// sent as the `x-railyard-hub-secret` header of every request.
    pub secret: Option<Arc<str>>,
    /// Which stations are online: a fragment for one the board has offline fails at once.
    pub board: Option<Arc<crate::board::StationBoard>>,
}

/// Adds the hub's secret to every request to a station (nothing without one).
#[derive(Debug, Clone, Default)]
pub struct HubSecret(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for HubSecret {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(secret) = &self.0 {
            request
                .metadata_mut()
                .insert(railyard_contract::HUB_SECRET_HEADER, secret.clone());
        }
        Ok(request)
    }
}

/// A Flight client of a station, with the hub's secret on every request.
pub(crate) type StationFlight =
    FlightServiceClient<tonic::service::interceptor::InterceptedService<Channel, HubSecret>>;

/// A connected station. Cloning shares the underlying HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct StationClient {
    pub name: Arc<str>,
    pub url: Arc<str>,
    link: Link,
    board: Option<Arc<crate::board::StationBoard>>,
}

/// How the hub reaches a station.
#[derive(Debug, Clone)]
enum Link {
    /// Arrow Flight over a connection (plaintext, mutual TLS, or an outbound tunnel).
    Flight(StationFlight),
    /// The hub's own join station of a vertical table, called in-process.
    Local(Arc<JoinStation>),
}

impl StationClient {
    /// Connects to a station, retrying until `patience` has passed (a station may still be
    /// opening its files).
    pub async fn connect(
        address: &StationAddress,
        patience: Duration,
        transport: &Transport,
    ) -> Result<Self> {
        let unreachable = |message: String| StationFailure::Unreachable {
            station: address.name.clone(),
            url: address.url.clone(),
            message,
        };
        if let Some(name) = address.url.strip_prefix("tunnel://") {
            let channel = transport
                .tunnels
                .as_ref()
                .and_then(|t| t.channel(name))
                .ok_or_else(|| {
                    unreachable("the hub does not expect this outbound station".to_string())
                })?;
            // Connects when first used: the station may dial in a little later.
            return Self::over(address, channel, transport);
        }
        let (rest, tls) = if let Some(rest) = address.url.strip_prefix("grpc+tls://") {
            let tls = transport.tls.clone().ok_or_else(|| {
                unreachable("a grpc+tls:// station needs the hub's TLS configuration".into())
            })?;
            (rest, Some(tls))
        } else {
            let rest = address
                .url
                .strip_prefix("grpc://")
                .or_else(|| address.url.strip_prefix("http://"))
                .ok_or_else(|| {
                    unreachable(
                        "expected grpc://HOST:PORT, grpc+tls://HOST:PORT or tunnel://NAME"
                            .to_string(),
                    )
                })?;
            (rest, None)
        };
        // Both connectors below dial with Nagle's algorithm off themselves (the endpoint's own
        // TCP settings apply only to tonic's connector, which is not used).
        let endpoint = Endpoint::from_shared(format!("http://{rest}"))
            .map_err(|e| unreachable(format!("invalid address: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30));
        let deadline = tokio::time::Instant::now() + patience;
        let channel = loop {
            let connected = match &tls {
                Some(config) => {
                    endpoint
                        .connect_with_connector(railyard_net::conn::connector(
                            rest.to_string(),
                            address.name.clone(),
                            Arc::clone(config),
                            railyard_net::Expect::Party,
                        ))
                        .await
                }
                None => {
                    endpoint
                        .connect_with_connector(railyard_net::conn::plaintext_connector(
                            rest.to_string(),
                        ))
                        .await
                }
            };
            match connected {
                Ok(channel) => break channel,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(unreachable(railyard_net::error::chain(&e)).into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Self::over(address, channel, transport)
    }

    fn over(address: &StationAddress, channel: Channel, transport: &Transport) -> Result<Self> {
        let secret = match &transport.secret {
            Some(s) => Some(s.parse().map_err(|_| {
                crate::error::Error::BadRequest("the hub secret is not ASCII text".into())
            })?),
            None => None,
        };
        let client = FlightServiceClient::with_interceptor(channel, HubSecret(secret))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            name: address.name.as_str().into(),
            url: address.url.as_str().into(),
            link: Link::Flight(client),
            board: transport.board.clone(),
        })
    }

    /// A client of the hub's own join station.
    pub(crate) fn local(join: Arc<JoinStation>) -> Self {
        Self {
            name: join.name().into(),
            url: format!("local://{}", join.name()).into(),
            link: Link::Local(join),
            board: None,
        }
    }

    /// Fails at once, naming the station, if the hub's board has it offline.
    pub(crate) fn ensure_online(&self) -> std::result::Result<(), StationFailure> {
        match &self.board {
            Some(board) => board.ensure_online(&self.name),
            None => Ok(()),
        }
    }

    /// Whether this is the hub's own join station (not a station of the collaboration).
    pub(crate) fn is_local(&self) -> bool {
        matches!(self.link, Link::Local(_))
    }

    /// The station's software and policy versions; `None` from a station that does not know
    /// the `status` action.
    pub async fn status(&self) -> Result<Option<railyard_contract::StationStatus>> {
        if let Link::Local(_) = &self.link {
            return Ok(None);
        }
        match self.action(actions::STATUS, Vec::new()).await {
            Ok(body) => Ok(Some(serde_json::from_slice(&body).map_err(|e| {
                StationFailure::Protocol {
                    station: self.name.to_string(),
                    fragment: 0,
                    message: format!("unreadable answer to 'status': {e}"),
                }
            })?)),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(self.action_failure(0, s).into()),
        }
    }

    /// Everything the station announces: tables, policies, versions.
    pub async fn announcement(&self) -> Result<crate::board::Announcement> {
        let (tables, policies, status) =
            futures::try_join!(self.tables(), self.policy(), self.status())?;
        Ok(crate::board::Announcement {
            tables,
            policies,
            status,
        })
    }

    /// The Flight client, or the in-process join station.
    pub(crate) fn link(&self) -> std::result::Result<StationFlight, &JoinStation> {
        match &self.link {
            Link::Flight(client) => Ok(client.clone()),
            Link::Local(join) => Err(join),
        }
    }

    fn flight(&self) -> std::result::Result<StationFlight, tonic::Status> {
        self.link()
            .map_err(|_| tonic::Status::internal("the join station is not reached over Flight"))
    }

    /// The tables this station announces, with their schemas.
    pub async fn tables(&self) -> Result<Vec<(String, SchemaRef)>> {
        if let Link::Local(join) = &self.link {
            return Ok(join.tables());
        }
        let failed = |message: String| StationFailure::Protocol {
            station: self.name.to_string(),
            fragment: 0,
            message,
        };
        let infos: Vec<_> = self
            .flight()
            .map_err(|s| failed(s.message().to_string()))?
            .list_flights(Criteria::default())
            .await
            .map_err(|s| StationFailure::Unreachable {
                station: self.name.to_string(),
                url: self.url.to_string(),
                message: railyard_net::error::chain(&s),
            })?
            .into_inner()
            .try_collect()
            .await
            .map_err(|s| failed(s.message().to_string()))?;
        let mut tables = Vec::new();
        for info in infos {
            let name = info
                .flight_descriptor
                .as_ref()
                .and_then(|d| d.path.first().cloned())
                .ok_or_else(|| failed("a table without a name".to_string()))?;
            let schema = info
                .try_decode_schema()
                .map_err(|e| failed(format!("table '{name}': {e}")))?;
            tables.push((name, Arc::new(schema)));
        }
        Ok(tables)
    }

    /// Runs a station action and returns the body of its single result. Every action the
    /// hub sends only reads (a check spends nothing), so one whose connection failed is sent
    /// once more.
    async fn action(
        &self,
        kind: &str,
        body: Vec<u8>,
    ) -> std::result::Result<Vec<u8>, tonic::Status> {
        // Shared, not copied, by the second attempt.
        let body = prost::bytes::Bytes::from(body);
        match self.action_once(kind, body.clone()).await {
            Err(s)
                if matches!(
                    StationFailure::from_status(&self.name, &self.url, 0, &s),
                    StationFailure::Unreachable { .. }
                ) =>
            {
                tracing::warn!(station = %self.name, action = kind, "connection failed; asking once more");
                tokio::time::sleep(crate::exec::RETRY_PAUSE).await;
                self.action_once(kind, body).await
            }
            answer => answer,
        }
    }

    async fn action_once(
        &self,
        kind: &str,
        body: prost::bytes::Bytes,
    ) -> std::result::Result<Vec<u8>, tonic::Status> {
        let mut results = self
            .flight()?
            .do_action(Action::new(kind, body))
            .await?
            .into_inner();
        let first = results
            .message()
            .await?
            .ok_or_else(|| tonic::Status::internal(format!("action '{kind}' returned nothing")))?;
        Ok(first.body.to_vec())
    }

    /// A failed action as a [`StationFailure`] naming this station.
    fn action_failure(&self, fragment: usize, s: tonic::Status) -> StationFailure {
        StationFailure::from_status(&self.name, &self.url, fragment, &s)
    }

    /// Runs an action whose single result is a JSON document.
    async fn json_action<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        body: Vec<u8>,
        fragment: usize,
    ) -> Result<T> {
        let body = self
            .action(kind, body)
            .await
            .map_err(|s| self.action_failure(fragment, s))?;
        Ok(
            serde_json::from_slice(&body).map_err(|e| StationFailure::Protocol {
                station: self.name.to_string(),
                fragment,
                message: format!("unreadable answer to '{kind}': {e}"),
            })?,
        )
    }

    /// The station's policy per table.
    pub async fn policy(&self) -> Result<Vec<TablePolicyInfo>> {
        if let Link::Local(join) = &self.link {
            return Ok(join.policy_info());
        }
        self.json_action(actions::POLICY, Vec::new(), 0).await
    }

    /// Asks the station whether its policy accepts `ticket`, without running it.
    pub async fn check(&self, ticket: &FragmentTicket) -> Result<CheckAnswer> {
        if let Link::Local(join) = &self.link {
            return Ok(join.check(ticket).await?);
        }
        self.ensure_online()?;
        self.json_action(actions::CHECK, ticket.to_bytes(), ticket.fragment)
            .await
    }

    /// The researcher's differential privacy budget at the station, per table.
    pub async fn budget(
        &self,
        researcher: &str,
        collaboration: &str,
    ) -> Result<Vec<railyard_contract::BudgetInfo>> {
        // The join station answers no DP aggregates: it has no budget.
        if let Link::Local(_) = &self.link {
            return Ok(Vec::new());
        }
        let request = railyard_contract::BudgetRequest {
            researcher: researcher.to_string(),
            collaboration: collaboration.to_string(),
        };
        // A struct of two strings always serializes.
        let body = serde_json::to_vec(&request).unwrap_or_default();
        self.json_action(actions::BUDGET, body, 0).await
    }
}
