"""The zoo matches the papers: exact parameter counts, torchvision's layouts, variant placement."""
import pytest
import torch
import torch.nn as nn

from structexport.analysis import count_params, summarize
from structexport.errors import UnknownArchitectureError
from structexport.layers import CSGConv2d, SSCConv2d, StructuredConv2d
from structexport.models import ARCHITECTURES, build_model, input_shape, list_names, parse_name

# DESIGN.md section 1.2, "# Param" column: counts the generator when it is trained and
# leaves it out when it is fixed (BCSG, pre-trained frozen generator).
PAPER_TABLE = [
    ("resnet56", 853_018),
    ("resnet56-csg-16x16x3x3-128", 347_162),
    ("resnet56-csg-16x16x3x3-128-frozen", 52_250),
    ("resnet56-csg-12x12x3x3-72", 160_450),
    ("resnet56-bcsg-16x16x3x3-1024", 381_978),
    ("densenet-bc-40-48", 2_733_130),
    ("densenet-bc-40-48-csg-12x12x3x3-72", 1_416_394),
    ("densenet-bc-40-48-bcsg-12x12x3x3-72", 1_323_082),
    ("densenet-bc-40-36", 1_542_682),
    ("densenet-bc-40-36-csg-12x12x3x3-72", 842_842),
    ("shufflenetv2-0.5x", 352_042),
    ("shufflenetv2-0.5x-csg-16x16x1x1-16", 171_818),
    ("shufflenetv2-0.5x-bcsg-16x16x1x1-16", 167_722),
    ("mobilenetv2", 2_296_922),
    ("mobilenetv2-csg-16x16x1x1-16", 1_595_322),
    ("mobilenetv2-bcsg-16x16x1x1-16", 1_591_226),
    ("resnet50", 25_557_032),
    ("resnet50-csg-16x16x3x3-128", 15_163_432),
    ("resnet101", 44_549_160),
    ("resnet101-csg-16x16x3x3-128", 24_685_608),
]

# torchvision.models.resnetXX(): sum(p.numel() for p in m.parameters()).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160}

REQUIRED_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet32x2", "vgg19",
                  "densenet-bc-40-36", "densenet-bc-40-48", "shufflenetv2-0.5x", "mobilenetv2",
                  "resnet18", "resnet50", "resnet101"]


@pytest.mark.parametrize("name,expected", PAPER_TABLE)
def test_trainable_params_match_paper_table(name, expected):
    _, trainable = count_params(build_model(name))
    assert trainable == expected


@pytest.mark.parametrize("name,expected", sorted(TORCHVISION_PARAMS.items()))
def test_imagenet_resnets_match_torchvision_param_counts(name, expected):
    assert count_params(build_model(name))[0] == expected


def test_resnet18_has_torchvision_state_dict_layout():
    keys = list(build_model("resnet18").state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                        "bn1.running_var", "bn1.num_batches_tracked"]
    for key in ("layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert key in keys
    assert len(keys) == 122  # torchvision resnet18().state_dict() has 122 entries


def test_resnet50_bottleneck_layout():
    sd = build_model("resnet50").state_dict()
    assert tuple(sd["layer1.0.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
    assert len(sd) == 320  # torchvision resnet50().state_dict() has 320 entries


def test_every_required_name_is_listed_and_builds_with_its_input_shape():
    names = list_names()
    for base in REQUIRED_NAMES:
        assert base in names
    for base in REQUIRED_NAMES:
        model = build_model(base)
        shape = input_shape(base)
        num_classes = 1000 if shape[-1] == 224 else 10
        with torch.no_grad():
            assert tuple(model(torch.zeros(shape)).shape) == (1, num_classes)


@pytest.mark.parametrize("name", [n for n in list_names() if parse_name(n).family != "dense"
                                  and input_shape(n)[-1] == 32])
def test_every_cifar_variant_runs_forward_with_bounded_outputs(name):
    """Random-seeded variants stay finite and bounded (benchmarks run them untrained)."""
    model = build_model(name)
    with torch.no_grad():
        out = model(torch.randn(input_shape(name)))
    assert torch.isfinite(out).all() and out.abs().max() < 1e4


def _dense_state(model):
    """The variant's state dict with every structured layer replaced by its dense kernel."""
    state = {k: v for k, v in model.state_dict().items() if k != "generator.weight"}
    for name, module in model.named_modules():
        if isinstance(module, (CSGConv2d, StructuredConv2d, SSCConv2d)):
            for key in [k for k in state if k.startswith(name + ".")]:
                del state[key]
            state.update({f"{name}.{k}": v for k, v in module.to_dense().state_dict().items()})
    return state


@pytest.mark.parametrize("name", ["resnet20-csg-16x16x3x3-128", "resnet20-struct-c2n2",
                                  "resnet32x2-ssc-10", "shufflenetv2-0.5x-bcsg-16x16x1x1-16",
                                  "densenet-bc-40-36-struct-c1n2"])
def test_variant_outputs_equal_the_base_model_with_its_dense_kernels(name):
    """A variant keeps the base model's names and computes the conv of its dense kernels."""
    model = build_model(name).double()
    dense = build_model(parse_name(name).base).double()
    dense.load_state_dict(_dense_state(model), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-10, atol=1e-10)


def test_csg_sites_follow_the_paper():
    def csg_names(name):
        return sorted(n for n, m in build_model(name).named_modules() if isinstance(m, CSGConv2d))

    assert csg_names("shufflenetv2-0.5x-csg-16x16x1x1-16") == ["conv2"]  # the last 1x1 conv
    mb = csg_names("mobilenetv2-csg-16x16x1x1-16")
    assert len(mb) == 17 and all(n.endswith(".conv1") for n in mb)  # first 1x1 of each block
    dn = csg_names("densenet-bc-40-36-csg-12x12x3x3-72")
    assert len(dn) == 18 and all(n.endswith(".conv2") for n in dn)  # the 3x3 convs
    r50 = build_model("resnet50-csg-16x16x3x3-128")
    sites = [n for n, m in r50.named_modules() if isinstance(m, CSGConv2d)]
    assert len(sites) == 16 and all(n.endswith(".conv2") for n in sites)
    assert all(r50.get_submodule(n).kernel_size == (3, 3) for n in sites)
    # the stem and the classifier stay dense
    r56 = build_model("resnet56-csg-16x16x3x3-128")
    assert type(r56.conv_1_3x3) is nn.Conv2d and type(r56.classifier) is nn.Linear


def test_struct_variants_cover_every_3x3_after_the_stem():
    model = build_model("resnet18-struct-c2n2")
    assert type(model.conv1) is nn.Conv2d  # 7x7 stem stays dense
    structured = {n: m for n, m in model.named_modules() if isinstance(m, StructuredConv2d)}
    assert len(structured) == 16
    for m in structured.values():
        assert (m.c, m.n) == (m.in_channels // 2, 2)
    c1 = build_model("resnet18-struct-c1n2")
    assert all(m.c == m.in_channels for m in c1.modules() if isinstance(m, StructuredConv2d))
    # a 3x3 stem stays dense, depthwise 3x3s get spatial structure only
    assert type(build_model("resnet56-struct-c2n2").conv_1_3x3) is nn.Conv2d
    dw = [m for m in build_model("mobilenetv2-struct-c2n2").modules() if isinstance(m, StructuredConv2d)]
    assert dw and all(m.groups == m.in_channels and (m.c, m.n) == (1, 2) for m in dw)


def test_struct_macs_resnet18_match_design_figures():
    """DESIGN.md section 2: 1.81 G multiplies dense, 0.51 G at C/2x2x2."""
    dense = summarize(build_model("resnet18"), (1, 3, 224, 224))["macs"]
    struct = summarize(build_model("resnet18-struct-c2n2"), (1, 3, 224, 224))["macs"]
    assert dense == 1_814_073_344
    assert round(struct / 1e9, 2) == 0.51
    assert round(dense / struct, 1) == 3.6


def test_ssc_tickets_follow_the_supplement():
    model = build_model("vgg19-ssc-10")
    by_width = {}
    for m in model.modules():
        if isinstance(m, SSCConv2d):
            by_width.setdefault(m.out_channels, set()).add((m.p, m.g))
    assert by_width == {64: {(1, 1)}, 128: {(2, 2)}, 256: {(2, 4)}, 512: {(2, 16)}}
    r = build_model("resnet32x2-ssc-2")
    widths = {(m.out_channels, m.p, m.g) for m in r.modules() if isinstance(m, SSCConv2d)}
    assert widths == {(32, 16, 8), (64, 32, 32), (128, 64, 64)}
    # SSC parameters count the weights the mask keeps
    params, _ = count_params(model)
    assert params < count_params(build_model("vgg19"))[0] * 0.06


def test_bcsg_generator_is_fixed_signs_from_a_seed():
    a = build_model("resnet20-bcsg-16x16x3x3-1024", seed=1).generator.weight
    b = build_model("resnet20-bcsg-16x16x3x3-1024", seed=1).generator.weight
    c = build_model("resnet20-bcsg-16x16x3x3-1024", seed=2).generator.weight
    assert set(a.unique().tolist()) == {-0.5, 0.5}
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not a.requires_grad


@pytest.mark.parametrize("bad,fragment", [
    ("resnet57", "did you mean"), ("resnet56-ssc-10", "no SSC ticket"),
    ("vgg19-ssc-7", "no SSC ticket"), ("vgg19-csg-16x16x3x3-128", "no CSG variant"),
    ("resnet56-bcsg-16x16x3x3-1024-frozen", "always fixed")])
def test_bad_names_raise_with_a_hint(bad, fragment):
    with pytest.raises(UnknownArchitectureError) as info:
        parse_name(bad)
    assert fragment in str(info.value)


def test_names_round_trip():
    for name in list_names() + ["resnet56-csg-12x12x3x3-72", "resnet56-csg-16x16x3x3-128-frozen"]:
        assert parse_name(name).name == name


def test_every_architecture_has_a_stem_that_exists():
    for arch in ARCHITECTURES.values():
        model = arch.build()
        assert isinstance(model.get_submodule(arch.stem), nn.Conv2d)


def test_sr_trained_struct_model_decomposes_into_the_coefficient_model():
    """Train-in-W mode: structured weights give ~0 SR loss and decompose exactly into the
    coefficient form the zoo builds by default."""
    from structexport.layers import compose_kernel, structural_regularization_loss
    model = build_model("resnet20-struct-c2n2", struct_mode="dense").double()
    layers = [m for m in model.modules() if isinstance(m, StructuredConv2d)]
    assert len(layers) == 18 and all(m.mode == "dense" for m in layers)
    assert structural_regularization_loss(model).item() > 1.0  # random W is far from structured
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(compose_kernel(torch.randn(m.out_channels, m.c, m.n, m.n,
                                                      dtype=torch.float64), m.C, m.N))
    assert structural_regularization_loss(model).item() < 1e-10
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        for m in layers:
            m.to_coeff()
        coeff = build_model("resnet20-struct-c2n2").double()
        coeff.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(coeff(x), before, rtol=1e-9, atol=1e-9)
