"""still.engine: one explicit training loop on HF accelerate.

>>> from still.engine import TrainConfig, train
>>> result = train(student, objective, train_data, TrainConfig(epochs=3, batch_size=128),
...                teacher=teacher, eval_fn=eval_fn, out_dir="runs/kd")

A run directory holds:

- `metrics.jsonl`: one JSON object per logged step,
  `{"split": "train", "step", "epoch", "loss/<term>" (unweighted, mean over the log window and over
  processes), "weight/<term>" (effective weight at that step), "total", "lr", "samples_per_s",
  "grad_norm" (with clipping)}`, and per evaluation `{"split": "eval", "eval": true, "step", "epoch",
  <metric>: value}`;
- `checkpoints/last` and `checkpoints/best`: see `still.engine.checkpoint`
  (`load_student(dir, model)` loads a checkpoint's student weights);
- `tensorboard/` with `TrainConfig(tensorboard=True)`.
"""

from still.engine.checkpoint import load_student
from still.engine.data import InMemoryDataset, RankBatchSampler
from still.engine.loop import TrainConfig, TrainResult, train
from still.objective import NonFiniteLossError

__all__ = ["TrainConfig", "TrainResult", "train", "NonFiniteLossError", "InMemoryDataset", "RankBatchSampler",
           "load_student"]
