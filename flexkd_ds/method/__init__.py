"""The method: function-tangent importance, the loss terms, the objective and the kernel dispatch.

Pure torch: nothing here imports DeepSpeed or torch.distributed (a global all-reduce comes in as a callable).
"""
