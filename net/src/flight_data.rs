//! Arrow Flight messages for an answer, with each schema's messages encoded once.
//!
//! Every answer starts with its schema: a station's `DoGet` stream, the hub's `DoGet`
//! stream to the client, the `FlightInfo` and the prepared statement the client asked for
//! first. Building a schema's flatbuffer message is more work than encoding the one or two
//! small batches of a typical federated answer, and the same few schemas are answered again
//! and again (a kept plan's, a dashboard's). So the messages of a schema are built once and
//! kept by the schema ([`schema_messages`]), within bounds, and [`encode`] streams an answer
//! as arrow-flight's own encoder does, starting with the kept schema message. The hub reads
//! its stations' answers with [`Decoder`], which decodes a schema message it has seen before
//! (the same bytes) to the schema it decoded then, without reading and verifying it again.
//!
//! A schema holds column names, types and metadata (at most a station's count of the groups
//! it withheld, which that answer releases), never a row's value; what is kept here is
//! only ever used to send or read the very same schema again.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, ready};

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::reader::RecordBatchDecoder;
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use arrow_flight::encode::{FlightDataEncoderBuilder, GRPC_TARGET_MAX_FLIGHT_SIZE_BYTES};
use arrow_flight::error::{FlightError, Result};
use arrow_flight::{FlightData, IpcMessage, SchemaAsIpc};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

/// A schema's two encodings, as Flight carries them.
#[derive(Debug)]
pub struct SchemaMessages {
    /// The flatbuffer `Message` alone: the header of a stream's first `FlightData`.
    pub header: Bytes,
    /// The encapsulated IPC message (continuation marker, length, message, padding): a
    /// `FlightInfo`'s and a prepared statement's schema.
    pub ipc: Bytes,
}

/// How many schemas are kept, and how many bytes of their messages, before the cache starts
/// over.
const MAX_SCHEMAS: usize = 256;
const MAX_BYTES: usize = 4 << 20;

/// A map that keeps at most [`MAX_SCHEMAS`] entries and [`MAX_BYTES`] of their bytes, and
/// then starts over; one entry larger than a sixteenth of that is not kept.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    bytes: usize,
}

impl<K: std::hash::Hash + Eq, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq, V> Bounded<K, V> {
    fn insert(&mut self, key: K, value: V, size: usize) {
        if size > MAX_BYTES / 16 {
            return;
        }
        if self.map.len() >= MAX_SCHEMAS || self.bytes + size > MAX_BYTES {
            *self = Self::default();
        }
        self.bytes += size;
        self.map.insert(key, value);
    }
}

/// The schemas' messages, by schema, and the schemas decoded from stations' schema
/// messages, by the message's bytes. Each holds only complete entries once inserted: a
/// panic elsewhere while one was locked leaves nothing half-written.
static KEPT: LazyLock<Mutex<Bounded<Arc<Schema>, Arc<SchemaMessages>>>> =
    LazyLock::new(Mutex::default);
static DECODED: LazyLock<Mutex<Bounded<Bytes, SchemaRef>>> = LazyLock::new(Mutex::default);

fn lock<T>(cache: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The Flight messages of `schema` (IPC write options: the defaults, as arrow-flight's),
/// built on first use and then kept.
pub fn schema_messages(schema: &Schema) -> Result<Arc<SchemaMessages>> {
    if let Some(kept) = lock(&KEPT).map.get(schema) {
        return Ok(kept.clone());
    }
    let options = IpcWriteOptions::default();
    let header = FlightData::from(SchemaAsIpc::new(schema, &options)).data_header;
    let IpcMessage(ipc) = SchemaAsIpc::new(schema, &options).try_into()?;
    let messages = Arc::new(SchemaMessages { header, ipc });
    let size = messages.header.len() + messages.ipc.len();
    lock(&KEPT).insert(Arc::new(schema.clone()), messages.clone(), size);
    Ok(messages)
}

/// `batches` of `schema` as a Flight stream: the schema's message, then each batch's (a
/// batch larger than gRPC's 2 MiB target split into slices), the same messages as
/// arrow-flight's `FlightDataEncoder` with its defaults sends. A schema with dictionaries is
/// handed to that encoder, which hydrates them.
pub fn encode<S>(schema: SchemaRef, batches: S) -> BoxStream<'static, Result<FlightData>>
where
    S: Stream<Item = Result<RecordBatch>> + Send + 'static,
{
    if schema.fields().iter().any(|f| has_dictionary(f)) {
        return FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .boxed();
    }
    let first = schema_messages(&schema).map(|messages| FlightData {
        data_header: messages.header.clone(),
        ..Default::default()
    });
    Encoder {
        batches: batches.boxed(),
        schema,
        queue: VecDeque::from([first]),
        done: false,
    }
    .boxed()
}

fn has_dictionary(field: &Field) -> bool {
    match field.data_type() {
        DataType::Dictionary(..) => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => has_dictionary(f),
        DataType::Struct(fields) => fields.iter().any(|f| has_dictionary(f)),
        DataType::Union(fields, _) => fields.iter().any(|(_, f)| has_dictionary(f)),
        DataType::RunEndEncoded(ends, values) => has_dictionary(ends) || has_dictionary(values),
        _ => false,
    }
}

struct Encoder {
    batches: BoxStream<'static, Result<RecordBatch>>,
    schema: SchemaRef,
    queue: VecDeque<Result<FlightData>>,
    done: bool,
}

impl Encoder {
    /// `batch`'s messages, queued: its columns as the schema types them (as arrow-flight's
    /// encoder casts them), sliced to gRPC's target size.
    fn queue_batch(&mut self, batch: RecordBatch) -> Result<()> {
        let columns = self
            .schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(field, column)| {
                if column.data_type() == field.data_type() {
                    Ok(column.clone())
                } else {
                    arrow::compute::cast(column, field.data_type())
                }
            })
            .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        let batch = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)?;
        let size: usize = batch
            .columns()
            .iter()
            .map(|c| c.get_buffer_memory_size())
            .sum();
        let pieces = size.div_ceil(GRPC_TARGET_MAX_FLIGHT_SIZE_BYTES).max(1);
        let rows = batch.num_rows();
        let per_piece = (rows / pieces).max(1);
        let generator = IpcDataGenerator::default();
        let mut tracker = DictionaryTracker::new(true);
        let options = IpcWriteOptions::default();
        let mut context = IpcWriteContext::default();
        // An empty batch sends nothing, as with arrow-flight's encoder.
        let mut offset = 0;
        while offset < rows {
            let length = per_piece.min(rows - offset);
            let (_, encoded) = generator.encode(
                &batch.slice(offset, length),
                &mut tracker,
                &options,
                &mut context,
            )?;
            self.queue.push_back(Ok(encoded.into()));
            offset += length;
        }
        Ok(())
    }
}

impl Stream for Encoder {
    type Item = Result<FlightData>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(next) = self.queue.pop_front() {
                if next.is_err() {
                    self.done = true;
                    self.queue.clear();
                }
                return Poll::Ready(Some(next));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match ready!(self.batches.poll_next_unpin(cx)) {
                None => self.done = true,
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(batch)) => {
                    if let Err(e) = self.queue_batch(batch) {
                        self.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
    }
}

/// Whether every buffer a batch's header declares lies within its body of `body` bytes.
/// arrow's reader slices the body without checking, and panics on one that does not.
fn buffers_within<'a>(
    mut buffers: impl Iterator<Item = &'a arrow::ipc::Buffer>,
    body: usize,
) -> bool {
    buffers.all(|b| {
        u64::try_from(b.offset())
            .ok()
            .zip(u64::try_from(b.length()).ok())
            .and_then(|(o, l)| o.checked_add(l))
            .is_some_and(|end| end <= body as u64)
    })
}

fn beyond_body() -> FlightError {
    FlightError::DecodeError("a record batch's buffers reach beyond its body".to_string())
}

/// `data` refused if it is a record or dictionary batch whose buffers reach beyond its body
/// (an answer cut short, or a sender that lies), before arrow-flight's reader, which would
/// panic on it, reads it. Any other message passes as it is.
pub fn check_body(data: FlightData) -> Result<FlightData> {
    let Ok(message) = arrow::ipc::root_as_message(&data.data_header) else {
        // The reader refuses it.
        return Ok(data);
    };
    let batch = match message.header_type() {
        arrow::ipc::MessageHeader::RecordBatch => message.header_as_record_batch(),
        arrow::ipc::MessageHeader::DictionaryBatch => {
            message.header_as_dictionary_batch().and_then(|d| d.data())
        }
        _ => None,
    };
    let buffers = batch.and_then(|b| b.buffers());
    if buffers_within(buffers.iter().flatten(), data.data_body.len()) {
        Ok(data)
    } else {
        Err(beyond_body())
    }
}

/// The schema a schema message decodes to, from the message `header` already verified as
/// `message`; kept by the header's bytes, so that the same bytes are not read again
/// (decoding is a function of the bytes alone).
fn decode_schema(header: &Bytes, message: arrow::ipc::Message<'_>) -> Result<SchemaRef> {
    let decoded = message
        .header_as_schema()
        .ok_or_else(|| FlightError::DecodeError("Error decoding schema: no schema".to_string()))?;
    let schema = Arc::new(arrow::ipc::convert::fb_to_schema(decoded));
    lock(&DECODED).insert(header.clone(), schema.clone(), header.len());
    Ok(schema)
}

/// A Flight stream of an answer read back into record batches, as arrow-flight's
/// `FlightRecordBatchStream` reads it, for the messages Railyard sends: one schema, then
/// record batches (`NONE` messages are skipped). A dictionary batch is refused: Railyard's
/// encoders send dictionaries as plain arrays. A schema message is decoded once per distinct
/// message ([`decode_schema`]).
pub struct Decoder<S> {
    messages: S,
    schema: Option<SchemaRef>,
    done: bool,
}

impl<S> Decoder<S>
where
    S: Stream<Item = Result<FlightData>> + Unpin,
{
    pub fn new(messages: S) -> Self {
        Self {
            messages,
            schema: None,
            done: false,
        }
    }

    /// The answer's schema, once its schema message has been read.
    pub fn schema(&self) -> Option<&SchemaRef> {
        self.schema.as_ref()
    }

    fn read(&mut self, data: FlightData) -> Result<Option<RecordBatch>> {
        use arrow::ipc::MessageHeader;
        if self.schema.is_none()
            && let Some(schema) = lock(&DECODED).map.get(&data.data_header)
        {
            self.schema = Some(schema.clone());
            return Ok(None);
        }
        let message = arrow::ipc::root_as_message(&data.data_header)
            .map_err(|e| FlightError::DecodeError(format!("Error decoding root message: {e}")))?;
        match message.header_type() {
            MessageHeader::NONE => Ok(None),
            MessageHeader::Schema if self.schema.is_some() => Err(FlightError::protocol(
                "Unexpectedly saw multiple Schema messages in FlightData stream",
            )),
            MessageHeader::Schema => {
                self.schema = Some(decode_schema(&data.data_header, message)?);
                Ok(None)
            }
            MessageHeader::RecordBatch => {
                let Some(schema) = &self.schema else {
                    return Err(FlightError::protocol(
                        "Received RecordBatch prior to Schema",
                    ));
                };
                let header = message.header_as_record_batch().ok_or_else(|| {
                    FlightError::DecodeError(
                        "Unable to convert flight data header to a record batch".to_string(),
                    )
                })?;
                if !buffers_within(header.buffers().iter().flatten(), data.data_body.len()) {
                    return Err(beyond_body());
                }
                // An aligned body is used in place; any other is copied to aligned memory.
                let body = if data.data_body.as_ptr().align_offset(64) == 0 {
                    Buffer::from(data.data_body)
                } else {
                    Buffer::from(data.data_body.as_ref())
                };
                let batch = RecordBatchDecoder::try_new(
                    &body,
                    header,
                    schema.clone(),
                    &HashMap::new(),
                    &message.version(),
                )?
                .read_record_batch()
                .map_err(|e| {
                    FlightError::DecodeError(format!("Error decoding ipc RecordBatch: {e}"))
                })?;
                Ok(Some(batch))
            }
            MessageHeader::DictionaryBatch => Err(FlightError::protocol(
                "Unexpected message: DictionaryBatch (answers carry dictionaries as plain arrays)",
            )),
            other => Err(FlightError::protocol(format!(
                "Unexpected message: {}",
                other.variant_name().unwrap_or("UNKNOWN")
            ))),
        }
    }
}

impl<S> Stream for Decoder<S>
where
    S: Stream<Item = Result<FlightData>> + Unpin,
{
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match ready!(self.messages.poll_next_unpin(cx)) {
                None => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(data)) => match self.read(data) {
                    Ok(None) => continue,
                    Ok(Some(batch)) => return Poll::Ready(Some(Ok(batch))),
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        DictionaryArray, Float64Array, Int32Array, Int64Array, ListArray, StringArray, StructArray,
    };
    use arrow::datatypes::{Fields, Int32Type};
    use arrow_flight::FlightInfo;
    use arrow_flight::decode::FlightRecordBatchStream;
    use futures::TryStreamExt;

    /// The messages `encode` sends, and those arrow-flight's own encoder sends.
    async fn both(
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> (Vec<FlightData>, Vec<FlightData>) {
        let ours = encode(
            schema.clone(),
            futures::stream::iter(batches.clone().into_iter().map(Ok)),
        )
        .try_collect()
        .await
        .expect("encodes");
        let theirs = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::iter(batches.into_iter().map(Ok)))
            .try_collect()
            .await
            .expect("encodes");
        (ours, theirs)
    }

    fn nested_schema() -> SchemaRef {
        let inner = Fields::from(vec![
            Field::new("x", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
        ]);
        Arc::new(
            Schema::new(vec![
                Field::new("g", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new_list("l", Field::new_list_field(DataType::Int32, true), true),
                Field::new_struct("st", inner, true),
            ])
            .with_metadata([("origin".to_string(), "station_a".to_string())].into()),
        )
    }

    fn nested_batch(schema: &SchemaRef, rows: usize) -> RecordBatch {
        let g = Int64Array::from_iter_values((0..rows).map(|i| i as i64 * 7 - 3));
        let name = StringArray::from_iter((0..rows).map(|i| (i % 3 != 0).then(|| format!("n{i}"))));
        let l =
            ListArray::from_iter_primitive::<Int32Type, _, _>((0..rows).map(|i| {
                (i % 4 != 1).then(|| (0..i % 5).map(|j| Some(j as i32)).collect::<Vec<_>>())
            }));
        let DataType::Struct(inner) = schema.field(3).data_type().clone() else {
            unreachable!("the fourth field is a struct")
        };
        let st = StructArray::new(
            inner,
            vec![
                Arc::new(Float64Array::from_iter(
                    (0..rows).map(|i| (i % 2 == 0).then_some(i as f64 / 3.0)),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("{i:x}")),
                )),
            ],
            None,
        );
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(g), Arc::new(name), Arc::new(l), Arc::new(st)],
        )
        .expect("a batch of the schema")
    }

    /// The answers tested, as their batches' row counts: one small batch, an empty one
    /// (which sends nothing), several, one above gRPC's 2 MiB target (sent in slices), none.
    const ANSWERS: [&[usize]; 5] = [&[3], &[0], &[0, 5, 1, 0], &[200_000], &[]];

    fn nested_batches(schema: &SchemaRef, sizes: &[usize]) -> Vec<RecordBatch> {
        sizes.iter().map(|&n| nested_batch(schema, n)).collect()
    }

    #[tokio::test]
    async fn the_messages_are_arrow_flights_own() {
        let schema = nested_schema();
        for sizes in ANSWERS {
            let batches = nested_batches(&schema, sizes);
            let (ours, theirs) = both(schema.clone(), batches).await;
            assert_eq!(ours.len(), theirs.len(), "{sizes:?}");
            for (a, b) in ours.iter().zip(&theirs) {
                assert_eq!(a, b, "{sizes:?}");
            }
            if sizes == [200_000].as_slice() {
                assert!(ours.len() > 2, "a large batch is sliced");
            }
        }
        // Asked again, the kept schema message is the same.
        let (again, theirs) = both(schema.clone(), vec![nested_batch(&schema, 2)]).await;
        assert_eq!(again, theirs);
    }

    #[tokio::test]
    async fn a_batch_is_sent_as_the_schema_types_it() {
        // A column typed differently from the announced field is cast, as arrow-flight's
        // encoder casts it; a column that cannot be is an error, and the stream ends there.
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let narrow = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("n", DataType::Int32, true)])),
            vec![Arc::new(Int32Array::from(vec![Some(1), None, Some(3)]))],
        )
        .expect("a batch");
        let (ours, theirs) = both(schema.clone(), vec![narrow]).await;
        assert_eq!(ours, theirs);
        let decoded: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(
            futures::stream::iter(ours.into_iter().map(Ok)),
        )
        .try_collect()
        .await
        .expect("decodes");
        assert_eq!(
            decoded[0].column(0).as_ref(),
            &Int64Array::from(vec![Some(1), None, Some(3)]) as &dyn arrow::array::Array
        );

        let not_null = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let with_null = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(vec![Some(1), None]))],
        )
        .expect("a batch");
        let sent: Vec<Result<FlightData>> = encode(
            not_null,
            futures::stream::iter([Ok(with_null.clone()), Ok(with_null)]),
        )
        .collect()
        .await;
        assert_eq!(sent.len(), 2, "the schema, then the error, then nothing");
        assert!(sent[0].is_ok());
        assert!(sent[1].is_err());
    }

    #[tokio::test]
    async fn an_input_error_ends_the_stream() {
        let schema = nested_schema();
        let batches = vec![
            Ok(nested_batch(&schema, 2)),
            Err(FlightError::ProtocolError("the fragment failed".into())),
            Ok(nested_batch(&schema, 2)),
        ];
        let sent: Vec<Result<FlightData>> = encode(schema, futures::stream::iter(batches))
            .collect()
            .await;
        assert_eq!(sent.len(), 3);
        assert!(sent[0].is_ok() && sent[1].is_ok());
        assert!(
            matches!(&sent[2], Err(FlightError::ProtocolError(m)) if m == "the fragment failed")
        );
    }

    #[tokio::test]
    async fn dictionaries_are_hydrated_by_arrow_flight() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "d",
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            true,
        )]));
        let d: DictionaryArray<Int32Type> = vec![Some("a"), None, Some("b"), Some("a")]
            .into_iter()
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(d)]).expect("a batch");
        let (ours, theirs) = both(schema, vec![batch]).await;
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_kept_schema_messages_are_those_flight_builds() {
        for schema in [nested_schema(), Arc::new(Schema::empty())] {
            for _ in 0..2 {
                let kept = schema_messages(&schema).expect("encodes");
                let info = FlightInfo::new().try_with_schema(&schema).expect("encodes");
                assert_eq!(kept.ipc, info.schema);
                let options = IpcWriteOptions::default();
                assert_eq!(
                    kept.header,
                    FlightData::from(SchemaAsIpc::new(&schema, &options)).data_header
                );
            }
        }
    }

    /// Reads `messages` with [`Decoder`] and with arrow-flight's reader.
    async fn read_both(
        messages: Vec<FlightData>,
    ) -> (Result<Vec<RecordBatch>>, Result<Vec<RecordBatch>>) {
        let ours = Decoder::new(futures::stream::iter(messages.clone().into_iter().map(Ok)))
            .try_collect()
            .await;
        let theirs = FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(
            messages.into_iter().map(Ok),
        ))
        .try_collect()
        .await;
        (ours, theirs)
    }

    #[tokio::test]
    async fn answers_read_back_as_arrow_flight_reads_them() {
        let schema = nested_schema();
        for sizes in ANSWERS {
            let batches = nested_batches(&schema, sizes);
            // Twice: the second time the schema message is one seen before.
            for _ in 0..2 {
                let (sent, _) = both(schema.clone(), batches.clone()).await;
                let mut decoder =
                    Decoder::new(futures::stream::iter(sent.clone().into_iter().map(Ok)));
                let mut read = Vec::new();
                while let Some(batch) = decoder.next().await {
                    read.push(batch.expect("reads"));
                }
                assert_eq!(decoder.schema(), Some(&schema));
                let (_, theirs) = read_both(sent).await;
                assert_eq!(read, theirs.expect("reads"), "{sizes:?}");
                let rows: usize = read.iter().map(RecordBatch::num_rows).sum();
                assert_eq!(rows, sizes.iter().sum::<usize>());
                let all = arrow::compute::concat_batches(&schema, &read).expect("concatenates");
                let sent_all =
                    arrow::compute::concat_batches(&schema, &batches).expect("concatenates");
                assert_eq!(all, sent_all);
            }
        }
    }

    #[tokio::test]
    async fn malformed_answers_are_refused() {
        let schema = nested_schema();
        let (sent, _) = both(schema.clone(), vec![nested_batch(&schema, 4)]).await;
        let (header, batch) = (sent[0].clone(), sent[1].clone());
        let refused = |result: Result<Vec<RecordBatch>>| match result {
            Err(e) => e.to_string(),
            Ok(b) => panic!("read {} batches", b.len()),
        };
        // A batch before the schema; two schemas; a header that is no message; a schema
        // message one byte off one seen before; a batch whose body is cut short. Each is
        // refused as arrow-flight's reader refuses it.
        let mut corrupt = header.clone();
        let mut bytes = corrupt.data_header.to_vec();
        let last = bytes.len() - 9;
        bytes[last] ^= 0x5a;
        corrupt.data_header = bytes.into();
        let mut short = batch.clone();
        short.data_body = short.data_body.slice(..short.data_body.len() / 2);
        let garbage = FlightData {
            data_header: Bytes::from_static(&[7, 0, 0, 0, 1, 2, 3]),
            ..Default::default()
        };
        for messages in [
            vec![batch.clone()],
            vec![header.clone(), header.clone(), batch.clone()],
            vec![garbage],
            vec![corrupt, batch.clone()],
        ] {
            let (ours, theirs) = read_both(messages).await;
            let (ours, theirs) = (refused(ours), theirs.err().map(|e| e.to_string()));
            assert!(theirs.is_some(), "arrow-flight refuses it too: {ours}");
        }
        // arrow's reader panics on a body shorter than its buffers; this one refuses it.
        let read: Result<Vec<RecordBatch>> = Decoder::new(futures::stream::iter([
            Ok(header.clone()),
            Ok(short.clone()),
        ]))
        .try_collect()
        .await;
        assert!(refused(read).contains("beyond its body"));
        // Checked before arrow-flight's reader, a short body is refused, not read.
        let checked = FlightRecordBatchStream::new_from_flight_data(
            futures::stream::iter([Ok(header.clone()), Ok(short.clone())])
                .and_then(|d| async move { check_body(d) }),
        )
        .try_collect::<Vec<RecordBatch>>()
        .await;
        assert!(refused(checked).contains("beyond its body"));
        for whole in [header.clone(), batch.clone()] {
            assert_eq!(check_body(whole.clone()).expect("passes"), whole);
        }
        // Metadata alone, with no message, is refused by both.
        let bare = FlightData {
            app_metadata: Bytes::from_static(b"note"),
            ..Default::default()
        };
        let (ours, theirs) = read_both(vec![header, bare, batch]).await;
        assert!(ours.is_err() && theirs.is_err());
    }

    #[tokio::test]
    async fn a_dictionary_batch_is_refused() {
        // What arrow-flight's encoder sends when told to resend dictionaries.
        let schema = Arc::new(Schema::new(vec![Field::new(
            "d",
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            true,
        )]));
        let d: DictionaryArray<Int32Type> = vec![Some("a"), None].into_iter().collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(d)]).expect("a batch");
        let sent: Vec<FlightData> = FlightDataEncoderBuilder::new()
            .with_dictionary_handling(arrow_flight::encode::DictionaryHandling::Resend)
            .with_schema(schema)
            .build(futures::stream::iter([Ok(batch)]))
            .try_collect()
            .await
            .expect("encodes");
        let (ours, _) = read_both(sent).await;
        let error = ours.expect_err("refused").to_string();
        assert!(error.contains("DictionaryBatch"), "{error}");
    }
}
