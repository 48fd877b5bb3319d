"""Batched, left-padded generation for evaluation, with sampling that is reproducible per example.

``generate(model, tokenizer, prompts, ...)`` returns the decoded continuation of each prompt, in input order.

Sampling does not use Hugging Face's ``do_sample=True`` (it draws from the global RNG, so a prompt's sample
would depend on the batch it lands in and on its neighbours). Instead HF runs its greedy loop and a logits
processor (``PerRowSampler``) draws the next token of every row from that row's own ``torch.Generator``,
seeded from (``seed``, the prompt's index in ``prompts`` + ``index_offset``), and masks every other token to
-inf, so the greedy argmax picks the drawn token. Row i's t-th token therefore uses the t-th draw of its own
stream whatever the batch size, the batch order or the rank it runs on; only floating-point differences in
the logits between padded batch shapes (last bits) can flip a draw that sits on a probability boundary.
It also keeps ``synced_gpus`` (ZeRO-3: every rank runs forward until all ranks are done) and the KV cache.

Nothing here knows about processes: the job splits prompts over ranks and passes ``index_offset``/``indices``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from flexkd_ds.inputs.data import _tokenizer_adds_bos
from flexkd_ds.inputs.models import max_positions

_SEED_STRIDE = 1_000_003  # a prime: (seed, index) -> distinct generator seeds for any realistic set size


class PerRowSampler(LogitsProcessor):
    """Sample one token per row from temperature / top-k / top-p filtered probabilities, each row with its own
    ``torch.Generator``; return scores that are -inf except at the drawn token (greedy search then emits it).

    ``row_seeds``: one seed per row of the batch, in batch order.
    """

    def __init__(self, row_seeds: Sequence[int], *, temperature: float, top_p: float, top_k: int) -> None:
        self.row_seeds = list(row_seeds)
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._generators: list[torch.Generator] | None = None

    def _rows(self, device: torch.device) -> list[torch.Generator]:
        if self._generators is None:
            self._generators = []
            for seed in self.row_seeds:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
                self._generators.append(gen)
        return self._generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = filtered_probs(scores, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        generators = self._rows(scores.device)
        if len(generators) != probs.shape[0]:
            raise RuntimeError(f"sampler built for {len(generators)} rows, got a batch of {probs.shape[0]}")
        drawn = torch.cat(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
        )  # (B,)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, drawn[:, None], 0.0)
        return out


def filtered_probs(scores: torch.Tensor, *, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 probabilities after temperature, top-k (0 = off) and nucleus top-p
    (1 = off; keeps the smallest prefix of the sorted distribution whose mass reaches ``top_p``, at least one
    token)."""
    logits = scores.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and always stays
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def row_seed(seed: int, index: int) -> int:
    """The generator seed of prompt ``index`` under run seed ``seed``."""
    return (seed * _SEED_STRIDE + index) % (2**63 - 1)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    raise ValueError("the tokenizer has neither a pad nor an eos token: cannot left-pad prompts")


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, max_prompt_length: int | None = None
) -> list[list[int]]:
    """Token ids per prompt as training encodes them (``data.encode_example``): BOS when the tokenizer adds one,
    the text without special tokens; ``max_prompt_length`` keeps the last tokens (BOS stays first)."""
    prefix = [tokenizer.bos_token_id] if _tokenizer_adds_bos(tokenizer) else []
    encoded = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if prefix and ids[:1] == prefix:
            ids = ids[1:]
        if max_prompt_length is not None:
            keep = max_prompt_length - len(prefix)
            if keep < 1:
                raise ValueError(f"max_prompt_length={max_prompt_length} leaves no prompt token (BOS counts)")
            ids = ids[-keep:]
        if not prefix + ids:
            raise ValueError(f"prompt {k} ({prompt[:40]!r}) encodes to zero tokens")
        encoded.append(prefix + ids)
    return encoded


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input_ids and attention_mask, each sequence right-aligned (padding on the left)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    seed: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_prompt_length: int | None = None,
    synced_gpus: bool = False,
    progress: bool = True,
    index_offset: int = 0,
    indices: Sequence[int] | None = None,
) -> list[str]:
    """Continuations of ``prompts`` (decoded without special tokens, stripped), in input order.

    Batches of ``batch_size`` prompts, left-padded with the pad token (the EOS token when the tokenizer has
    none; the tokenizer is not modified). Greedy unless ``do_sample``; sampling needs ``seed`` and draws
    per example (module docstring), so a prompt's sample depends on (seed, its index) only: the index is
    ``index_offset + position`` or ``indices[position]``. Generation stops at any EOS id of the model's
    generation config or the tokenizer, or after ``max_new_tokens``. Prompts are left-truncated to
    ``max_prompt_length`` and to the model's position limit minus ``max_new_tokens``. ``synced_gpus``: for
    ZeRO-3, every rank must call this the same number of times with the same number of batches.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if do_sample:
        if seed is None:
            raise ValueError("do_sample=True needs a seed (sampling is reproducible per seed)")
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(
                f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
            )
    if indices is not None and len(indices) != len(prompts):
        raise ValueError(f"indices has {len(indices)} entries for {len(prompts)} prompts")
    if not prompts:
        return []
    pad_id = _pad_id(tokenizer)
    positions = max_positions(model.config)
    if positions is not None:  # prompt + continuation must fit the position embeddings: keep the prompt's end
        if positions <= max_new_tokens:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt: the model has "
                             f"{positions} positions")  # fmt: skip
        max_prompt_length = min(max_prompt_length or positions, positions - max_new_tokens)
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length)
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=_eos_ids(model, tokenizer) or None,
        bos_token_id=tokenizer.bos_token_id,
    )
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
            batch = encoded[start : start + batch_size]
            input_ids, attention_mask = left_pad(batch, pad_id)
            processors = LogitsProcessorList()
            if do_sample:
                positions = range(start, start + len(batch))
                ids = (
                    [indices[p] for p in positions]
                    if indices is not None
                    else [index_offset + p for p in positions]
                )
                processors.append(
                    PerRowSampler(
                        [row_seed(seed, i) for i in ids], temperature=temperature, top_p=top_p, top_k=top_k
                    )
                )
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    logits_processor=processors,
                    synced_gpus=synced_gpus,
                )
            continuation = generated[:, input_ids.shape[1] :].cpu()
            outputs.extend(
                text.strip() for text in tokenizer.batch_decode(continuation, skip_special_tokens=True)
            )
    finally:
        model.train(was_training)
    return outputs
