"""Honeybee's C-Abstractor: shapes, gradients, and its RegNet stages against timm's RegStage as Honeybee builds it."""

import pytest
import torch
from conftest import assert_trains
from torch import nn

from ivtp.projectors import ProjectorError, build_projector
from ivtp.projectors.honeybee import CAbstractor, reg_stage


def test_output_shape_and_gradients_reach_every_parameter():
    assert_trains(CAbstractor(32, 48, num_tokens=16, num_patches=64), torch.randn(3, 64, 32), tokens=16, out_dim=48)


def test_a_token_depends_on_its_own_region_most():
    """Locality, the point of the C-Abstractor: a change in one corner of the patch grid moves that corner's
    output token more than the opposite corner's."""
    torch.manual_seed(0)
    module = CAbstractor(16, 16, num_tokens=16, num_patches=64, depth=1).eval()
    x = torch.randn(1, 64, 16)
    y = x.clone()
    y[0, 0] += 10  # patch (0, 0)
    with torch.no_grad():
        delta = (module(y) - module(x)).norm(dim=-1)[0]  # (16,)
    assert delta[0] > delta[15]


def test_reg_stage_matches_timm_regstage_as_honeybee_configures_it():
    regnet = pytest.importorskip("timm.models.regnet")
    from timm.layers import LayerNorm2d

    torch.manual_seed(0)
    theirs = regnet.RegStage(3, 24, 40, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d).eval()
    ours = reg_stage(3, 24, 40).eval()
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        assert a.shape == b.shape, name
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    x = torch.randn(2, 24, 6, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tokens=50), "num_tokens must be a square number"),
    (dict(num_patches=60), "the number of patches must be a square number"),
    (dict(depthh=2), "unexpected keyword argument 'depthh'"),
])
def test_bad_geometry_or_option_is_a_projector_error(kwargs, message):
    with pytest.raises(ProjectorError, match=message):
        build_projector("honeybee", 32, 64, **{"num_patches": 64, **kwargs})
