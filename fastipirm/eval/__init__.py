"""Evaluation of learnt features: frozen features, the weighted kNN monitor, linear probes, the
generative-factor probes of synthetic data, CL-ICA's identifiability scores (linear R², MCC),
DCoDR's factor probes and retrieval, and the evaluation a training run does."""
from .disentanglement import disentanglement_scores, linear_r2, mcc, scores_over_batches
from .factor_probes import probe_factors
from .factors import factor_datasets, factor_evaluation
from .features import extract_features
from .knn import knn_evaluate, knn_predict, topk_accuracy
from .linear import linear_eval_checkpoint, linear_on_features, linear_probe
from .retrieval import retrieval_rules, retrieval_top1
from .saved import knn_eval_checkpoint
from .suite import RunEvaluation, evaluate_initialisation

__all__ = ["extract_features", "knn_predict", "topk_accuracy", "knn_evaluate",
           "linear_on_features", "linear_probe", "linear_eval_checkpoint", "factor_datasets",
           "factor_evaluation", "RunEvaluation", "evaluate_initialisation", "knn_eval_checkpoint",
           "linear_r2", "mcc", "disentanglement_scores", "scores_over_batches",
           "probe_factors", "retrieval_top1", "retrieval_rules"]
