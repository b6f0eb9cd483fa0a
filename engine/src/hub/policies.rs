//! What the hub keeps of the policies its stations announce: `railyard.policies`, and what
//! the planner needs per table (the stations remain the authority: each checks every
//! fragment itself).

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use railyard_planner::StationTablePolicy;

use crate::error::{Error, Result};

/// Registers `railyard.policies`: per station, table and column, the column's visibility,
/// the table's k and whether the table is released for vertical joins, as the stations
/// announced them.
pub(super) fn register_policies(
    ctx: &SessionContext,
    policies: &[(String, railyard_contract::TablePolicyInfo)],
) -> Result<()> {
    use arrow::array::{BooleanArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("station", DataType::Utf8, false),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("visibility", DataType::Utf8, false),
        Field::new("min_group_size", DataType::Int64, false),
        Field::new("allow_vertical", DataType::Boolean, false),
        // The column whose distinct values every rule counts (NULL: rows).
        Field::new("privacy_unit", DataType::Utf8, true),
        Field::new("reference", DataType::Boolean, false),
    ]));
    let (mut station, mut table, mut column, mut visibility, mut k, mut vertical) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut unit, mut reference) = (vec![], vec![]);
    for (name, info) in policies {
        for (c, v) in &info.columns {
            station.push(name.clone());
            table.push(info.table.clone());
            column.push(c.clone());
            visibility.push(v.as_str());
            k.push(info.min_group_size as i64);
            vertical.push(info.allow_vertical);
            unit.push(info.privacy_unit.clone());
            reference.push(info.reference.is_some());
        }
    }
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(station)),
            Arc::new(StringArray::from(table)),
            Arc::new(StringArray::from(column)),
            Arc::new(StringArray::from(visibility)),
            Arc::new(Int64Array::from(k)),
            Arc::new(BooleanArray::from(vertical)),
            Arc::new(StringArray::from(unit)),
            Arc::new(BooleanArray::from(reference)),
        ],
    )
    .map_err(DataFusionError::from)?;
    let catalog = ctx
        .catalog("datafusion")
        .ok_or_else(|| Error::BadRequest("the hub's default catalog is missing".to_string()))?;
    catalog.register_schema("railyard", Arc::new(MemorySchemaProvider::new()))?;
    ctx.register_table(
        "railyard.policies",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]])?),
    )?;
    Ok(())
}

/// What the planner needs of a station's announced policy for one table (the station
/// remains the authority: it checks every fragment itself).
pub(super) fn planner_policy(info: &railyard_contract::TablePolicyInfo) -> StationTablePolicy {
    StationTablePolicy {
        min_group_size: info.min_group_size,
        public: info
            .columns
            .iter()
            .filter(|(_, v)| *v == railyard_contract::Visibility::Public)
            .map(|(c, _)| c.clone())
            .collect(),
        model_min_rows: info.model_min_rows,
        survival_time_resolution: info.survival_time_resolution,
        privacy_unit: info.privacy_unit.clone(),
        reference: info.reference.clone(),
    }
}
