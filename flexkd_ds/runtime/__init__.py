"""The distributed runtime: process group, DeepSpeed engines and configs, checkpoints, rank sampling, the
per-node launcher and the memory formulas of ZeRO. The only code that knows DeepSpeed and torch.distributed.
"""
