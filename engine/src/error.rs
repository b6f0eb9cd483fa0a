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
    /// The hub's board has the station offline: the query fails at once instead of waiting
    /// out a timeout.
    #[error(
        "station '{station}' is offline (last seen: {last_seen}; {error}); queries that need \
         it fail until it is back, the others are unaffected"
    )]
    Offline {
        station: String,
        last_seen: String,
        error: String,
    },
    #[error("station '{station}' did not answer fragment #{fragment} within {timeout:?}")]
    Timeout {
        station: String,
        fragment: usize,
        timeout: Duration,
    },
    /// The station's policy refused the fragment; the message is the station's, naming the
    /// rule and the column (never a value), and `rule` is the rule it sent as detail.
    #[error("{message}")]
    Refused {
        station: String,
        fragment: usize,
        rule: String,
        message: String,
    },
    /// A failure while running (ABORTED) does not name the station: which station failed
    /// could depend on one patient's values there.
    #[error("{}", failed_text(.station, *.fragment, *.code, .message))]
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

fn failed_text(station: &str, fragment: usize, code: Code, message: &str) -> String {
    if code == Code::Aborted {
        format!(
            "a station failed fragment #{fragment} while running: {message} (which station is \
             not said: a failure while running could depend on its data)"
        )
    } else {
        format!("station '{station}' failed fragment #{fragment}: {message}")
    }
}

impl StationFailure {
    /// The failure a station's status stands for: its refusal (PERMISSION_DENIED, with the
    /// rule as the status' details), an unreachable station, or another failure. The one
    /// conversion from a station's statuses; the station's own name is dropped from the
    /// front of its message (the failure names it already).
    pub(crate) fn from_status(station: &str, url: &str, fragment: usize, s: &Status) -> Self {
        let prefix = format!("station '{station}': ");
        let message = s.message();
        let message = message.strip_prefix(&prefix).unwrap_or(message).to_string();
        // A connection that failed (also a TLS refusal the server sends after the client's
        // handshake finished) reaches us as a status with the cause beneath it.
        if s.code() == Code::Unavailable || is_transport(s) {
            return StationFailure::Unreachable {
                station: station.to_string(),
                url: url.to_string(),
                message: railyard_net::error::chain(s),
            };
        }
        if s.code() == Code::PermissionDenied {
            let rule = railyard_contract::Refusal::from_bytes(s.details())
                .map_or_else(|| "policy".to_string(), |r| r.rule);
            return StationFailure::Refused {
                station: station.to_string(),
                fragment,
                rule,
                message,
            };
        }
        StationFailure::Failed {
            station: station.to_string(),
            fragment,
            code: s.code(),
            message,
        }
    }

    fn code(&self) -> Code {
        match self {
            StationFailure::Refused { .. } => Code::PermissionDenied,
            StationFailure::Unreachable { .. } | StationFailure::Offline { .. } => {
                Code::Unavailable
            }
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
    /// The statement is over a limit the hub checks before parsing it.
    #[error("{0}")]
    Limit(railyard_policy::Refusal),
    /// A broken invariant of the hub's own code: a bug, never the user's fault.
    #[error("internal error: {0}")]
    Internal(String),
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
pub(crate) fn station_failure(e: &DataFusionError) -> Option<StationFailure> {
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
        Error::Planner(e @ railyard_planner::Error::Internal(_)) => Status::internal(e.to_string()),
        Error::Planner(e) => Status::invalid_argument(e.to_string()),
        Error::Station(f) => match f.as_ref() {
            // The researcher's client gets the refusal's rule as detail too.
            StationFailure::Refused { rule, message, .. } => Status::with_details(
                Code::PermissionDenied,
                message.clone(),
                railyard_contract::Refusal {
                    rule: rule.clone(),
                    message: message.clone(),
                }
                .to_bytes()
                .into(),
            ),
            other => Status::new(other.code(), other.to_string()),
        },
        Error::BadRequest(m) => Status::invalid_argument(m),
        Error::Limit(refusal) => Status::with_details(
            // Too many queries is the caller's pace, not the statement's fault.
            if refusal.rule == railyard_policy::Rule::RateLimit {
                Code::ResourceExhausted
            } else {
                Code::InvalidArgument
            },
            refusal.to_string(),
            refusal.to_wire().to_bytes().into(),
        ),
        Error::Internal(m) => Status::internal(format!("internal error: {m}")),
        Error::Transport(e) => Status::internal(e.to_string()),
    }
}

/// Whether a status stands for a broken connection rather than a station's answer.
fn is_transport(s: &Status) -> bool {
    std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_station_status_is_read_once_refusals_by_their_detail() {
        let refusal = railyard_contract::Refusal {
            rule: "min_group_size".into(),
            message: "policy: …".into(),
        };
        let status = Status::with_details(
            Code::PermissionDenied,
            "station 'a': policy: … (rule min_group_size)",
            refusal.to_bytes().into(),
        );
        match StationFailure::from_status("a", "grpc://a", 3, &status) {
            StationFailure::Refused {
                station,
                fragment,
                rule,
                message,
            } => {
                assert_eq!((station.as_str(), fragment), ("a", 3));
                assert_eq!(rule, "min_group_size");
                assert_eq!(message, "policy: … (rule min_group_size)");
            }
            other => panic!("{other:?}"),
        }
        // A refusal from a station that sends no detail is still a refusal.
        let bare = Status::permission_denied("policy: no");
        assert!(matches!(
            StationFailure::from_status("a", "u", 1, &bare),
            StationFailure::Refused { ref rule, .. } if rule == "policy"
        ));
        // Other codes stay failures with the station's code; the failure names the station
        // once.
        let failed = Status::aborted("station 'a': division by zero while running");
        match StationFailure::from_status("a", "u", 1, &failed) {
            failure @ StationFailure::Failed { .. } => {
                let StationFailure::Failed { code, message, .. } = &failure else {
                    unreachable!()
                };
                assert_eq!(*code, Code::Aborted);
                assert_eq!(message, "division by zero while running");
                // A failure while running could depend on one patient's values at that
                // station: the researcher is not told which station it was.
                let shown = failure.to_string();
                assert!(!shown.contains("'a'"), "{shown}");
                assert!(shown.contains("a station failed fragment #1"), "{shown}");
            }
            other => panic!("{other:?}"),
        }
        // A failure before anything ran names its station.
        let bad = Status::invalid_argument("station 'a': no such table");
        assert!(
            StationFailure::from_status("a", "u", 1, &bad)
                .to_string()
                .contains("station 'a'")
        );
        assert!(matches!(
            StationFailure::from_status("a", "u", 1, &Status::unavailable("gone")),
            StationFailure::Unreachable { .. }
        ));
        // The researcher's client gets the rule as detail too.
        let to_client = to_status(Error::Station(Box::new(StationFailure::from_status(
            "a", "u", 1, &status,
        ))));
        assert_eq!(to_client.code(), Code::PermissionDenied);
        assert_eq!(
            railyard_contract::Refusal::from_bytes(to_client.details()).map(|r| r.rule),
            Some("min_group_size".to_string())
        );
    }

    #[test]
    fn a_planner_bug_is_internal_not_the_users_fault() {
        let status = to_status(Error::Planner(railyard_planner::Error::Internal(
            "unknown group key".into(),
        )));
        assert_eq!(status.code(), Code::Internal);
        let status = to_status(Error::Internal("broken".into()));
        assert_eq!(status.code(), Code::Internal);
    }
}
