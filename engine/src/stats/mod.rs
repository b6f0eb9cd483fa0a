//! Federated statistics as SQL table functions: `glm`, `glm_fit`, `kaplan_meier`, `logrank`,
//! `cox`, `cox_fit` and `crosstab`.
//!
//! ```text
//!   SELECT * FROM glm('lung', 'status ~ age', 'binomial')
//!        │ call_with_args: parse and check the arguments against the catalog (no I/O)
//!        ▼
//!   JobTable ──scan──▶ QueryJobExec(StatsJob) (query identity assigned like a FragmentExec)
//!        │ execute: rounds, each one fragment per station, concurrently:
//!        │   SELECT glm_terms('binomial', true, "status", "age", b0, b1) FROM "lung" WHERE …
//!        ▼   stations check it (model rules), run it, release sums; the hub adds them up,
//!   one batch of results                          solves, and sends the next round
//! ```
//!
//! The key decision: a station's share of every model is an ordinary aggregate fragment
//! (`glm_terms`, `survival_terms` from `railyard-udfs`), so it goes through the same policy
//! check, audit log and thresholds as any SQL. The hub only ever adds up per-station sums,
//! which is why the federated fit equals the pooled fit.
//!
//! Layout: this file (arguments, the operator, rounds), [`formula`] (model formulas), [`glm`],
//! [`survival`] (Kaplan–Meier, log-rank, Cox), [`crosstab`].

mod crosstab;
mod formula;
mod glm;
mod survival;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionImpl, TableProvider};
use datafusion::common::{DFSchema, Result as DfResult, ScalarValue, plan_err};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;
use futures::future::BoxFuture;
use railyard_contract::FragmentTicket;
use railyard_planner::FederatedTable;
use railyard_planner::sql::SelectSql;

use crate::exec::{JobTable, QueryContext, QueryJob, fetch_all};
use crate::station_client::StationClient;

pub use formula::{Formula, Term};

/// What the statistics functions need of the hub: its stations and its tables.
#[derive(Debug)]
pub struct StatsEnv {
    pub stations: Arc<Vec<StationClient>>,
    pub tables: BTreeMap<String, Arc<FederatedTable>>,
}

/// Registers every statistics table function in `ctx`.
pub fn register(ctx: &SessionContext, env: Arc<StatsEnv>) {
    for kind in [
        Kind::Glm,
        Kind::GlmFit,
        Kind::KaplanMeier,
        Kind::Logrank,
        Kind::Cox,
        Kind::CoxFit,
        Kind::Crosstab,
    ] {
        ctx.register_udtf(
            kind.name(),
            Arc::new(StatsFunction {
                kind,
                env: Arc::clone(&env),
            }),
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Glm,
    GlmFit,
    KaplanMeier,
    Logrank,
    Cox,
    CoxFit,
    Crosstab,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Glm => "glm",
            Kind::GlmFit => "glm_fit",
            Kind::KaplanMeier => "kaplan_meier",
            Kind::Logrank => "logrank",
            Kind::Cox => "cox",
            Kind::CoxFit => "cox_fit",
            Kind::Crosstab => "crosstab",
        }
    }

    /// The argument names, required then optional.
    fn usage(self) -> &'static str {
        match self {
            Kind::Glm | Kind::GlmFit => "(table, formula, family [, filter])",
            Kind::KaplanMeier => "(table, time_column, event_column [, group_column [, filter]])",
            Kind::Logrank => "(table, time_column, event_column, group_column [, filter])",
            Kind::Cox | Kind::CoxFit => "(table, time_column, event_column, covariates [, filter])",
            Kind::Crosstab => "(table, row_column, column_column [, filter])",
        }
    }

    fn arity(self) -> (usize, usize) {
        match self {
            Kind::Glm | Kind::GlmFit => (3, 4),
            Kind::KaplanMeier => (3, 5),
            Kind::Logrank | Kind::Cox | Kind::CoxFit => (4, 5),
            Kind::Crosstab => (3, 4),
        }
    }
}

/// A statistics call with its arguments checked against the catalog.
#[derive(Debug, Clone)]
pub(crate) enum Job {
    Glm(glm::GlmJob),
    KaplanMeier(survival::KmJob),
    Logrank(survival::KmJob),
    Cox(survival::CoxJob),
    Crosstab(crosstab::CrosstabJob),
}

/// The table a statistics call reads, and the filter it applies.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub table: Arc<FederatedTable>,
    /// The fragments' FROM: the table's quoted name, or a cohort query as a derived table.
    pub from: String,
    /// The researcher's filter as fragment SQL (parsed against the table, then rendered by
    /// the planner's writer), if any.
    pub filter: Option<String>,
    /// Columns the filter reads.
    pub filter_columns: BTreeSet<String>,
}

impl Source {
    /// The conditions of a fragment over `columns`: the filter, and complete cases.
    pub fn filters<'a>(&self, columns: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        let mut parts: Vec<String> = self.filter.iter().cloned().collect();
        let mut seen = BTreeSet::new();
        for c in columns {
            if seen.insert(c.clone()) {
                // Written directly (a quoted identifier): unparsing `col(c).is_not_null()`
                // through DataFusion took about 200,000 instructions a column, on every fit.
                parts.push(format!("{} IS NOT NULL", ident(c)));
            }
        }
        parts
    }

    /// Every column a computation over `columns` touches (for thresholds).
    pub fn touched<'a>(&self, columns: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
        let mut all = self.filter_columns.clone();
        all.extend(columns.into_iter().cloned());
        all
    }

    /// The data type of a column, or an error naming it and the table.
    pub fn column_type(&self, column: &str) -> DfResult<DataType> {
        match self.table.schema().field_with_name(column) {
            Ok(f) => Ok(f.data_type().clone()),
            Err(_) => plan_err!(
                "table '{}' has no column '{column}' (columns: {})",
                self.table.name(),
                self.table
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Like [`Source::column_type`], and the column must be numeric.
    pub fn numeric_column(&self, column: &str, role: &str) -> DfResult<()> {
        let t = self.column_type(column)?;
        if !(t.is_numeric() || t == DataType::Boolean) {
            return plan_err!("the {role} '{column}' must be numeric, not {t}");
        }
        Ok(())
    }
}

pub(crate) use railyard_planner::sql::{float_sql, quote_ident as ident, value_sql};

/// A level value as the text shown in results (`1`, `female`).
pub(crate) fn value_text(v: &ScalarValue) -> String {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug)]
struct StatsFunction {
    kind: Kind,
    env: Arc<StatsEnv>,
}

impl StatsFunction {
    fn strings(&self, exprs: &[Expr]) -> DfResult<Vec<String>> {
        let (min, max) = self.kind.arity();
        let name = self.kind.name();
        if exprs.len() < min || exprs.len() > max {
            return plan_err!(
                "{name}{}: {} arguments given",
                self.kind.usage(),
                exprs.len()
            );
        }
        exprs
            .iter()
            .enumerate()
            .map(|(i, e)| match e {
                Expr::Literal(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)),
                    _,
                ) => Ok(s.clone()),
                _ => plan_err!(
                    "{name}{}: argument {} must be a string literal",
                    self.kind.usage(),
                    i + 1
                ),
            })
            .collect()
    }

    fn source(&self, table: &str, filter: Option<&str>, session: &dyn Session) -> DfResult<Source> {
        let head = table.trim_start().to_ascii_uppercase();
        if head.starts_with("SELECT") || head.starts_with("WITH") {
            return self.cohort(table, filter, session);
        }
        let Some(t) = self.env.tables.get(table) else {
            return plan_err!(
                "{}: no federated table '{table}' (tables: {})",
                self.kind.name(),
                self.env
                    .tables
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        self.filtered(
            Source {
                table: Arc::clone(t),
                from: railyard_planner::sql::quote_ident(t.name()),
                filter: None,
                filter_columns: BTreeSet::new(),
            },
            filter,
            session,
        )
    }

    /// A cohort query in place of a table: planned here against the catalog's schemas to
    /// learn its columns and the stations of its tables, and sent to each station as the
    /// fragments' derived table, where the station plans and checks it itself (joins on the
    /// privacy unit, per-patient derivations; docs/policy.md).
    fn cohort(&self, sql: &str, filter: Option<&str>, session: &dyn Session) -> DfResult<Source> {
        let name = self.kind.name();
        let ctx = railyard_udfs::fragment_context()?;
        for (t, table) in &self.env.tables {
            ctx.register_table(
                t.as_str(),
                Arc::new(datafusion::datasource::empty::EmptyTable::new(
                    table.schema(),
                )),
            )?;
        }
        // Planning reads only the in-memory catalog above: nothing here waits on I/O.
        let plan =
            futures::executor::block_on(ctx.state().create_logical_plan(sql)).map_err(|e| {
                DataFusionError::Plan(format!("{name}: the cohort query does not plan: {e}"))
            })?;
        let mut read = Vec::new();
        plan.apply_with_subqueries(|n| {
            if let datafusion::logical_expr::LogicalPlan::TableScan(scan) = n
                && let Some(t) = self.env.tables.get(scan.table_name.table())
                && !read
                    .iter()
                    .any(|r: &Arc<FederatedTable>| r.name() == t.name())
            {
                read.push(Arc::clone(t));
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })?;
        let fields = plan.schema().fields();
        let mut seen = BTreeSet::new();
        for f in fields {
            if !seen.insert(f.name().clone()) {
                return plan_err!(
                    "{name}: the cohort query has two columns named '{}'; give each an alias",
                    f.name()
                );
            }
        }
        let schema = Arc::new(Schema::new(
            fields
                .iter()
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
        ));
        let Some(table) = FederatedTable::derived("cohort", schema, &read) else {
            return plan_err!(
                "{name}: a cohort query must read patient tables held by the same stations \
                 (horizontally partitioned, not vertical)"
            );
        };
        self.filtered(
            Source {
                table: Arc::new(table),
                from: format!(
                    "({sql}) AS {}",
                    railyard_planner::sql::quote_ident("cohort")
                ),
                filter: None,
                filter_columns: BTreeSet::new(),
            },
            filter,
            session,
        )
    }

    /// `source` with the researcher's filter parsed against its columns.
    fn filtered(
        &self,
        mut source: Source,
        filter: Option<&str>,
        session: &dyn Session,
    ) -> DfResult<Source> {
        let t = Arc::clone(&source.table);
        if let Some(text) = filter.filter(|f| !f.trim().is_empty()) {
            let Some(state) = session.as_any().downcast_ref::<SessionState>() else {
                return plan_err!("{}: the filter cannot be parsed here", self.kind.name());
            };
            let schema = DFSchema::try_from_qualified_schema(t.name(), t.schema().as_ref())?;
            let expr = state.create_logical_expr(text, &schema).map_err(|e| {
                DataFusionError::Plan(format!(
                    "{}: the filter does not parse: {e}",
                    self.kind.name()
                ))
            })?;
            source.filter_columns = expr.column_refs().iter().map(|c| c.name.clone()).collect();
            // The planner's writer: the same type-preserving rendering as every fragment.
            source.filter =
                Some(railyard_planner::sql::expr_sql(&expr).map_err(DataFusionError::from)?);
        }
        Ok(source)
    }
}

impl TableFunctionImpl for StatsFunction {
    fn call_with_args(
        &self,
        args: datafusion::catalog::TableFunctionArgs,
    ) -> DfResult<Arc<dyn TableProvider>> {
        let a = self.strings(args.exprs())?;
        let session = args.session();
        let job = match self.kind {
            Kind::Glm | Kind::GlmFit => {
                let source = self.source(&a[0], a.get(3).map(String::as_str), session)?;
                Job::Glm(glm::GlmJob::new(
                    source,
                    &a[1],
                    &a[2],
                    self.kind == Kind::GlmFit,
                )?)
            }
            Kind::KaplanMeier | Kind::Logrank => {
                let source = self.source(&a[0], a.get(4).map(String::as_str), session)?;
                let group = a.get(3).filter(|g| !g.trim().is_empty()).cloned();
                if self.kind == Kind::Logrank && group.is_none() {
                    return plan_err!("logrank{}: a group column is needed", self.kind.usage());
                }
                let km = survival::KmJob::new(source, &a[1], &a[2], group)?;
                if self.kind == Kind::Logrank {
                    Job::Logrank(km)
                } else {
                    Job::KaplanMeier(km)
                }
            }
            Kind::Cox | Kind::CoxFit => {
                let source = self.source(&a[0], a.get(4).map(String::as_str), session)?;
                Job::Cox(survival::CoxJob::new(
                    source,
                    &a[1],
                    &a[2],
                    &a[3],
                    self.kind == Kind::CoxFit,
                )?)
            }
            Kind::Crosstab => {
                let source = self.source(&a[0], a.get(3).map(String::as_str), session)?;
                Job::Crosstab(crosstab::CrosstabJob::new(source, &a[1], &a[2])?)
            }
        };
        // Only the stations that hold the table take part in its rounds.
        let holding = job.source().table.stations();
        let stations = self
            .env
            .stations
            .iter()
            .filter(|s| holding.iter().any(|h| h.as_str() == s.name.as_ref()))
            .cloned()
            .collect();
        let schema = job.schema();
        let job = StatsJob {
            job,
            full: Arc::clone(&schema),
            stations,
        };
        Ok(Arc::new(JobTable::new(
            Arc::new(job),
            schema,
            TableType::Temporary,
        )))
    }
}

impl Job {
    fn schema(&self) -> SchemaRef {
        match self {
            Job::Glm(j) => j.schema(),
            Job::KaplanMeier(j) => j.km_schema(),
            Job::Logrank(_) => survival::logrank_schema(),
            Job::Cox(j) => j.schema(),
            Job::Crosstab(_) => crosstab::schema(),
        }
    }

    fn source(&self) -> &Source {
        match self {
            Job::Glm(j) => &j.source,
            Job::KaplanMeier(j) | Job::Logrank(j) => &j.source,
            Job::Cox(j) => &j.source,
            Job::Crosstab(j) => &j.source,
        }
    }

    async fn run(&self, rounds: &Rounds) -> DfResult<RecordBatch> {
        match self {
            Job::Glm(j) => j.run(rounds).await,
            Job::KaplanMeier(j) => j.run_km(rounds).await,
            Job::Logrank(j) => j.run_logrank(rounds).await,
            Job::Cox(j) => j.run(rounds).await,
            Job::Crosstab(j) => j.run(rounds).await,
        }
    }
}

/// A statistics call as a [`QueryJob`]: its rounds with the stations of its table.
#[derive(Debug)]
struct StatsJob {
    job: Job,
    full: SchemaRef,
    stations: Vec<StationClient>,
}

impl QueryJob for StatsJob {
    fn describe(&self) -> String {
        format!("StatsExec: table={}", self.job.source().table.name())
    }

    fn run(&self, query: QueryContext) -> BoxFuture<'static, DfResult<RecordBatch>> {
        let job = self.job.clone();
        let full = Arc::clone(&self.full);
        let rounds = Rounds {
            stations: self.stations.clone(),
            next_fragment: AtomicUsize::new(query.first_fragment),
            from: job.source().from.clone(),
            query,
        };
        Box::pin(async move {
            let batch = job.run(&rounds).await?;
            debug_assert_eq!(batch.schema(), full);
            Ok(batch)
        })
    }
}

/// One fragment of a statistics call, in the parts the planner's writer
/// ([`SelectSql`]) puts together: SQL the planner's functions wrote, never spliced text.
pub(crate) struct Select {
    /// (expression, output name).
    pub items: Vec<(String, String)>,
    pub filters: Vec<String>,
    pub group_by: Vec<String>,
}

/// One statistics call's conversation with the stations of its table.
pub(crate) struct Rounds {
    stations: Vec<StationClient>,
    query: QueryContext,
    next_fragment: AtomicUsize,
    /// The fragments' FROM clause.
    from: String,
}

impl Rounds {
    /// Sends `select` over the table to every station of the table at once and returns
    /// each station's batches, in station order. `schema` is what every station must answer
    /// (the station appends its row count, `__rows`, which is included).
    pub async fn run(&self, select: Select, schema: SchemaRef) -> DfResult<Vec<Vec<RecordBatch>>> {
        let fragment = self.next_fragment.fetch_add(1, Ordering::Relaxed);
        let sql = SelectSql {
            table: &self.from,
            items: select.items,
            filters: select.filters,
            group_by: select.group_by,
            limit: None,
        }
        .render();
        let ticket = FragmentTicket {
            query_id: self.query.query_id.clone(),
            fragment,
            researcher: self.query.researcher.clone(),
            collaboration: self.query.collaboration.clone(),
            epsilon: None,
            sql,
            train: None,
        };
        fetch_all(
            &self.stations,
            &ticket,
            &schema,
            self.query.fragment_timeout,
            Some(&self.query.withheld),
        )
        .await
        .map_err(|failure| DataFusionError::External(Box::new(failure)))
    }
}

/// A schema with `__rows` appended (what a station answers to an aggregate fragment).
pub(crate) fn with_rows(fields: Vec<Field>) -> SchemaRef {
    let mut fields = fields;
    fields.push(Field::new(
        railyard_contract::ROWS_COLUMN,
        DataType::Int64,
        false,
    ));
    Arc::new(Schema::new(fields))
}

/// Builds a batch from columns of `schema`.
pub(crate) fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> DfResult<RecordBatch> {
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Levels of `column` with at least `k` complete rows pooled (each station also withholds
/// its levels below its own k), sorted by value.
pub(crate) async fn levels(
    rounds: &Rounds,
    source: &Source,
    column: &str,
    complete: &[String],
) -> DfResult<Vec<ScalarValue>> {
    let data_type = source.column_type(column)?;
    let schema = with_rows(vec![
        Field::new("level", data_type, true),
        Field::new("n", DataType::Int64, false),
    ]);
    let select = Select {
        items: vec![
            (ident(column), "level".to_string()),
            ("count(*)".to_string(), "n".to_string()),
        ],
        filters: source.filters(complete.iter()),
        group_by: vec![ident(column)],
    };
    let answers = rounds.run(select, schema).await?;
    let k = source
        .table
        .min_group_size(&source.touched(complete.iter()));
    let mut counts: Vec<(ScalarValue, i64)> = Vec::new();
    for batch in answers.iter().flatten() {
        let n = batch
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>();
        for row in 0..batch.num_rows() {
            let value = ScalarValue::try_from_array(batch.column(0), row)?;
            let count = n.map(|a| a.value(row)).unwrap_or(0);
            match counts.iter_mut().find(|(v, _)| *v == value) {
                Some((_, c)) => *c += count,
                None => counts.push((value, count)),
            }
        }
    }
    let mut levels: Vec<ScalarValue> = counts
        .into_iter()
        .filter(|(v, c)| !v.is_null() && *c as u64 >= k)
        .map(|(v, _)| v)
        .collect();
    sort_levels(&mut levels);
    Ok(levels)
}

/// Sorts levels by value, once each.
pub(crate) fn sort_levels(levels: &mut Vec<ScalarValue>) {
    levels.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    levels.dedup();
}

/// Two-sided p-value of a standard normal statistic.
pub(crate) fn normal_p(z: f64) -> f64 {
    statrs::function::erf::erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// Two-sided p-value of a Student t statistic.
pub(crate) fn t_p(t: f64, df: f64) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    match StudentsT::new(0.0, 1.0, df) {
        Ok(d) => 2.0 * d.sf(t.abs()),
        Err(_) => f64::NAN,
    }
}

/// Upper-tail p-value of a chi-square statistic.
pub(crate) fn chi2_p(x: f64, df: f64) -> f64 {
    use statrs::distribution::{ChiSquared, ContinuousCDF};
    match ChiSquared::new(df) {
        Ok(d) => d.sf(x),
        Err(_) => f64::NAN,
    }
}

/// Inverts a symmetric positive definite matrix (row-major, n × n), or None if it is not.
pub(crate) fn spd_inverse(values: &[f64], n: usize) -> Option<nalgebra::DMatrix<f64>> {
    let m = nalgebra::DMatrix::from_row_slice(n, n, values);
    let m = (&m + m.transpose()) * 0.5;
    nalgebra::Cholesky::new(m).map(|c| c.inverse())
}

/// Solves `A x = b` for symmetric positive definite `A`, or None if it is not.
pub(crate) fn spd_solve(a: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    let n = b.len();
    let m = nalgebra::DMatrix::from_row_slice(n, n, a);
    let m = (&m + m.transpose()) * 0.5;
    let chol = nalgebra::Cholesky::new(m)?;
    let x = chol.solve(&nalgebra::DVector::from_column_slice(b));
    x.iter()
        .all(|v| v.is_finite())
        .then(|| x.iter().copied().collect())
}
