"""Per-GPU memory of one distillation step: the formulas of the dry-run planner. Pure python, no torch.

Everything is in bytes and per rank (one GPU) unless a name says otherwise. Sources of the formulas:

- Model states (ZeRO paper, Rajbhandari et al. 2020, section 3.1): mixed-precision Adam keeps 2 bytes of
  16-bit parameters, 2 bytes of 16-bit gradients and K = 12 bytes of fp32 master weights + momentum + variance
  per parameter (2 + 2 + 12 = 16 Psi). Stage 1 partitions the optimizer states over the N data-parallel ranks,
  stage 2 also the gradients, stage 3 also the parameters. In fp32 there is no master copy: 4 + 4 + 8.
- Optimizer offload (ZeRO-Offload, Ren et al. 2021): the fp32 states and an fp32 gradient copy live in CPU
  memory (12 + 4 bytes per parameter of the rank's partition); the GPU keeps 16-bit parameters and gradients.
- Communication buffers: DeepSpeed documents that ``overlap_comm`` for stages 1/2 costs 4.5x the
  ``allgather_bucket_size`` and ``reduce_bucket_size`` ("5e8 x 2 bytes x 2 x 4.5 = 9 GB").
- ZeRO-3 working set: a module's parameters are all-gathered just before it runs and released after; next to
  the shard a rank holds the largest gathered module plus one prefetch bucket (``stage3_prefetch_bucket_size``),
  capped by ``stage3_max_live_parameters``. Tensors under ``stage3_param_persistence_threshold`` elements
  stay whole on every rank.
- Activations (after Korthikanti et al. 2022, "Reducing Activation Recomputation", without their s^2 term
  since SDPA/flash attention never materialises the (T, T) scores): what one decoder layer saves for backward,
  per token, in the activation dtype.
- Teacher cache (``teacher_cache.dir``, ``jobs/cache_teacher.py``): no teacher body, shard or gathers; the
  teacher's LM head whole on every GPU and one batch of cached LM-head inputs, both in the teacher's compute
  dtype.

These are estimates for planning, not measurements: see docs/planning.md for what is approximate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = float(1 << 30)
RESERVE_FRACTION = 0.10  # allocator fragmentation, NCCL and workspace buffers
RESERVE_FIXED_GIB = 1.5  # CUDA context + cuBLAS/NCCL workspaces
OVERLAP_COMM_FACTOR = 4.5  # DeepSpeed docs, zero_optimization.overlap_comm (stages 1 and 2)
# (B, T, V) fp32 buffers of the logit terms, all tokens assumed to be response tokens (an upper bound):
KD_FP32_VOCAB_BUFFERS = 4  # log q, log p (both saved for backward), the rkl/fkl product, its gradient
LM_FP32_VOCAB_BUFFERS = 2  # the LM cross-entropy's fp32 log-softmax (saved) and its gradient
VOCAB_BF16_BUFFERS = 3  # teacher logits, student logits, the gradient of the student logits
FUSED_FP32_VOCAB_BUFFERS = 8  # one chunk (method.fused_logits): both logits, both log-softmaxes, the kind's
#   intermediates and the chunk's gradient (bench/logit_memory.py measures the peak)
IMPORTANCE_FP32_VOCAB_BUFFERS = 1  # the closed form keeps one (chunk, V) fp32 tensor (softmax in place)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model (read off a meta-device build and its config)."""

    name: str
    model_type: str
    params: int  # unique parameters (tied embeddings once)
    tensor_numels: tuple[int, ...]  # numel of every unique parameter tensor
    largest_module_params: int  # the most parameters one module owns directly (ZeRO-3 gathers per module)
    hidden_size: int  # residual width h
    head_input_size: int  # width of hidden_states[-1] (d_T / d_S); OPT: word_embed_proj_dim
    num_layers: int
    num_heads: int
    kv_dim: int  # key/value width (num_kv_heads x head_dim)
    ffn_dim: int
    gated_mlp: bool  # SwiGLU (gate, up, down) vs a two-matrix MLP
    dropout: bool  # residual dropout active in training (a 1-byte mask per site)
    vocab_size: int
    max_positions: int | None

    def persistent_params(self, threshold: int) -> int:
        """Parameters in tensors smaller than ZeRO-3's persistence threshold (kept whole on every rank)."""
        return sum(n for n in self.tensor_numels if n < threshold)

    def layer_activation_bytes_per_token(self, act_bytes: int) -> float:
        """Bytes one decoder layer keeps for backward, per token.

        Attention: norm input, QKV input, q, k, v, attention output (= output-projection input):
        ``4h + 2 kv``. MLP: norm input, MLP input, then ``gate, up, act(gate), act*up`` (gated) or ``fc1 out,
        act out`` (two-matrix): ``2h + 4f`` or ``2h + 2f``. Dropout: a 1-byte mask per residual branch.
        """
        attention = 4 * self.hidden_size + 2 * self.kv_dim
        mlp = 2 * self.hidden_size + (4 if self.gated_mlp else 2) * self.ffn_dim
        masks = 2 * self.hidden_size if self.dropout else 0
        return act_bytes * (attention + mlp) + masks


@dataclass(frozen=True)
class ZeroSetup:
    """What the planner reads from a DeepSpeed dict (``from_ds_dict``)."""

    stage: int
    param_bytes: int  # 2 for bf16/fp16, 4 for fp32
    offload_param: bool = False
    offload_optimizer: bool = False
    overlap_comm: bool = False
    reduce_bucket: int = 500_000_000  # DeepSpeed defaults
    allgather_bucket: int = 500_000_000
    persistence_threshold: int = 100_000
    prefetch_bucket: int = 50_000_000
    max_live_params: int = 1_000_000_000

    @classmethod
    def from_ds_dict(cls, ds: dict, param_bytes: int) -> ZeroSetup:
        zero = ds.get("zero_optimization") or {}

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        return cls(
            stage=int(zero.get("stage", 0)),
            param_bytes=param_bytes,
            offload_param=offloaded("offload_param"),
            offload_optimizer=offloaded("offload_optimizer"),
            overlap_comm=bool(zero.get("overlap_comm", zero.get("stage", 0) == 3)),
            reduce_bucket=int(zero.get("reduce_bucket_size", 500_000_000)),
            allgather_bucket=int(zero.get("allgather_bucket_size", 500_000_000)),
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
            prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
            max_live_params=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        )


@dataclass(frozen=True)
class Workload:
    """The shapes of one step and of the importance pass."""

    micro_batch: int
    seq_len: int
    logit_kd: bool  # a teacher-student divergence on the logits
    lm_loss: bool
    feature_width: int  # d_S columns of the feature loss (0 = no feature loss)
    importance_batch: int
    chunk_tokens: int
    needs_teacher: bool = True
    importance_pass: bool = True  # Flex-KD scores the teacher's units before training
    # teacher_cache.dir: only the teacher's LM head is resident, its LM-head inputs h are read from disk
    cached_teacher: bool = False
    fused_logits: bool = False  # loss.fused_logits: the LM / logit terms chunk by chunk, never (B, T, V)
    logit_chunk_rows: int = (
        0  # rows per chunk (method.fused_logits.default_chunk_rows(V), set by the planner)
    )


@dataclass
class MemoryEstimate:
    """Per-GPU bytes by component (``gpu``), CPU bytes per node (``cpu_per_node``), and the peak."""

    gpu: dict[str, float] = field(default_factory=dict)
    cpu_per_node: dict[str, float] = field(default_factory=dict)
    train_activations: float = 0.0  # the step's activation components, summed
    importance_activations: float = 0.0

    @property
    def model_states(self) -> float:
        return sum(v for k, v in self.gpu.items() if not k.startswith(("step:", "importance:")))

    @property
    def peak(self) -> float:
        """Model states + the larger of the training step and the importance pass."""
        return self.model_states + max(self.train_activations, self.importance_activations)

    @property
    def cpu_total_per_node(self) -> float:
        return sum(self.cpu_per_node.values())


def reserve_bytes(gpu_mem_gib: float) -> float:
    """Memory the estimate does not see: 10% of the device + 1.5 GiB (CUDA context, fragmentation)."""
    return RESERVE_FRACTION * gpu_mem_gib * GIB + RESERVE_FIXED_GIB * GIB


def zero_model_states(params: int, world: int, stage: int, *, param_bytes: int = 2,
                      offload_optimizer: bool = False) -> tuple[float, float, float, float]:  # fmt: skip
    """(parameters, gradients, optimizer states) on one GPU and the optimizer bytes on the CPU per rank.

    Mixed precision (16-bit parameters): 2 + 2 + 12 bytes per parameter; fp32: 4 + 4 + 8. Stage >= 1 divides
    the optimizer states by ``world``, stage >= 2 the gradients, stage 3 the parameters. Offload moves the
    optimizer states (and an fp32 gradient copy, 4 bytes) to the CPU.
    """
    if world < 1 or stage not in (0, 1, 2, 3):
        raise ValueError(f"need world >= 1 and a ZeRO stage 0-3; got world={world}, stage={stage}")
    optim_bytes = 12 if param_bytes < 4 else 8
    p = params * param_bytes / (world if stage == 3 else 1)
    g = params * param_bytes / (world if stage >= 2 else 1)
    o = params * optim_bytes / (world if stage >= 1 else 1)
    if offload_optimizer:
        return p, g, 0.0, o + params * 4 / (world if stage >= 1 else 1)
    return p, g, o, 0.0


def _gathered_working_set(shape: ModelShape, zero: ZeroSetup) -> float:
    """ZeRO-3: the largest gathered module + one prefetch bucket, at most max_live parameters."""
    sharded = shape.params - shape.persistent_params(zero.persistence_threshold)
    live = min(shape.largest_module_params + zero.prefetch_bucket, max(zero.max_live_params,
               shape.largest_module_params), sharded)  # fmt: skip
    return live * zero.param_bytes


def teacher_states(shape: ModelShape, zero: ZeroSetup, world: int, gpus_per_node: int, est: MemoryEstimate):
    """The inference-only teacher: its shard (or whole copy below stage 3), persistent tensors, gathers."""
    b = zero.param_bytes
    if zero.stage == 3:
        persistent = shape.persistent_params(zero.persistence_threshold)
        shard = (shape.params - persistent) * b / world
        if zero.offload_param:
            est.cpu_per_node["teacher parameter shards (offload_param)"] = shard * gpus_per_node
            shard = 0.0
        est.gpu["teacher parameter shard"] = shard
        est.gpu["teacher persistent tensors (whole)"] = persistent * b
        est.gpu["teacher gathered module + prefetch"] = _gathered_working_set(shape, zero)
    else:
        est.gpu["teacher parameters (whole, ZeRO stage < 3)"] = shape.params * b


def student_states(shape: ModelShape, zero: ZeroSetup, world: int, gpus_per_node: int, est: MemoryEstimate):
    """The trained student: ZeRO model states + DeepSpeed's communication buffers."""
    b = zero.param_bytes
    persistent = shape.persistent_params(zero.persistence_threshold) if zero.stage == 3 else 0
    p, g, o, cpu = zero_model_states(shape.params - persistent, world, zero.stage, param_bytes=b,
                                     offload_optimizer=zero.offload_optimizer)  # fmt: skip
    if persistent:  # whole on every rank; their gradients and states are still partitioned
        p += persistent * b
        _, g_p, o_p, cpu_p = zero_model_states(persistent, world, 2, param_bytes=b,
                                               offload_optimizer=zero.offload_optimizer)  # fmt: skip
        g, o, cpu = g + g_p, o + o_p, cpu + cpu_p
    est.gpu[f"student parameters (ZeRO-{zero.stage})"] = p
    est.gpu["student gradients"] = g
    est.gpu["student optimizer states"] = o
    if cpu:
        est.cpu_per_node["student optimizer states + fp32 grads (offload_optimizer)"] = cpu * gpus_per_node
    if zero.stage == 3:
        est.gpu["student gathered module + prefetch"] = _gathered_working_set(shape, zero)
        est.gpu["student reduce bucket"] = (
            min(zero.reduce_bucket, shape.params) * b * (2 if zero.overlap_comm else 1)
        )
    elif zero.stage in (1, 2):
        buckets = min(zero.reduce_bucket, shape.params) + min(zero.allgather_bucket, shape.params)
        factor = OVERLAP_COMM_FACTOR if zero.overlap_comm else 1.0
        est.gpu["student reduce/allgather buckets"] = buckets * b * factor


def student_activation_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: int) -> float:
    """Everything the student's forward keeps for backward, logits excluded: every layer + embeddings."""
    per_token = shape.num_layers * shape.layer_activation_bytes_per_token(act_bytes)
    per_token += 2 * act_bytes * shape.hidden_size  # embedding output, final-norm input
    return batch * seq * per_token


def teacher_forward_bytes(shape: ModelShape, batch: int, seq: int, act_bytes: int) -> float:
    """Teacher forward under no_grad: one layer's tensors live at a time, plus the residual stream and the
    captured last hidden state (B, T, d_T) that the feature loss reads."""
    per_token = shape.layer_activation_bytes_per_token(act_bytes)
    per_token += act_bytes * (shape.hidden_size + shape.head_input_size)
    return batch * seq * per_token


def lm_head_bytes(shape: ModelShape, param_bytes: int) -> float:
    """The teacher's LM head (V x d_T) whole, as ``jobs.cache_teacher.head_only`` holds it: in the teacher
    engine's compute dtype (its DeepSpeed precision), on every GPU. A head bias (none of the shipped
    architectures has one) is not counted."""
    return shape.vocab_size * shape.head_input_size * param_bytes


def cached_hidden_bytes(shape: ModelShape, batch: int, seq: int, param_bytes: int) -> float:
    """One batch of cached LM-head inputs on the GPU: (B, T, d_T) in the teacher's compute dtype
    (``TeacherCache.batch_hidden`` casts the stored bf16 / fp32 values to it before the copy to the GPU)."""
    return batch * seq * shape.head_input_size * param_bytes


def logit_buffer_bytes(batch: int, seq: int, vocab: int, logit_bytes: int, *, logit_kd: bool,
                       lm_loss: bool) -> float:  # fmt: skip
    """The (B, T, V) tensors of the loss: 16-bit logits of both models + the gradient, and the fp32
    softmax / loss buffers of the divergence and of the LM cross-entropy."""
    fp32 = KD_FP32_VOCAB_BUFFERS * logit_kd + LM_FP32_VOCAB_BUFFERS * lm_loss
    return batch * seq * vocab * (VOCAB_BF16_BUFFERS * logit_bytes + 4 * fp32)


def fused_logit_bytes(batch: int, seq: int, student: ModelShape, logit_bytes: int, chunk_rows: int) -> float:
    """The chunked loss (``method.fused_logits``): one chunk's (c, V) buffers, the (B*T, d_S) gradient of the
    student's hidden rows and the float32 head gradient accumulated over the chunks."""
    rows = min(chunk_rows, batch * seq)
    chunk = rows * student.vocab_size * (FUSED_FP32_VOCAB_BUFFERS * 4 + 2 * logit_bytes)
    return (
        chunk + batch * seq * student.head_input_size * 4 + student.vocab_size * student.head_input_size * 4
    )


def estimate(teacher: ModelShape, student: ModelShape, teacher_zero: ZeroSetup, student_zero: ZeroSetup,
             work: Workload, world: int, gpus_per_node: int) -> MemoryEstimate:  # fmt: skip
    """Per-GPU memory of a distillation run on ``world`` GPUs (``gpus_per_node`` per node)."""
    est = MemoryEstimate()
    cached = work.needs_teacher and work.cached_teacher
    tb = teacher_zero.param_bytes
    if cached:  # no body, no shard, no gathers: the head alone, whole on every GPU
        est.gpu["teacher LM head (whole; teacher cache)"] = lm_head_bytes(teacher, tb)
    elif work.needs_teacher:
        teacher_states(teacher, teacher_zero, world, gpus_per_node, est)
        if work.fused_logits and work.logit_kd:  # jobs.step: the chunked loss reads the teacher's head whole
            est.gpu["teacher LM head (whole; chunked logit loss)"] = lm_head_bytes(teacher, tb)
    student_states(student, student_zero, world, gpus_per_node, est)

    b, t, s_bytes = work.micro_batch, work.seq_len, student_zero.param_bytes
    step = {"step: student activations (for backward)": student_activation_bytes(student, b, t, s_bytes)}
    if work.fused_logits and (work.logit_kd or work.lm_loss):
        step["step: chunked logit loss (one chunk x V)"] = fused_logit_bytes(
            b, t, student, s_bytes, work.logit_chunk_rows
        )
    else:
        step["step: logits + loss buffers (B, T, V)"] = logit_buffer_bytes(
            b, t, student.vocab_size, s_bytes, logit_kd=work.logit_kd, lm_loss=work.lm_loss
        )
    step["step: feature-loss buffers"] = 4 * b * t * work.feature_width * 4
    if cached:  # the teacher's logits = head(h) are the "teacher logits" of the (B, T, V) buffers
        step["step: cached teacher h (B, T, d_T)"] = cached_hidden_bytes(teacher, b, t, tb)
    elif work.needs_teacher:
        step["step: teacher forward (no grad)"] = teacher_forward_bytes(teacher, b, t, tb)
    est.gpu.update(step)
    est.train_activations = sum(step.values())

    bi = work.importance_batch
    head = teacher.vocab_size * teacher.head_input_size
    chunk = IMPORTANCE_FP32_VOCAB_BUFFERS * min(work.chunk_tokens, bi * t) * teacher.vocab_size * 4
    if cached and work.importance_pass:  # the closed form on cached h: no forward, no logits, no head copy
        imp = {
            "importance: cached teacher h (B, T, d_T)": cached_hidden_bytes(teacher, bi, t, tb),
            "importance: LM head fp32 upcast": head * 4 if tb < 4 else 0.0,
            "importance: closed-form chunk": chunk,
        }
        est.gpu.update(imp)
        est.importance_activations = sum(imp.values())
    elif work.needs_teacher and work.importance_pass:
        imp = {
            "importance: teacher forward (head skipped)": teacher_forward_bytes(teacher, bi, t, tb),
            "importance: LM head copy + fp32 upcast": head * (tb + 4),
            "importance: closed-form chunk": chunk,
        }
        est.gpu.update(imp)
        est.importance_activations = sum(imp.values())
    return est
