"""Can this teacher distil into this student? Vocabulary, tokenizer, widths and lengths, checked before any
weight loads, with errors that name both models and the fix."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from flexkd_ds.inputs.models import lm_head_input_size, max_positions, vocab_size

_PROBE = "Flex-KD distils  a teacher's hidden units:\n\tcafé, 42 + 7 = 49; naïve résumé ✓ 東京 <|x|>"


@dataclass(frozen=True)
class PairReport:
    """What ``check_pair`` checked, for the run log (``checks`` passed; ``warnings`` did not block)."""

    teacher: str
    student: str
    teacher_vocab: int
    student_vocab: int
    teacher_width: int  # d_T: width of the teacher's hidden_states[-1]
    student_width: int  # d_S
    teacher_max_positions: int | None
    student_max_positions: int | None
    max_length: int | None
    tokens_compared: int  # vocabulary ids compared between the two tokenizers
    checks: tuple[str, ...]
    warnings: tuple[str, ...]


def _tokenizer_differences(teacher_tok, student_tok) -> tuple[list[str], list[str], int]:
    """(differences that break shared input ids, size differences, number of ids compared)."""
    if teacher_tok is student_tok:
        return [], [], 0
    differences, sizes = [], []
    if len(teacher_tok) != len(student_tok):
        sizes.append(f"tokenizer sizes differ: teacher {len(teacher_tok)}, student {len(student_tok)}")
    for role in ("eos", "bos", "unk", "pad"):
        t_id, s_id = getattr(teacher_tok, f"{role}_token_id"), getattr(student_tok, f"{role}_token_id")
        # pad may be set later (ensure_pad_token) and bos/unk may be absent on one side; eos must agree.
        both = t_id is not None and s_id is not None
        if (both and t_id != s_id) or (role == "eos" and not both and t_id != s_id):
            differences.append(f"{role} token id differs: teacher {t_id}, student {s_id}")
    t_by_id = {i: tok for tok, i in teacher_tok.get_vocab().items()}
    s_by_id = {i: tok for tok, i in student_tok.get_vocab().items()}
    shared = range(min(len(teacher_tok), len(student_tok)))
    mismatched = [i for i in shared if t_by_id.get(i) != s_by_id.get(i)]
    examples = ", ".join(f"id {i}: {t_by_id.get(i)!r} vs {s_by_id.get(i)!r}" for i in mismatched[:3])
    if mismatched:
        differences.append(f"{len(mismatched)} of {len(shared)} shared ids map to other tokens ({examples})")
    elif teacher_tok.encode(_PROBE, add_special_tokens=False) != student_tok.encode(
        _PROBE, add_special_tokens=False
    ):
        differences.append("same vocabulary, but a probe text encodes differently (normaliser/pre-tokeniser)")
    return differences, sizes, len(shared)


def _config_name(config: PretrainedConfig, fallback: str) -> str:
    return getattr(config, "name_or_path", "") or f"{fallback} ({getattr(config, 'model_type', '?')})"


def check_pair(
    teacher_config: PretrainedConfig,
    student_config: PretrainedConfig,
    teacher_tokenizer,
    student_tokenizer,
    *,
    need_same_vocab: bool,
    need_narrower: bool,
    max_length: int | None,
    teacher_name: str | None = None,
    student_name: str | None = None,
) -> PairReport:
    """Check that a teacher and a student can be distilled together; raise one ``ValueError`` listing all
    problems (each naming both models and the fix), else return a ``PairReport``.

    - ``need_same_vocab`` (logit KD on): equal vocab sizes and tokenizer sizes.
    - tokenizers must agree (eos/bos/unk/pad ids, the token of every shared id, a probe encoding) whenever
      either KD term is on: both models read the same input ids and Flex-KD pairs them position by position.
    - each model's embeddings cover its tokenizer.
    - ``need_narrower`` (Flex-KD feature loss on): d_S < d_T (widths of ``hidden_states[-1]``).
    - ``max_length`` fits both models' position embeddings.
    Tokenizers may be ``None`` (not checked; noted in ``warnings``).
    """
    teacher = teacher_name or _config_name(teacher_config, "teacher")
    student = student_name or _config_name(student_config, "student")
    pair = f"teacher {teacher} / student {student}"
    errors, warnings, checks = [], [], []
    t_vocab, s_vocab = vocab_size(teacher_config), vocab_size(student_config)
    d_t, d_s = lm_head_input_size(teacher_config), lm_head_input_size(student_config)
    t_pos, s_pos = max_positions(teacher_config), max_positions(student_config)

    if need_same_vocab:
        if t_vocab != s_vocab:
            errors.append(
                f"vocab sizes differ (teacher {t_vocab}, student {s_vocab}) but logit KD compares distributions "
                "over one vocabulary. Resizing/padding embeddings is not done automatically: build the student "
                "with the teacher's vocab_size (narrow_student_config does), or turn logit KD off (beta=0)"
            )
        else:
            checks.append(f"vocab sizes equal ({t_vocab})")

    compared = 0
    if teacher_tokenizer is None or student_tokenizer is None:
        warnings.append("tokenizers not given: tokenizer agreement not checked")
    else:
        for role, tok, vocab in (
            ("teacher", teacher_tokenizer, t_vocab),
            ("student", student_tokenizer, s_vocab),
        ):
            if len(tok) > vocab:
                errors.append(f"the {role} tokenizer has {len(tok)} tokens but the {role} model {vocab} embeddings; "
                              f"call resize_token_embeddings({len(tok)}) on the {role}")  # fmt: skip
        differences, sizes, compared = _tokenizer_differences(teacher_tokenizer, student_tokenizer)
        if differences and (need_same_vocab or need_narrower):
            errors.append(
                "tokenizers differ (" + "; ".join(differences) + "). Both models read the same input ids, "
                "so KD needs one tokenizer family: use a student built on the teacher's tokenizer"
            )
        elif differences:
            warnings.append("tokenizers differ (no KD term is on): " + "; ".join(differences))
        if sizes and need_same_vocab:
            errors.append(sizes[0] + ": logit KD needs one token set (add the missing tokens to one side)")
        elif sizes:
            warnings.extend(sizes)
        if not differences:
            checks.append(f"tokenizers agree ({compared} ids, special tokens, probe encoding)")

    if need_narrower:
        if d_s >= d_t:
            errors.append(
                f"Flex-KD selects d_S of the teacher's d_T units; d_S={d_s} >= d_T={d_t}. Make the student "
                "narrower (narrow_student_config(hidden_size=...)) or use feature_loss=projector or cka"
            )
        else:
            checks.append(f"student narrower (d_S={d_s} < d_T={d_t})")

    if max_length is not None:
        for role, limit in (("teacher", t_pos), ("student", s_pos)):
            if limit is not None and max_length > limit:
                errors.append(
                    f"max_length={max_length} exceeds the {role}'s {limit} positions: lower max_length to <= "
                    f"{min(p for p in (t_pos, s_pos) if p is not None)}"
                )
        checks.append(f"max_length {max_length} within positions (teacher {t_pos}, student {s_pos})")

    if errors:
        raise ValueError(f"{pair} cannot be distilled together:\n- " + "\n- ".join(errors))
    return PairReport(teacher, student, t_vocab, s_vocab, d_t, d_s, t_pos, s_pos, max_length, compared,
                      tuple(checks), tuple(warnings))  # fmt: skip
