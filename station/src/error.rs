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
    /// The station's policy refused the fragment (the message names rule and column).
    #[error("{} (rule {})", .0.message, .0.rule)]
    Refused(crate::check::Refusal),
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
    /// A station this one reads failed or refused (only the hub's join station reads other
    /// stations).
    #[error(transparent)]
    Upstream(Upstream),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// A failure of another station that a station's table reads (the hub's join station reads
/// the members of a vertical table), carried through DataFusion as an external error. Its
/// message is that station's own, which names no data value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Upstream {
    /// The other station's policy refused its part.
    pub refused: bool,
    pub message: String,
}

impl Upstream {
    /// The upstream failure at the root of `e`, if that is what `e` is.
    pub fn of(e: &DataFusionError) -> Option<&Upstream> {
        match e.find_root() {
            DataFusionError::External(inner) => inner.downcast_ref::<Upstream>(),
            _ => None,
        }
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Error::DataFusion(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
        Error::Refused(_) => Status::permission_denied(e.to_string()),
        Error::Failed { .. } | Error::Train { .. } => Status::aborted(e.to_string()),
        Error::Upstream(u) if u.refused => Status::permission_denied(u.message.clone()),
        Error::Upstream(u) => Status::aborted(u.message.clone()),
        other => Status::internal(other.to_string()),
    }
}
