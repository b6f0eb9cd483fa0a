//! Guards on the hub's own plan, between DataFusion's optimizer and the physical planner:
//! what the hub computes itself (on released values and constants) must not grow without
//! bound. Fragments are SQL text by then, checked by the stations.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::LogicalPlan;

/// Refuses an optimized plan holding a string constant over
/// [`MAX_STRING_BYTES`](railyard_udfs::capped::MAX_STRING_BYTES). The capped functions keep
/// each `repeat` within it, but `repeat('x', 65536) || repeat('x', 65536) || …` folds into
/// one constant of hundreds of megabytes, and broadcast to every row of a batch it would
/// build terabytes and abort the hub.
pub(crate) fn refuse_huge_constants(plan: &LogicalPlan) -> DfResult<()> {
    use datafusion::common::ScalarValue;
    let limit = railyard_udfs::capped::MAX_STRING_BYTES;
    let mut found = false;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let datafusion::logical_expr::Expr::Literal(v, _) = e {
                    let len = match v {
                        ScalarValue::Utf8(Some(s))
                        | ScalarValue::LargeUtf8(Some(s))
                        | ScalarValue::Utf8View(Some(s)) => s.len(),
                        ScalarValue::Binary(Some(b))
                        | ScalarValue::LargeBinary(Some(b))
                        | ScalarValue::BinaryView(Some(b)) => b.len(),
                        _ => 0,
                    };
                    found |= len > limit;
                }
                Ok(if found {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            })
        })
    })?;
    if found {
        return Err(DataFusionError::Execution(format!(
            "a string constant of more than {limit} bytes (limit max_string_bytes)"
        )));
    }
    Ok(())
}

/// Replaces `a || b` on strings in the hub's own projections and filters (fragments are
/// SQL text by now, planned by the stations) with the capped
/// [`string_concat`](railyard_udfs::capped::string_concat): a value of at most
/// `max_string_bytes` per `||`, where `s || s || s || s` through a few subqueries would
/// otherwise grow a string fourfold per level until the hub runs out of memory.
pub(crate) fn cap_string_concat(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, Operator};
    let capped = |e: Expr, schema: &datafusion::common::DFSchema| {
        e.transform_up(|e| match &e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::StringConcat,
                right,
            }) if e.get_type(schema).is_ok_and(|t| {
                matches!(
                    t,
                    arrow::datatypes::DataType::Utf8
                        | arrow::datatypes::DataType::LargeUtf8
                        | arrow::datatypes::DataType::Utf8View
                )
            }) && left.get_type(schema).ok() == right.get_type(schema).ok() =>
            {
                Ok(Transformed::yes(railyard_udfs::capped::string_concat(
                    left.as_ref().clone(),
                    right.as_ref().clone(),
                )))
            }
            _ => Ok(Transformed::no(e)),
        })
    };
    Ok(plan
        .transform_up_with_subqueries(|node| match node {
            LogicalPlan::Projection(p) => {
                let schema = Arc::clone(p.input.schema());
                let mut changed = false;
                let mut exprs = Vec::with_capacity(p.expr.len());
                for e in &p.expr {
                    let name = e.schema_name().to_string();
                    let new = capped(e.clone(), &schema)?;
                    changed |= new.transformed;
                    exprs.push(if new.transformed {
                        new.data.alias_if_changed(name)?
                    } else {
                        new.data
                    });
                }
                if !changed {
                    return Ok(Transformed::no(LogicalPlan::Projection(p)));
                }
                Ok(Transformed::yes(LogicalPlan::Projection(
                    datafusion::logical_expr::Projection::try_new(exprs, Arc::clone(&p.input))?,
                )))
            }
            LogicalPlan::Filter(f) => {
                let schema = Arc::clone(f.input.schema());
                let new = capped(f.predicate.clone(), &schema)?;
                if !new.transformed {
                    return Ok(Transformed::no(LogicalPlan::Filter(f)));
                }
                Ok(Transformed::yes(LogicalPlan::Filter(
                    datafusion::logical_expr::Filter::try_new(new.data, Arc::clone(&f.input))?,
                )))
            }
            other => Ok(Transformed::no(other)),
        })?
        .data)
}
