//! Integration tests: real stations and a real hub on loopback sockets, queried through
//! Flight SQL, compared with one centralized DataFusion session over the pooled data.

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

mod attacks;
mod differencing;
mod dp;
mod federation;
mod fixtures;
mod fuzz;
mod policy;
mod postgres;
mod retries;
mod slt;
mod statistics;
mod trains;
mod vertical;
