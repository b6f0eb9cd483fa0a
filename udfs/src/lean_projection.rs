//! Projections that run without DataFusion's per-run expression metrics.
//!
//! DataFusion 55's `ProjectionExec::execute` registers one timing metric per expression on
//! every run, each labelled with the expression's SQL text and alias, formatted afresh. A
//! plan that is kept and run again (a station's kept fragments, the hub's kept statements)
//! paid that formatting on every run: 6 % of a small 3-station aggregate's instructions,
//! more than evaluating the projections. Nothing in Railyard reads those metrics.
//!
//! [`without_metrics`] wraps each `ProjectionExec` of a planned (optimized) plan in a
//! [`LeanProjectionExec`], which evaluates the same expressions on the same batches into
//! the same schema, with the projection's own properties; only the metrics are not kept.
//! Plans that report metrics (`EXPLAIN ANALYZE`) are left as they are.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, Statistics};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::analyze::AnalyzeExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{
    ChildStats, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions, StatisticsArgs,
};
use futures::Stream;

/// `plan` with every projection run without per-run metrics, unless the plan reports its
/// metrics (it holds an `AnalyzeExec`).
pub fn without_metrics(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let mut analyzes = false;
    plan.apply(|node| {
        analyzes = node.downcast_ref::<AnalyzeExec>().is_some();
        Ok(if analyzes {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    if analyzes {
        return Ok(plan);
    }
    plan.transform_up(|node| {
        if node.downcast_ref::<ProjectionExec>().is_some() {
            Ok(Transformed::yes(
                Arc::new(LeanProjectionExec { inner: node }) as _,
            ))
        } else {
            Ok(Transformed::no(node))
        }
    })
    .map(|t| t.data)
}

/// A `ProjectionExec` run without its per-run expression metrics (see the module docs).
#[derive(Debug)]
pub struct LeanProjectionExec {
    /// The projection, always a `ProjectionExec`: its expressions, schema and properties.
    inner: Arc<dyn ExecutionPlan>,
}

impl LeanProjectionExec {
    fn projection(&self) -> &ProjectionExec {
        self.inner
            .downcast_ref::<ProjectionExec>()
            .expect("a lean projection wraps a ProjectionExec")
    }

    /// Wraps what the projection became (a projection again, or whatever DataFusion made
    /// of it).
    fn wrap(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        if plan.downcast_ref::<ProjectionExec>().is_some() {
            Arc::new(Self { inner: plan })
        } else {
            plan
        }
    }
}

impl DisplayAs for LeanProjectionExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "LeanProjectionExec: ")?;
        self.projection().fmt_as(t, f)
    }
}

impl ExecutionPlan for LeanProjectionExec {
    fn name(&self) -> &str {
        "LeanProjectionExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        self.inner.maintains_input_order()
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        self.inner.benefits_from_input_partitioning()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.inner.children()
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Self::wrap(
            Arc::clone(&self.inner).replace_children(children, options)?,
        ))
    }

    #[expect(
        deprecated,
        reason = "required by the trait; replace_children does the work"
    )]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Self::wrap(
            Arc::clone(&self.inner).with_new_children(children)?,
        ))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        self.inner.child_stats_requests(partition)
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        self.inner.statistics_from_inputs(input_stats, args)
    }

    fn supports_limit_pushdown(&self) -> bool {
        self.inner.supports_limit_pushdown()
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let projection = self.projection();
        Ok(Box::pin(Projecting {
            input: projection.input().execute(partition, context)?,
            exprs: projection
                .expr()
                .iter()
                .map(|e| Arc::clone(&e.expr))
                .collect(),
            schema: self.schema(),
        }))
    }
}

/// The projection of each batch of `input`.
struct Projecting {
    input: SendableRecordBatchStream,
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
}

impl Projecting {
    /// What `ProjectionExec` makes of `batch`: each expression evaluated to a column of the
    /// batch's length (a batch of no columns keeps its row count).
    fn project(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let rows = batch.num_rows();
        let columns = self
            .exprs
            .iter()
            .map(|e| e.evaluate(batch).and_then(|v| v.into_array_of_size(rows)))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &options,
        )?)
    }
}

impl Stream for Projecting {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.input
            .as_mut()
            .poll_next(cx)
            .map(|next| next.map(|batch| batch.and_then(|b| self.project(&b))))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.input.size_hint()
    }
}

impl RecordBatchStream for Projecting {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::physical_plan::collect;
    use datafusion::physical_plan::execution_plan::reset_plan_states;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// Projections of every kind (columns, renames, computed values, constants, a struct
    /// field, none at all) answer what DataFusion's own projection answers, run after run.
    #[tokio::test]
    async fn a_lean_plan_answers_what_the_plan_answers() {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
        ctx.sql(
            "CREATE TABLE t AS SELECT * FROM (VALUES \
             (1, 'a', 2.5, NULL), (2, 'b', NULL, 7), (3, NULL, -1.0, 8), (4, 'd', 0.0, 9)) \
             AS v(id, name, x, y)",
        )
        .await
        .unwrap();
        // (A plain choice of columns goes into the scan: no projection of its own.)
        let mut wrapped = 0;
        for sql in [
            "SELECT id, name FROM t ORDER BY id",
            "SELECT id * 2 AS double, upper(name) AS loud, x + y, 'k' AS k FROM t ORDER BY 1",
            "SELECT named_struct('a', id, 'b', x)['b'] AS b, id FROM t ORDER BY id",
            "SELECT name, count(*) AS n, sum(x) / count(y) AS r FROM t GROUP BY name ORDER BY name",
            "SELECT count(*) FROM (SELECT 1 FROM t)",
            "SELECT 1 AS one, now() IS NOT NULL AS set",
        ] {
            let plan = ctx
                .sql(sql)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            let mut lean = without_metrics(Arc::clone(&plan)).unwrap();
            lean.apply(|node| {
                wrapped += usize::from(node.downcast_ref::<LeanProjectionExec>().is_some());
                assert!(node.downcast_ref::<ProjectionExec>().is_none(), "{sql}");
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
            let want = collect(plan, ctx.task_ctx()).await.unwrap();
            // Run again as kept plans are: each run on a copy with its run state reset.
            for run in 0..3 {
                lean = reset_plan_states(lean).unwrap();
                let got = collect(Arc::clone(&lean), ctx.task_ctx()).await.unwrap();
                assert_eq!(got, want, "{sql}, run {run}");
            }
        }
        assert!(wrapped >= 5, "{wrapped} projections wrapped");
    }

    /// `EXPLAIN ANALYZE` reports the projections' metrics: its plan is left as it is.
    #[tokio::test]
    async fn a_plan_that_reports_metrics_keeps_them() {
        let ctx = SessionContext::new();
        let plan = ctx
            .sql("EXPLAIN ANALYZE SELECT 1 + 1 AS two")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let kept = without_metrics(Arc::clone(&plan)).unwrap();
        assert!(Arc::ptr_eq(&plan, &kept));
    }
}
