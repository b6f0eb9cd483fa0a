"""docs/notebooks/tour.ipynb, executed with nbclient against `railyard local` under the
stations' default policy: every cell runs without an error, the refusal cell shows the
rule, the Kaplan–Meier cell renders a non-empty plot, and the dataframe cells answer."""

import base64

import nbformat
from nbclient import NotebookClient

from conftest import REPO, start_local, stop


def test_the_tour_notebook_runs(tmp_path, monkeypatch):
    proc, url = start_local(tmp_path / "federation", None)
    try:
        monkeypatch.setenv("RAILYARD_HUB", url)
        monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        notebook = nbformat.read(REPO / "docs" / "notebooks" / "tour.ipynb", as_version=4)
        NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        stop(proc)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "(rule " in text, text
    # The dataframe cell answers, and its explanation lists the stations.
    def result_of(marker):
        (cell,) = [c for c in notebook.cells if c.cell_type == "code" and marker in c.source]
        return "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs if o.output_type == "execute_result")

    frame = result_of("older.to_pandas()")
    assert "count(*)" in frame and "avg(lung.age)" in frame, frame
    assert "station_a" in result_of("older.explain()")
    images = [base64.b64decode(o.data["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    png = images[0]
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # The executed notebook, for a reader to look at.
    nbformat.write(notebook, tmp_path / "tour.executed.ipynb")
