use datafusion::error::DataFusionError;

/// Errors of federated planning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The query is valid SQL but has a part Railyard cannot run across stations yet.
    #[error("not supported in a federated query: {0}")]
    NotSupported(String),
    /// The stations' catalogs do not fit together into one federated table.
    #[error("federated catalog: {0}")]
    Catalog(String),
    /// A broken invariant of the planner itself: a bug, never the user's fault.
    #[error("internal error: {0}")]
    Internal(String),
    /// A planning step of DataFusion itself failed.
    #[error(transparent)]
    DataFusion(#[from] Box<DataFusionError>),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Error::DataFusion(Box::new(e))
    }
}

impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        match e {
            Error::DataFusion(e) => *e,
            Error::Internal(m) => DataFusionError::Internal(m),
            other => DataFusionError::Plan(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
