use datafusion::error::DataFusionError;
use railyard_policy::{Refusal, ReleaseError};
use tonic::{Code, Status};

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
    /// The station's policy refused the fragment (the message names rule and column).
    #[error("{0}")]
    Refused(Refusal),
    /// A broken invariant of the station's own code: a bug, never the user's fault.
    #[error("station '{station}': internal error: {message}")]
    Internal { station: String, message: String },
    /// An approved fragment failed while running; the category names no data value.
    #[error(
        "station '{station}': {category} while running the fragment (the station's log has the detail)"
    )]
    Failed {
        station: String,
        category: &'static str,
    },
    /// A containerized train could not run or did not finish; the message names no data
    /// value (the train's own output stays in the station's log).
    #[error("station '{station}': {message}")]
    Train { station: String, message: String },
    #[error(transparent)]
    Policy(#[from] railyard_policy::PolicyError),
    #[error(transparent)]
    Audit(#[from] railyard_audit::AuditError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Error::DataFusion(Box::new(e))
    }
}

impl Error {
    /// A release rule's verdict on a result, at `station`.
    pub(crate) fn from_release(station: &str, e: ReleaseError) -> Self {
        match e {
            ReleaseError::Refused(r) => Error::Refused(r),
            ReleaseError::Internal(message) => Error::Internal {
                station: station.to_string(),
                message,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A refusal as a status: PERMISSION_DENIED with the message, and the rule as structured
/// detail ([`railyard_contract::Refusal`]) so the hub never parses the text.
fn refusal_status(refusal: &Refusal) -> Status {
    Status::with_details(
        Code::PermissionDenied,
        refusal.to_string(),
        refusal.to_wire().to_bytes().into(),
    )
}

/// The one conversion from station errors to gRPC statuses.
pub fn to_status(station: &str, e: Error) -> Status {
    match &e {
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
        Error::Refused(r) => refusal_status(r),
        Error::Failed { .. } | Error::Train { .. } => Status::aborted(e.to_string()),
        Error::Internal { .. } => Status::internal(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}
