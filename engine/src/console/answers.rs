//! The answers the console keeps for a while, so that a download is the answer the page
//! shows rather than a second run: a second run would charge a DP query's ε again and draw
//! its noise anew, and cost the stations the work and the audit records again.
//!
//! Kept in memory only, per (collaboration, researcher, the page's id), for
//! [`KEPT_FOR`], at most [`MAX_ANSWER_BYTES`] each and [`MAX_TOTAL_BYTES`] in all (the
//! oldest goes first). An answer larger than that is not kept: its download runs the query
//! again, as `POST /api/query?format=…` does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

/// How long an answer stays downloadable.
pub const KEPT_FOR: Duration = Duration::from_secs(30 * 60);
/// The largest answer kept (Arrow memory).
pub const MAX_ANSWER_BYTES: usize = 64 << 20;
/// All kept answers together.
pub const MAX_TOTAL_BYTES: usize = 256 << 20;

/// (collaboration, researcher, id).
pub type Key = (String, String, String);

struct Kept {
    at: Instant,
    bytes: usize,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

#[derive(Default)]
pub struct Answers {
    kept: Mutex<HashMap<Key, Kept>>,
}

impl Answers {
    /// Keeps `batches` under `key` if they are small enough; returns whether it did.
    pub fn keep(&self, key: Key, schema: SchemaRef, batches: &[RecordBatch]) -> bool {
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        if bytes > MAX_ANSWER_BYTES {
            return false;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        kept.retain(|_, k| now.duration_since(k.at) < KEPT_FOR);
        kept.remove(&key);
        let mut total: usize = kept.values().map(|k| k.bytes).sum();
        while total + bytes > MAX_TOTAL_BYTES {
            let Some(oldest) = kept
                .iter()
                .min_by_key(|(_, k)| k.at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            total -= kept.remove(&oldest).map_or(0, |k| k.bytes);
        }
        kept.insert(
            key,
            Kept {
                at: now,
                bytes,
                schema,
                batches: batches.to_vec(),
            },
        );
        true
    }

    /// The answer kept under `key`, if it is still kept.
    pub fn get(&self, key: &Key) -> Option<(SchemaRef, Vec<RecordBatch>)> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.get(key)
            .filter(|k| k.at.elapsed() < KEPT_FOR)
            .map(|k| (k.schema.clone(), k.batches.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn answer(rows: usize) -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let column = Int64Array::from_iter_values(0..rows as i64);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).unwrap();
        (schema, vec![batch])
    }

    fn key(id: &str) -> Key {
        ("c".to_string(), "r".to_string(), id.to_string())
    }

    #[test]
    fn answers_are_kept_per_key_within_their_bounds() {
        let answers = Answers::default();
        let (schema, batches) = answer(3);
        assert!(answers.keep(key("a"), schema.clone(), &batches));
        let (_, got) = answers.get(&key("a")).unwrap();
        assert_eq!(got, batches);
        // Another researcher's key finds nothing.
        assert!(
            answers
                .get(&("c".into(), "other".into(), "a".into()))
                .is_none()
        );
        // Too large for one answer: not kept.
        let (schema, big) = answer(MAX_ANSWER_BYTES / 8 + 1);
        assert!(!answers.keep(key("big"), schema, &big));
        assert!(answers.get(&key("big")).is_none());
        // The total is bounded: the oldest go first.
        let (schema, half) = answer(MAX_ANSWER_BYTES / 8 - 1024);
        for id in ["1", "2", "3", "4", "5"] {
            assert!(answers.keep(key(id), schema.clone(), &half));
        }
        assert!(answers.get(&key("a")).is_none() && answers.get(&key("1")).is_none());
        assert!(answers.get(&key("5")).is_some());
    }
}
