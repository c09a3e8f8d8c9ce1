"""The structexport model zoo (installed as ``structexport.models``)."""
from .zoo import (ARCHITECTURES, Architecture, ModelSpec, build_model, csg_site_names,
                  input_shape, list_names, parse_name)

__all__ = ["ARCHITECTURES", "Architecture", "ModelSpec", "build_model", "csg_site_names",
           "input_shape", "list_names", "parse_name"]
