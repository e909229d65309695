"""GGUF tokenizer metadata -> a transformers PreTrainedTokenizerFast, built with `tokenizers` only.

load_tokenizer (checkpoint.py) uses it for .gguf paths: transformers' own GGUF route imports torch,
which the runtime install does not have. The result behaves like an AutoTokenizer (encode, decode,
convert_ids_to_tokens, apply_chat_template, eos_token_id) for the rest of the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (skip_special_tokens drops
# them), USER_DEFINED ones are added tokens matched before pre-tokenization but kept in decodes.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_SPM_SPACE = "\u2581"  # SentencePiece's "▁": a space inside a piece

# tokenizer.ggml.pre -> the steps before BPE, in order: "nfc" (the normalizer the model's HF
# tokenizer.json has), "digits" (each digit its own piece), a regex (Split, isolated), and "" for
# GPT-2's regex, which the ByteLevel pre-tokenizer applies itself. The regexes are llama.cpp's
# (llama-vocab.cpp) and the HF tokenizer.json ones; transformers' GGUF route ignores this key.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = ("nfc", _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"))
_DIGITS_THEN_GPT2 = ("digits", "")
PRE_TOKENIZERS = {
    "default": ("",), "gpt2": ("",), "mpt": ("",), "olmo": ("",),
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2,
    "llama-bpe": (_LLAMA3_REGEX,), "llama3": (_LLAMA3_REGEX,),
    "qwen2": _QWEN2, "qwen2.5": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}


@dataclass(frozen=True, kw_only=True)
class GGUFVocab:
    """The tokenizer.* fields of a GGUF file (llama.cpp's names in the comments)."""
    model: str | None  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    pre: str  # tokenizer.ggml.pre: pre-tokenizer name, a key of PRE_TOKENIZERS
    tokens: list[str]  # tokenizer.ggml.tokens [V]
    token_types: list[int]  # tokenizer.ggml.token_type [V]: 1 normal, 3 control, 4 user-defined
    merges: list[str]  # tokenizer.ggml.merges: "left right", highest priority first
    scores: list[float] = ()  # tokenizer.ggml.scores [V] ("llama": higher merges first)
    add_space_prefix: bool = True  # tokenizer.ggml.add_space_prefix ("llama": prepend "▁")
    special_ids: dict[str, int]  # {"bos"|"eos"|"unk"|"pad": id} from tokenizer.ggml.*_token_id
    add_bos: bool  # tokenizer.ggml.add_bos_token
    add_eos: bool  # tokenizer.ggml.add_eos_token
    chat_template: str | None  # tokenizer.chat_template


def load_gguf_tokenizer(path: str, reader=None):
    """A .gguf file's tokenizer as a PreTrainedTokenizerFast (`reader`: its open GGUFReader)."""
    if reader is None:
        import gguf

        reader = gguf.GGUFReader(path)
    return build_tokenizer(read_gguf_vocab(reader, path))


def read_gguf_vocab(reader, path: str) -> GGUFVocab:
    """Read the tokenizer.* fields from a gguf.GGUFReader; ValueError when the file has none."""
    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"GGUF file {path!r} has no tokenizer.ggml.tokens: "
                         "pass tokenizer=<HF directory>")
    ids = {name: get(f"tokenizer.ggml.{key}_token_id") for name, key in
           (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    return GGUFVocab(model=get("tokenizer.ggml.model"), pre=get("tokenizer.ggml.pre", "default"),
                     tokens=get("tokenizer.ggml.tokens"),
                     token_types=get("tokenizer.ggml.token_type") or [],
                     merges=get("tokenizer.ggml.merges") or [],
                     scores=get("tokenizer.ggml.scores") or [],
                     add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
                     special_ids={k: int(v) for k, v in ids.items() if v is not None},
                     add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                     add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
                     chat_template=get("tokenizer.chat_template"))


def build_tokenizer(vocab: GGUFVocab):
    """GGUFVocab -> PreTrainedTokenizerFast: byte-level BPE over the GGUF's vocabulary and merges
    ("gpt2") with the pre-tokenizer llama.cpp uses for `vocab.pre`, or SentencePiece BPE ("llama",
    spm_tokenizer); control tokens as special added tokens, user-defined ones as added tokens."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    if vocab.model == "llama":
        tok = spm_tokenizer(vocab)
    elif vocab.model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported (only 'gpt2', "
                         "byte-level BPE, and 'llama', SentencePiece BPE): pass "
                         "tokenizer=<HF directory with tokenizer.json>")
    else:
        tok = _byte_level_bpe(vocab)
    types = vocab.token_types
    tok.add_special_tokens([AddedToken(vocab.tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == _CONTROL])
    tok.add_tokens([AddedToken(vocab.tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == _USER_DEFINED])
    named = {f"{k}_token": vocab.tokens[i] for k, i in vocab.special_ids.items()
             if 0 <= i < len(vocab.tokens)}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=vocab.chat_template,
                                   add_bos_token=vocab.add_bos, add_eos_token=vocab.add_eos,
                                   clean_up_tokenization_spaces=False, **named)


def spm_tokenizer(vocab: GGUFVocab):
    """SentencePiece BPE as llama.cpp's llm_tokenizer_spm runs it: spaces become "▁" (one
    prepended when add_space_prefix), then the adjacent pair whose concatenation is the
    highest-scoring normal piece merges first (leftmost on ties), and characters no piece covers
    fall back to <0xXX> byte pieces. As a `tokenizers` BPE: every split of every normal piece into
    two normal pieces is a merge, ranked by the whole piece's score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if len(vocab.scores) != len(vocab.tokens):
        raise ValueError(f"GGUF 'llama' vocabulary needs one score per token: "
                         f"{len(vocab.scores)=} {len(vocab.tokens)=}")
    normal = {t: vocab.scores[i] for i, t in enumerate(vocab.tokens)
              if vocab.token_types[i] == _NORMAL}
    merges = sorted(((t[:k], t[k:], score) for t, score in normal.items() for k in range(1, len(t))
                     if t[:k] in normal and t[k:] in normal), key=lambda m: -m[2])
    unk = vocab.special_ids.get("unk")
    model = models.BPE(vocab={t: i for i, t in enumerate(vocab.tokens)},
                       merges=[(a, b) for a, b, _ in merges], byte_fallback=True, fuse_unk=True,
                       unk_token=None if unk is None else vocab.tokens[unk])
    tok = Tokenizer(model)
    steps = [normalizers.Prepend(_SPM_SPACE)] if vocab.add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPM_SPACE)])
    strip = [decoders.Strip(content=" ", left=1)] if vocab.add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    return tok


def _byte_level_bpe(vocab: GGUFVocab):
    """Byte-level BPE ("gpt2") with the GGUF's merges and the pre-tokenizer of `vocab.pre`."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if vocab.pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer tokenizer.ggml.pre={vocab.pre!r} is not supported; "
                         f"supported: {sorted(PRE_TOKENIZERS)}")
    # A merge is "left right"; llama.cpp splits at the first space after position 0.
    merges = [(m[:i], m[i + 1:]) for m in vocab.merges if (i := m.find(" ", 1)) > 0]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab.tokens)}, merges=merges))
    steps = PRE_TOKENIZERS[vocab.pre]
    if steps[0] == "nfc":
        tok.normalizer, steps = normalizers.NFC(), steps[1:]
    tok.pre_tokenizer = _pre_tokenizer(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _pre_tokenizer(steps: tuple[str, ...]):
    """PRE_TOKENIZERS entry (minus "nfc") -> a pre-tokenizer ending in the byte-level mapping."""
    from tokenizers import Regex, pre_tokenizers

    parts = []
    for step in steps:
        if step == "digits":
            parts.append(pre_tokenizers.Digits(individual_digits=True))
        elif step:
            parts.append(pre_tokenizers.Split(Regex(step), behavior="isolated"))
    # GPT-2's regex runs inside ByteLevel only when no custom regex replaced it.
    use_gpt2_regex = steps[-1] == ""
    parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_gpt2_regex))
    return parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
