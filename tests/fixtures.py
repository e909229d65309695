"""Shared test fixtures: tiny random HF checkpoints on disk and a minimal driver that runs a loaded
model over a paged KV cache for a few ragged sequences (prefill, then greedy decode).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.kv_cache import AttentionMetadata, init_kv_cache

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def save_word_tokenizer(path, vocab_size: int) -> None:
    """A WordLevel tokenizer "t0 t1 ..." so tiny checkpoint directories are complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2",
                                   bos_token="t1")
    fast.save_pretrained(path)


def make_hf_model(config_cls, model_cls, seed: int = 0, **overrides):
    """A tiny float32 transformers model with non-trivial norms and biases (so wiring bugs show)."""
    import torch

    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, "initializer_range": 0.1, **overrides})
    model = model_cls(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_checkpoint(model, path, **save_kw) -> str:
    model.save_pretrained(path, **save_kw)
    save_word_tokenizer(path, model.config.vocab_size)
    return str(path)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """f32[L, V] logits of a transformers model over one full sequence (no cache)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    import torch

    import copy

    # No EOS: generate exactly num_tokens (random tiny models emit "EOS" id 2 often).
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.pad_token_id = None, 0
    gen.max_new_tokens, gen.do_sample = num_tokens, False
    saved, model.generation_config = model.generation_config, gen
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), generation_config=gen,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        model.generation_config = saved
    return out[0, len(ids):].tolist()


def _bucket(n: int) -> int:
    size = 8
    while size < n:
        size *= 2
    return size


@functools.partial(jax.jit, static_argnums=0, donate_argnames=("kv",))
def _step(graphdef, state, kv, token_ids, md):
    model = nnx.merge(graphdef, state)
    hidden, kv = model(token_ids, md, kv)
    return model.compute_logits(hidden), kv


class Driver:
    """Runs B sequences together: step(new token lists) -> per-sequence logits of the new tokens.

    Each sequence owns max_pages pages from a permuted page list, so the page table is non-trivial.
    """

    def __init__(self, loaded, num_seqs: int, max_len: int = 64, page_size: int = 4,
                 attention_impl: str = "reference", seed: int = 0):
        cfg = loaded.config
        self.loaded, self.page_size, self.impl = loaded, page_size, attention_impl
        self.max_pages = -(-max_len // page_size)
        num_pages = num_seqs * self.max_pages + 3
        perm = np.random.default_rng(seed).permutation(num_pages)[: num_seqs * self.max_pages]
        self.page_table = perm.reshape(num_seqs, self.max_pages).astype(np.int32)
        self.kv = init_kv_cache(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads,
                                cfg.head_dim, loaded.dtype)
        self.ctx_lens = np.zeros(num_seqs, np.int32)

    def step(self, new_ids: list[list[int]]) -> list[np.ndarray]:
        """new_ids[b]: tokens appended to sequence b this step -> [f32[len(new_ids[b]), V]]."""
        q_lens = np.array([len(ids) for ids in new_ids], np.int32)
        total = int(q_lens.sum())
        T = _bucket(total)
        num_slots = self.kv.num_slots
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.full(T, num_slots, np.int32)
        t = 0
        for b, ids in enumerate(new_ids):
            pos = self.ctx_lens[b] + np.arange(len(ids))
            tokens[t:t + len(ids)] = ids
            positions[t:t + len(ids)] = pos
            slots[t:t + len(ids)] = (self.page_table[b][pos // self.page_size] * self.page_size
                                     + pos % self.page_size)
            t += len(ids)
        self.ctx_lens = self.ctx_lens + q_lens
        md = AttentionMetadata(
            positions=jnp.asarray(positions), slot_mapping=jnp.asarray(slots),
            page_table=jnp.asarray(self.page_table), kv_lens=jnp.asarray(self.ctx_lens),
            cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)),
            num_seqs=jnp.asarray([len(new_ids)], jnp.int32), attention_impl=self.impl)
        logits, self.kv = _step(self.loaded.graphdef, self.loaded.state, self.kv,
                                jnp.asarray(tokens), md)
        logits = np.asarray(logits, np.float32)
        bounds = np.concatenate([[0], np.cumsum(q_lens)])
        return [logits[bounds[b]:bounds[b + 1]] for b in range(len(new_ids))]

    def greedy(self, prompts: list[list[int]], num_tokens: int):
        """-> (prefill logits per seq, decode logits f32[num_tokens, B, V], tokens [B, num_tokens])."""
        prefill = self.step(prompts)
        nxt = [int(lg[-1].argmax()) for lg in prefill]
        tokens, decode = [nxt], []
        for _ in range(num_tokens - 1):
            out = self.step([[i] for i in nxt])
            decode.append(np.stack([lg[0] for lg in out]))
            nxt = [int(lg[0].argmax()) for lg in out]
            tokens.append(nxt)
        return prefill, decode, np.array(tokens).T.tolist()


PROMPTS = [list(range(3, 23)), [5, 9, 200, 7, 1], [42]]  # 20 tokens, 5 tokens, 1 token


def check_against_hf(hf_model, loaded, prompts=PROMPTS, num_tokens: int = 8, atol: float = 1e-4,
                     driver_kw=None) -> list[list[int]]:
    """Prefill + decode logits match transformers (no cache, full recompute) and greedy tokens match
    hf.generate; all prompts run together as one ragged batch. Returns our greedy tokens."""
    driver = Driver(loaded, len(prompts), **(driver_kw or {}))
    prefill, decode, tokens = driver.greedy(prompts, num_tokens)
    for b, ids in enumerate(prompts):
        ref = hf_logits(hf_model, ids + tokens[b])
        np.testing.assert_allclose(prefill[b], ref[:len(ids)], atol=atol, rtol=0)
        for s in range(3):  # decode step s consumed the token generated at step s
            np.testing.assert_allclose(decode[s][b], ref[len(ids) + s], atol=atol, rtol=0)
        assert tokens[b] == hf_greedy(hf_model, ids, num_tokens), f"prompt {b}"
    return tokens


def save_numpy_llama(path, seed: int = 0, dtype=np.float32, **config) -> str:
    """A tiny random Llama checkpoint (config.json, model.safetensors, word tokenizer) written with
    numpy and the safetensors library only: no torch, so hub and loader tests stay cheap."""
    import json
    import os

    from safetensors.numpy import save_file

    hf = {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "torch_dtype": np.dtype(dtype).name, "eos_token_id": 2, **config}
    d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    h = d // hf["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (hf["num_attention_heads"] * h, d),
                       p + "self_attn.k_proj.weight": (hf["num_key_value_heads"] * h, d),
                       p + "self_attn.v_proj.weight": (hf["num_key_value_heads"] * h, d),
                       p + "self_attn.o_proj.weight": (d, hf["num_attention_heads"] * h),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(seed)
    tensors = {name: (1.0 + 0.2 * rng.standard_normal(s) if "norm" in name
                      else 0.1 * rng.standard_normal(s)).astype(dtype)
               for name, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh)
    save_word_tokenizer(path, v)
    return str(path)
