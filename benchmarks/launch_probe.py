"""Which constructs make a jitted call's launch wait for the device (XLA:GPU)?

python -m benchmarks.launch_probe   (on the GPU; prints dispatch and total ms per construct)

Each variant runs a ~20 ms bf16 matmul chain, then the construct on [512, 152064] f32 logits with a
predicate that depends on the chain. A launch that returns in well under the total is asynchronous;
one that takes the total waited for the device (measured 2026-11-29 on the H200: `while` and
`cond_topk` wait, the others do not; see RESULTS.md, session 5)."""
import time
import jax
import jax.numpy as jnp

B, V, C = 512, 152064, 1188


def heavy(x):
    for _ in range(16):
        x = (x @ x) * jnp.bfloat16(1e-4)
    return x


def v_none(l, s):
    return jnp.argmax(l + s, axis=-1)


def v_cond_plain(l, s):
    return jax.lax.cond(s > -1, lambda: jnp.argmax(l * 2 + s, -1), lambda: jnp.argmax(l, -1))


def v_cond_sort(l, s):
    return jax.lax.cond(s > -1, lambda: jnp.argmax(jnp.sort(l[:, :C] + s, axis=-1), -1),
                        lambda: jnp.argmax(l, -1))


def v_sort_nocond(l, s):
    return jnp.argmax(jnp.sort(l[:, :C] + s, axis=-1), -1)


def v_cond_topk(l, s):
    return jax.lax.cond(s > -1, lambda: jax.lax.top_k(l + s, 40)[1][:, 0],
                        lambda: jnp.argmax(l, -1))


def v_cond_take(l, s):
    def br():
        j = jnp.argmax(l + s, -1)
        v = jnp.take_along_axis(l, j[:, None], 1)
        return jnp.sum(l > v, -1).astype(jnp.int32) + j.astype(jnp.int32)
    return jax.lax.cond(s > -1, br, lambda: jnp.argmax(l, -1).astype(jnp.int32))


def v_cond_scatter(l, s):
    def br():
        rows = jnp.arange(B)[:, None]
        ids = (jnp.arange(B * 20).reshape(B, 20) * 7) % V
        return jnp.argmax(l.at[rows, ids].set(-jnp.inf) + s, -1)
    return jax.lax.cond(s > -1, br, lambda: jnp.argmax(l, -1))


def v_two_conds(l, s):
    a = jax.lax.cond(s > -1, lambda: jnp.argmax(l * 2 + s, -1), lambda: jnp.argmax(l, -1))
    return jax.lax.cond(jnp.all(a >= 0), lambda: a, lambda: jnp.argmax(l * 3, -1))


def v_while(l, s):
    def body(c):
        i, a = c
        return i + 1, jnp.argmax(l * (i + 1.0) + s, -1)
    return jax.lax.while_loop(lambda c: (c[0] < 3) & (s > -1), body, (0, jnp.argmax(l, -1)))[1]


def v_fori(l, s):
    return jax.lax.fori_loop(0, 3, lambda i, a: jnp.argmax(l * (i + 1.0) + s, -1),
                             jnp.argmax(l, -1))


VARIANTS = {k[2:]: v for k, v in dict(globals()).items() if k.startswith("v_")}

x = jnp.eye(8192, dtype=jnp.bfloat16)
logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32)
for name, fn in VARIANTS.items():
    f = jax.jit(lambda x, l, fn=fn: (lambda h: (h, fn(l, h[0, 0].astype(jnp.float32))))(heavy(x)))
    jax.block_until_ready(f(x, logits))
    jax.block_until_ready(f(x, logits))
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        out = f(x, logits)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        r = ((t1 - t0) * 1e3, (t2 - t0) * 1e3)
        best = r if best is None or r[1] < best[1] else best
    print(f"{name:14s} dispatch {best[0]:7.2f} ms   total {best[1]:7.2f} ms", flush=True)
