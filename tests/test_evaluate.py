"""Issue 19, sections 1 and 2: ``structexport evaluate`` and the published accuracies.

Accuracies here are computed from real CIFAR-10 labels (``../shared/data/cifar10``) and
checked against an independent computation (the loader's torch model, the preprocessing
written out by hand), on both data forms (.npz, an ImageFolder of PNGs) and both kinds of
source (a package, a model file). Bad data is one line with its own exit code (47-51).
The published checkpoints are checked on a slice of the test set here, and every row of
docs/accuracy.md on the full test set in the slow tier."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from structexport.cli import main
from structexport.datasets import PRESETS, Preprocess, open_dataset
from structexport.evaluate import EvaluateOptions, evaluate
from structexport.loader import load_checkpoint
from structexport.package import Package

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
N = 48      # images of the small data sets


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(r) -> str:
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    return lines[0]


def _script():
    spec = importlib.util.spec_from_file_location("published_accuracy",
                                                  REPO / "benchmarks" / "published_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PA = _script()


@pytest.fixture(scope="module")
def test_set(cifar10_dir):
    with np.load(cifar10_dir / "test.npz") as d:
        return d["images"], d["labels"].astype(np.int64)


def expected_logits(ckpt: Path, arch: str, images: np.ndarray) -> np.ndarray:
    """The source's logits computed apart from evaluate: the loader's model on the images
    normalised as the reference implementation's test transform (ToTensor + Normalize)."""
    model = load_checkpoint(ckpt, arch).model.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model((x - MEAN) / STD).numpy()


@pytest.fixture(scope="module")
def small(tmp_path_factory, test_set):
    """The first N test images as a uint8 .npz, a float NCHW .npz and an ImageFolder of PNGs
    (class folders named so that their sorted order is the label order)."""
    from PIL import Image
    images, labels = test_set[0][:N], test_set[1][:N]
    root = tmp_path_factory.mktemp("data")
    np.savez(root / "small.npz", images=images, labels=labels.astype(np.uint8))
    np.savez(root / "float.npz", images=(images.astype(np.float32) / 255).transpose(0, 3, 1, 2),
             labels=labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / "folder" / f"{label:02d}-{names[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return {"root": root, "npz": root / "small.npz", "float": root / "float.npz",
            "folder": root / "folder", "images": images, "labels": labels}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The bundled checkpoint converted for ort-cpu with the CIFAR-10 preprocessing stored."""
    out = tmp_path_factory.mktemp("pkg") / "r20"
    r = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "ort-cpu", "--preprocess", "cifar10",
            "-o", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def truth(small):
    logits = expected_logits(BUNDLED, "resnet20", small["images"])
    pred = logits.argmax(1)
    top5 = np.argsort(-logits, 1)[:, :5]
    return {"logits": logits, "top1": float((pred == small["labels"]).mean()),
            "top5": float((top5 == small["labels"][:, None]).any(1).mean())}


def run_json(tmp_path, *args):
    path = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    r = cli("evaluate", *args, "--json", path)
    assert r.exit_code == 0, r.output
    return json.loads(path.read_text()), r


# --------------------------------------------------------------------------- the command

def test_convert_stores_the_preprocessing(package):
    m = Package.load(package).manifest
    assert m["preprocess"] == {"name": "cifar10", "scale": 1 / 255, "mean": [0.4914, 0.4822, 0.4465],
                               "std": [0.2023, 0.1994, 0.2010], "layout": "NCHW", "resize": None,
                               "crop": None}
    assert Preprocess.from_dict(m["preprocess"]) == PRESETS["cifar10"]


def test_package_on_npz(package, small, truth, tmp_path):
    report, r = run_json(tmp_path, package, "--data", small["npz"], "--markdown", tmp_path / "r.md")
    assert report["images"] == N and report["num_classes"] == 10
    assert report["preprocess_from"] == "package" and report["preprocess"]["name"] == "cifar10"
    src = report["source"]
    assert src["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    assert src["top5"] == pytest.approx(truth["top5"], abs=1e-12)
    assert src["correct_top1"] == round(truth["top1"] * N)
    assert 0.8 <= src["top1"] < 1.0          # a trained CIFAR-10 model, real labels
    assert set(report["artifacts"]) == {"model.onnx", "model.optimized.onnx", "model.ort"}
    for name, art in report["artifacts"].items():
        assert art["top1"] == pytest.approx(truth["top1"], abs=1e-12), name
        assert art["top5"] == pytest.approx(truth["top5"], abs=1e-12), name
        assert art["agreement"] == 1.0 and art["agreeing"] == N and art["disagreeing_images"] == []
        assert 0 <= art["max_logit_diff"] < 1e-3
    assert report["artifacts"]["model.ort"]["options"]["model_format"] == "ORT"
    assert report["artifacts"]["model.onnx"]["options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    # the table on stdout and in Markdown
    assert "model.optimized.onnx" in r.output and f"{100 * truth['top1']:.2f}" in r.output
    md = (tmp_path / "r.md").read_text()
    assert "| model | top-1 % | top-5 % | agreement % | max logit diff | seconds | runtime |" in md
    assert f"| model.onnx | {100 * truth['top1']:.2f} | {100 * truth['top5']:.2f} | 100.00 |" in md


def test_both_data_forms_agree(package, small, truth, tmp_path):
    """An ImageFolder of PNGs (labels from the folder names' sorted order) and float NCHW
    arrays give what the uint8 .npz gives."""
    folder, _ = run_json(tmp_path, package, "--data", small["folder"], "--artifact", "model.onnx")
    assert folder["data"]["kind"] == "folder" and len(folder["data"]["classes"]) == 10
    assert folder["source"]["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    assert folder["artifacts"]["model.onnx"]["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    assert folder["artifacts"]["model.onnx"]["agreement"] == 1.0
    floats, _ = run_json(tmp_path, package, "--data", small["float"], "--artifact", "model.onnx")
    assert floats["data"]["form"] == "float NCHW"
    assert floats["source"]["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    # the folder's labels are its class folders' sorted order: the real labels, image by image
    ds = open_dataset(small["folder"])
    assert ds.labels.tolist() == [int(small["labels"][int(p.stem)]) for p, _ in ds.samples]


def test_model_file_is_converted_then_evaluated(small, truth, tmp_path):
    report, _ = run_json(tmp_path, BUNDLED, "--arch", "resnet20", "--preprocess", "cifar10",
                         "--data", small["npz"], "--artifact", "model.onnx")
    assert report["model"]["kind"] == "model file" and report["model"]["target"] == "ort-cpu"
    assert report["source"]["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    assert report["artifacts"]["model.onnx"]["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    assert report["artifacts"]["model.onnx"]["agreement"] == 1.0
    # a model file records no preprocessing: refused without one
    r = cli("evaluate", BUNDLED, "--arch", "resnet20", "--data", small["npz"])
    assert r.exit_code == 2 and "--preprocess cifar10|imagenet" in error_line(r)


def test_onnx_model_file_source(package, small, truth, tmp_path):
    """A model from outside the zoo (an ONNX file): its source runs under ONNX Runtime."""
    onnx_file = tmp_path / "r20.onnx"
    shutil.copy(Path(package) / "reference.onnx", onnx_file)
    report, _ = run_json(tmp_path, onnx_file, "--preprocess", "cifar10", "--data", small["npz"],
                         "--artifact", "model.onnx", "--limit", 16)
    assert report["images"] == 16
    assert "the source ONNX file" in report["source"]["runtime"]
    want = (truth["logits"][:16].argmax(1) == small["labels"][:16]).mean()
    assert report["source"]["top1"] == pytest.approx(want, abs=1e-12)
    assert report["artifacts"]["model.onnx"]["agreement"] == 1.0


def test_preprocessing_flags_override_and_are_required(package, small, tmp_path):
    # overriding the stored mean/std changes the inputs, and so the logits
    report, _ = run_json(tmp_path, package, "--data", small["npz"], "--artifact", "model.onnx",
                         "--mean", "0,0,0", "--std", "1,1,1")
    assert report["preprocess_from"] == "package+options"
    assert report["preprocess"]["mean"] == [0, 0, 0] and report["preprocess"]["name"] is None
    # a package converted without --preprocess: refused, naming the presets
    bare = tmp_path / "bare"
    shutil.copytree(package, bare)
    m = json.loads((bare / "manifest.json").read_text())
    m["preprocess"] = None
    (bare / "manifest.json").write_text(json.dumps(m))
    r = cli("evaluate", bare, "--data", small["npz"])
    assert r.exit_code == 2
    assert "records no preprocessing" in error_line(r) and "--preprocess cifar10|imagenet" in error_line(r)
    ok, _ = run_json(tmp_path, bare, "--data", small["npz"], "--preprocess", "cifar10", "--artifact", "model.onnx")
    assert ok["preprocess_from"] == "options"


def test_source_gone_is_reported_not_an_error(package, small, truth, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(package, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["source"]["path"] = str(tmp_path / "gone.t7")
    (moved / "manifest.json").write_text(json.dumps(m))
    report, r = run_json(tmp_path, moved, "--data", small["npz"], "--artifact", "model.onnx")
    assert report["source"] is None and "is not there any more" in report["source_unavailable"]
    art = report["artifacts"]["model.onnx"]
    assert art["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    assert art["agreement"] is None and art["max_logit_diff"] is None
    assert "source not evaluated" in r.output


def test_fp16_package_takes_fp16_inputs(small, truth, tmp_path):
    out = tmp_path / "h"
    r = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "ort-cpu", "--precision", "fp16",
            "--preprocess", "cifar10", "-o", out)
    assert r.exit_code == 0, r.output
    report = evaluate(out, small["npz"], EvaluateOptions(artifacts=["model.onnx"]))
    art = report["artifacts"]["model.onnx"]
    assert report["model"]["precision"] == "fp16"
    assert report["source"]["top1"] == pytest.approx(truth["top1"], abs=1e-12)
    pred = truth["logits"].argmax(1)
    assert art["agreeing"] >= N - 1 and 0 < art["max_logit_diff"] < 0.5   # half precision: close, not equal
    assert abs(art["correct_top1"] - int((pred == small["labels"]).sum())) <= N - art["agreeing"]


def test_tvm_library_here_and_over_rpc(small, truth, tmp_path, host_rpc_server):
    out = tmp_path / "tvm"
    r = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "--preprocess", "cifar10",
            "-o", out)
    assert r.exit_code == 0, r.output
    here, _ = run_json(tmp_path, out, "--data", small["npz"], "--limit", 16)
    assert set(here["artifacts"]) == {"model.onnx", "model.so"}
    lib = here["artifacts"]["model.so"]
    want = (truth["logits"][:16].argmax(1) == small["labels"][:16]).mean()
    assert "TVM VM on this host" in lib["runtime"] and lib["agreement"] == 1.0
    assert lib["top1"] == pytest.approx(want, abs=1e-12)
    _, address = host_rpc_server
    remote, _ = run_json(tmp_path, out, "--data", small["npz"], "--limit", 8, "--artifact", "model.so",
                         "--rpc", address, "--no-source")
    assert address in remote["artifacts"]["model.so"]["runtime"] and remote["source"] is None
    assert remote["artifacts"]["model.so"]["top1"] == pytest.approx(
        (truth["logits"][:8].argmax(1) == small["labels"][:8]).mean(), abs=1e-12)


def test_refusals(package, small):
    r = cli("evaluate", package, "--data", small["npz"], "--rpc", "127.0.0.1:9")
    assert r.exit_code == 2 and "has none to run" in error_line(r)
    r = cli("evaluate", package, "--data", small["npz"], "--artifact", "model.so")
    assert r.exit_code == 2 and "ships no model.so" in error_line(r)
    r = cli("evaluate", package, "--data", small["npz"], "--arch", "resnet20")
    assert r.exit_code == 2 and "leave --arch out" in error_line(r)
    r = cli("evaluate", package, "--data", small["npz"], "--mean", "a,b")
    assert r.exit_code == 2


# --------------------------------------------------------------------------- bad data

def _png(path: Path, h: int = 32, w: int = 32, seed: int = 0):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _folder(root: Path, classes: int = 10, per: int = 1) -> Path:
    for c in range(classes):
        for i in range(per):
            _png(root / f"c{c}" / f"{i}.png", seed=c * 10 + i)
    return root


def bad_data_cases(tmp: Path, images: np.ndarray) -> list:
    cases = []
    np.savez(tmp / "small28.npz", images=images[:4, :28, :28], labels=np.arange(4))
    cases.append(("small28.npz", 47, "the images are 28x28, the model takes 32x32"))
    _folder(tmp / "oddsize")
    _png(tmp / "oddsize" / "c3" / "big.png", 40, 40)
    cases.append(("oddsize", 47, "big.png is 40x40, the model takes 32x32"))
    np.savez(tmp / "gray.npz", images=images[:4, :, :, :1], labels=np.arange(4))
    cases.append(("gray.npz", 47, "the images have 1 channel(s), the model takes 3"))
    np.savez(tmp / "label10.npz", images=images[:4], labels=np.array([1, 2, 3, 10]))
    cases.append(("label10.npz", 48, "label 10 of image 3 is not a class of the model, which has 10 outputs"))
    np.savez(tmp / "negative.npz", images=images[:4], labels=np.array([-1, 2, 3, 4]))
    cases.append(("negative.npz", 48, "label -1 of image 0 is not a class"))
    np.savez(tmp / "floatlabels.npz", images=images[:4], labels=np.array([1.0, 2.0, 3.0, 4.0]))
    cases.append(("floatlabels.npz", 48, "'labels' is float64; need integer class indices"))
    np.savez(tmp / "short.npz", images=images[:4], labels=np.arange(3))
    cases.append(("short.npz", 48, "'labels' has shape [3] for 4 images"))
    _folder(tmp / "broken")
    (tmp / "broken" / "c5" / "bad.png").write_bytes(b"not a png at all")
    cases.append(("broken", 49, "bad.png is not an image Pillow can read"))
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04 nothing more")
    cases.append(("garbage.npz", 49, "is not a readable .npz file"))
    np.savez(tmp / "nolabels.npz", images=images[:4])
    cases.append(("nolabels.npz", 49, "has no 'labels' array"))
    (tmp / "empty").mkdir()
    cases.append(("empty", 50, "has no class subfolders (it is empty)"))
    _folder(tmp / "hollow")
    (tmp / "hollow" / "c99").mkdir()
    cases.append(("hollow", 50, "c99 holds no images"))
    np.savez(tmp / "none.npz", images=images[:0], labels=np.zeros(0, np.int64))
    cases.append(("none.npz", 50, "holds no images"))
    _folder(tmp / "three", classes=3)
    cases.append(("three", 51, "has 3 classes and the model has 10 outputs"))
    np.savez(tmp / "named.npz", images=images[:4], labels=np.arange(4), classes=np.array(["a", "b", "c", "d"]))
    cases.append(("named.npz", 51, "has 4 classes and the model has 10 outputs"))
    (tmp / "zero.npz").write_bytes(b"")
    cases.append(("zero.npz", 50, "is an empty file"))
    cases.append(("missing.npz", 10, "missing.npz does not exist"))
    return cases


def test_bad_data_is_one_line_with_its_exit_code(package, small, tmp_path):
    for name, code, message in bad_data_cases(tmp_path, small["images"]):
        r = cli("evaluate", package, "--data", tmp_path / name)
        assert r.exit_code == code, (name, r.exit_code, r.output)
        line = error_line(r)
        assert message in line, (name, line)
        assert "Traceback" not in r.output


# --------------------------------------------------------------------------- preprocessing

def test_presets_and_resize_crop():
    from PIL import Image
    assert PRESETS["imagenet"].resize == 256 and PRESETS["imagenet"].crop == 224
    assert PRESETS["imagenet"].mean == (0.485, 0.456, 0.406) and PRESETS["imagenet"].std == (0.229, 0.224, 0.225)
    assert PRESETS["cifar10"].mean == (0.4914, 0.4822, 0.4465) and PRESETS["cifar10"].layout == "NCHW"
    for p in PRESETS.values():
        assert Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    img = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    x = PRESETS["imagenet"].apply_uint8(img[None])
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    # torchvision's Resize(256) + CenterCrop(224), written out: 300x400 -> 256x341, crop at (16, 58)
    ref = np.asarray(Image.fromarray(img).resize((341, 256), Image.BILINEAR))[16:240, 58:282]
    want = (ref / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), atol=1e-5)
    nhwc = Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3, layout="NHWC").apply_uint8(img[None, :4, :4])
    np.testing.assert_allclose(nhwc[0], (img[:4, :4] / 255 - 0.5) / 0.25, atol=1e-5)
    assert PRESETS["cifar10"].replace(mean=(0, 0, 0)).name is None
    assert PRESETS["cifar10"].replace(layout="NCHW") is PRESETS["cifar10"]


# --------------------------------------------------------------------------- published checkpoints

SLICE = 200
# Two families, one with FP16 storage (the bundled ResNet-20 is checked above; all 9 in the
# slow tier): ~25 s each on 2 cores, most of it the conversion.
SLICE_FIXTURES = ["resnet56-csg-16x16x3x3-128-fp16.t7", "shufflenetv2-0.5x-csg-16x16x1x1-16.t7"]


@pytest.mark.parametrize("name", SLICE_FIXTURES)
def test_published_checkpoints_slice(name, fixtures_dir, cifar10_dir, test_set, tmp_path):
    """The first test images through a published checkpoint given as a model file (converted
    for ort-cpu): the artifact's predictions equal the source's, and the accuracy is the one
    computed apart from evaluate on the real labels."""
    arch = PA.CHECKPOINTS[name][0]
    report, _ = run_json(tmp_path, fixtures_dir / name, "--arch", arch, "--preprocess", "cifar10",
                         "--data", cifar10_dir / "test.npz", "--limit", SLICE, "--artifact", "model.onnx")
    art = report["artifacts"]["model.onnx"]
    assert report["images"] == SLICE
    assert art["agreement"] == 1.0 and art["agreeing"] == SLICE and art["disagreeing_images"] == []
    logits = expected_logits(fixtures_dir / name, arch, test_set[0][:SLICE])
    want = int((logits.argmax(1) == test_set[1][:SLICE]).sum())
    assert report["source"]["correct_top1"] == want and art["correct_top1"] == want
    assert report["source"]["top1"] == pytest.approx(want / SLICE, abs=1e-12)
    assert 0.85 <= want / SLICE <= 0.99     # near the stored accuracy, on real labels


def test_accuracy_doc_has_every_published_row_within_tolerance(fixtures_dir):
    """docs/accuracy.md: one row per published checkpoint, each accuracy within 0.1 points of
    the stored one (which must be the file's own `acc`)."""
    text = (REPO / "docs" / "accuracy.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([^`]+\.t7)` \| [^|]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                     r"([\d.]+)(?: \*)? \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.groups()[1:]]
    assert sorted(rows) == sorted(PA.CHECKPOINTS)
    for name, (stored, source, fp32, fp32_agree, fp16, fp16_agree, worst) in rows.items():
        acc = torch.load(fixtures_dir / name, map_location="cpu", weights_only=True)["acc"]
        assert stored == pytest.approx(float(acc), abs=0.005), name
        for value in (source, fp32, fp16):
            assert abs(value - stored) <= PA.TOLERANCE_POINTS, (name, value, stored)
        assert fp32_agree >= 99.9 and worst <= PA.TOLERANCE_POINTS
    assert "structexport evaluate" in text and "10,000 images" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PA.CHECKPOINTS))
def test_published_accuracy_full(name, fixtures_dir, cifar10_dir, tmp_path):
    """Every row of docs/accuracy.md, measured again on the full test set: source, fp32 and
    fp16 artifacts within 0.1 points of the accuracy stored in the file, and the documented
    numbers within 0.05 points of what this run measures."""
    row = PA.measure(name, tmp_path, data=cifar10_dir / "test.npz", say=lambda _m: None)
    assert row["images"] == 10_000
    stored = torch.load(fixtures_dir / name, map_location="cpu", weights_only=True)["acc"]
    assert row["stored"] == pytest.approx(float(stored))
    for value in (row["source"], row["fp32"]["top1"], row["fp16"]["top1"]):
        assert abs(value - row["stored"]) <= PA.TOLERANCE_POINTS, (name, value, row["stored"])
    assert row["fp32"]["agreement"] >= 99.9
    line = next(line for line in (REPO / "docs" / "accuracy.md").read_text().splitlines()
                if line.startswith(f"| `{name}` |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    documented = [float(cells[i].rstrip(" *")) for i in (3, 4, 6)]     # "*": fp16 converted looser
    for doc, now in zip(documented, (row["source"], row["fp32"]["top1"], row["fp16"]["top1"])):
        assert abs(doc - now) <= 0.05, (name, doc, now)
