import pytest
import torch
from torchvision.models import resnet18, resnet50

from comod.backbones import SITES, Backbone


@pytest.mark.parametrize("arch, last", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_channels_match_torchvision(arch, last):
    net = Backbone(arch)
    assert net.out_features == last
    assert list(net.stages) == list(SITES)


def test_width_and_small_stem_shapes():
    net = Backbone("resnet18", stem="small", width=0.25, in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    sizes = {}
    for name in SITES:
        x = net.forward_stage(name, x)
        sizes[name] = tuple(x.shape[1:])
    assert sizes["stem"] == (16, 28, 28)
    assert sizes["layer4"] == (128, 4, 4)
    assert net.channels == {"stem": 16, "layer1": 16, "layer2": 32, "layer3": 64, "layer4": 128}


def test_plain_variant_has_no_skip_and_no_unused_weights():
    plain, res = Backbone("resnet18", residual=False), Backbone("resnet18")
    assert not any("downsample" in n for n, _ in plain.named_parameters())
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in res.parameters())
    block = plain.stages["layer1"][0]
    x = torch.randn(1, 64, 8, 8)
    block.eval()
    with torch.no_grad():
        # a plain block is the residual block's output path without "+ identity"
        out = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
        assert torch.equal(block(x), out)


@pytest.mark.parametrize("arch, ctor", [("resnet18", resnet18), ("resnet50", resnet50)])
def test_loads_torchvision_state_dict_from_local_file(tmp_path, arch, ctor):
    ref = ctor()
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    net = Backbone(arch)
    net.load_imagenet(path)
    ref.eval(), net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(ref.avgpool(ref.layer4(ref.layer3(ref.layer2(ref.layer1(
            ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))), 1)
        h = x
        for name in SITES:
            h = net.forward_stage(name, h)
        assert torch.allclose(torch.flatten(h.mean((2, 3)), 1), expected, atol=1e-5)


def test_weights_mismatch_and_missing_file(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="does not match resnet50"):
        Backbone("resnet50").load_imagenet(path)
    with pytest.raises(FileNotFoundError, match="no file at"):
        Backbone("resnet18").load_imagenet(tmp_path / "absent.pth")
