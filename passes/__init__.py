"""Graph passes that rewrite structured layers (installed as ``structexport.passes``).

One pass per file, named ``<verb>_<noun>_pass.py``; :mod:`.infra` holds the pass base
class, the context, the records and the manager.
"""
from .infra import (LayerRecord, Pass, PassContext, PassError, PassManager, PassResult, PassRun,
                    replace_module)

__all__ = ["LayerRecord", "Pass", "PassContext", "PassError", "PassManager", "PassResult",
           "PassRun", "replace_module"]
