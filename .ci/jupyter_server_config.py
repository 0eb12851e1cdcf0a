"""Jupyter server settings of this repository's .venv (.ci/setup copies this file to .venv/etc/jupyter/): code cells
tagged `outputs-not-saved` (those of nbs/explore.ipynb) are saved without their outputs, and a notebook holding any
without its widget state, so JupyterLab's autosave leaves the tracked file clean while the open page keeps showing
them."""

def drop_unsaved_outputs(model, **kwargs):
    "Pre-save hook: clear the outputs of cells tagged `outputs-not-saved`."
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict): return
    tagged = [cell for cell in model["content"].get("cells", [])
              if cell.get("cell_type") == "code" and "outputs-not-saved" in cell.get("metadata", {}).get("tags", [])]
    for cell in tagged: cell["outputs"], cell["execution_count"] = [], None
    if tagged: model["content"].get("metadata", {}).pop("widgets", None)

c.ContentsManager.pre_save_hook = drop_unsaved_outputs   # noqa: F821 (`c` is the config object Jupyter passes)
