//! Federated query planning for Railyard: pure planning, no I/O.
//!
//! Given DataFusion's optimized logical plan of a researcher's query over the federated
//! catalog, the planner decides what each station runs (a *fragment*, as SQL text) and what
//! the hub does with the stations' answers (the *merge plan*).
//!
//! ```text
//!   SQL ─▶ DataFusion (parse, analyze, optimize) ─▶ LogicalPlan over FederatedTable scans
//!                                                        │ FederationPlanner::federate
//!                     ┌──────────────────────────────────┴──────────────────────┐
//!            fragments (SQL text, expected schema)              hub plan with FragmentNode leaves
//!            e.g. SELECT sex AS g0, partial_avg(age) AS a0      Aggregate[merge_avg(a0)] GROUP BY g0
//!                 FROM lung WHERE age > 50 GROUP BY sex           └─ Fragment #1 (union of stations)
//! ```
//!
//! The key decision: aggregates are split along DataFusion's own accumulator contract
//! (`state()` at the station via `partial_<agg>`, `merge_batch()` at the hub via
//! `merge_<agg>`, both in `railyard-udfs`), so every aggregate DataFusion knows federates
//! with centralized semantics, and the hub needs no per-function decomposition rules.
//! Every fragment's SQL is planned once here, in a shadow session that mirrors a station, so
//! a fragment that would not plan, or would change a type, is refused before anything is
//! sent.
//!
//! Layout: [`catalog`] (federated tables), [`split`] (the split itself), [`fragment`] (the
//! fragment and its placeholder node), [`sql`] (fragment SQL text), [`explain`]
//! (`EXPLAIN FEDERATED`), [`vertical`] (what each member of a vertically partitioned table
//! sends to the hub's join).

pub mod catalog;
pub mod error;
pub mod explain;
pub mod fragment;
pub mod split;
pub mod sql;
pub mod vertical;

pub use catalog::{FederatedCatalog, FederatedTable, StationTablePolicy};
pub use error::{Error, Result};
pub use explain::{explain_batch, explain_rows, explain_schema, strip_explain_federated};
pub use fragment::{Fragment, FragmentKind, FragmentNode, ThresholdNode};
pub use split::{FederatedPlan, FederationPlanner};
pub use vertical::{MemberFragment, VerticalLayout, VerticalMember};
