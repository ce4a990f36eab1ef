"""Data layer: the official TSV format and its validation, the memory-mapped feature store, query text
cleaning, TF-IDF hard negatives, model batches, and the synthetic data generator.

Nothing here knows about models, training or MLflow.
"""
