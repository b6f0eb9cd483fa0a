"""Lazy federated dataframes, compiled to Substrait and planned at the hub.

``conn.table("lung")`` is a :class:`Frame`: nothing runs while it is built up with
``filter``, ``select``, ``group_by(...).agg(...)``, ``sort``, ``limit`` and ``join``. When its
answer is asked for (``to_arrow``, ``to_pandas``, ``to_polars``) or its plan
(``explain``), the frame's logical plan is serialized as a Substrait plan by the
``datafusion`` package (the same DataFusion release as the hub) and sent to the hub, which
plans it exactly as the equivalent SQL: the same fragments, the same checks at every
station, the same refusals.

The local DataFusion session only holds empty tables with the federated schemas the hub
announces: it plans the frame, it never sees a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import pandas as pd
import pyarrow as pa

from datafusion import Expr, SessionContext
from datafusion import col as _col
from datafusion import functions as _f
from datafusion import lit as _lit
from datafusion.substrait import Producer

if TYPE_CHECKING:
    from . import Connection

__all__ = [
    "Frame",
    "GroupedFrame",
    "col",
    "lit",
    "count",
    "count_distinct",
    "mean",
    "sum",
    "min",
    "max",
    "stddev",
    "variance",
]

#: The header that asks the hub for a Substrait plan's EXPLAIN FEDERATED.
EXPLAIN_HEADER = "x-railyard-explain"

ColumnLike = Union[str, Expr]


def col(name: str) -> Expr:
    """A column of a frame, by name."""
    return _col(name)


def lit(value: Any) -> Expr:
    """A literal value."""
    return _lit(value)


def _expr(column: ColumnLike) -> Expr:
    return _col(column) if isinstance(column, str) else column


def count(column: Optional[ColumnLike] = None) -> Expr:
    """``count(*)`` without a column (named as SQL names it), ``count(column)`` with one."""
    if column is None:
        return _f.count().alias("count(*)")
    return _f.count(_expr(column))


def count_distinct(column: ColumnLike) -> Expr:
    """``count(DISTINCT column)``."""
    return _f.count(_expr(column), distinct=True)


def mean(column: ColumnLike) -> Expr:
    """``avg(column)``."""
    return _f.avg(_expr(column))


def sum(column: ColumnLike) -> Expr:  # noqa: A001 - the SQL name
    """``sum(column)``."""
    return _f.sum(_expr(column))


def min(column: ColumnLike) -> Expr:  # noqa: A001 - the SQL name
    """``min(column)``."""
    return _f.min(_expr(column))


def max(column: ColumnLike) -> Expr:  # noqa: A001 - the SQL name
    """``max(column)``."""
    return _f.max(_expr(column))


def stddev(column: ColumnLike) -> Expr:
    """The sample standard deviation, ``stddev(column)``."""
    return _f.stddev(_expr(column))


def variance(column: ColumnLike) -> Expr:
    """The sample variance, ``var_samp(column)``."""
    return _f.var_samp(_expr(column))


class _Planner:
    """A connection's local DataFusion session: an empty table per federated table the
    frames read, registered with the schema the hub announces for it."""

    def __init__(self, conn: "Connection"):
        self._conn = conn
        self.ctx = SessionContext()
        self._registered: set[str] = set()

    def table(self, name: str) -> Any:
        if name not in self._registered:
            schema = self._conn._table_schema(name)
            # Nullable everywhere: the hub checks a plan's columns against its own schema,
            # and accepts a nullable column where its own is not.
            schema = pa.schema([field.with_nullable(True) for field in schema])
            empty = pa.RecordBatch.from_pylist([], schema=schema)
            self.ctx.register_record_batches(name, [[empty]])
            self._registered.add(name)
        return self.ctx.table(name)


class Frame:
    """A lazy query over federated tables. Every method returns a new frame; nothing
    leaves a station until the answer is asked for."""

    def __init__(self, conn: "Connection", planner: _Planner, df: Any):
        self._conn = conn
        self._planner = planner
        self._df = df

    def _with(self, df: Any) -> "Frame":
        return Frame(self._conn, self._planner, df)

    # ------------------------------------------------------------------------ building

    def filter(self, *predicates: Expr) -> "Frame":
        """Rows where every predicate holds, e.g. ``filter(col("age") > 60)``."""
        return self._with(self._df.filter(*predicates))

    def select(self, *columns: ColumnLike) -> "Frame":
        """These columns or expressions, in this order."""
        return self._with(self._df.select(*[_expr(c) for c in columns]))

    def with_column(self, name: str, expr: Expr) -> "Frame":
        """The frame with one more (or a replaced) column."""
        return self._with(self._df.with_column(name, expr))

    def group_by(self, *keys: ColumnLike) -> "GroupedFrame":
        """Groups by these columns; finish with :meth:`GroupedFrame.agg`."""
        return GroupedFrame(self, [_expr(k) for k in keys])

    def agg(self, *aggregates: Expr) -> "Frame":
        """Aggregates over the whole frame (one row)."""
        return self._with(self._df.aggregate([], list(aggregates)))

    def sort(self, *keys: ColumnLike, descending: bool = False) -> "Frame":
        """Sorted by these columns (nulls last)."""
        exprs = [_expr(k).sort(ascending=not descending, nulls_first=False) for k in keys]
        return self._with(self._df.sort(*exprs))

    def limit(self, n: int) -> "Frame":
        """The first ``n`` rows."""
        return self._with(self._df.limit(n))

    def distinct(self) -> "Frame":
        """Distinct rows."""
        return self._with(self._df.distinct())

    def join(self, other: "Frame", on: Union[str, list[str]], how: str = "inner") -> "Frame":
        """A join with another frame of this connection on equal columns."""
        if other._planner is not self._planner:
            raise ValueError("frames of two connections cannot be joined")
        # The other side under a name of its own, so that a table joins a frame of itself
        # (an aggregate of it, say) without two columns of one qualified name.
        return self._with(self._df.join(other._df.alias("right"), on=on, how=how))

    def alias(self, name: str) -> "Frame":
        """The frame under a table name, for expressions like ``col("name.column")``."""
        return self._with(self._df.alias(name))

    # ------------------------------------------------------------------------- reading

    @property
    def schema(self) -> pa.Schema:
        """The answer's columns and types."""
        return self._df.schema()

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def substrait(self) -> bytes:
        """The frame's plan as serialized Substrait (what is sent to the hub)."""
        plan = Producer.to_substrait_plan(self._df.logical_plan(), self._planner.ctx)
        return plan.encode()

    def to_arrow(self) -> pa.Table:
        """Runs the frame at the hub; the answer as a pyarrow Table (a DP answer carries the
        ε each station charged, see :func:`railyard.epsilon_charged`)."""
        return self._conn._run_substrait(self.substrait())

    collect = to_arrow

    def to_pandas(self) -> pd.DataFrame:
        return self.to_arrow().to_pandas()

    def to_polars(self) -> Any:
        from . import to_polars

        return to_polars(self.to_arrow())

    def explain(self) -> pd.DataFrame:
        """``EXPLAIN FEDERATED`` of the frame, as the hub plans it: per station the fragment
        it runs and what leaves it, then the hub's merge."""
        return self._conn._run_substrait(self.substrait(), explain=True).to_pandas()

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}: {f.type}" for f in self.schema)
        return f"railyard.Frame[{fields}] (lazy: .to_pandas() runs it)"


class GroupedFrame:
    """A frame grouped by keys, waiting for its aggregates."""

    def __init__(self, frame: Frame, keys: list[Expr]):
        self._frame = frame
        self._keys = keys

    def agg(self, *aggregates: Expr) -> Frame:
        """One row per group: the keys, then these aggregates, e.g.
        ``agg(count(), mean("age"))``."""
        frame = self._frame
        return frame._with(frame._df.aggregate(self._keys, list(aggregates)))
