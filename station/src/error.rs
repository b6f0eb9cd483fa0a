use datafusion::error::DataFusionError;
use tonic::Status;

/// Errors of a station.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data source could not be opened or does not fit the station's configuration.
    #[error("station '{station}': table '{table}': {message}")]
    Source {
        station: String,
        table: String,
        message: String,
    },
    /// The fragment request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Planning or running a fragment failed.
    #[error(transparent)]
    DataFusion(#[from] Box<DataFusionError>),
    #[error("station server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Error::DataFusion(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The one conversion from station errors to gRPC statuses.
pub fn to_status(station: &str, e: Error) -> Status {
    match e {
        Error::BadRequest(m) => Status::invalid_argument(format!("station '{station}': {m}")),
        Error::DataFusion(e) => match e.as_ref() {
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_) => {
                Status::invalid_argument(format!("station '{station}': {}", e.strip_backtrace()))
            }
            DataFusionError::ResourcesExhausted(_) => {
                Status::resource_exhausted(format!("station '{station}': {}", e.strip_backtrace()))
            }
            _ => Status::internal(format!("station '{station}': {}", e.strip_backtrace())),
        },
        other => Status::internal(other.to_string()),
    }
}
