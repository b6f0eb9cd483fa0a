//! Write Railyard trains in Rust.
//!
//! A train is a program in a container image that a station runs over its own rows. The
//! contract (docs/trains.md):
//!
//! - `RAILYARD_INPUT`: an Arrow IPC file with the rows of the train's input query, on a
//!   read-only mount;
//! - `RAILYARD_ARGS`: the researcher's arguments, as JSON text;
//! - `RAILYARD_OUTPUT`: where the train writes its result, one Arrow IPC file; the station
//!   checks it (size, rows, format) against its policy before releasing it;
//! - no network, a read-only root filesystem, an unprivileged user, a time limit. Exit 0 on
//!   success; anything the train prints stays in the station's log;
//! - the image declares the output's columns in its label `railyard.output-schema` (JSON,
//!   e.g. `[{"name": "n", "type": "Int64"}]`); a station refuses an image without it, and an
//!   output with other columns.
//!
//! [`run`] wraps all of it:
//!
//! ```no_run
//! use std::sync::Arc;
//! use arrow_array::{Int64Array, RecordBatch};
//! use arrow_schema::{DataType, Field, Schema};
//!
//! fn main() -> std::process::ExitCode {
//!     railyard_train::run(|input| {
//!         let schema = Arc::new(Schema::new(vec![Field::new("rows", DataType::Int64, false)]));
//!         let rows = Int64Array::from(vec![input.rows() as i64]);
//!         Ok(RecordBatch::try_new(schema, vec![Arc::new(rows)])?)
//!     })
//! }
//! ```

use std::error::Error as StdError;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::process::ExitCode;

use arrow_array::RecordBatch;
use arrow_ipc::reader::FileReader;
use arrow_ipc::writer::FileWriter;
use arrow_schema::SchemaRef;

/// Any error a train reports (printed to its standard error, which stays at the station).
pub type Error = Box<dyn StdError + Send + Sync>;

/// What a train receives: its input rows and its arguments.
pub struct Input {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub args: serde_json::Value,
}

impl Input {
    /// Reads the input file and the arguments named by the contract's environment.
    pub fn from_env() -> Result<Self, Error> {
        let path = env("RAILYARD_INPUT")?;
        let reader = FileReader::try_new(BufReader::new(File::open(&path)?), None)?;
        let schema = reader.schema();
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        let args = match std::env::var("RAILYARD_ARGS") {
            Ok(text) if !text.trim().is_empty() => serde_json::from_str(&text)
                .map_err(|e| format!("RAILYARD_ARGS is not JSON: {e}"))?,
            _ => serde_json::Value::Object(Default::default()),
        };
        Ok(Self {
            schema,
            batches,
            args,
        })
    }

    /// Rows in the input.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// The argument `name`, if given.
    pub fn arg(&self, name: &str) -> Option<&serde_json::Value> {
        self.args.get(name)
    }
}

fn env(name: &str) -> Result<String, Error> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set: run this train through a Railyard station").into())
}

/// Writes `batch` as the train's output file.
pub fn write_output(batch: &RecordBatch) -> Result<(), Error> {
    let path = env("RAILYARD_OUTPUT")?;
    let mut writer = FileWriter::try_new(BufWriter::new(File::create(&path)?), &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    writer.into_inner()?.flush()?;
    Ok(())
}

/// Runs a train: reads the input, calls `train`, writes its output. Errors are printed and
/// turn into exit code 1.
pub fn run(train: impl FnOnce(Input) -> Result<RecordBatch, Error>) -> ExitCode {
    let result = Input::from_env()
        .and_then(train)
        .and_then(|batch| write_output(&batch));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The values of a numeric column as `f64` (NULLs as `None`), for any integer or float type.
pub fn numeric_values(batch: &RecordBatch, column: &str) -> Result<Vec<Option<f64>>, Error> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::DataType;
    let array = batch
        .column_by_name(column)
        .ok_or_else(|| format!("the input has no column '{column}'"))?;
    macro_rules! values {
        ($t:ty) => {
            array
                .as_primitive::<$t>()
                .iter()
                .map(|v| v.map(|v| v as f64))
                .collect()
        };
    }
    Ok(match array.data_type() {
        DataType::Int8 => values!(Int8Type),
        DataType::Int16 => values!(Int16Type),
        DataType::Int32 => values!(Int32Type),
        DataType::Int64 => values!(Int64Type),
        DataType::UInt8 => values!(UInt8Type),
        DataType::UInt16 => values!(UInt16Type),
        DataType::UInt32 => values!(UInt32Type),
        DataType::UInt64 => values!(UInt64Type),
        DataType::Float32 => values!(Float32Type),
        DataType::Float64 => values!(Float64Type),
        other => return Err(format!("column '{column}' is {other}, not a number").into()),
    })
}
