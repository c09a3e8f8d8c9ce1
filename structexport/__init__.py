"""structexport: export structured-convolution CNNs for edge deployment."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("structexport")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
