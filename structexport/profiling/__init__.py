"""The pieces of ``structexport profile`` (driven by :func:`structexport.profile.run_profile`):
collect (:mod:`.ort`, :mod:`.tvm_host`, :mod:`.tvm_remote`, :mod:`.executorch`, :mod:`.litert`,
:mod:`.peak`) -> map kernels to
layers (:mod:`.layermap`) -> a typed report dict (:mod:`.assemble`, ``SCHEMA``) -> render
(:mod:`.render`: HTML, Markdown, JSON, terminal lines).

Where the time comes from:

- ``ort-cpu``: ONNX Runtime's profiler (one ``*_kernel_time`` event per node and run, one
  ``model_run`` event per run). The nodes of ONNX Runtime's optimized graph (the names the
  profiler reports) are mapped back to source layers by the names of the weights they read
  (:func:`.layermap.onnx_node_layers`, which ``bench --per-layer`` uses too), with residual
  shortcuts handled (:func:`.layermap.call_layers`).
- ``tvm-llvm``: the Relax VM's instrument hook (TVM 0.27 has no ``profile=True`` VM any
  more: :meth:`tvm.runtime.vm.VirtualMachine.set_instrument` is what it offers), timing every
  call of a compiled PrimFunc. The ONNX model is imported with ``keep_params_in_input=True``
  so that weights stay named parameters of ``main``; the lowered ``main`` is walked binding by
  binding, which gives each PrimFunc call the weights it reads (through the VM's reshapes),
  and the VM runs those calls in that order. The library profiled is compiled from the same
  ``model.onnx`` with the same target and pipeline as ``model.so``, weights passed as inputs;
  the dense counterpart is exported, rewritten by the same passes and compiled the same way.
- ``--rpc`` / ``--tracker`` (tvm-llvm, tvm-arm on a device, :func:`.tvm_remote.profile_remote`):
  the instrument hook does not cross RPC; each PrimFunc call is timed on its own on the device.

- ``executorch``: ETDump (``enable_etdump=True``, read with ``executorch.devtools.Inspector``):
  XNNPACK's operator events, the portable kernels' events, ``Method::execute`` per run; the
  structured program (``model.pte``) beside ``reference.pte``.
- ``litert``: the LiteRT C API's profiler, through ctypes on the wheel's ``libLiteRt.so``
  (the Python API has none), on a ``CompiledModel``: XNNPACK's operator events, builtin
  kernels' ``OPERATOR`` events, ``Invoke`` per run; ``model.tflite`` beside
  ``reference.tflite``. Both name XNNPACK's operators only (no node, no module path): they
  are mapped to layers by order against the package's ONNX graph's multiply-add nodes
  (:func:`.executorch.event_layers`, checked), as ``docs/profile.md`` says.

Rows that are not a source layer, never dropped: ``(unmapped)`` (kernels no layer could be
found for; what they are is listed in ``mapping``) and ``(outside kernels)`` (the profiled
run's time outside any kernel: ONNX Runtime's executor, the TVM VM's interpreter,
allocations and the profiler's own hooks). The rows add up to the profiled run's total.
"""
