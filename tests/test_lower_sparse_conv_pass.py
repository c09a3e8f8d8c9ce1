"""lower_sparse_conv (ONNX): a conv whose weights have permuted block sparsity, in a model
that is not in the zoo, becomes a gathered grouped conv. Pattern before (a dense Conv with
75% zeros), gone after (Gather + grouped Conv, the dense kernel removed), outputs match."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn as nn

from structexport.convert import ConvertOptions, convert_onnx, prepare_onnx
from structexport.ortsession import ort_session
from structexport.passes import ONNX, PassContext, PassManager
from structexport.passes.lower_sparse_conv_pass import LowerSparseConvPass


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 32, 3, 1, 1)
        self.b = nn.Conv2d(32, 32, 3, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def sparse_model(tmp_path):
    torch.manual_seed(0)
    net = TwoConvs().eval()
    with torch.no_grad():
        perm = torch.randperm(32)
        mask = torch.zeros(32, 32, 1, 1)
        for g in range(4):     # 4 blocks of 8x8 channels, permuted
            idx = perm[g * 8:(g + 1) * 8]
            mask[idx[:, None], idx[None, :]] = 1
        net.b.weight.mul_(mask)
    path = tmp_path / "sparse.onnx"
    torch.onnx.export(net, (torch.randn(1, 16, 16, 16),), dynamo=True, opset_version=18).save(str(path))
    return path


def test_pattern_before_gone_after_outputs_match(tmp_path):
    proto = prepare_onnx(onnx.load(sparse_model(tmp_path)))
    before = ir.from_proto(proto)
    assert [n.op_type for n in before.graph].count("Conv") == 2 and "b.weight" in before.graph.initializers
    x = torch.randn(1, 16, 16, 16)
    after, runs = PassManager([LowerSparseConvPass()], check_inputs=x, model_kind=ONNX).run(before, PassContext())
    records = {r.layer: r for r in runs[0].records}
    assert records["b"].action == "lowered" and records["b"].details["macs_ratio"] == 0.25
    assert "a" not in records                      # dense weights: nothing to lower
    ops = [n.op_type for n in after.graph]
    assert "Gather" in ops and "b.weight" not in after.graph.initializers
    grouped = [n for n in after.graph if n.op_type == "Conv" and n.attributes.get("group")
               and n.attributes["group"].value == 4]
    assert len(grouped) == 1
    out = ir.to_proto(after)
    onnx.checker.check_model(out, full_check=True)
    want = ort_session(proto.SerializeToString(), optimize=False).run(None, {"x": x.numpy()})[0]
    got = ort_session(out.SerializeToString(), optimize=False).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_convert_onnx_lowers_and_verifies(tmp_path):
    result = convert_onnx(onnx.load(sparse_model(tmp_path)), tmp_path / "out", ConvertOptions(target="ort-cpu"))
    m = result.manifest
    assert m["verification"]["passed"] is True
    lowered = [r for run in m["passes"] for r in run["records"] if r["action"] == "lowered"]
    assert [r["layer"] for r in lowered] == ["b"]
    assert m["before"]["macs"] > m["after"]["macs"]
