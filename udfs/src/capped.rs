//! Caps on the functions that grow a string: from a count (`repeat`, `lpad`, `rpad`) or from
//! their arguments (`concat`, `concat_ws`). Without them `repeat('x', 2000000000)` allocates
//! gigabytes wherever it is evaluated, even while the hub folds a constant, and a `concat`
//! of a long constant broadcast to every row of a batch overflows an Arrow string array. The capped versions replace the built-in ones under the same
//! names, at the hub and at every station, and refuse a result over [`MAX_STRING_BYTES`]
//! before allocating it.

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

/// Longest string (in bytes) a capped function may build: a constant one is broadcast to
/// every row of a batch (8,192), which must stay within an Arrow string array (2 GiB).
pub const MAX_STRING_BYTES: usize = 64 << 10;
/// Most bytes a capped function may build for one batch of rows (an Arrow string array
/// holds at most 2 GiB; past it the kernel panics).
pub const MAX_BATCH_STRING_BYTES: usize = 256 << 20;

/// One of the capped functions, wrapping DataFusion's own.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Capped {
    inner: Arc<ScalarUDF>,
}

/// Registers the capped `repeat`, `lpad` and `rpad` in place of the built-in ones (at the
/// hub and at every station).
pub fn register(ctx: &SessionContext) {
    for inner in [
        datafusion::functions::string::repeat(),
        datafusion::functions::unicode::lpad(),
        datafusion::functions::unicode::rpad(),
    ] {
        ctx.register_udf(ScalarUDF::from(Capped { inner }));
    }
}

/// The hub's `a || b` on strings, capped like `concat`: [`string_concat`] replaces the
/// operator in the hub's own plan (a chain of `s || s || s || s` through a few subqueries
/// multiplies a string's size by four per level). Same semantics: NULL if either side is.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CappedStringConcat {
    signature: Signature,
}

/// `a || b` as a call of the capped operator.
pub fn string_concat(
    left: datafusion::logical_expr::Expr,
    right: datafusion::logical_expr::Expr,
) -> datafusion::logical_expr::Expr {
    ScalarUDF::from(CappedStringConcat {
        signature: Signature::any(2, datafusion::logical_expr::Volatility::Immutable),
    })
    .call(vec![left, right])
}

impl ScalarUDFImpl for CappedStringConcat {
    fn name(&self) -> &str {
        "string_concat"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types {
            [a, b] if a == b => Ok(a.clone()),
            _ => exec_err!("string_concat() takes two strings of one type"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [left, right] = args.args.as_slice() else {
            return exec_err!("string_concat() takes two arguments");
        };
        let bytes = (longest(left) + longest(right)) as u64;
        within("||", "string", bytes, MAX_STRING_BYTES, args.number_rows)?;
        let left = left.to_array(args.number_rows)?;
        let right = right.to_array(args.number_rows)?;
        Ok(ColumnarValue::Array(
            arrow::compute::kernels::concat_elements::concat_elements_dyn(&left, &right)?,
        ))
    }
}

/// Registers the capped string builders (`concat`, `concat_ws`, `replace`,
/// `regexp_replace`, `encode`, `translate`, `overlay`) and list builders (`array_repeat`,
/// `array_resize`, `range`, `generate_series`) in place of the built-in ones: at the hub
/// only. There, a constant of up to [`MAX_STRING_BYTES`] per `repeat`, concatenated many
/// times and broadcast to every row, or `encode(encode(…, 'hex'), 'hex')` doubling per
/// level, would build gigabytes. A station needs no cap: its
/// policy check refuses `repeat`/`lpad`/`rpad` beside a non-public column and caps string
/// literals, so a `concat` there grows only with the statement and the data, and a cap that
/// looked at the data's string lengths would fail exactly when some patient's value is long
/// (an oracle on the longest value).
pub fn register_concat(ctx: &SessionContext) {
    for inner in [
        datafusion::functions::string::concat(),
        datafusion::functions::string::concat_ws(),
        datafusion::functions::string::replace(),
        datafusion::functions::regex::regexp_replace(),
        datafusion::functions::encoding::encode(),
        datafusion::functions::unicode::translate(),
        datafusion::functions::core::overlay(),
        datafusion::functions_nested::repeat::array_repeat_udf(),
        datafusion::functions_nested::resize::array_resize_udf(),
        datafusion::functions_nested::range::range_udf(),
        datafusion::functions_nested::range::gen_series_udf(),
    ] {
        ctx.register_udf(ScalarUDF::from(Capped { inner }));
    }
}

/// The largest integer a count argument holds, if it is one.
fn largest(count: &ColumnarValue) -> Option<i64> {
    extreme(count, arrow::compute::max)
}

/// The smallest integer an argument holds, if it is one.
fn least(value: &ColumnarValue) -> Option<i64> {
    extreme(value, arrow::compute::min)
}

/// An argument as integers, reduced by `pick` (a scalar is its own extreme).
fn extreme(
    value: &ColumnarValue,
    pick: fn(&arrow::array::Int64Array) -> Option<i64>,
) -> Option<i64> {
    match value {
        ColumnarValue::Scalar(s) => match s.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(v) => v,
            _ => None,
        },
        ColumnarValue::Array(a) => {
            let a = arrow::compute::cast(a, &DataType::Int64).ok()?;
            pick(a.as_primitive::<Int64Type>())
        }
    }
}

/// The longest string (in bytes) an argument holds.
fn longest(value: &ColumnarValue) -> usize {
    let len = |a: &dyn Array| match a.data_type() {
        DataType::Utf8 => (0..a.len())
            .map(|i| a.as_string::<i32>().value(i).len())
            .max(),
        DataType::LargeUtf8 => (0..a.len())
            .map(|i| a.as_string::<i64>().value(i).len())
            .max(),
        DataType::Utf8View => (0..a.len())
            .map(|i| a.as_string_view().value(i).len())
            .max(),
        DataType::Binary => (0..a.len())
            .map(|i| a.as_binary::<i32>().value(i).len())
            .max(),
        DataType::LargeBinary => (0..a.len())
            .map(|i| a.as_binary::<i64>().value(i).len())
            .max(),
        DataType::BinaryView => (0..a.len())
            .map(|i| a.as_binary_view().value(i).len())
            .max(),
        _ => Some(0),
    };
    match value {
        ColumnarValue::Scalar(s) => s.to_array().ok().and_then(|a| len(&a)).unwrap_or(0),
        ColumnarValue::Array(a) => len(a).unwrap_or(0),
    }
}

impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let name = self.inner.name();
        let bytes = match (name, args.args.as_slice()) {
            // The longest result: every argument at its longest.
            ("concat", all) => all.iter().map(|a| longest(a) as u64).sum(),
            // Every character may become the whole replacement.
            ("replace" | "regexp_replace", [s, _, to, ..]) => (longest(s) as u64)
                .max(1)
                .saturating_mul(longest(to).max(1) as u64),
            ("concat_ws", [sep, rest @ ..]) => (longest(sep) as u64)
                .saturating_mul(rest.len().saturating_sub(1) as u64)
                .saturating_add(rest.iter().map(|a| longest(a) as u64).sum()),
            ("repeat", [s, n, ..]) => largest(n)
                .unwrap_or(0)
                .max(0)
                .unsigned_abs()
                .saturating_mul(longest(s) as u64),
            // Hexadecimal doubles a value, base64 adds a third.
            ("encode", [s, ..]) => 2 * longest(s) as u64,
            // A character may become one of up to 4 bytes.
            ("translate", [s, ..]) => 4 * longest(s) as u64,
            ("overlay", [s, placing, ..]) => (longest(s) + longest(placing)) as u64,
            ("array_repeat" | "array_resize" | "range" | "generate_series" | "gen_series", _) => {
                return self.invoke_list(args);
            }
            // A padded string has `n` characters of up to 4 bytes.
            (_, [_, n, ..]) => largest(n)
                .unwrap_or(0)
                .max(0)
                .unsigned_abs()
                .saturating_mul(4),
            _ => 0,
        };
        within(
            &format!("{name}()"),
            "string",
            bytes,
            MAX_STRING_BYTES,
            args.number_rows,
        )?;
        self.inner.invoke_with_args(args)
    }
}

/// Refuses a result estimated at `bytes` per value over `limit`, or over
/// [`MAX_BATCH_STRING_BYTES`] for a batch of `rows`.
fn within(name: &str, what: &str, bytes: u64, limit: usize, rows: usize) -> Result<()> {
    if bytes > limit as u64 {
        return exec_err!(
            "{name} would build a {what} of more than {limit} bytes (limit max_string_bytes)"
        );
    }
    if bytes.saturating_mul(rows as u64) > MAX_BATCH_STRING_BYTES as u64 {
        return exec_err!(
            "{name} would build more than {MAX_BATCH_STRING_BYTES} bytes of {what}s for one \
             batch of rows (limit max_string_bytes)"
        );
    }
    Ok(())
}

/// Most bytes one list value a capped function builds may take (an estimate: 8 bytes or the
/// repeated element's size per element).
pub const MAX_LIST_BYTES: usize = 16 << 20;

impl Capped {
    /// The list builders: their size is a count (`array_repeat(x, n)`, `array_resize(a, n)`)
    /// or a span (`range(a, b, step)`) times an element.
    fn invoke_list(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let name = self.inner.name();
        let count = |v: &ColumnarValue| largest(v).unwrap_or(0).unsigned_abs();
        let per_element = |v: &ColumnarValue| -> u64 {
            let size = match v {
                ColumnarValue::Scalar(s) => s.size() as u64,
                ColumnarValue::Array(a) => a.get_array_memory_size() as u64 / a.len().max(1) as u64,
            };
            size.max(8)
        };
        let elements: u64 = match (name, args.args.as_slice()) {
            ("array_repeat", [element, n]) => count(n).saturating_mul(per_element(element)) / 8,
            ("array_resize", [_, n, ..]) => count(n),
            (_, [stop]) => count(stop),
            (_, [start, stop, rest @ ..]) => {
                let step = rest
                    .first()
                    .and_then(largest)
                    .map_or(1, |s| s.unsigned_abs().max(1));
                let span = largest(stop)
                    .zip(least(start))
                    .map_or(0, |(b, a)| b.abs_diff(a).max(a.abs_diff(b)));
                span / step
            }
            _ => 0,
        };
        let bytes = elements.saturating_mul(8);
        within(
            &format!("{name}()"),
            "list",
            bytes,
            MAX_LIST_BYTES,
            args.number_rows,
        )?;
        self.inner.invoke_with_args(args)
    }
}
