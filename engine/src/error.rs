use std::time::Duration;

use datafusion::error::DataFusionError;
use tonic::{Code, Status};

/// Why a station did not deliver its part of a query.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StationFailure {
    #[error("station '{station}' is unreachable at {url}: {message}")]
    Unreachable {
        station: String,
        url: String,
        message: String,
    },
    #[error("station '{station}' did not answer fragment #{fragment} within {timeout:?}")]
    Timeout {
        station: String,
        fragment: usize,
        timeout: Duration,
    },
    #[error("station '{station}' failed fragment #{fragment}: {message}")]
    Failed {
        station: String,
        fragment: usize,
        code: Code,
        message: String,
    },
    #[error("station '{station}' sent a malformed answer to fragment #{fragment}: {message}")]
    Protocol {
        station: String,
        fragment: usize,
        message: String,
    },
}

impl StationFailure {
    fn code(&self) -> Code {
        match self {
            StationFailure::Unreachable { .. } => Code::Unavailable,
            StationFailure::Timeout { .. } => Code::DeadlineExceeded,
            StationFailure::Failed { code, .. } => *code,
            StationFailure::Protocol { .. } => Code::Internal,
        }
    }
}

/// Errors of the hub.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Planner(#[from] railyard_planner::Error),
    #[error(transparent)]
    DataFusion(#[from] Box<DataFusionError>),
    #[error(transparent)]
    Station(#[from] Box<StationFailure>),
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A station's policy refused a fragment of the query; nothing was run anywhere. The
    /// message is the station's, naming the rule and the column.
    #[error("{0}")]
    Refused(String),
    #[error("hub server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        // A station failure travels through DataFusion as an external error: unwrap it so
        // the client sees the station's name and the right status code.
        if let Some(failure) = station_failure(&e) {
            return Error::Station(Box::new(failure));
        }
        Error::DataFusion(Box::new(e))
    }
}

impl From<StationFailure> for Error {
    fn from(e: StationFailure) -> Self {
        Error::Station(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Finds a [`StationFailure`] anywhere inside a DataFusion error chain.
fn station_failure(e: &DataFusionError) -> Option<StationFailure> {
    let mut current: &dyn std::error::Error = e;
    loop {
        if let Some(failure) = current.downcast_ref::<StationFailure>() {
            return Some(failure.clone());
        }
        if let Some(DataFusionError::External(inner)) = current.downcast_ref::<DataFusionError>()
            && let Some(failure) = inner.downcast_ref::<StationFailure>()
        {
            return Some(failure.clone());
        }
        current = current.source()?;
    }
}

/// The one conversion from hub errors to gRPC statuses for researchers' clients.
pub fn to_status(e: Error) -> Status {
    match e {
        Error::Planner(railyard_planner::Error::DataFusion(e)) | Error::DataFusion(e) => {
            let message = e.strip_backtrace();
            match e.find_root() {
                DataFusionError::SQL(..)
                | DataFusionError::Plan(_)
                | DataFusionError::SchemaError(..)
                | DataFusionError::NotImplemented(_) => Status::invalid_argument(message),
                DataFusionError::ResourcesExhausted(_) => Status::resource_exhausted(message),
                _ => Status::internal(message),
            }
        }
        Error::Planner(e) => Status::invalid_argument(e.to_string()),
        Error::Station(f) => match f.as_ref() {
            StationFailure::Failed {
                code: Code::PermissionDenied,
                message,
                ..
            } => Status::permission_denied(message.clone()),
            other => Status::new(other.code(), other.to_string()),
        },
        Error::BadRequest(m) => Status::invalid_argument(m),
        Error::Refused(m) => Status::permission_denied(m),
        Error::Transport(e) => Status::internal(e.to_string()),
    }
}
