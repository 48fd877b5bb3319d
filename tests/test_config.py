"""Tests of flexkd_ds.inputs.config: schema, loading, overrides, errors, CLI, and the DeepSpeed dict helpers."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from flexkd_ds.inputs import config as C
from flexkd_ds.inputs.config import ConfigError, DistillConfig, load_config
from flexkd_ds.runtime import ds_config as D

ROOT = Path(C.__file__).resolve().parents[2]
DS_FILES = sorted((ROOT / "ds_configs").glob("*.json"))
RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))


def leaf_keys(cls: type = DistillConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, walked independently of the module's own helper."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def error_of(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------- defaults
def test_config_module_is_pure_python():
    tree = ast.parse(Path(C.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "transformers")}


def test_default_config_matches_the_brief():
    cfg = load_config()
    assert cfg == DistillConfig()
    assert cfg.output_dir == "outputs/quickstart" and cfg.seed == 1234
    assert cfg.model.teacher == "smollm2-135m-instruct" and cfg.model.teacher_arch is None
    assert cfg.model.student is None and cfg.model.student_arch["from_teacher"] is True
    assert cfg.model.student_arch["hidden_size"] == 432 and cfg.model.dtype == "auto"
    assert cfg.model.resolved_student_init == "pruned"  # the quickstart cuts its student from the teacher
    assert (cfg.data.train, cfg.data.max_length, cfg.data.on_bad_row) == ("builtin:prompts", 256, "error")
    assert (cfg.data.responses, cfg.data.valid) == ("teacher", "builtin:prompts")
    assert (cfg.loss.feature_loss, cfg.loss.logit_loss, cfg.loss.alpha) == ("flexkd", "fkl", 0.05)
    assert cfg.train.betas == (0.9, 0.999) and cfg.train.lr_schedule == "cosine"
    assert cfg.deepspeed.student_config == "ds_configs/student_zero2.json"
    assert cfg.importance.resolved_path("/o") == Path("/o/importance.safetensors")
    assert cfg.replace(**{"importance.path": "x.safetensors"}).importance.resolved_path("/o") == Path(
        "x.safetensors"
    )
    assert cfg.model.precision("cpu") == "fp32" and cfg.model.precision("cuda") == "bf16"


def test_configs_are_frozen_and_mutable_defaults_are_not_shared():
    a, b = DistillConfig(), DistillConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.train.max_steps = 3  # type: ignore[misc]
    assert a.model.student_arch is not b.model.student_arch


def test_logit_loss_choices_match_losses_module():
    losses = pytest.importorskip("flexkd_ds.method.losses")
    choices = C.get_args(C._hints(C.LossConfig)["logit_loss"])
    assert set(choices) == set(losses.LOGIT_DIVERGENCES) | {"none"}


# ------------------------------------------------------------------------------ files and round trip
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "model.teacher=null",
            "model.teacher_arch={family: llama, hidden_size: 64, num_heads: 4}",
            "model.student_arch={from_teacher: false, hidden_size: 32, num_heads: 2, vocab_size: 100}",
            "train.betas=[0.8, 0.95]",
            "data.valid=v.jsonl",
            "train.eval_every=5",
            "loss.logit_loss=jsd",
        ],
    ],  # fmt: skip
)
def test_dump_yaml_round_trips(tmp_path, overrides):
    cfg = load_config(None, overrides)
    written = C.dump_yaml(cfg, tmp_path / "run")
    assert written == tmp_path / "run" / "config.resolved.yaml"
    assert load_config(written) == cfg
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps(cfg.to_dict()))
    assert load_config(as_json) == cfg
    assert yaml.safe_load(written.read_text()) == cfg.to_dict()  # plain types only: no tuples, no tags


def test_file_then_overrides_and_partial_sections(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_steps: 7\n  lr: 1e-4\nloss:\nmodel:\n  student: some/student\n")
    cfg = load_config(path, ["train.max_steps=9"])
    assert cfg.train.max_steps == 9 and cfg.train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.loss == C.LossConfig()  # an empty section means defaults
    assert cfg.model.student == "some/student" and cfg.model.student_arch is None  # default displaced


@pytest.mark.parametrize(
    "text, expected",
    [
        ("los:\n  alpha: 1\n", ["unknown config key 'los'", "did you mean 'loss'"]),
        ("train:\n  max_step: 3\n", ["'train.max_step'", "did you mean 'train.max_steps'"]),
        ("train:\n  lr: fast\n", ["train.lr='fast'", "expected float"]),
        ("train: 3\n", ["train=3 (int): expected mapping"]),
        ("train:\n  lr: 1\n  lr: 2\n", ["found duplicate key lr"]),  # OmegaConf's YAML loader says so
        ("- 1\n- 2\n", ["must hold a mapping"]),
        ("train: [unclosed\n", ["cannot parse config file"]),
    ],
)
def test_file_errors_name_the_file(tmp_path, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    message = error_of([], path)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_or_unsupported_files(tmp_path):
    assert "not found" in error_of([], tmp_path / "nope.yaml")
    (tmp_path / "c.toml").write_text("")
    assert ".yaml, .yml or .json" in error_of([], tmp_path / "c.toml")
    (tmp_path / "empty.yml").write_text("")
    assert load_config(tmp_path / "empty.yml") == DistillConfig()


# ------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("train.max_steps=20", lambda c: c.train.max_steps, 20),
        ("train.lr=3e-5", lambda c: c.train.lr, 3e-5),
        ("loss.alpha=1", lambda c: c.loss.alpha, 1.0),  # int accepted for a float, stored as float
        ("importance.recompute=true", lambda c: c.importance.recompute, True),
        ("data.max_train_rows=null", lambda c: c.data.max_train_rows, None),
        ("data.max_train_rows=50", lambda c: c.data.max_train_rows, 50),
        ("train.betas=[0.8, 0.9]", lambda c: c.train.betas, (0.8, 0.9)),
        ("loss.feature_loss=cka", lambda c: c.loss.feature_loss, "cka"),
        ("output_dir=/tmp/x", lambda c: c.output_dir, "/tmp/x"),
        ("output_dir=2024", lambda c: c.output_dir, "2024"),  # a str field keeps the text
        ("train.resume=no", lambda c: c.train.resume, "no"),  # not YAML 1.1's False
        ("model.student_arch.num_layers=2", lambda c: c.model.student_arch["num_layers"], 2),
        ("model.student_arch.num_layers=2", lambda c: c.model.student_arch["hidden_size"], 432),
        ("loss={alpha: 0.5}", lambda c: (c.loss.alpha, c.loss.feature_loss), (0.5, "flexkd")),
        ("train.max_steps=", lambda c: c.train.max_steps, "error"),
    ],
)
def test_override_types(override, get, expected):
    if expected == "error":
        assert "train.max_steps=None" in error_of([override])
        return
    value = get(load_config(None, [override]))
    assert value == expected and type(value) is type(expected)


def test_dict_fields_given_whole_replace_their_default_and_nested_keys_merge(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  student_arch: {from_teacher: true, hidden_size: 64}\n")
    assert load_config(path).model.student_arch == {"from_teacher": True, "hidden_size": 64}
    arch = load_config(path, ["model.student_arch.num_layers=2"]).model.student_arch
    assert arch == {"from_teacher": True, "hidden_size": 64, "num_layers": 2}
    # a null dict field starts from its default (None for teacher_arch) when a key inside it is set
    cfg = load_config(None, ["model.teacher=null", "model.teacher_arch.hidden_size=512"])
    assert cfg.model.teacher_arch == {"hidden_size": 512}
    assert load_config(None, ["data.field_map.output=response"]).data.field_map == {"output": "response"}


def test_file_values_keep_their_yaml_types(tmp_path):
    """OmegaConf would read these as 'False' and 3; a config refuses them instead of guessing."""
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  resume: no\n")
    assert "train.resume=False (bool): expected str (quote it to make it a string)" in error_of([], path)
    path.write_text("train:\n  max_steps: '3'\n")
    assert "train.max_steps='3' (str): expected int" in error_of([], path)


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("loss.feature_los=cka", "loss.feature_loss"),
        ("los.alpha=1", "loss.alpha"),
        ("max_steps=3", "train.max_steps"),  # right field, missing section
        ("train.max_steps.x=3", "train.max_steps"),
    ],
)
def test_unknown_override_suggests(override, suggestion):
    message = error_of([override])
    assert "unknown config key" in message and f"did you mean {suggestion!r}" in message
    assert override in message  # names the override


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=abc", "train.max_steps='abc' (str): expected int"),
        ("train.max_steps=2.5", "train.max_steps=2.5 (float): expected int"),
        ("importance.recompute=1", "importance.recompute=1 (int): expected bool"),
        ("train.betas=[0.9]", "train.betas=[0.9] (list): expected tuple[float, float]"),
        ("train.lr=nan", "expected float"),
        ("loss.feature_loss=cak", "expected flexkd | projector | cka | none; did you mean 'cka'?"),
        ("model.teacher_arch=5", "model.teacher_arch=5 (int): expected dict | null"),
        ("noequals", "is not key=value"),
    ],
)
def test_wrong_type_names_key_value_and_type(override, expected):
    assert expected in error_of([override])


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match=r"train\.max_steps='5' \(str\): expected int"):
        C.TrainConfig(max_steps="5")
    assert C.LossConfig(alpha=1).alpha == 1.0
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        DistillConfig.from_dict({"train": {"bogus": 1}})


def test_replace_validates_and_accepts_dotted_keys():
    cfg = DistillConfig()
    new = cfg.replace(**{"train.max_steps": 5, "loss.feature_loss": "cka"}, seed=3)
    assert (new.train.max_steps, new.loss.feature_loss, new.seed, cfg.train.max_steps) == (5, "cka", 3, 24)
    assert cfg.replace(train=C.TrainConfig(lr=1e-3)).train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.max_steps must be >= 1"):
        cfg.replace(**{"train.max_steps": 0})


# ---------------------------------------------------------------------------------- combination checks
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.teacher=null"], "exactly one of model.teacher (pretrained) and model.teacher_arch"),
        (["model.teacher_arch={hidden_size: 512}", "model.teacher=t"], "got both"),
        (["model.student=s", "model.student_arch.num_layers=2"], "exactly one of model.student"),
        (["model.student_arch=null"], "got neither"),
        (["model.teacher=t.gguf", "model.teacher_gguf_file=q.gguf"], "model.teacher_gguf_file='q.gguf'"),
        (["model.student_gguf_file=q.gguf"], "model.student_gguf_file"),
        (["model.student_arch.num_layers=0"], "model.student_arch.num_layers must be a positive int"),
        (
            ["model.student_arch={from_teacher: true, hidden_size: 256, num_heads: 4, num_kv_heads: 3}"],
            "not a multiple of model.student_arch.num_kv_heads=3",
        ),
        (["model.student_arch.vocab_size=10"], "from_teacher student shares the teacher's tokenizer"),
        (["model.teacher_arch={hidden_size: 64}"], "d_S=432 of the teacher's d_T=64"),
        (["data.max_prompt_length=256"], "data.max_prompt_length=256 leaves no room"),
        (["loss.alpha=0", "loss.beta=0", "loss.lm_weight=0"], "every loss term is off"),
        (["loss.feature_loss=none", "loss.logit_loss=none", "loss.lm_weight=0"], "every loss term is off"),
        (["loss.alpha=-0.1"], "loss.alpha must be >= 0; got -0.1"),
        (["loss.temperature=0"], "loss.temperature must be > 0"),
        (["loss.skew=1.5"], "loss.skew must be <= 1"),
        (["loss.jsd_beta=-0.1"], "loss.jsd_beta must be >= 0"),
        (["loss.logit_loss=skew_rkl", "loss.skew=1"], "identically zero"),
        (["importance.num_examples=0"], "importance.num_examples must be > 0 or -1"),
        (["importance.num_examples=-2"], "importance.num_examples must be >= -1"),
        (["train.global_batch_size=6"], "train.global_batch_size=6 is not a multiple"),
        (["train.betas=[0.9, 1.0]"], "train.betas must be < 1"),
        (["train.min_lr_ratio=2"], "train.min_lr_ratio must be <= 1"),
        (["data.valid=null", "train.eval_every=10"], "train.eval_every=10 needs a validation set"),
        (["train.resume= "], "train.resume=None"),
        (["output_dir=''"], "output_dir must not be empty"),
        (["seed=-1"], "seed must be >= 0"),
        (["model.student_init=pretrained"], "model.student_init=pretrained needs model.student"),
        (["model.student_init=pruned", "model.student=s"], "model.student_init=pruned builds the student"),
        (["model.student_init=pruned", "model.student_arch.from_teacher=false"], "needs from_teacher: true"),
        (["model.student_init=prune"], "did you mean 'pruned'"),
        (["prune.num_layers=0"], "prune.num_layers must be >= 1"),
    ],
)
def test_combination_and_range_checks(overrides, expected):
    message = error_of(overrides)
    assert expected in message
    assert "(override #" in message  # says which override is behind it


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.feature_loss=none"],  # alpha > 0 but unused: fine, silently
        ["loss.feature_loss=none", "loss.alpha=0", "loss.logit_loss=none", "loss.beta=0"],  # lm only
        ["loss.correlation_scope=global"],
        ["loss.logit_loss=skew_fkl", "loss.skew=1", "loss.beta=0"],  # the zero term is off anyway
        ["importance.num_examples=-1", "train.global_batch_size=8", "train.grad_accum=2"],
        ["model.teacher_arch={hidden_size: 512, num_heads: 8}"],  # displaces the default teacher
        ["model.student=s"],  # displaces the default student_arch
        ["data.valid=v.jsonl", "train.eval_every=10"],
        ["train.warmup_steps=1000"],  # more than max_steps: capped by the scheduler, not an error
        ["model.student_init=pruned", "prune.num_layers=20", "prune.intermediate_size=512"],
        # a recipe's global correlation stays valid when one switch changes the method (cka ignores it)
        ["loss.correlation_scope=global", "loss.feature_loss=cka"],
    ],
)
def test_valid_combinations(overrides):
    load_config(None, overrides)


# ---------------------------------------------------------------------------------- help and the CLI
def test_config_help_lists_every_field():
    text = C.config_help()
    keys = leaf_keys()
    assert len(keys) == 84  # 3 top-level + 9 + 17 + 14 + 6 + 5 + 3 + 19 + 3 + 2 (classify) + 3 (seq2seq)
    for key in keys:
        assert f"  {key}: " in text, key
    assert "train.max_steps: int = 24  (>= 1)" in text
    assert "loss.feature_loss: flexkd | projector | cka | none = flexkd" in text
    for section in ("model:", "data:", "loss:", "importance:", "prune:", "teacher_cache:", "train:", "deepspeed:"):
        assert f"\n{section}" in text


def test_parse_args(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_steps: 7\n")
    cfg = C.parse_args(["--config", str(path), "train.lr=0.01", "--local_rank=0"], prog="distill")
    assert (cfg.train.max_steps, cfg.train.lr) == (7, 0.01)
    help_text = C.build_arg_parser("distill", "d").format_help()
    assert "model.student_arch" in help_text and "model.student_arch.hidden_size=16" in help_text
    cfg, extra = C.parse_args(
        ["--compare", "a.safetensors", "seed=1"], extra_args=[("--compare", "other file")]
    )
    assert (cfg.seed, vars(extra)) == (1, {"compare": "a.safetensors"})
    assert vars(C.parse_args([], extra_args=[("--compare", "x")])[1]) == {"compare": None}
    with pytest.raises(SystemExit) as info:
        C.parse_args(["loss.feature_los=cka"], prog="distill")
    assert info.value.code == 2 and "did you mean 'loss.feature_loss'" in capsys.readouterr().err


def test_resolve_path_prefers_cwd_then_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert C.resolve_path("ds_configs/student_zero2.json", "k") == ROOT / "ds_configs/student_zero2.json"
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs/student_zero2.json").write_text("{}")
    assert C.resolve_path("ds_configs/student_zero2.json", "k") == tmp_path / "ds_configs/student_zero2.json"
    message = error_of(["deepspeed.student_config=ds_configs/missing.json"])
    assert "deepspeed.student_config" in message
    assert (
        str(tmp_path / "ds_configs/missing.json") in message
        and str(ROOT / "ds_configs/missing.json") in message
    )


def test_quickstart_recipe_is_the_builtin_default():
    """launch/recipes/quickstart.yaml documents the no-config job; it must not drift from the defaults."""
    assert load_config(ROOT / "launch" / "recipes" / "quickstart.yaml") == load_config()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load(recipe, tmp_path):
    cfg = load_config(recipe)
    assert load_config(C.dump_yaml(cfg, tmp_path)) == cfg
    for path in (cfg.deepspeed.teacher_config, cfg.deepspeed.student_config):
        ds = D.fill_batch_sizes(D.load_ds_config(path), micro_batch_size=1, grad_accum=1, world_size=1)
        D.resolve_precision(ds, "cuda", cfg.model.dtype)  # recipes target GPUs


# --------------------------------------------------------------------------------- DeepSpeed dicts
@pytest.fixture(scope="module")
def DeepSpeedConfig():  # noqa: N802 - the class under test
    return pytest.importorskip("deepspeed.runtime.config").DeepSpeedConfig


def test_all_ds_configs_are_covered():
    names = {p.name for p in DS_FILES}
    expected = {"teacher_zero3", "teacher_zero3_offload", "student_zero0", "student_zero1", "student_zero2", "student_zero3"}
    assert {f"{n}.json" for n in expected | {"student_zero3_offload"}} <= names


@pytest.mark.parametrize("path", DS_FILES, ids=[p.name for p in DS_FILES])
def test_ds_config_is_accepted_by_deepspeed(path, DeepSpeedConfig):
    ds = D.load_ds_config(path)
    stage = D.zero_stage(ds)
    assert stage == (0 if path.stem == "teacher_replicated" else int(path.stem.split("zero")[1][0]))
    assert ds["bf16"] == {"enabled": "auto"} and ds["wall_clock_breakdown"] is False
    assert not {"optimizer", "gradient_clipping", *D.BATCH_KEYS} & set(ds)
    zero = ds["zero_optimization"]
    if path.stem.startswith("teacher"):
        assert stage == (0 if path.stem == "teacher_replicated" else 3)
    if path.stem.startswith("student_zero3"):
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in path.stem:
        offload = zero["offload_param" if path.stem.startswith("teacher") else "offload_optimizer"]
        assert offload == {"device": "cpu", "pin_memory": True}
    filled = D.fill_batch_sizes(ds, micro_batch_size=2, grad_accum=3, world_size=1)
    for device, bf16 in (("cpu", False), ("cuda", True)):
        resolved = D.resolve_precision(filled, device)
        assert resolved["bf16"]["enabled"] is bf16 and "fp16" not in resolved
        parsed = DeepSpeedConfig(resolved)  # no process group: DeepSpeed falls back to world size 1
        assert parsed.world_size == 1 and parsed.train_batch_size == 6
        assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 3
        assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled is bf16


def test_deepspeed_silently_drops_auto(DeepSpeedConfig):
    # Why resolve_precision exists: DeepSpeed reads "auto" as "use the default" (off), not as an error.
    ds = D.fill_batch_sizes({"bf16": {"enabled": "auto"}}, micro_batch_size=1, grad_accum=1, world_size=1)
    assert DeepSpeedConfig(ds).bfloat16_config.enabled is False


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"train_batch_size": 8}, "batch sizes come from train.* — remove them from"),
        ({"gradient_accumulation_steps": 2}, "batch sizes come from train.*"),
        ({"gradient_clipping": 1.0}, "'gradient_clipping' comes from train.grad_clip"),
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' comes from train.lr"),
        ({"zero_optimisation": {"stage": 2}}, "did you mean ['zero_optimization']"),
        (
            {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
            "zero_optimization.reduce_bucket_size",
        ),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be 0-3"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_load_ds_config_refuses(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as info:
        D.load_ds_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_load_ds_config_parse_error_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"bf16": {"enabled": true},}')
    with pytest.raises(ConfigError, match="cannot parse .*broken.json"):
        D.load_ds_config(path)


def test_fill_batch_sizes():
    base = {"zero_optimization": {"stage": 2}}
    filled = D.fill_batch_sizes(base, micro_batch_size=4, grad_accum=2, world_size=8, global_batch_size=64)
    assert filled["train_batch_size"] == 64 and filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 2 and base == {"zero_optimization": {"stage": 2}}
    filled["zero_optimization"]["stage"] = 3
    assert base["zero_optimization"]["stage"] == 2  # a deep copy
    assert (
        D.fill_batch_sizes(filled, micro_batch_size=4, grad_accum=2, world_size=8)["train_batch_size"] == 64
    )
    with pytest.raises(ValueError) as info:
        D.fill_batch_sizes(base, micro_batch_size=4, grad_accum=2, world_size=3, global_batch_size=32)
    for number in ("global_batch_size=32", "micro_batch_size=4", "grad_accum=2", "world_size=3", "= 24"):
        assert number in str(info.value)
    with pytest.raises(ValueError, match="already holds other batch sizes"):
        D.fill_batch_sizes(filled, micro_batch_size=1, grad_accum=2, world_size=8)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        D.fill_batch_sizes(base, micro_batch_size=1, grad_accum=1, world_size=0)


def test_resolve_precision():
    auto = {"bf16": {"enabled": "auto"}}
    assert D.resolve_precision(auto, "cpu") == {"bf16": {"enabled": False}}
    assert D.resolve_precision(auto, "cuda") == {"bf16": {"enabled": True}}
    assert D.resolve_precision(auto, "cpu", "bf16") == {"bf16": {"enabled": True}}
    assert D.resolve_precision(auto, "cuda", "fp16") == {
        "bf16": {"enabled": False},
        "fp16": {"enabled": True},
    }
    assert D.resolve_precision({}, "cuda") == {"bf16": {"enabled": True}}
    assert D.resolve_precision({"bf16": {"enabled": True}}, "cpu") == {"bf16": {"enabled": True}}  # file wins
    assert auto == {"bf16": {"enabled": "auto"}}  # input untouched
    with pytest.raises(ValueError, match="model.dtype=fp32 contradicts bf16.enabled=True"):
        D.resolve_precision({"bf16": {"enabled": True}}, "cuda", "fp32")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        D.resolve_precision(auto, "cpu", "fp16")
    with pytest.raises(ValueError, match="both true"):
        D.resolve_precision({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "cuda")
    with pytest.raises(ValueError, match='true, false or "auto"'):
        D.resolve_precision({"bf16": {"enabled": "yes"}}, "cuda")


def test_zero_stage():
    assert D.zero_stage({}) == 0 and D.zero_stage({"zero_optimization": {"stage": 3}}) == 3


def test_student_init_resolves_and_a_pretrained_student_displaces_its_default():
    assert load_config(None).model.resolved_student_init == "pruned"
    assert load_config(None, ["model.student=s"]).model.resolved_student_init == "pretrained"
    assert load_config(None, ["model.student_arch.hidden_size=288"]).model.resolved_student_init == "pruned"
    sizes = "model.student_arch={from_teacher: true, hidden_size: 256, num_layers: 8}"  # a random student's
    assert load_config(None, [sizes]).model.resolved_student_init == "random"
    assert load_config(None, [sizes, "model.student_init=pruned"]).model.resolved_student_init == "pruned"
    cfg = load_config(None, ["model.student_init=pruned"])
    assert cfg.model.resolved_student_init == "pruned" and cfg.prune.resolved_dir("o") == Path(
        "o/pruned_student"
    )


def test_a_config_with_its_own_data_gets_dataset_responses_and_a_holdout_of_it(tmp_path):
    """The quickstart's teacher-written responses and held-out prompts are defaults for builtin:prompts only;
    one's own dataset gets validation on by default: a held-out slice of it (data.valid=holdout)."""
    cfg = load_config(None, ["data.train=mine.jsonl"])
    assert (cfg.data.responses, cfg.data.valid, cfg.data.valid_holdout) == ("dataset", "holdout", 64)
    assert load_config(None, ["data.train=mine.jsonl", "data.valid=null"]).data.valid is None
    cfg = load_config(None, ["data.train=mine.jsonl", "data.responses=teacher", "data.valid=v.jsonl"])
    assert (cfg.data.responses, cfg.data.valid) == ("teacher", "v.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: builtin:synthetic\n")
    assert (load_config(recipe).data.responses, load_config(recipe).data.valid) == ("dataset", None)
    with pytest.raises(ConfigError, match="builtin:prompts has no responses: set data.responses=teacher"):
        load_config(None, ["data.responses=dataset"])
