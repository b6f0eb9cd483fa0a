//! `row_hash(a, b, …)`: a 64-bit hash of a row's values, with fixed seeds (the same row gives
//! the same hash in every run). A station XORs it over the rows that contribute to a
//! released value, to seed the noisy margin of its group-size threshold with *which* rows
//! contribute; the hash itself never leaves the station.

use std::sync::Arc;

use arrow::array::{ArrayRef, UInt64Array};
use arrow::datatypes::DataType;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The function's SQL name.
pub const ROW_HASH: &str = "row_hash";

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RowHash {
    signature: Signature,
}

impl Default for RowHash {
    fn default() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl RowHash {
    pub fn udf() -> ScalarUDF {
        ScalarUDF::from(Self::default())
    }
}

impl ScalarUDFImpl for RowHash {
    fn name(&self) -> &str {
        ROW_HASH
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.is_empty() {
            return plan_err!("{ROW_HASH} takes at least one column");
        }
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(args.number_rows))
            .collect::<Result<_>>()?;
        let mut hashes = vec![0u64; args.number_rows];
        create_hashes(
            &arrays,
            &RandomState::with_seed(0x5261_696c_7961_7264),
            &mut hashes,
        )?;
        Ok(ColumnarValue::Array(Arc::new(UInt64Array::from(hashes))))
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::Field;
    use datafusion::config::ConfigOptions;

    use super::*;

    fn run(arrays: Vec<ArrayRef>) -> Vec<u64> {
        let n = arrays[0].len();
        let arg_fields = arrays
            .iter()
            .map(|a| Arc::new(Field::new("c", a.data_type().clone(), true)))
            .collect();
        let out = RowHash::default()
            .invoke_with_args(ScalarFunctionArgs {
                args: arrays.into_iter().map(ColumnarValue::Array).collect(),
                arg_fields,
                number_rows: n,
                return_field: Arc::new(Field::new("h", DataType::UInt64, false)),
                config_options: Arc::new(ConfigOptions::default()),
            })
            .unwrap();
        let ColumnarValue::Array(a) = out else {
            panic!("an array")
        };
        a.as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap()
            .values()
            .to_vec()
    }

    #[test]
    fn equal_rows_hash_equal_and_different_rows_differ() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 1, 1]));
        let names: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a"),
            Some("a"),
            Some("a"),
            None,
        ]));
        let h = run(vec![ids.clone(), names.clone()]);
        assert_eq!(h[0], h[2]);
        assert_ne!(h[0], h[1]);
        assert_ne!(h[0], h[3]);
        // The same in a second run: the seeds are fixed.
        assert_eq!(h, run(vec![ids, names]));
    }
}
