//! `unit_set(unit_hash)`: which privacy units (patients) a released value covers, as a
//! compressed bitmap.
//!
//! A station's query-set auditor compares the set behind every value it releases with the
//! sets it released to the same researcher before: two sets that differ by a few patients
//! subtract to those patients. The aggregate collects the units of a group (or of the rows
//! one aggregate call reads, under its FILTER) into a roaring bitmap, serialized as Binary;
//! the bitmap never leaves the station. (The station's auditor renumbers the elements
//! densely before it stores a set, so stored sets stay small.)
//!
//! Elements are the 64-bit unit hashes folded to 32 bits (`h ^ (h >> 32)`). Two patients
//! whose folded hashes collide count as one: with n patients a given patient shares its
//! element with another with probability about n / 2³², so a difference of one patient
//! goes unseen with that probability (2·10⁻⁴ for a million patients).

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, TypeSignature, Volatility,
};
use roaring::RoaringBitmap;

/// The function's name (a station-internal aggregate; it is never registered for SQL).
pub const UNIT_SET: &str = "unit_set";

/// The 32-bit element of a unit hash.
pub fn element(hash: u64) -> u32 {
    // Truncation is the point: the high half is folded into the low half first.
    (hash ^ (hash >> 32)) as u32
}

/// The set of `elements`, in any order, with repeats. Sorted first, the bitmap appends each
/// element to its last container; inserted in hash order, it searched and shifted its
/// containers for every one.
pub fn bitmap_of(mut elements: Vec<u32>) -> RoaringBitmap {
    elements.sort_unstable();
    elements.dedup();
    RoaringBitmap::from_sorted_iter(elements).expect("sorted, deduplicated elements ascend")
}

/// A serialized set back as a bitmap (`None`: the bytes are not a bitmap).
pub fn decode(bytes: &[u8]) -> Option<RoaringBitmap> {
    RoaringBitmap::deserialize_from(bytes).ok()
}

/// A bitmap as the bytes the aggregate answers.
pub fn encode(set: &RoaringBitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(set.serialized_size());
    set.serialize_into(&mut bytes)
        .expect("writing into a Vec cannot fail");
    bytes
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnitSet {
    signature: Signature,
}

impl Default for UnitSet {
    fn default() -> Self {
        Self {
            signature: Signature::new(
                TypeSignature::Exact(vec![DataType::UInt64]),
                Volatility::Immutable,
            ),
        }
    }
}

/// The set aggregate, to call with a unit hash.
pub fn udaf() -> AggregateUDF {
    AggregateUDF::from(UnitSet::default())
}

impl AggregateUDFImpl for UnitSet {
    fn name(&self) -> &str {
        UNIT_SET
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Units::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "set"),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug, Default)]
struct Units {
    set: RoaringBitmap,
}

impl Accumulator for Units {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [units] = values else {
            return internal_err!("{UNIT_SET} takes one argument");
        };
        self.set |= bitmap_of(
            units
                .as_primitive::<UInt64Type>()
                .iter()
                .flatten()
                .map(element)
                .collect(),
        );
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [sets] = states else {
            return internal_err!("{UNIT_SET} has one state field");
        };
        for bytes in sets.as_binary::<i32>().iter().flatten() {
            match decode(bytes) {
                Some(set) => self.set |= set,
                None => return internal_err!("{UNIT_SET}: a partial state is not a bitmap"),
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Binary(Some(encode(&self.set)))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(
            (!self.set.is_empty()).then(|| encode(&self.set)),
        ))
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.set.serialized_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{RecordBatch, UInt64Array};
    use arrow::datatypes::Schema;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn the_set_of_a_group_is_its_distinct_units_over_partitions() {
        let n = 20_000u64;
        let hashes: Vec<Option<u64>> = (0..n)
            .map(|i| (i % 101 != 0).then_some((i % 977).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let groups: Vec<u64> = (0..n).map(|i| i % 3).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::UInt64, false),
            Field::new("u", DataType::UInt64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(UInt64Array::from(groups.clone())),
                Arc::new(UInt64Array::from(hashes.clone())),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_target_partitions(4),
        );
        let chunks: Vec<RecordBatch> = (0..20).map(|i| batch.slice(i * 1000, 1000)).collect();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![chunks]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx.register_udaf(udaf());
        let out = ctx
            .sql("SELECT g, unit_set(u) FROM t GROUP BY g ORDER BY g")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut got = Vec::new();
        for b in &out {
            let sets = b.column(1).as_binary::<i32>();
            for r in 0..b.num_rows() {
                got.push(decode(sets.value(r)).unwrap());
            }
        }
        for (g, set) in got.iter().enumerate() {
            let want: RoaringBitmap = (0..n)
                .filter(|i| groups[*i as usize] == g as u64)
                .filter_map(|i| hashes[i as usize])
                .map(element)
                .collect();
            assert_eq!(*set, want, "group {g}");
            assert!(set.len() > 300, "a group covers most of the 977 units");
        }
    }
}
