"""A tiny random Llama with a real byte-level BPE tokenizer, saved as a HF directory.

Engine tests load it through the normal HF-directory path and compare with transformers (torch).
"""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small engine that served many requests.",
    "你好，请介绍一下人工智能。人工智能是计算机科学的一个分支。",
    "def add(a, b):\n    return a + b\n",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_llama(path: Path, *, vocab_size: int = 384, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and the tokenizer to `path`; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, vocab_size)
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    with torch.no_grad():  # larger weights than the default init: sharper, more varied logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}))
    return path


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_tokens: int,
              repetition_penalty: float = 1.0) -> list[int]:
    """Naive no-cache greedy loop in transformers (float32): the oracle."""
    import torch

    model = _hf_model(model_dir)
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / repetition_penalty,
                                       vals * repetition_penalty)
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):]


def hf_logprobs(model_dir: Path, ids: list[int]):
    """log_softmax of transformers' logits at every position: f64[len(ids), V]."""
    import torch

    with torch.no_grad():
        logits = _hf_model(model_dir)(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


_MODELS: dict = {}


def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _MODELS:
        _MODELS[key] = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return _MODELS[key]
