//! The Railyard station: a sovereign Arrow Flight service over a data holder's own tables.
//!
//! A station never executes a plan it did not build itself. It receives a fragment as SQL
//! text inside a Flight ticket, plans it with its own DataFusion session against its own
//! tables (and the `partial_<agg>` functions from `railyard-udfs`), checks it against its own
//! policy (`railyard-policy`), runs it, holds the result to the policy's release rules,
//! writes an audit record (durably) and only then streams the Arrow batches back.
//!
//! ```text
//!   hub ── DoGet(ticket: {query_id, fragment, researcher, sql}) ──▶ StationService
//!                                                                     │ parse + plan (own session)
//!                                                                     │ railyard_policy::check
//!                                                                     │ execute over CSV / Parquet / PostgreSQL
//!                                                                     │ railyard_policy::release (k, models)
//!                                                                     │   or DP noise (ε charged first)
//!                                                                     │   or a train in Docker
//!                                                                     │ audit record (fsync, group commit)
//!   hub ◀──────────── Arrow IPC record batches (FlightData) ──────────┘
//! ```
//!
//! The station is the I/O shell around the pure rules of `railyard-policy`. Layout:
//! [`fragment`] (approve and run a fragment: plan cache, check, execute, release, audit),
//! `kept` (physical plans of fragments seen before), `rebind` (model rounds that differ only
//! in their coefficients run a kept plan with the new ones bound in),
//! [`private`] (DP fragments: ε and budget, charge, noise), [`train_run`] (train fragments:
//! image, input, container, output), [`service`] (the Flight service), [`source`] (files as
//! tables), [`postgres`] (PostgreSQL relations as tables), [`dp`] (OpenDP noise),
//! [`ledger`] (the durable ε ledger), [`train`] (the Docker sandbox), [`error`] (errors and
//! their one mapping to gRPC statuses). The audit log is the `railyard-audit` crate.

pub mod dp;
pub mod error;
mod file_reads;
mod file_schemas;
pub mod fragment;
mod kept;
pub mod ledger;
pub mod postgres;
pub mod private;
pub mod queryset;
mod rebind;
mod remembered;
pub mod service;
mod small_scans;
pub mod source;
pub mod train;
pub mod train_run;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::catalog::TableProvider;
use datafusion::execution::context::SessionState;
use datafusion::prelude::SessionContext;
use railyard_contract::{BudgetInfo, TablePolicyInfo};
use railyard_udfs::pseudonym::Pseudonym;
use tokio::net::TcpListener;

pub use error::{Error, Result};
pub use railyard_audit::{self as audit, AuditLog};
pub use railyard_policy::{self as policy, Policy, ROWS_COLUMN, Refusal, Release, Visibility};
pub use service::StationService;
pub use source::{Format, TableFile};

/// Largest gRPC message a station accepts or sends (Flight batches are split below this).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How a station is governed: its policy and where its audit log lives.
#[derive(Debug, Clone)]
pub struct StationConfig {
    pub policy: Policy,
    /// The audit log file (created with its directory if missing).
    pub audit_log: PathBuf,
    /// The secret shared by a collaboration's stations (never by its hub) that keys the
    /// pseudonyms of `join_key` columns; without one the station links no vertical table.
    pub collaboration_secret: Option<Arc<[u8]>>,
    /// A secret only its hub holds (`railyard local` draws one per run): with one, the
    /// station answers only requests that carry it in the `x-railyard-hub-secret` header.
    /// Without one, who may connect is the transport's business (mutual TLS in a
    /// deployment).
    pub hub_secret: Option<Arc<str>>,
}

/// A station: its name, its own DataFusion session over its tables, its policy and its
/// audit log.
pub struct Station {
    name: String,
    ctx: SessionContext,
    state: SessionState,
    policy: Policy,
    /// Whether the station holds a collaboration secret (can compute pseudonyms).
    keyed: bool,
    audit: AuditLog,
    /// Approved plans of fragments seen before, by SQL text. Only plans without stable or
    /// volatile functions are kept (the optimizer folds `now()` into a constant).
    plans: Mutex<HashMap<String, fragment::Approved>>,
    /// Physical plans of approved fragments seen before, by SQL text (see [`kept`]).
    kept: kept::KeptPlans,
    /// Physical plans of approved model rounds, by their text without the coefficients
    /// (see [`rebind`]).
    rebinder: rebind::Rebinder,
    /// The Arrow schema of each Parquet file, handed to its scans (see [`file_schemas`]).
    file_schemas: file_schemas::FileSchemas,
    /// Runs containerized trains (Docker is reached on the first train only).
    trains: train::Trains,
    /// The privacy ledger (ε spent), if the policy has a `[dp]` budget.
    ledger: Option<Arc<ledger::Ledger>>,
    /// Keys the noisy margin of the group-size thresholds (kept beside the audit log, so
    /// the same rows meet the same threshold after a restart).
    threshold_key: railyard_policy::release::ThresholdKey,
    /// See [`StationConfig::hub_secret`].
    hub_secret: Option<Arc<str>>,
    /// The query-set auditor's store (beside the audit log).
    querysets: Arc<queryset::QuerySets>,
    /// When each researcher's recent fragments ran (`max_fragments_per_minute`).
    recent: railyard_policy::gate::RateWindow,
    /// A digest of the policy (the `status` action).
    policy_version: String,
}

impl Station {
    /// Opens a station over `tables`. Fails, naming the file, if a table cannot be read, and
    /// naming the line, if the policy names a column a table does not have.
    pub async fn open(
        name: impl Into<String>,
        tables: &[TableFile],
        config: StationConfig,
    ) -> Result<Self> {
        Self::open_sources(name, tables, &[], config).await
    }

    /// Opens a station over files and PostgreSQL relations. Fails naming the table if one
    /// cannot be read.
    pub async fn open_sources(
        name: impl Into<String>,
        tables: &[TableFile],
        postgres: &[postgres::PostgresSource],
        config: StationConfig,
    ) -> Result<Self> {
        Self::open_with_commit(name, tables, postgres, config, audit::Commit::Group).await
    }

    /// [`Station::open_sources`], choosing how the audit log commits (benchmarks compare
    /// one `fsync` per record with group commit).
    pub async fn open_with_commit(
        name: impl Into<String>,
        tables: &[TableFile],
        postgres: &[postgres::PostgresSource],
        mut config: StationConfig,
        commit: audit::Commit,
    ) -> Result<Self> {
        let name = name.into();
        let mut providers: Vec<(String, Arc<dyn TableProvider>)> = Vec::new();
        for source in postgres {
            let table = postgres::PostgresTable::open(&name, source).await?;
            providers.push((source.name.clone(), Arc::new(table)));
        }
        let session = source::sized(
            railyard_udfs::fragment_session_config(),
            tables,
            !postgres.is_empty(),
        );
        let ctx = small_scans::install(railyard_udfs::fragment_context_with(session)?);
        // The station's files are read through buffers it reuses (`file_reads`).
        ctx.register_object_store(
            datafusion::execution::object_store::ObjectStoreUrl::local_filesystem().as_ref(),
            Arc::new(file_reads::ReusingFiles::default()),
        );
        if let Some(secret) = &config.collaboration_secret {
            let keyed = Pseudonym::keyed(Arc::clone(secret))
                .map_err(|e| Error::BadRequest(format!("station '{name}': {e}")))?;
            ctx.register_udf(keyed.udf());
        }
        for table in tables {
            table.register(&name, &ctx).await?;
        }
        for (table, provider) in providers {
            ctx.register_table(table.as_str(), provider)?;
        }
        // A reference table named without its digest (a PostgreSQL relation) is hashed
        // here, from its content in a canonical order.
        for (table, digest) in config.policy.reference_tables.iter_mut() {
            if digest.is_empty() {
                *digest = canonical_digest(&ctx, table).await.map_err(|e| {
                    Error::BadRequest(format!(
                        "station '{name}': reference table '{table}' cannot be hashed: {e}"
                    ))
                })?;
            }
        }
        let audit = AuditLog::open_with(&config.audit_log, &name, commit)?;
        let data_dir = config
            .audit_log
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(std::path::Path::to_path_buf);
        // Trains work beside the audit log, in the station's data directory.
        let work = data_dir
            .as_ref()
            .map_or_else(|| PathBuf::from("trains"), |d| d.join("trains"));
        let work = std::path::absolute(&work).unwrap_or(work);
        // The privacy ledger lives beside the audit log.
        let ledger = match &config.policy.dp {
            Some(_) => Some(Arc::new(ledger::Ledger::open(
                &data_dir.clone().unwrap_or_default().join("ledger.sqlite"),
            )?)),
            None => None,
        };
        // So does the query-set auditor's memory.
        let querysets = Arc::new(
            queryset::QuerySets::open(&data_dir.unwrap_or_default().join("querysets.sqlite"))
                .map_err(|e| Error::BadRequest(format!("station '{name}': {e}")))?,
        );
        let threshold_key = threshold_key(&config.audit_log, config.policy.threshold_noise)?
            .with_dominance(config.policy.model_dominance);
        let trains = train::Trains::new(
            &name,
            work,
            usize::try_from(config.policy.trains.max_concurrent).unwrap_or(usize::MAX),
        );
        let state = ctx.state();
        let policy_version = {
            use sha2::Digest;
            // The policy as loaded, every setting in a fixed order (its maps are ordered).
            let digest = sha2::Sha256::digest(format!("{:?}", config.policy).as_bytes());
            digest[..8].iter().map(|b| format!("{b:02x}")).collect()
        };
        let station = Self {
            name,
            ctx,
            state,
            policy_version,
            policy: config.policy,
            keyed: config.collaboration_secret.is_some(),
            audit,
            plans: Mutex::new(HashMap::new()),
            kept: kept::KeptPlans::default(),
            rebinder: rebind::Rebinder::default(),
            file_schemas: file_schemas::FileSchemas::default(),
            trains,
            ledger,
            threshold_key,
            hub_secret: config.hub_secret.clone(),
            querysets,
            recent: Default::default(),
        };
        for (table, schema) in station.tables().await? {
            station.policy.validate_table(&table, &schema)?;
            let (unit, source) = station.policy.privacy_unit(&table, &schema);
            use railyard_policy::file::UnitSource;
            let why = match source {
                UnitSource::Table => "its [tables] privacy_unit",
                UnitSource::Policy => "the policy's privacy_unit",
                UnitSource::Detected => "detected: no privacy_unit declared",
                UnitSource::Rows => "no privacy_unit declared or detected",
                UnitSource::Reference => "a reference table, no patient data",
            };
            match unit {
                Some(c) => eprintln!(
                    "station {}: table '{table}' counts distinct '{c}' as its unit ({why})",
                    station.name
                ),
                None => eprintln!(
                    "station {}: table '{table}' counts rows as its unit ({why})",
                    station.name
                ),
            }
        }
        let recovered = station.reconcile_ledger().await?;
        if recovered > 0 {
            eprintln!(
                "station {}: {recovered} ε charge(s) had no audit record (a crash between \
                 charge and record); recorded now as failed, rule {}",
                station.name,
                private::RECOVERED
            );
        }
        Ok(station)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the station says of itself: its software and policy versions.
    pub fn status(&self) -> railyard_contract::StationStatus {
        railyard_contract::StationStatus {
            station: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            policy_version: self.policy_version.clone(),
        }
    }

    pub(crate) fn threshold_key(&self) -> &railyard_policy::release::ThresholdKey {
        &self.threshold_key
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// The query-set auditor's store.
    pub fn query_sets(&self) -> &queryset::QuerySets {
        &self.querysets
    }

    /// The station's tables and their schemas, sorted by name.
    pub async fn tables(&self) -> Result<Vec<(String, SchemaRef)>> {
        let mut out = Vec::new();
        let catalog = self
            .ctx
            .catalog("datafusion")
            .ok_or_else(|| Error::Internal {
                station: self.name.clone(),
                message: "the station's default catalog is missing".to_string(),
            })?;
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            for table in schema.table_names() {
                if let Some(provider) = schema.table(&table).await? {
                    out.push((table, provider.schema()));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The policy of every table, resolved per column, as the station announces it.
    pub async fn policy_info(&self) -> Result<Vec<TablePolicyInfo>> {
        Ok(self
            .tables()
            .await?
            .into_iter()
            .map(|(table, schema)| self.policy.announce(&table, &schema))
            .collect())
    }

    /// The DP budget of `researcher` in `collaboration` on every table of the station
    /// (empty if the station answers no DP aggregates).
    pub async fn budget(&self, researcher: &str, collaboration: &str) -> Result<Vec<BudgetInfo>> {
        let (Some(policy), Some(ledger)) = (&self.policy.dp, &self.ledger) else {
            return Ok(Vec::new());
        };
        let researcher = railyard_contract::researcher_or_local(researcher).to_string();
        let collaboration = railyard_contract::collaboration_or_default(collaboration).to_string();
        let tables: Vec<String> = self
            .tables()
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| !self.policy.joined(t))
            .collect();
        let ledger = Arc::clone(ledger);
        let spent = blocking(&self.name, move || {
            tables
                .into_iter()
                .map(|t| Ok((ledger.spent(&researcher, &collaboration, &t)?, t)))
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        Ok(spent
            .into_iter()
            .map(|(spent, table)| BudgetInfo {
                spent,
                table,
                budget: policy.budget,
                max_query_epsilon: policy.max_epsilon,
                default_epsilon: policy.epsilon,
            })
            .collect())
    }
}

impl Station {
    /// Every account's DP spend at this station, with the budget each account has (empty
    /// if the station answers no DP aggregates).
    pub async fn spending(&self) -> Result<(Option<f64>, Vec<ledger::Spending>)> {
        let (Some(policy), Some(ledger)) = (&self.policy.dp, &self.ledger) else {
            return Ok((None, Vec::new()));
        };
        let ledger = Arc::clone(ledger);
        let rows = blocking(&self.name, move || Ok(ledger.spending()?)).await?;
        Ok((Some(policy.budget), rows))
    }
}

/// Runs blocking I/O (the SQLite ledger) on tokio's blocking pool, off the async workers.
async fn blocking<T: Send + 'static>(
    station: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal {
            station: station.to_string(),
            message: format!("a blocking task did not finish: {e}"),
        })?
}

/// Serves `station` over Arrow Flight on `listener` until `shutdown` resolves.
pub async fn serve(
    station: Arc<Station>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_incoming(station, railyard_net::serve::plaintext(listener), shutdown).await
}

/// Serves the station's Flight service on already established connections until `shutdown`:
/// mutual-TLS connections accepted from the hub, or (outbound mode) the connection the
/// station dialed to the hub.
pub async fn serve_incoming<I, IO, IE>(
    station: Arc<Station>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: futures::Stream<Item = std::result::Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let secret = station.hub_secret.clone();
    let name = station.name.clone();
    let only_the_hub = move |request: tonic::Request<()>| match &secret {
        None => Ok(request),
        Some(secret) => {
            let sent = request
                .metadata()
                .get(railyard_contract::HUB_SECRET_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if railyard_contract::same_secret(sent, secret.as_bytes()) {
                Ok(request)
            } else {
                Err(error::to_status(
                    &name,
                    Error::Refused(railyard_policy::gate::not_the_hub(&name)),
                ))
            }
        }
    };
    let server = FlightServiceServer::new(StationService::new(station))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let service = tonic::service::interceptor::InterceptedService::new(server, only_the_hub);
    railyard_net::serve::serve(tonic::service::Routes::new(service), incoming, shutdown).await?;
    Ok(())
}

/// The station's threshold key, beside its audit log (`<log>.threshold-key`): read if it
/// exists, else drawn from the OS's random source and written (readable by the station's
/// user only) before the station serves anything.
fn threshold_key(
    audit_log: &std::path::Path,
    noise: u64,
) -> Result<railyard_policy::release::ThresholdKey> {
    use std::io::{Read, Write};
    let path = audit_log.with_extension("threshold-key");
    let failed = |what: &str, e: std::io::Error| {
        Error::BadRequest(format!(
            "the threshold key {} cannot be {what}: {e}",
            path.display()
        ))
    };
    let mut bytes = [0u8; 32];
    match std::fs::File::open(&path) {
        Ok(mut f) => {
            f.read_exact(&mut bytes).map_err(|e| failed("read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::File::open("/dev/urandom")
                .and_then(|mut r| r.read_exact(&mut bytes))
                .map_err(|e| failed("drawn", e))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options.open(&path).map_err(|e| failed("written", e))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| failed("written", e))?;
        }
        Err(e) => return Err(failed("read", e)),
    }
    Ok(railyard_policy::release::ThresholdKey::new(bytes, noise))
}

/// The SHA-256 (hex) of a table's content: every row sorted by all columns, written as one
/// Arrow IPC stream. Two stations with the same rows and types get the same digest whatever
/// order their source returns them in.
async fn canonical_digest(ctx: &SessionContext, table: &str) -> datafusion::error::Result<String> {
    use sha2::Digest;
    let df = ctx.table(table).await?;
    let order: Vec<_> = df
        .schema()
        .columns()
        .into_iter()
        .map(|c| datafusion::prelude::col(c).sort(true, true))
        .collect();
    let batches = df.sort(order)?.collect().await?;
    let schema = ctx.table(table).await?.schema().inner().clone();
    let mut bytes = Vec::new();
    {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &schema)?;
        for b in &batches {
            writer.write(b)?;
        }
        writer.finish()?;
    }
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
