"""Does prefill speed follow the tokens per 64-row tile? (GPU machine; a probe for KERNEL_NOTES.)

  python3 scripts/prefill_group_probe.py
Times the Mosaic kernel on a 4096-token causal prefill at head_dim 128 for GQA groups G = N/K of
1, 2, 4 and 8 (64 // G tokens per tile) at the same total FLOPs (N = 32 q heads), by device time.
If the L2->SMEM K/V traffic per tile limits prefill, TFLOP/s falls as G grows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_us, measure_matmul_rate
from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic

H, S, T, N = 128, 16, 4096, 32


def main():
    rate = measure_matmul_rate()
    flops = 4 * N * H * T * (T + 1) / 2
    print(f"bf16 matmul {rate / 1e12:.0f} TFLOP/s (device time)")
    for K in (32, 16, 8, 4):
        P = T // S
        keys = jax.random.split(jax.random.key(K), 3)
        q = jax.random.normal(keys[0], (T, N, H), jnp.bfloat16)
        k = jax.random.normal(keys[1], (P, S, K, H), jnp.bfloat16)
        v = jax.random.normal(keys[2], (P, S, K, H), jnp.bfloat16)
        table = jnp.asarray(np.random.default_rng(K).permutation(P)[None], jnp.int32)
        args = (q, k, v, jnp.asarray([T], jnp.int32), table, jnp.asarray([0, T], jnp.int32),
                jnp.asarray([1], jnp.int32))
        fn = jax.jit(functools.partial(ragged_paged_attention_mosaic, sm_scale=H ** -0.5))
        us, _ = device_us(fn, [args], calls=10)
        tf = flops / us / 1e6
        print(f"G={N // K} ({64 // (N // K)} tokens/tile): {us:.0f} us, {tf:.0f} TFLOP/s "
              f"({100 * tf / (rate / 1e12):.0f}% of matmul)", flush=True)


if __name__ == "__main__":
    main()
