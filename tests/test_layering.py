"""Layering: the host-side modules (scheduler, pages, request, batch, sampling_params, token
controls, the engine loop and its process client) import without JAX."""
import subprocess
import sys

HOST_MODULES = ["jaxserve.scheduler", "jaxserve.pages", "jaxserve.request", "jaxserve.batch",
                "jaxserve.sampling_params", "jaxserve.structured_outputs", "jaxserve.tool_parsers",
                "jaxserve.reasoning", "jaxserve.token_controls", "jaxserve.logprobs",
                "jaxserve.lora", "jaxserve.engine", "jaxserve.engine_core",
                "jaxserve.server.core_client"]


def test_host_modules_import_without_jax():
    code = "\n".join([
        "import sys",
        "sys.modules['jax'] = None  # any `import jax` now raises ImportError",
        *[f"import {m}" for m in HOST_MODULES],
        "assert not any(k == 'jax' or k.startswith('jax.') for k, v in sys.modules.items() if v)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
