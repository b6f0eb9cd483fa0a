//! `SELECT * FROM train('<image>', '<input SQL>' [, '<args JSON>'])`: a containerized train
//! at every station of a federated table.
//!
//! ```text
//!   query text ──parse──▶ train(...) calls, string literals only (before planning)
//!        │ each call: its input SQL planned here against the catalog (one horizontal
//!        │ table), so errors come back at once and name the table
//!        ▼
//!   every station of that table checks {input SQL, image, args} (policy, image allowlist)
//!   and answers the output columns the image declares; they must agree
//!        ▼
//!   the query is planned over them, its other fragments checked   ── planning ends here
//!        ▼
//!   when the plan runs: every station runs its train concurrently; outputs must be the
//!   declared columns
//!        ▼
//!   union, `station` column first ──▶ a table only this query sees ──▶ the rest of the SQL
//! ```
//!
//! The key decision: a query is planned against known columns, and a train's columns are
//! declared by its image (the label `railyard.output-schema`, see
//! [`railyard_contract::train_output`]), which each station reads in its `check`. So the
//! whole query is planned, and every one of its fragments checked, before any container
//! starts; `train()` is a table function whose scan is a [`QueryJobExec`] that runs the
//! calls when the plan is executed (for Flight SQL, at `DoGet`: a train query is not
//! started ahead of its `DoGet` like other queries). Each station refuses an output that
//! is not what its image declares, and the hub checks again. `EXPLAIN FEDERATED` shows the
//! calls without contacting any station.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result as DfResult, ScalarValue, plan_err};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, TableFactor, Visit, Visitor,
};
use futures::future::BoxFuture;
use railyard_contract::train_output::{self, OutputColumn};
use railyard_contract::{CheckAnswer, FragmentTicket, TRAIN_STATION_COLUMN, TrainCall};
use railyard_planner::FederatedCatalog;

use crate::error::{Error, Result};
use crate::exec::{JobTable, QueryContext, QueryJob, fetch_collect};
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

/// The output tables of the calls, from the stations' answers to their tickets' `check`
/// (in the order of [`tickets`]): every station of a call must declare the same output
/// columns, which its image's label gives ([`railyard_contract::train_output`]).
pub fn tables(
    trains: &[ResolvedTrain],
    answers: &[CheckAnswer],
    timeout: Duration,
) -> Result<Vec<Arc<JobTable>>> {
    let mut answers = answers.iter();
    let mut tables = Vec::with_capacity(trains.len());
    for (i, t) in trains.iter().enumerate() {
        let declared: Vec<(&str, Option<Vec<OutputColumn>>)> = t
            .stations
            .iter()
            .map(|s| {
                (
                    s.name.as_ref(),
                    answers.next().and_then(|a| a.train_output.clone()),
                )
            })
            .collect();
        let declared = Arc::new(agreed_columns(&t.call.image, &declared)?);
        let mut fields = vec![Field::new(TRAIN_STATION_COLUMN, DataType::Utf8, false)];
        fields.extend(declared.fields().iter().map(|f| f.as_ref().clone()));
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let job = TrainJob {
            train: t.clone(),
            fragment: i + 1,
            declared,
            schema: Arc::clone(&schema),
            timeout,
        };
        tables.push(Arc::new(JobTable::new(
            Arc::new(job),
            schema,
            TableType::Temporary,
        )));
    }
    Ok(tables)
}

/// The output columns every station of a call declares, as a schema; an error naming the
/// stations if they differ or one declares none.
fn agreed_columns(image: &str, declared: &[(&str, Option<Vec<OutputColumn>>)]) -> Result<Schema> {
    let show = |c: &[OutputColumn]| {
        train_output::schema_of(c)
            .map(|s| train_output::describe(&s))
            .unwrap_or_default()
    };
    let mut first: Option<(&str, &Vec<OutputColumn>)> = None;
    for (station, columns) in declared {
        let Some(columns) = columns else {
            return Err(Error::BadRequest(format!(
                "train('{image}', …): station '{station}' did not say which columns the train \
                 outputs (a station older than this hub?)"
            )));
        };
        match first {
            None => first = Some((station, columns)),
            Some((first_station, first_columns)) if first_columns != columns => {
                return Err(Error::BadRequest(format!(
                    "train('{image}', …): station '{station}' declares the output ({}) where \
                     station '{first_station}' declares ({}); every station must run an image \
                     with the same output columns",
                    show(columns),
                    show(first_columns)
                )));
            }
            Some(_) => {}
        }
    }
    let Some((_, columns)) = first else {
        return Err(Error::BadRequest(format!(
            "train('{image}', …): no station holds the input's table"
        )));
    };
    train_output::schema_of(columns)
        .map_err(|e| Error::BadRequest(format!("train('{image}', …): {e}")))
}

/// A call run at every station of its table, as a [`QueryJob`]: one call's output as a
/// table, the union of its stations' outputs with `station` first.
#[derive(Debug)]
struct TrainJob {
    train: ResolvedTrain,
    fragment: usize,
    declared: SchemaRef,
    schema: SchemaRef,
    timeout: Duration,
}

impl QueryJob for TrainJob {
    fn describe(&self) -> String {
        format!(
            "TrainExec: {} over {} at {} stations (fragment {})",
            self.train.call.image,
            self.train.table,
            self.train.stations.len(),
            self.fragment
        )
    }

    fn starts_containers(&self) -> bool {
        true
    }

    fn run(&self, query: QueryContext) -> BoxFuture<'static, DfResult<RecordBatch>> {
        let ticket = self.train.ticket(&query, self.fragment);
        let stations = self.train.stations.clone();
        let (image, declared, schema) = (
            self.train.call.image.clone(),
            Arc::clone(&self.declared),
            Arc::clone(&self.schema),
        );
        let timeout = self.timeout;
        Box::pin(async move {
            let answers = futures::future::join_all(
                stations
                    .iter()
                    .map(|s| async { fetch_collect(s, &ticket, None, timeout).await }),
            )
            .await;
            let mut batches = Vec::new();
            for (station, answer) in stations.iter().zip(answers) {
                let (output, station_batches) =
                    answer.map_err(|f| DataFusionError::External(Box::new(f)))?;
                // The station refuses an output its image did not declare; a station that
                // sends one anyway is not taken at its word.
                if !train_output::matches(&declared, &output) {
                    return Err(DataFusionError::Execution(format!(
                        "train('{image}', …): station '{}' sent columns other than the ones                          its image declares ({})",
                        station.name,
                        train_output::describe(&declared)
                    )));
                }
                for batch in station_batches {
                    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns() + 1);
                    columns.push(Arc::new(StringArray::from(vec![
                        station.name.as_ref();
                        batch.num_rows()
                    ])));
                    columns.extend(batch.columns().iter().cloned());
                    batches.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
                }
            }
            Ok(arrow::compute::concat_batches(&schema, &batches)?)
        })
    }
}

/// The `train` table function of one query: the output table of each call it makes.
#[derive(Debug, Default)]
pub struct TrainOutputs {
    pub outputs: Vec<(TrainArgs, Arc<JobTable>)>,
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
                "{USAGE}: train calls are checked at the stations before the query around \
                 them is planned; this one was not (is it inside a view?)"
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
        "union of each call's station outputs with a '{TRAIN_STATION_COLUMN}' column, the \
         columns its image declares (label railyard.output-schema); the rest of the query \
         runs over it"
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
    fn stations_that_declare_different_outputs_are_not_merged() {
        let n = |t: &str| {
            Some(vec![OutputColumn {
                name: "n".into(),
                data_type: t.into(),
            }])
        };
        let schema = agreed_columns("img", &[("a", n("Int64")), ("b", n("Int64"))]).unwrap();
        assert_eq!(train_output::describe(&schema), "n Int64");
        let err = agreed_columns("img", &[("a", n("Int64")), ("b", n("Float64"))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("station 'b' declares the output (n Float64)")
                && err.contains("station 'a' declares (n Int64)"),
            "{err}"
        );
        let err = agreed_columns("img", &[("a", n("Int64")), ("b", None)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("station 'b' did not say"), "{err}");
        assert!(agreed_columns("img", &[]).is_err());
    }
}
