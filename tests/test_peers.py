"""bench/peers.py: the shared held-out function against a float64 reference, and the first-step loss agreement
of TRL's GKD (lmbda 0, beta 1) and torchtune's KD losses with flexkd-ds's reverse / forward KL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import load_script

from flexkd_ds.method import losses
from flexkd_ds.method.fused_logits import fused_linear_divergence

REPO = Path(__file__).resolve().parents[1]


def _peers():
    return load_script(REPO / "bench" / "peers.py")


def _batch(batch_size: int = 3, length: int = 11, vocab: int = 37, seed: int = 0) -> dict:
    """Token ids and shifted labels with a prompt of a different length per row (-100 before the response)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    labels = torch.full_like(ids, -100)
    for row, prompt in enumerate((2, 5, 7)[:batch_size]):
        labels[row, prompt - 1 : -1] = ids[row, prompt:]  # labels[t] = ids[t + 1] on the response
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_heldout_metrics_matches_float64_reference():
    peers = _peers()
    vocab = 37
    batches = [_batch(seed=s) for s in (1, 2)]
    g = torch.Generator().manual_seed(3)
    table_s = {id(b): 4 * torch.randn(*b["input_ids"].shape, vocab, generator=g) for b in batches}
    table_t = {id(b): 4 * torch.randn(*b["input_ids"].shape, vocab, generator=g) for b in batches}
    by_ids = {b["input_ids"].data_ptr(): id(b) for b in batches}

    def student(ids, attn):
        return table_s[by_ids[ids.data_ptr()]].float()

    def teacher(ids, attn):
        return table_t[by_ids[ids.data_ptr()]].float()

    got = peers.heldout_metrics(student, teacher, batches)

    nll = rkl = 0.0
    count = 0
    for b in batches:  # token by token, in float64, from the definitions
        for i, j in zip(*torch.nonzero(b["labels"] != -100, as_tuple=True), strict=True):
            zs, zt = table_s[id(b)][i, j].float().double(), table_t[id(b)][i, j].float().double()
            log_q = [float(v) - math.log(sum(math.exp(float(u)) for u in zs)) for v in zs]
            log_p = [float(v) - math.log(sum(math.exp(float(u)) for u in zt)) for v in zt]
            nll -= log_q[int(b["labels"][i, j])]
            rkl += sum(math.exp(q) * (q - p) for q, p in zip(log_q, log_p, strict=True))
            count += 1
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(nll / count, rel=1e-12)
    assert got["rkl"] == pytest.approx(rkl / count, rel=1e-10)


def test_batch_of_unshifts_labels_and_step_times_drop_warmup():
    peers = _peers()
    b = _batch()
    examples = [
        {"input_ids": i.tolist(), "labels": lab.tolist()}
        for i, lab in zip(b["input_ids"], b["labels"], strict=True)
    ]
    got = peers.batch_of(examples)
    assert torch.equal(got["unshifted"][:, 1:], b["labels"][:, :-1])  # HF / torchtune shift them back
    assert (got["unshifted"][:, 0] == -100).all()
    assert peers.step_times([0.0, 1.0, 3.0, 6.0, 10.0], warmup=2) == [2.0, 3.0, 4.0]  # steps 3, 4, 5


def _tiny_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=37,
                             tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(config).eval()

    return llama(16, 1, 0), llama(32, 2, 1)


def test_first_step_loss_agrees_with_trl_and_torchtune():
    """Same initial student, same batch: TRL's GKD loss at beta = 1 is flexkd-ds's rkl (per response token)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd", reason="trl is not installed (pip install trl==1.16.0)")
    peers = _peers()
    student, teacher = _tiny_pair()
    b = _batch()
    batch = peers.batch_of(
        [
            {"input_ids": i.tolist(), "labels": lab.tolist()}
            for i, lab in zip(b["input_ids"], b["labels"], strict=True)
        ]
    )
    with torch.no_grad():
        s_out = student(input_ids=batch["input_ids"], output_hidden_states=True)
        t_out = teacher(input_ids=batch["input_ids"], output_hidden_states=True)
    values = peers.check_values(
        s_out, t_out, batch, student, teacher, losses, fused_linear_divergence, gkd.GKDTrainer
    )
    ref = values["reference_rkl_float64"]
    for key in ("flexkd_rkl", "flexkd_rkl_fused", "trl_gkd_beta1"):
        assert values[key] == pytest.approx(ref, rel=1e-5, abs=1e-7), key
    assert values["flexkd_fkl"] == pytest.approx(values["reference_fkl_float64"], rel=1e-5, abs=1e-7)
    if "torchtune_error" in values:
        pytest.skip(f"torchtune does not import: {values['torchtune_error']}")
    assert values["torchtune_rkl"] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    # torchtune's "ForwardKLLoss" is the cross-entropy -sum p_T log q_S: KL(p_T || q_S) + H(p_T)
    expected = values["flexkd_fkl"] + values["teacher_entropy"]
    assert values["torchtune_fkl"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_quick_benchmark_runs_flexkd_and_trl(tmp_path):
    """Two real runs of the quick mode (a deepspeed launch and a TRL trainer), one round: both finish, their
    first logged losses agree, and the report holds step times and held-out numbers for both."""
    pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/peers.py", "--quick", "--rounds", "1", "--variants", "flexkd-rkl,trl-gkd-rkl",
           "--work", str(tmp_path / "work"), "--port", "29781"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=900)
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    first = {r["variant"]: r["first_loss"] for r in report["runs"]}
    assert first["trl-gkd-rkl"] == pytest.approx(first["flexkd-rkl"], rel=1e-5)
    for r in report["runs"]:
        assert len(r["steps_s"]) == report["spec"]["steps"] - report["spec"]["warmup"]
        assert r["run"] in report["heldout"]
