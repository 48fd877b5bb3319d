"""Dry run before the queue: will this recipe fit on N nodes x G GPUs, and if not, what to change?

``plan(cfg, nodes=, gpus_per_node=, gpu_mem_gib=)`` resolves the teacher and student configs without
network (shipped ``model_configs/<org>--<name>.json`` for a hub name, else a local directory's config.json or
GGUF metadata, else ``model.*_arch``), builds both models on the meta device (no weights), validates the pair
and the batch layout, estimates per-GPU memory with ``flexkd_ds.runtime.memory`` from the recipe's DeepSpeed files,
and, when it does not fit, tries the changes in order of cost: a smaller micro-batch, more GPUs, sharding /
offload, a shorter ``data.max_length``. With ``teacher_cache.dir`` (an offline teacher cache, read by some
loss) the teacher's terms are its LM head and one batch of cached LM-head inputs instead of its ZeRO-3 shard,
gathers and forward, and the report gives the cache's size on disk. ``launch/plan.py`` is the command line;
docs/planning.md explains the report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from flexkd_ds.inputs import models
from flexkd_ds.inputs.config import DistillConfig
from flexkd_ds.method.fused_logits import default_chunk_rows
from flexkd_ds.runtime import memory
from flexkd_ds.runtime.ds_config import load_ds_config, resolve_precision
from flexkd_ds.runtime.memory import GIB, ModelShape, Workload, ZeroSetup

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "inputs" / "model_configs"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LARGE_GGUF_PARAMS = 1_000_000_000
EXIT_FITS, EXIT_INVALID, EXIT_DOES_NOT_FIT = 0, 1, 2
TEACHER_OFFLOAD, STUDENT_ZERO3 = "ds_configs/teacher_zero3_offload.json", "ds_configs/student_zero3.json"
TEACHER_ZERO3, TEACHER_REPLICATED = "ds_configs/teacher_zero3.json", "ds_configs/teacher_replicated.json"
STUDENT_OFFLOAD = "ds_configs/student_zero3_offload.json"
MAX_EXTRA_NODES = 256
GENERATED_TRAIN = ("builtin:synthetic", "builtin:prompts")  # data.num_synthetic examples, known without data
CACHE_DTYPE_BYTES = {"bf16": 2, "fp32": 4}  # teacher_cache.dtype: the stored element


class PlanError(ValueError):
    """The recipe cannot be planned (unknown model, bad arch); the message names the option."""


# ------------------------------------------------------------------------------------ model configs
def shipped_config_path(name: str) -> Path | None:
    """``model_configs/<org>--<name>.json`` for a hub name (``gpt2`` finds ``openai-community--gpt2``)."""
    if name.lower() == models.SMOLLM2_NAME:
        name = SMOLLM2_HUB_NAME
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    exact = MODEL_CONFIG_DIR / f"{name.replace('/', '--')}.json"
    if exact.is_file():
        return exact
    matches = sorted(MODEL_CONFIG_DIR.glob(f"*--{name}.json")) if "/" not in name else []
    return matches[0] if len(matches) == 1 else None


def load_shipped_config(path: Path) -> PretrainedConfig:
    raw = json.loads(path.read_text(encoding="utf-8"))
    name = raw.pop("_name_or_path", path.stem.replace("--", "/"))
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config._name_or_path = name
    return config


@dataclass(frozen=True)
class ResolvedModel:
    role: str  # "teacher" | "student"
    name: str
    origin: str  # where the config came from, for the report
    config: PretrainedConfig
    local_dir: str | None = None  # a local HF directory (its tokenizer can be compared)
    gguf: bool = False


def _pretrained(role: str, name: str, gguf_file: str | None) -> ResolvedModel:
    key = f"model.{role}"
    shipped = shipped_config_path(name) if gguf_file is None else None
    if shipped is not None:
        gguf = name.lower() == models.SMOLLM2_NAME
        return ResolvedModel(role, name, f"shipped {shipped.name}", load_shipped_config(shipped), gguf=gguf)
    path = Path(name).expanduser()
    if path.exists():
        source = models.resolve_model_source(name, gguf_file)
        origin = "GGUF metadata" if source.gguf_file else f"{path}/config.json"
        local_dir = source.path_or_name if source.kind == "local_dir" else None
        return ResolvedModel(
            role, name, origin, models.load_config(source), local_dir, bool(source.gguf_file)
        )
    have = ", ".join(p.stem.replace("--", "/") for p in sorted(MODEL_CONFIG_DIR.glob("*.json")))
    raise PlanError(
        f"{key}={name!r}: the planner works offline and has no config for it (shipped: {have}); pass a local "
        f"directory with its config.json, e.g. {key}=/path/to/model"
    )


def resolve_models(cfg: DistillConfig) -> tuple[ResolvedModel, ResolvedModel]:
    """Teacher and student configs: shipped config, local dir / GGUF, else ``model.*_arch`` (random)."""
    m = cfg.model
    if m.teacher is not None:
        teacher = _pretrained("teacher", m.teacher, m.teacher_gguf_file)
    else:
        arch = dict(m.teacher_arch)
        try:
            t_config = models.tiny_config(arch.pop("family", "llama"), **arch)
        except (TypeError, ValueError) as e:
            raise PlanError(f"model.teacher_arch: {e}") from None
        teacher = ResolvedModel("teacher", "random teacher", "model.teacher_arch", t_config)
    if m.student is not None:
        return teacher, _pretrained("student", m.student, m.student_gguf_file)
    arch = dict(m.student_arch)
    try:
        if m.resolved_student_init == "pruned":
            from flexkd_ds.method.prune import planned_config

            s_config = planned_config(
                teacher.config, arch["hidden_size"], cfg.prune.num_layers, cfg.prune.intermediate_size
            )
            return teacher, ResolvedModel(
                "student", "pruned student", "cut from the teacher (prune.*)", s_config
            )
        if arch.pop("from_teacher", False):
            s_config, origin = models.narrow_student_config(teacher.config, **arch), "narrowed teacher config"
        else:
            s_config, origin = models.tiny_config(arch.pop("family", "llama"), **arch), "model.student_arch"
    except (TypeError, ValueError) as e:
        raise PlanError(f"model.student_arch: {e}") from None
    return teacher, ResolvedModel("student", "random student", origin, s_config)


def model_shape(config: PretrainedConfig, name: str, task: str = "causal_lm", num_labels: int = 0) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and read off what the planner needs.
    Cached per (name, config): tests and repeated plans of one recipe build each model once.

    ``task``: the model class (``AutoModelForCausalLM``, ``...ForSequenceClassification`` with ``num_labels``
    outputs, ``...ForSeq2SeqLM``). A classifier's "vocabulary" is its classes (the rows of its head, what the
    logit and supervised terms are over); an encoder-decoder's layers are both stacks'."""
    return _model_shape(name, config.to_json_string(use_diff=False), task, num_labels)


@functools.lru_cache(maxsize=32)
def _model_shape(name: str, config_json: str, task: str = "causal_lm", num_labels: int = 0) -> ModelShape:
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    raw = json.loads(config_json)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    if task == "classification":
        config.num_labels = num_labels
    auto = {"classification": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM}
    with torch.device("meta"):
        model = auto.get(task, AutoModelForCausalLM).from_config(config)
    tensors = list(model.parameters())  # unique: a tied embedding / LM head counts once
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    ffn = next((getattr(text, k) for k in ("intermediate_size", "ffn_dim", "n_inner") if getattr(text, k, None)),
               4 * hidden)  # fmt: skip
    dropout = any((getattr(text, k, 0) or 0) > 0 for k in ("dropout", "resid_pdrop", "hidden_dropout"))
    gated = any("gate" in n.rsplit(".", 1)[-1] for n, _ in model.named_modules())
    layers = int(text.num_hidden_layers)
    if getattr(text, "is_encoder_decoder", False):  # both stacks (BART: encoder_layers + decoder_layers)
        layers = int(getattr(text, "encoder_layers", layers)) + int(getattr(text, "decoder_layers", layers))
    return ModelShape(
        name=name, model_type=str(getattr(text, "model_type", "?")), params=sum(p.numel() for p in tensors),
        tensor_numels=tuple(p.numel() for p in tensors), largest_module_params=largest, hidden_size=hidden,
        head_input_size=models.lm_head_input_size(config), num_layers=layers,
        num_heads=heads, kv_dim=kv_heads * head_dim, ffn_dim=int(ffn), gated_mlp=gated, dropout=dropout,
        vocab_size=num_labels if task == "classification" else models.vocab_size(model),
        max_positions=models.max_positions(config),
    )  # fmt: skip


# --------------------------------------------------------------------------------------- validation
def check_pair(cfg: DistillConfig, teacher: ResolvedModel, student: ResolvedModel, t: ModelShape,
               s: ModelShape) -> tuple[list[str], list[str], list[str]]:  # fmt: skip
    """(errors, warnings, checks passed) of the pair; every error names the option to change."""
    errors, warnings, checks = [], [], []
    loss = cfg.loss
    logit_kd = loss.logit_loss != "none" and loss.beta > 0
    if logit_kd and t.vocab_size != s.vocab_size:
        errors.append(
            f"model.student: vocab size {s.vocab_size} != the teacher's {t.vocab_size} (model.teacher), but "
            f"loss.logit_loss={loss.logit_loss} compares distributions over one vocabulary; pick a student "
            "with the teacher's tokenizer, or set loss.beta=0"
        )
    elif logit_kd:
        checks.append(f"vocab sizes equal ({t.vocab_size})")
    if loss.feature_loss == "flexkd":
        if s.head_input_size >= t.head_input_size:
            errors.append(
                f"model.student: d_S={s.head_input_size} >= d_T={t.head_input_size}, but loss.feature_loss="
                "flexkd selects d_S of the teacher's d_T units; pick a narrower student or set "
                "loss.feature_loss=projector (or cka)"
            )
        else:
            checks.append(f"student narrower (d_S={s.head_input_size} < d_T={t.head_input_size})")
    if cfg.model.tokenizer is not None:
        checks.append(f"one tokenizer for both (model.tokenizer={cfg.model.tokenizer})")
    elif t.model_type == s.model_type:
        checks.append(f"same tokenizer family (model_type {t.model_type})")
    elif teacher.local_dir and student.local_dir:
        same = (AutoTokenizer.from_pretrained(teacher.local_dir).get_vocab()
                == AutoTokenizer.from_pretrained(student.local_dir).get_vocab())  # fmt: skip
        if not same:
            errors.append(f"model.student: its tokenizer differs from the teacher's ({student.local_dir} vs "
                          f"{teacher.local_dir}); both models read the same input ids")  # fmt: skip
        else:
            checks.append("same tokenizer vocabulary (local tokenizers compared)")
    else:
        warnings.append(
            f"model_type differs (teacher {t.model_type}, student {s.model_type}): tokenizer agreement cannot be "
            "checked offline, and distill.py feeds both models the teacher's token ids; make sure the student "
            "was trained with the teacher's tokenizer"
        )
    limits = {f"model.{r}": p for r, p in (("teacher", t.max_positions), ("student", s.max_positions)) if p}
    too_short = {k: p for k, p in limits.items() if cfg.data.max_length > p}
    if too_short:
        errors.append(
            f"data.max_length={cfg.data.max_length} exceeds the positions of "
            + ", ".join(f"{k} ({p})" for k, p in too_short.items())
            + f"; set data.max_length<={min(limits.values())}"
        )
    else:
        checks.append(f"data.max_length {cfg.data.max_length} within positions {limits or '(no limit)'}")
    if teacher.gguf and t.params > LARGE_GGUF_PARAMS:
        warnings.append(
            f"model.teacher is a GGUF checkpoint with {t.params / 1e9:.1f} B parameters: every rank loads it "
            "whole before DeepSpeed shards it (DESIGN.md); use a Hugging Face checkpoint for large teachers"
        )
    return errors, warnings, checks


def batch_layout(cfg: DistillConfig, world: int, micro: int | None = None) -> tuple[int | None, str | None]:
    """(grad_accum on ``world`` ranks, error); None accum when ``train.global_batch_size`` cannot be split."""
    t = cfg.train
    micro = micro or t.micro_batch_size
    if t.global_batch_size is None:
        return t.grad_accum, None
    if t.global_batch_size % (micro * world):
        return None, (
            f"train.global_batch_size={t.global_batch_size} is not micro_batch_size {micro} x grad_accum x "
            f"{world} GPUs for any grad_accum; use a world size dividing {t.global_batch_size // micro}, or "
            "change train.global_batch_size / train.micro_batch_size"
        )
    return t.global_batch_size // (micro * world), None


# ----------------------------------------------------------------------------------------- planning
@dataclass
class Scenario:
    """One configuration to estimate: the recipe, or a suggested change of it."""

    micro: int
    seq_len: int
    nodes: int
    teacher_ds: str
    student_ds: str

    def overrides(self, base: Scenario) -> list[str]:
        diff = {"train.micro_batch_size": (self.micro, base.micro), "data.max_length": (self.seq_len, base.seq_len),
                "deepspeed.teacher_config": (self.teacher_ds, base.teacher_ds),
                "deepspeed.student_config": (self.student_ds, base.student_ds)}  # fmt: skip
        out = [f"{k}={new}" for k, (new, old) in diff.items() if new != old]
        return out + ([f"--nodes {self.nodes}"] if self.nodes != base.nodes else [])


@dataclass
class PlanReport:
    """The planner's answer; ``to_dict()`` is the ``--json`` output."""

    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    models: dict[str, dict] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    required_overrides: list[str] = field(default_factory=list)
    setup: dict = field(default_factory=dict)
    memory_gib: dict[str, float] = field(default_factory=dict)
    cpu_per_node_gib: dict[str, float] = field(default_factory=dict)
    totals_gib: dict[str, float] = field(default_factory=dict)
    fits: bool | None = None
    suggestions: list[dict] = field(default_factory=list)
    before_training: list[str] = field(default_factory=list)  # what the prune / response passes need
    teacher_cache: dict = field(default_factory=dict)  # teacher_cache.dir in use: its disk size, the head
    teacher_placement: dict = field(
        default_factory=dict
    )  # ZeRO-3 vs replicated: memory, bytes gathered, advice

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_INVALID
        return EXIT_FITS if self.fits else EXIT_DOES_NOT_FIT

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "world_size": self.world, "exit_code": self.exit_code}


class _Planner:
    """Estimates scenarios of one recipe (shapes and DeepSpeed files loaded once)."""

    def __init__(
        self, cfg: DistillConfig, t: ModelShape, s: ModelShape, gpus_per_node: int, gpu_mem_gib: float
    ):
        self.cfg, self.t, self.s, self.g, self.gpu_mem = cfg, t, s, gpus_per_node, gpu_mem_gib
        self.cached = uses_teacher_cache(cfg)
        self._zero: dict[str, ZeroSetup] = {}

    def zero(self, path: str, key: str) -> ZeroSetup:
        if path not in self._zero:
            ds = resolve_precision(load_ds_config(path, key), "cuda", self.cfg.model.dtype)
            half = any((ds.get(name) or {}).get("enabled") for name in ("bf16", "fp16"))
            self._zero[path] = ZeroSetup.from_ds_dict(ds, 2 if half else 4)
        return self._zero[path]

    def estimate(self, sc: Scenario) -> memory.MemoryEstimate:
        loss, imp = self.cfg.loss, self.cfg.importance
        work = Workload(
            micro_batch=sc.micro, seq_len=sc.seq_len, logit_kd=loss.logit_loss != "none" and loss.beta > 0,
            lm_loss=loss.lm_weight > 0, feature_width=self.s.head_input_size if loss.feature_loss != "none" else 0,
            importance_batch=imp.batch_size, chunk_tokens=imp.chunk_tokens,
            needs_teacher=loss.feature_loss != "none" or (loss.logit_loss != "none" and loss.beta > 0),
            importance_pass=loss.feature_loss == "flexkd", cached_teacher=self.cached,
            fused_logits=loss.fused_logits, logit_chunk_rows=default_chunk_rows(self.s.vocab_size),
        )  # fmt: skip
        t_zero = self.zero(sc.teacher_ds, "deepspeed.teacher_config")
        s_zero = self.zero(sc.student_ds, "deepspeed.student_config")
        return memory.estimate(self.t, self.s, t_zero, s_zero, work, sc.nodes * self.g, self.g)

    def required(self, est: memory.MemoryEstimate) -> float:
        return est.peak + memory.reserve_bytes(self.gpu_mem)

    def fits(self, sc: Scenario) -> bool:
        return (batch_layout(self.cfg, sc.nodes * self.g, sc.micro)[0] is not None
                and self.required(self.estimate(sc)) <= self.gpu_mem * GIB)  # fmt: skip

    def suggest(self, base: Scenario) -> list[dict]:
        """The cheapest change of each kind that fits, in order of cost."""
        out: list[dict] = []

        def add(kind: str, sc: Scenario, why: str) -> None:
            est = self.estimate(sc)
            accum = batch_layout(self.cfg, sc.nodes * self.g, sc.micro)[0]
            change = sc.overrides(base) + (
                [f"train.grad_accum={accum}"] if accum != self.cfg.train.grad_accum else []
            )
            prompt = self.cfg.data.max_prompt_length
            if prompt is not None and prompt >= sc.seq_len:  # DataConfig needs max_prompt_length < max_length
                change.append(f"data.max_prompt_length={sc.seq_len // 2}")
            cpu = est.cpu_total_per_node / GIB
            out.append({"kind": kind, "change": change, "required_gib": self.required(est) / GIB,
                        "cpu_per_node_gib": cpu, "why": why})  # fmt: skip

        smaller = [dataclasses.replace(base, micro=m) for m in range(base.micro - 1, 0, -1)]
        if hit := next((sc for sc in smaller if self.fits(sc)), None):
            add("smaller micro-batch", hit, "activations and logits scale with the micro-batch")
        more = [
            dataclasses.replace(base, nodes=n) for n in range(base.nodes + 1, base.nodes + MAX_EXTRA_NODES)
        ]
        if hit := next((sc for sc in more if self.fits(sc)), None):
            add("more GPUs", hit, f"world {hit.nodes * self.g}: the shards shrink as 1/world")
        variants = [(base.teacher_ds, STUDENT_ZERO3, "shard the student's parameters too (ZeRO-3)"),
                    (TEACHER_OFFLOAD, base.student_ds, "teacher parameters to CPU (offload_param)"),
                    (base.teacher_ds, STUDENT_OFFLOAD, "student ZeRO-3 + optimizer states to CPU"),
                    (TEACHER_OFFLOAD, STUDENT_OFFLOAD, "both offloads")]  # fmt: skip
        if self.cached:  # no teacher parameters on the GPU: offloading them changes nothing
            variants = [v for v in variants if v[0] == base.teacher_ds]
        for t_ds, s_ds, why in variants:
            sc = dataclasses.replace(base, teacher_ds=t_ds, student_ds=s_ds)
            if (t_ds, s_ds) != (base.teacher_ds, base.student_ds) and self.fits(sc):
                add("shard / offload", sc, why)
                break
        shorter = [dataclasses.replace(base, seq_len=n) for n in range(base.seq_len - 64, 63, -64)]
        if hit := next((sc for sc in shorter if self.fits(sc)), None):
            add("shorter max_length", hit, "activations and logits scale with the sequence length")
        if not out:
            teacher_ds = base.teacher_ds if self.cached else TEACHER_OFFLOAD
            floor = dataclasses.replace(base, micro=1, teacher_ds=teacher_ds, student_ds=STUDENT_OFFLOAD)
            combos = [
                dataclasses.replace(floor, nodes=n) for n in range(base.nodes, base.nodes + MAX_EXTRA_NODES)
            ]
            if hit := next((sc for sc in combos if self.fits(sc)), None):
                add("combined", hit, "no single change fits; micro-batch 1, both offloads and enough GPUs do")
        return out


def plan(cfg: DistillConfig, *, nodes: int, gpus_per_node: int, gpu_mem_gib: float = 80.0) -> PlanReport:
    """Plan ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of ``gpu_mem_gib`` GiB each (see the module doc)."""
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if type(value) is not int or value < 1:
            raise PlanError(f"{name} must be a positive integer; got {value!r}")
    if not gpu_mem_gib > 0:
        raise PlanError(f"--gpu-mem-gb must be > 0; got {gpu_mem_gib!r}")
    report = PlanReport(nodes, gpus_per_node, float(gpu_mem_gib))
    teacher, student = resolve_models(cfg)
    num_labels = task_labels(cfg)
    t = model_shape(teacher.config, teacher.name, cfg.task, num_labels)
    s = model_shape(student.config, student.name, cfg.task, num_labels)
    for rm, shape in ((teacher, t), (student, s)):
        report.models[rm.role] = {"name": rm.name, "config": rm.origin, "params": shape.params,
            "d_head_input": shape.head_input_size, "layers": shape.num_layers, "vocab": shape.vocab_size,
            "max_positions": shape.max_positions, "model_type": shape.model_type}  # fmt: skip
    report.errors, report.warnings, report.checks = check_pair(cfg, teacher, student, t, s)
    if cfg.task != "causal_lm":
        report.warnings.append(TASK_BOUNDS[cfg.task])
    if uses_teacher_cache(cfg):
        report.errors += check_cache(cfg, teacher)
    elif cfg.teacher_cache.dir is not None:
        report.warnings.append(
            f"teacher_cache.dir={cfg.teacher_cache.dir} is set but no loss reads the teacher (loss.alpha / "
            "loss.beta): distill does not use the cache"
        )

    accum, batch_error = batch_layout(cfg, report.world)
    if batch_error:
        report.errors.append(batch_error)
    elif accum != cfg.train.grad_accum:
        report.required_overrides.append(f"train.grad_accum={accum}")
    sequences = correlation_sequences(cfg, report.world)
    if sequences == 1:
        report.warnings.append(
            f"the Flex-KD correlation is centred over 1 sequence (loss.correlation_scope="
            f"{cfg.loss.correlation_scope}, train.micro_batch_size={cfg.train.micro_batch_size}, {report.world} "
            "rank(s)): its batch statistics are one sequence's tokens; the paper centres over its batch of 8. "
            "Set loss.correlation_scope=global (over all ranks' micro-batches) or a larger train.micro_batch_size"
        )
    planner = _Planner(cfg, t, s, gpus_per_node, gpu_mem_gib)
    base = Scenario(cfg.train.micro_batch_size, cfg.data.max_length, nodes,
                    cfg.deepspeed.teacher_config, cfg.deepspeed.student_config)  # fmt: skip
    est = planner.estimate(base)
    t_zero = planner.zero(base.teacher_ds, "deepspeed.teacher_config")
    s_zero = planner.zero(base.student_ds, "deepspeed.student_config")
    report.setup = {
        "correlation_sequences": sequences,
        "micro_batch_size": base.micro, "grad_accum": accum, "global_batch": accum and base.micro * accum * report.world,
        "seq_len": base.seq_len, "teacher_ds": base.teacher_ds, "student_ds": base.student_ds,
        "teacher_zero": dataclasses.asdict(t_zero), "student_zero": dataclasses.asdict(s_zero),
    }  # fmt: skip
    report.memory_gib = {k: v / GIB for k, v in est.gpu.items()}
    report.cpu_per_node_gib = {k: v / GIB for k, v in est.cpu_per_node.items()}
    reserve = memory.reserve_bytes(gpu_mem_gib)
    report.totals_gib = {k: v / GIB for k, v in (
        ("model_states", est.model_states), ("training_step", est.train_activations),
        ("importance_pass", est.importance_activations), ("peak", est.peak), ("reserve", reserve),
        ("required", est.peak + reserve), ("available", gpu_mem_gib * GIB))}  # fmt: skip
    report.fits = est.peak + reserve <= gpu_mem_gib * GIB
    if not report.fits and not report.errors:
        report.suggestions = planner.suggest(base)
    if planner.cached:
        report.teacher_cache = cache_storage(
            cfg, t, t_zero, nodes * gpus_per_node, gpus_per_node, gpu_mem_gib
        )
        if report.teacher_cache["build_required_gib"] > gpu_mem_gib:
            report.warnings.append(
                f"the cache build runs the teacher alone but needs {report.teacher_cache['build_required_gib']:.1f} "
                f"GiB per GPU: build it with deepspeed.teacher_config={TEACHER_OFFLOAD}, a smaller "
                "importance.batch_size or more GPUs (launch/cache_teacher.py)"
            )
    elif planner.estimate(base).gpu.keys() & {
        "teacher parameter shard",
        "teacher parameters (whole, ZeRO stage < 3)",
    }:
        report.teacher_placement = teacher_placement(planner, base, t, cfg.train.grad_accum)
    report.before_training = before_training(cfg, t, s, t_zero, gpu_mem_gib, report.teacher_cache)
    return report


TASK_BOUNDS = {
    "classification": "task=classification: the model states are exact (the classifier class); the step's "
    "buffers are planned as if every token had logits over the classes, and the feature terms as if every "
    "token were a feature row: upper bounds, since a classifier reads one row per example",
    "seq2seq": "task=seq2seq: the model states are exact (the seq2seq class, both stacks); activations are "
    "planned for both stacks at data.max_length tokens and the logit terms for data.max_length decoder tokens: "
    "upper bounds, since targets are at most seq2seq.max_target_length",
}


def task_labels(cfg: DistillConfig) -> int:
    """The classifier's outputs for task=classification (the preset's, or classify.num_labels), else 0."""
    if cfg.task != "classification":
        return 0
    from flexkd_ds.inputs import classification as cls_data

    try:
        return cls_data.resolve_source(cfg.data, cfg.classify).num_labels
    except ValueError as e:
        raise PlanError(str(e)) from None


def teacher_placement(planner: _Planner, base: Scenario, t: ModelShape, grad_accum: int) -> dict:
    """The live teacher sharded (ZeRO-3) or whole on every GPU (replicated): required GiB per GPU and the
    bytes each GPU receives in all-gathers per optimizer step (the whole non-persistent teacher once per
    micro-batch under ZeRO-3; none replicated), and which to use: replicated when it fits (no gathers), else
    ZeRO-3."""
    options = {}
    for name, path in (("zero3", TEACHER_ZERO3), ("replicated", TEACHER_REPLICATED)):
        sc = dataclasses.replace(base, teacher_ds=path)
        zero = planner.zero(path, "deepspeed.teacher_config")
        world = sc.nodes * planner.g
        gathered = 0.0
        if zero.stage == 3:
            persistent = t.persistent_params(zero.persistence_threshold)
            gathered = grad_accum * (t.params - persistent) * zero.param_bytes * (world - 1) / world
        options[name] = {"config": path, "required_gib": planner.required(planner.estimate(sc)) / GIB,
                         "fits": planner.fits(sc), "gathered_gib_per_step": gathered / GIB}  # fmt: skip
    pick = "replicated" if options["replicated"]["fits"] else "zero3"
    return {**options, "recommended": pick, "current": base.teacher_ds}


def correlation_sequences(cfg: DistillConfig, world: int) -> int | None:
    """How many sequences the Flex-KD correlation is centred over (None when flexkd is off): one micro-batch
    per rank (``local``) or the micro-batches of all ranks (``global``); never the accumulation window."""
    if cfg.loss.feature_loss != "flexkd" or cfg.loss.alpha <= 0:
        return None
    per_rank = cfg.train.micro_batch_size
    return per_rank * world if cfg.loss.correlation_scope == "global" else per_rank


# ------------------------------------------------------------------------------------- teacher cache
def uses_teacher_cache(cfg: DistillConfig) -> bool:
    """Whether distill reads the teacher from ``teacher_cache.dir``: a cache is set and some loss reads the
    teacher (``jobs/distill.py``: ``uses_feature or uses_logit``)."""
    loss = cfg.loss
    reads_teacher = (loss.feature_loss != "none" and loss.alpha > 0) or (
        loss.logit_loss != "none" and loss.beta > 0
    )
    return cfg.teacher_cache.dir is not None and reads_teacher


def check_cache(cfg: DistillConfig, teacher: ResolvedModel) -> list[str]:
    """What distill refuses with a teacher cache (``jobs.cache_teacher.refuse_live_only``: features that need
    the teacher's body), as the first such error; [] when none."""
    from flexkd_ds.jobs.cache_teacher import refuse_live_only
    from flexkd_ds.jobs.common import ModelSpec

    try:
        refuse_live_only(cfg, ModelSpec(teacher.name, teacher.config, None, cfg.seed))
    except ValueError as e:
        return [str(e)]
    return []


def known_examples(cfg: DistillConfig) -> tuple[int | None, str]:
    """(number of training examples or an upper bound of it, where it comes from); None when only the data
    knows (a dataset without ``data.max_train_rows``)."""
    d = cfg.data
    if d.train in GENERATED_TRAIN:
        return d.num_synthetic, f"data.num_synthetic, {d.train}"
    if d.max_train_rows is not None:
        return d.max_train_rows, "data.max_train_rows"
    return None, "unknown without the data"


def cache_storage(cfg: DistillConfig, t: ModelShape, t_zero: ZeroSetup, world: int, gpus_per_node: int,
                  gpu_mem_gib: float) -> dict:  # fmt: skip
    """The teacher cache's size and what it costs: ``examples x tokens x d_T x bytes(teacher_cache.dtype)``
    on disk (``inputs/teacher_cache.py``: h at every non-pad token), per token, per 1M tokens, and at most
    ``examples x data.max_length`` tokens when the number of examples is known; the LM head distill keeps
    (``jobs.cache_teacher.head_only``: the teacher's compute dtype, whole on every GPU); the build's memory."""
    element = CACHE_DTYPE_BYTES[cfg.teacher_cache.dtype]
    per_token = t.head_input_size * element
    examples, source = known_examples(cfg)
    max_tokens = None if examples is None else examples * cfg.data.max_length
    tb = t_zero.param_bytes
    build = memory.MemoryEstimate()  # launch/cache_teacher.py: the teacher's engine alone, no student
    memory.teacher_states(t, t_zero, world, gpus_per_node, build)
    bi, seq = cfg.importance.batch_size, cfg.data.max_length
    build.gpu["cache build: teacher forward (head skipped)"] = memory.teacher_forward_bytes(t, bi, seq, tb)
    return {
        "dir": cfg.teacher_cache.dir,
        "dtype": cfg.teacher_cache.dtype,
        "d_teacher": t.head_input_size,
        "bytes_per_token": per_token,
        "gib_per_million_tokens": per_token * 1e6 / GIB,
        "examples": examples,
        "examples_from": source,
        "max_length": cfg.data.max_length,
        "max_tokens": max_tokens,
        "max_gib": None if max_tokens is None else max_tokens * per_token / GIB,
        "head_params": t.vocab_size * t.head_input_size,
        "head_bytes_per_param": tb,
        "head_gib": memory.lm_head_bytes(t, tb) / GIB,
        "build_required_gib": (sum(build.gpu.values()) + memory.reserve_bytes(gpu_mem_gib)) / GIB,
        "build_cpu_per_node_gib": build.cpu_total_per_node / GIB,
        "head_load_cpu_per_node_gib": gpus_per_node * t.params * tb / GIB,  # a GGUF / .bin teacher
        "head_read_cpu_per_node_gib": gpus_per_node * memory.lm_head_bytes(t, tb) / GIB,  # safetensors
    }


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 100 else f"{nbytes / 2**20:.2f} MiB"


def cache_summary(cache: dict) -> str:
    """The report's line on the cache's size: bytes per token, per 1M tokens, the total when known, the head."""
    per_token = cache["bytes_per_token"]
    line = (f"teacher cache: {per_token} bytes/token ({cache['dtype']}, d_T={cache['d_teacher']}) = "
            f"{_size(per_token * 1e6)} per 1M tokens")  # fmt: skip
    if cache["max_tokens"] is not None:
        line += (f"; at most {cache['examples']} examples ({cache['examples_from']}) x {cache['max_length']} "
                 f"tokens (data.max_length) = {cache['max_tokens']:,} tokens = {_size(cache['max_tokens'] * per_token)}")  # fmt: skip
    else:
        line += " (the number of training examples is unknown without the data)"
    head = "16-bit" if cache["head_bytes_per_param"] == 2 else "fp32"
    return (
        line
        + f"; distill holds only the teacher's LM head ({_size(cache['head_gib'] * GIB)} per GPU, {head})"
    )


def before_training(
    cfg: DistillConfig, t: ModelShape, s: ModelShape, t_zero: ZeroSetup, gpu_mem_gib: float,
    cache: dict | None = None,
) -> list[str]:  # fmt: skip
    """Lines on the passes that run before the first step: the prune job (model.student_init=pruned), the
    teacher's responses (data.responses=teacher), both beside the teacher's ZeRO-3 shard only, and the teacher
    cache (``cache``: ``cache_storage``'s dict) with its build."""
    lines = []
    if cache:
        lines.append(cache_summary(cache))
        cpu = (
            f" + {cache['build_cpu_per_node_gib']:.1f} GiB CPU RAM per node"
            if cache["build_cpu_per_node_gib"]
            else ""
        )
        lines.append(
            f"cache build (launch/cache_teacher.py, or distill first when teacher_cache.dir holds no complete "
            f"cache): the teacher's engine alone, {cache['build_required_gib']:.1f} GiB per GPU with the "
            f"reserve{cpu} (forward at importance.batch_size={cfg.importance.batch_size}), freed before the "
            f"student is built; every rank reads the teacher's head alone from a safetensors checkpoint "
            f"({cache['head_read_cpu_per_node_gib']:.2f} GiB CPU RAM per node); a GGUF or .bin teacher is "
            f"loaded whole on CPU for it ({cache['head_load_cpu_per_node_gib']:.1f} GiB per node, briefly)"
        )  # fmt: skip
    if cfg.model.resolved_student_init == "pruned":
        biggest = max(t.tensor_numels) * t_zero.param_bytes / GIB
        student_fp32 = s.params * 4 / GIB
        lines.append(
            f"prune job: each teacher tensor is gathered alone (largest {biggest:.2f} GiB per GPU above the "
            f"ZeRO-3 shard); rank 0 keeps the student's slices in CPU RAM ({student_fp32:.2f} GiB fp32, "
            f"{_count(s.params)} parameters) and writes <output_dir>/pruned_student; statistics over "
            f"prune.num_examples={cfg.prune.num_examples} examples use the importance pass's memory"
        )
    if cfg.data.responses == "teacher" or cfg.data.valid == "builtin:prompts":
        whole = t.params * t_zero.param_bytes / GIB
        where = "gathered whole on every GPU" if whole <= gpu_mem_gib / 2 else "in ZeRO-3 with synced ranks"
        lines.append(
            f"teacher responses: the teacher ({whole:.2f} GiB) writes them {where} (whole when it fits half the "
            f"free memory), up to data.response_tokens={cfg.data.response_tokens} tokens each, before training; "
            "cached in <output_dir>/teacher_responses.jsonl"
        )
    return lines


# ------------------------------------------------------------------------------------------- report
def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3f} {unit}" if unit == "B" else f"{n / scale:.1f} {unit}"
    return str(n)


def format_report(report: PlanReport, title: str = "") -> str:
    """The human-readable report (the JSON holds the same numbers)."""
    lines = [f"flexkd-ds plan{': ' + title if title else ''} on {report.nodes} node(s) x {report.gpus_per_node} "
             f"GPU(s) = world {report.world}, {report.gpu_mem_gib:g} GiB per GPU", ""]  # fmt: skip
    if report.models:
        lines.append(f"  {'model':<8} {'name':<36} {'params':>9} {'d':>6} {'layers':>6} {'vocab':>7} "
                     f"{'positions':>9}  config from")  # fmt: skip
        for role, m in report.models.items():
            lines.append(f"  {role:<8} {m['name'][:36]:<36} {_count(m['params']):>9} {m['d_head_input']:>6} "
                         f"{m['layers']:>6} {m['vocab']:>7} {str(m['max_positions']):>9}  {m['config']}")  # fmt: skip
        lines.append("")
    lines += [f"  ok: {c}" for c in report.checks] + [f"  WARNING: {w}" for w in report.warnings]
    lines += [f"  ERROR: {e}" for e in report.errors]
    setup = report.setup
    if setup:
        tz, sz = setup["teacher_zero"], setup["student_zero"]

        def zero_text(z: dict, path: str) -> str:
            off = [k for k in ("offload_param", "offload_optimizer") if z[k]]
            prec = "16-bit" if z["param_bytes"] == 2 else "fp32"
            return f"ZeRO-{z['stage']} {prec}{' + ' + ', '.join(off) if off else ''} ({path})"

        teacher_text = zero_text(tz, setup["teacher_ds"])
        if report.teacher_cache:
            c = report.teacher_cache
            teacher_text = (f"offline cache {c['dir']} ({c['dtype']} h); LM head only, "
                            f"{'16-bit' if tz['param_bytes'] == 2 else 'fp32'} ({setup['teacher_ds']} precision)")  # fmt: skip
        lines += ["", f"  batch: micro {setup['micro_batch_size']} x accum {setup['grad_accum']} x world "
                  f"{report.world} = {setup['global_batch']}, {setup['seq_len']} tokens per example"
                  + (f"; Flex-KD correlation centred over {setup['correlation_sequences']} sequence(s)"
                     if setup["correlation_sequences"] else ""),
                  f"  teacher: {teacher_text}",
                  f"  student: {zero_text(sz, setup['student_ds'])}", "",
                  f"  {'per-GPU memory':<58} {'GiB':>8}"]  # fmt: skip
        lines += [f"  {k:<58} {v:>8.3f}" for k, v in report.memory_gib.items()]
        tot = report.totals_gib
        lines += [f"  {'-' * 67}",
                  f"  {'model states':<58} {tot['model_states']:>8.2f}",
                  f"  {'peak = model states + max(step, importance pass)':<58} {tot['peak']:>8.2f}",
                  f"  {'reserve (10% of the GPU + 1.5 GiB: context, fragmentation)':<58} {tot['reserve']:>8.2f}",
                  f"  {'required per GPU':<58} {tot['required']:>8.2f}",
                  f"  {'available per GPU':<58} {tot['available']:>8.2f}"]  # fmt: skip
        if report.cpu_per_node_gib:
            lines += ["", f"  {'CPU RAM per node':<58} {'GiB':>8}"]
            lines += [f"  {k:<58} {v:>8.2f}" for k, v in report.cpu_per_node_gib.items()]
        if report.teacher_placement:
            lines += ["", "  teacher placement (deepspeed.teacher_config):"]
            place = report.teacher_placement
            for name in ("zero3", "replicated"):
                o = place[name]
                mark = " <- recommended" if place["recommended"] == name else ""
                lines.append(f"  - {name:<10} {o['required_gib']:>7.2f} GiB per GPU "
                             f"({'fits' if o['fits'] else 'does not fit'}), all-gathers "
                             f"{o['gathered_gib_per_step']:.2f} GiB per GPU per step  {o['config']}{mark}")  # fmt: skip
        if report.before_training:
            lines += ["", "  before training:"] + [f"  - {line}" for line in report.before_training]
    lines.append("")
    if report.errors:
        lines.append("INVALID: fix the errors above (exit 1)")
    else:
        tot = report.totals_gib
        needs = f" with {' '.join(report.required_overrides)}" if report.required_overrides else ""
        if report.fits:
            lines.append(f"FITS{needs}: {tot['required']:.1f} of {tot['available']:.1f} GiB per GPU (exit 0)")
        else:
            lines.append(f"DOES NOT FIT{needs}: needs {tot['required']:.1f} GiB per GPU, "
                         f"has {tot['available']:.1f} (exit 2)")  # fmt: skip
        for ov in report.required_overrides:
            lines.append(f"  required on {report.world} GPU(s): {ov} (keeps train.global_batch_size)")
        if not report.fits:
            lines.append("what to change, cheapest first:" if report.suggestions else
                         "nothing the planner tries fits: use larger GPUs or a smaller pair")  # fmt: skip
            for i, sug in enumerate(report.suggestions, 1):
                cpu = (
                    f", CPU RAM {sug['cpu_per_node_gib']:.0f} GiB per node" if sug["cpu_per_node_gib"] else ""
                )
                lines.append(f"  {i}. {sug['kind']}: {' '.join(sug['change'])}  -> {sug['required_gib']:.1f} "
                             f"GiB per GPU{cpu} ({sug['why']})")  # fmt: skip
    return "\n".join(lines)
