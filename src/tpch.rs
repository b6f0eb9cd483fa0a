//! TPC-H `lineitem` and `orders`, generated in-process with the `tpchgen` crates (the
//! generator behind `tpchgen-cli`) and split over stations by the generator's own parts:
//! station *i* holds part *i*, i.e. a contiguous range of orders with all their line items.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{LineItemGenerator, OrderGenerator};
use tpchgen_arrow::{LineItemArrow, OrderArrow, RecordBatchIterator};

/// Writes `dir/lineitem/<station>.parquet` and `dir/orders/<station>.parquet` for each
/// station, at `scale` (1.0 = SF1: 6 million line items). Returns the two directories.
pub fn write_tpch(dir: &Path, scale: f64, stations: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let lineitem = dir.join("lineitem");
    let orders = dir.join("orders");
    for d in [&lineitem, &orders] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let parts = stations.len() as i32;
    for (i, station) in stations.iter().enumerate() {
        let part = i as i32 + 1;
        write(
            &lineitem.join(format!("{station}.parquet")),
            LineItemArrow::new(LineItemGenerator::new(scale, part, parts)).with_batch_size(65_536),
        )?;
        write(
            &orders.join(format!("{station}.parquet")),
            OrderArrow::new(OrderGenerator::new(scale, part, parts)).with_batch_size(65_536),
        )?;
    }
    Ok((lineitem, orders))
}

fn write(path: &Path, batches: impl RecordBatchIterator) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, batches.schema().clone(), Some(props))?;
    for batch in batches {
        let batch: RecordBatch = batch;
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(())
}
