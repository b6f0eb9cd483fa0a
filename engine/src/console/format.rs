//! Answers as the console sends them: JSON rows for the page, CSV, Parquet or Arrow IPC
//! files for downloads.

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use serde::Serialize;

/// A column as the page shows it.
#[derive(Serialize)]
pub struct JsonColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
}

/// The first rows of an answer as JSON arrays (one value per column, in order; numbers as
/// numbers, NULL as null, everything else as text), and how many rows it has in all.
pub struct JsonRows {
    pub columns: Vec<JsonColumn>,
    pub rows: Vec<Vec<serde_json::Value>>,
    pub row_count: usize,
}

pub fn json(
    schema: &Schema,
    batches: &[RecordBatch],
    limit: usize,
) -> Result<JsonRows, arrow::error::ArrowError> {
    use arrow::array::Array;
    use arrow::datatypes::DataType;
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let columns = schema
        .fields()
        .iter()
        .map(|f| JsonColumn {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
        })
        .collect();
    let options = FormatOptions::default();
    let mut rows = Vec::new();
    let mut row_count = 0;
    for batch in batches {
        row_count += batch.num_rows();
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for r in 0..batch.num_rows() {
            if rows.len() >= limit {
                break;
            }
            let row = batch
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(column, text)| {
                    if column.is_null(r) {
                        return serde_json::Value::Null;
                    }
                    let text = text.value(r).to_string();
                    let numeric = matches!(
                        column.data_type(),
                        DataType::Int8
                            | DataType::Int16
                            | DataType::Int32
                            | DataType::Int64
                            | DataType::UInt8
                            | DataType::UInt16
                            | DataType::UInt32
                            | DataType::UInt64
                            | DataType::Float32
                            | DataType::Float64
                    );
                    if numeric {
                        // Integers stay exact (serde_json keeps 64 bits); NaN and the
                        // infinities have no JSON number and stay text.
                        if let Ok(n) = text.parse::<i64>() {
                            return n.into();
                        }
                        if let Some(n) = text
                            .parse::<f64>()
                            .ok()
                            .and_then(serde_json::Number::from_f64)
                        {
                            return serde_json::Value::Number(n);
                        }
                    }
                    if matches!(column.data_type(), DataType::Boolean) {
                        return (text == "true").into();
                    }
                    text.into()
                })
                .collect();
            rows.push(row);
        }
    }
    Ok(JsonRows {
        columns,
        rows,
        row_count,
    })
}

/// The whole answer as a file of `kind` (`csv`, `parquet`, `arrow`): its content type and
/// bytes.
pub fn file(
    kind: &str,
    schema: &Schema,
    batches: &[RecordBatch],
) -> Result<(&'static str, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
    let schema = std::sync::Arc::new(schema.clone());
    let mut bytes = Vec::new();
    match kind {
        "csv" => {
            write_csv(&schema, batches, &mut bytes)?;
            Ok(("text/csv; charset=utf-8", bytes))
        }
        "parquet" => {
            let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, None)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.close()?;
            Ok(("application/vnd.apache.parquet", bytes))
        }
        "arrow" => {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            drop(writer);
            Ok(("application/vnd.apache.arrow.stream", bytes))
        }
        other => Err(format!("unknown format '{other}'").into()),
    }
}

/// An answer as CSV with a header line, also when it has no rows (`railyard sql --format
/// csv` and the console's downloads).
pub fn write_csv(
    schema: &arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    out: impl std::io::Write,
) -> Result<(), arrow::error::ArrowError> {
    let mut writer = arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(out);
    if batches.is_empty() {
        writer.write(&RecordBatch::new_empty(std::sync::Arc::clone(schema)))?;
    }
    for batch in batches {
        writer.write(batch)?;
    }
    Ok(())
}
