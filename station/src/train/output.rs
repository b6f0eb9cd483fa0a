//! The checks of a train's output before anything of it leaves the station: one plain,
//! uncompressed Arrow IPC file within `max_output_bytes`, with at most `max_output_rows`
//! rows and no column named like the hub's station column (rules `train_output`,
//! `max_output_rows`, `max_output_bytes`).

use super::*;

/// Whether an Arrow IPC file holds any compressed record batch. Compressed buffers announce
/// their own decompressed length, which the reader would allocate: a small file could claim
/// any size. Returns `None` if the file is not a readable IPC file.
pub(super) fn has_compressed_batches(file: &mut std::fs::File) -> Option<bool> {
    use arrow::ipc::{root_as_footer, root_as_message};
    let len = file.seek(SeekFrom::End(0)).ok()?;
    // The file ends with the footer, its length (4 bytes) and the magic "ARROW1".
    if len < 16 {
        return None;
    }
    let mut tail = [0u8; 10];
    file.seek(SeekFrom::End(-10)).ok()?;
    file.read_exact(&mut tail).ok()?;
    if &tail[4..] != b"ARROW1" {
        return None;
    }
    let footer_len = i32::from_le_bytes(tail[..4].try_into().ok()?);
    let footer_len = u64::try_from(footer_len).ok().filter(|l| *l + 10 <= len)?;
    let mut footer = vec![0u8; footer_len as usize];
    file.seek(SeekFrom::End(-10 - footer_len as i64)).ok()?;
    file.read_exact(&mut footer).ok()?;
    let footer = root_as_footer(&footer).ok()?;
    let blocks = footer
        .recordBatches()
        .into_iter()
        .flatten()
        .chain(footer.dictionaries().into_iter().flatten());
    for block in blocks {
        let meta_len = u64::try_from(block.metaDataLength()).ok()?;
        let offset = u64::try_from(block.offset()).ok()?;
        let body_len = u64::try_from(block.bodyLength()).ok()?;
        // The reader allocates what a block claims before it reads: a block past the end
        // of the file (fuzzing found one claiming 17 TB) would abort the station.
        if meta_len < 8 || offset.checked_add(meta_len)?.checked_add(body_len)? > len {
            return None;
        }
        let mut meta = vec![0u8; meta_len as usize];
        file.seek(SeekFrom::Start(offset)).ok()?;
        file.read_exact(&mut meta).ok()?;
        // A continuation marker and the metadata length come before the message.
        let message = root_as_message(&meta[8..]).ok()?;
        let compressed = message
            .header_as_record_batch()
            .map(|b| b.compression().is_some())
            .or_else(|| {
                message
                    .header_as_dictionary_batch()
                    .and_then(|d| d.data())
                    .map(|b| b.compression().is_some())
            })
            .unwrap_or(false);
        if compressed {
            return Some(true);
        }
    }
    file.seek(SeekFrom::Start(0)).ok()?;
    Some(false)
}

/// Reads and checks the train's output file.
pub(super) fn read_output(
    dir: &Path,
    limits: &TrainPolicy,
) -> Result<(SchemaRef, Vec<RecordBatch>), TrainError> {
    let output = |rule: Rule, why: String| TrainError::Output { rule, why };
    let unreadable = |e: std::io::Error| {
        warn!(error = %e, "cannot read a train's output");
        TrainError::failed(
            "the station could not read the train's output",
            "cannot read the output",
        )
    };
    let path = dir.join(OUTPUT_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(output(
                Rule::TrainOutput,
                format!(
                    "received no output from the train: it must write {OUTPUT_DIR}/{OUTPUT_FILE}"
                ),
            ));
        }
        Err(e) => return Err(unreadable(e)),
    };
    if !meta.file_type().is_file() {
        return Err(output(
            Rule::TrainOutput,
            format!("accepts a train's output only as a regular file {OUTPUT_FILE}"),
        ));
    }
    if meta.len() > limits.max_output_bytes {
        return Err(output(
            Rule::MaxOutputBytes,
            format!(
                "releases at most {} bytes of train output; this train wrote more",
                limits.max_output_bytes
            ),
        ));
    }
    let not_arrow = || {
        output(
            Rule::TrainOutput,
            format!(
                "accepts a train's output only as an uncompressed Arrow IPC file; \
                 {OUTPUT_FILE} is not one"
            ),
        )
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(unreadable)?;
    if has_compressed_batches(&mut file) != Some(false) {
        return Err(not_arrow());
    }
    // The IPC reader validates every array it builds, but panics on some lengths before it
    // gets there (fuzzing found "buffer not large enough" from a validity buffer shorter
    // than its column): a train is untrusted code, so its file is decoded where a panic is
    // caught and answered as a file that is not Arrow IPC.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let reader =
            FileReader::try_new(std::io::BufReader::new(file), None).map_err(|_| not_arrow())?;
        let schema = reader.schema();
        let mut batches = Vec::new();
        let mut rows = 0u64;
        for batch in reader {
            let batch = batch.map_err(|_| not_arrow())?;
            rows += batch.num_rows() as u64;
            if rows > limits.max_output_rows {
                return Err(output(
                    Rule::MaxOutputRows,
                    format!(
                        "releases at most {} rows of train output; this train wrote more",
                        limits.max_output_rows
                    ),
                ));
            }
            batches.push(batch);
        }
        Ok((schema, batches))
    }));
    let (schema, batches) = match decoded {
        Ok(result) => result?,
        Err(_) => {
            warn!("a train's output made the Arrow IPC reader panic; refused as not Arrow IPC");
            return Err(not_arrow());
        }
    };
    if schema.fields().is_empty() {
        return Err(output(
            Rule::TrainOutput,
            "received a train output without columns".to_string(),
        ));
    }
    if schema.field_with_name(TRAIN_STATION_COLUMN).is_ok() {
        return Err(output(
            Rule::TrainOutput,
            format!("reserves the output column name '{TRAIN_STATION_COLUMN}' for the hub"),
        ));
    }
    Ok((schema, batches))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn write(dir: &Path, schema: SchemaRef, rows: i64) {
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .unwrap();
        let file = std::fs::File::create(dir.join(OUTPUT_FILE)).unwrap();
        let mut w = FileWriter::try_new(file, &schema).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }

    fn rule(r: Result<(SchemaRef, Vec<RecordBatch>), TrainError>) -> &'static str {
        match r {
            Err(TrainError::Output { rule, .. }) => rule.as_str(),
            other => panic!("expected an output refusal, got {other:?}"),
        }
    }

    #[test]
    fn outputs_are_checked_before_release() {
        let dir = tempfile::tempdir().unwrap();
        let limits = TrainPolicy {
            max_output_rows: 10,
            ..TrainPolicy::default()
        };
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        write(dir.path(), Arc::clone(&schema), 10);
        let (got, batches) = read_output(dir.path(), &limits).unwrap();
        assert_eq!(got, schema);
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 10);

        write(dir.path(), Arc::clone(&schema), 11);
        assert_eq!(rule(read_output(dir.path(), &limits)), "max_output_rows");
        let small = TrainPolicy {
            max_output_bytes: 100,
            ..limits.clone()
        };
        assert_eq!(rule(read_output(dir.path(), &small)), "max_output_bytes");

        let station = Arc::new(Schema::new(vec![Field::new(
            "station",
            DataType::Int64,
            false,
        )]));
        write(dir.path(), station, 1);
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        std::fs::write(dir.path().join(OUTPUT_FILE), b"age,sex\n61,1\n").unwrap();
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        // Compressed batches announce their decompressed size: refused before decoding.
        let options = arrow::ipc::writer::IpcWriteOptions::default()
            .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
            .unwrap();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..5))],
        )
        .unwrap();
        let file = std::fs::File::create(dir.path().join(OUTPUT_FILE)).unwrap();
        let mut w = FileWriter::try_new_with_options(file, &schema, options).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");

        // A link to a file the station can read is not followed.
        std::fs::remove_file(dir.path().join(OUTPUT_FILE)).unwrap();
        let secret = dir.path().join("secret.arrow");
        write(dir.path(), schema, 1);
        std::fs::rename(dir.path().join(OUTPUT_FILE), &secret).unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join(OUTPUT_FILE)).unwrap();
        assert_eq!(rule(read_output(dir.path(), &limits)), "train_output");
    }

    /// Fuzzing (proptest, stable Rust): valid Arrow IPC files with bytes changed, cut short
    /// or extended, and bytes that are not IPC at all. The reader answers every one —
    /// batches within the limits or a refusal — without panicking or aborting.
    #[test]
    fn fuzz_train_outputs_are_answered_never_a_panic() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let dir = tempfile::tempdir().unwrap();
        let limits = TrainPolicy {
            max_output_rows: 1000,
            max_output_bytes: 1 << 20,
            ..TrainPolicy::default()
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("label", DataType::Utf8, true),
        ]));
        let mut valid = Vec::new();
        for rows in [0i64, 1, 7, 300] {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from_iter_values(0..rows)),
                    Arc::new(arrow::array::StringArray::from_iter_values(
                        (0..rows).map(|i| format!("row {i}")),
                    )),
                ],
            )
            .unwrap();
            let mut bytes = Vec::new();
            let mut w = FileWriter::try_new(&mut bytes, &schema).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
            drop(w);
            valid.push(bytes);
        }
        let mutated = (
            prop::sample::select(valid),
            prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            prop::option::of(any::<usize>()),
            prop::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(mut bytes, edits, cut, tail)| {
                for (at, b) in edits {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut % (bytes.len() + 1));
                }
                bytes.extend(tail);
                bytes
            });
        let strategy = prop_oneof![4 => mutated, 1 => prop::collection::vec(any::<u8>(), 0..2048)];
        let seconds = std::env::var("RAILYARD_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(20);
        let started = std::time::Instant::now();
        let mut cases = 0;
        while started.elapsed().as_secs() < seconds {
            let mut runner = TestRunner::new(Config {
                cases: 64,
                failure_persistence: None,
                ..Config::default()
            });
            runner
                .run(&strategy, |bytes| {
                    std::fs::write(dir.path().join(OUTPUT_FILE), &bytes).unwrap();
                    if let Ok((_, batches)) = read_output(dir.path(), &limits) {
                        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
                        prop_assert!(rows as u64 <= limits.max_output_rows);
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("fuzz target train output: {e}"));
            cases += 64;
        }
        eprintln!("fuzz target train output: {cases} inputs, every one answered");
    }
}
