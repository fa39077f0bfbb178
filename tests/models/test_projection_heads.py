from __future__ import annotations

import copy

import pytest
import torch

from volta3d.models import ProjectionHead, build_heads


def make(norm_last_layer: bool = True, nlayers: int = 3) -> ProjectionHead:
    torch.manual_seed(0)
    return ProjectionHead(
        32, 64, hidden_dim=48, bottleneck_dim=16, nlayers=nlayers, norm_last_layer=norm_last_layer
    )


def test_output_shapes_for_cls_and_patch_tokens():
    head = make()
    assert head(torch.randn(4, 32)).shape == (4, 64)
    assert head(torch.randn(2, 27, 32)).shape == (2, 27, 64)


def test_bottleneck_is_unit_norm():
    head = make()
    z = head.bottleneck(torch.randn(2, 5, 32) * 10)
    assert z.shape == (2, 5, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2, 5))


def test_logits_are_cosine_similarities_to_prototypes_when_norm_fixed():
    head = make()
    with torch.no_grad():  # perturb so the direction parameter is no longer unit-norm
        head.last_layer.parametrizations.weight.original1.mul_(3.0).add_(0.1)
    x = torch.randn(5, 32)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    expected = z @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)


def test_mlp_structure():
    assert [type(m).__name__ for m in make(nlayers=3).mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    single = make(nlayers=1).mlp
    assert len(single) == 1 and single[0].in_features == 32 and single[0].out_features == 16
    with pytest.raises(ValueError, match="nlayers must be >= 1"):
        make(nlayers=0)


def test_norm_last_layer_fixes_the_magnitude_to_one():
    head = make(norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.shape == (64, 1) and not g.requires_grad
    assert torch.equal(g, torch.ones(64, 1))
    v_before = v.detach().clone()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(4, 32)).logsumexp(-1).sum().backward()
    opt.step()
    assert torch.equal(g, torch.ones(64, 1))
    assert not torch.equal(v, v_before)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))
    assert head.last_layer_parameters() == [v]


def test_free_magnitude_is_trainable():
    head = make(norm_last_layer=False)
    g = head.last_layer.parametrizations.weight.original0
    head(torch.randn(4, 32)).logsumexp(-1).sum().backward()
    assert g.requires_grad and g.grad is not None
    assert {id(p) for p in head.last_layer_parameters()} == {id(p) for p in head.last_layer.parameters()}
    assert len(head.last_layer_parameters()) == 2


def test_every_trainable_parameter_gets_a_gradient():
    head = make()
    head(torch.randn(2, 3, 32)).logsumexp(-1).sum().backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_uses_parametrization_keys():
    keys = set(make().state_dict())
    assert {
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    } <= keys


def test_build_heads_shared_and_separate():
    shared = build_heads(32, 64, 48, 16, 3, shared_patch_head=True, norm_last_layer=True)
    assert shared[0] is shared[1]
    global_head, patch_head = build_heads(32, 64, 48, 16, 3, shared_patch_head=False, norm_last_layer=True)
    assert global_head is not patch_head
    assert patch_head.mlp is global_head.mlp  # iBOT / MC-SSL: one MLP, two prototype layers
    assert patch_head.last_layer is not global_head.last_layer
    g_last = {id(p) for p in global_head.last_layer_parameters()}
    p_last = {id(p) for p in patch_head.last_layer_parameters()}
    assert not g_last & p_last


def test_teacher_copy_keeps_the_shared_mlp_and_outputs():
    pair = torch.nn.ModuleList(build_heads(32, 64, 48, 16, 3, shared_patch_head=False, norm_last_layer=True))
    teacher = copy.deepcopy(pair)
    assert teacher[1].mlp is teacher[0].mlp
    x = torch.randn(3, 32)
    torch.testing.assert_close(teacher[1](x), pair[1](x))
