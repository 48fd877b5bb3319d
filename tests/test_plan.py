"""Tests of the dry-run planner (flexkd_ds.jobs.plan, flexkd_ds.runtime.memory, launch/plan.py). Meta device only: fast.

References are independent of the module: parameter counts written out from each architecture's published
hyper-parameters, ZeRO byte counts from the ZeRO paper's formulas typed in here, activation bytes per layer
derived by hand."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

from flexkd_ds.inputs.config import load_config
from flexkd_ds.jobs import plan as P
from flexkd_ds.runtime import memory as M

ROOT = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))
RECIPES = [r for r in ALL_RECIPES if "\ntask: " not in r.read_text()]  # causal LMs
OPT, LLAMA, GPT2 = (ROOT / "launch" / "recipes" / f"{n}.yaml"
                    for n in ("opt-6.7b-to-1.3b", "llama-7b-to-1.3b", "gpt2-xl-to-gpt2"))  # fmt: skip
GIB = 2**30


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The planner must work offline: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the planner tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_cli(cli, capsys, *argv: str) -> tuple[int, str]:
    try:
        code = cli(list(argv))
    except SystemExit as e:  # argparse / config errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


# --------------------------------------------------------------------------- parameter counts
def llama_params(h, f, layers, vocab, kv_dim=None, tied=False):
    kv_dim = kv_dim or h
    layer = 2 * h * h + 2 * h * kv_dim + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    return vocab * h * (1 if tied else 2) + layers * layer + h


def opt_params(h, f, layers, vocab, positions):
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h  # attention, fc1, fc2, two LayerNorms
    return vocab * h + (positions + 2) * h + layers * layer + 2 * h  # tied head; OPT's position offset 2


def gpt2_params(h, layers, vocab, positions):
    layer = (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 2 * 2 * h
    return vocab * h + positions * h + layers * layer + 2 * h  # tied head


EXPECTED = {  # hub name: (count from published hyper-parameters, nominal size, tolerance vs nominal)
    "facebook/opt-6.7b": (opt_params(4096, 16384, 32, 50272, 2048), 6.7e9, 0.01),
    "facebook/opt-1.3b": (opt_params(2048, 8192, 24, 50272, 2048), 1.3e9, 0.015),  # 1.316e9, named 1.3B
    "meta-llama/Llama-2-7b-hf": (llama_params(4096, 11008, 32, 32000), 6.74e9, 0.01),
    "princeton-nlp/Sheared-LLaMA-1.3B": (llama_params(2048, 5504, 24, 32000), 1.3e9, 0.04),  # 1.345e9
    "openai-community/gpt2-xl": (gpt2_params(1600, 48, 50257, 1024), 1.56e9, 0.01),
    "openai-community/gpt2": (gpt2_params(768, 12, 50257, 1024), 124e6, 0.01),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        llama_params(576, 1536, 30, 49152, 3 * 64, tied=True),
        135e6,
        0.01,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_configs_give_published_parameter_counts(name):
    path = P.shipped_config_path(name)
    assert path is not None and path.name == name.replace("/", "--") + ".json"
    shape = P.model_shape(P.load_shipped_config(path), name)
    exact, nominal, tolerance = EXPECTED[name]
    assert shape.params == exact  # unique tensors: tied embeddings once
    assert abs(shape.params - nominal) / nominal < tolerance
    assert sum(shape.tensor_numels) == shape.params


def test_seven_b_pairs_within_one_percent_of_their_names():
    # The brief's 1% holds for every nominal size written to three digits; "1.3B" is a rounded name for
    # OPT-1.3B (1.316e9, 1.2% off) and Sheared-LLaMA-1.3B (1.345e9, 3.5% off), checked exactly above.
    for name in (
        "facebook/opt-6.7b",
        "meta-llama/Llama-2-7b-hf",
        "openai-community/gpt2-xl",
        "openai-community/gpt2",
    ):
        exact, nominal, _ = EXPECTED[name]
        assert abs(exact - nominal) / nominal < 0.01, name


def test_config_lookup_order(tmp_path):
    assert P.shipped_config_path("gpt2") == P.MODEL_CONFIG_DIR / "openai-community--gpt2.json"  # legacy id
    assert P.shipped_config_path("smollm2-135m-instruct").name == "HuggingFaceTB--SmolLM2-135M-Instruct.json"
    assert P.shipped_config_path("someone/unknown-7b") is None
    from flexkd_ds.inputs.models import tiny_config

    local = tmp_path / "sft-teacher"
    tiny_config(
        "llama", hidden_size=64, num_layers=2, num_heads=4, vocab_size=300, max_positions=256
    ).save_pretrained(local)
    cfg = load_config(GPT2, [f"model.teacher={local}", "model.student=null", "model.student_arch={family: llama, hidden_size: 32, "
                             "num_layers: 2, num_heads: 4, vocab_size: 300, max_positions: 256}", "data.max_length=256",
                             "data.max_prompt_length=128"])  # fmt: skip
    teacher, student = P.resolve_models(cfg)
    assert teacher.origin == f"{local}/config.json" and teacher.config.hidden_size == 64
    assert student.origin == "model.student_arch"
    with pytest.raises(P.PlanError, match=r"model.teacher='someone/unknown-7b'.*local directory"):
        P.resolve_models(load_config(GPT2, ["model.teacher=someone/unknown-7b"]))
    with pytest.raises(P.PlanError, match="model.student_arch"):
        P.resolve_models(load_config(None, ["model.student_arch={from_teacher: true, hidden_size: 250, "
                                            "num_layers: 2}"]))  # fmt: skip


# ------------------------------------------------------------------------------ memory formulas
def test_zero_model_states_match_the_zero_paper():
    psi, n = 1_345_423_360, 8
    assert M.zero_model_states(psi, n, 0) == (2 * psi, 2 * psi, 12 * psi, 0.0)
    assert M.zero_model_states(psi, n, 1) == (2 * psi, 2 * psi, 12 * psi / n, 0.0)
    assert M.zero_model_states(psi, n, 2) == (2 * psi, 2 * psi / n, 12 * psi / n, 0.0)
    assert M.zero_model_states(psi, n, 3) == (2 * psi / n, 2 * psi / n, 12 * psi / n, 0.0)
    assert sum(M.zero_model_states(psi, n, 2)) == pytest.approx(2 * psi + (2 * psi + 12 * psi) / n)
    assert M.zero_model_states(psi, n, 3, offload_optimizer=True) == (
        2 * psi / n,
        2 * psi / n,
        0.0,
        16 * psi / n,
    )
    assert M.zero_model_states(psi, n, 2, param_bytes=4) == (4 * psi, 4 * psi / n, 8 * psi / n, 0.0)
    with pytest.raises(ValueError, match="ZeRO stage 0-3"):
        M.zero_model_states(psi, n, 4)


def test_llama_plan_on_8_gpus_matches_numbers_written_out():
    report = P.plan(load_config(LLAMA), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    mem = {k: v * GIB for k, v in report.memory_gib.items()}
    psi_s, psi_t, n = 1_345_423_360, 6_738_415_616, 8
    persistent_t = (2 * 32 + 1) * 4096  # RMSNorm weights < stage3_param_persistence_threshold (1e5)

    def approx(expected):
        return pytest.approx(expected, rel=1e-9)

    # student ZeRO-2 on 8 GPUs: 2 psi + (2 psi + 12 psi) / 8 (ZeRO paper)
    states = mem["student parameters (ZeRO-2)"] + mem["student gradients"] + mem["student optimizer states"]
    assert states == approx(2 * psi_s + (2 * psi_s + 12 * psi_s) / n)
    assert mem["teacher parameter shard"] == approx((psi_t - persistent_t) * 2 / n)
    assert mem["teacher persistent tensors (whole)"] == approx(persistent_t * 2)
    assert mem["teacher gathered module + prefetch"] == approx((32000 * 4096 + 50_000_000) * 2)  # embedding
    assert mem["student reduce/allgather buckets"] == approx(4.5 * (2e8 + 2e8) * 2)  # DeepSpeed docs
    per_layer_token = 2 * (4 * 2048 + 2 * 2048) + 2 * (2 * 2048 + 4 * 5504)  # attention + SwiGLU MLP, bf16
    assert mem["step: student activations (for backward)"] == approx(
        512 * (24 * per_layer_token + 2 * 2 * 2048)
    )
    # loss.fused_logits (default): one chunk of min(1024, B x T = 512) rows x V, 8 fp32 + 2 bf16 buffers; the
    # student's (B*T, d_S) hidden-row gradient and its fp32 head gradient (V x d_S); the teacher's head whole
    assert mem["step: chunked logit loss (one chunk x V)"] == approx(
        512 * 32000 * (8 * 4 + 2 * 2) + 512 * 2048 * 4 + 32000 * 2048 * 4
    )
    assert mem["teacher LM head (whole; chunked logit loss)"] == approx(32000 * 4096 * 2)
    unfused = P.plan(load_config(LLAMA, ["loss.fused_logits=false"]), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    assert unfused.memory_gib["step: logits + loss buffers (B, T, V)"] * GIB == approx(512 * 32000 * (3 * 2 + 6 * 4))
    # the teacher placement: ZeRO-3 all-gathers the non-persistent teacher once per micro-batch (7/8 arrives)
    place = report.teacher_placement
    assert place["zero3"]["gathered_gib_per_step"] * GIB == approx((psi_t - persistent_t) * 2 * 7 / 8)
    assert place["replicated"]["gathered_gib_per_step"] == 0.0
    assert place["replicated"]["required_gib"] - place["zero3"]["required_gib"] == pytest.approx(
        (psi_t * 2 - (psi_t - persistent_t) * 2 / n - persistent_t * 2 - (32000 * 4096 + 50_000_000) * 2) / GIB
    )
    assert place["recommended"] == "replicated"  # 13.5 GB of bf16 teacher fits an 80 GiB GPU beside the student
    tot = report.totals_gib
    assert tot["reserve"] == pytest.approx(0.1 * 80 + 1.5)
    assert tot["model_states"] + max(tot["training_step"], tot["importance_pass"]) == pytest.approx(
        tot["peak"]
    )
    assert tot["required"] == pytest.approx(tot["peak"] + tot["reserve"])
    assert report.fits and report.exit_code == 0 and not report.required_overrides


@pytest.mark.parametrize("recipe", [OPT, LLAMA, GPT2], ids=lambda p: p.stem)
def test_memory_is_monotone_in_node_count(recipe):
    for gpus, nodes, overrides in (
        (1, (1, 2, 4, 8), []),
        (8, (1, 2, 3, 4, 8), ["train.global_batch_size=null"]),
    ):
        cfg = load_config(recipe, overrides)
        reports = [P.plan(cfg, nodes=n, gpus_per_node=gpus, gpu_mem_gib=80) for n in nodes]
        for a, b in zip(reports, reports[1:], strict=False):
            for key in a.memory_gib:
                assert b.memory_gib[key] <= a.memory_gib[key], (recipe.stem, key, a.world, b.world)
            assert b.totals_gib["required"] < a.totals_gib["required"]
        assert (
            reports[-1].memory_gib["teacher parameter shard"]
            < reports[0].memory_gib["teacher parameter shard"] / 7
        )


def test_offload_moves_states_to_cpu():
    cfg = load_config(LLAMA, ["deepspeed.teacher_config=ds_configs/teacher_zero3_offload.json",
                              "deepspeed.student_config=ds_configs/student_zero3_offload.json"])  # fmt: skip
    report = P.plan(cfg, nodes=2, gpus_per_node=4, gpu_mem_gib=80)
    assert (
        report.memory_gib["teacher parameter shard"] == 0
        and report.memory_gib["student optimizer states"] == 0
    )
    cpu = report.cpu_per_node_gib
    psi_t, psi_s, persistent_t = 6_738_415_616, 1_345_423_360, 65 * 4096
    assert cpu["teacher parameter shards (offload_param)"] * GIB == pytest.approx(
        (psi_t - persistent_t) * 2 / 2, rel=1e-9
    )
    persistent_s = 49 * 2048  # student ZeRO-3: its norms stay whole; states of everything are offloaded
    assert cpu["student optimizer states + fp32 grads (offload_optimizer)"] * GIB == pytest.approx(
        16 * psi_s / 8 * 4, rel=1e-9)  # fmt: skip
    assert report.memory_gib["student parameters (ZeRO-3)"] * GIB == pytest.approx(
        (psi_s - persistent_s) * 2 / 8 + persistent_s * 2, rel=1e-9)  # fmt: skip


# ------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("recipe", [OPT, LLAMA], ids=lambda p: p.stem)
def test_7b_recipes_fit_8x80_and_not_1x16(cli, capsys, tmp_path, recipe):
    code, out = run_cli(cli, capsys, "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "8")
    assert code == 0 and "FITS" in out and "DOES NOT FIT" not in out
    out_json = tmp_path / "plan.json"
    code, out = run_cli(cli, capsys, "--config", str(recipe), "--nodes", "1", "--gpus-per-node", "1",
                        "--gpu-mem-gb", "16", "--json", str(out_json))  # fmt: skip
    assert code == 2 and "DOES NOT FIT" in out and "what to change, cheapest first" in out
    data = json.loads(out_json.read_text())
    assert (
        data["exit_code"] == 2
        and data["fits"] is False
        and data["required_overrides"] == ["train.grad_accum=8"]
    )
    assert data["totals_gib"]["required"] > 16 and data["suggestions"]
    assert [s["kind"] for s in data["suggestions"]] == ["more GPUs", "shard / offload"]
    for suggestion in data["suggestions"]:  # each suggested change really fits when applied
        nodes, overrides = 1, []
        for item in suggestion["change"]:
            if item.startswith("--nodes "):
                nodes = int(item.split()[1])
            else:
                overrides.append(item)
        fixed = P.plan(load_config(recipe, overrides), nodes=nodes, gpus_per_node=1, gpu_mem_gib=16)
        assert fixed.exit_code == 0 and fixed.totals_gib["required"] == pytest.approx(
            suggestion["required_gib"]
        )


def test_smaller_micro_batch_suggestion_is_the_largest_that_fits():
    cfg = load_config(OPT, ["train.micro_batch_size=16", "train.global_batch_size=null"])
    report = P.plan(cfg, nodes=1, gpus_per_node=8, gpu_mem_gib=24)
    assert report.exit_code == 2
    first = report.suggestions[0]
    assert first["kind"] == "smaller micro-batch"
    micro = int(first["change"][0].removeprefix("train.micro_batch_size="))

    def required(m):
        return P.plan(cfg.replace(**{"train.micro_batch_size": m}), nodes=1, gpus_per_node=8,
                      gpu_mem_gib=24).totals_gib["required"]  # fmt: skip

    assert 1 <= micro < 16 and required(micro) <= 24 < required(micro + 1)
    short = next(s for s in report.suggestions if s["kind"] == "shorter max_length")
    assert "data.max_prompt_length=" in " ".join(short["change"])  # keeps max_prompt_length < max_length


def test_global_batch_that_cannot_split_is_invalid(cli, capsys):
    code, out = run_cli(cli, capsys, "--config", str(GPT2), "--nodes", "2", "--gpus-per-node", "8")
    assert code == 1 and "train.global_batch_size=8" in out and "INVALID" in out


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.teacher=facebook/opt-6.7b"], ["model.student: vocab size 50257 != the teacher's 50272", "loss.beta=0"]),
        (["model.teacher=openai-community/gpt2", "model.student=openai-community/gpt2-xl"],
         ["model.student: d_S=1600 >= d_T=768", "loss.feature_loss=projector"]),
        (["data.max_length=2048"], ["data.max_length=2048 exceeds", "model.teacher (1024)", "data.max_length<=1024"]),
    ],
    ids=["vocab", "width", "max_length"],
)  # fmt: skip
def test_pair_errors_name_the_option(cli, capsys, overrides, expected):
    report = P.plan(load_config(GPT2, overrides), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    assert report.exit_code == 1
    text = " ".join(report.errors)
    for piece in expected:
        assert piece in text
    code, out = run_cli(cli, capsys, "--config", str(GPT2), "--gpus-per-node", "8", *overrides)
    assert code == 1 and expected[0] in out


def test_tokenizer_family_and_large_gguf_warnings():
    cfg = load_config(GPT2, ["model.teacher=facebook/opt-6.7b", "loss.beta=0"])
    report = P.plan(cfg, nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    assert report.exit_code == 0 and any(
        "model_type differs (teacher opt, student gpt2)" in w for w in report.warnings
    )
    teacher, student = P.resolve_models(load_config(LLAMA))
    t = P.model_shape(teacher.config, teacher.name)
    s = P.model_shape(student.config, student.name)
    gguf_teacher = P.ResolvedModel("teacher", "big.gguf", "GGUF metadata", teacher.config, gguf=True)
    errors, warnings, _ = P.check_pair(load_config(LLAMA), gguf_teacher, student, t, s)
    assert not errors and any("GGUF checkpoint with 6.7 B parameters" in w for w in warnings)
    _, warnings, _ = P.check_pair(load_config(LLAMA), teacher, student, t, s)
    assert not any("GGUF" in w for w in warnings)


def test_bad_arguments_exit_1(cli, capsys):
    code, out = run_cli(cli, capsys, "--config", str(GPT2), "--nodes", "0")
    assert code == 1 and "--nodes must be a positive integer" in out
    code, out = run_cli(cli, capsys, "--config", str(GPT2), "train.max_step=3")
    assert code == 1 and "did you mean 'train.max_steps'" in out
    code, out = run_cli(cli, capsys, "--config", str(GPT2), "model.teacher=nobody/nothing")
    assert code == 1 and "model.teacher='nobody/nothing'" in out


@pytest.mark.parametrize("recipe", [None, *RECIPES], ids=lambda p: p.name if p else "quickstart-defaults")
def test_every_recipe_plans_offline(recipe):
    cfg = load_config(recipe)
    report = P.plan(cfg, nodes=1, gpus_per_node=1, gpu_mem_gib=80)
    assert report.exit_code in (0, 2), report.errors
    assert report.models["teacher"]["params"] > 0 and report.models["student"]["params"] > 0
    assert ("FITS" if report.fits else "DOES NOT FIT") in P.format_report(report)
    assert json.loads(json.dumps(report.to_dict()))["world_size"] == 1


def test_pruned_student_is_planned_at_its_cut_shape_and_the_passes_before_training_are_reported():
    """SmolLM2 (576 wide, 30 layers, 9 x 64 heads, MLP 1536, tied 49152 x 576 embedding) cut to 378 wide, 24
    layers, MLP 1024: the student's parameters are counted by hand here."""
    cfg = load_config(
        None, ["model.student_arch.hidden_size=378", "prune.num_layers=24", "prune.intermediate_size=1024"]
    )
    report = P.plan(cfg, nodes=1, gpus_per_node=1, gpu_mem_gib=80)
    d, layers, mlp, q, kv = 378, 24, 1024, 9 * 64, 3 * 64
    per_layer = d * q * 2 + d * kv * 2 + 3 * d * mlp + 2 * d  # q,o + k,v + gate,up,down + two RMSNorm weights
    assert report.models["student"]["params"] == 49152 * d + layers * per_layer + d  # + the final norm
    assert report.models["student"]["layers"] == 24 and report.models["student"]["d_head_input"] == d
    text = " ".join(report.before_training)
    assert "prune job" in text and "teacher responses" in text and "gathered whole" in text
    tiny = P.plan(load_config(ROOT / "launch" / "recipes" / "tiny.yaml"), nodes=1, gpus_per_node=1)
    assert tiny.before_training == []


# ------------------------------------------------------------------------------- teacher cache mode
TEACHER_TERMS = ("teacher parameter shard", "teacher persistent tensors (whole)",
                 "teacher gathered module + prefetch", "step: teacher forward (no grad)",
                 "importance: teacher forward (head skipped)", "importance: LM head copy + fp32 upcast",
                 "teacher LM head (whole; chunked logit loss)")  # fmt: skip


def test_teacher_cache_plan_matches_numbers_written_out():
    """Llama-2-7B (d_T 4096, vocab 32000, bf16) with teacher_cache.dir on 8 GPUs: the teacher's shard, gathers and
    forward are gone; its LM head is whole on every GPU (jobs.cache_teacher.head_only, in the teacher's compute
    dtype) and one batch of cached h is on the GPU (TeacherCache.batch_hidden casts to that dtype)."""
    live = P.plan(load_config(LLAMA), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    report = P.plan(
        load_config(LLAMA, ["teacher_cache.dir=/tmp/cache"]), nodes=1, gpus_per_node=8, gpu_mem_gib=80
    )
    mem = {k: v * GIB for k, v in report.memory_gib.items()}
    assert report.exit_code == 0 and not report.errors
    assert not set(TEACHER_TERMS) & set(mem)
    assert mem["teacher LM head (whole; teacher cache)"] == 32000 * 4096 * 2
    assert mem["step: cached teacher h (B, T, d_T)"] == 1 * 512 * 4096 * 2  # micro 1, max_length 512, bf16
    assert mem["importance: cached teacher h (B, T, d_T)"] == 4 * 512 * 4096 * 2  # importance.batch_size 4
    assert mem["importance: LM head fp32 upcast"] == 32000 * 4096 * 4  # no 16-bit copy: the head is resident
    assert mem["importance: closed-form chunk"] == min(4096, 4 * 512) * 32000 * 4
    for key, value in live.memory_gib.items():  # the student's lines do not change
        if key.startswith("student") or key in ("step: student activations (for backward)",
                                                "step: chunked logit loss (one chunk x V)", "step: feature-loss buffers"):  # fmt: skip
            assert report.memory_gib[key] == value, key
    saved = live.totals_gib["required"] - report.totals_gib["required"]
    assert saved >= live.memory_gib["teacher parameter shard"] > 1.5  # (6.74e9 - 65 x 4096) x 2 / 8 bytes

    cache = report.teacher_cache
    assert cache["bytes_per_token"] == 4096 * 2 == 8192
    assert cache["gib_per_million_tokens"] == pytest.approx(8192e6 / GIB)  # 7.63 GiB
    assert cache["examples"] is None and cache["max_tokens"] is None  # a JSONL file: unknown without the data
    assert cache["head_gib"] * GIB == 32000 * 4096 * 2
    # the build: the teacher engine alone (ZeRO-3 shard, persistent norms, gathers) + a forward at batch 4
    # whose LM head is skipped (the cache holds h; no logits are formed)
    persistent_t, psi_t = 65 * 4096, 6_738_415_616
    per_token = 2 * (4 * 4096 + 2 * 4096) + 2 * (2 * 4096 + 4 * 11008) + 2 * (4096 + 4096)
    build = ((psi_t - persistent_t) * 2 / 8 + persistent_t * 2 + (32000 * 4096 + 50_000_000) * 2
             + 4 * 512 * per_token + (0.1 * 80 + 1.5) * GIB)  # fmt: skip
    assert cache["build_required_gib"] * GIB == pytest.approx(build, rel=1e-9)
    assert cache["head_load_cpu_per_node_gib"] * GIB == 8 * psi_t * 2
    text = P.format_report(report)
    assert "teacher cache: 8192 bytes/token (bf16, d_T=4096) = 7.63 GiB per 1M tokens" in text
    assert "distill holds only the teacher's LM head (0.24 GiB per GPU, 16-bit)" in text
    assert "teacher: offline cache /tmp/cache (bf16 h); LM head only" in text
    assert json.loads(json.dumps(report.to_dict()))["teacher_cache"]["bytes_per_token"] == 8192
    assert live.teacher_cache == {} and not any("teacher cache" in line for line in live.before_training)


def test_teacher_cache_size_when_the_examples_are_known():
    # fp32 cache of GPT-2 XL (d_T 1600): 6400 bytes per token; at most 1000 rows x 512 tokens
    cfg = load_config(GPT2, ["teacher_cache.dir=c", "teacher_cache.dtype=fp32", "data.max_train_rows=1000"])
    cache = P.plan(cfg, nodes=1, gpus_per_node=8, gpu_mem_gib=80).teacher_cache
    assert cache["bytes_per_token"] == 1600 * 4
    assert (cache["examples"], cache["max_tokens"]) == (1000, 1000 * 512)
    assert cache["max_gib"] * GIB == 1000 * 512 * 6400
    assert cache["head_gib"] * GIB == 50257 * 1600 * 2  # the head stays in the teacher's compute dtype
    # generated data: data.num_synthetic examples (tiny: 200 x 128 tokens, d_T 64, bf16)
    tiny = P.plan(load_config(ROOT / "launch" / "recipes" / "tiny.yaml", ["teacher_cache.dir=c"]), nodes=1,
                  gpus_per_node=1)  # fmt: skip
    assert tiny.exit_code == 0 and tiny.teacher_cache["max_tokens"] == 200 * 128
    assert tiny.teacher_cache["max_gib"] * GIB == 200 * 128 * 64 * 2
    assert (
        "at most 200 examples (data.num_synthetic, builtin:synthetic) x 128 tokens" in tiny.before_training[0]
    )


def test_teacher_cache_refusals_and_unused_cache(cli, capsys):
    code, out = run_cli(
        cli, capsys, "teacher_cache.dir=c"
    )  # the quickstart: a pruned student, teacher responses
    assert code == 1 and "model.student_init=random" in out and "INVALID" in out
    report = P.plan(load_config(None, ["teacher_cache.dir=c", "model.student_init=random",
                                       "model.student_arch={from_teacher: true, hidden_size: 384, num_layers: 4}"]),
                    nodes=1, gpus_per_node=1)  # fmt: skip
    assert report.exit_code == 1 and "data.responses=dataset" in report.errors[0]
    unused = P.plan(load_config(LLAMA, ["teacher_cache.dir=c", "loss.alpha=0", "loss.beta=0"]), nodes=1,
                    gpus_per_node=8)  # fmt: skip
    assert unused.teacher_cache == {} and any("distill does not use the cache" in w for w in unused.warnings)


def test_teacher_cache_suggestions_never_offload_the_teacher():
    cfg = load_config(LLAMA, ["teacher_cache.dir=c"])
    report = P.plan(cfg, nodes=1, gpus_per_node=1, gpu_mem_gib=16)
    assert report.exit_code == 2 and report.suggestions
    assert not any("teacher_config" in " ".join(s["change"]) for s in report.suggestions)
    assert any("cache build" in w for w in report.warnings)  # 16.4 GiB: the engine alone does not fit 16
    live = P.plan(load_config(LLAMA), nodes=1, gpus_per_node=1, gpu_mem_gib=16)
    assert (
        report.totals_gib["required"]
        < live.totals_gib["required"] - live.memory_gib["teacher parameter shard"]
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_plans_with_a_teacher_cache(recipe):
    report = P.plan(load_config(recipe, ["teacher_cache.dir=c"]), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    cache = report.teacher_cache
    assert cache["bytes_per_token"] == report.models["teacher"]["d_head_input"] * 2
    assert (
        cache["head_gib"] * GIB
        == report.models["teacher"]["vocab"] * report.models["teacher"]["d_head_input"] * 2
    )
    assert report.exit_code == (1 if recipe.stem == "quickstart" else 0)  # quickstart prunes from the body


@pytest.mark.parametrize("recipe", [OPT, LLAMA, GPT2], ids=lambda p: p.stem)
def test_paper_recipes_centre_the_correlation_over_the_papers_batch(recipe):
    """Global micro-batch of 8 GPUs x micro 1 = the paper's batch of 8; a single-sequence correlation batch
    (the same recipe with the per-rank scope) is warned about, naming the option that fixes it."""
    report = P.plan(load_config(recipe), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    assert report.setup["correlation_sequences"] == 8
    assert not [w for w in report.warnings if "centred over 1 sequence" in w]
    local = P.plan(load_config(recipe, ["loss.correlation_scope=local"]), nodes=1, gpus_per_node=8)
    assert local.setup["correlation_sequences"] == 1
    (warning,) = [w for w in local.warnings if "centred over 1 sequence" in w]
    assert "loss.correlation_scope=global" in warning
    off = P.plan(
        load_config(recipe, ["loss.feature_loss=none", "loss.correlation_scope=local"]),
        nodes=1,
        gpus_per_node=8,
    )
    assert off.setup["correlation_sequences"] is None


def test_every_task_recipe_plans():
    tasks = sorted(set(ALL_RECIPES) - set(RECIPES))
    assert len(tasks) == 5  # 3 classification + 2 seq2seq
    for recipe in tasks:
        report = P.plan(load_config(recipe), nodes=1, gpus_per_node=1, gpu_mem_gib=80)
        assert report.exit_code in (0, 2) and report.models["student"]["params"] > 0, report.errors


# ---- task=classification / seq2seq: the task's model class -----------------------------------------------


def bert_classifier_params(h, layers, inner, vocab, positions, labels):
    embeddings = vocab * h + positions * h + 2 * h + 2 * h  # words, positions, token types, LayerNorm
    layer = 4 * (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h) + 2 * h
    return embeddings + layers * layer + (h * h + h) + (labels * h + labels)  # pooler, classifier


def bart_params(d, enc, dec, ffn, vocab, positions):
    embeddings = vocab * d + 2 * (positions + 2) * d + 2 * 2 * d  # shared (tied head), positions, LayerNorms
    mlp = d * ffn + ffn + ffn * d + d + 2 * d
    return embeddings + enc * (4 * (d * d + d) + 2 * d + mlp) + dec * (8 * (d * d + d) + 4 * d + mlp)


@pytest.mark.parametrize(
    ("name", "task", "labels", "exact", "nominal"),
    [
        ("textattack/bert-base-uncased-imdb", "classification", 2,
         bert_classifier_params(768, 12, 3072, 30522, 512, 2), 110e6),
        ("huawei-noah/TinyBERT_General_4L_312D", "classification", 2,
         bert_classifier_params(312, 4, 1200, 30522, 512, 2), 14.4e6),  # the paper's 14.5M counts more heads
        ("openai-community/gpt2-medium", "classification", 5, gpt2_params(1024, 24, 50257, 1024) + 5 * 1024, 355e6),
        ("facebook/bart-large-xsum", "seq2seq", 0, bart_params(1024, 12, 12, 4096, 50264, 1024), 406e6),
    ],
)  # fmt: skip
def test_task_models_are_built_with_their_class(name, task, labels, exact, nominal):
    shape = P.model_shape(P.load_shipped_config(P.shipped_config_path(name)), name, task, labels)
    assert shape.params == exact and abs(shape.params - nominal) / nominal < 0.01
    assert shape.vocab_size == (labels if task == "classification" else 50264)
    if task == "seq2seq":
        assert shape.num_layers == 24  # both stacks


def test_task_recipes_plan_on_one_gpu_with_an_upper_bound_warning():
    for recipe, task in (("bert-base-to-tinybert-imdb", "classification"), ("bart-large-xsum", "seq2seq")):
        cfg = load_config(ROOT / "launch" / "recipes" / f"{recipe}.yaml", [])
        report = P.plan(cfg, nodes=1, gpus_per_node=1, gpu_mem_gib=80)
        assert not report.errors and report.fits, (recipe, report.errors)
        assert any(w.startswith(f"task={task}") and "upper bound" in w for w in report.warnings)
