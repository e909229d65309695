"""Ragged paged attention for TPU: Pallas on the Mosaic TPU lowering (scalar prefetch + manual DMA).

Called by the dispatcher in __init__.py with impl="pallas_tpu" (see reference.py for the contract).

Design (in the spirit of tpu-inference's ragged paged attention). The work table and the page table
are scalar-prefetched into SMEM. The grid is (kv head, work item); a work item is up to
`tokens_per_block` new tokens of one sequence times the G = N/K query heads of kv head k: a
[rows, H] tile whose rows are (token, head) pairs, so decode tokens and prefill chunks share one
kernel. Each program DMAs its q rows from HBM, then walks the sequence's kv blocks
(`pages_per_block` pages each, one DMA per page through the page table) with two VMEM slots:
block i+1 is in flight while block i is computed (online softmax in f32). The finished tile is
DMA'd back whole; a tile that overhangs into the next sequence's rows writes garbage there, which
that sequence's own (later, the work axis is sequential) work item overwrites.

No TPU was lent to this project: this kernel is verified only in interpret mode on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.ragged_paged_attention import schedule as sch

MASK_INIT = -1e30  # finite start for the running max: fully masked rows give p = 0, never NaN
ROWS_TARGET = 128  # rows of a tile (token x head pairs): MXU height


def _page_copies(k_hbm, v_hbm, table_ref, k_vmem, v_vmem, sems, *, seq, step, slot, kh, cfg):
    """DMA descriptors for kv block `step` of `seq` (kv head kh) into VMEM slot `slot`."""
    S, ppb, M = cfg["page_size"], cfg["pages_per_block"], cfg["max_pages"]
    copies = []
    for p in range(ppb):
        page_idx = jnp.minimum(step * ppb + p, M - 1)
        page = jnp.clip(table_ref[seq * M + page_idx], 0, cfg["num_pages"] - 1)
        dst = pl.ds(p * S, S)
        copies.append(pltpu.make_async_copy(k_hbm.at[page, :, kh], k_vmem.at[slot, dst],
                                            sems.at[0, slot]))
        copies.append(pltpu.make_async_copy(v_hbm.at[page, :, kh], v_vmem.at[slot, dst],
                                            sems.at[1, slot]))
    return copies


def _online_softmax_step(q, k, v, carry, *, kv0, pos0, cfg):
    """One kv block: scores, mask, and the running (acc, m, l) update, all in f32."""
    acc, m_i, l_i = carry
    rows, block_kv = q.shape[0], k.shape[0]
    # f32 inputs: full-precision MXU passes (the default would round operands to bf16 on TPU).
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                        preferred_element_type=jnp.float32)
    s = s * cfg["sm_scale"]
    if cfg["soft_cap"] is not None:
        s = cfg["soft_cap"] * jnp.tanh(s / cfg["soft_cap"])
    row = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    pos = pos0 + row // cfg["group"]  # position of the row's token
    kv = kv0 + col
    mask = kv <= pos
    if cfg["sliding_window"] is not None:
        mask &= kv > pos - cfg["sliding_window"]
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_i - m_new)
    p = jnp.exp(s - m_new)
    l_new = alpha * l_i + p.sum(axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, precision=prec, preferred_element_type=jnp.float32)
    return acc * alpha + pv, m_new, l_new


def _attention_kernel(work_ref, table_ref,  # SMEM (scalar prefetch): i32[W*NUM_FIELDS], i32[B*M]
                      q_hbm,  # [K, T*G + rows, H] (HBM)
                      k_hbm, v_hbm,  # [P, S, K, H] (HBM)
                      o_hbm,  # [K, T*G + rows, H] (HBM)
                      q_vmem, o_vmem,  # [rows, H]
                      k_vmem, v_vmem,  # [2, block_kv, H]
                      sems, io_sems,  # DMA [2 (k/v), 2 slots], DMA [2 (q/o)]
                      *, cfg):
    kh, w = pl.program_id(0), pl.program_id(1)
    field = lambda f: work_ref[w * sch.NUM_FIELDS + f]
    ntok = field(sch.NTOK)

    @pl.when(ntok > 0)
    def _():
        seq, tok0, pos0 = field(sch.SEQ), field(sch.TOK0), field(sch.POS0)
        lo, hi = field(sch.KV_LO), field(sch.KV_HI)
        rows, G = q_vmem.shape[0], cfg["group"]
        q_copy = pltpu.make_async_copy(q_hbm.at[kh, pl.ds(tok0 * G, rows)], q_vmem, io_sems.at[0])
        q_copy.start()
        copies = functools.partial(_page_copies, k_hbm, v_hbm, table_ref, k_vmem, v_vmem, sems,
                                   seq=seq, kh=kh, cfg=cfg)

        @pl.when(lo < hi)
        def _():
            for c in copies(step=lo, slot=0):
                c.start()
        q_copy.wait()
        q = q_vmem[...]

        def kv_step(step, carry):
            slot = lax.rem(step - lo, 2)

            @pl.when(step + 1 < hi)
            def _():
                for c in copies(step=step + 1, slot=1 - slot):
                    c.start()
            for c in copies(step=step, slot=slot):
                c.wait()
            return _online_softmax_step(q, k_vmem[slot], v_vmem[slot], carry,
                                        kv0=step * cfg["block_kv"], pos0=pos0, cfg=cfg)

        init = (jnp.zeros(o_vmem.shape, jnp.float32), jnp.full((rows, 1), MASK_INIT, jnp.float32),
                jnp.zeros((rows, 1), jnp.float32))
        acc, _, l_i = lax.fori_loop(lo, hi, kv_step, init)
        o_vmem[...] = (acc / jnp.where(l_i > 0, l_i, 1.0)).astype(o_vmem.dtype)
        o_copy = pltpu.make_async_copy(o_vmem, o_hbm.at[kh, pl.ds(tok0 * G, rows)], io_sems.at[1])
        o_copy.start()
        o_copy.wait()


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "pages_per_block", "interpret"))
def ragged_paged_attention_tpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, pages_per_block: int | None = None,
                               interpret: bool = False):
    """Ragged paged attention on TPU; contract as in reference.ragged_paged_attention_reference.

    Args:
      q: [T, N, H]; k_pages, v_pages: [P, S, K, H]; kv_lens: i32[B]; page_table: i32[B, M];
      cu_q_lens: i32[B+1]; num_seqs: i32[1].
      pages_per_block: pages per kv block (default: ~128 kv slots per block).
      interpret: run with pltpu.InterpretParams() (CPU).
    Returns: [T, N, H], zeros for tokens of no live sequence.
    """
    T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    B, M = page_table.shape
    if N % K:
        raise ValueError(f"num_q_heads={N} must be divisible by num_kv_heads={K}")
    G = N // K
    ppb = pages_per_block or max(1, 128 // S)
    block_kv = ppb * S
    tpb = max(1, ROWS_TARGET // G)
    rows = -(-tpb * G // 16) * 16  # sublane-aligned for 16-bit dtypes
    work = sch.build_work_table(kv_lens, cu_q_lens, num_seqs, num_tokens=T, tokens_per_block=tpb,
                                block_kv=block_kv, sliding_window=sliding_window)
    W = work.shape[0]
    # [T, N, H] -> [K, T*G (+rows of padding so every tile DMA is in bounds), H]
    q_t = q.reshape(T, K, G, H).transpose(1, 0, 2, 3).reshape(K, T * G, H)
    q_t = jnp.pad(q_t, ((0, 0), (0, rows), (0, 0)))
    cfg = dict(group=G, page_size=S, pages_per_block=ppb, block_kv=block_kv, max_pages=M,
               num_pages=P, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    any_spec = pl.BlockSpec(memory_space=pltpu.HBM)
    out = pl.pallas_call(
        functools.partial(_attention_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(K, W),
            in_specs=[any_spec] * 3,
            out_specs=any_spec,
            scratch_shapes=[
                pltpu.VMEM((rows, H), q.dtype), pltpu.VMEM((rows, H), q.dtype),
                pltpu.VMEM((2, block_kv, H), k_pages.dtype),
                pltpu.VMEM((2, block_kv, H), v_pages.dtype),
                pltpu.SemaphoreType.DMA((2, 2)), pltpu.SemaphoreType.DMA((2,)),
            ]),
        # The work axis must run in order: a tile's overhang is overwritten by the next item.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"ragged_paged_attention_tpu_{ppb=}_{rows=}",
    )(work.reshape(-1), page_table.reshape(-1), q_t, k_pages, v_pages)
    out = out[:, :T * G].reshape(K, T, G, H).transpose(1, 0, 2, 3).reshape(T, N, H)
    live_end = cu_q_lens[jnp.minimum(num_seqs[0], B)]
    return jnp.where((jnp.arange(T) < live_end)[:, None, None], out, 0).astype(q.dtype)
