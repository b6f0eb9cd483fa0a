//! The policy check: run on the plan a station built itself from a fragment's SQL, before
//! any data is read.
//!
//! A fragment must be a straight chain over one table. Three shapes pass:
//!
//! ```text
//!   rows:       [Projection | Filter | SubqueryAlias | Sort | Limit]* → TableScan
//!               every column it touches (output, filter, sort) must be `public`
//!   aggregate:  [Projection | SubqueryAlias]* → Aggregate → [Projection | Filter | SubqueryAlias]* → TableScan
//!               filters and group keys may use `aggregate` columns (the group-size
//!               threshold covers whatever they select); aggregate arguments are checked
//!               per call; the station appends the group's row count `__rows`
//!   pseudonymized rows (vertical tables): [Projection | Filter | SubqueryAlias]* → TableScan
//!               with `pseudonym(join_key)` among the outputs; other columns `public` or
//!               `aggregate`; only if the table's policy has `allow_vertical`, and at least
//!               k rows
//! ```
//!
//! Why arguments are restricted: thresholds count the rows of a group, but an expression
//! inside an aggregate can make one row dominate it (`sum(age * (patient_id = 7))`, or the
//! same with pure arithmetic). An argument over a non-public column may therefore only
//! scale and shift that one column (`a·x + b`), and only aggregates whose state is a sum
//! of per-row contributions are accepted (count, sum, mean, variances, covariances,
//! regressions): their value moves by a bounded amount per row, where `min()`, `median()` or
//! `array_agg()` would hand out one patient's value.
//!
//! Model aggregates (`glm_terms`, `survival_terms`) are the exception: their arguments are
//! several columns, used unchanged (or, for a GLM covariate, as a level indicator
//! `column = literal`), with literal settings; what they release is bounded by the model
//! rules of [`Release::Model`] and [`Release::Survival`], applied after running.
//!
//! Differentially private fragments (`partial_dp_count/sum/avg`, see [`crate::dp`]) are the
//! other exception: an aggregate whose every call is a DP one, over columns used unchanged
//! (`public`, `aggregate` or `dp`; sums need bounds in the policy), grouped only by columns
//! whose public keys the policy declares. What they release is decided by ε, not by k.
//!
//! Every refusal names the rule and the column, and never contains a data value: messages
//! are built from the policy, the schema and the query text only.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::common::Column;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::functions::math::expr_fn::isnan;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator, Projection, SubqueryAlias,
};
use datafusion::logical_expr::{cast, lit, when};
use railyard_udfs::PartialAggregate;
use railyard_udfs::dp::{DpKind, dp_kind};
use railyard_udfs::glm_terms::{Family, GLM_TERMS, glm_covariates};
use railyard_udfs::pseudonym::PSEUDONYM;
use railyard_udfs::survival_terms::{SURVIVAL_TERMS, survival_covariates};

use crate::policy::{Policy, Visibility};

pub use railyard_udfs::wire::ROWS_COLUMN;

/// Aggregates whose state is a sum of bounded per-row contributions: safe over groups of
/// at least k rows.
const SAFE_AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "mean",
    "var",
    "var_samp",
    "var_pop",
    "var_population",
    "stddev",
    "stddev_samp",
    "stddev_pop",
    "covar",
    "covar_samp",
    "covar_pop",
    "corr",
    "regr_slope",
    "regr_intercept",
    "regr_count",
    "regr_r2",
    "regr_avgx",
    "regr_avgy",
    "regr_sxx",
    "regr_syy",
    "regr_sxy",
    "bool_and",
    "bool_or",
];

/// A refused fragment: the rule that refused it and a message naming rule and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: &'static str,
    pub message: String,
}

/// What a checked fragment may release.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Row-level values of public columns.
    Rows,
    /// One row per group, the last column being the group's row count; groups below `k`
    /// are suppressed, and a global aggregate below `k` is refused.
    Groups { k: u64, global: bool },
    /// One `glm_terms` value (and the row count): released only if it covers at least
    /// `min_rows` complete rows, at least three per parameter, and every design column is
    /// non-zero on at least `k` rows and zero on none or at least `k` (a column non-zero
    /// on a few rows, a level indicator or a rare 0/1 flag, would isolate them).
    Model {
        k: u64,
        min_rows: u64,
        parameters: usize,
    },
    /// Groups as for [`Release::Groups`], each with a `survival_terms` value (the
    /// second-last column); a NULL value (times that cannot be pooled to the rule) refuses
    /// the whole release.
    Survival { k: u64, global: bool },
    /// Row-level values of `public` and `aggregate` columns keyed by `pseudonym(join_key)`,
    /// for a hub that joins them with other stations' columns and releases only aggregates
    /// over groups of at least k joined rows. Refused below `k` rows.
    Pseudonymized { k: u64 },
    /// Row-level values of `public` and `aggregate` columns handed to a containerized train
    /// inside the station (they never leave it); refused below `k` rows. What leaves is the
    /// train's output, bounded by the `[trains]` policy.
    TrainInput { k: u64 },
    /// Differentially private aggregate states: one row per declared key combination,
    /// every state field noised (the plan is the aggregate alone, its sums clamped).
    Dp(Arc<crate::dp::DpRelease>),
}

/// A fragment that passed the policy: the plan to run (with the row count appended for an
/// aggregate) and what it releases.
#[derive(Debug, Clone)]
pub struct Checked {
    pub plan: LogicalPlan,
    pub table: String,
    pub release: Release,
}

/// Where a column comes from: the table columns it is computed from, and whether it is one
/// of them unchanged.
#[derive(Debug, Clone, Default)]
struct Lineage {
    bases: BTreeSet<String>,
    direct: bool,
    /// The column is `pseudonym(join_key)`, possibly renamed.
    pseudonym: bool,
}

/// The lineage of column `c` among a node's input columns.
fn find<'a>(input: &'a [(Column, Lineage)], c: &Column) -> Option<&'a Lineage> {
    input
        .iter()
        .find(|(col, _)| col == c)
        .or_else(|| {
            let mut named = input.iter().filter(|(col, _)| col.name == c.name);
            match (c.relation.is_none(), named.next(), named.next()) {
                (true, Some(hit), None) => Some(hit),
                _ => None,
            }
        })
        .map(|(_, l)| l)
}

/// What a model aggregate (`glm_terms`, `survival_terms`) asks for, as read from its
/// literal arguments.
#[derive(Debug, Clone, PartialEq)]
enum ModelCall {
    Glm {
        parameters: usize,
    },
    Survival {
        covariates: usize,
        resolution: f64,
        min_rows: f64,
        min_events: f64,
    },
}

struct Checker<'a> {
    policy: &'a Policy,
    station: &'a str,
    table: String,
    /// Every table column referenced anywhere in the fragment.
    used: BTreeSet<String>,
    /// The model aggregate of the fragment, if it has one.
    model: Option<ModelCall>,
    /// Whether the fragment outputs `pseudonym(join_key)`.
    pseudonymized: bool,
    /// Whether the fragment is a DP aggregate (`dp` columns may be read).
    dp: bool,
}

impl Checker<'_> {
    fn column_refusal(&self, rule: &'static str, column: &str, why: &str) -> Refusal {
        let visibility = self.policy.visibility(&self.table, column);
        Refusal {
            rule,
            message: format!(
                "policy: column '{column}' of table '{}' is '{visibility}' at station '{}'; {why}",
                self.table, self.station
            ),
        }
    }

    fn shape(&self, why: &str) -> Refusal {
        Refusal {
            rule: "fragment_shape",
            message: format!(
                "policy: station '{}' refuses the fragment: {why}",
                self.station
            ),
        }
    }

    fn visibility(&self, column: &str) -> Visibility {
        self.policy.visibility(&self.table, column)
    }

    /// The table columns an expression is computed from, given its input's lineage.
    fn lineage(
        &mut self,
        expr: &Expr,
        input: &[(Column, Lineage)],
        schema: &DFSchema,
    ) -> Result<Lineage, Refusal> {
        self.literals(expr)?;
        let mut out = Lineage::default();
        for c in expr.column_refs() {
            let Some(lineage) = find(input, c) else {
                return Err(self.shape(&format!("column '{}' cannot be traced", c.name)));
            };
            out.bases.extend(lineage.bases.iter().cloned());
        }
        for c in &out.bases {
            self.forbidden(c)?;
        }
        if let Some(c) = self.first_non_public(&out.bases)
            && let Some(what) = fallible(expr, schema)
        {
            return Err(self.column_refusal(
                "fallible_expression",
                &c,
                &format!(
                    "{what} can fail on particular values, and whether the fragment fails \
                     would reveal them"
                ),
            ));
        }
        self.used.extend(out.bases.iter().cloned());
        Ok(out)
    }

    /// Refuses subqueries and over-long string literals anywhere in an expression.
    fn literals(&self, expr: &Expr) -> Result<(), Refusal> {
        let mut refusal = None;
        let _ = expr.apply(|e| {
            match e {
                Expr::ScalarSubquery(_)
                | Expr::InSubquery(_)
                | Expr::Exists(_)
                | Expr::SetComparison(_)
                | Expr::OuterReferenceColumn(..) => {
                    refusal = Some(self.shape("subqueries are not accepted in a fragment"));
                }
                Expr::Literal(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)),
                    _,
                ) if s.chars().count() > self.policy.max_string_literal => {
                    refusal = Some(Refusal {
                        rule: "string_literal",
                        message: format!(
                            "policy: station '{}' accepts string literals of at most {} \
                             characters; the fragment has one of {}",
                            self.station,
                            self.policy.max_string_literal,
                            s.chars().count()
                        ),
                    });
                }
                _ => {}
            }
            Ok(if refusal.is_some() {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        });
        refusal.map_or(Ok(()), Err)
    }

    /// Accepts `pseudonym(key)` only over the table's `join_key` column, unchanged.
    fn pseudonym(&mut self, key: &Expr, input: &[(Column, Lineage)]) -> Result<(), Refusal> {
        let wrong = |checker: &Self| Refusal {
            rule: "join_key",
            message: format!(
                "policy: station '{}' computes {PSEUDONYM}() only of table '{}''s join_key \
                 column, unchanged",
                checker.station, checker.table
            ),
        };
        let Expr::Column(c) = key else {
            return Err(wrong(self));
        };
        let Some(lineage) = find(input, c) else {
            return Err(self.shape(&format!("column '{}' cannot be traced", c.name)));
        };
        let Some(base) = lineage.bases.iter().next() else {
            return Err(wrong(self));
        };
        if !lineage.direct
            || lineage.bases.len() != 1
            || self.visibility(base) != Visibility::JoinKey
        {
            return Err(wrong(self));
        }
        self.pseudonymized = true;
        Ok(())
    }

    /// Refuses a column that may never appear, whatever the fragment does with it.
    fn forbidden(&self, column: &str) -> Result<(), Refusal> {
        let (rule, why) = match self.visibility(column) {
            Visibility::Public | Visibility::Aggregate => return Ok(()),
            Visibility::Dp if self.dp => return Ok(()),
            Visibility::Hidden => ("hidden_column", "it cannot be used in any query"),
            Visibility::JoinKey => (
                "join_key_column",
                "it leaves a station only as a keyed pseudonym for linking tables",
            ),
            Visibility::Dp => (
                "dp_column",
                "it can only be used in differentially private aggregates",
            ),
        };
        Err(self.column_refusal(rule, column, why))
    }

    fn first_non_public<'b>(
        &self,
        columns: impl IntoIterator<Item = &'b String>,
    ) -> Option<String> {
        columns
            .into_iter()
            .find(|c| self.visibility(c) != Visibility::Public)
            .cloned()
    }

    /// Checks one aggregate call; returns the lineage of its value (its arguments' columns).
    fn aggregate_call(
        &mut self,
        call: &AggregateFunction,
        input: &[(Column, Lineage)],
        schema: &DFSchema,
    ) -> Result<Lineage, Refusal> {
        let (name, distinct) = match call.func.inner().downcast_ref::<PartialAggregate>() {
            Some(partial) => (partial.inner().name().to_string(), partial.is_distinct()),
            None => (call.func.name().to_string(), call.params.distinct),
        };
        if call.func.inner().is::<PartialAggregate>()
            && matches!(name.as_str(), GLM_TERMS | SURVIVAL_TERMS)
        {
            return Err(self.shape(&format!("{name}() is not split into partial states")));
        }
        let mut args = Vec::with_capacity(call.params.args.len());
        for arg in &call.params.args {
            args.push((arg, self.lineage(arg, input, schema)?.bases));
        }
        let value = Lineage {
            bases: args.iter().flat_map(|(_, b)| b.iter().cloned()).collect(),
            ..Lineage::default()
        };
        if matches!(name.as_str(), GLM_TERMS | SURVIVAL_TERMS) {
            self.model_call(&name, call, input)?;
            return Ok(value);
        }
        let mut arg_bases = value.bases.clone();
        for sort in &call.params.order_by {
            arg_bases.extend(self.lineage(&sort.expr, input, schema)?.bases);
        }
        if let Some(filter) = &call.params.filter {
            let bases = self.lineage(filter, input, schema)?.bases;
            if let Some(c) = self.first_non_public(&bases) {
                return Err(self.column_refusal(
                    "aggregate_filter",
                    &c,
                    "an aggregate's FILTER clause would select a sub-group the group-size \
                     threshold does not count; filter with WHERE or split with GROUP BY instead",
                ));
            }
        }
        let Some(column) = self.first_non_public(&arg_bases) else {
            return Ok(value);
        };
        if distinct {
            return Err(self.column_refusal(
                "distinct_aggregate",
                &column,
                &format!("{name}(DISTINCT …) would release the station's set of distinct values"),
            ));
        }
        if !call.params.order_by.is_empty() {
            return Err(self.column_refusal(
                "ordering",
                &column,
                &format!("{name}() with ORDER BY would pick values by their rank"),
            ));
        }
        if !SAFE_AGGREGATES.contains(&name.as_str()) {
            let why = match name.as_str() {
                "min" | "max" | "first_value" | "last_value" | "nth_value" => {
                    format!("{name}() would release a single value")
                }
                "array_agg" | "string_agg" => format!("{name}() would release every value"),
                n if n.contains("median") || n.contains("percentile") || n.contains("quantile") => {
                    format!("{name}() would release an individual value")
                }
                _ => format!("{name}() is not one of the station's disclosure-safe aggregates"),
            };
            return Err(self.column_refusal("unsafe_aggregate", &column, &why));
        }
        for (arg, bases) in &args {
            if let Some(c) = self.first_non_public(bases)
                && (bases.len() > 1 || !affine(arg))
            {
                return Err(self.column_refusal(
                    "aggregate_argument",
                    &c,
                    &format!(
                        "inside {name}() it may only be scaled or shifted (a*x + b): other \
                         expressions can make a single patient's value dominate the result"
                    ),
                ));
            }
        }
        Ok(value)
    }

    /// Checks the arguments of a model aggregate: table columns used unchanged (a GLM
    /// covariate may also be a level indicator `column = literal`), and literals for
    /// everything else. Records what the call asks for; the release rules are applied once
    /// the whole fragment is known.
    fn model_call(
        &mut self,
        name: &str,
        call: &AggregateFunction,
        input: &[(Column, Lineage)],
    ) -> Result<(), Refusal> {
        if self.model.is_some() {
            return Err(self.shape(&format!("{name}() may appear once in a fragment")));
        }
        if call.params.distinct || call.params.filter.is_some() || !call.params.order_by.is_empty()
        {
            return Err(self.shape(&format!("{name}() takes no DISTINCT, FILTER or ORDER BY")));
        }
        let args = &call.params.args;
        let column = |e: &Expr| plain_column(e, input).map(|_| ());
        let not_column = |i: usize| {
            self.shape(&format!(
                "argument {} of {name}() must be a column of the table, unchanged",
                i + 1
            ))
        };
        let not_literal =
            |i: usize| self.shape(&format!("argument {} of {name}() must be a literal", i + 1));
        let model = if name == GLM_TERMS {
            let family = match args.first().and_then(literal) {
                Some(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)),
                ) => Family::parse(&s),
                _ => None,
            };
            if family.is_none() {
                return Err(self.shape(&format!(
                    "{name}() needs a literal family: 'gaussian', 'binomial' or 'poisson'"
                )));
            }
            let Some(ScalarValue::Boolean(Some(intercept))) = args.get(1).and_then(literal) else {
                return Err(not_literal(1));
            };
            let Some(p) = glm_covariates(args.len(), intercept) else {
                return Err(self.shape(&format!(
                    "{name}() needs as many coefficients as design columns"
                )));
            };
            column(&args[2]).ok_or_else(|| not_column(2))?;
            for (j, x) in args[3..3 + p].iter().enumerate() {
                if column(x).is_some() {
                    continue;
                }
                let indicator = match x {
                    Expr::BinaryExpr(BinaryExpr {
                        left,
                        op: Operator::Eq,
                        right,
                    }) => {
                        (column(left).is_some() && literal(right).is_some())
                            || (column(right).is_some() && literal(left).is_some())
                    }
                    _ => false,
                };
                if !indicator {
                    return Err(self.shape(&format!(
                        "argument {} of {name}() must be a column of the table, unchanged, or \
                         a level indicator `column = literal`",
                        j + 4
                    )));
                }
            }
            for (i, b) in args.iter().enumerate().skip(3 + p) {
                if literal(b).and_then(|v| number(&v)).is_none() {
                    return Err(not_literal(i));
                }
            }
            ModelCall::Glm {
                parameters: p + usize::from(intercept),
            }
        } else {
            let Some(p) = survival_covariates(args.len()) else {
                return Err(self.shape(&format!(
                    "{name}() needs as many coefficients as covariates"
                )));
            };
            for i in (0..2).chain(5..5 + p) {
                column(&args[i]).ok_or_else(|| not_column(i))?;
            }
            let mut literals = Vec::new();
            for i in (2..5).chain(5 + p..args.len()) {
                literals.push(
                    literal(&args[i])
                        .and_then(|v| number(&v))
                        .ok_or_else(|| not_literal(i))?,
                );
            }
            ModelCall::Survival {
                covariates: p,
                resolution: literals[0],
                min_rows: literals[1],
                min_events: literals[2],
            }
        };
        self.model = Some(model);
        Ok(())
    }
}

/// The value of a literal argument (also a negated or cast literal).
fn literal(e: &Expr) -> Option<ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v.clone()),
        Expr::Negative(inner) => literal(inner)?.arithmetic_negate().ok(),
        Expr::Cast(c) => literal(&c.expr)?.cast_to(c.field.data_type()).ok(),
        _ => None,
    }
}

/// A literal as a finite number.
fn number(v: &ScalarValue) -> Option<f64> {
    match v.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(x)) if x.is_finite() => Some(x),
        _ => None,
    }
}

/// Scalar functions that return a value (or NULL) for every input, so whether they fail
/// cannot depend on the data.
const TOTAL_FUNCTIONS: &[&str] = &[
    "date_part",
    "datepart",
    "extract",
    "date_trunc",
    "datetrunc",
    "floor",
    "ceil",
    "round",
    "trunc",
    "signum",
    "isnan",
    "iszero",
    "coalesce",
    "nullif",
    "nvl",
    "ifnull",
    "greatest",
    "least",
    "lower",
    "upper",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "substr",
    "substring",
    "left",
    "right",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "concat_ws",
    "starts_with",
    "ends_with",
    "strpos",
];

/// Names the first part of `expr` over data whose evaluation can fail for particular
/// values (a division by a column that may be zero, a cast that may not parse, a function
/// outside [`TOTAL_FUNCTIONS`]). Whether a fragment fails is itself a release: a query could
/// make the station fail exactly when one patient has some value.
fn fallible(expr: &Expr, schema: &DFSchema) -> Option<String> {
    let mut found = None;
    let _ = expr.apply(|e| {
        if e.column_refs().is_empty() {
            // Column-free: fails the same way whatever the data.
            return Ok(TreeNodeRecursion::Jump);
        }
        let bad = match e {
            Expr::Column(_)
            | Expr::Alias(_)
            | Expr::Not(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsTrue(_)
            | Expr::IsFalse(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNotFalse(_)
            | Expr::IsNotUnknown(_)
            | Expr::Negative(_)
            | Expr::Between(_)
            | Expr::Case(_)
            | Expr::TryCast(_)
            | Expr::InList(_)
            | Expr::Like(_)
            | Expr::SimilarTo(_)
            | Expr::AggregateFunction(_) => None,
            Expr::BinaryExpr(BinaryExpr { op, right, .. }) => match op {
                Operator::Divide | Operator::Modulo => {
                    let nonzero = match right.as_ref() {
                        Expr::Literal(v, _) => {
                            !v.is_null()
                                && ScalarValue::new_zero(&v.data_type()).is_ok_and(|z| &z != v)
                        }
                        _ => false,
                    };
                    (!nonzero).then(|| format!("'{op}' by anything but a non-zero constant"))
                }
                Operator::Eq
                | Operator::NotEq
                | Operator::Lt
                | Operator::LtEq
                | Operator::Gt
                | Operator::GtEq
                | Operator::And
                | Operator::Or
                | Operator::IsDistinctFrom
                | Operator::IsNotDistinctFrom
                | Operator::Plus
                | Operator::Minus
                | Operator::Multiply
                | Operator::LikeMatch
                | Operator::ILikeMatch
                | Operator::NotLikeMatch
                | Operator::NotILikeMatch
                | Operator::StringConcat => None,
                other => Some(format!("the operator '{other}'")),
            },
            Expr::Cast(c) => match c.expr.get_type(schema) {
                Ok(from) if lossless_cast(&from, c.field.data_type()) => None,
                _ => Some(format!("CAST(… AS {})", c.field.data_type())),
            },
            Expr::ScalarFunction(f) => {
                let name = f.func.name();
                (!TOTAL_FUNCTIONS.contains(&name)).then(|| format!("{name}()"))
            }
            other => Some(other.variant_name().to_string()),
        };
        if bad.is_some() {
            found = bad;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Casts that succeed for every value of `from`.
fn lossless_cast(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let rank = |t: &DataType| match t {
        Int8 => Some((true, 1)),
        Int16 => Some((true, 2)),
        Int32 => Some((true, 4)),
        Int64 => Some((true, 8)),
        UInt8 => Some((false, 1)),
        UInt16 => Some((false, 2)),
        UInt32 => Some((false, 4)),
        UInt64 => Some((false, 8)),
        _ => None,
    };
    if from == to || matches!(to, Utf8 | LargeUtf8 | Utf8View) {
        return true;
    }
    match (from, to) {
        (_, Float64 | Float32) => from.is_numeric(),
        (Boolean, _) => to.is_integer(),
        (Date32, Date64 | Timestamp(..)) => true,
        (Decimal128(p, s), Decimal128(q, t)) => {
            t >= s && i16::from(*q) - i16::from(*t) >= i16::from(*p) - i16::from(*s)
        }
        _ => match (rank(from), rank(to)) {
            (Some((fs, fw)), Some((ts, tw))) => (fs == ts && tw >= fw) || (!fs && ts && tw > fw),
            _ => false,
        },
    }
}

/// Whether `expr` is an affine function of (at most) one column: the column, literals,
/// casts, negation, `+` and `-`, and `*` or `/` by a column-free factor.
fn affine(expr: &Expr) -> bool {
    let constant = |e: &Expr| e.column_refs().is_empty();
    match expr {
        Expr::Column(_) | Expr::Literal(..) => true,
        Expr::Alias(a) => affine(&a.expr),
        Expr::Cast(c) => affine(&c.expr),
        Expr::TryCast(c) => affine(&c.expr),
        Expr::Negative(e) => affine(e),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Plus | Operator::Minus => affine(left) && affine(right),
            Operator::Multiply => {
                (constant(left) && affine(right)) || (constant(right) && affine(left))
            }
            Operator::Divide => constant(right) && affine(left),
            _ => false,
        },
        _ => false,
    }
}

/// Refuses `ORDER BY` and `LIMIT` in row-level fragments whose rows are not released as
/// they are (`what`): they would select rows by their values.
fn no_ordering(chain: &[&LogicalPlan], station: &str, what: &str) -> Result<(), Refusal> {
    if chain
        .iter()
        .any(|n| matches!(n, LogicalPlan::Sort(_) | LogicalPlan::Limit(_)))
    {
        return Err(Refusal {
            rule: "ordering",
            message: format!(
                "policy: station '{station}' refuses ORDER BY and LIMIT in {what}: they would \
                 select rows by their values"
            ),
        });
    }
    Ok(())
}

/// Checks a fragment's (unoptimized) logical plan against `policy`.
pub fn check(plan: &LogicalPlan, policy: &Policy, station: &str) -> Result<Checked, Refusal> {
    check_for(plan, policy, station, false)
}

/// Checks the input of a containerized train: rows of one table, as a row-level fragment,
/// but over `public` and `aggregate` columns (they stay at the station); `hidden`, `dp` and
/// `join_key` columns are refused as anywhere else.
pub fn check_train_input(
    plan: &LogicalPlan,
    policy: &Policy,
    station: &str,
) -> Result<Checked, Refusal> {
    check_for(plan, policy, station, true)
}

fn check_for(
    plan: &LogicalPlan,
    policy: &Policy,
    station: &str,
    train_input: bool,
) -> Result<Checked, Refusal> {
    // The fragment as a chain, top to bottom.
    let mut chain = vec![plan];
    loop {
        let node = chain[chain.len() - 1];
        match node.inputs().as_slice() {
            [] => break,
            [one] => chain.push(one),
            _ => {
                return Err(Refusal {
                    rule: "fragment_shape",
                    message: format!(
                        "policy: station '{station}' refuses the fragment: it must read one \
                         table without joins or unions"
                    ),
                });
            }
        }
    }
    let LogicalPlan::TableScan(scan) = chain[chain.len() - 1] else {
        return Err(Refusal {
            rule: "fragment_shape",
            message: format!("policy: station '{station}' refuses the fragment: it reads no table"),
        });
    };
    let mut checker = Checker {
        policy,
        station,
        table: scan.table_name.table().to_string(),
        used: BTreeSet::new(),
        model: None,
        pseudonymized: false,
        dp: false,
    };
    let aggregate_at = chain
        .iter()
        .position(|n| matches!(n, LogicalPlan::Aggregate(_)));
    if chain
        .iter()
        .filter(|n| matches!(n, LogicalPlan::Aggregate(_)))
        .count()
        > 1
    {
        return Err(checker.shape("it may aggregate only once"));
    }

    // A train's input is rows (refused below if it aggregates): never a DP release.
    checker.dp = !train_input
        && aggregate_at.is_some_and(|at| match chain[at] {
            LogicalPlan::Aggregate(agg) => agg.aggr_expr.iter().any(|e| dp_call_of(e).is_some()),
            _ => false,
        });
    if checker.dp && policy.dp.is_none() {
        return Err(Refusal {
            rule: "dp",
            message: format!(
                "policy: station '{station}' answers no differentially private aggregates \
                 (its policy has no [dp] budget)"
            ),
        });
    }
    let mut dp_calls = Vec::new();
    let mut dp_input = Vec::new();

    // Lineage, bottom-up.
    let mut lineage: Vec<(Column, Lineage)> = Vec::new();
    for (depth, node) in chain.iter().enumerate().rev() {
        let above_aggregate = aggregate_at.is_some_and(|a| depth < a);
        for e in node.expressions() {
            checker.literals(&e)?;
        }
        lineage = match node {
            LogicalPlan::TableScan(scan) => {
                let full = datafusion::common::DFSchema::try_from_qualified_schema(
                    scan.table_name.clone(),
                    scan.source.schema().as_ref(),
                )
                .map_err(|_| checker.shape("its table schema cannot be read"))?;
                let mut out: Vec<(Column, Lineage)> = full
                    .columns()
                    .into_iter()
                    .map(|c| {
                        let bases = BTreeSet::from([c.name.clone()]);
                        (
                            c,
                            Lineage {
                                bases,
                                direct: true,
                                pseudonym: false,
                            },
                        )
                    })
                    .collect();
                for f in &scan.filters {
                    checker.lineage(f, &out, &full)?;
                }
                if let Some(projection) = &scan.projection {
                    out = projection
                        .iter()
                        .filter_map(|i| out.get(*i).cloned())
                        .collect();
                }
                out
            }
            LogicalPlan::Filter(filter) => {
                if above_aggregate {
                    return Err(checker.shape("HAVING is not accepted in an aggregate fragment"));
                }
                checker.lineage(&filter.predicate, &lineage, filter.input.schema())?;
                lineage
            }
            LogicalPlan::Projection(p) => {
                // Above the aggregate only renaming: an expression over a group's results
                // (e.g. one that fails when count(*) = 1) would act before the threshold.
                if above_aggregate
                    && !p
                        .expr
                        .iter()
                        .all(|e| matches!(e.clone().unalias_nested().data, Expr::Column(_)))
                {
                    return Err(checker.shape(
                        "expressions over aggregate results are computed at the hub; \
                         a fragment may only name them",
                    ));
                }
                let mut out = Vec::new();
                for (e, c) in p.expr.iter().zip(p.schema.columns()) {
                    if let Some(key) = pseudonym_argument(e) {
                        checker.pseudonym(key, &lineage)?;
                        // A pseudonym carries no column's values: it uses none.
                        let l = Lineage {
                            pseudonym: true,
                            ..Lineage::default()
                        };
                        out.push((c, l));
                        continue;
                    }
                    let mut l = checker.lineage(e, &lineage, p.input.schema())?;
                    let source = match e.clone().unalias() {
                        Expr::Column(source) => find(&lineage, &source),
                        _ => None,
                    };
                    l.direct = source.is_some_and(|s| s.direct);
                    l.pseudonym = source.is_some_and(|s| s.pseudonym);
                    out.push((c, l));
                }
                out
            }
            LogicalPlan::SubqueryAlias(a) => a
                .schema
                .columns()
                .into_iter()
                .zip(lineage.into_iter().map(|(_, l)| l))
                .collect(),
            LogicalPlan::Aggregate(agg) => {
                let mut out = Vec::new();
                let columns = agg.schema.columns();
                for (e, c) in agg.group_expr.iter().zip(columns.iter()) {
                    out.push((c.clone(), checker.lineage(e, &lineage, agg.input.schema())?));
                }
                if matches!(agg.group_expr.as_slice(), [Expr::GroupingSet(_)]) {
                    return Err(checker
                        .shape("GROUPING SETS are merged at the hub; send the finest grouping"));
                }
                if checker.dp {
                    dp_input.clone_from(&lineage);
                    for e in &agg.aggr_expr {
                        let call = checker.dp_call(e, &lineage, agg.input.schema())?;
                        out.push((columns[out.len()].clone(), call.lineage()));
                        dp_calls.push(call);
                    }
                    lineage = out;
                    continue;
                }
                for e in &agg.aggr_expr {
                    let call = match e {
                        Expr::Alias(a) => a.expr.as_ref(),
                        other => other,
                    };
                    let Expr::AggregateFunction(f) = call else {
                        return Err(checker.shape("an aggregate output is not an aggregate call"));
                    };
                    let value = checker.aggregate_call(f, &lineage, agg.input.schema())?;
                    out.push((columns[out.len()].clone(), value));
                }
                out
            }
            LogicalPlan::Sort(s) => {
                if aggregate_at.is_some() {
                    return Err(Refusal {
                        rule: "ordering",
                        message: format!(
                            "policy: station '{station}' refuses ORDER BY in an aggregate \
                             fragment: it would select rows by their values"
                        ),
                    });
                }
                for e in &s.expr {
                    checker.lineage(&e.expr, &lineage, s.input.schema())?;
                }
                lineage
            }
            LogicalPlan::Limit(_) => {
                if aggregate_at.is_some() {
                    return Err(Refusal {
                        rule: "ordering",
                        message: format!(
                            "policy: station '{station}' refuses LIMIT in an aggregate \
                             fragment: it would select which rows are aggregated"
                        ),
                    });
                }
                lineage
            }
            LogicalPlan::Distinct(_) => {
                return Err(checker.shape("SELECT DISTINCT is not accepted; use GROUP BY"));
            }
            other => {
                return Err(checker.shape(&format!(
                    "{} is not accepted in a fragment",
                    other.display()
                )));
            }
        };
    }

    let table = checker.table.clone();
    if checker.dp {
        let at = aggregate_at.expect("a DP fragment has an aggregate");
        return dp_release(&checker, plan, &chain, at, &dp_input, dp_calls);
    }
    if train_input {
        if aggregate_at.is_some() || checker.pseudonymized {
            return Err(
                checker.shape("a train's input is rows of one table (aggregate inside the train)")
            );
        }
        if policy.joined(&table) {
            return Err(Refusal {
                rule: "row_level",
                message: format!(
                    "policy: table '{table}' at station '{station}' is a join of several \
                     stations' rows; no train reads it"
                ),
            });
        }
        // As in an aggregate, ordering would pick rows by their values (the k oldest), and
        // an expression over a non-public column could single out one row among all of
        // them (CASE WHEN … THEN 1000 ELSE age END); a train reads such columns as they are.
        no_ordering(&chain, station, "a train's input")?;
        for (_, l) in &lineage {
            if !l.direct
                && let Some(c) = checker.first_non_public(&l.bases)
            {
                return Err(checker.column_refusal(
                    "train_input",
                    &c,
                    "a train reads it only as it is, not inside an expression",
                ));
            }
        }
        return Ok(Checked {
            plan: plan.clone(),
            release: Release::TrainInput {
                k: policy.min_group_size(&table),
            },
            table,
        });
    }
    if checker.pseudonymized {
        // The pseudonym must be released: without it the rows are plain row-level values.
        if !lineage.iter().any(|(_, l)| l.pseudonym) {
            return Err(checker.shape("a pseudonymized fragment must output the pseudonym"));
        }
        return pseudonymized_release(&checker, plan, &chain, aggregate_at.is_some());
    }
    let joined = policy.joined(&table);
    let Some(at) = aggregate_at else {
        if joined {
            return Err(Refusal {
                rule: "row_level",
                message: format!(
                    "policy: table '{table}' at station '{station}' is a join of several \
                     stations' rows; only aggregates over at least {} of them leave it",
                    policy.min_group_size(&table)
                ),
            });
        }
        if let Some(c) = checker.first_non_public(&checker.used) {
            return Err(checker.column_refusal(
                "row_level",
                &c,
                "row-level values cannot leave the station; use it inside an aggregate",
            ));
        }
        return Ok(Checked {
            plan: plan.clone(),
            table,
            release: Release::Rows,
        });
    };
    let LogicalPlan::Aggregate(agg) = chain[at] else {
        unreachable!("aggregate_at points at an Aggregate");
    };
    // Over joined rows even the row count is a disclosure (how many patients the stations
    // share): k applies to an aggregate that names no column.
    let k = if joined || checker.first_non_public(&checker.used).is_some() {
        policy.min_group_size(&table)
    } else {
        1
    };
    if plan
        .schema()
        .fields()
        .iter()
        .any(|f| f.name() == ROWS_COLUMN)
    {
        return Err(checker.shape(&format!("the column name {ROWS_COLUMN} is reserved")));
    }
    let plan = with_row_count(&chain[..at], agg)
        .map_err(|e| checker.shape(&format!("the row count cannot be added ({e})")))?;
    let global = agg.group_expr.is_empty();
    let restricted = k > 1 || checker.first_non_public(&checker.used).is_some();
    let release = match checker.model.take() {
        None => Release::Groups { k, global },
        Some(model) => {
            if agg.aggr_expr.len() != 1 {
                return Err(
                    checker.shape("a model aggregate must be the fragment's only aggregate")
                );
            }
            model_release(&checker, model, k, global, restricted)?
        }
    };
    Ok(Checked {
        plan,
        table,
        release,
    })
}

/// A DP aggregate call of a fragment, as checked.
struct DpCall {
    kind: DpKind,
    /// The table column it reads (none for `dp_count(*)`).
    column: Option<String>,
    /// The argument expression (clamped before a sum).
    arg: Expr,
    /// The output name of the call.
    name: String,
}

impl DpCall {
    fn lineage(&self) -> Lineage {
        Lineage {
            bases: self.column.iter().cloned().collect(),
            ..Lineage::default()
        }
    }
}

/// The DP kind of an aggregate output, and whether it is the station half
/// (`partial_dp_*`).
fn dp_call_of(e: &Expr) -> Option<(DpKind, bool, &AggregateFunction)> {
    let call = match e {
        Expr::Alias(a) => a.expr.as_ref(),
        other => other,
    };
    let Expr::AggregateFunction(f) = call else {
        return None;
    };
    match f.func.inner().downcast_ref::<PartialAggregate>() {
        Some(partial) => dp_kind(partial.inner()).map(|k| (k, true, f)),
        None => dp_kind(&f.func).map(|k| (k, false, f)),
    }
}

/// A column of the table used unchanged (possibly cast): a DP argument or group key, or a
/// column argument of a model aggregate.
fn plain_column<'a>(e: &Expr, input: &'a [(Column, Lineage)]) -> Option<&'a String> {
    let e = match e {
        Expr::Cast(c) => c.expr.as_ref(),
        Expr::TryCast(c) => c.expr.as_ref(),
        other => other,
    };
    let Expr::Column(c) = e else { return None };
    find(input, c)
        .filter(|l| l.direct && l.bases.len() == 1 && !l.pseudonym)
        .and_then(|l| l.bases.iter().next())
}

impl Checker<'_> {
    /// Checks one aggregate call of a DP fragment: a station half of a DP aggregate, over a
    /// column used unchanged (or a literal, for a count), with bounds for a sum.
    fn dp_call(
        &mut self,
        e: &Expr,
        input: &[(Column, Lineage)],
        schema: &DFSchema,
    ) -> Result<DpCall, Refusal> {
        let Some((kind, partial, f)) = dp_call_of(e) else {
            return Err(Refusal {
                rule: "dp_mixed",
                message: format!(
                    "policy: station '{}' answers differentially private aggregates only on \
                     their own: an exact aggregate in the same fragment would bypass the noise",
                    self.station
                ),
            });
        };
        if !partial {
            return Err(self.shape(&format!(
                "{}() is computed by stations as {}{}() states",
                kind.name(),
                railyard_udfs::PARTIAL_PREFIX,
                kind.name()
            )));
        }
        let distinct_state = f
            .func
            .inner()
            .downcast_ref::<PartialAggregate>()
            .is_some_and(|p| p.is_distinct());
        if distinct_state
            || f.params.distinct
            || f.params.filter.is_some()
            || !f.params.order_by.is_empty()
        {
            return Err(self.shape(&format!(
                "{}() takes no DISTINCT, FILTER or ORDER BY",
                kind.name()
            )));
        }
        let [arg] = f.params.args.as_slice() else {
            return Err(self.shape(&format!("{}() takes one argument", kind.name())));
        };
        // The usual checks first: literals, forbidden columns, and no expression (a cast
        // included) that could fail on particular values.
        self.lineage(arg, input, schema)?;
        let column = match plain_column(arg, input) {
            Some(c) => {
                self.forbidden(c)?;
                self.used.insert(c.clone());
                Some(c.clone())
            }
            None if !kind.sums() && arg.column_refs().is_empty() && literal(arg).is_some() => None,
            None => {
                return Err(self.shape(&format!(
                    "the argument of {}() must be a column of the table, unchanged{}",
                    kind.name(),
                    if kind.sums() { "" } else { ", or *" }
                )));
            }
        };
        if kind.sums() {
            let c = column.as_deref().unwrap_or_default();
            if self
                .policy
                .dp_column(&self.table, c)
                .and_then(|d| d.bounds)
                .is_none()
            {
                return Err(self.column_refusal(
                    "dp_bounds",
                    c,
                    &format!(
                        "{}() needs its bounds (lower, upper) in the policy's [tables.{}.dp]",
                        kind.name(),
                        self.table
                    ),
                ));
            }
        }
        Ok(DpCall {
            kind,
            column,
            arg: arg.clone(),
            name: e.schema_name().to_string(),
        })
    }
}

/// The release of a DP fragment: the aggregate alone, with every summed argument clamped to
/// its bounds, the public key set of every group column, and where each output column of
/// the fragment comes from in the aggregate's output.
fn dp_release(
    checker: &Checker,
    plan: &LogicalPlan,
    chain: &[&LogicalPlan],
    at: usize,
    input_lineage: &[(Column, Lineage)],
    calls: Vec<DpCall>,
) -> Result<Checked, Refusal> {
    let LogicalPlan::Aggregate(agg) = chain[at] else {
        unreachable!("the DP aggregate is at its position");
    };
    let table = &checker.table;
    let input_schema = agg.input.schema();
    let mut groups = Vec::new();
    let mut cells: usize = 1;
    for g in &agg.group_expr {
        let column = plain_column(g, input_lineage).cloned();
        let keys = column.as_ref().and_then(|c| {
            let t = g.get_type(input_schema).ok()?;
            let keys = checker.policy.dp_column(table, c)?.keys.as_ref()?;
            keys.iter()
                .map(|k| k.to_scalar(&t))
                .collect::<Option<Vec<_>>>()
        });
        let (Some(column), Some(keys)) = (column, keys) else {
            let name = g.schema_name().to_string();
            return Err(Refusal {
                rule: "dp_keys",
                message: format!(
                    "policy: station '{}' groups differentially private aggregates of table \
                     '{table}' only by columns, unchanged, whose public keys its policy \
                     declares ([tables.{table}.dp] column = {{ keys = [...] }}); '{name}' is \
                     not one",
                    checker.station
                ),
            });
        };
        cells = cells.saturating_mul(keys.len());
        groups.push(crate::dp::DpGroup { column, keys });
    }
    if cells > crate::policy::MAX_DP_GROUPS {
        return Err(checker.shape(&format!(
            "a differentially private release has at most {} groups (key combinations)",
            crate::policy::MAX_DP_GROUPS
        )));
    }
    let mut aggregates = Vec::new();
    let mut exprs = Vec::new();
    for call in calls {
        let bound = match (&call.column, call.kind.sums()) {
            (Some(c), true) => {
                let (lower, upper) = checker
                    .policy
                    .dp_column(table, c)
                    .and_then(|d| d.bounds)
                    .expect("checked in dp_call");
                let x = cast(call.arg.clone(), DataType::Float64);
                // NULL and NaN are left out (like NULL in any sum); the rest is clamped.
                let clamped = when(
                    x.clone().is_null().or(isnan(x.clone())),
                    lit(ScalarValue::Float64(None)),
                )
                .when(x.clone().lt(lit(lower)), lit(lower))
                .when(x.clone().gt(lit(upper)), lit(upper))
                .otherwise(x)
                .map_err(|e| checker.shape(&format!("the bounds cannot be applied ({e})")))?;
                exprs.push((call.name.clone(), Some(clamped)));
                lower.abs().max(upper.abs())
            }
            _ => {
                exprs.push((call.name.clone(), None));
                1.0
            }
        };
        aggregates.push(crate::dp::DpAggregateSpec {
            kind: call.kind,
            column: call.column,
            bound,
        });
    }
    let aggr_expr = agg
        .aggr_expr
        .iter()
        .zip(exprs)
        .map(|(e, (name, clamped))| {
            let Some((_, _, f)) = dp_call_of(e) else {
                unreachable!("every call of a DP fragment is a DP call");
            };
            let mut f = f.clone();
            if let Some(clamped) = clamped {
                f.params.args = vec![clamped];
            }
            Expr::AggregateFunction(f).alias(name)
        })
        .collect::<Vec<_>>();
    let aggregate = Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr_expr)
        .map_err(|e| checker.shape(&format!("the bounds cannot be applied ({e})")))?;
    // Above the aggregate there are only renaming projections: trace each output column.
    let mut positions: Vec<usize> = (0..agg.schema.fields().len()).collect();
    for node in chain[..at].iter().rev() {
        if let LogicalPlan::Projection(p) = node {
            let mut next = Vec::with_capacity(p.expr.len());
            for e in &p.expr {
                let Expr::Column(c) = e.clone().unalias_nested().data else {
                    return Err(checker.shape("a DP fragment may only name its aggregates"));
                };
                let i =
                    p.input.schema().index_of_column(&c).map_err(|_| {
                        checker.shape(&format!("column '{}' cannot be traced", c.name))
                    })?;
                next.push(positions[i]);
            }
            positions = next;
        }
    }
    let release = crate::dp::DpRelease {
        table: table.clone(),
        groups,
        aggregates,
        aggregate_schema: Arc::new(aggregate.schema.as_arrow().clone()),
        output: positions,
        schema: Arc::new(plan.schema().as_arrow().clone()),
    };
    Ok(Checked {
        plan: LogicalPlan::Aggregate(aggregate),
        table: table.clone(),
        release: Release::Dp(Arc::new(release)),
    })
}

/// The release of a fragment that outputs `pseudonym(join_key)`: rows for a hub join.
fn pseudonymized_release(
    checker: &Checker,
    plan: &LogicalPlan,
    chain: &[&LogicalPlan],
    aggregates: bool,
) -> Result<Checked, Refusal> {
    let table = &checker.table;
    if aggregates {
        return Err(checker.shape(
            "pseudonyms are released row by row for a hub join, never inside an aggregate",
        ));
    }
    no_ordering(chain, checker.station, "a pseudonymized fragment")?;
    if !checker.policy.allow_vertical(table) {
        return Err(Refusal {
            rule: "allow_vertical",
            message: format!(
                "policy: station '{}' does not release table '{table}' for joins with other \
                 stations' columns (allow_vertical is off)",
                checker.station
            ),
        });
    }
    Ok(Checked {
        plan: plan.clone(),
        table: table.clone(),
        release: Release::Pseudonymized {
            k: checker.policy.min_group_size(table),
        },
    })
}

/// The argument of a `pseudonym(…)` output column, if `e` is one.
fn pseudonym_argument(e: &Expr) -> Option<&Expr> {
    let inner = match e {
        Expr::Alias(a) => a.expr.as_ref(),
        other => other,
    };
    match inner {
        Expr::ScalarFunction(f) if f.func.name() == PSEUDONYM => match f.args.as_slice() {
            [arg] => Some(arg),
            _ => None,
        },
        _ => None,
    }
}

/// The release of a model fragment, after checking what it asks for against the policy.
fn model_release(
    checker: &Checker,
    model: ModelCall,
    k: u64,
    global: bool,
    restricted: bool,
) -> Result<Release, Refusal> {
    let policy = checker.policy;
    let table = &checker.table;
    match model {
        ModelCall::Glm { .. } if !global => {
            Err(checker.shape("a model is fitted over the whole table: no GROUP BY"))
        }
        ModelCall::Glm { .. } | ModelCall::Survival { .. } if !restricted => {
            Ok(Release::Groups { k: 1, global })
        }
        ModelCall::Glm { parameters } => Ok(Release::Model {
            k,
            min_rows: policy.model_min_rows(table),
            parameters,
        }),
        ModelCall::Survival {
            covariates,
            resolution,
            min_rows,
            min_events,
        } => {
            let width = policy.survival_time_resolution(table);
            let needed_events = if covariates > 0 { k as f64 } else { 0.0 };
            if width > 0.0
                && (resolution < width || min_rows < k as f64 || min_events < needed_events)
            {
                return Err(Refusal {
                    rule: "survival_time_resolution",
                    message: format!(
                        "policy: station '{}' releases survival times of table '{table}' only \
                         floored to multiples of at least {width}, pooled to at least {k} rows{} \
                         per released time",
                        checker.station,
                        if covariates > 0 {
                            format!(" and no deaths or at least {k} deaths")
                        } else {
                            String::new()
                        }
                    ),
                });
            }
            Ok(Release::Survival {
                k: k.max(policy.model_min_rows(table)),
                global,
            })
        }
    }
}

/// Rebuilds the fragment with `count(*) AS __rows` added to its aggregate and carried
/// through every node above it as the last output column.
fn with_row_count(
    above: &[&LogicalPlan],
    agg: &Aggregate,
) -> datafusion::common::Result<LogicalPlan> {
    let mut aggr = agg.aggr_expr.clone();
    aggr.push(datafusion::functions_aggregate::count::count_all().alias(ROWS_COLUMN));
    let mut plan = LogicalPlan::Aggregate(Aggregate::try_new(
        Arc::clone(&agg.input),
        agg.group_expr.clone(),
        aggr,
    )?);
    for node in above.iter().rev() {
        let rows = {
            let schema = plan.schema();
            let i = schema.fields().len() - 1;
            Expr::Column(Column::from(schema.qualified_field(i)))
        };
        plan = match node {
            LogicalPlan::Projection(p) => {
                let mut exprs = p.expr.clone();
                exprs.push(rows);
                LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan))?)
            }
            LogicalPlan::SubqueryAlias(a) => {
                LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(Arc::new(plan), a.alias.clone())?)
            }
            other => {
                return datafusion::common::plan_err!("{} above an aggregate", other.display());
            }
        };
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;

    use super::*;

    async fn plan(sql: &str) -> LogicalPlan {
        let ctx = railyard_udfs::fragment_context().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("age", DataType::Int32, true),
            Field::new("inst", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ]));
        ctx.register_table(
            "lung",
            Arc::new(MemTable::try_new(schema, vec![vec![]]).unwrap()),
        )
        .unwrap();
        ctx.state().create_logical_plan(sql).await.unwrap()
    }

    fn policy() -> Policy {
        Policy::parse(
            "[tables.lung.columns]\ninst = \"public\"\nnote = \"hidden\"\n",
            "test",
        )
        .unwrap()
    }

    async fn rule(sql: &str) -> Result<Release, &'static str> {
        check(&plan(sql).await, &policy(), "s")
            .map(|c| c.release)
            .map_err(|r| {
                assert!(r.message.starts_with("policy: "), "{}", r.message);
                r.rule
            })
    }

    #[tokio::test]
    async fn dp_fragments_need_plain_columns_bounds_keys_and_no_fallible_casts() {
        let policy = Policy::parse(
            "[dp]\n[tables.lung.columns]\nage = \"dp\"\nnote = \"hidden\"\n\
             [tables.lung.dp]\nage = { lower = 30, upper = 90 }\ninst = { keys = [1, 2] }\n",
            "test",
        )
        .unwrap();
        let dp = |sql: &'static str| {
            let policy = policy.clone();
            async move {
                check(&plan(sql).await, &policy, "s")
                    .map(|c| c.release)
                    .map_err(|r| r.rule)
            }
        };
        for sql in [
            "SELECT inst AS g0, partial_dp_count(1) AS a0, partial_dp_avg(CAST(age AS DOUBLE)) AS a1 \
             FROM lung WHERE age > 60 GROUP BY inst",
            "SELECT a0 FROM (SELECT partial_dp_sum(age) AS a0 FROM lung)",
        ] {
            assert!(matches!(dp(sql).await, Ok(Release::Dp(_))), "{sql}");
        }
        for (sql, expected) in [
            // A cast that can fail on a value (a one-digit decimal of an age) is a side
            // channel, in an argument as anywhere else.
            (
                "SELECT partial_dp_count(CAST(age AS DECIMAL(1,0))) AS a FROM lung",
                "fallible_expression",
            ),
            (
                "SELECT partial_dp_sum(patient_id) AS a FROM lung",
                "dp_bounds",
            ),
            (
                "SELECT partial_dp_sum(age + 1) AS a FROM lung",
                "fragment_shape",
            ),
            (
                "SELECT patient_id, partial_dp_count(1) AS a FROM lung GROUP BY patient_id",
                "dp_keys",
            ),
            (
                "SELECT partial_dp_count(note) AS a FROM lung",
                "hidden_column",
            ),
            (
                "SELECT partial_dp_count(1) AS a, partial_count(age) AS b FROM lung",
                "dp_mixed",
            ),
            (
                "SELECT partial_distinct_dp_count(age) AS a FROM lung",
                "fragment_shape",
            ),
            ("SELECT dp_count(age) AS a FROM lung", "fragment_shape"),
            (
                "SELECT inst, partial_dp_count(1) AS a FROM lung GROUP BY inst HAVING inst > 1",
                "fragment_shape",
            ),
            (
                "SELECT partial_dp_count(1) AS a FROM lung ORDER BY 1",
                "ordering",
            ),
            ("SELECT count(age) FROM lung", "dp_column"),
        ] {
            assert_eq!(dp(sql).await.err(), Some(expected), "{sql}");
        }
        // No [dp] section: refused as such.
        assert_eq!(
            rule("SELECT partial_dp_count(1) AS a FROM lung")
                .await
                .err(),
            Some("dp")
        );
        // As a train's input a DP call is an aggregate like any other: refused, no panic,
        // and `dp` columns stay unreadable.
        let input = check_train_input(
            &plan("SELECT partial_dp_count(age) AS a FROM lung").await,
            &policy,
            "s",
        );
        assert_eq!(input.err().map(|r| r.rule), Some("dp_column"));
        let input = check_train_input(
            &plan("SELECT partial_dp_count(1) AS a FROM lung").await,
            &policy,
            "s",
        );
        assert_eq!(input.err().map(|r| r.rule), Some("fragment_shape"));
    }

    #[tokio::test]
    async fn a_train_reads_aggregate_columns_row_by_row_but_never_hidden_ones() {
        let train = |sql: &'static str| async move {
            check_train_input(&plan(sql).await, &policy(), "s")
                .map(|c| c.release)
                .map_err(|r| r.rule)
        };
        // Row-level over an aggregate column: refused as a release, accepted as a train's
        // input (it stays at the station), with the table's k.
        assert_eq!(rule("SELECT age FROM lung").await, Err("row_level"));
        for sql in [
            "SELECT age, inst FROM lung",
            "SELECT age AS years FROM lung WHERE inst > 2 AND age < 80",
            "SELECT age, inst * 2 AS i FROM lung",
        ] {
            assert_eq!(train(sql).await, Ok(Release::TrainInput { k: 5 }), "{sql}");
        }
        for (sql, expected) in [
            ("SELECT age FROM lung ORDER BY age LIMIT 10", "ordering"),
            ("SELECT age FROM lung LIMIT 10", "ordering"),
            ("SELECT age + 1 AS a FROM lung", "train_input"),
            (
                "SELECT CASE WHEN inst = 3 AND age = 61 THEN 1000 ELSE age END AS age FROM lung",
                "train_input",
            ),
            ("SELECT * FROM lung", "hidden_column"),
            ("SELECT age FROM lung WHERE note = 'x'", "hidden_column"),
            ("SELECT count(*) FROM lung", "fragment_shape"),
            (
                "SELECT a.age FROM lung a JOIN lung b ON a.inst = b.inst",
                "fragment_shape",
            ),
            (
                "SELECT CAST(age AS TINYINT) FROM lung",
                "fallible_expression",
            ),
        ] {
            assert_eq!(train(sql).await, Err(expected), "{sql}");
        }
    }

    #[tokio::test]
    async fn each_rule_refuses_its_shape() {
        let cases = [
            ("SELECT age FROM lung", "row_level"),
            ("SELECT inst FROM lung WHERE age > 3", "row_level"),
            ("SELECT note FROM lung", "hidden_column"),
            (
                "SELECT count(*) FROM lung WHERE note = 'x'",
                "hidden_column",
            ),
            ("SELECT min(age) FROM lung", "unsafe_aggregate"),
            ("SELECT partial_max(age) FROM lung", "unsafe_aggregate"),
            ("SELECT sum(age * age) FROM lung", "aggregate_argument"),
            ("SELECT sum(age * inst) FROM lung", "aggregate_argument"),
            ("SELECT count(DISTINCT age) FROM lung", "distinct_aggregate"),
            (
                "SELECT count(*) FILTER (WHERE age > 3) FROM lung",
                "aggregate_filter",
            ),
            (
                "SELECT sum(age / (age - 3)) FROM lung",
                "fallible_expression",
            ),
            (
                "SELECT count(*) FROM lung WHERE CAST(age AS TINYINT) = 1",
                "fallible_expression",
            ),
            (
                "SELECT inst, count(*) FROM lung GROUP BY inst HAVING count(*) > 1",
                "fragment_shape",
            ),
            (
                "SELECT count(*) FROM lung a JOIN lung b ON a.inst = b.inst",
                "fragment_shape",
            ),
        ];
        for (sql, expected) in cases {
            assert_eq!(rule(sql).await, Err(expected), "{sql}");
        }
    }

    #[tokio::test]
    async fn safe_fragments_pass_with_the_right_threshold() {
        assert_eq!(
            rule("SELECT inst FROM lung WHERE inst > 2").await,
            Ok(Release::Rows)
        );
        assert_eq!(
            rule("SELECT inst, count(*) FROM lung GROUP BY inst").await,
            Ok(Release::Groups {
                k: 1,
                global: false
            })
        );
        assert_eq!(
            rule(
                "SELECT inst, partial_avg(age * 2 + 1) AS a0 FROM lung WHERE age > 60 GROUP BY inst"
            )
            .await,
            Ok(Release::Groups {
                k: 5,
                global: false
            })
        );
        assert_eq!(
            rule("SELECT count(*) FROM lung WHERE CAST(age AS BIGINT) / 10 = 6").await,
            Ok(Release::Groups { k: 5, global: true })
        );
        // The row count is appended as the last column.
        let checked = check(
            &plan("SELECT inst AS g0, partial_sum(age) AS a0 FROM lung GROUP BY inst").await,
            &policy(),
            "s",
        )
        .unwrap();
        let fields = checked.plan.schema().fields().clone();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[2].name(), ROWS_COLUMN);
    }

    #[tokio::test]
    async fn pseudonymized_rows_need_the_join_key_and_an_opt_in() {
        let vertical = |extra: &str| {
            Policy::parse(
                &format!(
                    "[tables.lung]\n{extra}\n[tables.lung.columns]\npatient_id = \"join_key\"\n\
                     inst = \"public\"\nnote = \"hidden\"\n"
                ),
                "test",
            )
            .unwrap()
        };
        let run = |sql: &'static str, policy: Policy| async move {
            check(&plan(sql).await, &policy, "s")
                .map(|c| c.release)
                .map_err(|r| {
                    assert!(!r.message.contains("7"), "{}", r.message);
                    r.rule
                })
        };
        let on = || vertical("allow_vertical = true");
        let ok = "SELECT pseudonym(patient_id) AS p, age, inst FROM lung WHERE age > 60";
        assert_eq!(run(ok, on()).await, Ok(Release::Pseudonymized { k: 5 }));
        assert_eq!(run(ok, vertical("")).await, Err("allow_vertical"));
        assert_eq!(
            run(ok, vertical("allow_vertical = false")).await,
            Err("allow_vertical")
        );
        let refused = [
            ("SELECT patient_id, age FROM lung", "join_key_column"),
            (
                "SELECT pseudonym(patient_id) AS p, note FROM lung",
                "hidden_column",
            ),
            ("SELECT pseudonym(age) AS p FROM lung", "join_key"),
            (
                "SELECT pseudonym(patient_id + 1) AS p FROM lung",
                "join_key",
            ),
            (
                "SELECT pseudonym(patient_id) AS p FROM lung WHERE patient_id = 7",
                "join_key_column",
            ),
            (
                "SELECT pseudonym(patient_id) AS p, count(*) FROM lung GROUP BY pseudonym(patient_id)",
                "join_key_column",
            ),
            (
                "SELECT pseudonym(patient_id) AS p, age FROM lung ORDER BY age LIMIT 3",
                "ordering",
            ),
        ];
        for (sql, rule) in refused {
            assert_eq!(run(sql, on()).await, Err(rule), "{sql}");
        }
        // A pseudonym computed and then projected away leaves plain row-level values.
        assert_eq!(
            run(
                "SELECT age FROM (SELECT pseudonym(patient_id) AS p, age FROM lung)",
                on()
            )
            .await,
            Err("fragment_shape")
        );
        assert_eq!(
            run(
                "SELECT q, age FROM (SELECT pseudonym(patient_id) AS p, age FROM lung) AS s(q, age)",
                on()
            )
            .await,
            Ok(Release::Pseudonymized { k: 5 })
        );
        // Without a join_key column in the policy there is nothing to pseudonymize.
        assert_eq!(
            run("SELECT pseudonym(patient_id) AS p FROM lung", policy()).await,
            Err("join_key")
        );
    }

    #[tokio::test]
    async fn a_joined_table_releases_only_aggregates_with_k_even_without_columns() {
        let mut joined = policy();
        joined.tables.get_mut("lung").unwrap().joined = true;
        let run = |sql: &'static str, policy: Policy| async move {
            check(&plan(sql).await, &policy, "s")
                .map(|c| c.release)
                .map_err(|r| r.rule)
        };
        assert_eq!(
            run("SELECT count(*) FROM lung", policy()).await,
            Ok(Release::Groups { k: 1, global: true })
        );
        assert_eq!(
            run("SELECT count(*) FROM lung", joined.clone()).await,
            Ok(Release::Groups { k: 5, global: true })
        );
        assert_eq!(
            run(
                "SELECT inst, count(*) FROM lung GROUP BY inst",
                joined.clone()
            )
            .await,
            Ok(Release::Groups {
                k: 5,
                global: false
            })
        );
        assert_eq!(run("SELECT 1 FROM lung", policy()).await, Ok(Release::Rows));
        assert_eq!(
            run("SELECT 1 FROM lung", joined.clone()).await,
            Err("row_level")
        );
        assert_eq!(run("SELECT inst FROM lung", joined).await, Err("row_level"));
    }

    #[test]
    fn casts_that_cannot_fail() {
        assert!(lossless_cast(&DataType::Int32, &DataType::Int64));
        assert!(lossless_cast(&DataType::Int64, &DataType::Float64));
        assert!(lossless_cast(&DataType::UInt8, &DataType::Int16));
        assert!(lossless_cast(&DataType::Date32, &DataType::Utf8));
        assert!(!lossless_cast(&DataType::Int64, &DataType::Int32));
        assert!(!lossless_cast(&DataType::Utf8, &DataType::Int64));
        assert!(!lossless_cast(&DataType::Int64, &DataType::UInt64));
        assert!(lossless_cast(
            &DataType::Decimal128(4, 1),
            &DataType::Decimal128(20, 1)
        ));
        assert!(!lossless_cast(
            &DataType::Decimal128(20, 1),
            &DataType::Decimal128(4, 1)
        ));
    }
}
