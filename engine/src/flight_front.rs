//! The gRPC service the hub serves: [`HubFlightSql`]'s Flight SQL service, with one action
//! answered here instead.
//!
//! arrow-flight 59.3's Flight SQL dispatch calls `do_action_create_prepared_substrait_plan`
//! and then drops its answer: the client receives an empty stream (ADBC reports "EOF" from
//! `Prepare`), so a prepared Substrait plan — what ADBC's `cursor.execute(plan_bytes)`
//! creates — could never run. This wrapper answers that action with the result, as the
//! dispatch does for `CreatePreparedStatement`, and passes every other call through.

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{ActionCreatePreparedSubstraitPlanRequest, Any, ProstMessageExt};
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, PollInfo,
    SchemaResult, Ticket,
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::flight_sql::HubFlightSql;

/// The Flight SQL action type of a prepared Substrait plan.
const CREATE_PREPARED_SUBSTRAIT_PLAN: &str = "CreatePreparedSubstraitPlan";

/// [`HubFlightSql`] as served (see the module docs).
#[derive(Clone)]
pub struct HubFlightService(pub HubFlightSql);

type Inner = HubFlightSql;

#[tonic::async_trait]
impl FlightService for HubFlightService {
    type HandshakeStream = <Inner as FlightService>::HandshakeStream;
    type ListFlightsStream = <Inner as FlightService>::ListFlightsStream;
    type DoGetStream = <Inner as FlightService>::DoGetStream;
    type DoPutStream = <Inner as FlightService>::DoPutStream;
    type DoActionStream = <Inner as FlightService>::DoActionStream;
    type ListActionsStream = <Inner as FlightService>::ListActionsStream;
    type DoExchangeStream = <Inner as FlightService>::DoExchangeStream;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(&self.0, request).await
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        FlightService::list_flights(&self.0, request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        FlightService::get_flight_info(&self.0, request).await
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        FlightService::poll_flight_info(&self.0, request).await
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        FlightService::get_schema(&self.0, request).await
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        FlightService::do_get(&self.0, request).await
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        FlightService::do_put(&self.0, request).await
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        FlightService::do_exchange(&self.0, request).await
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightService::list_actions(&self.0, request).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        if request.get_ref().r#type != CREATE_PREPARED_SUBSTRAIT_PLAN {
            return FlightService::do_action(&self.0, request).await;
        }
        let any = Any::decode(&*request.get_ref().body)
            .map_err(|e| Status::invalid_argument(format!("the action does not decode: {e}")))?;
        let command: ActionCreatePreparedSubstraitPlanRequest = any
            .unpack()
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .ok_or_else(|| {
                Status::invalid_argument(
                    "the action is not an ActionCreatePreparedSubstraitPlanRequest",
                )
            })?;
        let prepared = self
            .0
            .do_action_create_prepared_substrait_plan(command, request)
            .await?;
        let result = arrow_flight::Result {
            body: prepared.as_any().encode_to_vec().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(result)
        }))))
    }
}
