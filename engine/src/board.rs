//! What the hub knows of each station right now: online or not, when it last answered, what
//! it announced (tables, policy and software versions). `SELECT * FROM railyard.stations`
//! reads it; a query that needs a station the board has marked offline fails at once,
//! naming the station, instead of waiting out a timeout.
//!
//! The board is filled when the hub connects and then by [`crate::Hub::probe`], which a
//! deployed hub calls every few seconds; it outlives a hub whose catalog is rebuilt, so a
//! station's history (last seen) survives the rebuild.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use arrow::array::{BooleanArray, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::error::StationFailure;

/// The name of the table, under the `railyard` schema.
pub const STATIONS_TABLE: &str = "stations";

/// One station's announcement: its tables with their schemas, its policy per table, its
/// software and policy versions.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub tables: Vec<(String, SchemaRef)>,
    pub policies: Vec<railyard_contract::TablePolicyInfo>,
    /// `None`: the station does not answer the `status` action (an older version).
    pub status: Option<railyard_contract::StationStatus>,
}

impl Announcement {
    /// A digest of everything the hub's catalog is built from: a hub whose station announces
    /// a different digest has a stale catalog.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        let mut tables: Vec<_> = self.tables.iter().collect();
        tables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, schema) in tables {
            hash.update(name.as_bytes());
            hash.update(b"\0");
            for f in schema.fields() {
                hash.update(format!(
                    "{}:{}:{};",
                    f.name(),
                    f.data_type(),
                    f.is_nullable()
                ));
            }
            hash.update(b"\n");
        }
        hash.update(serde_json::to_vec(&self.policies).unwrap_or_default());
        if let Some(status) = &self.status {
            hash.update(status.policy_version.as_bytes());
        }
        hex::encode(&hash.finalize()[..8])
    }
}

/// One station's row of the board.
#[derive(Debug, Clone, Default)]
pub struct StationState {
    pub online: bool,
    /// The last time it answered (None: never since the hub started).
    pub last_seen: Option<SystemTime>,
    pub tables: Vec<String>,
    /// The digest of its whole policy, as the station reports it (`status` action).
    pub policy_version: Option<String>,
    pub software_version: Option<String>,
    /// Why it is offline (a transport error; never data).
    pub error: Option<String>,
}

/// The stations of one hub (or of every rebuild of it).
#[derive(Debug, Default)]
pub struct StationBoard {
    stations: RwLock<BTreeMap<String, StationState>>,
}

impl StationBoard {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// `name` answered, announcing `announcement`.
    pub fn seen(&self, name: &str, announcement: &Announcement) {
        let mut tables: Vec<String> = announcement.tables.iter().map(|(t, _)| t.clone()).collect();
        tables.sort();
        let state = StationState {
            online: true,
            last_seen: Some(SystemTime::now()),
            tables,
            policy_version: announcement
                .status
                .as_ref()
                .map(|s| s.policy_version.clone()),
            software_version: announcement.status.as_ref().map(|s| s.version.clone()),
            error: None,
        };
        self.write().insert(name.to_string(), state);
    }

    /// `name` did not answer: `error` says how.
    pub fn lost(&self, name: &str, error: String) {
        let mut stations = self.write();
        let state = stations.entry(name.to_string()).or_default();
        state.online = false;
        state.error = Some(error);
    }

    /// Forgets stations no longer in `names` (removed from the configuration).
    pub fn retain(&self, names: &[String]) {
        self.write().retain(|n, _| names.contains(n));
    }

    /// The failure a query that needs `name` meets at once, if the board has it offline.
    pub fn ensure_online(&self, name: &str) -> Result<(), StationFailure> {
        let stations = self.read();
        match stations.get(name) {
            Some(state) if !state.online => Err(StationFailure::Offline {
                station: name.to_string(),
                last_seen: state.last_seen.map_or_else(
                    || "never since the hub started".to_string(),
                    |t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339(),
                ),
                error: state.error.clone().unwrap_or_default(),
            }),
            _ => Ok(()),
        }
    }

    pub fn snapshot(&self) -> Vec<(String, StationState)> {
        self.read()
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, StationState>> {
        self.stations.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, StationState>> {
        self.stations.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn stations_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("station", DataType::Utf8, false),
        Field::new("online", DataType::Boolean, false),
        Field::new(
            "last_seen",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        // The tables it announces, comma-separated (a researcher sees only their
        // collaboration's).
        Field::new("tables", DataType::Utf8, false),
        Field::new("policy_version", DataType::Utf8, true),
        Field::new("software_version", DataType::Utf8, true),
    ]))
}

/// `railyard.stations`: the board as a table, read afresh by every query.
#[derive(Debug)]
pub struct StationsTable {
    pub(crate) board: Arc<StationBoard>,
    /// The stations of this hub, and the tables its researchers may see.
    pub(crate) stations: Vec<String>,
    pub(crate) served: Option<Vec<String>>,
}

impl StationsTable {
    fn batch(&self) -> DfResult<RecordBatch> {
        let snapshot = self.board.snapshot();
        let mut rows: Vec<&(String, StationState)> = snapshot
            .iter()
            .filter(|(n, _)| self.stations.contains(n))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let visible = |t: &String| self.served.as_ref().is_none_or(|s| s.contains(t));
        let millis = |t: &Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let batch = RecordBatch::try_new(
            stations_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|(n, _)| n))),
                Arc::new(BooleanArray::from_iter(
                    rows.iter().map(|(_, s)| Some(s.online)),
                )),
                Arc::new(
                    TimestampMillisecondArray::from_iter(
                        rows.iter().map(|(_, s)| millis(&s.last_seen)),
                    )
                    .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|(_, s)| {
                    s.tables
                        .iter()
                        .filter(|t| visible(t))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(",")
                }))),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|(_, s)| s.policy_version.clone()),
                )),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|(_, s)| s.software_version.clone()),
                )),
            ],
        )?;
        Ok(batch)
    }
}

#[async_trait]
impl TableProvider for StationsTable {
    fn schema(&self) -> SchemaRef {
        stations_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let table = MemTable::try_new(stations_schema(), vec![vec![self.batch()?]])?;
        table.scan(state, projection, filters, limit).await
    }
}
