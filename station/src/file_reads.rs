//! How a station reads byte ranges of its own files: into buffers it uses again.
//!
//! DataFusion reads a Parquet file's column chunks through `object_store`'s
//! `LocalFileSystem`, which reads each byte range into a new buffer that it first fills with
//! zeros. For a scan of megabytes (TPC-H Q1: tens of megabytes per station and query), that is a
//! pass of zeroing in the process, the kernel zeroing the fresh pages under each new
//! buffer, and then the copy of the file: about 7 % of Q1's time (`perf record`).
//! [`ReusingFiles`] is that file system with one method changed: `get_ranges` reads each
//! range into a buffer taken from a pool, without zeroing it first (the read fills it), and
//! the buffer goes back to the pool when the last slice of it is dropped. What it reads is
//! the same bytes (tested against `LocalFileSystem`), and a range past the end of the file is
//! an error, as there.
//!
//! The pool keeps at most [`KEPT_BUFFERS`] idle buffers, [`KEPT_BYTES`] in all; a range
//! that would not fit, or one shorter than [`POOLED_FROM`], is read into a buffer of its
//! own, which is then freed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::object_store;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Idle buffers the pool keeps at most: so many, and so many bytes in all.
pub(crate) const KEPT_BUFFERS: usize = 32;
pub(crate) const KEPT_BYTES: usize = 64 << 20;
/// Ranges shorter than this get a buffer of their own, never pooled: the allocator reuses
/// blocks of that size without fresh pages anyway.
pub(crate) const POOLED_FROM: usize = 64 << 10;

/// `LocalFileSystem`, reading byte ranges into reused buffers (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ReusingFiles {
    local: LocalFileSystem,
    pool: Arc<Pool>,
}

impl std::fmt::Display for ReusingFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReusingFiles({})", self.local)
    }
}

/// Idle buffers.
#[derive(Debug, Default)]
struct Pool {
    idle: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// An empty buffer of at least `len` bytes' capacity: the smallest idle one that holds
    /// it, or a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        if len < POOLED_FROM {
            return Vec::with_capacity(len);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let best = (0..idle.len())
            .filter(|&i| idle[i].capacity() >= len)
            .min_by_key(|&i| idle[i].capacity());
        match best {
            Some(i) => {
                let mut buffer = idle.swap_remove(i);
                buffer.clear();
                buffer
            }
            None => Vec::with_capacity(len),
        }
    }

    /// Keeps `buffer` for a later read, unless it is small or the pool would then hold
    /// more than [`KEPT_BUFFERS`] or [`KEPT_BYTES`].
    fn give(&self, buffer: Vec<u8>) {
        if buffer.capacity() < POOLED_FROM {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: usize = idle.iter().map(Vec::capacity).sum();
        if idle.len() < KEPT_BUFFERS && bytes + buffer.capacity() <= KEPT_BYTES {
            idle.push(buffer);
        }
    }
}

/// A buffer of the pool, back in it when dropped.
struct Pooled {
    buffer: Vec<u8>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buffer));
    }
}

/// Reads `ranges` of the file at `path`, each into a buffer of `pool`.
fn read_ranges(
    path: &std::path::Path,
    ranges: &[Range<u64>],
    pool: &Arc<Pool>,
) -> Result<Vec<Bytes>> {
    let error = |message: String| object_store::Error::Generic {
        store: "ReusingFiles",
        source: message.into(),
    };
    let mut file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => object_store::Error::NotFound {
            path: path.display().to_string(),
            source: e.into(),
        },
        _ => error(format!("cannot open {}: {e}", path.display())),
    })?;
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Some(len) = range.end.checked_sub(range.start) else {
            return Err(error(format!(
                "range {}..{} of {} ends before it starts",
                range.start,
                range.end,
                path.display()
            )));
        };
        let len = usize::try_from(len).map_err(|_| error(format!("range of {len} bytes")))?;
        let mut buffer = pool.take(len);
        file.seek(SeekFrom::Start(range.start))
            .and_then(|_| (&mut file).take(len as u64).read_to_end(&mut buffer))
            .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
        if buffer.len() != len {
            return Err(error(format!(
                "{} ends before byte {} (range {}..{})",
                path.display(),
                range.start + buffer.len() as u64,
                range.start,
                range.end
            )));
        }
        out.push(Bytes::from_owner(Pooled {
            buffer,
            pool: Arc::clone(pool),
        }));
    }
    Ok(out)
}

#[async_trait]
impl ObjectStore for ReusingFiles {
    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let path = self.local.path_to_filesystem(location)?;
        let ranges = ranges.to_vec();
        let pool = Arc::clone(&self.pool);
        tokio::task::spawn_blocking(move || read_ranges(&path, &ranges, &pool))
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "ReusingFiles",
                source: Box::new(e),
            })?
    }

    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.local.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.local.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.local.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.local.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.local.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.local.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.local.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.local.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranges_read_the_bytes_the_local_file_system_reads() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let file = dir.path().join("data.bin");
        std::fs::write(&file, &data).unwrap();
        let location = Path::from_filesystem_path(&file).unwrap();
        let local = LocalFileSystem::new();
        let reusing = ReusingFiles::default();
        let ranges = [
            0..10,
            5..5,
            100..70_000,
            299_990..300_000,
            4096..200_000,
            0..300_000,
        ];
        // Again and again, so that later reads go into buffers of earlier ones, some of which
        // are still held (`kept`).
        let mut kept = Vec::new();
        for round in 0..4 {
            let want = local.get_ranges(&location, &ranges).await.unwrap();
            let got = reusing.get_ranges(&location, &ranges).await.unwrap();
            assert_eq!(got, want, "round {round}");
            if round % 2 == 0 {
                kept.push(got);
            }
        }
        for held in &kept {
            let want = local.get_ranges(&location, &ranges).await.unwrap();
            assert_eq!(
                held, &want,
                "a slice still held is unchanged by later reads"
            );
        }
        // Past the end, as LocalFileSystem, is an error; so is a missing file.
        let past_the_end = vec![0..1, 299_000..300_001];
        assert!(reusing.get_ranges(&location, &past_the_end).await.is_err());
        assert!(local.get_ranges(&location, &past_the_end).await.is_err());
        let missing = Path::from(format!("{location}.missing"));
        assert!(matches!(
            reusing.get_ranges(&missing, &ranges).await,
            Err(object_store::Error::NotFound { .. })
        ));
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound_and_hands_out_the_smallest_fitting_buffer() {
        let pool = Pool::default();
        let idle_bytes =
            |pool: &Pool| -> usize { pool.idle.lock().unwrap().iter().map(Vec::capacity).sum() };
        let (small, large) = (POOLED_FROM, 10 * POOLED_FROM);
        pool.give(Vec::with_capacity(large));
        pool.give(Vec::with_capacity(small));
        pool.give(Vec::with_capacity(KEPT_BYTES));
        assert_eq!(
            idle_bytes(&pool),
            small + large,
            "the largest one is not kept"
        );
        assert_eq!(
            pool.take(small - 1).capacity(),
            small - 1,
            "small reads are not pooled"
        );
        assert_eq!(pool.take(small).capacity(), small);
        assert_eq!(pool.take(small).capacity(), large);
        assert!(pool.take(small).capacity() >= small);
        assert_eq!(idle_bytes(&pool), 0);
        // Small buffers are not kept, and at most KEPT_BUFFERS are.
        pool.give(Vec::with_capacity(small - 1));
        assert_eq!(idle_bytes(&pool), 0);
        for _ in 0..=KEPT_BUFFERS {
            pool.give(Vec::with_capacity(small));
        }
        assert_eq!(pool.idle.lock().unwrap().len(), KEPT_BUFFERS);
    }
}
