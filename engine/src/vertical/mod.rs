//! Vertically partitioned tables at the hub: the join station.
//!
//! A vertical table (the same patients' columns spread over stations, linked by a key) is
//! served to the planner by one extra station that the hub runs itself, in-process: the
//! *join station* ([`crate::join_station`]). Its only table is the vertical table, backed by
//! [`VerticalTable`], whose scan asks every member station for the pseudonymized columns it
//! holds and joins them.
//!
//! ```text
//!   hub planner ── fragment SQL ──▶ join station (railyard-policy: plan, policy check,
//!        ▲                          │              threshold; railyard-audit — as any station)
//!        │ partial states           │ scan of the vertical table:
//!        └──────────────────────────┤   check at every member, then DoGet at every member
//!                                   │   SELECT pseudonym(key) AS __pseudonym, cols FROM t …
//!                                   ▼   inner join on __pseudonym (in memory, this query only)
//!                       member stations (their own policies: join_key, allow_vertical)
//! ```
//!
//! The key decision: the join station *is* a station. The query over joined rows goes
//! through the same policy check, group-size threshold, model rules and hash-chained audit
//! log as any fragment, under the strictest policy of the member stations, so a vertical
//! query can release nothing a station's own rules would not, and every SQL function and
//! statistical model works on vertical tables unchanged.

mod cache;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch, RecordBatchOptions, UInt32Array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result as DfResult, plan_err};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use railyard_contract::{FragmentTicket, PSEUDONYM_COLUMN, ReleaseKind, TablePolicyInfo};
use railyard_planner::sql::expr_sql;
use railyard_planner::{VerticalLayout, VerticalMember};
use railyard_policy::Policy;
use railyard_policy::file::JoinLimits;
use railyard_policy::{Visibility, file::DEFAULT_MIN_GROUP_SIZE};

use crate::error::{Error, Result, StationFailure};
use crate::exec::fetch_all;
use crate::join_station::{JoinStation, Upstream};
use crate::station_client::StationClient;
use cache::{JoinCache, JoinKey};

/// The share of the fragment timeout the join station gives its members.
const MEMBER_TIMEOUT_SHARE: f64 = 0.9;

/// A vertically partitioned table the hub serves: every member station holds some of its
/// columns plus the linking column `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerticalSpec {
    pub name: String,
    pub key: String,
    /// The member stations (hub.toml's `members`). Empty: every station that announces
    /// `name` (`railyard local`). Listed: each must announce it, and a station that
    /// announces it without being listed is an error (its part would otherwise join
    /// silently, or be silently left out).
    pub members: Vec<String>,
}

/// The name of the join station of table `table` (in errors, the audit log, EXPLAIN).
fn join_station_name(table: &str) -> String {
    format!("hub join of {table}")
}

/// What a member station announced of the vertical table.
pub(crate) struct Member {
    pub client: StationClient,
    pub schema: SchemaRef,
    pub policy: Option<TablePolicyInfo>,
}

/// A join station, ready to be called.
pub(crate) struct StartedJoin {
    pub client: StationClient,
    pub layout: VerticalLayout,
}

/// Starts the join station of `spec` over `members` (in station-name order), with its audit
/// log at `audit_log`.
pub(crate) fn start(
    spec: &VerticalSpec,
    members: Vec<Member>,
    audit_log: &Path,
    fragment_timeout: Duration,
) -> Result<StartedJoin> {
    let table = &spec.name;
    let invalid =
        |message: String| Error::BadRequest(format!("vertical table '{table}': {message}"));
    if members.is_empty() {
        return Err(invalid("no station announces it".to_string()));
    }
    let mut fields = Vec::new();
    let mut layout = VerticalLayout {
        key: spec.key.clone(),
        members: Vec::new(),
    };
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for m in &members {
        let station = m.client.name.to_string();
        if m.schema.field_with_name(&spec.key).is_err() {
            return Err(invalid(format!(
                "station '{station}' has no key column '{}'",
                spec.key
            )));
        }
        let mut columns = Vec::new();
        for f in m.schema.fields() {
            if f.name() == &spec.key {
                continue;
            }
            if f.name() == PSEUDONYM_COLUMN {
                return Err(invalid(format!(
                    "station '{station}' has a column named {PSEUDONYM_COLUMN}, which the \
                     join reserves"
                )));
            }
            if let Some(other) = owners.insert(f.name().clone(), station.clone()) {
                return Err(invalid(format!(
                    "column '{}' is held by both station '{other}' and station '{station}'; \
                     each column of a vertical table must come from one station",
                    f.name()
                )));
            }
            columns.push(f.name().clone());
            fields.push(Arc::clone(f));
        }
        layout.members.push(VerticalMember { station, columns });
    }
    let schema = Arc::new(Schema::new(fields));
    let policy = join_policy(table, &spec.key, &members);
    let name = join_station_name(table);
    let provider = Arc::new(VerticalTable {
        name: table.clone(),
        layout: layout.clone(),
        schema,
        members: members.iter().map(|m| m.client.clone()).collect(),
        // Less than the hub gives the join station, so a member that hangs is named in the
        // error instead of the join station timing out first.
        timeout: fragment_timeout.mul_f64(MEMBER_TIMEOUT_SHARE),
        cache: Arc::default(),
    });
    let audit = railyard_audit::AuditLog::open(audit_log, &name)
        .map_err(|e| invalid(format!("its join station does not open: {e}")))?;
    let station = JoinStation::open(name, table.clone(), provider as _, policy, audit)
        .map_err(|e| invalid(format!("its join station does not open: {e}")))?;
    Ok(StartedJoin {
        client: StationClient::local(Arc::new(station)),
        layout,
    })
}

/// The join station's policy: the strictest of the members' for this table. Every column
/// is at most `aggregate` (joined rows never leave the hub), `dp` columns stay `dp`, and
/// `hidden`, `join_key` and any visibility this hub does not know become `hidden`; k, the
/// model minimum and the survival time resolution are the largest any member asks for, and
/// the table is marked joined (k applies even to an aggregate that names no column).
fn join_policy(table: &str, key: &str, members: &[Member]) -> Policy {
    let mut limits = JoinLimits {
        min_group_size: 1,
        model_min_rows: 1,
        survival_time_resolution: 0.0,
    };
    let defaults = Policy::default();
    let mut columns = BTreeMap::new();
    for m in members {
        let (k, min_rows, resolution) = match &m.policy {
            Some(info) => (
                info.min_group_size,
                info.model_min_rows,
                info.survival_time_resolution,
            ),
            // A station that announced no policy still checks every fragment itself; the
            // join applies the default rules.
            None => (
                DEFAULT_MIN_GROUP_SIZE,
                defaults.model_min_rows,
                defaults.survival_time_resolution,
            ),
        };
        limits.min_group_size = limits.min_group_size.max(k);
        limits.model_min_rows = limits.model_min_rows.max(min_rows);
        limits.survival_time_resolution = limits.survival_time_resolution.max(resolution);
        for (column, visibility) in m.policy.iter().flat_map(|info| &info.columns) {
            if column == key {
                continue;
            }
            let v = match visibility {
                Visibility::Public | Visibility::Aggregate => continue,
                Visibility::Dp => Visibility::Dp,
                Visibility::JoinKey | Visibility::Hidden => Visibility::Hidden,
            };
            columns.insert(column.clone(), v);
        }
    }
    Policy::for_join(table, limits, columns)
}

/// The vertical table inside the join station: its scan fetches pseudonymized columns from
/// the member stations and joins them.
#[derive(Debug)]
struct VerticalTable {
    name: String,
    layout: VerticalLayout,
    schema: SchemaRef,
    /// In the order of `layout.members`.
    members: Vec<StationClient>,
    /// How long the members may take, checks and fetches together.
    timeout: Duration,
    cache: Arc<JoinCache>,
}

#[async_trait]
impl TableProvider for VerticalTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// A filter over one member's columns runs at that member (inexactly: the join
    /// station applies it again, so its own plan never depends on a member's honesty).
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if self.layout.filter_owner(f).is_some() && expr_sql(f).is_ok() {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    /// Plans the members' fragments and, unless this query's join is already at hand, has
    /// every member check its fragment: the join station's own `check` runs this scan, so a
    /// member that refuses stops the query before any station anywhere runs a fragment.
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(ticket) = state.config().get_extension::<FragmentTicket>() else {
            return plan_err!(
                "vertical table '{}' is read only on behalf of a fragment ticket",
                self.name
            );
        };
        let deadline = Instant::now() + self.timeout;
        let output = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let columns: Vec<String> = output.fields().iter().map(|f| f.name().clone()).collect();
        let fragments = self
            .layout
            .member_fragments(&self.name, &columns, filters)
            .map_err(|e| DataFusionError::Plan(e.to_string()))?;
        let mut members = Vec::new();
        for (client, fragment) in self.members.iter().zip(&fragments) {
            let mut fields = vec![Arc::new(Field::new(
                PSEUDONYM_COLUMN,
                DataType::Binary,
                true,
            ))];
            for c in &fragment.columns {
                fields.push(Arc::new(self.schema.field_with_name(c)?.clone()));
            }
            members.push(MemberCall {
                client: client.clone(),
                ticket: FragmentTicket {
                    query_id: ticket.query_id.clone(),
                    fragment: ticket.fragment,
                    researcher: ticket.researcher.clone(),
                    collaboration: ticket.collaboration.clone(),
                    epsilon: None,
                    sql: fragment.sql.clone(),
                    train: None,
                },
                schema: Arc::new(Schema::new(fields)),
            });
        }
        // Where each output column comes from: (member, column in its answer).
        let mut sources = Vec::new();
        for c in &columns {
            let m = self.layout.owner(c).ok_or_else(|| {
                DataFusionError::Internal(format!("no station holds column '{c}'"))
            })?;
            let at = fragments[m]
                .columns
                .iter()
                .position(|x| x == c)
                .ok_or_else(|| DataFusionError::Internal(format!("column '{c}' not fetched")))?;
            sources.push((m, at + 1));
        }
        let key: JoinKey = (
            ticket.query_id.clone(),
            ticket.researcher.clone(),
            members.iter().map(|m| m.ticket.sql.clone()).collect(),
            columns,
        );
        if !self.cache.checked(&key, self.timeout) {
            check_members(&members, deadline).await?;
            self.cache.mark_checked(key.clone(), self.timeout);
        }
        Ok(Arc::new(VerticalExec::new(
            self.name.clone(),
            members,
            sources,
            output,
            JoinRun {
                key,
                deadline,
                ttl: self.timeout,
                cache: Arc::clone(&self.cache),
            },
        )))
    }
}

/// Every member checks its fragment, concurrently, by `deadline`; each must accept it as a
/// pseudonymized release.
async fn check_members(members: &[MemberCall], deadline: Instant) -> DfResult<()> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let checks = futures::future::join_all(members.iter().map(|m| async move {
        match tokio::time::timeout(remaining, m.client.check(&m.ticket)).await {
            Ok(Ok(answer)) if answer.release == ReleaseKind::Pseudonymized => Ok(()),
            Ok(Ok(answer)) => Err(Error::Station(Box::new(StationFailure::Protocol {
                station: m.client.name.to_string(),
                fragment: m.ticket.fragment,
                message: format!(
                    "it would release '{}' where the join expects pseudonymized rows",
                    answer.release
                ),
            }))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StationFailure::Timeout {
                station: m.client.name.to_string(),
                fragment: m.ticket.fragment,
                timeout: remaining,
            }
            .into()),
        }
    }))
    .await;
    for check in checks {
        check.map_err(upstream)?;
    }
    Ok(())
}

/// One member station's part of a scan.
#[derive(Debug, Clone)]
struct MemberCall {
    client: StationClient,
    ticket: FragmentTicket,
    schema: SchemaRef,
}

/// What one scan's run needs besides its members: where its join is kept and by when the
/// members must have answered.
#[derive(Debug, Clone)]
struct JoinRun {
    key: JoinKey,
    deadline: Instant,
    ttl: Duration,
    cache: Arc<JoinCache>,
}

/// Fetches every member's pseudonymized columns and joins them; one partition, one batch.
#[derive(Debug, Clone)]
struct VerticalExec {
    table: String,
    members: Vec<MemberCall>,
    sources: Vec<(usize, usize)>,
    schema: SchemaRef,
    run: JoinRun,
    properties: Arc<PlanProperties>,
}

impl VerticalExec {
    fn new(
        table: String,
        members: Vec<MemberCall>,
        sources: Vec<(usize, usize)>,
        schema: SchemaRef,
        run: JoinRun,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            table,
            members,
            sources,
            schema,
            run,
            properties: Arc::new(properties),
        }
    }

    async fn run(self) -> DfResult<RecordBatch> {
        let JoinRun {
            key,
            deadline,
            ttl,
            cache,
        } = &self.run;
        if let Some(joined) = cache.get(key, *ttl) {
            return Ok(joined);
        }
        let joined = self.fetch_and_join(*deadline).await?;
        cache.put(key.clone(), joined.clone(), *ttl);
        Ok(joined)
    }

    async fn fetch_and_join(&self, deadline: Instant) -> DfResult<RecordBatch> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answers = futures::future::join_all(self.members.iter().map(|m| async move {
            let mut answer = fetch_all(
                std::slice::from_ref(&m.client),
                &m.ticket,
                &m.schema,
                remaining,
                None,
            )
            .await?;
            Ok::<_, StationFailure>(answer.pop().unwrap_or_default())
        }))
        .await;
        let mut parts = Vec::with_capacity(answers.len());
        for (answer, m) in answers.into_iter().zip(&self.members) {
            let batches = answer.map_err(|f| upstream(f.into()))?;
            parts.push(concat_batches(&m.schema, &batches)?);
        }
        let stations: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.client.name.as_ref())
            .collect();
        join(&self.table, &stations, &parts, &self.sources, &self.schema)
    }
}

/// A member's failure as the join station reports it: the member's own message (which
/// names no data value), a refusal staying a refusal with its rule.
fn upstream(e: Error) -> DataFusionError {
    let (refused, message) = match &e {
        Error::Station(f) => match f.as_ref() {
            StationFailure::Refused { rule, message, .. } => (Some(rule.clone()), message.clone()),
            other => (None, other.to_string()),
        },
        other => (None, other.to_string()),
    };
    DataFusionError::External(Box::new(Upstream { refused, message }))
}

/// The inner join of the members' answers on their pseudonyms, projected to `sources`.
/// A pseudonym twice at one station (a key that is not unique there) is an error: the join
/// would silently multiply that patient's rows.
fn join(
    table: &str,
    stations: &[&str],
    parts: &[RecordBatch],
    sources: &[(usize, usize)],
    schema: &SchemaRef,
) -> DfResult<RecordBatch> {
    let mut indexes: Vec<HashMap<&[u8], u32>> = Vec::with_capacity(parts.len());
    for (part, station) in parts.iter().zip(stations) {
        let pseudonyms = part.column(0).as_binary::<i32>();
        let mut index = HashMap::with_capacity(pseudonyms.len());
        for row in 0..pseudonyms.len() {
            if pseudonyms.is_null(row) {
                continue;
            }
            if index.insert(pseudonyms.value(row), row as u32).is_some() {
                return Err(DataFusionError::External(Box::new(Upstream {
                    refused: None,
                    message: format!(
                        "vertical table '{table}': its key is not unique at station \
                         '{station}' (each patient must have one row per station)"
                    ),
                })));
            }
        }
        indexes.push(index);
    }
    // Walk the smallest member in its row order: the result does not depend on hashing.
    let driver = (0..parts.len())
        .min_by_key(|&i| parts[i].num_rows())
        .unwrap_or(0);
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); parts.len()];
    if let Some(first) = parts.get(driver) {
        let pseudonyms = first.column(0).as_binary::<i32>();
        'row: for row in 0..pseudonyms.len() {
            if pseudonyms.is_null(row) {
                continue;
            }
            let p = pseudonyms.value(row);
            let mut hit = Vec::with_capacity(parts.len());
            for index in &indexes {
                match index.get(p) {
                    Some(r) => hit.push(*r),
                    None => continue 'row,
                }
            }
            for (m, r) in hit.into_iter().enumerate() {
                rows[m].push(r);
            }
        }
    }
    let joined = rows.first().map_or(0, Vec::len);
    let indices: Vec<UInt32Array> = rows.into_iter().map(UInt32Array::from).collect();
    let columns = sources
        .iter()
        .map(|&(m, c)| take(parts[m].column(c).as_ref(), &indices[m], None))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(joined)),
    )?)
}

impl DisplayAs for VerticalExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.client.name.as_ref())
            .collect();
        write!(
            f,
            "VerticalExec: join of {} over [{}] on pseudonyms",
            self.table,
            names.join(", ")
        )
    }
}

impl ExecutionPlan for VerticalExec {
    crate::exec::leaf_exec!("VerticalExec");

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "VerticalExec has no partition {partition}"
            )));
        }
        let exec = self.clone();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::once(exec.run()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{BinaryArray, Int64Array};

    use super::*;

    fn part(pseudonyms: &[Option<&[u8]>], values: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new(PSEUDONYM_COLUMN, DataType::Binary, true),
                Field::new("v", DataType::Int64, true),
            ])),
            vec![
                Arc::new(BinaryArray::from(pseudonyms.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_join_keeps_rows_every_member_holds_and_refuses_duplicate_keys() {
        let a = part(
            &[Some(b"p1"), Some(b"p2"), Some(b"p3"), None],
            &[1, 2, 3, 4],
        );
        let b = part(&[Some(b"p3"), Some(b"p1"), Some(b"p9")], &[30, 10, 90]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
        ]));
        let joined = join(
            "t",
            &["a", "b"],
            &[a.clone(), b],
            &[(0, 1), (1, 1)],
            &schema,
        )
        .unwrap();
        let col = |i: usize| {
            joined
                .column(i)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        };
        // Driven by the smaller member (b) in its row order.
        assert_eq!(col(0), vec![3, 1]);
        assert_eq!(col(1), vec![30, 10]);

        // No output column (count(*)): only the row count.
        let empty = Arc::new(Schema::empty());
        let c = part(&[Some(b"p2"), Some(b"p1")], &[0, 0]);
        let counted = join("t", &["a", "c"], &[a.clone(), c], &[], &empty).unwrap();
        assert_eq!(counted.num_rows(), 2);

        let twice = part(&[Some(b"p1"), Some(b"p1")], &[5, 6]);
        let err = join("t", &["a", "d"], &[a, twice], &[], &empty).unwrap_err();
        assert!(
            err.to_string().contains("not unique at station 'd'"),
            "{err}"
        );
    }
}
