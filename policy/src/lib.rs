//! Railyard's disclosure rules, in one pure crate: what a station lets leave.
//!
//! ```text
//!   policy file ──▶ file::Policy (resolved per table and column)
//!                         │
//!   fragment plan ──▶ check::check ──▶ Checked { plan to run, Release }  or  Refusal(Rule)
//!                         │                                    (before anything is read)
//!   result batches ─▶ release::release ──▶ Released { batches, groups kept/suppressed }
//!                                          or Refusal(Rule)    (before anything leaves)
//!   station state ──▶ gate::* (DP ε and budget, trains, collaboration secret)
//! ```
//!
//! Layout: [`file`] (the policy file, parsed and validated; [`Visibility`]), [`check`]
//! (the pre-run check of a fragment's plan: its shape, lineage, aggregates, models and DP
//! calls, and the plan it approves), [`release`] (the post-run rules: thresholds, model and
//! survival rules), [`gate`] (rules on the station's own state), [`dp`] (what a DP release
//! is), [`limits`] (the size of a statement, measured before it is parsed), [`rule`] (the
//! [`Rule`] every refusal names).
//!
//! The key design decision: the crate does no I/O and holds no async code, so both roles
//! run the very same rules — a station over its tables, and the hub's join station over the
//! joined rows of a vertical table — and every rule is tested without a socket. The station
//! crate is the I/O shell around it (Flight, sources, audit log, ε ledger, noise, trains).

pub mod check;
pub mod dp;
pub mod file;
pub mod gate;
pub mod limits;
pub mod queryset;
pub mod release;
pub mod rule;

pub use check::{Checked, ROWS_COLUMN, Release, check, check_train_input};
pub use file::{Policy, PolicyError, TablePolicy, Visibility};
pub use railyard_contract::ReleaseKind;
pub use release::{ReleaseError, Released};
pub use rule::{Refusal, Rule};
