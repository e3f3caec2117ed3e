"""Evaluation metrics: FID / Inception Score (`fid`, `inception`), precision/recall, the MNIST FID proxy."""
