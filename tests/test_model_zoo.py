"""Models as they come from torchvision and timm (small instances, random weights, eval mode, batch 2 at 32 x 32):
the engine takes them with method="auto" and no warning (or the generic method where auto predicts it cheaper),
exact against one float64 Hessian-vector product per sampled entry; MobileViT v1, which folds patches into the
batch axis, steps aside named. Skipped where timm / torchvision are not installed (optional test dependencies:
`pip install --no-deps torchvision==0.28.0 timm==1.0.31`, --no-deps so that pip keeps this torch).


torchvision's CPU wheel does not import against another torch: tests/conftest.py loads its model definitions
only."""

import contextlib
import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_engine_or_cheaper, randomise_batch_norm

from torch_secorder import explain_method, model_hessian_diagonal
from torch_secorder.testing import model_loss_of_params, sampled_hessian_diagonal


def import_torchvision_models():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    return importlib.import_module("torchvision.models")


def import_timm():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    import_torchvision_models()  # timm imports torchvision where it is installed
    return importlib.import_module("timm")


@contextlib.contextmanager
def hard_activations_as_clamps():
    """PyTorch has no second derivative of hardsigmoid (its backward is not differentiable): the reference
    differentiates the same function written with clamp."""
    hardsigmoid, hardswish = F.hardsigmoid, F.hardswish
    F.hardsigmoid = lambda x, inplace=False: torch.clamp(x + 3, 0, 6) / 6
    F.hardswish = lambda x, inplace=False: x * torch.clamp(x + 3, 0, 6) / 6
    try:
        yield
    finally:
        F.hardsigmoid, F.hardswish = hardsigmoid, hardswish


def assert_auto_exact(model, per_parameter=3, tolerance=1e-10):
    torch.manual_seed(0)
    model = model.double().eval()
    randomise_batch_norm(model, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=generator), torch.tensor([1, 3])
    choice = explain_method(model, F.cross_entropy, x, targets=y)
    assert choice.method == "backprop", choice
    assert_engine_or_cheaper(model, F.cross_entropy, x, y)
    actual = model_hessian_diagonal(model, F.cross_entropy, x, y, method="backprop")
    params = list(model.parameters())
    picks = [
        (i, k) for i, p in enumerate(params) for k in torch.randperm(p.numel(), generator=generator)[:per_parameter]
    ]
    picks += [(i, int(a.reshape(-1).abs().argmax())) for i, a in enumerate(actual)]
    with hard_activations_as_clamps():
        expected = sampled_hessian_diagonal(model_loss_of_params(model, F.cross_entropy, x, y), params, picks)
    scale = max(abs(value) for value in expected.values())
    error = max(abs(actual[i].reshape(-1)[int(k)].item() - value) for (i, k), value in expected.items()) / scale
    assert error < tolerance, error


def torchvision_zoo():
    def convnext(models):
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10)

    def efficientnet(models):
        from torchvision.models.efficientnet import EfficientNet, MBConvConfig

        return EfficientNet([MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1)], 0.2, num_classes=10)

    def vision_transformer(models):
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=24, mlp_dim=48, num_classes=10)

    def densenet(models):
        return models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8, num_classes=10)

    def regnet(models):
        widths = models.regnet.BlockParams.from_init_params(
            depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25
        )  # squeeze-excitation as in regnet_y: x * gate (N, C, 1, 1) in closed form
        return models.RegNet(widths, num_classes=10)

    return {
        "resnet18": lambda models: models.resnet18(num_classes=10),
        "densenet": densenet,
        "regnet": regnet,
        "mobilenet_v2": lambda models: models.mobilenet_v2(num_classes=10, width_mult=0.25),
        "mobilenet_v3_small": lambda models: models.mobilenet_v3_small(num_classes=10, width_mult=0.25),
        "squeezenet": lambda models: models.squeezenet1_1(num_classes=10),
        "shufflenet": lambda models: models.shufflenet_v2_x0_5(num_classes=10),
        "convnext": convnext,
        "efficientnet": efficientnet,
        "vit": vision_transformer,  # nn.MultiheadAttention read as its ops (backprop/graph/attention.py)
    }


@pytest.mark.parametrize("name", list(torchvision_zoo()))
def test_torchvision_models(name):
    models = import_torchvision_models()
    assert_auto_exact(torchvision_zoo()[name](models))


@pytest.mark.parametrize(
    "name", ["test_resnet", "test_byobnet", "test_efficientnet", "test_convnext", "regnetx_002", "resnet18"]
)
def test_timm_models(name):
    timm = import_timm()
    assert_auto_exact(timm.create_model(name, num_classes=10))


def tiny_mobilevit(version):
    """timm's MobileViT blocks on a tiny configuration of its own building blocks (mobilevitv2_050 itself is exact
    too, in 7 minutes here)."""
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block, _mobilevitv2_block

    if version == 1:
        block = _mobilevit_block(d=1, c=8, s=2, transformer_dim=16, transformer_depth=1, patch_size=2, br=2.0)
    else:
        block = _mobilevitv2_block(d=1, c=8, s=2, transformer_depth=1)
    config = ByoModelCfg(
        blocks=(_inverted_residual_block(d=1, c=8, s=2, br=2.0), block),
        stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu", num_features=16,
    )  # fmt: skip
    return ByobNet(config, num_classes=10)


def test_timm_mobilevit_v2():
    """MobileViT v2's block: unfold into patches by reshapes keeping the batch axis, separable (linear) attention."""
    import_timm()
    assert_auto_exact(tiny_mobilevit(2))


def test_timm_mobilevit_v1_folds_the_batch_and_steps_aside_named():
    """MobileViT v1 unfolds patches into the batch axis (B * patch area rows) for its transformer: the engine's
    per-sample columns cannot follow a batch axis merged with another, so auto takes the generic method with one
    warning naming the reshape and projecting its time (open: docs/graph_engine.md)."""
    import_timm()
    torch.manual_seed(0)
    model = tiny_mobilevit(1).double().eval()
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    with pytest.warns(RuntimeWarning, match=r"reshaping the batch axis .*projected roughly"):
        auto = model_hessian_diagonal(model, F.cross_entropy, x, y)
    generic = model_hessian_diagonal(model, F.cross_entropy, x, y, method="autograd")
    assert all(torch.equal(a, g) for a, g in zip(auto, generic))


def test_timm_mlp_mixer():
    """Token mixing (an MLP across the patches, through transposes) and channel mixing, GELU in both."""
    timm = import_timm()
    assert_auto_exact(
        timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)
    )


SMALL_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=2, num_classes=10)


@pytest.mark.parametrize(
    "name, options",
    [
        ("vit_tiny_patch16_224", {}),  # qkv.permute(2, 0, 3, 1, 4): the batch axis moved inside attention
        ("deit_tiny_distilled_patch16_224", {}),  # two tokens and two heads
        ("vit_tiny_patch16_224", dict(init_values=0.1, class_token=False, global_pool="avg")),  # layer scale
        ("vit_tiny_patch16_224", dict(qk_norm=True, reg_tokens=2)),
        ("test_vit", dict(img_size=32)),  # dynamic_img_size: control flow on shapes, traced with values
        ("test_vit2", dict(img_size=32)),
    ],
)
def test_timm_vision_transformers(name, options):
    timm = import_timm()
    small = {} if name.startswith("test_") else SMALL_VIT
    assert_auto_exact(timm.create_model(name, **{**small, "num_classes": 10, **options}))
