"""What a job reads: the config, instruction data, models and tokenizers, and the generated data.

Nothing here imports DeepSpeed, torch.distributed or a job.
"""
