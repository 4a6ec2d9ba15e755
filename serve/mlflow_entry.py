"""The file MLflow copies into each logged model and runs to build its pyfunc (MLflow's "models from code").

No pickle in the model: what loads it is this text and the installed ``streamtrain``
(:class:`streamtrain.serve.mlflow_model.RecordsModel`), and the weights load with
``torch.load(weights_only=True)``.
"""

import mlflow.models

from streamtrain.serve.mlflow_model import RecordsModel

mlflow.models.set_model(RecordsModel())
