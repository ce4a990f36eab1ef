"""The registered MLflow model `mmrecall-ranker` (models-from-code: MLflow runs this file to load it).

Input: a candidate table with the nine official TSV columns (base64 boxes / features / class_labels as
in the files). Output: one column `score`, one row per input row (higher = better), ranking as the submission
does: by the rule `mmrecall rerank` chose on valid (the model's metadata `submission`). Artifacts: the
member checkpoints (member.<name>), the re-ranker folder (LightGBM boosters as text files, PCA,
candidate counts, the feature spec with the preprocessing settings) and the backbone's config and
tokenizer files. The logic lives in mmrecall.ranking.ranker (shipped with the model as code).

All torch work (loading the members, scoring) runs on one thread of the model's own. `mlflow models
serve` loads the model on its main thread and predicts on a worker thread; torch then keeps an OpenMP
team per thread, and two teams on two cores cost ~15 ms a 30-candidate request (BENCHMARKS.md "Serving").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd

from mmrecall.ranking.ranker import Ranker


class RankerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="mmrecall-ranker")
        self.ranker = self.torch_thread.submit(Ranker.load, context.artifacts).result()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"score": self.torch_thread.submit(self.ranker.score, model_input).result()})


mlflow.models.set_model(RankerModel())
