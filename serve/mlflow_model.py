"""A published version as an MLflow model: a pyfunc that takes raw records, as ``streamtrain serve`` does.

The MLflow model holds the version directory itself (``MANIFEST.json``, ``model.pt`` and its
sidecar, ``model.pt2``, ...) as its one artifact.  Loading it (``mlflow.pyfunc.load_model
("models:/<name>@champion")``) goes through :func:`streamtrain.serve.model.load_version`:
the manifest's sha256, ``torch.load(weights_only=True)``, the probe batch.  ``predict``
builds rows with :func:`streamtrain.serve.model.parse_instances` and answers with
:meth:`ServedModel.predict`, so a record's numbers, missing values and hashed categorical
fields become the same tensors as in training and in ``streamtrain serve``, and the answers
are the same: a number (regression), or ``{"class", "probabilities"}`` (the class's name
alone when the model has ``trainer.classes``).

It needs ``streamtrain`` (and torch) installed where the model is loaded: the weights are a
``state_dict`` for the model classes in ``streamtrain.models``, and the model's code is
``mlflow_entry.py`` (MLflow's "models from code"), not a pickled object.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from streamtrain.serve.model import ServedModel, load_version, parse_instances

__all__ = ["ARTIFACT", "ENTRY", "RecordsModel", "records"]

ARTIFACT = "version"  # the artifact's key: the published version directory
ENTRY = str(Path(__file__).with_name("mlflow_entry.py"))  # what log_model is given as python_model (models from code)


class RecordsModel(mlflow.pyfunc.PythonModel):
    """``predict(records)``: a list of record dicts (or a DataFrame of them, JSON text, ``{"instances": [...]}``)."""

    def load_context(self, context) -> None:
        name = (context.model_config or {}).get("name", "model")
        self.served: ServedModel = load_version(context.artifacts[ARTIFACT], name)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[Any]:
        rows = records(model_input)
        x, ids = parse_instances({"instances": rows}, self.served, max_instances=max(1, len(rows)))
        return self.served.predict(x, ids, probabilities=bool((params or {}).get("probabilities")))


def records(model_input: Any) -> list[Any]:
    """What a pyfunc caller hands over, as the list of instances ``parse_instances`` reads.

    A DataFrame's rows become dicts with NaN as ``None`` (a missing value, as ``null`` in JSON)
    and numpy scalars as Python numbers; text is parsed as JSON; ``{"instances": [...]}`` is
    unwrapped and a single record dict is one instance.
    """
    if isinstance(model_input, (str, bytes)):
        model_input = json.loads(model_input)
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame, without importing pandas
        model_input = [{str(k): _native(v) for k, v in row.items()} for row in model_input.to_dict("records")]
    if isinstance(model_input, dict):
        model_input = model_input["instances"] if "instances" in model_input else [model_input]
    if hasattr(model_input, "tolist"):  # a numpy array of rows
        model_input = model_input.tolist()
    return list(model_input)


def _native(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v
