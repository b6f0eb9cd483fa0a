//! The station's Arrow Flight service.
//!
//! `DoGet` with a [`FragmentTicket`] runs a fragment; `ListFlights` announces the station's
//! tables (one `FlightInfo` per table, path = table name, with its schema) so a hub can build
//! its federated catalog; the actions `check` (a fragment against the policy, without
//! running it), `policy` (k and column visibilities) and `health`. Nothing else is served.

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt, TryStreamExt};
use railyard_contract::{FragmentTicket, actions};
use tonic::{Request, Response, Status, Streaming};

use crate::Station;
use crate::error::{Error, to_status};

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Serves one [`Station`] over Arrow Flight.
#[derive(Clone)]
pub struct StationService {
    station: Arc<Station>,
}

impl StationService {
    pub fn new(station: Arc<Station>) -> Self {
        Self { station }
    }

    fn status(&self, e: Error) -> Status {
        to_status(self.station.name(), e)
    }

    /// Runs `work` on its own task, so that a caller who hangs up (the hub dropping a query
    /// because another station failed, a researcher cancelling) cannot stop it half-way: a
    /// DP charge committed before the drop still gets its audit record, and a refusal is
    /// still recorded. What the caller no longer wants is then simply not sent.
    async fn to_completion<T, F>(&self, work: impl FnOnce(Arc<Station>) -> F) -> Result<T, Status>
    where
        F: Future<Output = crate::error::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        match tokio::spawn(work(Arc::clone(&self.station))).await {
            Ok(result) => result.map_err(|e| self.status(e)),
            Err(e) => Err(self.status(Error::Internal {
                station: self.station.name().to_string(),
                message: format!("the fragment's task did not finish: {e}"),
            })),
        }
    }
}

#[tonic::async_trait]
impl FlightService for StationService {
    type HandshakeStream = FlightStream<HandshakeResponse>;
    type ListFlightsStream = FlightStream<FlightInfo>;
    type DoGetStream = FlightStream<FlightData>;
    type DoPutStream = FlightStream<PutResult>;
    type DoActionStream = FlightStream<arrow_flight::Result>;
    type ListActionsStream = FlightStream<ActionType>;
    type DoExchangeStream = FlightStream<FlightData>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("a station needs no handshake"))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let mut infos = Vec::new();
        for (name, schema) in self.station.tables().await.map_err(|e| self.status(e))? {
            let info = FlightInfo::new()
                .try_with_schema(schema.as_ref())
                .map_err(|e| Status::internal(e.to_string()))?
                .with_descriptor(FlightDescriptor::new_path(vec![name]));
            infos.push(Ok(info));
        }
        Ok(Response::new(Box::pin(stream::iter(infos))))
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented(
            "a station runs fragments through DoGet only",
        ))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "a station runs fragments through DoGet only",
        ))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented(
            "table schemas are announced through ListFlights",
        ))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = FragmentTicket::from_bytes(&request.into_inner().ticket)
            .map_err(|m| self.status(Error::BadRequest(m)))?;
        let batches = self
            .to_completion(|station| async move { station.run_fragment(&ticket).await })
            .await?;
        let station = self.station.name().to_string();
        let schema = batches.schema();
        let flight = railyard_net::flight_data::encode(
            schema,
            batches.map_err(|e| FlightError::ExternalError(Box::new(e))),
        )
        .map_err(move |e| match e {
            FlightError::ExternalError(inner) => {
                match inner.downcast::<datafusion::error::DataFusionError>() {
                    Ok(df) => to_status(&station, Error::DataFusion(df)),
                    Err(other) => Status::internal(format!("station '{station}': {other}")),
                }
            }
            other => Status::internal(format!("station '{station}': {other}")),
        });
        Ok(Response::new(Box::pin(flight)))
    }

    async fn do_put(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("a station accepts no data"))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("a station accepts no data"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let reply = |body: Vec<u8>| {
            let body = arrow_flight::Result { body: body.into() };
            let s: BoxStream<'static, Result<arrow_flight::Result, Status>> =
                stream::once(async move { Ok(body) }).boxed();
            Ok(Response::new(s))
        };
        match action.r#type.as_str() {
            actions::HEALTH => reply(self.station.name().as_bytes().to_vec()),
            actions::STATUS => reply(json(&self.station.status())?),
            actions::CHECK => {
                let ticket = FragmentTicket::from_bytes(&action.body)
                    .map_err(|m| self.status(Error::BadRequest(m)))?;
                let answer = self
                    .to_completion(|station| async move { station.check_fragment(&ticket).await })
                    .await?;
                reply(json(&answer)?)
            }
            actions::BUDGET => {
                let request: railyard_contract::BudgetRequest =
                    serde_json::from_slice(&action.body).map_err(|e| {
                        self.status(Error::BadRequest(format!("not a budget request: {e}")))
                    })?;
                let info = self
                    .station
                    .budget(&request.researcher, &request.collaboration)
                    .await
                    .map_err(|e| self.status(e))?;
                reply(json(&info)?)
            }
            actions::POLICY => {
                let info = self
                    .station
                    .policy_info()
                    .await
                    .map_err(|e| self.status(e))?;
                reply(json(&info)?)
            }
            other => Err(Status::unimplemented(format!(
                "station '{}' has no action '{other}'",
                self.station.name()
            ))),
        }
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let actions = [
            (actions::HEALTH, "returns the station's name"),
            (
                actions::STATUS,
                "returns {station, version, policy_version}: the station's software version \
                 and a digest of its policy",
            ),
            (
                actions::CHECK,
                "checks a fragment ticket against the station's policy without running it; \
                 returns {release, min_group_size} or PERMISSION_DENIED naming the rule \
                 (its details: {rule, message})",
            ),
            (
                actions::POLICY,
                "returns the station's policy per table: k and each column's visibility",
            ),
            (
                actions::BUDGET,
                "takes {researcher, collaboration}; returns per table the differential \
                 privacy budget, the ε spent and the per-query limits",
            ),
        ]
        .into_iter()
        .map(|(t, d)| {
            Ok(ActionType {
                r#type: t.to_string(),
                description: d.to_string(),
            })
        })
        .collect::<Vec<_>>();
        Ok(Response::new(Box::pin(stream::iter(actions))))
    }
}

/// An action's answer as JSON.
fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value)
        .map_err(|e| Status::internal(format!("an answer does not serialize: {e}")))
}
