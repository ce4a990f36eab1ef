"""Ranking layer: the NDCG@5 metric, post-processing, KNN smoothing, member outputs and checkpoints,
the ensemble, the LightGBM re-ranker and its features, and the ranker the registered MLflow model runs.
"""
