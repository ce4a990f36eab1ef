"""Model layer: one file per ranker (MCAN, VisualBERT, the two-tower, the wordproto floor), the shared
image input and text backbone they build on, and the registry that builds one from params.
"""
