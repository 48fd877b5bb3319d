"""Calibration statistics of the full teacher for pruning (block importance, MLP neuron and head
magnitudes, norm ratios): ``collect_prune_statistics`` hooks the model's activations and sums them in a
``PruneStatistics``. Package doc: ``flexkd_ds.method.prune``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from flexkd_ds.method.prune.plan import FAMILIES, _int_list, _Shapes, teacher_shapes


class PruneStatistics:
    """Sums over valid tokens of the full teacher's activation statistics (module doc); means on request.

    Sums are float64 on the CPU. ``state_tensor()`` packs ``[tokens, block (L), neurons (L*I), heads (L*H),
    norms (N)]`` into one float64 tensor whose elementwise sum over ranks is the union's state: all-reduce it
    and ``load_state_tensor`` the result. ``heads`` is empty unless collected; ``norm_names`` lists the
    calibrated norms (none when the residual is not pruned).
    """

    def __init__(self, shapes: _Shapes, units: list[int], norm_names: list[str], heads: bool) -> None:
        self.shapes, self.units, self.norm_names = shapes, list(units), list(norm_names)
        layers = shapes.num_layers
        self.num_tokens = 0
        self.block_sum = torch.zeros(layers, dtype=torch.float64)
        self.neuron_sum = torch.zeros(layers, shapes.intermediate, dtype=torch.float64)
        self.head_sum = torch.zeros(layers, shapes.num_heads if heads else 0, dtype=torch.float64)
        self.norm_sum = torch.zeros(len(norm_names), dtype=torch.float64)

    def _parts(self) -> list[Tensor]:
        return [self.block_sum, self.neuron_sum, self.head_sum, self.norm_sum]

    def state_tensor(self) -> Tensor:
        return torch.cat(
            [torch.tensor([float(self.num_tokens)], dtype=torch.float64)]
            + [part.flatten() for part in self._parts()]
        )

    def load_state_tensor(self, state: Tensor) -> None:
        state = state.detach().to("cpu", torch.float64)
        size = 1 + sum(part.numel() for part in self._parts())
        if state.shape != (size,) or not bool(torch.isfinite(state).all()):
            raise ValueError(
                f"state must be a finite float tensor of shape ({size},); got {tuple(state.shape)}"
            )
        self.num_tokens, offset = int(state[0]), 1
        for part in self._parts():
            part.copy_(state[offset : offset + part.numel()].view_as(part))
            offset += part.numel()

    def _mean(self, total: Tensor) -> Tensor:
        if self.num_tokens == 0:
            raise ValueError("no valid token was seen: give batches whose attention_mask has ones")
        return total / self.num_tokens

    def block_importance(self) -> Tensor:
        """(L,) float64: mean ``1 - cos(layer input, layer output)``."""
        return self._mean(self.block_sum)

    def neuron_magnitude(self) -> Tensor:
        """(L, intermediate) float64: mean ``|a|`` at each layer's down-projection input."""
        return self._mean(self.neuron_sum)

    def head_importance(self) -> Tensor:
        """(L, heads) float64: mean L2 norm of each head's output before the output projection."""
        return self._mean(self.head_sum)

    def norm_ratios(self) -> dict[str, float]:
        """Norm name -> mean ``rms(x[units]) / rms(x)`` (RMSNorm) or ``std(x[units]) / std(x)`` (LN)."""
        return dict(zip(self.norm_names, self._mean(self.norm_sum).tolist(), strict=True))

    def check_matches(self, shapes: _Shapes, units: list[int], *, need_heads: bool, need_norms: bool) -> None:
        """Raise ``ValueError`` if these statistics cannot rank a plan for ``shapes`` and ``units``."""
        if self.shapes != shapes:
            raise ValueError(f"statistics were collected on a teacher of {self.shapes}, not {shapes}")
        if self.num_tokens == 0:
            raise ValueError("statistics hold no valid token: collect them on non-empty batches")
        if not all(bool(torch.isfinite(part).all()) for part in self._parts()):
            raise ValueError("statistics hold non-finite values (NaN/inf activations in the teacher?)")
        if need_heads and self.head_sum.shape[1] == 0:
            raise ValueError("head pruning needs head statistics: collect with need_heads=True")
        if need_norms and (self.units != units or not self.norm_names):
            raise ValueError(
                "norm calibration needs statistics collected for the same units (the ratios depend "
                "on them): collect again with these units, or pass calibrate_norms=False"
            )


def _unwrap(model: torch.nn.Module) -> PreTrainedModel:
    inner = getattr(model, "module", None)  # a DeepSpeed engine (or DDP) wraps the HF model as .module
    return inner if isinstance(inner, PreTrainedModel) else model


def collect_prune_statistics(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    units: Sequence[int] | Tensor,
    *,
    need_heads: bool = True,
    need_norms: bool = True,
) -> PruneStatistics:
    """Run the full teacher ``model`` (a causal LM, possibly wrapped by a DeepSpeed engine) on ``batches``.

    Each batch maps ``input_ids`` and ``attention_mask`` (B, T) to tensors already on the model's device; only
    tokens with mask 1 count. ``units`` (d_S,) are the kept LM-head-input units (norm ratios depend on them).
    The model runs in eval mode under ``no_grad`` (its mode is restored). Memory: O(L * intermediate).
    """
    inner = _unwrap(model)
    shapes = teacher_shapes(inner.config)
    family = FAMILIES[shapes.family]
    units = _int_list("units", units)
    if not units or not all(0 <= u < shapes.d_teacher for u in units):
        raise ValueError(f"units must be non-empty and in [0, d_T={shapes.d_teacher})")
    base = inner.get_submodule(family.base)
    layers = getattr(base, family.layers)
    norms: dict[str, torch.nn.Module] = {}
    # With OPT's project_in/out the residual keeps its width: nothing to calibrate.
    if need_norms and not shapes.projected:
        for i, layer in enumerate(layers):
            norms |= {f"{family.layers}.{i}.{name}": getattr(layer, name) for name in family.layer_norms}
        if getattr(base, family.final_norm, None) is not None:
            norms[family.final_norm] = getattr(base, family.final_norm)
    stats = PruneStatistics(shapes, units, list(norms), need_heads)
    current: dict[str, Tensor] = {}
    unit_index = torch.tensor(units)

    def valid_rows(x: Tensor) -> Tensor:  # (B, T, d) or (B * T, d) -> (n_valid, d) float32 (float64 kept)
        mask = current["mask"].to(x.device)
        if x.dim() == 2 and x.shape[0] == mask.numel():  # OPT flattens tokens around its MLP
            mask = mask.flatten()
        elif tuple(x.shape[:2]) != tuple(mask.shape):
            raise RuntimeError(f"activation of shape {tuple(x.shape)} does not match the batch's (B, T)")
        rows = x.detach()[mask]
        return rows if rows.dtype == torch.float64 else rows.float()

    def on_block(i: int):
        def hook(module, args, kwargs, output) -> None:
            x_in = valid_rows(args[0] if args else kwargs["hidden_states"])
            x_out = valid_rows(output[0] if isinstance(output, (tuple, list)) else output)
            stats.block_sum[i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum().double().cpu()

        return hook

    def on_mlp(i: int):
        def hook(module, args) -> None:
            stats.neuron_sum[i] += valid_rows(args[0]).abs().sum(dim=0).double().cpu()

        return hook

    def on_attn(i: int):
        def hook(module, args) -> None:
            rows = valid_rows(args[0])  # (n, heads * head_dim)
            per_head = rows.view(rows.shape[0], shapes.num_heads, -1).norm(dim=-1)  # (n, heads)
            stats.head_sum[i] += per_head.sum(dim=0).double().cpu()

        return hook

    def on_norm(j: int):
        def hook(module, args) -> None:
            x = valid_rows(args[0])  # (n, d_T)
            kept = x[:, unit_index.to(x.device)]  # (n, d_S)
            if family.rms_norm:
                ratio = kept.pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            else:
                ratio = kept.std(-1, correction=0) / x.std(-1, correction=0).clamp_min(1e-30)
            stats.norm_sum[j] += ratio.sum().double().cpu()

        return hook

    handles = []
    modes = {module: module.training for module in model.modules()}
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
            handles.append(layer.get_submodule(family.mlp_out).register_forward_pre_hook(on_mlp(i)))
            if need_heads:
                handles.append(layer.get_submodule(family.attn_out).register_forward_pre_hook(on_attn(i)))
        for j, module in enumerate(norms.values()):
            handles.append(module.register_forward_pre_hook(on_norm(j)))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
                if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
                    raise ValueError(
                        f"input_ids and attention_mask must both be (B, T); got "
                        f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
                    )
                current["mask"] = attention_mask.bool()
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                stats.num_tokens += int(current["mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return stats
