"""Metrics, selection on val subsets, the evaluation report, ensembling and the submission file."""
