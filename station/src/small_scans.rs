//! DataFusion's filter pushdown, skipped for fragments that read only a little Parquet.
//!
//! Pushed into a Parquet scan, a filter becomes a pruning predicate: on every open of every
//! file the reader rewrites it against the file's schema, simplifies it, and builds the
//! statistics, page-index and Bloom-filter checks from it, to skip row groups and pages
//! that cannot match. For a scan of a few hundred kilobytes there is nothing worth
//! skipping, but the building stays: a sixth of a repeated GLM fit's instructions over
//! 65 KB files (issue 24). The filter itself runs above the scan either way (the
//! station's scans do not evaluate filters inside the reader), so what a fragment answers
//! does not change, only how much of the file is read to answer it.
//!
//! A fragment whose scans are all Parquet or CSV files adding up to at most
//! [`SMALL_SCAN_BYTES`] keeps its filters where the plan put them; any other fragment gets
//! the pushdown as before.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::SessionStateBuilder;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::filter_pushdown::FilterPushdown;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

/// Scans of at most this many bytes in all are read whole rather than pruned. Pruning
/// cost a GLM round about 800,000 instructions per file open (building the predicate
/// from its complete-case filter, then the statistics, page and Bloom-filter checks);
/// reading and decoding 256 KiB whole is a fraction of a millisecond, the most that
/// skipping the pruning can cost a fragment.
pub(crate) const SMALL_SCAN_BYTES: u64 = 256 * 1024;

/// `ctx` with DataFusion's first filter pushdown replaced by [`PushdownBeyondSmallScans`].
pub(crate) fn install(ctx: SessionContext) -> SessionContext {
    let state = ctx.state();
    let rules = state
        .physical_optimizers()
        .iter()
        .map(|rule| -> Arc<dyn PhysicalOptimizerRule + Send + Sync> {
            if rule.name() == FilterPushdown::new().name() {
                Arc::new(PushdownBeyondSmallScans {
                    inner: Arc::clone(rule),
                })
            } else {
                Arc::clone(rule)
            }
        })
        .collect();
    let state = SessionStateBuilder::new_from_existing(state)
        .with_physical_optimizer_rules(rules)
        .build();
    SessionContext::new_with_state(state)
}

/// Runs `inner` (filter pushdown) unless every scan of the plan reads files of at most
/// [`SMALL_SCAN_BYTES`] in all.
#[derive(Debug)]
pub(crate) struct PushdownBeyondSmallScans {
    inner: Arc<dyn PhysicalOptimizerRule + Send + Sync>,
}

impl PhysicalOptimizerRule for PushdownBeyondSmallScans {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if reads_at_most(&plan, SMALL_SCAN_BYTES)? {
            return Ok(plan);
        }
        self.inner.optimize(plan, config)
    }

    fn name(&self) -> &str {
        "FilterPushdown (beyond small scans)"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether every leaf of `plan` is a scan of files and all of them add up to at most
/// `limit` bytes (a plan with any other source, e.g. a PostgreSQL table, is not small).
fn reads_at_most(plan: &Arc<dyn ExecutionPlan>, limit: u64) -> Result<bool> {
    let mut total: u64 = 0;
    let mut small = true;
    plan.apply(|node| {
        if !node.children().is_empty() {
            return Ok(TreeNodeRecursion::Continue);
        }
        let files = node
            .downcast_ref::<DataSourceExec>()
            .and_then(|scan| scan.data_source().downcast_ref::<FileScanConfig>());
        match files {
            Some(config) => {
                for file in config.file_groups.iter().flat_map(|g| g.iter()) {
                    total = total.saturating_add(file.object_meta.size);
                }
                small = total <= limit;
            }
            None => small = false,
        }
        Ok(if small {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    })?;
    Ok(small)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use arrow::array::{Float64Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::physical_plan::{FileSource, ParquetSource};
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::prelude::ParquetReadOptions;

    /// A Parquet file of `rows` rows (x: 0, 1, 2, …; y: x / 2, NULL where x % 5 == 0).
    fn write(path: &std::path::Path, rows: i64) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("y", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(
                    (0..rows)
                        .map(|x| (x % 5 != 0).then_some(x as f64 / 2.0))
                        .collect::<Float64Array>(),
                ),
            ],
        )
        .unwrap();
        let mut writer =
            ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    /// Whether the plan's Parquet scan carries a predicate (for pruning).
    fn pruned(plan: &Arc<dyn ExecutionPlan>) -> bool {
        let mut found = false;
        plan.apply(|node| {
            if let Some(source) = node
                .downcast_ref::<DataSourceExec>()
                .and_then(|s| s.data_source().downcast_ref::<FileScanConfig>())
                .and_then(|c| c.file_source().downcast_ref::<ParquetSource>())
            {
                found |= source.filter().is_some();
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        found
    }

    const SQL: &str = "SELECT count(*), sum(y) FROM t WHERE y IS NOT NULL AND x > 100";

    /// The plan of `SQL` and its answer, under `ctx` with `t` at `path`.
    async fn run(ctx: &SessionContext, path: &std::path::Path) -> (bool, Vec<RecordBatch>) {
        ctx.register_parquet("t", path.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
        let frame = ctx.sql(SQL).await.unwrap();
        let plan = frame.clone().create_physical_plan().await.unwrap();
        (pruned(&plan), frame.collect().await.unwrap())
    }

    #[tokio::test]
    async fn small_scans_keep_their_filter_above_and_answer_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (small, large) = (
            dir.path().join("small.parquet"),
            dir.path().join("large.parquet"),
        );
        write(&small, 1_000);
        write(&large, 200_000);
        assert!(std::fs::metadata(&small).unwrap().len() <= SMALL_SCAN_BYTES);
        assert!(std::fs::metadata(&large).unwrap().len() > SMALL_SCAN_BYTES);
        for path in [&small, &large] {
            // DataFusion's own session is the reference: the same answer, pushed down.
            let (reference_pruned, reference) = run(&SessionContext::new(), path).await;
            assert!(reference_pruned);
            let (station_pruned, answer) = run(&install(SessionContext::new()), path).await;
            assert_eq!(station_pruned, path == &large, "{}", path.display());
            assert_eq!(
                arrow::util::pretty::pretty_format_batches(&answer)
                    .unwrap()
                    .to_string(),
                arrow::util::pretty::pretty_format_batches(&reference)
                    .unwrap()
                    .to_string()
            );
        }
    }
}
