"""The LightGBM re-ranker.

Candidates, features and whole-history tables, the served pipeline (``reranker``), its
Optuna study (``tune``, ``study``), and the ranker stage of the sharded engine.
"""
