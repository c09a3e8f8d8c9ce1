"""A fused structured-convolution operator for Apache TVM (Relax / TE / TIR).

The TVM targets import the *decomposed* ONNX graph, where a structured conv is a chain of
CumSum, Slice, Sub and a small Conv: every link is its own kernel, and the memory-bound
pool passes cost as much as the small conv. This module starts instead from a Relax
module in which structured layers are still plain ``relax.nn.conv2d`` with a constant,
exactly structured weight (a composed / dense-form model, imported with
``from_onnx(model, keep_params_in_input=False)``). :func:`fuse_structured_convs`
takes each weight's structure from the model's structure plan
(:mod:`structexport.structure_plan`, kernels matched by value and checked), or, without a
plan, discovers it (:func:`structexport.discovery.discover_structure`: the ``(c, n)`` with
the fewest multiplies whose residual is ``<= max_residual``), and
replaces the conv2d by two kernels (DESIGN.md sections 1.1 and 5):

1. ``structured_sum_pool`` (:func:`sum_pool_kernel`) -- the *whole* sum-pool (zero
   padding, the channel window ``C-c+1`` of each group, the spatial box ``N-n+1``) in one
   pass over the input: a hand-written TIR loop nest, marked ``tirx.is_scheduled`` so
   MetaSchedule leaves it alone. Channel sums are a restarted running sum (3 additions
   per value, rounding of the order of a direct window sum) kept in a per-task local
   buffer, never written to memory; the box sum is read from that buffer. Measured 0.028
   ms for a 64@56x56 input on one core of this project's Xeon, against ~1.7 ms for ORT's
   dense conv (benchmarks/tvm_fused.py).
2. the small ``c x n x n`` conv with the layer's stride and groups, no padding, as a plain
   ``relax.nn.conv2d`` of the pooled tensor and the constant ``alpha``: it legalizes,
   fuses with a following bias-add / ReLU (``FuseOps``) and tunes like any conv, and its
   workload is the same as the small conv of the decomposed ONNX graph, so tuning records
   are shared.

Why not the box sum inside the tunable conv function (:func:`box_conv`,
``box_in_conv=True``): MetaSchedule computes the box stage (a reduction) at loops inside
the conv's nest, and some of those candidates are *wrong* -- measured 2 and 3 wrong of 16
on a 64@56x56 layer, once including the fastest, so the tuned model was wrong. Tuning the
whole chain as one kernel was worse (37 of 64 wrong, DESIGN.md section 5). The pool is
cheap enough (a few percent of the conv) that keeping it in its own scheduled kernel
costs little, and nothing the tuner does can break it.

For CPU (llvm) targets: x86 and aarch64 compile; the pool kernel has no GPU thread
binding, so it is not for tvm-cuda. Importing this module does not import TVM (it is
imported lazily), so test collection and the rest of the package work without it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from structexport.discovery import EXACT, Discovery, discover_structure, project_kronecker
from structexport.structure_plan import KernelPlan, PlanError, kernel_digest

POOL = "structured_sum_pool"
BOX_CONV = "structured_box_conv"
# Vector register width (bits) by the instruction set the llvm target has: a row of the
# pool kernel is cut into chunks of one register's lanes (16 fp32 with AVX-512, 8 with
# AVX/AVX2, 4 for SSE-only x86-64, aarch64 NEON and anything else).
_REGISTER_BITS = (("avx512f", 512), ("avx2", 256), ("avx", 256))
_BASELINE_BITS = 128
# Rewrite a conv only when its structure saves at least this share of the multiplies, as
# the ONNX pass decompose_structured_conv does (its DEFAULT_MIN_SAVING).
DEFAULT_MIN_SAVING = 0.2


def _tvm():
    import tvm
    from tvm import relax, te, tirx
    return tvm, relax, te, tirx


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


# ------------------------------------------------------------------ the target's vector width

def _as_target(target):
    """``target`` (a TVM target, its dict or string; None: the one in scope, else this
    host's CPU as tvm-llvm builds for it by default) as a ``tvm.target.Target``."""
    tvm, _, _, _ = _tvm()
    if target is None:
        target = tvm.target.Target.current(allow_none=True)
        if target is None:
            target = llvm_host_target() if _host_cpu() else {"kind": "llvm"}
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def _host_cpu() -> str | None:
    from structexport.machine import llvm_host_cpu
    return llvm_host_cpu()


def _target_features(target) -> set[str]:
    """The CPU features LLVM derives from the target's mtriple, mcpu and mattr (without
    the +/-); the target's own mattr when LLVM cannot tell (a triple it was built without)."""
    from tvm.target import codegen
    try:
        return {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 -- fall back on what the target spells out
        mattr = target.attrs.get("mattr") or []
        return {str(a)[1:] for a in mattr if str(a).startswith("+")}


def vector_lanes(target=None, dtype: str = "float32") -> int:
    """Elements of ``dtype`` in one vector register of ``target`` (a TVM llvm target, its
    dict or string; None: the target in scope, else this host's): for float32, 16 with
    AVX-512 (avx512f), 8 with AVX2/AVX, 4 for aarch64 (NEON; SVE code is not emitted
    scalable here), plain x86-64 (SSE) and other CPUs. Only the chunking of the pool
    kernel's rows follows it: every element is computed the same way whatever the width."""
    tgt = _as_target(target)
    bits = _BASELINE_BITS
    if tgt.kind.name == "llvm":
        triple = str(tgt.attrs.get("mtriple") or "")
        if not triple.startswith(("aarch64", "arm")):
            features = _target_features(tgt)
            bits = next((b for feature, b in _REGISTER_BITS if feature in features), _BASELINE_BITS)
    return max(1, bits // (8 * np.dtype(dtype).itemsize))


# ------------------------------------------------------------------ kernel 1: the sum-pool

def sum_pool_kernel(x, C: int, c: int, groups: int, pads: tuple[int, int, int, int],
                    box: int = 1, step: int = 1, restart: int | None = None,
                    block_rows: int = 8, lanes: int | None = None):
    """TE tensor (extern: a hand-written TIR loop nest) -- the whole sum-pool of a
    structured conv in one pass over the input:

    ``S[b, g*c+a, y, x] = sum_{k < C-c+1, u < box, v < box} Xpad[b, g*C+a+k, y*step+u, x*step+v]``

    with ``Xpad`` = ``x`` zero-padded by ``pads`` (top, left, bottom, right); ``step > 1``
    (only with ``box == 1``) samples the grid, for a 1x1 conv with stride.

    Rows are cut into blocks of ``block_rows`` output rows, one parallel task each. A task
    keeps the channel sums of its ``block_rows + box - 1`` padded rows in a local buffer
    and walks the channels of its group in order, updating that buffer *in place* as a
    restarted running sum: every ``restart`` channels (default the window ``C-c+1``) the
    window is summed afresh, in between it slides (``+ new - old``) -- about 3 additions
    per value whatever the window. Each value is then the result of at most about three
    windows' worth of additions, so its rounding error is of the order of summing the
    window directly, whatever ``C`` and the input's mean; a prefix sum over all ``C``
    channels followed by differences (the ORT path) errs by ``~eps * C * mean`` instead,
    relative ``~eps * C / window`` (about 1e-4 for a window of 2 on 2048 channels of
    positive inputs). After each channel the box sum of the buffer's rows
    is written out (``box^2 - 1`` additions per value), so the channel sums never go
    through memory.

    Rows are written in vector chunks of ``lanes`` elements (default: one register of the
    target in scope, else of this host, :func:`vector_lanes`), then one shorter chunk for
    the rest of the row."""
    _, _, te, tirx = _tvm()
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    B, CT, H, W = _ints(x.shape)
    G = groups
    if CT != G * C or not 1 <= c <= C:
        raise ValueError(f"sum-pool: {CT} channels are not {G} groups of {C}, or c={c} does not fit")
    if box > 1 and step != 1:
        raise ValueError("sum-pool: a sampled grid (step > 1) needs box == 1")
    pt, pl, pb, pr = pads
    Hp, Wp = H + pt + pb, W + pl + pr
    Hq, Wq = (Hp - 1) // step + 1, (Wp - 1) // step + 1     # sampled padded grid (box 1)
    Hs, Ws = Hq - box + 1, Wq - box + 1
    if Hs < 1 or Ws < 1:
        raise ValueError(f"sum-pool: box {box} does not fit the padded {Hp}x{Wp} input")
    wc = C - c + 1
    period = max(1, int(restart or wc))
    hb = max(1, min(block_rows, Hs))
    blocks = -(-Hs // hb)
    rows_max = hb + box - 1
    dtype = str(x.dtype)
    lanes = int(lanes) if lanes else vector_lanes(None, dtype)
    if lanes < 1:
        raise ValueError(f"sum-pool: {lanes} vector lanes")

    def valid(pad: int, size: int, count: int) -> tuple[int, int]:
        """Grid indices ``[lo, hi)`` whose source ``i*step - pad`` lies inside ``[0, size)``."""
        lo = min(count, -(-pad // step))
        return lo, max(lo, min(count, (pad + size - 1) // step + 1))

    xlo, xhi = valid(pl, W, Wq)

    def i64(v):
        return tirx.IntImm("int64", int(v))

    def gen(xb, ob):
        zero = tirx.const(0, dtype)

        def row(start: int, stop: int, body) -> None:
            """``body(j)`` for ``j`` in ``[start, stop)``: vector chunks, then a vector tail."""
            width = stop - start
            if width <= 0:
                return
            full, tail = divmod(width, lanes)
            if full:
                with T.serial(0, i64(full)) as jo, T.vectorized(0, i64(lanes)) as ji:
                    body(i64(start) + jo * lanes + ji)
            if tail:
                with T.vectorized(0, i64(tail)) as ji:
                    body(i64(start + full * lanes) + ji)

        with IRBuilder() as ib:
            with T.parallel(0, i64(B * G * blocks)) as f:
                b, g, blk = f // (G * blocks), f // blocks % G, f % blocks
                y0 = blk * hb
                rows = tirx.min(i64(hb), Hs - y0)          # output rows of this block
                local = T.alloc_buffer((rows_max, Wq), dtype, scope="global")
                with T.serial(0, i64(c)) as a:
                    src = g * C + a
                    with T.serial(0, rows + (box - 1)) as r:
                        sy = (y0 + r) * step - pt           # source row of grid row y0 + r
                        with T.If(tirx.any(sy < 0, sy >= H)):
                            with T.Then():
                                row(0, Wq, lambda j: T.buffer_store(local, zero, [r, j]))
                            with T.Else():
                                row(0, xlo, lambda j: T.buffer_store(local, zero, [r, j]))
                                row(xhi, Wq, lambda j: T.buffer_store(local, zero, [r, j]))

                                def load(ch, j):
                                    return xb[b, ch, sy, j * step - pl]

                                if wc == 1:
                                    row(xlo, xhi, lambda j: T.buffer_store(local, load(src, j), [r, j]))
                                else:
                                    with T.If(a % period == 0):
                                        with T.Then():      # sum the window afresh
                                            row(xlo, xhi, lambda j: T.buffer_store(local, load(src, j), [r, j]))
                                            with T.serial(1, i64(wc)) as k:
                                                row(xlo, xhi, lambda j: T.buffer_store(
                                                    local, local[r, j] + load(src + k, j), [r, j]))
                                        with T.Else():      # slide one channel on: + new - old
                                            row(xlo, xhi, lambda j: T.buffer_store(
                                                local, local[r, j] + (load(src + (wc - 1), j) - load(src - 1, j)),
                                                [r, j]))
                    q = g * c + a
                    with T.serial(0, rows) as r:
                        def out(j):
                            total = None
                            for u in range(box):
                                for v in range(box):
                                    term = local[r + u, j + v]
                                    total = term if total is None else total + term
                            T.buffer_store(ob, total, [b, q, y0 + r, j])
                        row(0, Ws, out)
            return ib.get()

    return te.extern([(B, G * c, Hs, Ws)], [x], lambda ins, outs: gen(ins[0], outs[0]),
                     dtype=[dtype], name="sum_pool")


# ------------------------------------------------------------------ kernel 2: box sum + conv

def box_conv(t, alpha, *, groups: int, box: int, stride: int = 1,
             pads: tuple[int, int, int, int] | None = None):
    """TE tensor: the small conv ``alpha`` (``O x c x n x n``, ``groups`` groups, stride
    ``stride``, no padding) of the spatial box sum (``box x box``, stride 1) of ``t``.
    ``pads`` zero-pads ``t`` first (an inlinable stage; used when there is no channel-sum
    kernel to pad).

    Not the default lowering: MetaSchedule may compute the box stage (a reduction) at a
    loop inside the conv's nest, and some of those candidates compute wrong results
    (measured: 2 and 3 of 16 on a 64@56x56 layer, once the fastest, so the tuned model
    was wrong). Kept to measure against, and usable untuned."""
    _, _, te, tirx = _tvm()
    B, Q, Hp, Wp = _ints(t.shape)
    O, c, n, n2 = _ints(alpha.shape)
    if n != n2 or Q != groups * c or O % groups:
        raise ValueError(f"box conv: input {Q} channels, alpha {(O, c, n, n2)}, groups {groups}")
    og = O // groups
    src = t
    if pads is not None and any(pads):
        pt, pl, pb, pr = pads
        Hp, Wp = Hp + pt + pb, Wp + pl + pr
        H, W = _ints(t.shape)[2:]
        src = te.compute(
            (B, Q, Hp, Wp),
            lambda b, q, y, x: tirx.if_then_else(
                tirx.all(y >= pt, y < pt + H, x >= pl, x < pl + W),
                t[b, q, y - pt, x - pl], tirx.const(0, t.dtype)),
            name="pad")
    Hs, Ws = Hp - box + 1, Wp - box + 1
    if box > 1:
        u, v = te.reduce_axis((0, box), "bu"), te.reduce_axis((0, box), "bv")
        pooled = te.compute((B, Q, Hs, Ws),
                            lambda b, q, y, x: te.sum(src[b, q, y + u, x + v], axis=[u, v]),
                            name="box")
    else:
        pooled = src
    Ho, Wo = (Hs - n) // stride + 1, (Ws - n) // stride + 1
    a = te.reduce_axis((0, c), "a")
    i, j = te.reduce_axis((0, n), "i"), te.reduce_axis((0, n), "j")
    return te.compute(
        (B, O, Ho, Wo),
        lambda b, o, y, x: te.sum(
            pooled[b, o // og * c + a, y * stride + i, x * stride + j] * alpha[o, a, i, j],
            axis=[a, i, j]),
        name="conv")


# ------------------------------------------------------------------ the rewrite

def _static_shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # symbolic dimension
        return None


def _constant_array(expr, lookup, weights: dict | None = None) -> tuple[np.ndarray | None, str | None]:
    """The numpy value of a Relax constant (directly, or a var bound to one), or of a
    function parameter named in ``weights``; with the parameter's name (else None)."""
    tvm, relax, _, _ = _tvm()
    seen = 0
    while isinstance(expr, relax.Var) and seen < 8:
        bound = lookup(expr)
        if bound is None:
            name = getattr(expr, "name_hint", None) or getattr(expr, "name", None)  # TVM 0.27: name
            if weights and name in weights:
                return np.asarray(weights[name]), name
            return None, None
        expr, seen = bound, seen + 1
    value = getattr(expr, "value", None)
    if isinstance(expr, tvm.ir.expr.Constant) and isinstance(value, tvm.runtime.Tensor):
        return value.numpy(), None
    return None, None


def planned_structure(w: np.ndarray, c: int, n: int) -> Discovery:
    """The structure plan's ``(c, n)`` for kernel ``w``, checked: its coefficients and the
    residual; :class:`PlanError` when the kernel is not that structure to rounding."""
    O, C, N, _ = w.shape
    try:
        alpha, residual = project_kronecker(w, c, n)
    except ValueError as exc:
        raise PlanError(f"the structure plan's {c}x{n}x{n} does not fit a kernel {list(w.shape)}: {exc}",
                        "report this; --tvm-structured decomposed builds the decomposed graph") from None
    # float32 composed kernels are exact to ~1e-7; a float16 kernel to its rounding
    tolerance = max(EXACT, 8 * float(np.finfo(w.dtype).eps))
    if residual > tolerance:
        raise PlanError(f"a kernel {list(w.shape)} is {residual:.2e} from the structure plan's {c}x{n}x{n} "
                        f"(more than {tolerance:.0e}): the composed graph does not hold the planned kernel",
                        "report this; --tvm-structured decomposed builds the decomposed graph")
    return Discovery(c, n, C, N, residual, alpha, (c * n * n) / (C * N * N), 1, 1, (c, n) != (C, N))


def plan_conv(x_shape, w: np.ndarray, strides, padding, groups: int,
              max_residual: float = EXACT, box_in_conv: bool = False,
              min_saving: float = DEFAULT_MIN_SAVING, structure: tuple[int, int] | None = None) -> dict:
    """What the rewrite does with one conv (also usable without TVM): the structure (the
    plan's ``structure``, checked against ``w``; else discovered), the kernels it becomes
    and the multiplies before and after. ``"fused"`` says whether it is replaced;
    ``"reason"`` why not. A planned structure is fused whatever it saves: the plan decided."""
    B, CT, H, W = _ints(x_shape)
    O, C, N, N2 = w.shape
    pt, pl, pb, pr = _ints(padding)
    sh, sw = _ints(strides)
    rec: dict[str, Any] = {"input_shape": [B, CT, H, W], "weight_shape": [O, C, N, N2],
                           "strides": [sh, sw], "padding": [pt, pl, pb, pr], "groups": groups,
                           "fused": False}
    Ho, Wo = (H + pt + pb - N) // sh + 1, (W + pl + pr - N2) // sw + 1
    rec["output_shape"] = [B, O, Ho, Wo]
    rec["macs_before"] = rec["macs_after"] = B * O * C * N * N2 * Ho * Wo
    if N != N2:
        rec["reason"] = "kernel is not square"
        return rec
    if sh != sw:
        rec["reason"] = "strides differ between height and width"
        return rec
    if not np.issubdtype(w.dtype, np.floating):
        rec["reason"] = f"weight dtype {w.dtype} is not floating point"
        return rec
    if not np.isfinite(w).all():
        rec["reason"] = "weight has non-finite values"
        return rec
    if structure is not None:
        d, min_saving = planned_structure(w, *structure), 0.0
    else:
        d = discover_structure(w, max_residual=max_residual)
    rec.update(structure=[d.c, d.n], residual=d.residual, window=list(d.window))
    if not d.structured:
        rec["reason"] = f"no {'exact ' if max_residual <= EXACT else ''}structure within residual {max_residual:g}"
        return rec
    c, n = d.c, d.n
    if d.macs_ratio > 1.0 - min_saving:
        rec["reason"] = (f"structure {c}x{n}x{n} saves only {100 * (1 - d.macs_ratio):.0f}% of the "
                         f"multiplies (min_saving {min_saving:g})")
        return rec
    wc, wn = d.window[0], d.window[1]
    step = sh if N == 1 else 1     # a 1x1 conv with stride reads only strided positions
    Hq, Wq = (H + pt + pb - 1) // step + 1, (W + pl + pr - 1) // step + 1
    if box_in_conv:
        kernels = ([POOL] if wc > 1 else []) + [BOX_CONV]
    else:
        kernels = [POOL, "relax.nn.conv2d"]
    rec.update(fused=True, alpha=d.alpha.numpy(), macs_after=B * O * c * n * n * Ho * Wo,
               box=wn, step=step, box_in_conv=bool(box_in_conv), kernels=kernels)
    # Additions of the pool (approximate: a running sum is ~3 per value, the box
    # (N-n+1)^2 - 1 per pooled value); they are reported apart from the multiplies.
    adds = 3 * B * groups * c * Hq * Wq if wc > 1 else 0
    if wn > 1:
        adds += (wn * wn - 1) * B * groups * c * (Hq - wn + 1) * (Wq - wn + 1)
    rec["pool_additions"] = adds
    return rec


def _make_rewriter(mod, max_residual: float, box_in_conv: bool, min_saving: float, records: list,
                   weights: dict | None = None, lanes_of=None, plan: dict[str, KernelPlan] | None = None,
                   plan_errors: list | None = None):
    tvm, relax, _, _ = _tvm()
    from tvm.relax.expr_functor import PyExprMutator, mutator

    conv_op = tvm.ir.Op.get("relax.nn.conv2d")
    plan_errors = plan_errors if plan_errors is not None else []

    @mutator
    class _Rewriter(PyExprMutator):
        def visit_call_(self, call):  # TVM's name for the call visitor
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(conv_op)):
                return call
            index = len(records)
            try:
                rec = self._plan(call)
            except PlanError as exc:   # raised after the visit: TVM's FFI would turn it into a RuntimeError
                plan_errors.append(exc)
                return call
            rec["index"] = index
            rec["name"] = rec.get("layer") or f"conv2d#{index} {rec.get('weight_shape', '?')}"
            alpha = rec.pop("alpha", None)
            records.append(rec)
            if not rec["fused"]:
                return call
            return self._emit(call, rec, alpha)

        def _plan(self, call) -> dict:
            attrs = call.attrs
            x_shape = _static_shape(call.args[0])
            out_dtype = str(attrs.out_dtype) if attrs.out_dtype is not None else ""
            x_dtype = str(getattr(call.args[0].ty, "dtype", ""))
            reason = None
            if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW"):
                reason = f"layout {attrs.data_layout}/{attrs.kernel_layout}/{attrs.out_layout}, not NCHW/OIHW"
            elif _ints(attrs.dilation) != (1, 1):
                reason = f"dilation {_ints(attrs.dilation)}"
            elif x_shape is None or len(x_shape) != 4:
                reason = "input shape is not static 4-D"
            elif out_dtype not in ("", "void", x_dtype):
                reason = f"out_dtype {out_dtype} differs from the input's {x_dtype}"
            w, weight_name = _constant_array(call.args[1], self.lookup_binding, weights)
            if w is None and reason is None:
                reason = "weight is not a constant"
            if reason is not None:
                rec = {"input_shape": list(x_shape) if x_shape else None,
                       "weight_shape": list(w.shape) if w is not None else _static_shape(call.args[1]),
                       "fused": False, "reason": reason}
                return rec
            if str(w.dtype) != x_dtype:
                return {"input_shape": list(x_shape), "weight_shape": list(w.shape), "fused": False,
                        "reason": f"weight dtype {w.dtype} differs from the input's {x_dtype}"}
            structure, layer = None, None
            if plan is not None:    # the structure plan decides, by the kernel's value
                planned = plan.get(kernel_digest(w))
                layer = planned.layer if planned is not None else None
                structure = planned.structure if planned is not None else None
                if structure is None:     # kept as it is: its own (C, N), the plan's reason
                    rec = plan_conv(x_shape, w, attrs.strides, attrs.padding, int(attrs.groups),
                                    structure=tuple(w.shape[1:3]) if w.shape[2] == w.shape[3] else None)
                    rec.update(fused=False, reason=planned.reason if planned is not None
                               else "no structure in the plan")
                    return dict(rec, layer=layer) if layer else rec
            rec = plan_conv(x_shape, w, attrs.strides, attrs.padding, int(attrs.groups),
                            max_residual, box_in_conv, min_saving, structure)
            if layer is not None:
                rec["layer"] = layer
            if weight_name is not None:
                rec["weight_param"] = weight_name
            return rec

        def _emit(self, call, rec: dict, alpha: np.ndarray):
            bb = self.builder_
            x = call.args[0]
            groups, c, pads = rec["groups"], rec["structure"][0], tuple(rec["padding"])
            C, stride, step, box = rec["weight_shape"][1], rec["strides"][0], rec["step"], rec["box"]
            lanes = rec["vector_lanes"] = lanes_of(str(x.ty.dtype)) if lanes_of else None
            alpha_const = relax.const(np.ascontiguousarray(alpha))
            scheduled = {"tirx.is_scheduled": True}
            if not rec["box_in_conv"]:
                pooled = bb.emit(bb.call_te(sum_pool_kernel, x, C, c, groups, pads, box, step, lanes=lanes,
                                            primfunc_name_hint=POOL, primfunc_attrs=scheduled))
                return relax.op.nn.conv2d(pooled, alpha_const, strides=stride // step, padding=0,
                                          groups=groups)
            if c < C:
                pooled = bb.emit(bb.call_te(sum_pool_kernel, x, C, c, groups, pads, 1, step, lanes=lanes,
                                            primfunc_name_hint=POOL, primfunc_attrs=scheduled))
                return bb.call_te(box_conv, pooled, alpha_const, groups=groups, box=box,
                                  stride=stride // step, primfunc_name_hint=BOX_CONV)
            return bb.call_te(box_conv, x, alpha_const, groups=groups, box=box, stride=stride,
                              pads=pads, primfunc_name_hint=BOX_CONV)

    return _Rewriter(mod)


def _kept_for_target(mod, kind: str) -> list[dict]:
    """One record per conv2d of ``mod``'s Relax functions, each kept because of the target."""
    _, relax, _, _ = _tvm()
    records: list[dict] = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.nn.conv2d":
            weight = _static_shape(expr.args[1])
            records.append({"index": len(records), "name": f"conv2d#{len(records)} {list(weight or [])}",
                            "input_shape": list(_static_shape(expr.args[0]) or []),
                            "weight_shape": list(weight or []), "fused": False,
                            "reason": f"the fused operator is for CPU (llvm) targets, not {kind}"})
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return records


def fuse_structured_convs(mod, *, max_residual: float = EXACT, box_in_conv: bool = False,
                          min_saving: float = DEFAULT_MIN_SAVING, target=None,
                          weights: dict | None = None, plan: dict[str, KernelPlan] | None = None):
    """Replace every ``relax.nn.conv2d`` with a constant, structured weight in ``mod``'s
    Relax functions by the fused structured operator; returns ``(new module, records)``
    with one record per conv2d looked at (shapes, the structure found or why it was
    kept, ``macs_before`` / ``macs_after``, the pool's additions, the kernels emitted).

    ``mod`` is a Relax module before legalization (``from_onnx(...,
    keep_params_in_input=False)``, so weights are constants). Convs whose weight has no
    structure within ``max_residual`` (default :data:`EXACT`: a rounding, not an
    approximation), or whose structure saves less than ``min_saving`` of the multiplies,
    non-square or dilated kernels, other layouts and symbolic shapes are left as they
    are. A looser ``max_residual`` projects approximately structured weights (SR-trained)
    and changes the layer's output accordingly: the records carry each residual.
    ``box_in_conv`` puts the spatial box sum into a TE conv function instead of the pool
    kernel (see the module docstring: MetaSchedule can tune that one wrong).

    Call it on the imported module, before ``DecomposeOpsForInference`` /
    ``zero_pipeline`` (it matches ``relax.nn.conv2d``, which legalization removes) and
    before MetaSchedule task extraction, so the new kernels are what gets tuned.

    ``target`` (a TVM target, its dict or string; optional): for anything but an llvm
    (CPU) target nothing is rewritten and every conv is recorded as kept -- the pool
    kernel is a CPU loop nest (parallel / vectorized loops, no GPU thread binding). The
    pool kernel's rows are vectorized in chunks of one register of this target
    (:func:`vector_lanes`, recorded per fused conv as ``"vector_lanes"``); without a
    target, of the target in scope (``with target:``), else of this host's CPU (what
    tvm-llvm builds for by default).

    ``weights`` (optional, ``{parameter name: array}``): the values of weights passed as
    function parameters (``keep_params_in_input=True``, as ``profile`` compiles, so that
    every kernel call names the weights it reads). A fused conv then no longer reads its
    parameter (``alpha`` is a constant); its record names it as ``"weight_param"``.

    ``plan`` (optional, :meth:`structexport.structure_plan.StructurePlan.by_kernel`): the
    model's structure plan by kernel value. Then nothing is discovered: a conv is fused
    when the plan gives its kernel a structure (checked against the kernel; a mismatch is a
    :class:`~structexport.structure_plan.PlanError`), whatever ``max_residual`` and
    ``min_saving`` say, and is kept with the plan's reason otherwise; records carry the
    plan's layer name. A structured layer of the plan that no conv of ``mod`` holds is a
    :class:`~structexport.structure_plan.PlanError` too."""
    tvm, relax, _, _ = _tvm()
    records: list[dict] = []
    if target is not None:
        kind = (target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)).kind.name
        if kind != "llvm":
            return mod, _kept_for_target(mod, kind)
    # the pool kernel's vector chunk: one register of the target compiled for
    tgt, lanes = _as_target(target), {}

    def lanes_of(dtype: str) -> int:
        if dtype not in lanes:
            lanes[dtype] = vector_lanes(tgt, dtype)
        return lanes[dtype]
    plan_errors: list = []
    rewriter = _make_rewriter(mod, max_residual, box_in_conv, min_saving, records, weights, lanes_of, plan,
                              plan_errors)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    if plan_errors:
        raise plan_errors[0]
    if plan is not None:
        planned = {p.layer for p in plan.values() if p.structure is not None}
        missing = sorted(planned - {r.get("layer") for r in records if r.get("fused")})
        if missing:
            raise PlanError(f"{len(missing)} structured layer(s) of the plan were not found among the "
                            f"module's convs ({', '.join(missing[:3])})",
                            "report this; --tvm-structured decomposed builds the decomposed graph")
    out = rewriter.builder_.get()
    for gvar, func in out.functions_items():
        if gvar.name_hint.startswith(POOL):
            out[gvar] = _under_root_block(func)
    return out, records


def _under_root_block(func):
    """``func`` (the pool's ``te.extern``, whose only block is its opaque body) with a
    root block above that block: passes that sort a function's work by the root's child
    blocks (``SplitLayoutRewritePreproc``, for pre-packed weights) reject a root that
    has none."""
    from tvm import s_tir
    body = func.body
    if not isinstance(body, s_tir.SBlockRealize) or body.block.name_hint == "root":
        return func
    return func.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body)))


def llvm_host_target(**extra) -> dict:
    """This host's CPU as an llvm target dict: without ``mcpu`` TVM emits no AVX at all."""
    from structexport.machine import llvm_host_cpu
    return {"kind": "llvm", "mcpu": llvm_host_cpu(), **extra}


# ------------------------------------------------------------------ tuning and checking

def tune(mod, target: dict, trials_per_task: int, work_dir: str, *, database=None, seed: int = 0,
         skip_known: bool = False, prepack: bool | None = None):
    """MetaSchedule-tune ``mod`` (a Relax module, before or after the rewrite) with
    ``trials_per_task`` trials for each task, on this host, and compile it with the
    results. Returns ``(executable, database, tasks, names of the tasks tuned now)``; the database keeps every measured
    candidate so that :func:`check_tuned_candidates` can run each one. ``skip_known``
    leaves out tasks whose workload is already in ``database`` (a cache). Kernels marked
    ``tirx.is_scheduled`` (the sum-pool) are not tuned. One build worker: the
    machines this runs on are small and shared. Like ``structexport.tuning``, the
    builder and runner workers import MetaSchedule's tensor intrinsics through
    ``preload_tvm_tensor_intrinsics`` (without it every build times out). ``prepack``
    (default: on for llvm targets) lets schedules read constant weights in a packed
    layout, packed once at compile time (:func:`structexport.tuning.compile_with_database`)."""
    tvm, _, _, _ = _tvm()
    from tvm.s_tir import meta_schedule as ms

    from structexport.tuning import (
        compile_with_database,
        preload_tvm_tensor_intrinsics,
        quiet_meta_schedule_logger,
        tunable_tasks,
        weight_prepack,
        with_core_count,
    )
    preload_tvm_tensor_intrinsics()
    quiet_meta_schedule_logger()
    tgt = tvm.target.Target(with_core_count(dict(target)))
    prepack = weight_prepack(tgt) if prepack is None else prepack
    mod, tasks = tunable_tasks(mod, tgt, prepack)
    db = database if database is not None else ms.database.MemoryDatabase()
    todo = [t for t in tasks if not (skip_known and db.has_workload(t.dispatched[0]))]
    if todo and trials_per_task > 0:
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=max(32, 4 * trials_per_task), init_measured_ratio=0.2,
            init_min_unmeasured=max(8, trials_per_task), genetic_num_iters=2)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir, strategy=strategy, seed=seed, num_threads=1)
        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=120,
                                          initializer=preload_tvm_tensor_intrinsics)
        runner = ms.runner.LocalRunner(
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20),
            initializer=preload_tvm_tensor_intrinsics)
        try:
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                          max_trials_global=trials_per_task * len(contexts),
                          max_trials_per_task=trials_per_task,
                          num_trials_per_iter=min(32, max(4, trials_per_task)),
                          builder=builder, runner=runner, database=db)
        finally:
            pool = getattr(runner, "pool", None)
            if pool is not None:
                pool.shutdown(wait=False)
    return compile_with_database(mod, tgt, db, prepack), db, tasks, [t.task_name for t in todo] if trials_per_task > 0 else []


def _workload_key(mod) -> str:
    import tvm_ffi
    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def check_tuned_candidates(db, target: dict, *, tasks=(), rtol: float = 1e-4,
                           seed: int = 0) -> list[dict]:
    """Build and run *every* candidate in the tuning database ``db`` (not only the best)
    on random inputs, against its workload built untuned. One record per candidate:
    ``task`` (its name when ``tasks``, the extracted tasks, include it; else the workload's
    hash), ``seconds`` as measured while tuning (None: it failed to build or run then),
    ``rel_error`` (largest error relative to the output's scale) and ``ok``: True within
    ``rtol``, False beyond it, None when the candidate does not build or run (``error``)."""
    tvm, _, _, _ = _tvm()
    from tvm import s_tir
    from structexport.tuning import with_core_count
    tgt = tvm.target.Target(with_core_count(dict(target)))
    rng = np.random.default_rng(seed)
    names = {_workload_key(t.dispatched[0]): t.task_name for t in tasks}
    references: dict[str, tuple] = {}
    out = []
    for rec in db.get_all_tuning_records():
        workload = rec.workload.mod
        key = _workload_key(workload)
        if key not in references:
            func = workload[workload.get_global_vars()[0]]
            args = [rng.standard_normal(_ints(p.shape)).astype(str(p.dtype)) for p in func.params]
            tensors = [tvm.runtime.tensor(a) for a in args]
            tvm.compile(workload, target=tgt)(*tensors)
            references[key] = (args, tensors[-1].numpy())
        args, expected = references[key]
        run_secs = [float(v) for v in rec.run_secs] if rec.run_secs is not None else None
        failed = run_secs is None or any(v >= 1e9 for v in run_secs)
        row = {"task": names.get(key, key), "seconds": None if failed else float(np.median(run_secs))}
        try:
            sch = s_tir.Schedule(workload)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            lib = tvm.compile(sch.mod, target=tgt)
            tensors = [tvm.runtime.tensor(a) for a in args[:-1]] + [tvm.runtime.tensor(np.zeros_like(args[-1]))]
            lib(*tensors)
        except Exception as exc:  # noqa: BLE001 -- reported, not raised: the caller judges
            row.update(rel_error=None, ok=None, error=(str(exc).strip().splitlines() or [""])[-1][:200])
            out.append(row)
            continue
        scale = float(np.abs(expected).max()) or 1.0
        err = float(np.abs(tensors[-1].numpy() - expected).max()) / scale
        row.update(rel_error=err, ok=bool(err <= rtol))
        out.append(row)
    return out
