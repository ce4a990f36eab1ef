"""The registered MLflow model `mmrecall-ranker` (models-from-code: MLflow runs this file to load it).

Input: a candidate table with the nine official TSV columns (base64 boxes / features / class_labels as
in the files). Output: one column `score`, one row per input row (higher = better). Artifacts: the
member checkpoints (member.<name>), the re-ranker folder (LightGBM boosters as text files, PCA,
candidate counts, the feature spec with the preprocessing settings) and the backbone's config and
tokenizer files. The logic lives in mmrecall.ranking.ranker (shipped with the model as code).
"""

from __future__ import annotations

import mlflow
import pandas as pd

from mmrecall.ranking.ranker import Ranker


class RankerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.ranker = Ranker.load(context.artifacts)

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"score": self.ranker.score(model_input)})


mlflow.models.set_model(RankerModel())
