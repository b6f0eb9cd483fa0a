"""Railyard for Python researchers: federated SQL and statistics over a Railyard hub.

A thin, typed layer over the ADBC Flight SQL driver. Everything runs at the hub and its
stations, under each station's policy; what comes back are the same privacy-checked
answers as SQL gives::

    import railyard

    conn = railyard.connect("grpc://127.0.0.1:50051")
    conn.sql("SELECT sex, count(*) AS n FROM lung WHERE age > ? GROUP BY sex", params=(60,))
    fit = conn.glm("lung", "status ~ age + sex", "binomial")
    fit.params, fit.bse, fit.pvalues
    curve = conn.kaplan_meier("lung", "time", "status", group="sex")
    curve.plot()

    from railyard import col, count, mean
    lung = conn.table("lung")
    lung.filter(col("age") > 60).group_by("sex").agg(count(), mean("age")).to_pandas()

See docs/python.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pandas as pd
import pyarrow as pa

from . import frame as _frame

# The dataframe API at the top level. (`sum`, `min` and `max` shadow the builtins in this
# module: use `builtins.sum` here if ever needed.)
from .frame import (
    Frame,
    GroupedFrame,
    col,
    count,
    count_distinct,
    lit,
    max,
    mean,
    min,
    stddev,
    sum,
    variance,
)

__all__ = _frame.__all__ + [
    "connect",
    "Connection",
    "GlmResult",
    "SurvivalCurve",
    "CrosstabResult",
    "epsilon_charged",
    "to_polars",
]

#: The schema metadata key under which a DP answer lists the ε each station charged.
EPSILON_METADATA = "railyard.epsilon"


def _quote(text: str) -> str:
    """A SQL string literal of ``text``."""
    return "'" + text.replace("'", "''") + "'"


def epsilon_charged(table: pa.Table) -> dict[str, float]:
    """The ε each station charged for a differentially private answer (empty otherwise)."""
    metadata = table.schema.metadata or {}
    raw = metadata.get(EPSILON_METADATA.encode())
    return {str(k): float(v) for k, v in json.loads(raw).items()} if raw else {}


def to_polars(table: pa.Table) -> Any:
    """``table`` as a polars DataFrame (needs ``pip install polars``)."""
    import polars as pl

    return pl.from_arrow(table)


@dataclass(frozen=True)
class GlmResult:
    """A federated GLM or Cox fit, shaped like statsmodels' results: ``params``, ``bse``,
    ``tvalues`` and ``pvalues`` are Series indexed by term."""

    table: pd.DataFrame
    formula: str
    family: str

    @property
    def params(self) -> pd.Series:
        return self._column("estimate")

    @property
    def bse(self) -> pd.Series:
        return self._column("std_error")

    @property
    def tvalues(self) -> pd.Series:
        return self._column("statistic")

    @property
    def pvalues(self) -> pd.Series:
        return self._column("p_value")

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald confidence intervals, as statsmodels' ``conf_int()``."""
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - alpha / 2)
        return pd.DataFrame({0: self.params - z * self.bse, 1: self.params + z * self.bse})

    def summary(self) -> pd.DataFrame:
        """The coefficient table: coef, std err, z, P>|z| and the 95 % interval."""
        ci = self.conf_int()
        return pd.DataFrame(
            {
                "coef": self.params,
                "std err": self.bse,
                "z": self.tvalues,
                "P>|z|": self.pvalues,
                "[0.025": ci[0],
                "0.975]": ci[1],
            }
        )

    def _column(self, name: str) -> pd.Series:
        return pd.Series(self.table[name].to_numpy(), index=list(self.table["term"]), name=name)

    def __repr__(self) -> str:
        return f"{self.family} GLM {self.formula}\n{self.summary().to_string()}"


class SurvivalCurve(pd.DataFrame):
    """A federated Kaplan–Meier estimate: one row per released time (``group`` first when
    grouped), with ``survival``, Greenwood's ``std_error`` and the 95 % band as lifelines
    computes it by default (the exponential Greenwood, log(−log) transform):
    ``lower`` and ``upper``."""

    _metadata = ["alpha"]

    @property
    def _constructor(self):
        return SurvivalCurve

    def plot(self, ax: Any = None, at_risk: bool = True) -> Any:
        """Step curves with their confidence bands, the number at risk below. Returns the
        matplotlib Axes (needs ``pip install matplotlib``)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 5))
        groups = list(self["group"].unique()) if "group" in self.columns else [None]
        for g in groups:
            part = self if g is None else self[self["group"] == g]
            # The curve starts at 1 at time 0.
            t = [0.0, *part["time"].astype(float)]
            s = [1.0, *part["survival"]]
            lo = [1.0, *part["lower"].fillna(1.0)]
            hi = [1.0, *part["upper"].fillna(1.0)]
            label = "all" if g is None else str(g)
            (line,) = ax.step(t, s, where="post", label=label)
            ax.fill_between(t, lo, hi, step="post", alpha=0.2, color=line.get_color())
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("time")
        ax.set_ylabel("survival")
        ax.legend(title="group" if groups != [None] else None)
        if at_risk:
            ticks = [float(x) for x in ax.get_xticks() if 0 <= x <= float(self["time"].max())]
            counts: dict[Any, list[str]] = {g: [] for g in groups}
            for g in groups:
                part = self if g is None else self[self["group"] == g]
                times = part["time"].astype(float).to_numpy()
                at = part["at_risk"].to_numpy()
                for x in ticks:
                    # At risk at x: those at risk at the first released time ≥ x.
                    later = at[times >= x]
                    counts[g].append(str(int(later[0])) if len(later) else "0")
            ax.table(
                cellText=[counts[g] for g in groups],
                rowLabels=["at risk" if g is None else f"at risk ({g})" for g in groups],
                colLabels=[f"{x:g}" for x in ticks],
                loc="bottom",
                bbox=[0.0, -0.45, 1.0, 0.25],
            )
            ax.figure.subplots_adjust(bottom=0.35)
        return ax


@dataclass(frozen=True)
class CrosstabResult:
    """A federated contingency table: ``cells`` (row_level, col_level, count, suppressed)
    and the χ² test of independence."""

    cells: pd.DataFrame
    chi_square: float
    df: int
    p_value: float

    def table(self) -> pd.DataFrame:
        """The counts as a row × column table (suppressed cells as NaN)."""
        counts = self.cells.assign(count=self.cells["count"].where(~self.cells["suppressed"]))
        return counts.pivot(index="row_level", columns="col_level", values="count")


class Connection:
    """A researcher's connection to a Railyard hub (over ADBC Flight SQL)."""

    def __init__(self, adbc: Any):
        self._adbc = adbc
        self._planner: Any = None

    # ----------------------------------------------------------------------- dataframes

    def table(self, name: str) -> Frame:
        """A lazy dataframe over the federated table ``name``; see :class:`Frame`. It runs
        at the hub, compiled to Substrait, when its answer is asked for."""
        from .frame import _Planner

        if self._planner is None:
            self._planner = _Planner(self)
        return Frame(self, self._planner, self._planner.table(name))

    def _table_schema(self, name: str) -> pa.Schema:
        return self._adbc.adbc_get_table_schema(name, db_schema_filter="public")

    def _run_substrait(self, plan: bytes, explain: bool = False) -> pa.Table:
        from .frame import EXPLAIN_HEADER

        with self._adbc.cursor() as cur:
            if explain:
                header = "adbc.flight.sql.rpc.call_header." + EXPLAIN_HEADER
                cur.adbc_statement.set_options(**{header: "federated"})
            cur.execute(plan)
            return cur.fetch_arrow_table()

    # ------------------------------------------------------------------ SQL and catalog

    def sql(self, query: str, params: Optional[Sequence[Any]] = None) -> pa.Table:
        """Runs ``query`` (``?`` or ``$1`` placeholders bound from ``params``, one value
        each; None is NULL) and returns the answer as a pyarrow Table. The DP ε the stations
        charged is in its schema metadata: see :func:`epsilon_charged`."""
        with self._adbc.cursor() as cur:
            if params is None:
                cur.execute(query)
            else:
                cur.execute(query, parameters=tuple(params))
            return cur.fetch_arrow_table()

    def sql_pandas(self, query: str, params: Optional[Sequence[Any]] = None) -> pd.DataFrame:
        """:meth:`sql` as a pandas DataFrame."""
        return self.sql(query, params).to_pandas()

    def sql_polars(self, query: str, params: Optional[Sequence[Any]] = None) -> Any:
        """:meth:`sql` as a polars DataFrame."""
        return to_polars(self.sql(query, params))

    def tables(self) -> pd.DataFrame:
        """The federated tables this researcher may query, with their columns and types."""
        objects = self._adbc.adbc_get_objects(depth="columns", db_schema_filter="public").read_all()
        rows = []
        for catalog in objects.to_pylist():
            for schema in catalog["catalog_db_schemas"] or []:
                for table in schema["db_schema_tables"] or []:
                    for column in table["table_columns"] or []:
                        rows.append(
                            {
                                "table_name": table["table_name"],
                                "column_name": column["column_name"],
                                "type": column.get("xdbc_type_name"),
                            }
                        )
        return pd.DataFrame(rows, columns=["table_name", "column_name", "type"])

    def policies(self) -> pd.DataFrame:
        """Each station's policy per table and column (``railyard.policies``)."""
        return self.sql_pandas("SELECT * FROM railyard.policies")

    def stations(self) -> pd.DataFrame:
        """The collaboration's stations, online or not (``railyard.stations``)."""
        return self.sql_pandas("SELECT * FROM railyard.stations")

    def budget(self) -> pd.DataFrame:
        """The researcher's DP budget at each station and table (``railyard.budget``)."""
        return self.sql_pandas("SELECT * FROM railyard.budget")

    def explain(self, query: str) -> pd.DataFrame:
        """``EXPLAIN FEDERATED``: per station the fragment it runs and what leaves it, then
        the hub's merge."""
        return self.sql_pandas(f"EXPLAIN FEDERATED {query}")

    def set_epsilon(self, epsilon: Optional[float]) -> None:
        """The ε of each following DP query at each station (None: each station's
        default)."""
        if epsilon is None:
            self.sql("SET railyard.epsilon TO DEFAULT")
        else:
            if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
                raise ValueError("epsilon must be a positive finite number")
            self.sql(f"SET railyard.epsilon = {float(epsilon)!r}")

    # ----------------------------------------------------------------------- statistics

    def _call(self, function: str, *args: str) -> pd.DataFrame:
        return self.sql_pandas(f"SELECT * FROM {function}({', '.join(_quote(a) for a in args)})")

    def glm(self, table_or_query: str, formula: str, family: str = "gaussian", filter: Optional[str] = None) -> GlmResult:
        """A generalized linear model (``gaussian``, ``binomial``, ``poisson``) over a
        federated table or a cohort query, fitted at the stations."""
        args = [table_or_query, formula, family] + ([filter] if filter else [])
        return GlmResult(self._call("glm", *args), formula, family)

    def cox(self, table_or_query: str, time: str, event: str, covariates: Sequence[str] | str, filter: Optional[str] = None) -> GlmResult:
        """A Cox proportional hazards model (Efron ties)."""
        terms = covariates if isinstance(covariates, str) else " + ".join(covariates)
        args = [table_or_query, time, event, terms] + ([filter] if filter else [])
        return GlmResult(self._call("cox", *args), f"{time}, {event} ~ {terms}", "cox")

    def kaplan_meier(
        self,
        table_or_query: str,
        time: str,
        event: str,
        group: Optional[str] = None,
        filter: Optional[str] = None,
        alpha: float = 0.05,
    ) -> SurvivalCurve:
        """The Kaplan–Meier estimate (per ``group``), with Greenwood standard errors and
        lifelines' default confidence band."""
        args = [table_or_query, time, event]
        if group or filter:
            args.append(group or "")
        if filter:
            args.append(filter)
        curve = SurvivalCurve(self._call("kaplan_meier", *args))
        lower, upper = _exponential_greenwood(curve["survival"], curve["std_error"], alpha)
        curve["lower"], curve["upper"] = lower, upper
        curve.alpha = alpha
        return curve

    def logrank(self, table_or_query: str, time: str, event: str, group: str, filter: Optional[str] = None) -> dict[str, float]:
        """The log-rank test across the levels of ``group``: chi_square, df, p_value."""
        args = [table_or_query, time, event, group] + ([filter] if filter else [])
        row = self._call("logrank", *args).iloc[0]
        return {"chi_square": float(row["chi_square"]), "df": int(row["df"]), "p_value": float(row["p_value"])}

    def crosstab(self, table_or_query: str, row_column: str, column_column: str, filter: Optional[str] = None) -> CrosstabResult:
        """A contingency table with small cells suppressed by the stations' policies, and
        the χ² test of independence."""
        args = [table_or_query, row_column, column_column] + ([filter] if filter else [])
        frame = self._call("crosstab", *args)
        # The last row is the total, carrying the test; the others are the cells.
        cells, total = frame.iloc[:-1], frame.iloc[-1]
        cells = cells[["row_level", "col_level", "count", "suppressed"]].reset_index(drop=True)
        return CrosstabResult(cells, float(total["chi_square"]), int(total["df"]), float(total["p_value"]))

    def train(self, image: str, input_sql: str, args: Optional[dict] = None) -> pa.Table:
        """Runs a containerized train at every station of the input's table; the union of
        their outputs with a ``station`` column first."""
        arguments = json.dumps(args or {})
        return self.sql(f"SELECT * FROM train({_quote(image)}, {_quote(input_sql)}, {_quote(arguments)})")

    # --------------------------------------------------------------------------- admin

    def close(self) -> None:
        self._adbc.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _exponential_greenwood(survival: pd.Series, std_error: pd.Series, alpha: float) -> tuple[pd.Series, pd.Series]:
    """lifelines' default Kaplan–Meier band: with v = log S and c = Σ d/(n(n−d)) (Greenwood's
    sum, c = (std_error/S)²), exp(−exp(log(−v) ± z·√c / v))."""
    import numpy as np
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / 2)
    s = survival.to_numpy(float)
    se = std_error.to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.log(s)
        root_c = se / s
        # v < 0, so subtracting z·√c / v raises log(−v): the lower bound.
        lower = np.exp(-np.exp(np.log(-v) - z * root_c / v))
        upper = np.exp(-np.exp(np.log(-v) + z * root_c / v))
    return pd.Series(lower, index=survival.index), pd.Series(upper, index=survival.index)


def connect(url: str, token: Optional[str] = None, ca: Optional[str] = None) -> Connection:
    """Connects to the hub at ``url`` (``grpc://`` or ``grpc+tls://``). ``token`` is the
    researcher's bearer token (``railyard token create``); ``ca`` the path of the
    collaboration's CA certificate (PEM) for a TLS hub."""
    import adbc_driver_flightsql.dbapi as flightsql
    from adbc_driver_flightsql import DatabaseOptions

    options: dict[str, str] = {}
    if token:
        options[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {token}"
    if ca:
        with open(ca, encoding="utf-8") as f:
            options[DatabaseOptions.TLS_ROOT_CERTS.value] = f.read()
    return Connection(flightsql.connect(url, db_kwargs=options, autocommit=True))
