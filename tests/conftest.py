"""Test-wide setup: four fake CPU devices (tensor-parallel tests) before JAX initialises.

Set JAXSERVE_TEST_GPU=1 to run the same tests on the accelerator instead.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
if not os.environ.get("JAXSERVE_TEST_GPU"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
