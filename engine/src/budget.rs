//! `railyard.budget`: what is left of the asking researcher's differential privacy budget
//! at every station, per table.
//!
//! ```text
//!   SELECT * FROM railyard.budget
//!        │ budget_table scan ──▶ QueryJobExec(BudgetJob) (query identity assigned like a FragmentExec)
//!        ▼ execute: the `budget` action at every station, concurrently
//!   station | table_name | budget | spent | remaining | max_query_epsilon | default_epsilon
//! ```
//!
//! The stations keep the ledgers (the hub keeps none): the table is read fresh each time and
//! is exactly what each station will enforce.

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Result as DfResult;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use futures::future::BoxFuture;

use crate::exec::{JobTable, QueryContext, QueryJob};
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

/// `railyard.budget` as a table: read fresh at every station each time it is scanned.
pub fn budget_table(stations: Arc<Vec<StationClient>>) -> JobTable {
    JobTable::new(
        Arc::new(BudgetJob { stations }),
        budget_schema(),
        TableType::View,
    )
}

/// Asks every station for the researcher's budget, as a [`QueryJob`].
#[derive(Debug)]
struct BudgetJob {
    stations: Arc<Vec<StationClient>>,
}

impl QueryJob for BudgetJob {
    fn describe(&self) -> String {
        format!("BudgetExec: {} stations", self.stations.len())
    }

    fn run(&self, query: QueryContext) -> BoxFuture<'static, DfResult<RecordBatch>> {
        let stations = Arc::clone(&self.stations);
        Box::pin(async move {
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
            Ok(RecordBatch::try_new(
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
            )?)
        })
    }
}
