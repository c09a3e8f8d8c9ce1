"""One interface for every target: what the target needs from the passes, and what it
writes beside the verified ``model.onnx``."""
from __future__ import annotations

from pathlib import Path


class Target:
    name = ""
    description = ""
    # Whether the target's runtime folds batch norm into convs itself.
    folds_batchnorm = False

    def default_passes(self) -> list[str]:
        from structexport.passes import PIPELINE
        return [p for p in PIPELINE if not (p == "fold_batchnorm" and self.folds_batchnorm)]

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        """Write target-specific files into ``outdir``; returns {file name: what it is}."""
        return {}

    def verify(self, outdir: Path, reference, inputs, precision, atol, rtol):
        """Run the target's own artifact against the source model (a ``Verification``); a
        string says why it could not run here (no such device); None when the ONNX
        verification already covers what the target runs."""
        return None
