"""Fully fused LRP passes of Linear and Conv1d/2d/3d layers as implicit GEMMs.

Every rule of a linear layer is described to the kernels by numbers, not by modified weights
(docs/triton.md, "The rule as coefficients"):

* The sample-dependent products, formed from the input and weight tiles as they are loaded:
  Y = f(x; W), PP = f(x+; W+), PN = f(x+; W-), NP = f(x-; W+), NN = f(x-; W-).
* Up to two sample-free "bound" products K_j = f(b_j; M_j(W)) with b_j a tensor broadcast to
  x (ones for Flat/WSquare, the ZBox bounds) and M_j(W) = a W+ + b W- + c W^2 + d.
* Up to two denominator groups: z_g = sum_p coef[g, p] * product_p (+ K_0 + K_1 for g = 0) + zbias_g.

The forward kernel writes the layer output y and every z_g in one pass; the relevance kernel
is the transposed implicit GEMM f^T, whose prologue forms s_g = c_g mask_g R / stab(z_g) from
R and z as they are loaded, and whose epilogue multiplies by the modified input (x, x+, x-, b_j)
and sums the parts. No W+, W-, x+ or x- tensor is ever written to memory.

Tensors are seen as 5-d (N, C, D, H, W) through their strides, so 1d/2d layers (unit dims),
Linear layers (1x1x1 "images"), contiguous and channels-last layouts all take the same code.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

PRODUCTS = ("y", "pp", "pn", "np", "nn")  # column order of the per-group coefficients
MASK_NONE, MASK_POSITIVE, MASK_NEGATIVE = 0, 1, 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The tile shapes the autotuner may try (BM, BN, BK, warps, stages), in the order the untuned path prefers
# them (the first one choosable for the kernel variant runs where nothing may be tuned). 64x64x32 first: it
# is choosable for every variant but the four-product ones on NCHW inputs and keeps enough programs in
# flight for small layers. 64x64x32 with 8 warps holds half the accumulators per thread: the tile for
# Gamma/AlphaBeta on a signed input, where the 4-warp tiles spill. 64x32x32 and 32x32x32 left the list
# (K loops over issue/MMA 2 on sm_90; 32x32x32 spilled in float32: docs/gpu.md).
CONFIG_SHAPES = ((64, 64, 32, 4, 4), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
                 (64, 64, 32, 8, 3), (32, 32, 16, 2, 2))
# The tile that compiles without spills for every rule, dtype and target the static checks cover
# (bench/gpu_static): the last resort, where no other config is choosable. Kept last in the list.
SAFE_SHAPE = (32, 32, 16, 2, 2)
SAFE_CONFIG = CONFIG_SHAPES.index(SAFE_SHAPE)


def shape_tier(shape) -> int:
    """The autotuner tries only the lowest tier that has a choosable config (``choosable``). A K step's
    issue time grows with the instructions each warp issues, its tensor-core time with the tile, so the
    fewer outputs per warp, the more issue per tensor-core clock: 0 for tiles with at least 1024 outputs
    per warp, 1 for fewer (64x64 on 8 warps), 2 for the safe tile."""
    bm, bn, _, warps, _ = shape
    if tuple(shape) == SAFE_SHAPE:
        return 2
    return 0 if bm * bn >= 1024 * warps else 1


def config_tier(config) -> int:
    k = config.kwargs
    return shape_tier((k["BM"], k["BN"], k["BK"], config.num_warps, config.num_stages))


def _configs():
    # The interpreter runs every program in Python: one small tile, no tuning.
    if interpreting():
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=1)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in CONFIG_SHAPES]


# The tuning key: sizes, the rule's compile-time switches (a 1-product ZPlus tile is not the best
# 4-product Gamma tile), conv groups (CG, OG) and the layout (channel and innermost strides of x).
# Tensor dtypes are added by Triton itself. Names a kernel lacks are skipped.
_AUTOTUNE_KEY = ["N", "C", "D", "H", "W", "O", "OD", "OH", "OW", "KD", "KH", "KW", "SD", "SH", "SW", "PD", "PH",
                 "PW", "DD", "DH", "DW", "CG", "OG", "sxc", "sxw", "EVEN_C", "NONNEGATIVE", "NEED_Y", "NEED_PP", "NEED_PN", "NEED_NP",
                 "NEED_NN", "Y_FROM_PARTS", "HAS_B0", "HAS_B1", "GROUPS_Z", "MASK0", "MASK1", "WRITE_Z", "PREC"]

# A config that spills registers to local memory (more than this many bytes per thread) is never chosen:
# every spilled value in the K loop is an extra local load/store per step. Zero: the safe tile shows
# that every kernel variant has a spill-free config (bench/gpu_static checks it per target).
MAX_SPILL_BYTES = 0


def choosable(configs, resources, shared_limit: int, tier=lambda config: 0):
    """The configs the autotuner may pick: no spills, shared memory within ``shared_limit``, and of
    those only the lowest ``tier`` (``config_tier``), so a tile whose K loop issues more instructions per
    tensor-core clock is never benchmarked where a better one qualifies.
    Order is kept (``untuned_config`` takes the first).

    ``resources(config)`` -> (spill bytes, shared bytes) of that config's compiled kernel, or None
    where it does not compile. Used at run time (the device's compile) and by the static checks
    (ahead-of-time compiles for sm_80/sm_90), so both apply one rule. Where no config qualifies, the
    one with the fewest spills among those that fit is kept (the static checks fail on that case)."""
    stats = [(c, resources(c)) for c in configs]
    fits = [(c, r) for c, r in stats if r is not None and r[1] <= shared_limit]
    clean = [c for c, r in fits if r[0] <= MAX_SPILL_BYTES]
    if clean:
        best = min(tier(c) for c in clean)
        return [c for c in clean if tier(c) == best]
    return [min(fits, key=lambda cr: cr[1][0])[0]] if fits else list(configs)


def untuned_config(configs, resources, shared_limit: int, tier=lambda config: 0):
    """The config that runs where nothing may be tuned: the first choosable one in ``configs``' order
    (``CONFIG_SHAPES``: the preference order), the last (the safe tile) where none compiles."""
    if all(resources(c) is None for c in configs):
        return configs[-1]
    return choosable(configs, resources, shared_limit, tier)[0]


def _device_resources(jit, named_args, kwargs, config):
    """(spill bytes, shared bytes) of ``config`` compiled for the current device, None if it fails."""
    # the autotuner hands the launch's own grid and warmup flag along with the kernel's constexprs
    flags = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    try:
        compiled = jit.warmup(*named_args.values(), grid=(1,), **flags, **config.all_kwargs())
        compiled._init_handles()  # loads the binary: the driver reports local (spill) bytes / 4
    except Exception:  # noqa: BLE001  (out of resources, a compile error: not a candidate)
        return None
    return 4 * int(compiled.n_spills), int(compiled.metadata.shared)


def _shared_limit():
    from triton.runtime import driver
    device = driver.active.get_current_device()
    return driver.active.utils.get_device_properties(device)["max_shared_mem"]


def _memoized(resources):
    cache = {}

    def lookup(config):
        if id(config) not in cache:
            cache[id(config)] = resources(config)
        return cache[id(config)]
    return lookup


def _resource_pruner(kernel_name: str):
    """early_config_prune of one autotuned kernel (looked up by name: it is defined below)."""
    def prune(configs, named_args, **kwargs):
        if interpreting() or len(configs) <= 1:
            return configs
        jit = globals()[kernel_name].fn
        resources = _memoized(lambda c: _device_resources(jit, named_args, kwargs, c))
        return choosable(configs, resources, _shared_limit(), config_tier)
    return prune


@triton.jit
def _split(t):
    zero = tl.zeros_like(t)  # the dot operands keep the tensor's precision (cast: the interpreter promotes)
    return tl.maximum(t, zero).to(t.dtype), tl.minimum(t, zero).to(t.dtype)


@triton.jit
def _bound_weight(w, valid, a, b, c, d):
    """M(W) = a W+ + b W- + c W^2 + d, zero outside the weight (masked lanes)."""
    wf = w.to(tl.float32)
    m = a * tl.maximum(wf, 0.0) + b * tl.minimum(wf, 0.0) + c * wf * wf + d * valid.to(tl.float32)
    return m.to(w.dtype)


@triton.autotune(configs=_configs(), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _resource_pruner("_lrp_forward_kernel")})
@triton.jit
def _lrp_forward_kernel(
        x_ptr, wk_ptr, bias_ptr, zbias_ptr, b0_ptr, b1_ptr, y_ptr, z_ptr,
        N, C, D, H, W, O, OD, OH, OW, CG, OG, CGP, svar,
        sxn, sxc, sxd, sxh, sxw,
        sb0n, sb0c, sb0d, sb0h, sb0w,
        sb1n, sb1c, sb1d, sb1h, sb1w,
        syn, syc, syd, syh, syw,
        szn, szc, szd, szh, szw,
        g0y, g0pp, g0pn, g0np, g0nn, g1y, g1pp, g1pn, g1np, g1nn,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SD: tl.constexpr, SH: tl.constexpr,
        SW: tl.constexpr, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DD: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, EVEN_C: tl.constexpr, NONNEGATIVE: tl.constexpr,
        SLOT_W: tl.constexpr, SLOT_WP: tl.constexpr, SLOT_WN: tl.constexpr, SLOT_M0: tl.constexpr,
        SLOT_M1: tl.constexpr,
        NEED_Y: tl.constexpr, NEED_PP: tl.constexpr, NEED_PN: tl.constexpr, NEED_NP: tl.constexpr,
        NEED_NN: tl.constexpr, Y_FROM_PARTS: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_ZBIAS: tl.constexpr, WRITE_Z: tl.constexpr, GROUPS_Z: tl.constexpr,
        PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # rows: output positions (n, od, oh, ow); columns: output channels of conv group g. The reduction
    # runs tap by tap (outer loop) and, inside a tap, over the group's input channels in BK blocks: the
    # row tile's input offsets and padding mask are formed once per tap, and the K loop itself only
    # advances two pointers. The weights come packed per variant (W, W+, W-, M_0, M_1) as
    # (conv group, tap, channel, output) by pack_weights, so the B tiles need no modifier work.
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < N * OD * OH * OW
    n_ok = rn < OG
    ow = rm % OW
    rest = rm // OW
    oh = rest % OH
    rest = rest // OH
    od = rest % OD
    nb = rest // OD
    id0, ih0, iw0 = od * SD - PD, oh * SH - PH, ow * SW - PW
    x_rows = nb * sxn + g * CG * sxc
    b0_rows = nb * sb0n + g * CG * sb0c
    b1_rows = nb * sb1n + g * CG * sb1c
    w_tile = (g * KD * KH * KW * CGP + rk)[:, None] * OG + rn[None, :]

    acc_y = tl.zeros((BM, BN), tl.float32)
    acc_pp = tl.zeros((BM, BN), tl.float32)
    acc_pn = tl.zeros((BM, BN), tl.float32)
    acc_np = tl.zeros((BM, BN), tl.float32)
    acc_nn = tl.zeros((BM, BN), tl.float32)
    acc_k0 = tl.zeros((BM, BN), tl.float32)
    acc_k1 = tl.zeros((BM, BN), tl.float32)
    for tap in range(KD * KH * KW):
        # once per tap: where the row tile reads (divisors are compile-time constants)
        i_d = id0 + (tap // (KH * KW)) * DD
        i_h = ih0 + (tap // KW % KH) * DH
        i_w = iw0 + (tap % KW) * DW
        # zero padding: out-of-range taps read 0 for every modified input alike
        row_ok = m_ok & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        x_ptrs = x_ptr + (x_rows + i_d * sxd + i_h * sxh + i_w * sxw)[:, None] + (rk * sxc)[None, :]
        b0_ptrs = b0_ptr + (b0_rows + i_d * sb0d + i_h * sb0h + i_w * sb0w)[:, None] + (rk * sb0c)[None, :]
        b1_ptrs = b1_ptr + (b1_rows + i_d * sb1d + i_h * sb1h + i_w * sb1w)[:, None] + (rk * sb1c)[None, :]
        w_ptrs = wk_ptr + tap * CGP * OG + w_tile
        for c0 in range(0, CG, BK):
            # the K loop: dense tiles, pointer increments, masks that change only at the channel edge
            if EVEN_C:
                a_ok = row_ok[:, None]
            else:
                a_ok = row_ok[:, None] & (rk < CG - c0)[None, :]
            w_ok = n_ok[None, :]  # rows past CG are zero in the packed weights
            if NEED_Y or NEED_PP or NEED_PN or NEED_NP or NEED_NN:
                x = tl.load(x_ptrs, mask=a_ok, other=0.0)
                if NEED_Y:
                    acc_y = tl.dot(x, tl.load(w_ptrs + SLOT_W * svar, mask=w_ok, other=0.0), acc_y,
                                   input_precision=PREC)
                if NEED_PP or NEED_PN or NEED_NP or NEED_NN:
                    if NONNEGATIVE:  # x >= 0 (after a ReLU, from the graph): x+ is x, used as loaded
                        xp, xn = x, x
                    else:
                        xp, xn = _split(x)  # the input modifiers, once per K step for every product
                    if NEED_PP or NEED_NP:
                        wp = tl.load(w_ptrs + SLOT_WP * svar, mask=w_ok, other=0.0)
                        if NEED_PP:
                            acc_pp = tl.dot(xp, wp, acc_pp, input_precision=PREC)
                        if NEED_NP:
                            acc_np = tl.dot(xn, wp, acc_np, input_precision=PREC)
                    if NEED_PN or NEED_NN:
                        wn = tl.load(w_ptrs + SLOT_WN * svar, mask=w_ok, other=0.0)
                        if NEED_PN:
                            acc_pn = tl.dot(xp, wn, acc_pn, input_precision=PREC)
                        if NEED_NN:
                            acc_nn = tl.dot(xn, wn, acc_nn, input_precision=PREC)
            if HAS_B0:
                acc_k0 = tl.dot(tl.load(b0_ptrs, mask=a_ok, other=0.0),
                                tl.load(w_ptrs + SLOT_M0 * svar, mask=w_ok, other=0.0), acc_k0, input_precision=PREC)
            if HAS_B1:
                acc_k1 = tl.dot(tl.load(b1_ptrs, mask=a_ok, other=0.0),
                                tl.load(w_ptrs + SLOT_M1 * svar, mask=w_ok, other=0.0), acc_k1, input_precision=PREC)
            x_ptrs += BK * sxc
            b0_ptrs += BK * sb0c
            b1_ptrs += BK * sb1c
            w_ptrs += BK * OG

    ch = g * OG + rn
    out_ok = m_ok[:, None] & n_ok[None, :]
    if Y_FROM_PARTS:  # W+ + W- = W: the split products already hold the output
        y = acc_pp + acc_pn + acc_np + acc_nn
    else:
        y = acc_y
    if HAS_BIAS:
        y += tl.load(bias_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = nb[:, None] * syn + ch[None, :] * syc + (od * syd + oh * syh + ow * syw)[:, None]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=out_ok)
    if WRITE_Z:
        z_off = nb[:, None] * szn + ch[None, :] * szc + (od * szd + oh * szh + ow * szw)[:, None]
        z0 = g0y * acc_y + g0pp * acc_pp + g0pn * acc_pn + g0np * acc_np + g0nn * acc_nn + acc_k0 + acc_k1
        if HAS_ZBIAS:
            z0 += tl.load(zbias_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + z_off, z0.to(z_ptr.dtype.element_ty), mask=out_ok)
        if GROUPS_Z == 2:
            z1 = g1y * acc_y + g1pp * acc_pp + g1pn * acc_pn + g1np * acc_np + g1nn * acc_nn
            if HAS_ZBIAS:
                z1 += tl.load(zbias_ptr + O + ch, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(z_ptr + O * szc + z_off, z1.to(z_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _stabilized_share(r, z, y, coefficient, epsilon, MASK: tl.constexpr):
    """c * mask(y) * R / stab(z), stab(z) = z + eps * sign(z) with sign(0) = +1."""
    s = coefficient * r / (z + tl.where(z >= 0, epsilon, -epsilon))
    if MASK == 1:
        s = tl.where(y > 0, s, 0.0)
    if MASK == 2:
        s = tl.where(y < 0, s, 0.0)
    return s


@triton.autotune(configs=_configs(), key=_AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _resource_pruner("_lrp_relevance_kernel")})
@triton.jit
def _lrp_relevance_kernel(
        x_ptr, w_ptr, r_ptr, z_ptr, y_ptr, b0_ptr, b1_ptr, out_ptr,
        N, C, D, H, W, O, OD, OH, OW, CG, OG,
        KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
        sxn, sxc, sxd, sxh, sxw,
        sb0n, sb0c, sb0d, sb0h, sb0w,
        sb1n, sb1c, sb1d, sb1h, sb1w,
        srn, src, srd, srh, srw,
        szn, szc, szd, szh, szw,
        syn, syc, syd, syh, syw,
        son, soc, sod, soh, sow,
        g0y, g0pp, g0pn, g0np, g0nn, g1y, g1pp, g1pn, g1np, g1nn,
        m0a, m0b, m0c, m0d, m1a, m1b, m1c, m1d,
        c0, c1, epsilon,
        NEED_Y: tl.constexpr, NEED_PP: tl.constexpr, NEED_PN: tl.constexpr, NEED_NP: tl.constexpr,
        NEED_NN: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, GROUPS_Z: tl.constexpr,
        MASK0: tl.constexpr, MASK1: tl.constexpr,
        PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # rows: input positions (n, id, ih, iw); columns: input channels of conv group g;
    # reduction: (output channel of the group, kd, kh, kw), taps that land between strides skipped
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < N * D * H * W
    c_ok = rc < CG
    iw = rm % W
    rest = rm // W
    ih = rest % H
    rest = rest // H
    i_d = rest % D
    nb = rest // D
    kvol = KD * KH * KW
    kg = CG * kvol
    kt = OG * kvol

    acc_x = tl.zeros((BM, BN), tl.float32)
    acc_pos = tl.zeros((BM, BN), tl.float32)
    acc_neg = tl.zeros((BM, BN), tl.float32)
    acc_k0 = tl.zeros((BM, BN), tl.float32)
    acc_k1 = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, kt, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < kt
        o = rk // kvol
        tap = rk % kvol
        r = tap
        kw = r % KW
        r = r // KW
        kh = r % KH
        kd = r // KH
        td = i_d[:, None] + PD - kd[None, :] * DD
        th = ih[:, None] + PH - kh[None, :] * DH
        tw = iw[:, None] + PW - kw[None, :] * DW
        o_d, o_h, o_w = td // SD, th // SH, tw // SW
        hit = (m_ok[:, None] & k_ok[None, :] & (td >= 0) & (td % SD == 0) & (o_d < OD) & (th >= 0)
               & (th % SH == 0) & (o_h < OH) & (tw >= 0) & (tw % SW == 0) & (o_w < OW))
        ch = (g * OG + o)[None, :]
        pos = nb[:, None]
        # prologue: the stabilized division, from R and z as they are read
        rel = tl.load(r_ptr + pos * srn + ch * src + o_d * srd + o_h * srh + o_w * srw, mask=hit,
                      other=0.0).to(tl.float32)
        z_off = pos * szn + ch * szc + o_d * szd + o_h * szh + o_w * szw
        y_off = pos * syn + ch * syc + o_d * syd + o_h * syh + o_w * syw
        y = rel
        if MASK0 != 0 or MASK1 != 0:
            y = tl.load(y_ptr + y_off, mask=hit, other=0.0).to(tl.float32)
        z0 = tl.load(z_ptr + z_off, mask=hit, other=1.0).to(tl.float32)
        s0 = _stabilized_share(rel, z0, y, c0, epsilon, MASK0)
        s1 = tl.zeros_like(s0)
        if GROUPS_Z == 2:
            z1 = tl.load(z_ptr + O * szc + z_off, mask=hit, other=1.0).to(tl.float32)
            s1 = _stabilized_share(rel, z1, y, c1, epsilon, MASK1)

        w_ok = k_ok[:, None] & c_ok[None, :]
        w = tl.load(w_ptr + ((g * OG + o) * kg + tap)[:, None] + (rc * kvol)[None, :], mask=w_ok, other=0.0)
        dt = w.dtype
        if NEED_Y:
            acc_x = tl.dot((g0y * s0 + g1y * s1).to(dt), w, acc_x, input_precision=PREC)
        if NEED_PP or NEED_PN or NEED_NP or NEED_NN:
            wp, wn = _split(w)
            if NEED_PP:
                acc_pos = tl.dot((g0pp * s0 + g1pp * s1).to(dt), wp, acc_pos, input_precision=PREC)
            if NEED_PN:
                acc_pos = tl.dot((g0pn * s0 + g1pn * s1).to(dt), wn, acc_pos, input_precision=PREC)
            if NEED_NP:
                acc_neg = tl.dot((g0np * s0 + g1np * s1).to(dt), wp, acc_neg, input_precision=PREC)
            if NEED_NN:
                acc_neg = tl.dot((g0nn * s0 + g1nn * s1).to(dt), wn, acc_neg, input_precision=PREC)
        if HAS_B0:
            acc_k0 = tl.dot(s0.to(dt), _bound_weight(w, w_ok, m0a, m0b, m0c, m0d), acc_k0, input_precision=PREC)
        if HAS_B1:
            acc_k1 = tl.dot(s0.to(dt), _bound_weight(w, w_ok, m1a, m1b, m1c, m1d), acc_k1, input_precision=PREC)

    # epilogue: multiply by the modified inputs and sum the parts
    ci = (g * CG + rc)[None, :]
    sp = nb[:, None]
    out_ok = m_ok[:, None] & c_ok[None, :]
    rel_in = tl.zeros((BM, BN), tl.float32)
    if NEED_Y or NEED_PP or NEED_PN or NEED_NP or NEED_NN:
        x = tl.load(x_ptr + sp * sxn + ci * sxc + (i_d * sxd + ih * sxh + iw * sxw)[:, None], mask=out_ok,
                    other=0.0).to(tl.float32)
        rel_in += x * acc_x + tl.maximum(x, 0.0) * acc_pos + tl.minimum(x, 0.0) * acc_neg
    if HAS_B0:
        b0 = tl.load(b0_ptr + sp * sb0n + ci * sb0c + (i_d * sb0d + ih * sb0h + iw * sb0w)[:, None],
                     mask=out_ok, other=0.0).to(tl.float32)
        rel_in += b0 * acc_k0
    if HAS_B1:
        b1 = tl.load(b1_ptr + sp * sb1n + ci * sb1c + (i_d * sb1d + ih * sb1h + iw * sb1w)[:, None],
                     mask=out_ok, other=0.0).to(tl.float32)
        rel_in += b1 * acc_k1
    tl.store(out_ptr + sp * son + ci * soc + (i_d * sod + ih * soh + iw * sow)[:, None],
             rel_in.to(out_ptr.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------- host launchers

def _strides(t):
    return tuple(t.stride())


def _capturing() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tune_key(autotuned, args, kwargs) -> tuple:
    """The autotuner's own cache key: the key names' values, then the dtypes of the tensor arguments."""
    named = {**dict(zip(autotuned.arg_names, args)), **kwargs}
    key = [named[k] for k in autotuned.keys if k in named]
    key += [str(v.dtype) for k, v in named.items() if k in autotuned.arg_names and hasattr(v, "dtype")]
    return tuple(key)


def _tuned(autotuned, args, kwargs) -> bool:
    """Whether the autotuner already holds a config for these arguments."""
    return _tune_key(autotuned, args, kwargs) in autotuned.cache


def tuning_enabled() -> bool:
    """``FASTLRP_TRITON_TUNE=0`` runs the first choosable config untuned (no benchmark of every config per
    layer shape)."""
    return os.environ.get("FASTLRP_TRITON_TUNE", "1") != "0"


_UNTUNED = {}  # (kernel, device, tuning key) -> the config untuned launches run


def _untuned_choice(autotuned, args, kwargs):
    """``untuned_config`` for this launch on the current device, once per key, made outside a CUDA-graph
    capture: reading a candidate's spills loads its binary, and a module load inside a capture may
    invalidate it. A capture that meets a key with no choice made yet (no launch before the capture, which
    torch's CUDA-graph guide asks for anyway) runs the safe tile. Where the device cannot be asked (no
    driver), nothing compiles and the safe tile runs."""
    configs = autotuned.configs
    try:
        device = _current_device()
        key = (id(autotuned), device, _tune_key(autotuned, args, kwargs))
        if key in _UNTUNED:
            return _UNTUNED[key]
        if _capturing():
            return configs[-1]
        limit = _shared_limit()
    except Exception:  # noqa: BLE001  (no active driver)
        return configs[-1]
    named = dict(zip(autotuned.arg_names, args))
    resources = _memoized(lambda c: _device_resources(autotuned.fn, named, kwargs, c))
    _UNTUNED[key] = untuned_config(configs, resources, limit, config_tier)
    return _UNTUNED[key]


def _current_device():
    from triton.runtime import driver
    return driver.active.get_current_device()


def _launch(autotuned, grid, args, kwargs, wrap):
    """Launch through the autotuner, except inside a CUDA-graph capture for a key it has not tuned
    (benchmarking there would record the trial launches into the graph, or fail) and where tuning is
    off: then the first choosable config in preference order runs untuned (``untuned_config``)."""
    kernel = autotuned
    untuned = not tuning_enabled() or (_capturing() and not _tuned(autotuned, args, kwargs))
    if len(autotuned.configs) > 1 and untuned:
        config = _untuned_choice(autotuned, args, kwargs)
        kernel, kwargs = autotuned.fn, {**kwargs, **config.all_kwargs()}
    (kernel if wrap is None else wrap(kernel))[grid](*args, **kwargs)


def _needs(coefficients):
    """Which products some group uses (a zero column is never computed)."""
    return [any(coefficients[g * 5 + p] != 0.0 for g in range(2)) for p in range(5)]


def _precision(dtype, allow_tf32: bool):
    import torch
    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def _geometry(x, weight, y, stride, padding, dilation, groups):
    n, c, d, h, w = x.shape
    o, _, kd, kh, kw = weight.shape
    return (n, c, d, h, w, o, y.shape[2], y.shape[3], y.shape[4], c // groups, o // groups, kd, kh, kw,
            *stride, *padding, *dilation)


# The packed weights' channel rows are padded to a multiple of the largest BK with zeros, so the B tiles
# are never masked along K (x's tile is: its channels past CG are another group's or out of bounds).
_MAX_BK = max(shape[2] for shape in CONFIG_SHAPES)
WEIGHT_VARIANTS = ("w", "w+", "w-", "m0", "m1")  # W, W+, W-, and the bound products' M_0(W), M_1(W)


def forward_plan(coefficients, nonnegative_input: bool, has_bound0: bool, has_bound1: bool):
    """(weight variants the forward kernel reads, in pack order; its product switches)."""
    _, need_pp, need_pn, need_np, need_nn = _needs(coefficients)  # y itself is always needed
    # the output from the split products: all four, or the two that exist when x- = 0
    parts_hold_y = (need_pp and need_pn and need_np and need_nn) or (nonnegative_input and need_pp and need_pn
                                                                    and not need_np and not need_nn)
    used = {"w": not parts_hold_y, "w+": need_pp or need_np, "w-": need_pn or need_nn, "m0": has_bound0,
            "m1": has_bound1}
    flags = dict(NEED_Y=not parts_hold_y, NEED_PP=need_pp, NEED_PN=need_pn, NEED_NP=need_np, NEED_NN=need_nn,
                 Y_FROM_PARTS=parts_hold_y, HAS_B0=has_bound0, HAS_B1=has_bound1)
    return [name for name in WEIGHT_VARIANTS if used[name]], flags


def packed_shape(weight_shape, groups: int, variants) -> tuple:
    """(variants, conv groups, taps, channels per group padded to the largest BK, outputs per group)."""
    taps = 1
    for k in weight_shape[2:]:
        taps *= k
    cgp = -(-weight_shape[1] // _MAX_BK) * _MAX_BK
    return (len(variants), groups, taps, cgp, weight_shape[0] // groups)


def pack_weights(weight, groups: int, variants, bound_modifiers):
    """The forward kernel's weights: per variant (W, W+, W-, M_j = a W+ + b W- + c W^2 + d, the last in
    float32 before rounding to the weight's dtype), laid out (conv group, tap, input channel, output), so a
    K step reads one dense (BK x BN) tile per variant with contiguous outputs. Built once per layer
    (the Triton backend caches it with the layer's other derived weights)."""
    import torch
    o, cg = weight.shape[:2]
    w = weight.reshape(groups, o // groups, cg, -1).permute(0, 3, 2, 1)  # (G, taps, CG, OG)
    out = torch.zeros(packed_shape(weight.shape, groups, variants), dtype=weight.dtype, device=weight.device)
    for slot, name in enumerate(variants):
        if name == "w":
            v = w
        elif name == "w+":
            v = w.clamp(min=0)
        elif name == "w-":
            v = w.clamp(max=0)
        else:
            a, b, c, d = bound_modifiers[:4] if name == "m0" else bound_modifiers[4:]
            wf = w.float()
            v = a * wf.clamp(min=0) + b * wf.clamp(max=0) + c * wf * wf + d
        out[slot, :, :, :cg] = v
    return out


def launch_forward(x, weight, packed, bias, z_bias, bound0, bound1, y, z, coefficients, bound_modifiers,
                   groups_z: int, nonnegative_input: bool, stride, padding, dilation, groups: int,
                   allow_tf32: bool = False, wrap=None):
    """Write y = f(x; W, b) and z_g (channels g*O .. (g+1)*O of z) for 5-d views; ``z`` None: z_0 is y.

    ``coefficients``: 10 floats, per group (y, pp, pn, np, nn); ``bound_modifiers``: 8 floats,
    (a, b, c, d) of M_0 and M_1; ``packed``: ``pack_weights`` of ``weight`` for ``forward_plan``'s
    variants. ``wrap``: torch.library.wrap_triton inside a triton_op."""
    variants, flags = forward_plan(coefficients, nonnegative_input, bound0 is not None, bound1 is not None)
    if tuple(packed.shape) != packed_shape(weight.shape, groups, variants):
        raise ValueError(f"packed weights of shape {tuple(packed.shape)}, expected "
                         f"{packed_shape(weight.shape, groups, variants)} (pack_weights)")
    n, c, d, h, w = x.shape
    o, cg, kd, kh, kw = weight.shape
    od, oh, ow = y.shape[2:]
    m_rows, og = n * od * oh * ow, o // groups
    b0, b1 = (bound0 if bound0 is not None else x), (bound1 if bound1 is not None else x)
    z_view = z if z is not None else y
    grid = lambda meta: (triton.cdiv(m_rows, meta["BM"]), triton.cdiv(og, meta["BN"]), groups)  # noqa: E731
    args = (
        x, packed, bias if bias is not None else y, z_bias if z_bias is not None else y, b0, b1, y, z_view,
        n, c, d, h, w, o, od, oh, ow, cg, og, packed.shape[3], packed[0].numel(),
        *_strides(x), *_strides(b0), *_strides(b1), *_strides(y), *_strides(z_view),
        *[float(v) for v in coefficients])
    slots = {f"SLOT_{name.upper().replace('+', 'P').replace('-', 'N')}": variants.index(name) if name in variants
             else 0 for name in WEIGHT_VARIANTS}
    geometry = dict(zip(("SD", "SH", "SW", "PD", "PH", "PW", "DD", "DH", "DW"), (*stride, *padding, *dilation)))
    flags.update(
        KD=kd, KH=kh, KW=kw, **geometry, EVEN_C=cg % _MAX_BK == 0, **slots,
        NONNEGATIVE=bool(nonnegative_input) and not (flags["NEED_NP"] or flags["NEED_NN"]), HAS_BIAS=bias is not None,
        HAS_ZBIAS=z_bias is not None, WRITE_Z=z is not None, GROUPS_Z=groups_z, PREC=_precision(x.dtype, allow_tf32))
    _launch(_lrp_forward_kernel, grid, args, flags, wrap)


def launch_relevance(x, weight, relevance, z, y, bound0, bound1, out, coefficients, bound_modifiers,
                     group_coefficients, group_masks, epsilon: float, stride, padding, dilation, groups: int,
                     allow_tf32: bool = False, wrap=None):
    """Write R_in = sum over parts of m(x) * f^T(s; W_part) into ``out`` (5-d views)."""
    need_y, need_pp, need_pn, need_np, need_nn = _needs(coefficients)
    groups_z = len(group_coefficients)
    geometry = _geometry(x, weight, relevance, stride, padding, dilation, groups)
    m_rows, cg = x.shape[0] * x.shape[2] * x.shape[3] * x.shape[4], geometry[9]
    b0, b1 = (bound0 if bound0 is not None else x), (bound1 if bound1 is not None else x)
    c = list(group_coefficients) + [0.0] * (2 - groups_z)
    masks = list(group_masks) + [MASK_NONE] * (2 - groups_z)
    grid = lambda meta: (triton.cdiv(m_rows, meta["BM"]), triton.cdiv(cg, meta["BN"]), groups)  # noqa: E731
    args = (
        x, weight, relevance, z, y, b0, b1, out,
        *geometry, *_strides(x), *_strides(b0), *_strides(b1), *_strides(relevance), *_strides(z), *_strides(y),
        *_strides(out), *[float(v) for v in coefficients], *[float(v) for v in bound_modifiers],
        float(c[0]), float(c[1]), float(epsilon))
    flags = dict(
        NEED_Y=need_y, NEED_PP=need_pp, NEED_PN=need_pn, NEED_NP=need_np, NEED_NN=need_nn,
        HAS_B0=bound0 is not None, HAS_B1=bound1 is not None, GROUPS_Z=groups_z, MASK0=int(masks[0]),
        MASK1=int(masks[1]), PREC=_precision(x.dtype, allow_tf32))
    _launch(_lrp_relevance_kernel, grid, args, flags, wrap)
