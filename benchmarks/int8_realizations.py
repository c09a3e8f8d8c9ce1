"""How well each float32 realization of the structured layers survives ONNX Runtime static
INT8 quantization (issue 20): the trained structured ResNet-20 converted with the cumsum and
the banded sum-pool, the banded graph with its channel sums rebased by three scales of the
first sum (``s = sqrt(kc)`` is what ``convert --precision int8`` ships), and the same kernels
as dense 3x3 convs (the package's reference.onnx).

    .venv/bin/python benchmarks/int8_realizations.py [--checkpoint FILE] [--images 2000]
        [--method minmax|percentile|entropy] [--json FILE] [--markdown FILE]

Every graph is quantized as ``convert --precision int8`` does (QDQ, per-channel symmetric
int8 weights, uint8 activations), calibrated on the first 256 images of a seeded
permutation (seed 0) of train-25k.npz, then run on the first ``--images`` CIFAR-10 test
images by ONNX Runtime (CPU, 1 thread, batch 1) beside its own float32 graph. Columns:
float32 and INT8 top-1, top-1 agreement of INT8 with float32, largest logit difference.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
CHECKPOINT = REPO / "models" / "checkpoints" / "trained" / "resnet20-struct-c2n2-sr-seed0.safetensors"
CALIBRATION_COUNT = 256
# The first sum's scale as a function of the window kc (the pass's docstring says why);
# None: RebaseChannelSumsPass itself (sqrt(kc)), so that row is what convert ships
SCALES = {"rebased, s = 1": lambda kc: 1.0, "rebased, s = kc": float, "rebased, s = sqrt(kc)": None}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cifar(name: str, count: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images (of a seeded permutation when ``seed`` is given), NCHW float32."""
    from structexport.datasets import Preprocess
    with np.load(DATA / name) as d:
        images, labels = d["images"], d["labels"]
    order = np.arange(len(images)) if seed is None else np.random.default_rng(seed).permutation(len(images))
    pick = order[:count]
    return Preprocess.preset("cifar10").apply_uint8(images[pick]).astype(np.float32), labels[pick].astype(np.int64)


def set_weight(graph: ir.Graph, node: ir.Node, array: np.ndarray) -> None:
    """A weight of ``node``'s own: band initializers are shared between layers of one shape."""
    old = node.inputs[1]
    value = ir.Value(name=f"{node.name}.rebased_weight", const_value=ir.tensor(np.ascontiguousarray(array)))
    graph.register_initializer(value)
    node.replace_input_with(1, value)
    if not old.uses():
        graph.initializers.pop(old.name)


def rebased(banded: Path, out: Path, scale) -> Path:
    """``banded`` with every channel sum rebased by ``scale(kc)`` (None: the shipped pass)."""
    import torch

    from structexport.passes import ONNX, PassContext, PassManager
    from structexport.passes.rebase_channel_sums_pass import (RebaseChannelSumsPass, conv_weight,
                                                              find_channel_sums, rebase)
    model = ir.load(str(banded))
    if scale is None:    # the manager checks that the outputs are unchanged
        model, _ = PassManager([RebaseChannelSumsPass()], check_inputs=torch.randn(1, 3, 32, 32),
                               model_kind=ONNX).run(model, PassContext())
    else:
        for band_node, _, small, (groups, kc, c) in find_channel_sums(model.graph):
            band, alpha = rebase(conv_weight(band_node), conv_weight(small), groups, c, scale(kc))
            set_weight(model.graph, band_node, band)
            set_weight(model.graph, small, alpha)
    ir.save(model, str(out))
    return out


def measure(fp32: Path, calibration, images, labels, method: str) -> dict:
    from structexport.ortsession import ort_session, session_runner
    from structexport.quantize import agreement, quantize_qdq
    int8 = fp32.with_suffix(".int8.onnx")
    quantize_qdq(fp32, int8, calibration, method, [])
    ref, cand = (session_runner(ort_session(p, 1)) for p in (fp32, int8))
    r = agreement(lambda x: ref(x)[0], lambda x: cand(x)[0], images, labels, batch=1)
    return {"images": r["images"], "fp32_top1": 100 * r["reference_top1"], "int8_top1": 100 * r["int8_top1"],
            "agreement": 100 * r["agreement"], "max_logit_diff": r["max_logit_diff"]}


def markdown(rows: list[dict], head: str) -> str:
    lines = [head, "", "| realization | float32 top-1 | INT8 top-1 | INT8 agreement with float32 | "
             "largest logit difference |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['realization']} | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | {r['agreement']:.2f} | "
              f"{r['max_logit_diff']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--images", type=int, default=2000, help="the first N test images (10000: all)")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    from structexport.convert import ConvertOptions, convert
    start = time.perf_counter()
    calibration, _ = cifar("train-25k.npz", CALIBRATION_COUNT, seed=0)
    images, labels = cifar("test.npz", args.images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-realizations-") as tmp:
        tmp = Path(tmp)
        graphs = {}
        for realization in ("cumsum", "banded"):
            say(f"converting {args.checkpoint.name} with the {realization} sum-pool")
            convert(str(args.checkpoint), tmp / realization, options=ConvertOptions(
                target="onnx", pass_options={"sumpool_realization": realization}))
            graphs[realization] = tmp / realization / "model.onnx"
        graphs["plain bands"] = graphs.pop("banded")
        for i, (name, scale) in enumerate(SCALES.items()):
            graphs[name] = rebased(graphs["plain bands"], tmp / f"rebased{i}.onnx", scale)
        graphs["dense 3x3"] = tmp / "banded" / "reference.onnx"
        for name, fp32 in graphs.items():
            say(f"{name}: quantizing ({args.method}) and evaluating on {len(images)} test images")
            rows.append({"realization": name, **measure(fp32, calibration, images, labels, args.method)})
            say(json.dumps(rows[-1]))
    head = (f"`{args.checkpoint.name}`, {args.images} CIFAR-10 test images, calibration {args.method} on "
            f"{CALIBRATION_COUNT} training images, ONNX Runtime QDQ, 1 thread, batch 1")
    text = markdown(rows, head)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "method": args.method,
                                         "calibration_images": CALIBRATION_COUNT, "rows": rows}, indent=2) + "\n")
    say(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
