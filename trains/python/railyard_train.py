"""Write Railyard trains in Python.

A train is a program in a container image that a station runs over its own rows (see
docs/trains.md). The station hands it:

- ``RAILYARD_INPUT``: an Arrow IPC file with the rows of the train's input query (read-only);
- ``RAILYARD_ARGS``: the researcher's arguments, as JSON text;
- ``RAILYARD_OUTPUT``: where to write the result, one Arrow IPC file, which the station checks
  (size, rows, format) before releasing it.

There is no network, the root filesystem is read-only and the train runs as an unprivileged
user. Exit 0 on success; anything printed stays in the station's log. The image declares the
output's columns in its label ``railyard.output-schema`` (JSON, e.g.
``[{"name": "rows", "type": "Int64"}]``); a station refuses an image without it, and an
output with other columns.

Example::

    import pyarrow as pa
    import railyard_train

    def count(table: pa.Table, args: dict) -> pa.Table:
        return pa.table({"rows": [table.num_rows]})

    if __name__ == "__main__":
        railyard_train.run(count)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import pyarrow as pa
import pyarrow.ipc as ipc

__all__ = ["read_input", "read_args", "write_output", "run"]


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run this train through a Railyard station")
    return value


def read_input() -> pa.Table:
    """The train's input rows."""
    with pa.memory_map(_env("RAILYARD_INPUT"), "r") as source:
        return ipc.open_file(source).read_all()


def read_args() -> dict:
    """The researcher's arguments (an empty dict if none were given)."""
    text = os.environ.get("RAILYARD_ARGS", "").strip()
    if not text:
        return {}
    args = json.loads(text)
    if not isinstance(args, dict):
        raise ValueError("RAILYARD_ARGS must be a JSON object")
    return args


def write_output(table: pa.Table) -> None:
    """Writes the train's result as the output Arrow IPC file."""
    with pa.OSFile(_env("RAILYARD_OUTPUT"), "wb") as sink:
        with ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def run(train: Callable[[pa.Table, dict], pa.Table]) -> None:
    """Reads the input and arguments, calls ``train``, writes its result. An exception is
    printed (to the station's log) and exits with code 1."""
    try:
        write_output(train(read_input(), read_args()))
    except Exception as e:  # noqa: BLE001 - any failure ends the train
        print(f"train failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
