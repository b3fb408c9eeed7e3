"""I-GPT pretraining on Ray Train + DeepSpeed (issue 5).

`train(cfg, data_dir, run_dir)` is the function a Ray job calls; `TrainConfig` / `load_train_config`
hold every setting; the worker loop is in `loop.py`, the Ray Data side in `data.py`, the DeepSpeed
JSON in `deepspeed_config.py`, progress and metrics files in `metrics.py`. The CLI verb is
`pipelines.train_cli` (`dreamcore train`). Ray is imported only when a run starts.
"""

from pipelines.train.config import TrainConfig, load_train_config
from pipelines.train.job import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "train"]
