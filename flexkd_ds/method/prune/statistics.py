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

MASK_KEYS = ("attention_mask", "decoder_attention_mask")  # the batch key whose valid tokens each stack sees


class PruneStatistics:
    """Sums over valid tokens of the full teacher's activation statistics (module doc); means on request.

    Sums are float64 on the CPU. ``state_tensor()`` packs ``[tokens per stack (S), pooled rows, block (L),
    neurons (L*I), heads (L*H), cross-attention heads (L*H), norms (N), pooler (P)]`` into one float64 tensor
    whose elementwise sum over ranks is the union's state: all-reduce it and ``load_state_tensor`` the result.
    ``heads`` is empty unless collected, cross heads unless the family has cross-attention (BART), the pooler
    unless it has one (BERT); ``norm_names`` lists the calibrated norms (none when the residual is not
    pruned). A layer's means divide by its stack's tokens (BART: encoder or decoder tokens).
    """

    def __init__(self, shapes: _Shapes, units: list[int], norm_names: list[str], heads: bool) -> None:
        self.shapes, self.units, self.norm_names = shapes, list(units), list(norm_names)
        family = FAMILIES[shapes.family]
        layers, stacks = shapes.num_layers, len(shapes.stacks)
        self.counts = torch.zeros(stacks + 1, dtype=torch.float64)  # tokens per stack, then pooled rows
        self.block_sum = torch.zeros(layers, dtype=torch.float64)
        self.neuron_sum = torch.zeros(layers, shapes.intermediate, dtype=torch.float64)
        self.head_sum = torch.zeros(layers, shapes.num_heads if heads else 0, dtype=torch.float64)
        cross = heads and family.cross_attn_out is not None
        self.cross_head_sum = torch.zeros(layers, shapes.num_heads if cross else 0, dtype=torch.float64)
        self.norm_sum = torch.zeros(len(norm_names), dtype=torch.float64)
        self.pooler_sum = torch.zeros(shapes.pooler, dtype=torch.float64)

    @property
    def num_tokens(self) -> int:
        """Valid tokens seen, all stacks together."""
        return int(self.counts[:-1].sum())

    def _parts(self) -> list[Tensor]:
        return [self.counts, self.block_sum, self.neuron_sum, self.head_sum, self.cross_head_sum, self.norm_sum,
                self.pooler_sum]  # fmt: skip

    def state_tensor(self) -> Tensor:
        return torch.cat([part.flatten() for part in self._parts()])

    def load_state_tensor(self, state: Tensor) -> None:
        state = state.detach().to("cpu", torch.float64)
        size = sum(part.numel() for part in self._parts())
        if state.shape != (size,) or not bool(torch.isfinite(state).all()):
            raise ValueError(
                f"state must be a finite float tensor of shape ({size},); got {tuple(state.shape)}"
            )
        offset = 0
        for part in self._parts():
            part.copy_(state[offset : offset + part.numel()].view_as(part))
            offset += part.numel()

    def _tokens_per_layer(self) -> Tensor:
        """(L, 1) valid tokens of each layer's stack."""
        stacks = [self.shapes.stack_of(i) for i in range(self.shapes.num_layers)]
        return self.counts[stacks][:, None]

    def _per_layer_mean(self, total: Tensor) -> Tensor:
        tokens = self._tokens_per_layer()
        if bool((tokens == 0).any()):
            raise ValueError("no valid token was seen: give batches whose attention masks have ones")
        return total / (tokens if total.dim() == 2 else tokens[:, 0])

    def block_importance(self) -> Tensor:
        """(L,) float64: mean ``1 - cos(layer input, layer output)``."""
        return self._per_layer_mean(self.block_sum)

    def neuron_magnitude(self) -> Tensor:
        """(L, intermediate) float64: mean ``|a|`` at each layer's down-projection input."""
        return self._per_layer_mean(self.neuron_sum)

    def head_importance(self) -> Tensor:
        """(L, heads) float64: mean L2 norm of each head's output before the output projection."""
        return self._per_layer_mean(self.head_sum)

    def cross_head_importance(self) -> Tensor:
        """(L, heads) float64: the same for the cross-attention heads (rows of encoder layers are 0)."""
        return self._per_layer_mean(self.cross_head_sum)

    def pooler_magnitude(self) -> Tensor:
        """(P,) float64: mean ``|pooled output|`` over the examples (BERT's classifier input)."""
        if float(self.counts[-1]) == 0:
            raise ValueError("no pooled row was seen: run a model with a pooler (a BERT classifier)")
        return self.pooler_sum / self.counts[-1]

    def norm_ratios(self) -> dict[str, float]:
        """Norm name -> mean ``rms(x[units]) / rms(x)`` (RMSNorm) or ``std(x[units]) / std(x)`` (LN)."""
        family = FAMILIES[self.shapes.family]
        tokens = []
        for name in self.norm_names:
            stack = family.global_norms.get(name)
            if stack is None:  # a layer's norm: "<stack path>.<i>.<norm>"
                stack = next(k for k, path in enumerate(family.stacks) if name.startswith(f"{path}."))
            tokens.append(float(self.counts[stack]))
        if any(t == 0 for t in tokens):
            raise ValueError("no valid token was seen: give batches whose attention masks have ones")
        return {
            name: float(total) / t
            for name, total, t in zip(self.norm_names, self.norm_sum, tokens, strict=True)
        }

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
        if need_heads and shapes.pooler and float(self.counts[-1]) == 0:
            raise ValueError(
                "pruning a BERT classifier's pooler needs pooled rows: collect on the classifier"
            )
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
    """Run the full teacher ``model`` (a causal LM, a sequence classifier or BART, possibly wrapped by a
    DeepSpeed engine) on ``batches``.

    Each batch maps ``input_ids`` and ``attention_mask`` (B, T) (BART also ``decoder_input_ids`` and
    ``decoder_attention_mask``) to tensors already on the model's device; every key is passed to the model but
    ``example_mask`` (B,) bool, optional: rows where it is False (a rank's padding) count nowhere. Only tokens
    with mask 1 count (the decoder's mask for decoder layers). ``units`` (d_S,) are the kept
    LM-head-input units (norm ratios depend on them). The model runs in eval mode under ``no_grad`` (its mode
    is restored). Memory: O(L * intermediate).
    """
    inner = _unwrap(model)
    shapes = teacher_shapes(inner.config)
    family = FAMILIES[shapes.family]
    units = _int_list("units", units)
    if not units or not all(0 <= u < shapes.d_teacher for u in units):
        raise ValueError(f"units must be non-empty and in [0, d_T={shapes.d_teacher})")
    root = inner.get_submodule(family.root)
    stacks = [root.get_submodule(path) for path in family.stacks]
    norms: dict[str, tuple[torch.nn.Module, int]] = {}  # name -> (module, stack)
    # With OPT's project_in/out the residual keeps its width: nothing to calibrate.
    if need_norms and not shapes.projected:
        for k, layers in enumerate(stacks):
            for i, layer in enumerate(layers):
                for name in family.layer_norms:
                    module = _submodule(layer, name)
                    if module is not None:
                        norms[f"{family.stacks[k]}.{i}.{name}"] = (module, k)
        for name, k in family.global_norms.items():
            module = _submodule(root, name)
            if module is not None:  # OPT-350m has no final norm
                norms[name] = (module, k)
    stats = PruneStatistics(shapes, units, list(norms), need_heads)
    current: dict[str, Tensor] = {}
    unit_index = torch.tensor(units)

    def valid_rows(x: Tensor, stack: int) -> Tensor:  # (B, T, d) or (B * T, d) -> (n_valid, d) float32
        mask = current[MASK_KEYS[stack]].to(x.device)
        if x.dim() == 2 and x.shape[0] == mask.numel():  # OPT flattens tokens around its MLP
            mask = mask.flatten()
        elif tuple(x.shape[:2]) != tuple(mask.shape):
            raise RuntimeError(f"activation of shape {tuple(x.shape)} does not match the batch's (B, T)")
        rows = x.detach()[mask]
        return rows if rows.dtype == torch.float64 else rows.float()

    def on_block(i: int, k: int):
        def hook(module, args, kwargs, output) -> None:
            x_in = valid_rows(args[0] if args else kwargs["hidden_states"], k)
            x_out = valid_rows(output[0] if isinstance(output, (tuple, list)) else output, k)
            stats.block_sum[i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).sum().double().cpu()

        return hook

    def on_mlp(i: int, k: int):
        def hook(module, args) -> None:
            stats.neuron_sum[i] += valid_rows(args[0], k).abs().sum(dim=0).double().cpu()

        return hook

    def on_attn(i: int, k: int, sums: Tensor):
        def hook(module, args) -> None:
            rows = valid_rows(args[0], k)  # (n, heads * head_dim)
            per_head = rows.view(rows.shape[0], shapes.num_heads, -1).norm(dim=-1)  # (n, heads)
            sums[i] += per_head.sum(dim=0).double().cpu()

        return hook

    def on_norm(j: int, k: int):
        def hook(module, args) -> None:
            x = valid_rows(args[0], k)  # (n, d_T)
            kept = x[:, unit_index.to(x.device)]  # (n, d_S)
            if family.rms_norm:
                ratio = kept.pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt().clamp_min(1e-30)
            else:
                ratio = kept.std(-1, correction=0) / x.std(-1, correction=0).clamp_min(1e-30)
            stats.norm_sum[j] += ratio.sum().double().cpu()

        return hook

    def on_pooler(module, args) -> None:
        pooled = args[0].detach().double()  # (B, P): one row per example
        rows = current.get("examples")
        pooled = pooled if rows is None else pooled[rows.to(pooled.device)]
        stats.pooler_sum += pooled.abs().sum(dim=0).cpu()
        stats.counts[-1] += pooled.shape[0]

    handles = []
    modes = {module: module.training for module in model.modules()}
    try:
        for k, layers in enumerate(stacks):
            for local, layer in enumerate(layers):
                i = shapes.offset(k) + local
                handles.append(layer.register_forward_hook(on_block(i, k), with_kwargs=True))
                handles.append(layer.get_submodule(family.mlp_out).register_forward_pre_hook(on_mlp(i, k)))
                if need_heads:
                    attn = layer.get_submodule(family.attn_out)
                    handles.append(attn.register_forward_pre_hook(on_attn(i, k, stats.head_sum)))
                    cross = _submodule(layer, family.cross_attn_out) if family.cross_attn_out else None
                    if cross is not None:
                        handles.append(cross.register_forward_pre_hook(on_attn(i, k, stats.cross_head_sum)))
        for j, (module, k) in enumerate(norms.values()):
            handles.append(module.register_forward_pre_hook(on_norm(j, k)))
        pooler = _submodule(inner, family.pooler_out) if family.pooler_out and shapes.pooler else None
        if pooler is not None:
            handles.append(pooler.register_forward_pre_hook(on_pooler))
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = dict(batch)
                examples = batch.pop("example_mask", None)
                current["examples"] = None if examples is None else examples.bool()
                for k, key in enumerate(MASK_KEYS[: len(stacks)]):
                    ids = batch["input_ids" if k == 0 else "decoder_input_ids"]
                    if key not in batch or ids.dim() != 2 or ids.shape != batch[key].shape:
                        raise ValueError(
                            f"the batch needs {'input_ids' if k == 0 else 'decoder_input_ids'} and {key}, both "
                            f"(B, T); got keys {sorted(batch)}"
                        )
                    current[key] = batch[key].bool()
                    if examples is not None:
                        current[key] = current[key] & examples.bool().to(current[key].device)[:, None]
                extra = {} if shapes.family == "bert" else {"use_cache": False}
                model(**batch, **extra)
                for k, key in enumerate(MASK_KEYS[: len(stacks)]):
                    stats.counts[k] += int(current[key].sum())
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return stats


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
