"""Engine flags come from EngineConfig (one list), spelled as `vllm serve` spells them; flags and
options jaxserve lacks are refused by name. Parsing only: no engine starts here."""
from __future__ import annotations

import dataclasses

import pytest

from jaxserve.cli import VLLM_FLAGS_NOT_IMPLEMENTED, build_parser, engine_kwargs, main
from jaxserve.config import EngineConfig


def _parse(*argv):
    parser = build_parser()
    args, extra = parser.parse_known_args(["serve", *argv])
    assert extra == []
    return args


def test_every_engine_field_has_a_flag_with_its_default():
    kwargs = engine_kwargs(_parse())
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)
              if f.metadata.get("cli", True)}  # model is positional, usage_context set by `serve`
    assert kwargs == fields
    EngineConfig(**kwargs)  # the defaults are a valid config


def test_vllm_spellings():
    args = _parse("--no-enable-prefix-caching", "--enforce-eager", "-tp", "2", "--block-size", "32",
                  "--max-logprobs", "5", "--trust-remote-code", "--revision", "v1",
                  "--download-dir", "/tmp/d", "--generation-config", "vllm",
                  "--hf-overrides", '{"rope_theta": 5.0}', "--max-model-len", "4096",
                  "--pipeline-parallel-size", "1", "--kv-cache-dtype", "auto")
    kw = engine_kwargs(args)
    assert kw["enable_prefix_caching"] is False and kw["enforce_eager"] is True
    assert (kw["tensor_parallel_size"], kw["page_size"], kw["max_logprobs"]) == (2, 32, 5)
    assert kw["trust_remote_code"] is True and kw["revision"] == "v1"
    assert kw["download_dir"] == "/tmp/d" and kw["generation_config"] == "vllm"
    assert EngineConfig(**kw).hf_overrides == (("rope_theta", 5.0),)


@pytest.mark.parametrize("argv, match", [
    (["--pipeline-parallel-size", "2"], "pipeline_parallel_size=2 is not supported"),
    (["--quantization", "bitsandbytes"], "quantization='bitsandbytes' is not supported"),
    (["--kv-cache-dtype", "fp8_e5m2"], "kv_cache_dtype='fp8_e5m2' is not supported"),
    (["--enable-lora", "--max-loras", "0"], "max_loras=0"),
    (["--tool-parser-plugin", "p.py"], "--tool-parser-plugin is not supported"),
    (["--structured-outputs-config", "{}"], "--structured-outputs-config is not supported"),
    (["--tool-call-parser", "nope"], "invalid choice"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dtype", "int3"], "invalid choice"),
])
def test_unimplemented_flags_are_refused_by_name(argv, match, capsys):
    try:
        code = main(["serve", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert match in capsys.readouterr().err


def test_refusal_table_names_no_implemented_flag():
    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith("serve"))
    known = {s for action in serve._actions for s in action.option_strings}
    assert not known & set(VLLM_FLAGS_NOT_IMPLEMENTED)
