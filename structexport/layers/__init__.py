"""The three families of structured layers, as torch modules."""
from .csg import CSGConv2d, CSGGenerator, generate_kernel, num_slices
from .ssc import SSCConv2d, ssc_mask
from .structured import (StructuredConv2d, StructuredLinear, box_window, compose_kernel,
                         project_to_structure, structural_regularization_loss,
                         structure_basis, structured_residual, sum_pool)

__all__ = [
    "CSGConv2d", "CSGGenerator", "generate_kernel", "num_slices",
    "SSCConv2d", "ssc_mask",
    "StructuredConv2d", "StructuredLinear", "box_window", "compose_kernel",
    "project_to_structure", "structural_regularization_loss", "structure_basis",
    "structured_residual", "sum_pool",
]
