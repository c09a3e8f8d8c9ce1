"""The project's trained ResNet-20s on the CIFAR-10 test set, through their converted artifacts,
and the SR-trained W projected onto its structure at several --max-residual thresholds.

    python benchmarks/trained_accuracy.py --trained models/checkpoints/trained \
        --sr-state RUNS/sr-seed0/state.pt --json trained.json --markdown trained.md

For each trained checkpoint: ``convert --target ort-cpu --preprocess cifar10`` (verified as
every package is), then ``evaluate`` on ``test.npz``: the source's top-1 and the artifact's
(``model.onnx`` as deployed), and their agreement. For the SR run's last W (before its
decomposition, from the training state): the same W loaded into the dense ResNet-20 and
exported to ONNX and converted as a model from elsewhere with ``--max-residual R`` (R from the
list): each conv whose weights are within R of a cheaper ``c x n x n`` structure is projected
onto it and decomposed, the others kept dense; the evaluation shows how far the projection
moves accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"


def _evaluate(ckpt: Path, out: Path, say, **convert_kwargs) -> dict:
    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import Preprocess
    from structexport.evaluate import EvaluateOptions, evaluate
    result = convert(str(ckpt), out, options=ConvertOptions(target="ort-cpu", preprocess=Preprocess.preset("cifar10").to_dict(),
                                                            **convert_kwargs))
    say(f"{ckpt.name}: converted ({result.manifest['after']['macs']:,} MACs), evaluating")
    report = evaluate(out, TEST, EvaluateOptions(artifacts=["model.onnx"]))
    art = report["artifacts"]["model.onnx"]
    return {"checkpoint": ckpt.name, "macs": result.manifest["after"]["macs"],
            "dense_macs": result.manifest["dense"]["macs"],
            "source_top1": 100 * report["source"]["top1"], "artifact_top1": 100 * art["top1"],
            "agreement": art["agreement"], "max_logit_diff": art["max_logit_diff"],
            "passes": [{"name": p["name"], "records": len(p["records"])} for p in result.manifest["passes"]]}


def main(argv=None) -> int:
    import torch

    from structexport.export import export_onnx
    from structexport.models import build_model
    from structexport.models.trained import trained_weights
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="checkpoint file names in --trained (default: all)")
    p.add_argument("--trained", type=Path, default=REPO / "models" / "checkpoints" / "trained")
    p.add_argument("--sr-state", type=Path, help="the SR run's state.pt (its W before decomposition)")
    p.add_argument("--thresholds", default="0.001,0.01,0.03,0.1")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows, projected = [], []
    with tempfile.TemporaryDirectory(prefix="trained-accuracy-") as tmp:
        tmp = Path(tmp)
        for w in trained_weights(folder=args.trained):
            if args.names and w.path.name not in args.names:
                continue
            row = _evaluate(w.path, tmp / w.path.stem, say)
            row.update(name=w.name, recipe=w.recipe, seed=w.seed, stored_test_top1=w.test_top1,
                       epochs=w.epochs)
            rows.append(row)
            say(json.dumps(row))
        if args.sr_state:
            state = torch.load(args.sr_state, weights_only=True)
            dense = build_model("resnet20")
            dense.load_state_dict(state["model"])     # W of the structured layers are plain kernels
            # As a model from elsewhere (ONNX): its structure is discovered in the weights
            # within --max-residual, projected, and the artifact verified against that
            w_path = tmp / "sr-w.onnx"
            export_onnx(dense.eval(), torch.randn(1, 3, 32, 32), w_path)
            for r in (float(v) for v in args.thresholds.split(",")):
                row = _evaluate(w_path, tmp / f"sr-w-{r}", say, pass_options={"max_residual": r})
                row["max_residual"] = r
                projected.append(row)
                say(json.dumps(row))
    result = {"trained": rows, "sr_w_projected": projected}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| checkpoint | recipe | epochs | stored test top-1 | source top-1 | model.onnx top-1 | agreement | "
             "MACs (dense MACs) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['checkpoint']}` | {r['recipe']} | {r['epochs']} | {r['stored_test_top1']:.2f} | "
                     f"{r['source_top1']:.2f} | {r['artifact_top1']:.2f} | {100 * r['agreement']:.2f}% | "
                     f"{r['macs']:,} ({r['dense_macs']:,}) |")
    if projected:
        lines += ["", "| --max-residual | source top-1 (W as trained) | model.onnx top-1 | agreement | MACs |",
                  "|---:|---:|---:|---:|---:|"]
        for r in projected:
            lines.append(f"| {r['max_residual']:g} | {r['source_top1']:.2f} | {r['artifact_top1']:.2f} | "
                         f"{100 * r['agreement']:.2f}% | {r['macs']:,} |")
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
