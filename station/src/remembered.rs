//! Small files read once per kept plan: a kept plan's scan of files adding up to at most
//! [`SMALL_SCAN_BYTES`] keeps the batches it read and answers the plan's later runs from
//! them, while every file it reads is still the file the plan listed.
//!
//! ```text
//!   kept plan ─ RememberedScanExec ─ DataSourceExec (CSV / Parquet, small files)
//!   run 1:  read the files ──▶ batches ──▶ kept, if every file is still the one listed
//!   run n:  every file still the one listed (size, modification time, inode)?
//!             yes ─▶ the kept batches          no ─▶ read the files again
//! ```
//!
//! Opening a scan costs a small fragment more than what it reads: a CSV reader builds its
//! parsing automaton and zeroes buffers for a whole batch on every open, a Parquet reader
//! decodes the file's footer and metadata. A station's small tables are read by every run of
//! every query, so these costs were most of a small aggregate's instructions at a station.
//!
//! What a run releases does not change: the batches are what the same scan of the same files
//! produced (same projection and limit: each wrapped scan keeps its own), and each run still
//! computes, checks the release rules, audits and releases as before. Only a scan in one
//! partition is wrapped (the partitions of a scan share its files as they go, so what one
//! partition reads differs from run to run), and only one without a predicate (its output
//! could depend on a filter set while it runs; small scans get none, `small_scans.rs`). A
//! run that fails or stops early keeps nothing, nor does one that read a file modified less
//! than a second before (see [`SETTLED`]). The batches a station keeps are bounded
//! ([`KEPT_BYTES`]); a scan whose batches do not fit reads its files every time.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::object_store::ObjectMeta;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::Stream;

use crate::kept::{describes, local_path, same_file};
use crate::small_scans::SMALL_SCAN_BYTES;

/// Bytes of batches (Arrow memory) a station keeps for all its kept plans together.
pub(crate) const KEPT_BYTES: usize = 64 * 1024 * 1024;

/// The bytes a station's remembered scans hold, against [`KEPT_BYTES`].
#[derive(Debug, Default)]
pub(crate) struct KeptBytes {
    used: AtomicUsize,
}

impl KeptBytes {
    /// Takes `bytes` from the allowance, if they fit.
    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= KEPT_BYTES)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// `plan` with each scan of small files wrapped so that it remembers what it read.
pub(crate) fn remember_small_scans(
    plan: Arc<dyn ExecutionPlan>,
    bytes: &Arc<KeptBytes>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if !is_small_scan(&node) {
            return Ok(Transformed::no(node));
        }
        Ok(Transformed::yes(Arc::new(RememberedScanExec {
            memo: Arc::new(Memo {
                batches: Mutex::new(None),
                bytes: Arc::clone(bytes),
                held: AtomicUsize::new(0),
            }),
            inner: node,
        }) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// A scan of local files in one partition without a predicate, adding up to at most
/// [`SMALL_SCAN_BYTES`]. One partition: the partitions of a scan share its files as they
/// go (one may open a file listed for another), so what one partition read in one run is
/// not what it reads in the next.
fn is_small_scan(node: &Arc<dyn ExecutionPlan>) -> bool {
    if node.properties().partitioning.partition_count() != 1 {
        return false;
    }
    let Some(config) = node
        .downcast_ref::<DataSourceExec>()
        .and_then(|s| s.data_source().downcast_ref::<FileScanConfig>())
    else {
        return false;
    };
    if config.file_source().filter().is_some() {
        return false;
    }
    let mut total: u64 = 0;
    for file in config.file_groups.iter().flat_map(|g| g.iter()) {
        total = total.saturating_add(file.object_meta.size);
    }
    total <= SMALL_SCAN_BYTES
}

/// The file scan a node runs: a `DataSourceExec` over files, or one wrapped here.
pub(crate) fn file_scan(node: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    let scan = match node.downcast_ref::<RememberedScanExec>() {
        Some(remembered) => &remembered.inner,
        None => node,
    };
    scan.downcast_ref::<DataSourceExec>()
        .and_then(|s| s.data_source().downcast_ref::<FileScanConfig>())
}

/// Whether `test` holds for every file `scan` reads.
fn files_of(scan: &Arc<dyn ExecutionPlan>, test: fn(&ObjectMeta) -> bool) -> bool {
    file_scan(scan).is_some_and(|config| {
        config
            .file_groups
            .iter()
            .flat_map(|group| group.iter())
            .all(|file| test(&file.object_meta))
    })
}

/// How long before a read a file must have been modified last for what was read to be
/// kept: a file written again within its file system's timestamp granularity (a few
/// milliseconds on ext4) could keep its size and modification time, and a later run would
/// not see the change. A file older than this that is written again gets a later time.
const SETTLED: Duration = Duration::from_secs(1);

/// Whether the file `meta` describes is still that file and was last modified more than
/// [`SETTLED`] ago.
fn settled(meta: &ObjectMeta) -> bool {
    let Ok(now) = std::fs::metadata(local_path(meta)) else {
        return false;
    };
    describes(meta, &now)
        && now
            .modified()
            .is_ok_and(|modified| modified + SETTLED <= SystemTime::now())
}

/// What a wrapped scan read, shared by every copy of its kept plan.
struct Memo {
    batches: Mutex<Option<Vec<RecordBatch>>>,
    bytes: Arc<KeptBytes>,
    /// Bytes this memo took from the station's allowance.
    held: AtomicUsize,
}

impl Drop for Memo {
    fn drop(&mut self) {
        self.bytes.give_back(*self.held.get_mut());
    }
}

impl Memo {
    fn get(&self) -> Option<Vec<RecordBatch>> {
        // The lock guards reads and writes of the slot only; after a panic it is valid.
        let batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        batches.clone()
    }

    fn put(&self, read: Vec<RecordBatch>) {
        let size: usize = read.iter().map(RecordBatch::get_array_memory_size).sum();
        let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        // Two runs may fill it at once: the first one's batches stay.
        if batches.is_some() || !self.bytes.take(size) {
            return;
        }
        self.held.fetch_add(size, Ordering::AcqRel);
        *batches = Some(read);
    }
}

/// A small-file scan that answers from what it read before while its files are unchanged
/// (see the module docs). A leaf: the scan it wraps is its own, not a child, so that each
/// run's copy of the kept plan shares what was read.
pub(crate) struct RememberedScanExec {
    inner: Arc<dyn ExecutionPlan>,
    memo: Arc<Memo>,
}

impl fmt::Debug for RememberedScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RememberedScanExec")
            .field("inner", &self.inner)
            .finish()
    }
}

impl DisplayAs for RememberedScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "RememberedScanExec: ")?;
        match self.inner.downcast_ref::<DataSourceExec>() {
            Some(scan) => scan.fmt_as(t, f),
            None => write!(f, "{}", self.inner.name()),
        }
    }
}

impl ExecutionPlan for RememberedScanExec {
    fn name(&self) -> &str {
        "RememberedScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        ) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "RememberedScanExec has no children".to_string(),
            ))
        }
    }

    /// A copy for another run: the scan's own run state reset, what it read shared.
    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(RememberedScanExec {
            inner: Arc::clone(&self.inner).reset_state()?,
            memo: Arc::clone(&self.memo),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let schema = self.inner.schema();
        if partition == 0
            && let Some(batches) = self.memo.get()
            && files_of(&self.inner, same_file)
        {
            let batches = futures::stream::iter(batches.into_iter().map(Ok));
            return Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)));
        }
        let stream = self.inner.execute(partition, context)?;
        Ok(Box::pin(Remembering {
            stream,
            schema,
            // A partition the scan does not have fails in it, below; it keeps nothing.
            read: (partition == 0).then(Vec::new),
            scan: Arc::clone(&self.inner),
            memo: Arc::clone(&self.memo),
        }))
    }
}

/// A scan's stream that hands its batches on and, once it ends without an error, keeps
/// them if its files are still the ones listed.
struct Remembering {
    stream: SendableRecordBatchStream,
    schema: SchemaRef,
    /// What was read so far; `None` once an error was seen (nothing is kept).
    read: Option<Vec<RecordBatch>>,
    scan: Arc<dyn ExecutionPlan>,
    memo: Arc<Memo>,
}

impl Stream for Remembering {
    type Item = Result<RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let next = self.stream.as_mut().poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(batch))) => {
                if let Some(read) = self.read.as_mut() {
                    read.push(batch.clone());
                }
            }
            Poll::Ready(Some(Err(_))) => self.read = None,
            Poll::Ready(None) => {
                if let Some(read) = self.read.take()
                    && files_of(&self.scan, settled)
                {
                    self.memo.put(read);
                }
            }
            Poll::Pending => {}
        }
        next
    }
}

impl RecordBatchStream for Remembering {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use datafusion::physical_plan::collect;
    use datafusion::physical_plan::execution_plan::reset_plan_states;
    use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};
    use futures::StreamExt;

    const LUNG: &str = "../tests/data/lung/horizontal/csv/station_a.csv";

    fn lung() -> String {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(LUNG))
            .unwrap()
    }

    /// Sets `path`'s modification time `ago` before now.
    fn modified(path: &std::path::Path, ago: Duration) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    /// A session reading `path` as `lung`, four rows per batch (so that a scan yields
    /// several batches).
    async fn session(path: &std::path::Path) -> SessionContext {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_batch_size(4));
        ctx.register_csv("lung", path.to_str().unwrap(), CsvReadOptions::new())
            .await
            .unwrap();
        ctx
    }

    /// The rows of `batches`, as text, sorted: the order of a scan's partitions is free.
    fn rows(batches: &[RecordBatch]) -> Vec<String> {
        let text = arrow::util::pretty::pretty_format_batches(batches)
            .unwrap()
            .to_string();
        let mut rows: Vec<String> = text.lines().map(str::to_string).collect();
        rows.sort();
        rows
    }

    /// What DataFusion answers to `sql` over the file as it is now: a new session, nothing
    /// kept.
    async fn reference(path: &std::path::Path, sql: &str) -> Vec<String> {
        rows(
            &session(path)
                .await
                .sql(sql)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap(),
        )
    }

    async fn kept_plan(
        path: &std::path::Path,
        sql: &str,
        bytes: &Arc<KeptBytes>,
    ) -> (Arc<dyn ExecutionPlan>, SessionContext) {
        let ctx = session(path).await;
        let plan = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let plan = remember_small_scans(plan, bytes).unwrap();
        let mut wrapped = 0;
        plan.apply(|node| {
            wrapped += usize::from(node.downcast_ref::<RememberedScanExec>().is_some());
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        assert_eq!(wrapped, 1, "the scan of a small file is wrapped");
        (plan, ctx)
    }

    /// One run of a copy of `plan`, as a kept plan is run.
    async fn run(plan: &Arc<dyn ExecutionPlan>, ctx: &SessionContext) -> Vec<String> {
        let copy = reset_plan_states(Arc::clone(plan)).unwrap();
        rows(&collect(copy, ctx.task_ctx()).await.unwrap())
    }

    const SQL: &str = "SELECT sex, count(*) AS n, sum(age) AS s, min(patient_id) AS p FROM lung \
                       GROUP BY sex";

    /// A kept plan's scan answers from what it read while its file is the one it listed,
    /// reads the file again once it is not, and keeps nothing from a file modified just
    /// before it was read.
    #[tokio::test]
    async fn a_small_file_is_read_once_while_it_is_the_file_planned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lung.csv");
        let original = lung();
        std::fs::write(&path, &original).unwrap();
        let bytes = Arc::new(KeptBytes::default());

        // Written just now: answered, nothing kept.
        let (fresh, ctx) = kept_plan(&path, SQL, &bytes).await;
        assert_eq!(run(&fresh, &ctx).await, reference(&path, SQL).await);
        assert_eq!(bytes.used(), 0, "nothing kept from a file written just now");
        drop(fresh);

        // Settled: the first run keeps what it read, and later runs answer the same.
        let an_hour = Duration::from_secs(3600);
        modified(&path, an_hour);
        let planned_mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let (plan, ctx) = kept_plan(&path, SQL, &bytes).await;
        let expected = reference(&path, SQL).await;
        assert_eq!(run(&plan, &ctx).await, expected);
        let held = bytes.used();
        assert!(held > 0, "the scan kept what it read");
        assert_eq!(run(&plan, &ctx).await, expected);
        assert_eq!(bytes.used(), held, "a second run keeps nothing more");

        // Another age of the same width in the first row: the same size, and put back to
        // the same time (and the same inode, written in place), it is the file planned, and
        // the kept batches answer. This is why nothing is kept from a file modified less
        // than a second before it is read: a later write gets a later time.
        let first_row = original.lines().nth(1).unwrap();
        assert!(first_row.starts_with("3,3,1010,0,56,"), "{first_row}");
        let same_size = original.replacen("\n3,3,1010,0,56,", "\n3,3,1010,0,65,", 1);
        assert_eq!(same_size.len(), original.len());
        std::fs::write(&path, &same_size).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(planned_mtime)
            .unwrap();
        assert_ne!(reference(&path, SQL).await, expected);
        assert_eq!(
            run(&plan, &ctx).await,
            expected,
            "answered from what was read"
        );

        // A new modification time: another file, read again and answered from.
        modified(&path, Duration::from_secs(1800));
        let now = reference(&path, SQL).await;
        assert_ne!(now, expected, "the new file answers otherwise");
        assert_eq!(
            run(&plan, &ctx).await,
            now,
            "the changed file is read again"
        );

        // Everything kept is given back with the plan.
        drop(plan);
        assert_eq!(bytes.used(), 0);
    }

    /// A run that stops before its scan ends (a satisfied LIMIT, a researcher cancelling)
    /// keeps nothing.
    #[tokio::test]
    async fn a_scan_stopped_early_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lung.csv");
        std::fs::write(&path, lung()).unwrap();
        modified(&path, Duration::from_secs(3600));
        let bytes = Arc::new(KeptBytes::default());
        let (plan, ctx) = kept_plan(&path, "SELECT patient_id, age FROM lung", &bytes).await;
        let scan = {
            let mut found = None;
            plan.apply(|node| {
                if node.downcast_ref::<RememberedScanExec>().is_some() {
                    found = Some(Arc::clone(node));
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
            found.unwrap()
        };
        let copy = reset_plan_states(Arc::clone(&scan)).unwrap();
        let mut stream = copy.execute(0, ctx.task_ctx()).unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap().num_rows(), 4);
        drop(stream);
        assert_eq!(
            bytes.used(),
            0,
            "a scan stopped after one batch keeps nothing"
        );
        // Read to its end, it keeps its batches.
        let copy = reset_plan_states(scan).unwrap();
        let batches: Vec<RecordBatch> = collect(copy, ctx.task_ctx()).await.unwrap();
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, lung().lines().count() - 1);
        assert!(bytes.used() > 0);
    }

    /// A station answering a fragment again from what its scan kept releases what a
    /// station planning and reading it afresh releases, and audits every run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_station_answers_from_kept_batches_as_a_fresh_station_does() {
        use futures::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lung.csv");
        std::fs::write(&path, lung()).unwrap();
        modified(&path, Duration::from_secs(3600));
        let open = |name: &'static str| {
            let tables = [crate::TableFile {
                name: "lung".into(),
                path: path.clone(),
                format: crate::Format::Csv,
                schema: None,
            }];
            let config = crate::StationConfig {
                policy: crate::Policy::default(),
                audit_log: dir.path().join(name).join("audit.jsonl"),
                collaboration_secret: None,
                hub_secret: None,
            };
            async move { crate::Station::open(name, &tables, config).await.unwrap() }
        };
        let answer = async |station: &crate::Station, query_id: &str| {
            let ticket = railyard_contract::FragmentTicket {
                query_id: query_id.into(),
                fragment: 1,
                researcher: "test".into(),
                collaboration: String::new(),
                epsilon: None,
                sql: "SELECT sex, count(*) AS n, avg(age) AS a FROM lung GROUP BY sex".into(),
                train: None,
            };
            let stream = station.run_fragment(&ticket).await.unwrap();
            let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
            rows(&batches)
        };
        let kept = open("kept").await;
        let fresh = answer(&open("fresh").await, "f").await;
        for run in 0..3 {
            assert_eq!(answer(&kept, &format!("q{run}")).await, fresh, "run {run}");
            assert!(kept.kept.remembered_bytes() > 0, "run {run} kept its scan");
        }
        let log = std::fs::read_to_string(dir.path().join("kept/audit.jsonl")).unwrap();
        let allowed = log
            .lines()
            .filter(|l| l.contains("\"decision\":\"allowed\""))
            .count();
        assert_eq!(allowed, 3, "every run is audited");
    }

    /// What a station keeps is bounded.
    #[test]
    fn kept_bytes_stop_at_the_allowance() {
        let bytes = KeptBytes::default();
        assert!(bytes.take(KEPT_BYTES - 10));
        assert!(!bytes.take(11), "beyond the allowance");
        assert!(bytes.take(10));
        bytes.give_back(KEPT_BYTES);
        assert_eq!(bytes.used(), 0);
    }
}
