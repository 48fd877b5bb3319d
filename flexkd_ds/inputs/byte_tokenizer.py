"""``builtin:bytes``: a byte-level tokenizer built in code (256 byte tokens + 3 specials), for smoke runs and
tests with tiny random models: no files, no hub, loads in milliseconds. Real runs use the teacher's tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BYTE_TOKENIZER_NAME = "builtin:bytes"
SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with no merges: every UTF-8 byte is one token (256 ids), then
    ``<pad>`` 256, ``<s>`` 257 (BOS), ``</s>`` 258 (EOS). Vocabulary size 259."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=1 << 20
    )
