"""MiniVLM: a smaller and faster vision-language model (Wang et al., 2020), runnable from raw images.

The three training stages, each a typed setup and one function (the `minivlm` commands call the same):

    from minivlm import DetectorSetup, train_detector, PretrainSetup, pretrain, FinetuneSetup, finetune
    train_detector(DetectorSetup(data="data/world", out="runs/det"))

`setup_from_recipe(PretrainSetup, "vl-pretrain", data=..., ...)` starts from a recipe of configs/.
"""

__version__ = "0.1.0"

# name -> module; imported on first use, so `import minivlm` (and `minivlm --help`) stays free of torch.
_EXPORTS = {
    "DetectorSetup": "minivlm.vision.train", "train_detector": "minivlm.vision.train",
    "PretrainSetup": "minivlm.tasks.pretrain", "pretrain": "minivlm.tasks.pretrain",
    "FinetuneSetup": "minivlm.tasks.finetune", "finetune": "minivlm.tasks.finetune",
    "TrainConfig": "minivlm.config", "setup_from_recipe": "minivlm.setup_args",
    "MiniVLM": "minivlm.model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minivlm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
