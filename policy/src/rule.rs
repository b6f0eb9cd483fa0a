//! The disclosure rules a station enforces, by name: every refusal names one, and the name
//! is what messages, audit records and the wire ([`railyard_contract::Refusal`]) carry.

use std::fmt;

macro_rules! rules {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// A rule that refused a fragment (or a train's output).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Rule {
            $($(#[$doc])* $variant,)*
        }

        impl Rule {
            /// Every rule, in declaration order.
            pub const ALL: &[Rule] = &[$(Rule::$variant,)*];

            /// The rule's name in messages, audit records and on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Rule::$variant => $name,)*
                }
            }

            /// The rule of a name, if it is one.
            pub fn from_name(name: &str) -> Option<Rule> {
                match name {
                    $($name => Some(Rule::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

rules! {
    /// The fragment is not one of the shapes a station accepts (see [`crate::check`]).
    FragmentShape = "fragment_shape",
    /// A relational fragment would mix patients: a join, subquery, aggregate or window
    /// that is not keyed on the privacy unit (see [`crate::check`]).
    PrivacyUnit = "privacy_unit",
    /// A string literal is longer than `max_string_literal`.
    StringLiteral = "string_literal",
    /// A request to a station that is not from its hub (`railyard local`'s per-run secret).
    HubOnly = "hub_only",
    /// A statement over the limits on its length, operators or nesting
    /// ([`crate::limits`]), checked before it is parsed into a plan.
    QueryTooComplex = "query_too_complex",
    /// `pseudonym()` is applied to something other than a `join_key` column.
    JoinKey = "join_key",
    /// An aggregate whose state is not a sum of bounded per-row contributions.
    UnsafeAggregate = "unsafe_aggregate",
    /// `ORDER BY`/`LIMIT` (or an ordered aggregate) that could single out rows.
    Ordering = "ordering",
    /// A row-level release of a column that is not `public`.
    RowLevel = "row_level",
    /// A `hidden` column is used.
    HiddenColumn = "hidden_column",
    /// A `join_key` column is used other than through `pseudonym()`.
    JoinKeyColumn = "join_key_column",
    /// A `dp` column is used outside a DP aggregate.
    DpColumn = "dp_column",
    /// An aggregate argument over a non-public column is not `a·x + b` of one column.
    AggregateArgument = "aggregate_argument",
    /// `FILTER (WHERE …)` on an aggregate over a non-public column.
    AggregateFilter = "aggregate_filter",
    /// `DISTINCT` inside an aggregate over a non-public column.
    DistinctAggregate = "distinct_aggregate",
    /// An expression over a non-public column that can fail on some value.
    FallibleExpression = "fallible_expression",
    /// A train's input that is not rows of `public`/`aggregate` columns.
    TrainInput = "train_input",
    /// A release whose patients differ from a set released to the same researcher before
    /// (or from the union of an earlier grouped release) by more than none and fewer than
    /// k (plus a noisy margin): the two would subtract to those patients.
    Differencing = "differencing",
    /// A researcher has run more fragments in the last minute than the policy allows.
    RateLimit = "rate_limit",
    /// A released group, global aggregate or row set covers fewer than k rows.
    MinGroupSize = "min_group_size",
    /// Survival times that cannot be pooled into released times of at least k deaths.
    SurvivalEvents = "survival_events",
    /// A survival model asks for a finer time resolution than the policy allows.
    SurvivalTimeResolution = "survival_time_resolution",
    /// A model over fewer complete rows than `model_min_rows` (or k).
    ModelMinRows = "model_min_rows",
    /// A model with more than one parameter per three complete rows.
    ModelParameters = "model_parameters",
    /// A model design column non-zero (or zero) on fewer than k rows.
    /// One row dominates a released model sum (X'WX, X'Wz, the deviance), whatever
    /// coefficients the round was sent with.
    ModelDominance = "model_dominance",
    ModelLevel = "model_level",
    /// Pseudonymized rows of a table whose policy does not set `allow_vertical`.
    AllowVertical = "allow_vertical",
    /// The station holds no collaboration secret, so it cannot pseudonymize.
    CollaborationSecret = "collaboration_secret",
    /// A DP aggregate at a station without a `[dp]` budget, or a non-DP use of DP calls.
    Dp = "dp",
    /// DP and non-DP aggregates in one fragment.
    DpMixed = "dp_mixed",
    /// A DP aggregate grouped by a column without declared public keys.
    DpKeys = "dp_keys",
    /// A DP sum or average over a column without declared bounds.
    DpBounds = "dp_bounds",
    /// A query ε outside (0, `dp.max_epsilon`].
    DpEpsilon = "dp_epsilon",
    /// The researcher's ε budget cannot cover the query.
    DpBudget = "dp_budget",
    /// The station runs no trains.
    Trains = "trains",
    /// A train image the policy does not allow.
    TrainImage = "train_image",
    /// A train's output is not a table the station can release, or its image declares no
    /// output columns for the call (label `railyard.output-schema`).
    TrainOutput = "train_output",
    /// A train's output has more rows than `trains.max_output_rows`.
    MaxOutputRows = "max_output_rows",
    /// A train's output is larger than `trains.max_output_bytes`.
    MaxOutputBytes = "max_output_bytes",
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused fragment: the rule that refused it and a message naming rule and column (never
/// a data value: messages are built from the policy, the schema and the query text only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: Rule,
    pub message: String,
}

/// The refusal as researchers read it: the message, then the rule.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (rule {})", self.message, self.rule)
    }
}

impl Refusal {
    /// The refusal as it crosses the wire.
    pub fn to_wire(&self) -> railyard_contract::Refusal {
        railyard_contract::Refusal {
            rule: self.rule.as_str().to_string(),
            message: self.message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_read_back() {
        let mut names: Vec<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
        for r in Rule::ALL {
            assert_eq!(Rule::from_name(r.as_str()), Some(*r));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Rule::ALL.len());
        assert_eq!(Rule::from_name("no_such_rule"), None);
    }
}
