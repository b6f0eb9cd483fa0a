//! The Arrow schema of each Parquet file a station reads, kept by the file's identity and
//! handed to every scan of that file (`PartitionedFile::arrow_schema`).
//!
//! Without it the Parquet reader derives the schema again on every open of a file: it
//! decodes the Arrow schema the writer embedded in the file's metadata (`ARROW:schema`:
//! base64 of an Arrow IPC message, verified, then converted) and matches it to the Parquet
//! schema. For a 32-column table that is about 200,000 instructions per open, a tenth of a
//! small fragment's work at a station (issue 24). Given a schema, the reader only matches it
//! to the file's Parquet schema, which it still checks on every open.
//!
//! The schema kept is the one the reader would derive itself (the same call,
//! `ArrowReaderMetadata::try_new` with default options, over the file's footer), read once
//! per file identity: path, size, modification time and entity tag (the local store's
//! inode-mtime-size), as the listing of the scan saw them. A file rewritten or replaced is a
//! new identity and is read again; a file whose open descriptor no longer matches that
//! identity after its footer was read (replaced or rewritten meanwhile) is not kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileScanConfig, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::object_store::ObjectMeta;
use datafusion::parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use datafusion::parquet::file::metadata::ParquetMetaDataReader;
use datafusion::physical_plan::ExecutionPlan;

/// File identities a station keeps schemas for; past it the map starts over.
const ENTRIES: usize = 4096;

/// A file as a scan's listing saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Identity {
    location: String,
    size: u64,
    modified: i64,
    e_tag: Option<String>,
}

impl Identity {
    fn of(meta: &ObjectMeta) -> Self {
        Self {
            location: meta.location.to_string(),
            size: meta.size,
            modified: meta.last_modified.timestamp_nanos_opt().unwrap_or(i64::MAX),
            e_tag: meta.e_tag.clone(),
        }
    }
}

#[derive(Default)]
pub(crate) struct FileSchemas {
    schemas: Mutex<HashMap<Identity, SchemaRef>>,
}

impl FileSchemas {
    /// `plan` with every Parquet file it scans given its kept schema (read now for a file
    /// not seen before). Files whose schema cannot be read are left to the reader, which
    /// then reports what is wrong with them.
    pub(crate) async fn supply(
        &self,
        plan: Arc<dyn ExecutionPlan>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // The files not seen before, read off the runtime's threads.
        let mut unseen = Vec::new();
        plan.apply(|node| {
            if let Some(config) = parquet_scan(node) {
                for file in config.file_groups.iter().flat_map(|g| g.iter()) {
                    if file.arrow_schema.is_none() && self.get(&file.object_meta).is_none() {
                        unseen.push(file.object_meta.clone());
                    }
                }
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })?;
        if !unseen.is_empty() {
            let read = tokio::task::spawn_blocking(move || {
                unseen
                    .into_iter()
                    .filter_map(|meta| read_schema(&meta).map(|s| (Identity::of(&meta), s)))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
            let mut schemas = self.schemas.lock().unwrap_or_else(|p| p.into_inner());
            if schemas.len() + read.len() > ENTRIES {
                schemas.clear();
            }
            schemas.extend(read);
        }
        plan.transform_up(|node| {
            let Some(config) = parquet_scan(&node) else {
                return Ok(Transformed::no(node));
            };
            let mut config = config.clone();
            let mut changed = false;
            for group in &mut config.file_groups {
                let mut files: Vec<PartitionedFile> = Vec::with_capacity(group.len());
                while let Some(file) = group.pop() {
                    files.push(file);
                }
                for mut file in files.into_iter().rev() {
                    if file.arrow_schema.is_none()
                        && let Some(schema) = self.get(&file.object_meta)
                    {
                        file.arrow_schema = Some(schema);
                        changed = true;
                    }
                    group.push(file);
                }
            }
            if !changed {
                return Ok(Transformed::no(node));
            }
            let source = node
                .downcast_ref::<DataSourceExec>()
                .expect("parquet_scan matched a DataSourceExec");
            let exec = source.clone().with_data_source(Arc::new(config));
            Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>))
        })
        .map(|t| t.data)
    }

    fn get(&self, meta: &ObjectMeta) -> Option<SchemaRef> {
        let schemas = self.schemas.lock().unwrap_or_else(|p| p.into_inner());
        schemas.get(&Identity::of(meta)).cloned()
    }
}

/// The file scan configuration of a Parquet scan node.
fn parquet_scan(node: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    let config = node
        .downcast_ref::<DataSourceExec>()?
        .data_source()
        .downcast_ref::<FileScanConfig>()?;
    config
        .file_source()
        .downcast_ref::<ParquetSource>()
        .map(|_| config)
}

/// The Arrow schema the Parquet reader derives for the local file `meta` describes, if the
/// file read is that file.
fn read_schema(meta: &ObjectMeta) -> Option<SchemaRef> {
    let file = std::fs::File::open(crate::kept::local_path(meta)).ok()?;
    let metadata = ParquetMetaDataReader::new().parse_and_finish(&file).ok()?;
    // What was read belongs to `meta` only if the open file (the same descriptor) still
    // is that file: one replaced or rewritten since the listing is not kept.
    let now = file.metadata().ok()?;
    if !crate::kept::describes(meta, &now) {
        return None;
    }
    ArrowReaderMetadata::try_new(Arc::new(metadata), ArrowReaderOptions::new())
        .ok()
        .map(|m| Arc::clone(m.schema()))
}
