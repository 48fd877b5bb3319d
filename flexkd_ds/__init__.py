"""flexkd-ds: Flex-KD (task-based, projector-free feature distillation) on DeepSpeed."""

__version__ = "0.1.0"
