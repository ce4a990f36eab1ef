"""One trained member as an MLflow model (models-from-code): the logged model of its training run.

`mmrecall train` logs it (tracking.log_member_model): artifacts `checkpoint` (the member's model.pt) and
`backbone` (config + tokenizer files), the mmrecall package as code, model config `box_cap`. Input: a
candidate table in the nine official TSV columns, like the registered ranker's; output: one column
`score`, the member's logit per row (the score the ranker's re-ranker reads). `mmrecall register`
downloads the checkpoint out of it to build the ranker.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from mmrecall.ranking import members
from mmrecall.ranking.ranker import candidate_store


class MemberModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.member = members.load(context.artifacts["checkpoint"], context.artifacts.get("backbone"))
        self.box_cap = int((context.model_config or {}).get("box_cap", 30))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        table, _ = members.score(self.member, candidate_store(model_input, self.box_cap))
        return pd.DataFrame({"score": table.score.to_numpy()})


mlflow.models.set_model(MemberModel())
