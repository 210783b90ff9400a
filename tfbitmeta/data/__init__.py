"""Datasets (deterministic splits) and tf.data pipelines with recorded normalization."""
from tfbitmeta.data.datasets import Splits, load  # noqa: F401
from tfbitmeta.data.pipeline import Normalization, eval_batches, train_batches  # noqa: F401
