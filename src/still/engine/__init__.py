"""still.engine: one explicit training loop on HF accelerate.

>>> from still.engine import TrainConfig, train
>>> result = train(student, objective, train_data, TrainConfig(epochs=3, batch_size=128),
...                teacher=teacher, eval_fn=eval_fn, out_dir="runs/kd")
"""

from still.engine.checkpoint import load_student
from still.engine.data import InMemoryDataset, RankBatchSampler
from still.engine.loop import TrainConfig, TrainResult, train
from still.objective import NonFiniteLossError

__all__ = ["TrainConfig", "TrainResult", "train", "NonFiniteLossError", "InMemoryDataset", "RankBatchSampler",
           "load_student"]
