"""Permutation groups for PLeaS: expected groups per architecture, invariance of the model's
function under random permutations of every group, the untraceable-model error and the
explicit-spec API."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmerge.pleas import (
    Axis,
    LayerGroups,
    PermutationSpec,
    UntraceableModelError,
    apply_permutation,
    permutation_groups,
)

# --------------------------------------------------------------------------------------------
# Small builders (no downloads)


class MLP(nn.Module):
    def __init__(self, d_in=4, h1=16, h2=8, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h1)
        self.ln1 = nn.LayerNorm(h1)
        self.fc2 = nn.Linear(h1, h2)
        self.drop = nn.Dropout(0.1)
        self.fc3 = nn.Linear(h2, d_out)

    def forward(self, x):
        x = F.relu(self.ln1(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.fc3(x)


def vgg(dropout=0.5):
    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )  # fmt: skip
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(
                nn.Linear(16, 32), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(32, 10)
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    return VGG()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout, two stages, narrow."""

    def __init__(self, block, planes=(8, 16), blocks=(2, 2), stem=8, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = stem
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layers = []
            for j in range(n):
                layers.append(block(inplanes, p, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        n, length, d = x.shape
        h = self.heads

        def split(t):
            return t.view(n, length, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        out = att.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(n, length, d))


class MLPBlock(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(.)); attention written out or nn.MultiheadAttention."""

    def __init__(self, d=16, heads=4, hidden=32, mha=False):
        super().__init__()
        self.mha = mha
        self.ln1 = nn.LayerNorm(d)
        self.attn = (
            nn.MultiheadAttention(d, heads, batch_first=True) if mha else Attention(d, heads)
        )
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLPBlock(d, hidden)

    def forward(self, x):
        h = self.ln1(x)
        if self.mha:
            x = x + self.attn(h, h, h, need_weights=False)[0]
        else:
            x = x + self.attn(h)
        return x + self.mlp(self.ln2(x))


def depthwise_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, float64, so that every unit is distinct."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


IMAGE = (2, 3, 8, 8)
BUILDERS = {
    "mlp": (lambda: MLP(), (5, 4)),
    "vgg": (lambda: vgg(), IMAGE),
    "resnet-basic": (lambda: ResNet(BasicBlock), IMAGE),
    "resnet-bottleneck": (lambda: ResNet(Bottleneck, planes=(4, 8)), IMAGE),
    "depthwise": (depthwise_net, IMAGE),
    "transformer": (lambda: PreNormBlock(), (2, 5, 16)),
    "transformer-mha": (lambda: PreNormBlock(mha=True), (2, 5, 16)),
}


def build(name):
    make, shape = BUILDERS[name]
    model = randomize(make())
    return model, torch.randn(
        shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )


def spec_of(name):
    model, x = build(name)
    return model, x, permutation_groups(model, x)


def summary(spec):
    """{group: (size, set(producers), set(consumers))}"""
    return {n: (g.size, set(g.producers), set(g.consumers)) for n, g in spec.groups.items()}


def bn(prefix):
    return {Axis(f"{prefix}.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")}


def no_internal_reasons(spec):
    for e in spec.excluded:
        assert "internal" not in e.reason, e


# --------------------------------------------------------------------------------------------
# Expected groups


def test_mlp_groups():
    _, _, spec = spec_of("mlp")
    assert summary(spec) == {"fc1": (16, {"fc1"}, {"fc2"}), "fc2": (8, {"fc2"}, {"fc3"})}
    assert set(spec.groups["fc1"].axes) == {
        ("fc1.weight", 0), ("fc1.bias", 0), ("ln1.weight", 0), ("ln1.bias", 0), ("fc2.weight", 1),
    }  # fmt: skip
    assert set(spec.groups["fc2"].axes) == {("fc2.weight", 0), ("fc2.bias", 0), ("fc3.weight", 1)}
    assert spec.layers == {
        "fc1": LayerGroups(None, "fc1"),
        "fc2": LayerGroups("fc1", "fc2"),
        "fc3": LayerGroups("fc2", None),
    }
    reasons = {e.name: e.reason for e in spec.excluded}
    assert reasons == {
        "fc1.weight[1]": "touches the model's input",
        "fc3": "touches the model's output",
    }


def test_vgg_groups():
    _, _, spec = spec_of("vgg")
    assert summary(spec) == {
        "features.0": (8, {"features.0"}, {"features.3"}),
        "features.3": (8, {"features.3"}, {"features.7"}),
        "features.7": (16, {"features.7"}, {"classifier.0"}),
        "classifier.0": (32, {"classifier.0"}, {"classifier.3"}),
    }
    assert set(spec.groups["features.0"].axes) == {
        ("features.0.weight", 0), ("features.0.bias", 0), ("features.3.weight", 1),
    } | bn("features.1")  # fmt: skip
    # flatten of the (N, 16, 1, 1) pooled tensor keeps the channels
    assert ("classifier.0.weight", 1) in spec.groups["features.7"].axes
    assert spec.layers["features.0"] == LayerGroups(None, "features.0")
    assert spec.layers["classifier.3"] == LayerGroups("classifier.0", None)
    no_internal_reasons(spec)


def test_resnet_basic_groups():
    _, _, spec = spec_of("resnet-basic")
    stage1 = "conv1"
    stage2 = "layer2.0.conv2"
    assert summary(spec) == {
        stage1: (
            8,
            {"conv1", "layer1.0.conv2", "layer1.1.conv2"},
            {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"},
        ),
        "layer1.0.conv1": (8, {"layer1.0.conv1"}, {"layer1.0.conv2"}),
        "layer1.1.conv1": (8, {"layer1.1.conv1"}, {"layer1.1.conv2"}),
        "layer2.0.conv1": (16, {"layer2.0.conv1"}, {"layer2.0.conv2"}),
        stage2: (
            16,
            {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"},
            {"layer2.1.conv1", "fc"},
        ),
        "layer2.1.conv1": (16, {"layer2.1.conv1"}, {"layer2.1.conv2"}),
    }
    # the stage group carries every BatchNorm that normalizes it
    axes = set(spec.groups[stage1].axes)
    assert bn("bn1") | bn("layer1.0.bn2") | bn("layer1.1.bn2") <= axes
    assert bn("layer2.0.downsample.1") <= set(spec.groups[stage2].axes)
    assert ("fc.weight", 1) in spec.groups[stage2].axes
    assert spec.layers["layer2.0.downsample.0"] == LayerGroups(stage1, stage2)
    assert spec.layers["conv1"] == LayerGroups(None, stage1)
    assert spec.layers["fc"] == LayerGroups(stage2, None)
    no_internal_reasons(spec)


def test_resnet_bottleneck_groups():
    _, _, spec = spec_of("resnet-bottleneck")
    s1, s2 = "layer1.0.conv3", "layer2.0.conv3"
    expected = {
        "conv1": (8, {"conv1"}, {"layer1.0.conv1", "layer1.0.downsample.0"}),
        s1: (
            16,
            {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3"},
            {"layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"},
        ),
        s2: (
            32,
            {"layer2.0.conv3", "layer2.0.downsample.0", "layer2.1.conv3"},
            {"layer2.1.conv1", "fc"},
        ),
    }
    for layer, width in (("layer1", 4), ("layer2", 8)):
        for b in (0, 1):
            p = f"{layer}.{b}"
            expected[f"{p}.conv1"] = (width, {f"{p}.conv1"}, {f"{p}.conv2"})
            expected[f"{p}.conv2"] = (width, {f"{p}.conv2"}, {f"{p}.conv3"})
    assert summary(spec) == expected
    assert len(spec.groups) == 11
    assert set(spec.groups["layer1.0.conv2"].axes) == {
        ("layer1.0.conv2.weight", 0), ("layer1.0.conv3.weight", 1),
    } | bn("layer1.0.bn2")  # fmt: skip
    no_internal_reasons(spec)


@pytest.mark.parametrize("name", ["transformer", "transformer-mha"])
def test_transformer_block_groups(name):
    _, _, spec = spec_of(name)
    assert summary(spec) == {"mlp.fc1": (32, {"mlp.fc1"}, {"mlp.fc2"})}
    assert set(spec.groups["mlp.fc1"].axes) == {
        ("mlp.fc1.weight", 0), ("mlp.fc1.bias", 0), ("mlp.fc2.weight", 1),
    }  # fmt: skip
    assert spec.layers["mlp.fc1"] == LayerGroups(None, "mlp.fc1")
    assert spec.layers["mlp.fc2"] == LayerGroups("mlp.fc1", None)
    # the residual stream (with both LayerNorms) touches the model's input and output
    stream = [e for e in spec.excluded if ("ln1.weight", 0) in e.axes]
    assert len(stream) == 1 and "input and output" in stream[0].reason
    assert {("ln2.weight", 0), ("mlp.fc2.weight", 0), ("mlp.fc1.weight", 1)} <= set(stream[0].axes)
    if name == "transformer":
        q = [e for e in spec.excluded if e.name == "attn.q"]
        assert len(q) == 1 and "reshapes" in q[0].reason
        assert spec.layers["attn.q"] == LayerGroups(None, None)
    else:
        assert any("MultiheadAttention" in e.reason for e in spec.excluded)
    no_internal_reasons(spec)


def test_depthwise_conv_ties_in_and_out_channels():
    _, _, spec = spec_of("depthwise")
    assert summary(spec) == {"0": (8, {"0", "3"}, {"3", "6"}), "6": (16, {"6"}, {"10"})}
    assert spec.layers["3"] == LayerGroups("0", "0")


def test_unsupported_ops_exclude_their_groups():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc1 = nn.Linear(4 * 4 * 4, 8)
            self.fc2 = nn.Linear(8, 8)
            self.fc3 = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.flatten(F.relu(self.conv(x)), 1)  # (N, 4*4*4): channels merged
            h = torch.roll(F.relu(self.fc1(h)), 1, dims=1)  # not supported
            return self.fc3(F.relu(self.fc2(h)))

    model = Odd()
    spec = permutation_groups(model, torch.randn(2, 3, 4, 4))
    assert list(spec.groups) == ["fc2"]
    reasons = {e.name: e.reason for e in spec.excluded}
    assert "reshapes axes of sizes [4, 4, 4] into [64]" in reasons["conv"]
    assert "unsupported operation" in reasons["fc1"] and "roll" in reasons["fc1"]
    assert spec.layers["fc1"] == LayerGroups(None, None)


def test_tracing_leaves_the_model_untouched():
    model, x = build("resnet-basic")
    model.train()
    before = copy.deepcopy(model.state_dict())
    permutation_groups(model, x)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------------
# Invariance under random permutations of every group


def check_invariance(model, x, spec, train: bool, seed=0):
    perms = spec.random_perms(torch.Generator().manual_seed(seed))
    assert perms and any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = apply_permutation(model, spec, perms)
    changed = [
        k for k, v in permuted.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert changed, "no parameter was permuted"
    ref = copy.deepcopy(model).train(train)
    permuted.train(train)
    with torch.no_grad():
        out_ref, out_perm = ref(x), permuted(x)
    torch.testing.assert_close(out_perm, out_ref, rtol=1e-9, atol=1e-9)
    if train:  # running statistics were updated consistently: permuting ref's gives permuted's
        expect = apply_permutation(ref, spec, perms).state_dict()
        for k, v in permuted.state_dict().items():
            torch.testing.assert_close(v, expect[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_permutations_keep_outputs_eval(name, seed):
    model, x, spec = spec_of(name)
    check_invariance(model.eval(), x, spec, train=False, seed=seed)


@pytest.mark.parametrize("name", ["resnet-basic", "resnet-bottleneck", "depthwise", "vgg0"])
def test_random_permutations_keep_outputs_train_with_running_stats(name):
    if name == "vgg0":  # no dropout, so that train-mode outputs are deterministic
        model = randomize(vgg(dropout=0.0))
        x = torch.randn(IMAGE, dtype=torch.float64)
        spec = permutation_groups(model, x)
    else:
        model, x, spec = spec_of(name)
    check_invariance(model, x, spec, train=True)


def test_excluded_groups_really_are_not_free():
    """Sanity check of the test itself: permuting an output-touching axis changes outputs."""
    model, x, spec = spec_of("mlp")
    bad = PermutationSpec.from_axes(model, {"out": [("fc3.weight", 0), ("fc3.bias", 0)]})
    permuted = apply_permutation(model, bad, {"out": torch.tensor([2, 0, 1])})
    assert not torch.allclose(permuted.eval()(x), model.eval()(x))


# --------------------------------------------------------------------------------------------
# Models fx cannot trace, and the explicit-spec API


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow
            return torch.relu(h)
        return torch.tanh(h)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.gate = Gate()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.gate(torch.relu(self.fc1(x))))


def test_untraceable_model_error_names_node_and_points_to_from_axes():
    with pytest.raises(UntraceableModelError) as info:
        permutation_groups(Untraceable(), torch.randn(2, 4))
    msg = str(info.value)
    assert "inside module 'gate' (Gate)" in msg
    assert "node 'gt'" in msg
    assert "if h.sum() > 0" in msg
    assert "PermutationSpec.from_axes" in msg
    assert info.value.node == "gt" and info.value.module == "gate"


UNTRACEABLE_GROUPS = {
    "h1": [("fc1.weight", 0), ("fc1.bias", 0), ("gate.fc.weight", 1)],
    "h2": [("gate.fc.weight", 0), ("gate.fc.bias", 0), ("fc2.weight", 1)],
}


def test_from_axes_spec_and_invariance():
    model = Untraceable().double()
    spec = PermutationSpec.from_axes(model, UNTRACEABLE_GROUPS)
    assert summary(spec) == {"h1": (8, {"fc1"}, {"gate.fc"}), "h2": (8, {"gate.fc"}, {"fc2"})}
    assert spec.layers == {
        "fc1": LayerGroups(None, "h1"),
        "gate.fc": LayerGroups("h1", "h2"),
        "fc2": LayerGroups("h2", None),
    }
    explicit = PermutationSpec.from_axes(
        model, UNTRACEABLE_GROUPS, layers={"gate.fc": ("h1", "h2"), "fc2": ("h2", None)}
    )
    assert explicit == spec
    for sign in (1.0, -1.0):  # both branches of the gate
        with torch.no_grad():
            model.fc2.weight.mul_(-1) if sign < 0 else None
        x = torch.randn(6, 4, dtype=torch.float64)
        check_invariance(model, x, spec, train=False, seed=int(sign > 0))


def test_from_axes_matches_traced_spec():
    model, _, traced = spec_of("mlp")
    hand = PermutationSpec.from_axes(
        model, {name: list(g.axes) for name, g in traced.groups.items()}
    )
    assert hand.groups == traced.groups
    assert hand.layers == traced.layers


@pytest.mark.parametrize(
    "groups, layers, match",
    [
        (
            {"h": [("fc1.weigth", 0)]},
            None,
            r"no parameter or buffer named 'fc1.weigth'.*'fc1.weight'",
        ),
        (
            {"h": [("fc1.weight", 2)]},
            None,
            r"dim 2 is out of range for 'fc1.weight' of shape \(8, 4\)",
        ),
        (
            {"h": [("fc1.weight", 0), ("fc1.weight", 1)]},
            None,
            r"different sizes: 'fc1.weight' dim 0 has 8.*dim 1 has 4",
        ),
        (
            {"a": [("fc1.weight", 0)], "b": [("fc1.weight", -2)]},
            None,
            r"groups\['b'\].*also in group 'a'",
        ),
        ({"h": [("fc1.weight", 0), ("fc1.weight", 0)]}, None, "listed twice"),
        (
            {"h": [("fc1.weight", 0), ("gate.fc.weight", 1)]},
            None,
            r"'fc1.bias' dim 0 is in None.*bias must follow",
        ),
        ({"h": []}, None, r"groups\['h'\] must be a non-empty list"),
        ({"h": [("fc1.weight",)]}, None, r"\(name, dim\) pair"),
        ({"h": [("fc1.weight", 0.0)]}, None, r"\(name, dim\) pair"),
        (UNTRACEABLE_GROUPS, {"fc9": (None, "h1")}, r"no module named 'fc9'.*'fc1'"),
        (
            UNTRACEABLE_GROUPS,
            {"gate": (None, "h1")},
            r"layers\['gate'\] is a Gate, not a Conv/Linear",
        ),
        (UNTRACEABLE_GROUPS, {"fc2": ("hx", None)}, r"input group 'hx' is not in groups"),
        (
            UNTRACEABLE_GROUPS,
            {"fc2": ("h1", None)},
            r"input group is 'h1' but axis \('fc2.weight', 1\) is in group 'h2'",
        ),
        (UNTRACEABLE_GROUPS, {"fc2": "h2"}, r"\(input_group, output_group\) pair"),
    ],
)
def test_from_axes_validation_errors(groups, layers, match):
    with pytest.raises(ValueError, match=match):
        PermutationSpec.from_axes(Untraceable(), groups, layers=layers)


def test_from_axes_type_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        PermutationSpec.from_axes("model", UNTRACEABLE_GROUPS)
    with pytest.raises(TypeError, match="groups must be a mapping"):
        PermutationSpec.from_axes(Untraceable(), [("fc1.weight", 0)])


def test_apply_permutation_validation_errors():
    model = MLP()
    spec = permutation_groups(model, torch.randn(2, 4))
    with pytest.raises(KeyError, match=r"'fc9' is not a group of spec.*'fc1'"):
        apply_permutation(model, spec, {"fc9": torch.arange(16)})
    with pytest.raises(
        ValueError, match=r"perms\['fc2'\] must be a permutation of 0..7.*shape \(5,\)"
    ):
        apply_permutation(model, spec, {"fc2": torch.arange(5)})
    with pytest.raises(ValueError, match="repeated or out-of-range"):
        apply_permutation(model, spec, {"fc2": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"perms\['fc2'\] must hold integer indices"):
        apply_permutation(model, spec, {"fc2": torch.arange(8.0)})
    with pytest.raises(
        ValueError,
        match=r"'fc1.weight' of shape \(12, 4\) has no axis 0 of size 16.*made for this model",
    ):
        apply_permutation(MLP(h1=12), spec, {"fc1": torch.arange(16)})
    # identity and a plain list are accepted
    same = apply_permutation(model, spec, {"fc2": list(range(8))})
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), model.parameters()))


def test_permutation_groups_input_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        permutation_groups(lambda x: x, torch.randn(2, 4))
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        permutation_groups(MLP(), [[1.0, 2.0]])
    with pytest.raises(UntraceableModelError, match=r"example_input: running.*node 'fc1'"):
        permutation_groups(MLP(), torch.randn(2, 5))
    with pytest.raises(ValueError, match="example_input has 2 tensors"):
        permutation_groups(MLP(), (torch.randn(2, 4), torch.randn(2, 4)))


# --------------------------------------------------------------------------------------------
# More patterns: gated MLP with SDPA attention, squeeze-and-excitation, tied embeddings


class GatedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.w1, self.w3, self.w2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.ln(x)
        n, length, d = h.shape
        q, k, v = (
            t.view(n, length, 2, 4).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h))
        )
        x = x + self.o(
            F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, d)
        )
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.f1, self.f2, self.c2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.c(x))
        w = torch.sigmoid(self.f2(F.relu(self.f1(h.mean((2, 3), keepdim=True)))))
        return self.c2(h * w).mean((2, 3))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.fc2(F.relu(self.fc(self.emb(t)))))


@pytest.mark.parametrize(
    "make, x, expected",
    [
        (GatedBlock, torch.randn(2, 5, 8), {"w1": (16, {"w1", "w3"}, {"w2"})}),
        (
            SqueezeExcite,
            torch.randn(2, 3, 6, 6),
            {"c": (8, {"c", "f2"}, {"f1", "c2"}), "f1": (2, {"f1"}, {"f2"})},
        ),
        (
            TiedLM,
            torch.randint(0, 10, (2, 5)),
            {"fc2": (8, {"fc2"}, {"fc", "head"}), "fc": (12, {"fc"}, {"fc2"})},
        ),
    ],
    ids=["gated-sdpa", "squeeze-excite", "tied-embedding"],
)
def test_more_patterns(make, x, expected):
    model = make().double()
    x = x.double() if x.is_floating_point() else x
    spec = permutation_groups(model, x)
    assert summary(spec) == expected
    no_internal_reasons(spec)
    check_invariance(model.eval(), x, spec, train=False)
