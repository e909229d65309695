"""Ragged paged attention for NVIDIA Hopper: Pallas on the Mosaic GPU lowering (TMA + wgmma).

Called by the dispatcher in __init__.py with impl="pallas_gpu": one call per layer over a mixed
batch of prefill chunks and decode tokens (see reference.py for the contract).

Design. A tile's 64 rows (wgmma M) are (token, query head) pairs: 64 // G consecutive new tokens
of one sequence times the G = N/K query heads sharing kv head k. A decode token fills G rows, a
prefill chunk all of them, so one kernel serves both and each K/V page is read once per (work item,
kv head). Grid: (work item, kv head[, kv split]). Each CTA (one warpgroup) streams its sequence's kv
blocks through a `num_stages`-deep shared-memory ring filled by TMA, one copy per page (page ids
read from the page table in GMEM one step ahead), and runs wgmma for QK^T and PV with an online
softmax in registers. q is read in place from [T*N, H] (one TMA of G rows per token) and each
token's output rows are stored by their own TMA, so a tile that overhangs the next sequence never
reads or writes its rows; work items past the live sequences zero the tokens no sequence owns.
Small batches split the kv range over several CTAs and merge the partial softmaxes in the wrapper
(log-sum-exp).

Prefill-shaped steps (T > B with enough tiles; `_use_ws`) take a warp-specialized variant instead
(FA3's layout): grid (work pair, kv head), three warpgroups per CTA. Warpgroup 2 (the producer, few
registers) fills one K/V ring for two tiles; warpgroups 0 and 1 each own one tile of the pair and
ping-pong through a shared barrier so one's softmax overlaps the other's wgmma. Heaviest work
pairs go first (causal prefill's long tiles start early).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.ragged_paged_attention import schedule as sch
from kernels_pallas.ragged_paged_attention.reference import ragged_paged_attention_reference

ROWS = 64  # wgmma M: rows of one tile
MASK_INIT = -1e30  # finite start for the running max: fully masked rows give p = 0, never NaN
LOG2E = math.log2(math.e)


def _page_ids(page_table_ref, *, seq, step, cfg):
    """Pages of kv block `step` of `seq`, clamped: blocks past the end read valid pages."""
    ppb = cfg["block_kv"] // cfg["page_size"]
    return tuple(
        jnp.clip(page_table_ref[seq, jnp.minimum(step * ppb + p, cfg["max_pages"] - 1)], 0,
                 cfg["num_pages"] - 1) for p in range(ppb))


def _issue(pages_ref, smem, bar, pages, *, slot, kh, page_size):
    """Start the TMA copies of one K (or V) block (kv head kh) into ring slot `slot`: one copy per
    page (page_size <= block_kv: the wrapper splits bigger pages)."""
    for p, page in enumerate(pages):
        src = (page, pl.ds(0, page_size), kh)
        plgpu.copy_gmem_to_smem(pages_ref.at[src], smem.at[slot, pl.ds(p * page_size, page_size)],
                                bar.at[slot])


def _softmax_step(s, carry, *, kv0, pos0, block_kv, group, sm_scale, soft_cap, sliding_window,
                  masked):
    """Mask (if `masked`) and rescale one [ROWS, block_kv] score tile in the log2 domain;
    returns (p, alpha, m_new, l_new)."""
    acc, m_i, l_i = carry
    if soft_cap is not None:
        s = soft_cap * LOG2E * jnp.tanh(s * (sm_scale / soft_cap))
    else:
        s = s * (sm_scale * LOG2E)
    if masked:
        layout = plgpu.Layout.WGMMA
        row = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=layout)
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=layout)
        pos = pos0 + lax.div(row, jnp.int32(group))  # position of the row's token
        kv = kv0 + col
        mask = kv <= pos
        if sliding_window is not None:
            mask = mask & (kv > pos - sliding_window)
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l_new = l_i * alpha + p.sum(axis=1)
    return p, alpha, m_new, l_new


def _load_q(q_ref, dst_smem, bar, *, tok0, kh, cfg):
    """TMA the G query rows of kv head kh of each of the tile's ROWS // G tokens (token t's are
    rows t*N + kh*G of q [T*N, H]) into dst_smem rows. Tokens past the last are clamped to it
    (rows no one stores), so `bar` always sees ROWS // G arrivals."""
    G, N = cfg["group"], cfg["num_heads"]
    for i in range(ROWS // G):
        t = jnp.minimum(tok0 + i, cfg["num_tokens"] - 1)
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t * N + kh * G, G)],
                                dst_smem.at[pl.ds(i * G, G)], bar)


def _zero_rows(io_smem, o_ref, *, tok0, ntok, kh, cfg):
    """Write zeros for `ntok` tokens of no live sequence (an idle work item's share of them)."""
    io_smem[...] = jnp.zeros(io_smem.shape, io_smem.dtype)
    plgpu.commit_smem()
    _store_rows(io_smem, o_ref, row0=0, tok0=tok0, ntok=ntok, kh=kh, cfg=cfg)


def _pv_operand(p16, p_smem):
    """P as the PV wgmma's A operand: registers when compiled; through p_smem in GPU interpret
    mode, which has no wgmma with A in registers (p_smem is None when compiled)."""
    if p_smem is None:
        return p16
    p_smem[...] = p16
    plgpu.commit_smem()
    return p_smem


def _store_rows(src_smem, dst_ref, *, row0, tok0, ntok, kh, cfg):
    """TMA the G rows of each live token of the tile to GMEM row row0 + token*N + kh*G."""
    G = cfg["group"]
    for i in range(ROWS // G):  # one store per live token: never touch other sequences' rows
        @pl.when(i < ntok)
        def _():
            dst = pl.ds(row0 + (tok0 + i) * cfg["num_heads"] + kh * G, G)
            plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(i * G, G)], dst_ref.at[dst])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _attention_kernel(work_ref, page_table_ref, q_ref, k_ref, v_ref,  # inputs (GMEM)
                      *refs, cfg):
    # work_ref: i32[W, NUM_FIELDS]; page_table_ref: i32[B, M]; q_ref: [T*N, H] (row t*N + head)
    # k_ref, v_ref: [P, S, K, H]
    # outputs, one split: o_ref [T*N, H] (row t*N + head);
    #   several: o_ref, lse_ref f32[splits*T*N, H] (lse broadcast along H)
    # q_smem: [ROWS, H] tiled+swizzled for wgmma; io_smem: [ROWS, H] untiled staging for q and o
    # (their GMEM rows start anywhere, so the TMA cannot target a tiled buffer);
    # k_smem, v_smem: [stages, block_kv, H] tiled+swizzled; f_smem: f32[ROWS, H] (several splits)
    splits = cfg["num_kv_splits"]
    if splits == 1:
        (o_ref, q_smem, k_smem, v_smem, io_smem, q_bar, k_bar, v_bar, *rest), lse_ref = refs, None
    else:
        o_ref, lse_ref, q_smem, k_smem, v_smem, io_smem, q_bar, k_bar, v_bar, f_smem, *rest = refs
    p_smem = rest[0] if rest else None
    w = lax.axis_index("w")
    kh = lax.axis_index("kv_head")
    ntok = work_ref[w, sch.NTOK]
    G, H, block_kv, stages = cfg["group"], cfg["head_dim"], cfg["block_kv"], cfg["num_stages"]
    if splits == 1:  # several splits: the wrapper's merge zeroes those tokens
        @pl.when(work_ref[w, sch.ZERO_NTOK] > 0)
        def _():
            _zero_rows(io_smem, o_ref, tok0=work_ref[w, sch.TOK0],
                       ntok=work_ref[w, sch.ZERO_NTOK], kh=kh, cfg=cfg)

    @pl.when(ntok > 0)
    def _():
        seq, tok0, pos0 = work_ref[w, sch.SEQ], work_ref[w, sch.TOK0], work_ref[w, sch.POS0]
        lo, hi = work_ref[w, sch.KV_LO], work_ref[w, sch.KV_HI]
        if splits > 1:  # this CTA's share of the kv blocks
            chunk = lax.div(hi - lo + splits - 1, jnp.int32(splits))
            lo = lo + lax.axis_index("split") * chunk
            hi = jnp.minimum(hi, lo + chunk)
        _load_q(q_ref, io_smem, q_bar, tok0=tok0, kh=kh, cfg=cfg)
        issue_k = functools.partial(_issue, k_ref, k_smem, k_bar, kh=kh, page_size=cfg["page_size"])
        issue_v = functools.partial(_issue, v_ref, v_smem, v_bar, kh=kh, page_size=cfg["page_size"])
        page_ids = functools.partial(_page_ids, page_table_ref, seq=seq, cfg=cfg)
        for i in range(stages):
            @pl.when(lo + i < hi)
            def _():
                pages = page_ids(step=lo + i)
                issue_k(pages, slot=i)
                issue_v(pages, slot=i)
        plgpu.barrier_wait(q_bar)
        q_smem[...] = io_smem[...]  # re-tile q through registers for wgmma
        plgpu.commit_smem()
        softmax = functools.partial(
            _softmax_step, pos0=pos0, block_kv=block_kv, group=G, sm_scale=cfg["sm_scale"],
            soft_cap=cfg["soft_cap"], sliding_window=cfg["sliding_window"])

        def kv_step(step, carry, masked):
            # Page ids are loaded one step before their TMA is issued, so the GMEM latency of the
            # page-table reads overlaps this step's waits and math instead of stalling the ring.
            *carry, pages_next = carry
            pages_after = page_ids(step=step + stages + 1)
            slot = lax.rem(step - lo, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]
            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
            refill = step + stages < hi
            if cfg["early_k_refill"]:  # K's slot is free once QK^T is done: refill it now
                pl.when(refill)(lambda: issue_k(pages_next, slot=slot))
            p, alpha, m_new, l_new = softmax(s, carry, kv0=step * block_kv, masked=masked)
            acc = carry[0] * lax.broadcast_in_dim(alpha, (ROWS, H), [0])
            plgpu.barrier_wait(v_bar.at[slot])

            p16 = _pv_operand(p.astype(q_smem.dtype), p_smem)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                return acc_ref[...]
            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, H), jnp.float32))

            @pl.when(refill)
            def _():
                if not cfg["early_k_refill"]:
                    issue_k(pages_next, slot=slot)
                issue_v(pages_next, slot=slot)
            return acc, m_new, l_new, pages_after

        layout = plgpu.Layout.WGMMA
        init = (plgpu.layout_cast(jnp.zeros((ROWS, H), jnp.float32), layout),
                plgpu.layout_cast(jnp.full((ROWS,), MASK_INIT, jnp.float32), layout.reduce(1)),
                plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), layout.reduce(1)),
                page_ids(step=lo + stages))
        # Blocks wholly at or before the tile's first position need no causal mask (FA3's split).
        full_hi = jnp.clip((pos0 + 1) // block_kv, lo, hi)
        if cfg["sliding_window"] is not None:
            full_hi = lo
        carry = lax.fori_loop(lo, full_hi, functools.partial(kv_step, masked=False), init)
        acc, m_i, l_i, _ = lax.fori_loop(full_hi, hi, functools.partial(kv_step, masked=True),
                                         carry)
        o = acc / lax.broadcast_in_dim(jnp.where(l_i > 0.0, l_i, 1.0), (ROWS, H), [0])
        store = functools.partial(_store_rows, tok0=tok0, ntok=ntok, kh=kh, cfg=cfg)
        if splits == 1:
            io_smem[...] = o.astype(io_smem.dtype)
            plgpu.commit_smem()
            store(io_smem, o_ref, row0=0)
        else:  # partial result + log2-sum-exp per row, merged by the wrapper
            row0 = lax.axis_index("split") * (cfg["num_tokens"] * cfg["num_heads"])
            f_smem[...] = o
            plgpu.commit_smem()
            store(f_smem, o_ref, row0=row0)
            lse = jnp.where(l_i > 0.0, m_i + jnp.log(l_i) * LOG2E, MASK_INIT)
            f_smem[...] = lax.broadcast_in_dim(lse, (ROWS, H), [0])
            plgpu.commit_smem()
            store(f_smem, lse_ref, row0=row0)


WS_WGS = 2  # compute warpgroups of the warp-specialized kernel; warpgroup WS_WGS is its producer


def _sync(bar):
    """Arrive at and wait on a barrier shared by the compute warpgroups."""
    plgpu.barrier_arrive(bar)
    plgpu.barrier_wait(bar)


def _ws_producer(issue_k, issue_v, page_ids, k_free, v_free, *, lo, hi, stages):
    """Producer warpgroup: fill the ring, then refill each slot once both consumers freed it."""
    plgpu.set_max_registers(40, action="decrease")
    for i in range(stages):
        @pl.when(lo + i < hi)
        def _():
            pages = page_ids(step=lo + i)
            issue_k(pages, slot=i)
            issue_v(pages, slot=i)

    @pl.loop(lo, jnp.maximum(hi - stages, lo))
    def _(step):
        slot = lax.rem(step - lo, jnp.int32(stages))
        pages = page_ids(step=step + stages)  # the page-table loads overlap the waits
        plgpu.barrier_wait(k_free.at[slot])
        issue_k(pages, slot=slot)
        plgpu.barrier_wait(v_free.at[slot])
        issue_v(pages, slot=slot)


def _ws_consumer_loop(q_s, p_s, smem, bars, *, lo, hi, hi_w, pos0, cfg):
    """One compute warpgroup's kv loop (FA3's ping-pong): its QK^T and PV wgmmas alternate with
    the other warpgroup's through the `sched` barrier, so one's softmax overlaps the other's
    matmuls. Steps in [hi_w, hi) are past this warpgroup's causal end: it only drains them (waits
    their loads, frees their slots) so the barrier phases of both warpgroups stay in step.
    Returns (acc, m_i, l_i)."""
    k_smem, v_smem = smem
    k_bar, v_bar, k_free, v_free, sched = bars
    block_kv, stages = cfg["block_kv"], cfg["num_stages"]
    slot_of = lambda step: lax.rem(step - lo, jnp.int32(stages))

    def free(step):
        @pl.when(step + stages < hi)
        def _():
            plgpu.barrier_arrive(k_free.at[slot_of(step)])
            plgpu.barrier_arrive(v_free.at[slot_of(step)])

    def step_fn(step, carry, masked):
        slot = slot_of(step)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_s, k_smem.at[slot].transpose((1, 0)))
            _sync(sched)
            return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
        p, alpha, m_new, l_new = _softmax_step(
            s, carry, kv0=step * block_kv, pos0=pos0, block_kv=block_kv, group=cfg["group"],
            sm_scale=cfg["sm_scale"], soft_cap=cfg["soft_cap"],
            sliding_window=cfg["sliding_window"], masked=masked)
        acc = carry[0] * lax.broadcast_in_dim(alpha, carry[0].shape, [0])
        acc, m_new, l_new, p16 = lax.optimization_barrier((acc, m_new, l_new, p.astype(q_s.dtype)))
        plgpu.barrier_arrive(sched)  # softmax done
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(sched)  # the other warpgroup's QK^T is issued: tensor cores are ours
        p16 = _pv_operand(p16, p_s)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            @pl.when(step + 1 < hi_w)  # next K's wait overlaps this wgmma
            def _():
                plgpu.barrier_wait(k_bar.at[slot_of(step + 1)])
            if p_s is not None:
                return acc_ref[...]
        if p_s is None:  # accumulate into acc in place
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:  # the interpreter cannot discharge run_state over an accumulator
            acc = acc + pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))
        free(step)
        return acc, m_new, l_new

    def drain(step, _):
        plgpu.barrier_wait(k_bar.at[slot_of(step)])
        plgpu.barrier_wait(v_bar.at[slot_of(step)])
        free(step)
        _sync(sched)
        _sync(sched)

    layout = plgpu.Layout.WGMMA
    init = (plgpu.layout_cast(jnp.zeros((ROWS, q_s.shape[-1]), jnp.float32), layout),
            plgpu.layout_cast(jnp.full((ROWS,), MASK_INIT, jnp.float32), layout.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), layout.reduce(1)))
    pl.when(lo < hi_w)(lambda: plgpu.barrier_wait(k_bar.at[0]))
    full_hi = lo if cfg["sliding_window"] is not None else jnp.clip((pos0 + 1) // block_kv, lo,
                                                                     hi_w)
    carry = lax.fori_loop(lo, full_hi, functools.partial(step_fn, masked=False), init)
    carry = lax.fori_loop(full_hi, hi_w, functools.partial(step_fn, masked=True), carry)
    lax.fori_loop(hi_w, hi, drain, None)
    return carry


def _ws_kernel(work_ref, page_table_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem,
               io_smem, q_bar, k_bar, v_bar, k_free, v_free, sched, *p_smem, cfg):
    """Warp-specialized kernel (FA3 layout): a work item is 2 * ROWS rows; compute warpgroup
    wg in {0, 1} owns rows [wg*ROWS, (wg+1)*ROWS), i.e. its ROWS // G tokens, and both share one
    K/V ring that the producer warpgroup fills. Refs as in _attention_kernel, one split only;
    q_smem, io_smem [WS_WGS, ROWS, H] and p_smem [WS_WGS, ROWS, block_kv] are per warpgroup."""
    num_w = work_ref.shape[0]
    w = num_w - 1 - lax.axis_index("w") if cfg["heavy_first"] else lax.axis_index("w")
    kh, wg = lax.axis_index("kv_head"), lax.axis_index("wg")
    G, stages = cfg["group"], cfg["num_stages"]
    tpw = ROWS // G  # tokens per compute warpgroup

    @pl.when((work_ref[w, sch.ZERO_NTOK] > 0) & (wg < WS_WGS))
    def _():
        _zero_rows(io_smem.at[wg], o_ref, tok0=work_ref[w, sch.TOK0] + wg * tpw,
                   ntok=jnp.clip(work_ref[w, sch.ZERO_NTOK] - wg * tpw, 0, tpw), kh=kh, cfg=cfg)

    @pl.when(work_ref[w, sch.NTOK] > 0)
    def _():
        seq, tok0, pos0 = work_ref[w, sch.SEQ], work_ref[w, sch.TOK0], work_ref[w, sch.POS0]
        ntok, lo, hi = work_ref[w, sch.NTOK], work_ref[w, sch.KV_LO], work_ref[w, sch.KV_HI]
        page_ids = functools.partial(_page_ids, page_table_ref, seq=seq, cfg=cfg)

        @pl.when(wg == WS_WGS)
        def _():
            _ws_producer(
                functools.partial(_issue, k_ref, k_smem, k_bar, kh=kh, page_size=cfg["page_size"]),
                functools.partial(_issue, v_ref, v_smem, v_bar, kh=kh, page_size=cfg["page_size"]),
                page_ids, k_free, v_free, lo=lo, hi=hi, stages=stages)

        @pl.when(wg < WS_WGS)
        def _():
            plgpu.set_max_registers(232, action="increase")
            tok0_w, pos0_w = tok0 + wg * tpw, pos0 + wg * tpw
            ntok_w = jnp.clip(ntok - wg * tpw, 0, tpw)
            hi_w = jnp.where(ntok_w > 0, jnp.minimum(hi, (pos0_w + ntok_w - 1) // cfg["block_kv"]
                                                     + 1), lo)
            q_s, io_s = q_smem.at[wg], io_smem.at[wg]
            _load_q(q_ref, io_s, q_bar.at[wg], tok0=tok0_w, kh=kh, cfg=cfg)
            plgpu.barrier_wait(q_bar.at[wg])
            q_s[...] = io_s[...]  # re-tile q through registers for wgmma
            plgpu.commit_smem()
            pl.when(wg == 1)(lambda: _sync(sched))
            acc, _, l_i = _ws_consumer_loop(
                q_s, p_smem[0].at[wg] if p_smem else None, (k_smem, v_smem),
                (k_bar, v_bar, k_free, v_free, sched), lo=lo, hi=hi, hi_w=hi_w, pos0=pos0_w,
                cfg=cfg)
            pl.when(wg == 0)(lambda: _sync(sched))
            o = acc / lax.broadcast_in_dim(jnp.where(l_i > 0.0, l_i, 1.0), acc.shape, [0])
            io_s[...] = o.astype(io_s.dtype)
            plgpu.commit_smem()
            _store_rows(io_s, o_ref, row0=0, tok0=tok0_w, ntok=ntok_w, kh=kh, cfg=cfg)


def _tile_config(head_dim: int, page_size: int, ws: bool) -> tuple[int, int]:
    """(block_kv, num_stages). One-warpgroup kernel: a 64 KiB K/V ring, so two CTAs fit on an SM
    (H100: 64x2 beat 64x3, 64x4 and 128x2 for head_dim 128; benchmarks/KERNEL_NOTES.md). The
    warp-specialized kernel runs one CTA per SM with a 128 KiB ring of 128-token blocks (FA3's)."""
    block_kv = 128 if ws or head_dim <= 64 else 64
    return max(block_kv, min(page_size, 128)), 2


def _num_kv_splits(num_ctas: int, max_kv_blocks: int) -> int:
    """Split each sequence's kv blocks over CTAs when (work items x kv heads) can't fill the GPU."""
    if num_ctas >= 128:
        return 1
    return max(1, min(16, -(-264 // num_ctas), max_kv_blocks // 2))


def _use_ws(T: int, B: int, K: int, G: int) -> bool:
    """Warp-specialized kernel for prefill-shaped steps: more token rows than sequence rows (a
    decode-only step has T == B) and enough 2*ROWS-row work items to fill the GPU unsplit."""
    return T > B and sch.max_work_items(T, B, 2 * (ROWS // G)) * K >= 128


def _launch(q, k_pages, v_pages, page_table, work, *, cfg, ws, interpret):
    """Run one of the two kernels on q [T*N, H]; returns its outputs (see _attention_kernel)."""
    T, N, H, dt = cfg["num_tokens"], cfg["num_heads"], cfg["head_dim"], q.dtype
    block_kv, stages, splits, S = (cfg[k] for k in ("block_kv", "num_stages", "num_kv_splits",
                                                    "page_size"))
    swizzle = plgpu.find_swizzle(64 * jnp.dtype(dt).itemsize * 8)
    tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(swizzle)))
    wgs = WS_WGS if ws else 1
    lead = (wgs,) if ws else ()
    ring = [plgpu.SMEM((stages, block_kv, H), dt, **tiled)] * 2
    loaded = plgpu.Barrier(num_arrivals=block_kv // S, num_barriers=stages)
    scratch = [plgpu.SMEM((*lead, ROWS, H), dt, **tiled), *ring, plgpu.SMEM((*lead, ROWS, H), dt),
               plgpu.Barrier(num_arrivals=ROWS // cfg["group"], num_barriers=wgs), loaded, loaded]
    if ws:  # slot-freed barriers (both consumers arrive) and the ping-pong barrier
        freed = plgpu.Barrier(num_arrivals=WS_WGS, num_barriers=stages)
        scratch += [freed, freed, plgpu.Barrier(num_arrivals=WS_WGS)]
    elif splits > 1:
        scratch.append(plgpu.SMEM((ROWS, H), jnp.float32))
    if interpret:
        scratch.append(plgpu.SMEM((*lead, ROWS, block_kv), dt, **tiled))
    out_type = ([jax.ShapeDtypeStruct((T * N, H), dt)] if splits == 1 else
                [jax.ShapeDtypeStruct((splits * T * N, H), jnp.float32)] * 2)
    grid, names = (work.shape[0], cfg["num_kv_heads"]), ("w", "kv_head")
    if splits > 1:
        grid, names = (*grid, splits), (*names, "split")
    threads = dict(num_threads=WS_WGS + 1, thread_name="wg") if ws else {}
    kernel = plgpu.kernel(
        functools.partial(_ws_kernel if ws else _attention_kernel, cfg=cfg),
        out_type=out_type, scratch_types=scratch, grid=grid, grid_names=names, **threads,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name=(f"ragged_paged_attention_{'ws' if ws else 'wg'}_bkv{block_kv}_st{stages}"
                     f"_g{cfg['group']}_sp{splits}"),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return kernel(work, page_table, q, k_pages, v_pages)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_kv",
                                             "num_stages", "num_kv_splits", "early_k_refill",
                                             "warp_specialized", "heavy_first", "interpret"))
def ragged_paged_attention_mosaic(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                                  sm_scale: float, sliding_window: int | None = None,
                                  soft_cap: float | None = None, block_kv: int | None = None,
                                  num_stages: int | None = None, num_kv_splits: int | None = None,
                                  early_k_refill: bool = False,
                                  warp_specialized: bool | None = None, heavy_first: bool = True,
                                  interpret: bool = False):
    """The Mosaic GPU kernels (16-bit dtypes only). Args and result as in the reference.

    warp_specialized: the FA3-style kernel (two compute warpgroups + a producer, for prefill)
    instead of the one-warpgroup kernel (decode); default by shape (_use_ws).
    block_kv, num_stages: kv tile and TMA ring depth; num_kv_splits: CTAs per (work item, kv head),
    merged by a log-sum-exp combine (one-warpgroup kernel only; default: enough to fill the GPU
    at small batch); early_k_refill: refill a K slot right after QK^T instead of after PV
    (one-warpgroup kernel); heavy_first: the warp-specialized kernel runs the last work items
    (the longest causal spans) first."""
    T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    B, M = page_table.shape
    if N % K:
        raise ValueError(f"num_q_heads={N} must be divisible by num_kv_heads={K}")
    G = N // K
    if G > ROWS:
        raise ValueError(f"{G=} query heads per kv head must be <= {ROWS}")
    if H % 64:
        raise ValueError(f"head_dim={H} must be a multiple of 64")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"{q.dtype=} must be bfloat16 or float16 for the Mosaic GPU kernel")
    ws = _use_ws(T, B, K, G) if warp_specialized is None else warp_specialized
    if ws and (num_kv_splits or 1) > 1:
        raise ValueError(f"{num_kv_splits=}: the warp-specialized kernel does not split kv")
    dflt_kv, dflt_stages = _tile_config(H, S, ws)
    block_kv, num_stages = block_kv or dflt_kv, num_stages or dflt_stages
    if block_kv % 64 or (block_kv % S and S % block_kv):
        raise ValueError(f"{block_kv=} must be a multiple of 64 and of or divide page_size={S}")
    if S > block_kv:  # view each page as S // block_kv pages of block_kv slots
        split = S // block_kv
        k_pages = k_pages.reshape(P * split, block_kv, K, H)
        v_pages = v_pages.reshape(P * split, block_kv, K, H)
        page_table = (page_table[:, :, None] * split + jnp.arange(split)).reshape(B, M * split)
        P, S, M = P * split, block_kv, M * split
    wgs = WS_WGS if ws else 1
    work = sch.build_work_table(kv_lens, cu_q_lens, num_seqs, num_tokens=T,
                                tokens_per_block=wgs * (ROWS // G), block_kv=block_kv,
                                sliding_window=sliding_window)
    W = work.shape[0]
    # Interpret mode runs CTAs one by one on CPU: no splitting unless asked for.
    splits = 1 if ws else num_kv_splits or (
        1 if interpret else _num_kv_splits(W * K, -(-M * S // block_kv)))
    cfg = dict(group=G, head_dim=H, block_kv=block_kv, num_stages=num_stages, page_size=S,
               num_pages=P, max_pages=M, num_tokens=T, num_heads=N, num_kv_heads=K,
               sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
               num_kv_splits=splits, early_k_refill=early_k_refill, heavy_first=heavy_first)
    outs = _launch(q.reshape(T * N, H), k_pages, v_pages, page_table, work, cfg=cfg, ws=ws,
                   interpret=interpret)
    if splits == 1:  # the kernel wrote every token, zeros for those of no live sequence
        return outs[0].reshape(T, N, H)
    # Merge the partial softmaxes (log2 domain) and zero the tokens of no live sequence.
    o_part = outs[0].reshape(splits, T, N, H)
    lse = outs[1].reshape(splits, T, N, H)[..., :1]
    m = jnp.max(lse, axis=0)
    wgt = jnp.exp2(lse - m)
    out = jnp.sum(wgt * o_part, axis=0) / jnp.sum(wgt, axis=0)
    live_end = cu_q_lens[jnp.minimum(num_seqs[0], B)]
    return jnp.where((jnp.arange(T) < live_end)[:, None, None], out, 0).astype(q.dtype)


def ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, interpret: bool = False):
    """Ragged paged attention on Hopper. Args as in reference.ragged_paged_attention_reference.

    bf16/f16 with head_dim % 64 == 0 run the Mosaic GPU kernel; float32 (wgmma has no f32 operands
    here) and other head dims fall back to the XLA reference.
    """
    H = q.shape[-1]
    if q.dtype in (jnp.bfloat16, jnp.float16) and H % 64 == 0:
        return ragged_paged_attention_mosaic(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret)
    return ragged_paged_attention_reference(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
