//! `SELECT * FROM train('<image>', '<input SQL>' [, '<args JSON>'])`: a containerized train
//! at every station of a federated table.
//!
//! ```text
//!   query text ──parse──▶ train(...) calls, string literals only (before planning)
//!        │ each call: its input SQL planned here against the catalog (one horizontal
//!        │ table), so errors come back at once and name the table
//!        ▼
//!   every station of that table checks {input SQL, image, args} (policy, image allowlist);
//!   nothing starts unless every station of every call accepts
//!        ▼
//!   every station runs its train concurrently; outputs must agree on columns
//!        ▼
//!   union, `station` column first ──▶ a table only this query sees ──▶ the rest of the SQL
//! ```
//!
//! The key decision: a train's output columns are known only once it has run, and SQL is
//! planned against known columns, so the trains of a query run while the query is planned
//! (for Flight SQL, in `GetFlightInfo`), and the query is then planned over their outputs.
//! `EXPLAIN FEDERATED` shows the calls without contacting any station.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result as DfResult, ScalarValue, plan_err};
use datafusion::datasource::MemTable;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, TableFactor, Visit, Visitor,
};
use railyard_contract::{FragmentTicket, TRAIN_STATION_COLUMN, TrainCall};
use railyard_planner::FederatedCatalog;

use crate::error::{Error, Result};
use crate::exec::{QueryContext, fetch_collect};
use crate::station_client::StationClient;

/// The SQL name of the table function.
pub const TRAIN_FUNCTION: &str = "train";

const USAGE: &str =
    "train('<image>', '<input SQL over a federated table>' [, '<arguments as JSON>'])";

/// One `train(...)` call as written in a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainArgs {
    pub image: String,
    pub input: String,
    pub args: String,
}

/// The `train(...)` calls of a statement (also inside `EXPLAIN`), in the order written.
pub fn calls(statement: &DfStatement) -> Result<Vec<TrainArgs>> {
    let statement = match statement {
        DfStatement::Statement(s) => s.as_ref(),
        DfStatement::Explain(e) => return calls(&e.statement),
        _ => return Ok(Vec::new()),
    };
    let mut finder = Finder::default();
    if let ControlFlow::Break(message) = statement.visit(&mut finder) {
        return Err(Error::BadRequest(message));
    }
    let mut unique = Vec::new();
    for call in finder.calls {
        if !unique.contains(&call) {
            unique.push(call);
        }
    }
    Ok(unique)
}

#[derive(Default)]
struct Finder {
    calls: Vec<TrainArgs>,
}

impl Visitor for Finder {
    type Break = String;

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        let TableFactor::Table {
            name,
            args: Some(args),
            ..
        } = factor
        else {
            return ControlFlow::Continue(());
        };
        if !name.to_string().eq_ignore_ascii_case(TRAIN_FUNCTION) {
            return ControlFlow::Continue(());
        }
        let mut strings = Vec::new();
        for arg in &args.args {
            match arg {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::Value(v))) => {
                    match v.clone().into_string() {
                        Some(s) => strings.push(s),
                        None => {
                            return ControlFlow::Break(format!(
                                "{USAGE}: every argument is a string literal"
                            ));
                        }
                    }
                }
                _ => {
                    return ControlFlow::Break(format!(
                        "{USAGE}: every argument is a string literal"
                    ));
                }
            }
        }
        match strings.as_slice() {
            [image, input] => self.calls.push(TrainArgs {
                image: image.clone(),
                input: input.clone(),
                args: "{}".to_string(),
            }),
            [image, input, args] => self.calls.push(TrainArgs {
                image: image.clone(),
                input: input.clone(),
                args: if args.trim().is_empty() {
                    "{}".to_string()
                } else {
                    args.clone()
                },
            }),
            _ => {
                return ControlFlow::Break(format!(
                    "{USAGE}: takes two or three arguments, not {}",
                    strings.len()
                ));
            }
        }
        ControlFlow::Continue(())
    }
}

/// A call resolved against the catalog: which table its input reads and which stations
/// hold it.
#[derive(Debug, Clone)]
pub struct ResolvedTrain {
    pub call: TrainArgs,
    pub table: String,
    pub stations: Vec<StationClient>,
}

impl ResolvedTrain {
    fn ticket(&self, query: &QueryContext, fragment: usize) -> FragmentTicket {
        FragmentTicket {
            query_id: query.query_id.clone(),
            fragment,
            researcher: query.researcher.clone(),
            collaboration: query.collaboration.clone(),
            epsilon: None,
            sql: self.call.input.clone(),
            train: Some(TrainCall {
                image: self.call.image.clone(),
                args: self.call.args.clone(),
            }),
        }
    }
}

/// Checks a call's arguments here (its arguments are JSON, its input SQL plans over exactly
/// one horizontal federated table) and finds the stations that run it.
pub fn resolve(
    call: &TrainArgs,
    plan: &LogicalPlan,
    catalog: &FederatedCatalog,
    stations: &[StationClient],
) -> Result<ResolvedTrain> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&call.args) {
        return Err(Error::BadRequest(format!(
            "train('{}', …): the arguments are not JSON ({e})",
            call.image
        )));
    }
    let mut tables: Vec<String> = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let name = scan.table_name.table().to_string();
            if !tables.contains(&name) {
                tables.push(name);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let [table] = tables.as_slice() else {
        return Err(Error::BadRequest(format!(
            "train('{}', …): the input SQL must read exactly one federated table; it reads {}",
            call.image,
            if tables.is_empty() {
                "none".to_string()
            } else {
                tables.join(", ")
            }
        )));
    };
    let Some(federated) = catalog.tables().into_iter().find(|t| t.name() == table) else {
        return Err(Error::BadRequest(format!(
            "train('{}', …): '{table}' is not a federated table",
            call.image
        )));
    };
    if federated.vertical().is_some() {
        return Err(Error::BadRequest(format!(
            "train('{}', …): '{table}' is a vertical table, joined at the hub; a train runs \
             at a station, over that station's own rows",
            call.image
        )));
    }
    let stations = stations
        .iter()
        .filter(|s| {
            federated
                .stations()
                .iter()
                .any(|h| h.as_str() == s.name.as_ref())
        })
        .cloned()
        .collect();
    Ok(ResolvedTrain {
        call: call.clone(),
        table: table.clone(),
        stations,
    })
}

/// Plans a call's input SQL in the hub's session (a query only: no DDL, DML or `SET`).
pub async fn plan_input(state: &SessionState, call: &TrainArgs) -> Result<LogicalPlan> {
    let plan = state.create_logical_plan(&call.input).await.map_err(|e| {
        Error::BadRequest(format!(
            "train('{}', …): the input SQL does not plan: {}",
            call.image,
            e.strip_backtrace()
        ))
    })?;
    railyard_policy::check::verify_query(&plan)?;
    Ok(plan)
}

/// Every (station, ticket) the calls send, fragment `i + 1` for call `i`.
pub fn tickets(
    trains: &[ResolvedTrain],
    query: &QueryContext,
) -> Vec<(StationClient, FragmentTicket)> {
    trains
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let ticket = t.ticket(query, i + 1);
            t.stations.iter().map(move |s| (s.clone(), ticket.clone()))
        })
        .collect()
}

/// Runs every call at its stations concurrently and returns each call's union of outputs.
/// The stations must already have accepted their tickets (`check`).
pub async fn run(
    trains: &[ResolvedTrain],
    query: &QueryContext,
    timeout: Duration,
) -> Result<Vec<Arc<MemTable>>> {
    let runs = trains.iter().enumerate().map(|(i, t)| async move {
        let ticket = t.ticket(query, i + 1);
        // Every station finishes (and audits) its run, also when another fails: a dropped
        // request would stop a train without a record of it.
        let answers = futures::future::join_all(t.stations.iter().map(|s| async {
            (
                s.name.to_string(),
                fetch_collect(s, &ticket, None, timeout).await,
            )
        }))
        .await;
        let mut outputs = Vec::new();
        for (station, answer) in answers {
            outputs.push((station, answer.map_err(|f| Error::Station(Box::new(f)))?));
        }
        union(&t.call, outputs)
    });
    futures::future::try_join_all(runs).await
}

/// The outputs of one call's stations as one table, `station` first. Every station must
/// answer with the same column names and types.
fn union(
    call: &TrainArgs,
    outputs: Vec<(String, (SchemaRef, Vec<RecordBatch>))>,
) -> Result<Arc<MemTable>> {
    let Some((first_station, (first, _))) = outputs.first() else {
        return Err(Error::BadRequest(format!(
            "train('{}', …): no station holds the input's table",
            call.image
        )));
    };
    let describe = |s: &Schema| {
        s.fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (station, (schema, _)) in &outputs {
        let same = schema.fields().len() == first.fields().len()
            && schema
                .fields()
                .iter()
                .zip(first.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !same {
            return Err(Error::BadRequest(format!(
                "train('{}', …): station '{station}' answered ({}) where station \
                 '{first_station}' answered ({}); a train must give every station's output \
                 the same columns",
                call.image,
                describe(schema),
                describe(first)
            )));
        }
    }
    let mut fields = vec![Field::new(TRAIN_STATION_COLUMN, DataType::Utf8, false)];
    for (i, f) in first.fields().iter().enumerate() {
        let nullable = outputs.iter().any(|(_, (s, _))| s.field(i).is_nullable());
        fields.push(f.as_ref().clone().with_nullable(nullable));
    }
    let schema = Arc::new(Schema::new(fields));
    let mut batches = Vec::new();
    for (station, (_, station_batches)) in outputs {
        for batch in station_batches {
            let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns() + 1);
            columns.push(Arc::new(StringArray::from(vec![
                station.as_str();
                batch.num_rows()
            ])));
            columns.extend(batch.columns().iter().cloned());
            batches.push(
                RecordBatch::try_new(Arc::clone(&schema), columns)
                    .map_err(datafusion::error::DataFusionError::from)?,
            );
        }
    }
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

/// The `train` table function of one query: the outputs of the calls it ran.
#[derive(Debug, Default)]
pub struct TrainOutputs {
    pub outputs: Vec<(TrainArgs, Arc<MemTable>)>,
}

impl TableFunctionImpl for TrainOutputs {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let mut strings = Vec::new();
        for e in args.exprs() {
            match e {
                Expr::Literal(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)),
                    _,
                ) => strings.push(s.clone()),
                _ => return plan_err!("{USAGE}: every argument is a string literal"),
            }
        }
        let found = self.outputs.iter().find(|(call, _)| {
            strings.first() == Some(&call.image)
                && strings.get(1) == Some(&call.input)
                && strings.get(2).map_or(call.args == "{}", |a| {
                    *a == call.args || (a.trim().is_empty() && call.args == "{}")
                })
        });
        match found {
            Some((_, table)) => Ok(Arc::clone(table) as _),
            None => plan_err!(
                "{USAGE}: train calls are run before the query is planned; this one was not \
                 (is it inside a view?)"
            ),
        }
    }
}

/// `EXPLAIN FEDERATED` of a query with train calls: per station, the input it would read and
/// the train it would run; nothing is sent to any station.
pub fn explain_batch(trains: &[ResolvedTrain]) -> Result<RecordBatch> {
    let (mut location, mut step, mut plan, mut releases) = (vec![], vec![], vec![], vec![]);
    for (i, t) in trains.iter().enumerate() {
        for s in &t.stations {
            location.push(s.name.to_string());
            step.push(format!(
                "train #{} ({} over {})",
                i + 1,
                t.call.image,
                t.table
            ));
            plan.push(format!(
                "{}  →  {} with arguments {}",
                t.call.input, t.call.image, t.call.args
            ));
            releases.push(
                "the train's output file, if the station allows the image and the output is \
                 within its [trains] limits (rows, bytes); audited with the image id"
                    .to_string(),
            );
        }
    }
    location.push("hub".to_string());
    step.push("merge".to_string());
    plan.push(format!(
        "union of each call's station outputs with a '{TRAIN_STATION_COLUMN}' column; the \
         rest of the query is planned over them once the trains have run"
    ));
    releases.push("the query result, to the researcher".to_string());
    Ok(railyard_planner::explain_rows(
        location, step, plan, releases,
    )?)
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    fn parse(sql: &str) -> Result<Vec<TrainArgs>> {
        let state = SessionContext::new().state();
        let dialect = state.config().options().sql_parser.dialect;
        calls(&state.sql_to_statement(sql, &dialect)?)
    }

    #[test]
    fn calls_are_found_wherever_a_table_can_stand() {
        let a = TrainArgs {
            image: "img".into(),
            input: "SELECT age FROM lung".into(),
            args: "{}".into(),
        };
        let b = TrainArgs {
            args: r#"{"k": 1}"#.into(),
            ..a.clone()
        };
        assert_eq!(
            parse("SELECT * FROM train('img', 'SELECT age FROM lung')").unwrap(),
            std::slice::from_ref(&a)
        );
        // Twice the same call runs once; calls in joins, subqueries and EXPLAIN are found.
        let sql = r#"SELECT * FROM train('img', 'SELECT age FROM lung', '') x
                     JOIN (SELECT * FROM TRAIN('img', 'SELECT age FROM lung', '{"k": 1}')) y
                     ON x.station = y.station
                     WHERE x.n IN (SELECT n FROM train('img', 'SELECT age FROM lung'))"#;
        assert_eq!(parse(sql).unwrap(), [a.clone(), b.clone()]);
        assert_eq!(
            parse("EXPLAIN SELECT * FROM train('img', 'SELECT age FROM lung')").unwrap(),
            [a]
        );
        assert!(parse("SELECT * FROM lung").unwrap().is_empty());
        assert!(
            parse("SELECT * FROM glm('lung', 'y ~ x', 'binomial')")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn arguments_must_be_two_or_three_string_literals() {
        for sql in [
            "SELECT * FROM train('img')",
            "SELECT * FROM train('img', 'SELECT 1', '{}', 'extra')",
            "SELECT * FROM train('img', 1)",
            "SELECT * FROM train('img', concat('SELECT ', 'age FROM lung'))",
        ] {
            let err = parse(sql).unwrap_err().to_string();
            assert!(err.contains("train('<image>'"), "{sql}: {err}");
        }
    }

    #[test]
    fn outputs_that_disagree_on_columns_are_not_merged() {
        let call = TrainArgs {
            image: "img".into(),
            input: "SELECT age FROM lung".into(),
            args: "{}".into(),
        };
        let one = |name: &str, t: DataType, nullable: bool| {
            let schema = Arc::new(Schema::new(vec![Field::new(name, t, nullable)]));
            let column: ArrayRef = match schema.field(0).data_type() {
                DataType::Int64 => Arc::new(arrow::array::Int64Array::from(vec![1, 2])),
                _ => Arc::new(arrow::array::Float64Array::from(vec![1.0, 2.0])),
            };
            let batch = RecordBatch::try_new(Arc::clone(&schema), vec![column]).unwrap();
            (schema as SchemaRef, vec![batch])
        };
        let table = union(
            &call,
            vec![
                ("a".into(), one("n", DataType::Int64, false)),
                ("b".into(), one("n", DataType::Int64, true)),
            ],
        )
        .unwrap();
        let schema = table.schema();
        assert_eq!(schema.field(0).name(), TRAIN_STATION_COLUMN);
        assert!(schema.field(1).is_nullable());
        let err = union(
            &call,
            vec![
                ("a".into(), one("n", DataType::Int64, false)),
                ("b".into(), one("n", DataType::Float64, false)),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("station 'b' answered (n Float64)") && err.contains("station 'a'"),
            "{err}"
        );
    }
}
