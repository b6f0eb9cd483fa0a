//! `railyard.budget`: what is left of the asking researcher's differential privacy budget
//! at every station, per table.
//!
//! ```text
//!   SELECT * FROM railyard.budget
//!        │ BudgetTable::scan ──▶ BudgetExec (query identity assigned like a FragmentExec)
//!        ▼ execute: the `budget` action at every station, concurrently
//!   station | table_name | budget | spent | remaining | max_query_epsilon | default_epsilon
//! ```
//!
//! The stations keep the ledgers (the hub keeps none): the table is read fresh each time and
//! is exactly what each station will enforce.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result as DfResult, plan_err};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};

use crate::exec::QueryContext;
use crate::station_client::StationClient;

/// The table's name in the `railyard` schema.
pub const BUDGET_TABLE: &str = "budget";

fn budget_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("station", DataType::Utf8, false),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("budget", DataType::Float64, false),
        Field::new("spent", DataType::Float64, false),
        Field::new("remaining", DataType::Float64, false),
        Field::new("max_query_epsilon", DataType::Float64, false),
        Field::new("default_epsilon", DataType::Float64, false),
    ]))
}

/// `railyard.budget` as a table.
#[derive(Debug)]
pub struct BudgetTable {
    stations: Arc<Vec<StationClient>>,
}

impl BudgetTable {
    pub fn new(stations: Arc<Vec<StationClient>>) -> Self {
        Self { stations }
    }
}

#[async_trait]
impl TableProvider for BudgetTable {
    fn schema(&self) -> SchemaRef {
        budget_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(BudgetExec::new(
            Arc::clone(&self.stations),
            projection.cloned(),
        )?))
    }
}

/// Asks every station for the researcher's budget when executed; one partition, one batch.
#[derive(Debug, Clone)]
pub struct BudgetExec {
    stations: Arc<Vec<StationClient>>,
    projection: Option<Vec<usize>>,
    query: Option<QueryContext>,
    properties: Arc<PlanProperties>,
}

impl BudgetExec {
    fn new(stations: Arc<Vec<StationClient>>, projection: Option<Vec<usize>>) -> DfResult<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(budget_schema().project(p)?),
            None => budget_schema(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Ok(Self {
            stations,
            projection,
            query: None,
            properties: Arc::new(properties),
        })
    }

    /// The same operator, asking on behalf of `query`'s researcher.
    pub fn with_query(&self, query: QueryContext) -> Self {
        Self {
            query: Some(query),
            ..self.clone()
        }
    }
}

impl DisplayAs for BudgetExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "BudgetExec: {} stations", self.stations.len())
    }
}

impl ExecutionPlan for BudgetExec {
    crate::exec::leaf_exec!("BudgetExec");

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return plan_err!("BudgetExec has one partition, not {partition}");
        }
        let Some(query) = self.query.clone() else {
            return Err(DataFusionError::Internal(
                "railyard.budget was read without a query identity".into(),
            ));
        };
        let stations = Arc::clone(&self.stations);
        let projection = self.projection.clone();
        let schema = self.properties.eq_properties.schema().clone();
        let run = async move {
            let answers = futures::future::join_all(stations.iter().map(|s| async {
                tokio::time::timeout(
                    query.fragment_timeout,
                    s.budget(&query.researcher, &query.collaboration),
                )
                .await
            }))
            .await;
            let (mut station, mut table, mut budget, mut spent, mut remaining) =
                (vec![], vec![], vec![], vec![], vec![]);
            let (mut max_query, mut default) = (vec![], vec![]);
            for (s, answer) in stations.iter().zip(answers) {
                let infos = match answer {
                    Ok(Ok(infos)) => infos,
                    Ok(Err(e)) => return Err(DataFusionError::External(Box::new(e))),
                    Err(_) => {
                        return Err(DataFusionError::Execution(format!(
                            "station '{}' did not report its budget within {:?}",
                            s.name, query.fragment_timeout
                        )));
                    }
                };
                for info in infos {
                    station.push(s.name.to_string());
                    table.push(info.table);
                    remaining.push((info.budget - info.spent).max(0.0));
                    budget.push(info.budget);
                    spent.push(info.spent);
                    max_query.push(info.max_query_epsilon);
                    default.push(info.default_epsilon);
                }
            }
            let batch = RecordBatch::try_new(
                budget_schema(),
                vec![
                    Arc::new(StringArray::from(station)),
                    Arc::new(StringArray::from(table)),
                    Arc::new(Float64Array::from(budget)),
                    Arc::new(Float64Array::from(spent)),
                    Arc::new(Float64Array::from(remaining)),
                    Arc::new(Float64Array::from(max_query)),
                    Arc::new(Float64Array::from(default)),
                ],
            )?;
            match projection {
                Some(p) => Ok(batch.project(&p)?),
                None => Ok(batch),
            }
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(run),
        )))
    }
}
