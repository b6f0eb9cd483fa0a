//! Errors of the transport layer.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line. A TLS refusal sits two levels below tonic's
/// "transport error", and a gRPC status shows its whole debug form as `Display`: its message
/// is what it says. Causes that only repeat what is already said are left out.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = match e.downcast_ref::<tonic::Status>() {
        Some(status) => status.message().to_string(),
        None => e.to_string(),
    };
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
