//! A train that tests the station's sandbox (used by the test suite, never allowed in a
//! real policy). `{"action": …}`:
//!
//! - `inspect`: one row describing what the train sees: its user id, whether it can write
//!   to `/` and to its input directory, the input's rows and column names;
//! - `network`: tries to connect to `address` (default `1.1.1.1:80`); exits 3 if it cannot,
//!   writes a row if it can;
//! - `sleep`: sleeps `seconds`, then writes a row;
//! - `rows`: writes `n` rows;
//! - `garbage`: writes text where the Arrow file belongs;
//! - `undeclared`: writes one row whose column is named after the input's first value (a
//!   leak through a column name), where its image declares a column `i`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use railyard_train::{Error, Input, write_output};

fn one_row(name: &str, value: i64) -> Result<RecordBatch, Error> {
    let schema = Arc::new(Schema::new(vec![Field::new(name, DataType::Int64, false)]));
    Ok(RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from(vec![value]))],
    )?)
}

/// The first value of a column as text (the probe's inputs are integers).
fn first_value(column: &dyn arrow_array::Array) -> String {
    column
        .as_any()
        .downcast_ref::<Int64Array>()
        .map(|a| a.value(0).to_string())
        .unwrap_or_else(|| "value".to_string())
}

fn uid() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn writable(dir: &str) -> bool {
    let path = format!("{dir}/probe-write-test");
    let ok = std::fs::write(&path, b"x").is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

fn probe(input: Input) -> Result<Option<RecordBatch>, Error> {
    let action = input
        .arg("action")
        .and_then(|a| a.as_str())
        .unwrap_or("inspect");
    Ok(Some(match action {
        "inspect" => {
            let input_dir = std::env::var("RAILYARD_INPUT")
                .ok()
                .and_then(|p| p.rsplit_once('/').map(|(d, _)| d.to_string()))
                .unwrap_or_default();
            let columns: Vec<&str> = input
                .schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect();
            let schema = Arc::new(Schema::new(vec![
                Field::new("uid", DataType::Int64, true),
                Field::new("root_writable", DataType::Boolean, false),
                Field::new("input_writable", DataType::Boolean, false),
                Field::new("input_rows", DataType::Int64, false),
                Field::new("input_columns", DataType::Utf8, false),
            ]));
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(Int64Array::from(vec![uid()])),
                    Arc::new(BooleanArray::from(vec![writable("")])),
                    Arc::new(BooleanArray::from(vec![writable(&input_dir)])),
                    Arc::new(Int64Array::from(vec![input.rows() as i64])),
                    Arc::new(StringArray::from(vec![columns.join(",")])),
                ],
            )?
        }
        "network" => {
            let address = input
                .arg("address")
                .and_then(|a| a.as_str())
                .unwrap_or("1.1.1.1:80");
            let address = address.parse()?;
            match std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
                Ok(_) => one_row("connected", 1)?,
                Err(e) => {
                    eprintln!("no network: {e}");
                    std::process::exit(3);
                }
            }
        }
        "sleep" => {
            let seconds = input
                .arg("seconds")
                .and_then(|s| s.as_f64())
                .unwrap_or(3600.0);
            std::thread::sleep(Duration::from_secs_f64(seconds));
            one_row("slept", 1)?
        }
        "rows" => {
            let n = input.arg("n").and_then(|n| n.as_i64()).unwrap_or(1000);
            let schema = Arc::new(Schema::new(vec![Field::new("i", DataType::Int64, false)]));
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))])?
        }
        "undeclared" => {
            let first = input
                .batches
                .iter()
                .find(|b| b.num_rows() > 0)
                .map(|b| first_value(b.column(0).as_ref()))
                .unwrap_or_default();
            one_row(&format!("leak_{first}"), 1)?
        }
        "garbage" => {
            let path = std::env::var("RAILYARD_OUTPUT")?;
            std::fs::write(path, b"not an arrow file\n")?;
            return Ok(None);
        }
        other => return Err(format!("unknown action '{other}'").into()),
    }))
}

fn main() -> ExitCode {
    let result = Input::from_env()
        .and_then(probe)
        .and_then(|batch| match batch {
            Some(b) => write_output(&b),
            None => Ok(()),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe failed: {e}");
            ExitCode::FAILURE
        }
    }
}
