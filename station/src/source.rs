//! A station's data: local files registered as tables of its own DataFusion session.

use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};

use crate::error::{Error, Result};

/// File formats a station reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Parquet,
}

impl Format {
    /// The format of a file by its extension (`.csv`, `.parquet`), if Railyard reads it.
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// One table of a station, backed by one file.
#[derive(Debug, Clone)]
pub struct TableFile {
    pub name: String,
    pub path: PathBuf,
    pub format: Format,
    /// The schema to read the file with. For CSV this replaces type inference, so that all
    /// stations of a federated table read the same types; `None` infers (CSV) or uses the
    /// file's own schema (Parquet).
    pub schema: Option<SchemaRef>,
}

impl TableFile {
    pub(crate) async fn register(&self, station: &str, ctx: &SessionContext) -> Result<()> {
        let path = self
            .path
            .to_str()
            .ok_or_else(|| self.error(station, "path is not UTF-8"))?;
        // A single-file table still filters by extension: use the file's own spelling.
        let extension = format!(
            ".{}",
            self.path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default()
        );
        let registered = match self.format {
            Format::Csv => {
                let mut options = CsvReadOptions::new()
                    .has_header(true)
                    .file_extension(&extension);
                if let Some(schema) = &self.schema {
                    options = options.schema(schema.as_ref());
                }
                ctx.register_csv(&self.name, path, options).await
            }
            Format::Parquet => {
                let mut options = ParquetReadOptions::default().file_extension(&extension);
                if let Some(schema) = &self.schema {
                    options = options.schema(schema.as_ref());
                }
                ctx.register_parquet(&self.name, path, options).await
            }
        };
        registered.map_err(|e| self.error(station, &e.strip_backtrace()))
    }

    fn error(&self, station: &str, message: &str) -> Error {
        Error::Source {
            station: station.to_string(),
            table: self.name.clone(),
            message: format!("{}: {message}", self.path.display()),
        }
    }
}

/// `config` with the settings that follow the size of a station's files (read once, when
/// the station opens): its partitions and its batch size. `postgres`: the station also
/// reads PostgreSQL relations.
pub(crate) fn sized(config: SessionConfig, tables: &[TableFile], postgres: bool) -> SessionConfig {
    let sizes: Vec<Option<u64>> = tables
        .iter()
        .map(|t| std::fs::metadata(&t.path).ok().map(|m| m.len()))
        .collect();
    config
        .with_target_partitions(partitions_for(&sizes))
        .with_batch_size(batch_size_for(&sizes, postgres))
}

/// Bytes of data per partition a station aims for.
const BYTES_PER_PARTITION: u64 = 16 * 1024 * 1024;

/// How many partitions a station's queries use: one per [`BYTES_PER_PARTITION`] of its
/// files, at most one per core. Small stations answer fastest from one partition (no
/// repartitioning between the two aggregation phases); large ones use every core.
fn partitions_for(sizes: &[Option<u64>]) -> usize {
    let bytes: u64 = sizes.iter().flatten().sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (bytes.div_ceil(BYTES_PER_PARTITION) as usize).clamp(1, cores)
}

/// Rows per batch a station's queries use: DataFusion's 8,192 for any sizeable data, fewer
/// for small files. Each file a query scans gets a reader sized for a whole batch (for CSV,
/// offsets for batch × columns fields, allocated and zeroed per scan), a visible part of a
/// small station's fragment. The largest file's bytes / 32 (a short row) is taken as its
/// rows, rounded up to a power of two, at least 256; it is measured when the station opens.
/// Only speed depends on it: a file with more rows than a batch is read in more batches.
/// Stations that also read PostgreSQL relations, whose sizes are not known here, keep the
/// default.
fn batch_size_for(sizes: &[Option<u64>], postgres: bool) -> usize {
    const DEFAULT: usize = 8192;
    const SMALLEST: usize = 256;
    if postgres {
        return DEFAULT;
    }
    let largest = sizes
        .iter()
        .map(|size| size.unwrap_or(u64::MAX))
        .max()
        .unwrap_or(u64::MAX);
    let rows = usize::try_from(largest / 32).unwrap_or(usize::MAX);
    rows.checked_next_power_of_two()
        .unwrap_or(DEFAULT)
        .clamp(SMALLEST, DEFAULT)
}
