//! PostgreSQL as a station source: a table (or a query) in the hospital's own database,
//! read through the station's DataFusion like a file.
//!
//! The station still plans every fragment itself; PostgreSQL only narrows what is read.
//! Each scan sends one `SELECT` naming just the columns the fragment needs and carrying the
//! filters PostgreSQL evaluates the same way DataFusion does. Filters are pushed *inexactly*:
//! DataFusion applies them again above the scan, so the answer never depends on PostgreSQL's
//! semantics — only the amount read does. Only filters PostgreSQL evaluates exactly as
//! DataFusion does are sent (integers, booleans, dates, text equality); floating point,
//! text ordering (PostgreSQL's collation) and functions stay in DataFusion alone.
//!
//! ```text
//!   fragment ─▶ station DataFusion ─▶ PostgresScanExec ── SELECT "a","b" FROM t WHERE … ─▶ PostgreSQL
//!                                          ◀── rows → Arrow batches (8192 rows) ──────────┘
//! ```

use railyard_contract::quote_ident as quote;
use std::fmt;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, RecordBatch, RecordBatchOptions, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::PostgreSqlDialect;
use futures::StreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row};
use tracing::warn;

use crate::error::{Error, Result};

/// Rows per Arrow batch read from PostgreSQL.
const BATCH_ROWS: usize = 8192;

/// What a station table reads in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relation {
    /// A table or view, optionally schema-qualified (`registry.lung`).
    Table(String),
    /// Any `SELECT`; its columns are the table's.
    Query(String),
}

/// A station table backed by PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSource {
    /// The table's name at the station (what fragments and the hub call it).
    pub name: String,
    /// A libpq-style connection string (`host=… port=… user=… dbname=…`) or URL.
    pub connection: String,
    pub relation: Relation,
}

/// How a PostgreSQL column becomes an Arrow column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// `numeric` is read as `float8` (PostgreSQL converts it in the `SELECT`).
    Numeric,
    Text,
    /// `char(n)` is read as `text` (PostgreSQL drops the padding in the `SELECT`).
    Char,
    Date,
    Timestamp,
    TimestampTz,
}

impl Kind {
    fn of(pg: &Type) -> Option<Kind> {
        Some(match *pg {
            Type::BOOL => Kind::Bool,
            Type::INT2 => Kind::Int16,
            Type::INT4 => Kind::Int32,
            Type::INT8 => Kind::Int64,
            Type::FLOAT4 => Kind::Float32,
            Type::FLOAT8 => Kind::Float64,
            Type::NUMERIC => Kind::Numeric,
            Type::TEXT | Type::VARCHAR | Type::NAME => Kind::Text,
            Type::BPCHAR => Kind::Char,
            Type::DATE => Kind::Date,
            Type::TIMESTAMP => Kind::Timestamp,
            Type::TIMESTAMPTZ => Kind::TimestampTz,
            _ => return None,
        })
    }

    /// The type PostgreSQL converts the column to before anyone (the `SELECT` list, a
    /// pushed filter) uses it, so that both compare the values DataFusion receives.
    fn read_as(self) -> Option<(DataType, &'static str)> {
        match self {
            Kind::Numeric => Some((DataType::Float64, "float8")),
            Kind::Char => Some((DataType::Utf8, "text")),
            _ => None,
        }
    }

    fn arrow(self) -> DataType {
        match self {
            Kind::Bool => DataType::Boolean,
            Kind::Int16 => DataType::Int16,
            Kind::Int32 => DataType::Int32,
            Kind::Int64 => DataType::Int64,
            Kind::Float32 => DataType::Float32,
            Kind::Float64 | Kind::Numeric => DataType::Float64,
            Kind::Text | Kind::Char => DataType::Utf8,
            Kind::Date => DataType::Date32,
            Kind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Kind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }
}

/// How to reach PostgreSQL. Every scan opens its own connection: PostgreSQL answers one
/// query at a time per connection, so a shared one would make every scan of a table wait
/// behind the slowest reader (a row-level fragment nobody has fetched yet, say).
struct Connection {
    config: String,
}

impl Connection {
    async fn open(&self) -> std::result::Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.config, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!("PostgreSQL connection ended: {}", pg_message(&e));
            }
        });
        Ok(client)
    }
}

/// A PostgreSQL relation as a DataFusion table.
pub struct PostgresTable {
    name: String,
    /// `"schema"."table"` or `(query)`, aliased in every scan.
    from: String,
    schema: SchemaRef,
    kinds: Vec<Kind>,
    connection: Arc<Connection>,
}

impl fmt::Debug for PostgresTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTable")
            .field("name", &self.name)
            .field("from", &self.from)
            .finish()
    }
}

impl PostgresTable {
    /// Connects and reads the relation's columns. Fails naming the table (and the column
    /// whose type Railyard does not read); the connection string is never echoed (it may
    /// hold a password).
    pub async fn open(station: &str, source: &PostgresSource) -> Result<Self> {
        let failed = |message: String| Error::Source {
            station: station.to_string(),
            table: source.name.clone(),
            message,
        };
        let from = match &source.relation {
            Relation::Table(name) => name.split('.').map(quote).collect::<Vec<_>>().join("."),
            Relation::Query(sql) => format!("({sql})"),
        };
        let connection = Arc::new(Connection {
            config: source.connection.clone(),
        });
        let client = connection
            .open()
            .await
            .map_err(|e| failed(format!("cannot connect to PostgreSQL: {}", pg_message(&e))))?;
        let statement = client
            .prepare(&format!("SELECT * FROM {from} AS railyard_source LIMIT 0"))
            .await
            .map_err(|e| failed(format!("PostgreSQL cannot read it: {}", pg_message(&e))))?;
        let mut fields = Vec::new();
        let mut kinds = Vec::new();
        for column in statement.columns() {
            let kind = Kind::of(column.type_()).ok_or_else(|| {
                failed(format!(
                    "column '{}' has PostgreSQL type {}, which Railyard does not read \
                     (cast it in a `query`: boolean, integers, real, double precision, numeric, \
                     text, varchar, date, timestamp, timestamptz)",
                    column.name(),
                    column.type_()
                ))
            })?;
            fields.push(Field::new(column.name(), kind.arrow(), true));
            kinds.push(kind);
        }
        Ok(Self {
            name: source.name.clone(),
            from,
            schema: Arc::new(Schema::new(fields)),
            kinds,
            connection,
        })
    }

    /// The `SELECT` one scan sends, and which of `filters` it carries.
    fn scan_sql(&self, projection: &[usize], filters: &[Expr]) -> String {
        let columns: Vec<String> = projection
            .iter()
            .map(|&i| {
                let name = quote(self.schema.field(i).name());
                match self.kinds[i].read_as() {
                    Some((_, pg_type)) => format!("{name}::{pg_type} AS {name}"),
                    None => name,
                }
            })
            .collect();
        let mut sql = format!(
            "SELECT {} FROM {} AS railyard_source",
            columns.join(", "),
            self.from
        );
        let conditions: Vec<String> = filters
            .iter()
            .filter(|f| pushable(f, &self.schema))
            .filter_map(|f| self.filter_sql(f).ok())
            .collect();
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql
    }
}

impl PostgresTable {
    /// `expr` as PostgreSQL SQL over the scan's unqualified columns, each converted the way
    /// the `SELECT` list converts it (a `numeric` compares as the `float8` DataFusion
    /// sees, a `char(n)` without its padding).
    fn filter_sql(&self, expr: &Expr) -> DfResult<String> {
        let converted = expr
            .clone()
            .transform_up(|e| {
                Ok(match e {
                    Expr::Column(c) => {
                        let kind = self
                            .schema
                            .index_of(&c.name)
                            .ok()
                            .and_then(|i| self.kinds[i].read_as())
                            .map(|(arrow_type, _)| arrow_type);
                        let column = Expr::Column(Column::new_unqualified(c.name));
                        Transformed::yes(match kind {
                            Some(t) => {
                                Expr::Cast(datafusion::logical_expr::Cast::new(Box::new(column), t))
                            }
                            None => column,
                        })
                    }
                    other => Transformed::no(other),
                })
            })?
            .data;
        let ast = Unparser::new(&PostgreSqlDialect {}).expr_to_sql(&converted)?;
        Ok(format!("({ast})"))
    }
}

/// A PostgreSQL error without the detail that could quote a stored value: the server's
/// message for errors about the request (connection, permissions, missing relations), the
/// SQLSTATE alone otherwise.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let class = &db.code().code()[..2];
            // 08 connection, 28 authorization, 3D catalog, 3F schema, 42 syntax/access/undefined.
            if ["08", "28", "3D", "3F", "42"].contains(&class) {
                format!("{} (SQLSTATE {})", db.message(), db.code().code())
            } else {
                format!("SQLSTATE {}", db.code().code())
            }
        }
        // Connection trouble: the causes ("connection refused") name no stored value.
        None => railyard_net::error::chain(e),
    }
}

/// Whether PostgreSQL evaluates `expr` exactly as DataFusion does. Pushed filters are
/// inexact (DataFusion applies them again), so PostgreSQL may only narrow what is read; and
/// as `NOT` turns "keeps more" into "keeps less", only exact equivalence is safe. Hence:
/// integers, booleans, dates and text equality; no floating point (−0.0 and NaN order
/// differently), no text ordering (PostgreSQL's collation), no functions or arithmetic.
fn pushable(expr: &Expr, schema: &Schema) -> bool {
    let column_type = |name: &str| schema.field_with_name(name).ok().map(|f| f.data_type());
    let is_text = |e: &Expr| match e {
        Expr::Column(c) => column_type(&c.name) == Some(&DataType::Utf8),
        Expr::Literal(v, _) => matches!(v, ScalarValue::Utf8(_)),
        _ => false,
    };
    let mut ok = true;
    let _ = expr.apply(|e| {
        ok &= match e {
            Expr::Column(c) => column_type(&c.name).is_some_and(|t| {
                t.is_integer() || matches!(t, DataType::Boolean | DataType::Utf8 | DataType::Date32)
            }),
            Expr::Literal(v, _) => matches!(
                v,
                ScalarValue::Boolean(Some(_))
                    | ScalarValue::Int8(Some(_))
                    | ScalarValue::Int16(Some(_))
                    | ScalarValue::Int32(Some(_))
                    | ScalarValue::Int64(Some(_))
                    | ScalarValue::Utf8(Some(_))
                    | ScalarValue::Date32(Some(_))
            ),
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::Eq | Operator::NotEq | Operator::And | Operator::Or => true,
                Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => {
                    !is_text(left) && !is_text(right)
                }
                _ => false,
            },
            Expr::Not(_) | Expr::IsNull(_) | Expr::IsNotNull(_) | Expr::InList(_) => true,
            Expr::Between(b) => !is_text(&b.expr),
            // DataFusion widens an integer column to compare it with a wider literal.
            Expr::Cast(c) => {
                c.field.data_type() == &DataType::Int64
                    && matches!(c.expr.as_ref(), Expr::Column(col)
                        if column_type(&col.name).is_some_and(|t| t.is_integer()))
            }
            _ => false,
        };
        Ok(if ok {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    ok
}

#[async_trait]
impl TableProvider for PostgresTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if pushable(f, &self.schema) && self.filter_sql(f).is_ok() {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&projection)?);
        let kinds = projection.iter().map(|&i| self.kinds[i]).collect();
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(PostgresScanExec {
            table: self.name.clone(),
            sql: self.scan_sql(&projection, filters),
            schema,
            kinds,
            connection: Arc::clone(&self.connection),
            properties: Arc::new(properties),
        }))
    }
}

/// Reads one `SELECT` from PostgreSQL as Arrow batches.
pub(crate) struct PostgresScanExec {
    table: String,
    sql: String,
    schema: SchemaRef,
    kinds: Vec<Kind>,
    connection: Arc<Connection>,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for PostgresScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresScanExec")
            .field("sql", &self.sql)
            .finish()
    }
}

impl DisplayAs for PostgresScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PostgresScanExec: {}", self.sql)
    }
}

impl ExecutionPlan for PostgresScanExec {
    fn name(&self) -> &str {
        "PostgresScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        ) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "PostgresScanExec has no children".to_string(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "PostgresScanExec has no partition {partition}"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<DfResult<RecordBatch>>(2);
        let (table, sql, schema, kinds, connection) = (
            self.table.clone(),
            self.sql.clone(),
            Arc::clone(&self.schema),
            self.kinds.clone(),
            Arc::clone(&self.connection),
        );
        tokio::spawn(async move {
            let failed = |e: tokio_postgres::Error| {
                // The station's own log may hold the server's whole message.
                let detail = e.as_db_error().map_or_else(
                    || pg_message(&e),
                    |db| format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                );
                warn!("PostgreSQL scan of table '{table}' failed: {detail}");
                DataFusionError::External(
                    format!(
                        "PostgreSQL failed reading table '{table}': {}",
                        pg_message(&e)
                    )
                    .into(),
                )
            };
            let client = match connection.open().await {
                Ok(client) => client,
                Err(e) => {
                    let _ = tx.send(Err(failed(e))).await;
                    return;
                }
            };
            let rows = match client
                .query_raw(sql.as_str(), std::iter::empty::<&(dyn ToSql + Sync)>())
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = tx.send(Err(failed(e))).await;
                    return;
                }
            };
            let mut rows = std::pin::pin!(rows.chunks(BATCH_ROWS));
            while let Some(chunk) = rows.next().await {
                let batch = chunk
                    .into_iter()
                    .collect::<std::result::Result<Vec<Row>, _>>()
                    .map_err(failed)
                    .and_then(|rows| to_batch(&schema, &kinds, &rows));
                let stop = batch.is_err();
                if tx.send(batch).await.is_err() {
                    // The consumer stopped (a LIMIT, a cancelled query): stop PostgreSQL too,
                    // rather than reading the rest of the table into the void.
                    let _ = client.cancel_token().cancel_query(NoTls).await;
                    return;
                }
                if stop {
                    return;
                }
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// PostgreSQL rows as one Arrow batch.
fn to_batch(schema: &SchemaRef, kinds: &[Kind], rows: &[Row]) -> DfResult<RecordBatch> {
    let get_err = |e: tokio_postgres::Error| {
        DataFusionError::External(format!("a PostgreSQL value could not be read: {e}").into())
    };
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("1970-01-01 is a date");
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        macro_rules! column {
            ($builder:ty, $rust:ty, $map:expr) => {{
                let mut b = <$builder>::with_capacity(rows.len());
                for row in rows {
                    let v: Option<$rust> = row.try_get(i).map_err(get_err)?;
                    b.append_option(v.map($map));
                }
                Arc::new(b.finish()) as ArrayRef
            }};
        }
        let array = match kind {
            Kind::Bool => column!(BooleanBuilder, bool, |v| v),
            Kind::Int16 => column!(Int16Builder, i16, |v| v),
            Kind::Int32 => column!(Int32Builder, i32, |v| v),
            Kind::Int64 => column!(Int64Builder, i64, |v| v),
            Kind::Float32 => column!(Float32Builder, f32, |v| v),
            Kind::Float64 | Kind::Numeric => column!(Float64Builder, f64, |v| v),
            Kind::Text | Kind::Char => {
                let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 8);
                for row in rows {
                    let v: Option<&str> = row.try_get(i).map_err(get_err)?;
                    b.append_option(v);
                }
                Arc::new(b.finish()) as ArrayRef
            }
            Kind::Date => column!(Date32Builder, chrono::NaiveDate, |d| {
                // Dates PostgreSQL holds are within ±5.9 million years: days fit an i32.
                i32::try_from((d - epoch).num_days()).unwrap_or(i32::MAX)
            }),
            Kind::Timestamp => column!(TimestampMicrosecondBuilder, chrono::NaiveDateTime, |t| t
                .and_utc()
                .timestamp_micros()),
            Kind::TimestampTz => {
                let mut b =
                    TimestampMicrosecondBuilder::with_capacity(rows.len()).with_timezone("UTC");
                for row in rows {
                    let v: Option<chrono::DateTime<chrono::Utc>> =
                        row.try_get(i).map_err(get_err)?;
                    b.append_option(v.map(|t| t.timestamp_micros()));
                }
                Arc::new(b.finish()) as ArrayRef
            }
        };
        columns.push(array);
    }
    let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &options,
    )?)
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};

    use super::*;

    fn table() -> PostgresTable {
        PostgresTable {
            name: "lung".into(),
            from: "\"registry\".\"lung\"".into(),
            schema: Arc::new(Schema::new(vec![
                Field::new("age", DataType::Int32, true),
                Field::new("site", DataType::Utf8, true),
                Field::new("dose", DataType::Float64, true),
            ])),
            kinds: vec![Kind::Int32, Kind::Text, Kind::Numeric],
            connection: Arc::new(Connection {
                config: String::new(),
            }),
        }
    }

    #[test]
    fn a_scan_reads_only_its_columns_and_carries_safe_filters() {
        let t = table();
        let filters = vec![
            col("age").gt(lit(60)),
            col("site").eq(lit("lung")),
            // Text order follows PostgreSQL's collation: not sent.
            col("site").lt(lit("m")),
            // A function PostgreSQL may not share: not sent.
            datafusion::functions::expr_fn::abs(col("age")).gt(lit(3)),
            // NaN has no PostgreSQL literal that means the same: not sent.
            col("dose").gt(lit(f64::NAN)),
            // Floating point (here a numeric read as float8) is never sent.
            col("dose").gt_eq(lit(0.1)),
            // Integers and dates are, also under NOT.
            !col("age").in_list(vec![lit(1), lit(2)], false),
        ];
        assert_eq!(
            t.scan_sql(&[0, 2], &filters),
            "SELECT \"age\", \"dose\"::float8 AS \"dose\" FROM \"registry\".\"lung\" AS \
             railyard_source WHERE ((\"age\" > 60)) AND ((\"site\" = 'lung')) AND \
             (\"age\" NOT IN (1, 2))"
        );
        assert_eq!(
            t.scan_sql(&[], &[]),
            "SELECT  FROM \"registry\".\"lung\" AS railyard_source"
        );
        let pushed = t
            .supports_filters_pushdown(&filters.iter().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(
            pushed,
            vec![
                TableProviderFilterPushDown::Inexact,
                TableProviderFilterPushDown::Inexact,
                TableProviderFilterPushDown::Unsupported,
                TableProviderFilterPushDown::Unsupported,
                TableProviderFilterPushDown::Unsupported,
                TableProviderFilterPushDown::Unsupported,
                TableProviderFilterPushDown::Inexact,
            ]
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
    }
}
