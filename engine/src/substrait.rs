//! Substrait plans at the hub: a researcher's dataframe (the `railyard` Python package
//! compiles one with the `datafusion` package) arrives as a serialized Substrait `Plan`
//! instead of SQL text.
//!
//! ```text
//!   plan bytes ──limits──▶ prost decode ──▶ datafusion-substrait consumer ──▶ LogicalPlan
//!                (size)     (nesting ≤ 100)   (tables and functions resolved     │
//!                                              in the hub's federated session)    ▼
//!                              the same verify → federate → check at every station as SQL
//! ```
//!
//! The consumer resolves the plan's tables and functions in the hub's own session, so a plan
//! can name nothing a SQL statement could not, and what leaves a station is decided exactly
//! as for SQL: the planner writes each station's fragment as SQL, which the station
//! re-plans and checks against its own policy. Only the hub's limits on the statement's text
//! have no text to measure here; their counterparts are a byte limit (the same as for SQL),
//! the decoder's nesting limit (100 messages: a plan cannot be deep enough to run a
//! recursive walk out of stack, the limit `max_depth` guards for SQL), and counts on the
//! consumed plan: its relations (a union of thousands of table reads is 256 KiB, shallow,
//! and thousands of fragments at every station; SQL's `max_query_blocks` refuses it) and
//! its expressions (SQL's `max_tokens`).
//!
//! Substrait has no table aliases, so a consumed plan has none: a join's input that is an
//! aggregate, or an aggregate over another aggregate, is a derived table without a name.
//! SQL never plans that shape, and DataFusion's unparser, which writes each station's
//! fragment, writes it wrongly (the inner `GROUP BY` is lost, or the derived table is
//! unnamed). So every such derived table is given the alias SQL would require
//! ([`alias_derived_tables`]) before the plan is federated, and the answer keeps the plan's
//! own column names.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, Projection, SubqueryAlias};
use datafusion_substrait::logical_plan::consumer::from_substrait_plan;
use datafusion_substrait::substrait::proto::Plan;
use prost::Message;

use crate::error::{Error, Result};

/// The header that asks for a Substrait plan's `EXPLAIN FEDERATED` instead of its answer
/// (SQL says so in its text; a plan has no text to say it in).
pub const EXPLAIN_HEADER: &str = "x-railyard-explain";

/// The one value of [`EXPLAIN_HEADER`].
pub const EXPLAIN_FEDERATED: &str = "federated";

/// Decodes `bytes` and consumes the plan in `state` (the hub's federated session).
///
/// Every failure is the researcher's: a plan over the byte limit is refused with rule
/// `query_too_complex` (as a statement over it is), anything else that does not decode or
/// does not resolve is a bad request naming why.
pub async fn logical_plan(state: &SessionState, bytes: &[u8]) -> Result<LogicalPlan> {
    let limit = railyard_policy::limits::MAX_STATEMENT_BYTES;
    if bytes.len() > limit {
        return Err(Error::Limit(railyard_policy::Refusal {
            rule: railyard_policy::Rule::QueryTooComplex,
            message: format!(
                "policy: the hub refuses the Substrait plan: it has more than {limit} bytes \
                 (limit max_statement_bytes)"
            ),
        }));
    }
    if bytes.is_empty() {
        return Err(Error::BadRequest("the Substrait plan is empty".to_string()));
    }
    // prost refuses messages nested more than 100 deep while decoding, before any
    // recursive walk of ours or DataFusion's sees the plan.
    let plan = Plan::decode(bytes).map_err(|e| {
        let text = e.to_string();
        // The decoder's message names every level it passed through: hundreds of them for
        // a plan nested too deep.
        Error::BadRequest(if text.contains("recursion limit reached") {
            "the Substrait plan is nested more than 100 messages deep (the decoder's \
             recursion limit); a plan that deep is refused like a statement over max_depth"
                .to_string()
        } else {
            format!("the Substrait plan does not decode: {text}")
        })
    })?;
    let logical = from_substrait_plan(state, &plan).await.map_err(|e| {
        Error::BadRequest(format!(
            "the Substrait plan does not resolve in this hub's catalog: {}",
            e.strip_backtrace()
        ))
    })?;
    within_limits(&logical)?;
    let logical = alias_derived_tables(logical).map_err(|e| {
        Error::BadRequest(format!(
            "the Substrait plan cannot be planned here: {}",
            e.strip_backtrace()
        ))
    })?;
    if !logical.get_parameter_types()?.is_empty() {
        return Err(Error::BadRequest(
            "the Substrait plan has parameters: a plan is run with its values written in"
                .to_string(),
        ));
    }
    Ok(logical)
}

/// Most relations (table reads, value lists and joins) in one plan: SQL's
/// `max_query_blocks` counts a `SELECT` and its join once, where a plan has a read on each
/// side of the join and the join, so twice as many.
pub const MAX_RELATIONS: usize = 2 * railyard_policy::limits::MAX_QUERY_BLOCKS;

/// Most expression nodes in one plan (SQL's `max_tokens`).
pub const MAX_EXPRESSIONS: usize = railyard_policy::limits::MAX_TOKENS;

/// Refuses, with rule `query_too_complex`, a consumed plan over [`MAX_RELATIONS`] or
/// [`MAX_EXPRESSIONS`].
fn within_limits(plan: &LogicalPlan) -> Result<()> {
    let (mut relations, mut expressions) = (0usize, 0usize);
    plan.apply_with_subqueries(|node| {
        if matches!(
            node,
            LogicalPlan::TableScan(_)
                | LogicalPlan::Values(_)
                | LogicalPlan::EmptyRelation(_)
                | LogicalPlan::Join(_)
        ) {
            relations += 1;
        }
        node.apply_expressions(|e| {
            e.apply(|_| {
                expressions += 1;
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(TreeNodeRecursion::Continue)
    })?;
    let over = if relations > MAX_RELATIONS {
        format!(
            "it reads or joins more than {MAX_RELATIONS} relations (limit max_query_blocks, \
             counted per relation)"
        )
    } else if expressions > MAX_EXPRESSIONS {
        format!("it has more than {MAX_EXPRESSIONS} expression nodes (limit max_tokens)")
    } else {
        return Ok(());
    };
    Err(Error::Limit(railyard_policy::Refusal {
        rule: railyard_policy::Rule::QueryTooComplex,
        message: format!("policy: the hub refuses the Substrait plan: {over}"),
    }))
}

/// The plan with an alias (`__substrait_N`) on every derived table: each input of a join,
/// aggregate, window or `DISTINCT` that is itself a query block (an aggregate, window,
/// `DISTINCT`, union, sort or limit under any projections and filters), as a SQL statement
/// must name it. Columns above are requalified; the top keeps its names.
pub fn alias_derived_tables(plan: LogicalPlan) -> datafusion::common::Result<LogicalPlan> {
    let names: Vec<String> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut next = 0usize;
    let (aliased, _) = alias_inputs(plan, &mut next)?;
    let now = aliased.schema().fields().iter().map(|f| f.name());
    if now.eq(names.iter()) {
        return Ok(aliased);
    }
    let exprs = aliased
        .schema()
        .columns()
        .into_iter()
        .zip(names)
        .map(|(c, name)| Expr::Column(c).alias(name))
        .collect();
    Ok(LogicalPlan::Projection(Projection::try_new(
        exprs,
        Arc::new(aliased),
    )?))
}

/// A projection whose computed expressions are given names of their own: a Substrait
/// expression has no alias, the unparser writes an unaliased expression with no name while
/// a sort or filter above reads it by its name, and an alias equal to the expression's own
/// name is removed again by the optimizer. The names above change accordingly; the top of
/// the plan gets the original ones back ([`alias_derived_tables`]).
fn name_projections(
    plan: LogicalPlan,
    next: &mut usize,
) -> datafusion::common::Result<LogicalPlan> {
    let LogicalPlan::Projection(p) = plan else {
        return Ok(plan);
    };
    if p.expr
        .iter()
        .all(|e| matches!(e, Expr::Column(_) | Expr::Alias(_)))
    {
        return Ok(LogicalPlan::Projection(p));
    }
    let exprs = p
        .expr
        .iter()
        .map(|e| match e {
            Expr::Column(_) | Expr::Alias(_) => e.clone(),
            _ => {
                *next += 1;
                e.clone().alias(format!("__substrait_c{next}"))
            }
        })
        .collect();
    Ok(LogicalPlan::Projection(Projection::try_new(
        exprs, p.input,
    )?))
}

/// Whether `plan` is a query block of its own, which an operator above must read as a
/// derived table.
fn is_block(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Projection(p) => is_block(&p.input),
        LogicalPlan::Filter(f) => is_block(&f.input),
        // A join is not: SQL reads `a JOIN b` (or `a JOIN (b JOIN c)`) without naming it,
        // and the unparser writes a named one's semi joins wrongly.
        LogicalPlan::Aggregate(_)
        | LogicalPlan::Window(_)
        | LogicalPlan::Distinct(_)
        | LogicalPlan::Union(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_) => true,
        _ => false,
    }
}

/// [`alias_derived_tables`] below `plan`; returns the plan and how its output columns were
/// renamed (old → new). Only a node's own output is described: a node's expressions read
/// its inputs' columns alone, and two levels may hold different columns of one name (an
/// aggregate's `count(Int64(1))` over another's).
fn alias_inputs(
    plan: LogicalPlan,
    next: &mut usize,
) -> datafusion::common::Result<(LogicalPlan, HashMap<Column, Column>)> {
    let reads_blocks = matches!(
        plan,
        LogicalPlan::Join(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Distinct(_)
    );
    let mut renamed = HashMap::new();
    let mut inputs = Vec::new();
    for input in plan.inputs().into_iter().cloned() {
        let (mut input, mut below) = alias_inputs(input, next)?;
        if reads_blocks && is_block(&input) {
            *next += 1;
            let before = input.schema().columns();
            input = LogicalPlan::SubqueryAlias(SubqueryAlias::try_new(
                Arc::new(input),
                format!("__substrait_{next}"),
            )?);
            // The input's columns, under whatever name they had before it was renamed,
            // are now the alias's.
            let original: HashMap<Column, Column> =
                below.drain().map(|(old, new)| (new, old)).collect();
            for (column, new) in before.into_iter().zip(input.schema().columns()) {
                let old = original.get(&column).cloned().unwrap_or(column);
                below.insert(old, new);
            }
        }
        renamed.extend(below);
        inputs.push(input);
    }
    let before = plan.schema().columns();
    if renamed.is_empty() && !matches!(plan, LogicalPlan::Projection(_)) {
        return Ok((plan, renamed));
    }
    let exprs = plan
        .expressions()
        .into_iter()
        .map(|e| {
            e.transform(|e| match &e {
                Expr::Column(c) => match renamed.get(c) {
                    Some(new) => Ok(Transformed::yes(Expr::Column(new.clone()))),
                    None => Ok(Transformed::no(e)),
                },
                _ => Ok(Transformed::no(e)),
            })
            .map(|t| t.data)
        })
        .collect::<datafusion::common::Result<Vec<_>>>()?;
    let plan = name_projections(plan.with_new_exprs(exprs, inputs)?, next)?;
    // An expression's name follows the columns it reads: what the parent read by the old
    // name it reads by the new one.
    let own = before
        .into_iter()
        .zip(plan.schema().columns())
        .filter(|(old, new)| old != new)
        .collect();
    Ok((plan, own))
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::{CsvReadOptions, SessionContext};
    use datafusion_substrait::logical_plan::producer::to_substrait_plan;

    use super::*;

    /// Each query planned from SQL, sent through Substrait, consumed, and given its
    /// aliases answers as the SQL does, and its aliased plan survives the unparser that
    /// writes station fragments (it re-plans to the same answer).
    #[tokio::test]
    async fn aliased_plans_answer_as_their_sql_and_unparse() {
        let ctx = SessionContext::new();
        let lung = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/lung/full.csv");
        ctx.register_csv("lung", lung, CsvReadOptions::new())
            .await
            .expect("the lung file registers");
        let queries = [
            "SELECT sex, count(*), avg(age) FROM lung WHERE age > 60 GROUP BY sex ORDER BY sex",
            "WITH per_inst AS (SELECT inst, avg(age) AS mean_age, count(*) AS n FROM lung \
             GROUP BY inst) SELECT count(*), max(n), round(avg(mean_age), 6) FROM per_inst \
             WHERE n > 5",
            "SELECT l.sex, round(avg(t.n), 6) FROM lung l JOIN (SELECT inst, count(*) AS n \
             FROM lung GROUP BY inst) t ON t.inst = l.inst GROUP BY 1 ORDER BY 1",
            "SELECT count(*) FROM (SELECT DISTINCT inst, sex FROM lung) d",
            "WITH c AS (SELECT DISTINCT inst FROM lung WHERE age > 70) SELECT l.sex, \
             count(DISTINCT l.inst) AS n FROM lung l JOIN c ON c.inst = l.inst GROUP BY 1 \
             ORDER BY n DESC, 1 LIMIT 5",
            "SELECT max(k) FROM (SELECT inst, max(age) - min(age) AS k FROM lung GROUP BY inst \
             ORDER BY k DESC LIMIT 3) t",
        ];
        for sql in queries {
            let want = pretty_format_batches(&ctx.sql(sql).await.unwrap().collect().await.unwrap())
                .unwrap()
                .to_string();
            let plan = ctx.sql(sql).await.unwrap().logical_plan().clone();
            let bytes = to_substrait_plan(&plan, &ctx.state())
                .unwrap()
                .encode_to_vec();
            let logical = logical_plan(&ctx.state(), &bytes)
                .await
                .unwrap_or_else(|e| {
                    panic!("{sql}: {e}");
                });
            let names: Vec<_> = plan
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            let got_names: Vec<_> = logical
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            assert_eq!(got_names, names, "{sql}");
            let got = ctx.execute_logical_plan(logical.clone()).await.unwrap();
            let got = pretty_format_batches(&got.collect().await.unwrap())
                .unwrap()
                .to_string();
            assert_eq!(
                got.lines().skip(3).collect::<Vec<_>>(),
                want.lines().skip(3).collect::<Vec<_>>(),
                "{sql}"
            );
            let optimized = ctx.state().optimize(&logical).unwrap();
            let text = datafusion::sql::unparser::plan_to_sql(&optimized)
                .unwrap_or_else(|e| panic!("{sql}: unparse: {e}"))
                .to_string();
            let again = ctx
                .sql(&text)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {text}: {e}"));
            let again = pretty_format_batches(&again.collect().await.unwrap())
                .unwrap()
                .to_string();
            // The unparser may put the top ORDER BY inside a derived table: compare rows as
            // sets here (the hub sorts at the top itself; stations run what is below it).
            let rows = |t: &str| {
                let mut rows: Vec<String> = t.lines().skip(3).map(str::to_string).collect();
                rows.sort();
                rows
            };
            assert_eq!(rows(&again), rows(&want), "{sql}: {text}");
        }
    }
}
