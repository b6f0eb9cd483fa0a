//! Railyard: federated SQL over stations that keep their data at home.
//!
//! This crate is the `railyard` binary's library: the one-process federation of
//! `railyard local` ([`local`]), the Flight SQL client of `railyard sql` ([`client`]), the
//! synthetic registry and TPC-H data of `railyard gen` ([`synth`], [`tpch`]) and the demo ([`demo`]), and the
//! deployed daemons with their collaboration secrets ([`deploy`], [`secret`]) and a station's
//! audit page for its operator ([`admin`]). The federation
//! itself lives in the workspace crates: `railyard-station` (stations), `railyard-engine`
//! (the hub), `railyard-planner` (the split into fragments) and `railyard-udfs` (functions
//! both sides share).

pub mod admin;
pub mod client;
pub mod demo;
pub mod deploy;
pub mod local;
pub mod secret;
pub mod synth;
pub mod tpch;
