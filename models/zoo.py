"""The model zoo: names users type, resolved to torch modules.

A name is a base architecture plus an optional family suffix:

- ``-csg-S0xS1xSHxSW-K``: CSG with slice ``[S0,S1,SH,SW]`` and code size ``K``, placed where
  the paper places it; add ``-frozen`` for a pre-trained, frozen generator;
- ``-bcsg-S0xS1xSHxSW-K``: binary CSG (generator fixed at +-0.5 signs drawn from a seed);
- ``-ssc-T``: the supplement's ``T``% ticket of structured sparse convs;
- ``-struct-c2n2`` / ``-struct-c1n2``: every 3x3 conv after the stem at ``C/2 x 2 x 2`` /
  ``C x 2 x 2`` (depthwise 3x3 convs spatially only, at ``1 x 2 x 2``); other convs dense.

Variants are built by replacing the base model's ``nn.Conv2d`` modules in place, so every
variant keeps the base model's module names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from structexport.errors import UnknownArchitectureError
from structexport.layers import CSGConv2d, CSGGenerator, SSCConv2d, StructuredConv2d

from .cifar_resnet import CifarResNet
from .densenet import DenseNetBC
from .imagenet_resnet import ImageNetResNet
from .mobilenetv2 import MobileNetV2
from .shufflenetv2 import ShuffleNetV2
from .vgg import VGG

CIFAR_INPUT = (1, 3, 32, 32)
IMAGENET_INPUT = (1, 3, 224, 224)


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]
    stem: str
    description: str
    # Convs that the CSG paper generates (module-name patterns, matched in full).
    csg_sites: tuple[str, ...] = ()
    # How the reference code names each CSG layer's codes: {code param: conv module}.
    csg_code_names: dict[str, str] = field(default_factory=dict)
    # SSC tickets: ticket -> {out_channels: (p, g)} applied to every conv after the stem.
    ssc_tickets: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    # The paper's CSG and BCSG configurations for this network: (slice, code size).
    csg_default: tuple[tuple[int, int, int, int], int] = ((16, 16, 3, 3), 128)
    bcsg_default: tuple[tuple[int, int, int, int], int] = ((16, 16, 3, 3), 1024)


def _cifar_resnet(depth: int, widths=(16, 32, 64)):
    return lambda: CifarResNet(depth, widths)


_RESNET_CSG = dict(csg_sites=(r"stage_\d\.\d+\.conv_[ab]",),
                   csg_code_names={"code": "conv_a", "code2": "conv_b"})

ARCHITECTURES: dict[str, Architecture] = {}


def _register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


for _depth in (20, 32, 44, 56, 110):
    _register(Architecture(f"resnet{_depth}", _cifar_resnet(_depth), CIFAR_INPUT, "conv_1_3x3",
                           f"CIFAR ResNet-{_depth}, parameter-free shortcuts", **_RESNET_CSG))

_register(Architecture(
    "resnet32x2", _cifar_resnet(32, (32, 64, 128)), CIFAR_INPUT, "conv_1_3x3",
    "CIFAR ResNet-32 with filters doubled to 32/64/128", **_RESNET_CSG,
    ssc_tickets={"10": {32: (2, 2), 64: (4, 4), 128: (15, 4)},
                 "5": {32: (2, 2), 64: (8, 8), 128: (64, 32)},
                 "2": {32: (16, 8), 64: (32, 32), 128: (64, 64)}}))

_register(Architecture(
    "vgg19", lambda: VGG("vgg19"), CIFAR_INPUT, "features.0", "CIFAR VGG-19 with batch norm",
    ssc_tickets={"10": {64: (1, 1), 128: (2, 2), 256: (2, 4), 512: (2, 16)},
                 "5": {64: (1, 1), 128: (2, 1), 256: (4, 4), 512: (16, 16)},
                 "2": {64: (1, 1), 128: (4, 4), 256: (8, 8), 512: (25, 64)}}))

for _k in (36, 48):
    _register(Architecture(
        f"densenet-bc-40-{_k}", (lambda k=_k: DenseNetBC(40, k)), CIFAR_INPUT, "conv1",
        f"CIFAR DenseNet-BC, L=40, growth rate k={_k}",
        csg_sites=(r"dense\d\.\d+\.conv2",), csg_code_names={"code2": "conv2"},
        csg_default=((12, 12, 3, 3), 72), bcsg_default=((12, 12, 3, 3), 72)))

_register(Architecture(
    "shufflenetv2-0.5x", lambda: ShuffleNetV2(0.5), CIFAR_INPUT, "conv1",
    "CIFAR ShuffleNetV2 0.5x", csg_sites=("conv2",), csg_code_names={"code2": "conv2"},
    csg_default=((16, 16, 1, 1), 16), bcsg_default=((16, 16, 1, 1), 16)))

_register(Architecture(
    "mobilenetv2", MobileNetV2, CIFAR_INPUT, "conv1", "CIFAR MobileNetV2",
    csg_sites=(r"layers\.\d+\.conv1",), csg_code_names={"code1": "conv1"},
    csg_default=((16, 16, 1, 1), 16), bcsg_default=((16, 16, 1, 1), 16)))

_register(Architecture(
    "resnet18", lambda: ImageNetResNet(18), IMAGENET_INPUT, "conv1",
    "ImageNet ResNet-18, torchvision layout",
    csg_sites=(r"layer\d\.\d+\.conv[12]",), csg_code_names={"code1": "conv1", "code2": "conv2"}))
for _depth in (50, 101):
    _register(Architecture(
        f"resnet{_depth}", (lambda d=_depth: ImageNetResNet(d)), IMAGENET_INPUT, "conv1",
        f"ImageNet ResNet-{_depth}, torchvision layout",
        csg_sites=(r"layer\d\.\d+\.conv2",), csg_code_names={"code2": "conv2"}))


@dataclass(frozen=True)
class ModelSpec:
    """A parsed zoo name."""
    base: str
    family: str = "dense"          # dense | csg | bcsg | ssc | struct
    slice_shape: tuple[int, int, int, int] | None = None
    code_size: int | None = None
    frozen: bool = False
    ticket: str | None = None
    struct: str | None = None      # c2n2 | c1n2

    @property
    def name(self) -> str:
        if self.family in ("csg", "bcsg"):
            s = "x".join(map(str, self.slice_shape))
            return f"{self.base}-{self.family}-{s}-{self.code_size}" + ("-frozen" if self.frozen else "")
        if self.family == "ssc":
            return f"{self.base}-ssc-{self.ticket}"
        if self.family == "struct":
            return f"{self.base}-struct-{self.struct}"
        return self.base

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.base]


_SUFFIX = re.compile(
    r"^(?P<base>.+?)(?:"
    r"-(?P<fam>csg|bcsg)-(?P<slice>\d+x\d+x\d+x\d+)-(?P<code>\d+)(?P<frozen>-frozen)?"
    r"|-ssc-(?P<ticket>\d+)"
    r"|-struct-(?P<struct>c2n2|c1n2))?$")


def parse_name(name: str) -> ModelSpec:
    """Parse a zoo name; unknown names raise with the closest valid names."""
    m = _SUFFIX.match(name.strip().lower())
    base = m.group("base") if m else name
    if base not in ARCHITECTURES:
        import difflib
        close = difflib.get_close_matches(base, ARCHITECTURES, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `structexport zoo` to list them"
        raise UnknownArchitectureError(f"unknown architecture {name!r}", hint)
    if m.group("fam"):
        slice_shape = tuple(int(v) for v in m.group("slice").split("x"))
        if m.group("fam") == "bcsg" and m.group("frozen"):
            raise UnknownArchitectureError(f"{name!r}: a BCSG generator is always fixed; drop -frozen")
        if not ARCHITECTURES[base].csg_sites:
            raise UnknownArchitectureError(f"{base} has no CSG variant in the zoo",
                                           "run `structexport zoo` to list the variants")
        return ModelSpec(base, m.group("fam"), slice_shape, int(m.group("code")),
                         frozen=bool(m.group("frozen")))
    if m.group("ticket"):
        tickets = ARCHITECTURES[base].ssc_tickets
        if m.group("ticket") not in tickets:
            have = ", ".join(f"{base}-ssc-{t}" for t in tickets) or "none for this architecture"
            raise UnknownArchitectureError(f"no SSC ticket {m.group('ticket')!r} for {base}",
                                           f"available: {have}")
        return ModelSpec(base, "ssc", ticket=m.group("ticket"))
    if m.group("struct"):
        return ModelSpec(base, "struct", struct=m.group("struct"))
    return ModelSpec(base)


def list_names() -> list[str]:
    """Every base name and the variants the zoo ships by default."""
    names = []
    for arch in ARCHITECTURES.values():
        names.append(arch.name)
        if arch.csg_sites:
            for family, (slice_shape, code) in (("csg", arch.csg_default),
                                                ("bcsg", arch.bcsg_default)):
                names.append(f"{arch.name}-{family}-{'x'.join(map(str, slice_shape))}-{code}")
        names += [f"{arch.name}-ssc-{t}" for t in arch.ssc_tickets]
        names += [f"{arch.name}-struct-c2n2", f"{arch.name}-struct-c1n2"]
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _convs(model: nn.Module, stem: str):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != stem]


def csg_site_names(model: nn.Module, arch: Architecture) -> list[str]:
    """Module names of the convs the CSG paper generates in this architecture."""
    pattern = re.compile("|".join(f"(?:{p})" for p in arch.csg_sites))
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, CSGConv2d)) and pattern.fullmatch(n)]


def apply_csg(model: nn.Module, arch: Architecture, slice_shape, code_size: int,
              mode: str, seed: int) -> nn.Module:
    generator = CSGGenerator(slice_shape, code_size, mode=mode, seed=seed)
    model.generator = generator
    for name in csg_site_names(model, arch):
        conv = model.get_submodule(name)
        if conv.groups != 1:
            raise ValueError(f"CSG site {name} is a grouped conv; CSG generates full kernels")
        _replace(model, name, CSGConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                        generator, conv.stride[0], conv.padding[0],
                                        bias=conv.bias is not None))
    return model


def apply_ssc(model: nn.Module, arch: Architecture, ticket: str) -> nn.Module:
    table = arch.ssc_tickets[ticket]
    for name, conv in _convs(model, arch.stem):
        if conv.out_channels not in table:
            continue
        p, g = table[conv.out_channels]
        _replace(model, name, SSCConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                                        p, g, conv.stride[0], conv.padding[0],
                                        bias=conv.bias is not None))
    return model


def apply_struct(model: nn.Module, arch: Architecture, which: str, mode: str = "coeff") -> nn.Module:
    for name, conv in _convs(model, arch.stem):
        if conv.kernel_size != (3, 3):
            continue
        C = conv.in_channels // conv.groups
        c = max(1, C // 2) if which == "c2n2" else C
        _replace(model, name, StructuredConv2d(conv.in_channels, conv.out_channels, 3, c, 2,
                                               conv.stride[0], conv.padding[0], conv.groups,
                                               bias=conv.bias is not None, mode=mode))
    return model


def build_model(name: str | ModelSpec, seed: int = 0, struct_mode: str = "coeff") -> nn.Module:
    """A freshly initialised zoo model (weights drawn from ``seed``), in eval mode.

    ``struct_mode="dense"`` builds structured layers that keep a dense weight, for training
    with :func:`structexport.layers.structural_regularization_loss` and decomposing after.
    """
    spec = parse_name(name) if isinstance(name, str) else name
    arch = spec.architecture
    torch.manual_seed(seed)
    model = arch.build()
    if spec.family in ("csg", "bcsg"):
        mode = "binary" if spec.family == "bcsg" else ("frozen" if spec.frozen else "trained")
        apply_csg(model, arch, spec.slice_shape, spec.code_size, mode, seed)
    elif spec.family == "ssc":
        apply_ssc(model, arch, spec.ticket)
    elif spec.family == "struct":
        apply_struct(model, arch, spec.struct, struct_mode)
    model.structexport_name = spec.name
    return model.eval()


def input_shape(name: str | ModelSpec) -> tuple[int, int, int, int]:
    spec = parse_name(name) if isinstance(name, str) else name
    return spec.architecture.input_shape

