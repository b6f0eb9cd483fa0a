//! What an answer leaves out: the groups each station withheld below its k, and the merged
//! groups the hub withheld below the largest k. A researcher who reads a grouped answer
//! should know it is not the whole table; the answer's schema says so under
//! [`WITHHELD_METADATA`] (like `railyard.epsilon`), e.g.
//! `{"stations": {"station_a": 2, "station_b": null}, "hub": 1}`, where `null` says that a
//! station's withheld groups hold fewer than k rows in all, possibly none: their number would
//! tell whether one patient is among them.
//!
//! ```text
//!   station ── DoGet schema metadata railyard.withheld = "2" ──▶ fetch ──┐
//!   hub:  ThresholdExec (merged __rows >= k) counts what it drops ───────┼─▶ Withheld tally
//!                                                                        ▼
//!                         the answer's schema metadata, once the query has run
//! ```
//!
//! The counts are known only once the stations have answered, so a query that reports them
//! is run to its end before its schema is sent (its answer is aggregated, hence small).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Int64Type, Schema};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use railyard_contract::ROWS_COLUMN;
pub use railyard_contract::WITHHELD_METADATA;

/// The groups a query's answer left out so far, per station and at the hub. Shared by the
/// operators of one query; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Withheld(Arc<Mutex<Tally>>);

#[derive(Debug, Default, serde::Serialize)]
struct Tally {
    /// Per station, its groups withheld; `None` (JSON `null`) where the station may only say
    /// that they hold fewer than k rows, possibly none.
    stations: BTreeMap<String, Option<u64>>,
    hub: u64,
}

impl Withheld {
    /// Records a station's answer that withheld `groups` groups (`None`: groups of fewer
    /// than k rows in all, possibly none). A station that answers several fragments of one
    /// query has its counts added; one it may not tell makes the sum untold.
    pub fn station(&self, station: &str, groups: Option<u64>) {
        // The lock guards additions only; after a panic the tally is still a valid map.
        let mut tally = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tally
            .stations
            .entry(station.to_string())
            .and_modify(|n| *n = n.zip(groups).map(|(a, b)| a + b))
            .or_insert(groups);
    }

    /// Records merged groups the hub withheld.
    pub fn hub(&self, groups: u64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).hub += groups;
    }

    /// The tally as the answer's metadata value (JSON), if any thresholded release took part.
    pub fn metadata(&self) -> Option<String> {
        let tally = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if tally.stations.is_empty() {
            return None;
        }
        // A map of numbers always serializes.
        Some(serde_json::to_string(&*tally).expect("a tally of counts serializes"))
    }
}

/// What a station's answer says it withheld (its announced schema's
/// [`WITHHELD_METADATA`]), if it says anything: a number of groups, or `Some(None)` for
/// "groups of fewer than k rows in all, possibly none".
pub fn announced(schema: &Schema) -> Option<Option<u64>> {
    let text = schema.metadata().get(WITHHELD_METADATA)?;
    if text == railyard_contract::WITHHELD_FEW {
        return Some(None);
    }
    text.parse().ok().map(Some)
}

/// The hub's second threshold: passes the merged groups whose [`ROWS_COLUMN`] reaches
/// `min_group_size` and counts the others into the query's [`Withheld`].
#[derive(Debug, Clone)]
pub struct ThresholdExec {
    input: Arc<dyn ExecutionPlan>,
    min_group_size: u64,
    rows: usize,
    withheld: Option<Withheld>,
}

impl ThresholdExec {
    pub fn try_new(input: Arc<dyn ExecutionPlan>, min_group_size: u64) -> DfResult<Self> {
        let rows = input.schema().index_of(ROWS_COLUMN)?;
        Ok(Self {
            input,
            min_group_size,
            rows,
            withheld: None,
        })
    }

    /// The same operator, counting into `withheld`.
    pub fn with_tally(&self, withheld: Withheld) -> Self {
        Self {
            withheld: Some(withheld),
            ..self.clone()
        }
    }

    fn keep(&self, batch: &RecordBatch) -> DfResult<RecordBatch> {
        let rows = batch
            .column(self.rows)
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| {
                DataFusionError::Internal(format!("{ROWS_COLUMN} is not a BIGINT column"))
            })?;
        let k = i64::try_from(self.min_group_size).unwrap_or(i64::MAX);
        let mask: BooleanArray = rows
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= k)))
            .collect();
        let kept = filter_record_batch(batch, &mask)?;
        if let Some(withheld) = &self.withheld {
            withheld.hub((batch.num_rows() - kept.num_rows()) as u64);
        }
        Ok(kept)
    }
}

impl DisplayAs for ThresholdExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ThresholdExec: {ROWS_COLUMN} >= {}", self.min_group_size)
    }
}

impl ExecutionPlan for ThresholdExec {
    fn name(&self) -> &str {
        "ThresholdExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children)
            .map_err(|_| DataFusionError::Internal("ThresholdExec has one child".to_string()))?;
        Ok(Arc::new(Self {
            input,
            ..(*self).clone()
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let this = self.clone();
        let kept = input.map(move |batch| this.keep(&batch?));
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), kept)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use datafusion::datasource::memory::MemorySourceConfig;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn the_hub_threshold_counts_what_it_drops() {
        let batch = RecordBatch::try_from_iter([
            (
                "g",
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as ArrayRef,
            ),
            (
                ROWS_COLUMN,
                Arc::new(Int64Array::from(vec![9, 4, 5, 1])) as ArrayRef,
            ),
        ])
        .unwrap();
        let input =
            MemorySourceConfig::try_new_exec(&[vec![batch.clone()]], batch.schema(), None).unwrap();
        let tally = Withheld::default();
        let exec = ThresholdExec::try_new(input, 5)
            .unwrap()
            .with_tally(tally.clone());
        let out: Vec<RecordBatch> = exec
            .execute(0, Arc::new(TaskContext::default()))
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let kept: Vec<i64> = out
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        assert_eq!(kept, vec![1, 3]);
        // No station answered yet: nothing to report.
        assert_eq!(tally.metadata(), None);
        tally.station("station_a", Some(2));
        tally.station("station_a", Some(1));
        // A station that may not tell its count for one fragment cannot tell the sum.
        tally.station("station_b", Some(4));
        tally.station("station_b", None);
        let reported: serde_json::Value = serde_json::from_str(&tally.metadata().unwrap()).unwrap();
        assert_eq!(
            reported,
            serde_json::json!({"stations": {"station_a": 3, "station_b": null}, "hub": 2})
        );
    }
}
