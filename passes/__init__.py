"""Graph passes that rewrite structured layers (installed as ``structexport.passes``).

The pass infrastructure and the passes themselves (decompose_structured,
realize_sumpool, materialize_csg, lower_ssc, fold_batchnorm) arrive with the convert
work; this package is the place they live.
"""
