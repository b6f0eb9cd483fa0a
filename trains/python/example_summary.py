"""Example train: per-group sufficient statistics of one numeric column.

Arguments: ``{"column": "age", "by": "sex"}`` (``by`` optional). Output: one row per group
with ``n``, ``sum`` and ``sum_sq`` of the column's non-null values, so that the hub can pool
means and variances exactly: mean = Σsum / Σn, variance = (Σsum_sq − Σsum²/Σn) / (Σn − 1).
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
        work = work.append_column("level", table[by])
        keys = ["level"]
    work = work.filter(pc.is_valid(work["v"]))
    grouped = work.group_by(keys).aggregate([("v", "count"), ("v", "sum"), ("v2", "sum")])
    out = {
        "n": pc.cast(grouped["v_count"], pa.int64()),
        "sum": grouped["v_sum"],
        "sum_sq": grouped["v2_sum"],
    }
    if by:
        out = {"level": grouped["level"], **out}
    return pa.table(out)


if __name__ == "__main__":
    railyard_train.run(summary)
