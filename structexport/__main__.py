"""``python -m structexport``: the same as the ``structexport`` command."""
from structexport.cli import run

run()
