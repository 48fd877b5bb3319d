"""flexkd-ds: Flex-KD (task-based, projector-free feature distillation) on DeepSpeed.

Sub-packages (docs/architecture.md): ``method`` (pure torch), ``inputs`` (config, data, models),
``runtime`` (DeepSpeed and torch.distributed), ``evaluation`` (generation, metrics), ``jobs`` (one per
launch script). ``flexkd_ds.kernels`` holds the Triton code.
"""

__version__ = "0.1.0"
