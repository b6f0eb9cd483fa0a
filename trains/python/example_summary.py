"""Example train: per-group sufficient statistics of one numeric column.

Arguments: ``{"column": "age", "by": "sex"}`` (``by`` optional). Output: one row per group
with ``level`` (the group's value as text; null without ``by``), ``n``, ``sum`` and
``sum_sq`` of the column's non-null values, so that the hub can pool means and variances
exactly: mean = Σsum / Σn, variance = (Σsum_sq − Σsum²/Σn) / (Σn − 1). The image declares
these four columns (label ``railyard.output-schema``), whatever the arguments.
"""

import pyarrow as pa
import pyarrow.compute as pc

import railyard_train


def summary(table: pa.Table, args: dict) -> pa.Table:
    column = args.get("column")
    if not column or column not in table.column_names:
        raise ValueError(f"argument 'column' must name an input column ({table.column_names})")
    by = args.get("by")
    values = pc.cast(table[column], pa.float64())
    work = pa.table({"v": values, "v2": pc.multiply(values, values)})
    keys = []
    if by:
        if by not in table.column_names:
            raise ValueError(f"argument 'by' must name an input column ({table.column_names})")
        work = work.append_column("level", pc.cast(table[by], pa.string()))
        keys = ["level"]
    work = work.filter(pc.is_valid(work["v"]))
    grouped = work.group_by(keys).aggregate([("v", "count"), ("v", "sum"), ("v2", "sum")])
    level = grouped["level"] if by else pa.nulls(grouped.num_rows, pa.string())
    return pa.table(
        {
            "level": level,
            "n": pc.cast(grouped["v_count"], pa.int64()),
            "sum": pc.cast(grouped["v_sum"], pa.float64()),
            "sum_sq": pc.cast(grouped["v2_sum"], pa.float64()),
        }
    )


if __name__ == "__main__":
    railyard_train.run(summary)
