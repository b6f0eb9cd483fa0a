//! DataFusion functions that Railyard stations and the hub both register, so that a state a
//! station computes can be merged at the hub.
//!
//! ```text
//!   station (its own rows)                         hub (states only)
//!   ─────────────────────                          ──────────────────
//!   partial_avg(age)  ── struct{s0: count, s1: sum} ──▶ merge_avg(state) ──▶ avg(age)
//!   = avg's Accumulator::state()                        = avg's merge_batch() + evaluate()
//! ```
//!
//! The key decision: the partial/final split of an aggregate is not re-invented per function.
//! Every aggregate DataFusion knows (and every Railyard statistical aggregate added later) is
//! federated through its own `Accumulator` contract — `state()` at the station,
//! `merge_batch()` at the hub — so the federated answer equals the centralized one by
//! construction, with the same types.
//!
//! Layout: one function (family) per file. [`partial`] is the station half, [`merge`] the hub
//! half; [`glm_terms`] and [`survival_terms`] are
//! the per-station sums of the statistical models (their value is their state: the hub adds
//! them up and solves); [`pseudonym`] is the keyed HMAC that links vertically partitioned
//! tables (keyed only at stations); [`checked_sum`] replaces `sum` so that integer sums
//! travel in 128 bits and never wrap; [`decimal_arith`] is an optimizer rule for decimal
//! arithmetic (the same values, computed with fewer 128-bit checks); [`register_partials`]
//! installs the station halves into a session, and [`fragment_session_config`] is the
//! configuration under which a fragment's SQL is planned, identical at the hub (to predict
//! the fragment's schema) and at every station.

pub mod capped;
pub mod checked_sum;
pub mod decimal_arith;
pub mod dp;
pub mod glm_terms;
pub mod lean_projection;
pub mod merge;
pub mod partial;
pub mod pseudonym;
pub mod row_hash;
pub mod survival_terms;
pub mod unit_set;
pub mod unit_share;

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::Result;
use datafusion::logical_expr::AggregateUDF;
use datafusion::prelude::{SessionConfig, SessionContext};

pub use merge::{MergeAggregate, MergeArg};
pub use partial::{PARTIAL_DISTINCT_PREFIX, PARTIAL_PREFIX, PartialAggregate};

/// Registers `partial_<name>` and `partial_distinct_<name>` for every aggregate function the
/// session knows (call it after registering any custom aggregates).
pub fn register_partials(ctx: &SessionContext) -> Result<()> {
    let state = ctx.state();
    let mut inners: BTreeMap<String, Arc<AggregateUDF>> = BTreeMap::new();
    for udaf in state.aggregate_functions().values() {
        // Model aggregates are never split: their value is their state, and their state
        // before `evaluate` has not been pooled to the station's disclosure rules.
        if udaf.inner().is::<PartialAggregate>()
            || udaf.inner().is::<MergeAggregate>()
            || udaf.inner().is::<glm_terms::GlmTerms>()
            || udaf.inner().is::<survival_terms::SurvivalTerms>()
        {
            continue;
        }
        inners.insert(udaf.name().to_string(), Arc::clone(udaf));
    }
    for inner in inners.into_values() {
        for distinct in [false, true] {
            ctx.register_udaf(AggregateUDF::from(PartialAggregate::new(
                Arc::clone(&inner),
                distinct,
            )));
        }
    }
    Ok(())
}

/// Registers the model aggregates whose value is their own mergeable state:
/// [`glm_terms`](glm_terms::GlmTerms) and [`survival_terms`](survival_terms::SurvivalTerms).
pub fn register_models(ctx: &SessionContext) {
    ctx.register_udaf(AggregateUDF::from(glm_terms::GlmTerms::default()));
    ctx.register_udaf(AggregateUDF::from(survival_terms::SurvivalTerms::default()));
}

/// The partial wrapper of `inner` as registered by [`register_partials`].
pub fn partial_of(inner: Arc<AggregateUDF>, distinct: bool) -> Arc<AggregateUDF> {
    Arc::new(AggregateUDF::from(PartialAggregate::new(inner, distinct)))
}

/// The memory one query may use, at the hub or at a station (limit `query_memory_bytes`).
pub const QUERY_MEMORY_BYTES: usize = 1 << 30;

/// The task context that runs one query planned in `state`, with a memory pool of its own
/// of [`QUERY_MEMORY_BYTES`]: one query that grows without bound (a huge grouping, a string
/// function over many rows) fails alone, with "resources exhausted", instead of taking the
/// process down with it. Its function registry is left empty: a physical plan holds the
/// functions it calls, and running one never looks a function up by name (the registry
/// serves deserializing plans, which no task here does). Copying the session's registry —
/// every built-in and partial function, by name — was a visible part of a small fragment's
/// cost at a station (issue 24: 3 % of a station's CPU in a model's rounds).
pub fn query_task(
    state: &datafusion::execution::SessionState,
) -> Result<Arc<datafusion::execution::TaskContext>> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(
        state.runtime_env(),
    )
    .with_memory_pool(Arc::new(
        datafusion::execution::memory_pool::GreedyMemoryPool::new(QUERY_MEMORY_BYTES),
    ))
    .build_arc()?;
    Ok(Arc::new(datafusion::execution::TaskContext::new(
        None,
        state.session_id().to_string(),
        state.config().clone(),
        Default::default(),
        Default::default(),
        Default::default(),
        Default::default(),
        runtime,
    )))
}

/// Session configuration for planning fragment SQL. The hub plans every fragment once under
/// this configuration to know its output schema; a station must plan it the same way.
pub fn fragment_session_config() -> SessionConfig {
    SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(true)
}

/// A session for fragments: the default functions plus every partial wrapper, and the
/// optimizer rule for faster decimal arithmetic ([`decimal_arith`]).
pub fn fragment_context() -> Result<SessionContext> {
    fragment_context_with(fragment_session_config())
}

/// A session for fragments under `config` (derived from [`fragment_session_config`], e.g.
/// with another number of partitions).
pub fn fragment_context_with(config: SessionConfig) -> Result<SessionContext> {
    let mut ctx = SessionContext::new_with_config(config);
    ctx.add_optimizer_rule(Arc::new(decimal_arith::DecimalArithmetic::default()));
    register_models(&ctx);
    dp::register(&mut ctx)?;
    // Unkeyed: fragments that pseudonymize plan everywhere; a station replaces it with its
    // keyed version.
    ctx.register_udf(pseudonym::Pseudonym::unkeyed().udf());
    ctx.register_udf(row_hash::RowHash::udf());
    capped::register(&ctx);
    ctx.register_udaf(checked_sum::udaf());
    register_partials(&ctx)?;
    Ok(ctx)
}
