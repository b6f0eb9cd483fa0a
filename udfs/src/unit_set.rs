//! `unit_set(unit_hash)`: which privacy units (patients) a released value covers.
//!
//! A station's query-set auditor compares the set behind every value it releases with the
//! sets it released to the same researcher before: two sets that differ by a few patients
//! subtract to those patients. The aggregate collects the units of a group (or of the rows
//! one aggregate call reads, under its FILTER) into a [`Set`], serialized as Binary; the set
//! never leaves the station. (The station's auditor renumbers the elements densely before
//! it stores a set, and stores it as a compressed bitmap, so stored sets stay small.)
//!
//! Elements are the 64-bit unit hashes folded to 32 bits (`h ^ (h >> 32)`). Two patients
//! whose folded hashes collide count as one: with n patients a given patient shares its
//! element with another with probability about n / 2³², so a difference of one patient
//! goes unseen with that probability (2·10⁻⁴ for a million patients).
//!
//! A set is its elements ascending, without repeats, and its bytes are those elements,
//! four little-endian bytes each. Hashes scatter over the whole 32-bit range, so a roaring
//! bitmap of them (which this was) keeps one container, one allocation, per patient and
//! spends about 10 bytes on each; the sorted array spends 4, and building, merging,
//! encoding and decoding it are each one pass over a buffer.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, TypeSignature, Volatility,
};

/// The function's name (a station-internal aggregate; it is never registered for SQL).
pub const UNIT_SET: &str = "unit_set";

/// The 32-bit element of a unit hash.
pub fn element(hash: u64) -> u32 {
    // Truncation is the point: the high half is folded into the low half first.
    (hash ^ (hash >> 32)) as u32
}

/// A set of unit elements: ascending, without repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Set(Vec<u32>);

impl Set {
    /// The set of `elements`, in any order, with repeats. The sort finds ascending runs
    /// and merges them, so the union of a few sets laid end to end is a merge, not a sort.
    pub fn of(mut elements: Vec<u32>) -> Self {
        elements.sort();
        elements.dedup();
        Self(elements)
    }

    /// How many elements it holds.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The elements, ascending.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn contains(&self, element: u32) -> bool {
        self.0.binary_search(&element).is_ok()
    }

    /// The elements of `self` that `other` lacks.
    pub fn difference(&self, other: &Set) -> Set {
        let mut out = Vec::with_capacity(self.0.len());
        let mut theirs = other.0.iter().peekable();
        for &x in &self.0 {
            while theirs.next_if(|y| **y < x).is_some() {}
            if theirs.peek() != Some(&&x) {
                out.push(x);
            }
        }
        Self(out)
    }

    /// The set's bytes: each element as four little-endian bytes, ascending.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(4 * self.0.len());
        for x in &self.0 {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes
    }

    /// A set's bytes back as the set (`None`: the bytes are not a set's: a length that is
    /// not a multiple of four, or elements that do not strictly ascend).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut elements = Vec::with_capacity(bytes.len() / 4);
        append_decoded(bytes, &mut elements).then_some(Self(elements))
    }
}

impl FromIterator<u32> for Set {
    fn from_iter<I: IntoIterator<Item = u32>>(elements: I) -> Self {
        Self::of(elements.into_iter().collect())
    }
}

/// Appends the elements of a set's bytes to `out`; false (with `out` partly extended) when
/// the bytes are not a set's.
fn append_decoded(bytes: &[u8], out: &mut Vec<u32>) -> bool {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return false;
    }
    let mut last: Option<u32> = None;
    for chunk in chunks {
        let x = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if last.is_some_and(|l| l >= x) {
            return false;
        }
        last = Some(x);
        out.push(x);
    }
    true
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

/// The accumulator: the first `distinct` elements ascend without repeats; the rest are as
/// they arrived, with repeats (a patient has many rows), sorted in when they outgrow the
/// sorted part, so that memory stays within about twice the set's.
#[derive(Debug, Default)]
struct Units {
    elements: Vec<u32>,
    distinct: usize,
}

impl Units {
    fn normalize(&mut self) {
        if self.elements.len() > self.distinct {
            self.elements.sort_unstable();
            self.elements.dedup();
            self.distinct = self.elements.len();
        }
    }

    fn grew(&mut self) {
        if self.elements.len() > 2 * self.distinct + 4096 {
            self.normalize();
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        self.normalize();
        let mut bytes = Vec::with_capacity(4 * self.elements.len());
        for x in &self.elements {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes
    }
}

impl Accumulator for Units {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [units] = values else {
            return internal_err!("{UNIT_SET} takes one argument");
        };
        let units = units.as_primitive::<UInt64Type>();
        if units.null_count() == 0 {
            self.elements
                .extend(units.values().iter().map(|h| element(*h)));
        } else {
            self.elements.extend(units.iter().flatten().map(element));
        }
        self.grew();
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [sets] = states else {
            return internal_err!("{UNIT_SET} has one state field");
        };
        for bytes in sets.as_binary::<i32>().iter().flatten() {
            if !append_decoded(bytes, &mut self.elements) {
                return internal_err!("{UNIT_SET}: a partial state is not a unit set");
            }
            self.grew();
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::Binary(Some(self.bytes()))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let bytes = self.bytes();
        Ok(ScalarValue::Binary((!bytes.is_empty()).then_some(bytes)))
    }

    fn size(&self) -> usize {
        size_of_val(self) + 4 * self.elements.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{RecordBatch, UInt64Array};
    use arrow::datatypes::Schema;
    use datafusion::prelude::SessionContext;

    /// `SELECT g, unit_set(u) … GROUP BY g` over `groups` and `hashes` in chunks of
    /// `chunk` rows, against each group's distinct elements collected in a `BTreeSet`.
    async fn sets_match_distinct_elements(
        groups: Vec<u64>,
        hashes: Vec<Option<u64>>,
        chunk: usize,
        partitions: usize,
    ) {
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
            datafusion::prelude::SessionConfig::new().with_target_partitions(partitions),
        );
        let chunks: Vec<RecordBatch> = (0..batch.num_rows().div_ceil(chunk))
            .map(|i| batch.slice(i * chunk, chunk.min(batch.num_rows() - i * chunk)))
            .collect();
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
        let mut got = std::collections::BTreeMap::new();
        for b in &out {
            let keys = b.column(0).as_primitive::<UInt64Type>();
            let sets = b.column(1).as_binary::<i32>();
            for r in 0..b.num_rows() {
                let set = Set::decode(sets.value(r)).expect("the aggregate answers a set");
                got.insert(keys.value(r), set.iter().collect::<Vec<u32>>());
            }
        }
        let mut want: std::collections::BTreeMap<u64, std::collections::BTreeSet<u32>> =
            std::collections::BTreeMap::new();
        for (g, h) in groups.iter().zip(&hashes) {
            let distinct = want.entry(*g).or_default();
            if let Some(h) = h {
                distinct.insert(((*h ^ (*h >> 32)) & 0xFFFF_FFFF) as u32);
            }
        }
        assert_eq!(got.len(), want.len());
        for (g, distinct) in want {
            let distinct: Vec<u32> = distinct.into_iter().collect();
            assert_eq!(got[&g], distinct, "group {g}");
        }
    }

    #[tokio::test]
    async fn the_set_of_a_group_is_its_distinct_units_over_partitions() {
        let n = 20_000u64;
        let hashes: Vec<Option<u64>> = (0..n)
            .map(|i| (i % 101 != 0).then_some((i % 977).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let groups: Vec<u64> = (0..n).map(|i| i % 3).collect();
        sets_match_distinct_elements(groups, hashes, 1000, 4).await;
    }

    #[tokio::test]
    async fn many_rows_per_unit_are_sorted_in_as_they_grow() {
        // 60 rows for each of 3,000 units, in one group: the collected elements outgrow the
        // sorted part several times, in one partition and across four.
        let hashes: Vec<Option<u64>> = (0..180_000u64)
            .map(|i| Some((i % 3000).wrapping_mul(0xD6E8_FEB8_6659_FD93)))
            .collect();
        for partitions in [1, 4] {
            sets_match_distinct_elements(vec![7; hashes.len()], hashes.clone(), 8192, partitions)
                .await;
        }
    }

    #[test]
    fn only_ascending_whole_elements_decode() {
        let set = Set::of(vec![9, 3, 3, 0, u32::MAX]);
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 3, 9, u32::MAX]);
        assert_eq!(Set::decode(&set.encode()), Some(set.clone()));
        assert_eq!(Set::decode(&[]), Some(Set::default()));
        let bytes = set.encode();
        assert_eq!(
            Set::decode(&bytes[..bytes.len() - 1]),
            None,
            "a torn element"
        );
        let repeat: Vec<u8> = [5u32, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(Set::decode(&repeat), None, "a repeated element");
        let descending: Vec<u8> = [6u32, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(Set::decode(&descending), None, "descending elements");
    }

    #[test]
    fn difference_and_membership_agree_with_btreeset() {
        use std::collections::BTreeSet;
        let a: Vec<u32> = (0..500u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 1000)
            .collect();
        let b: Vec<u32> = (0..400u32).map(|i| i.wrapping_mul(40_503) % 1000).collect();
        let (sa, sb) = (Set::of(a.clone()), Set::of(b.clone()));
        let (ta, tb): (BTreeSet<u32>, BTreeSet<u32>) =
            (a.into_iter().collect(), b.into_iter().collect());
        assert_eq!(sa.len(), ta.len() as u64);
        let want: Vec<u32> = ta.difference(&tb).copied().collect();
        assert_eq!(sa.difference(&sb).iter().collect::<Vec<_>>(), want);
        let want: Vec<u32> = tb.difference(&ta).copied().collect();
        assert_eq!(sb.difference(&sa).iter().collect::<Vec<_>>(), want);
        assert!(sa.difference(&sa).is_empty());
        for x in 0..1000 {
            assert_eq!(sa.contains(x), ta.contains(&x));
        }
    }
}
