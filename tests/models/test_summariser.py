from __future__ import annotations

import pytest
import torch

from volta3d.config import load_config, to_kwargs
from volta3d.models import CLSSummariser, build_summariser
from volta3d.models.summariser import summariser_kwargs


def make(dim: int = 32, heads: int = 8) -> CLSSummariser:
    torch.manual_seed(0)
    return CLSSummariser(dim, num_heads=heads, mlp_ratio=2.0)


def full_block_reference(s: CLSSummariser, patch_tokens: torch.Tensor) -> torch.Tensor:
    """The paper's block run on the whole [token; patches] sequence, then the token's output read off."""
    seq = torch.cat([s.token.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)
    normed = s.norm1(seq)
    seq = seq + s.attn(normed, normed, normed, need_weights=False)[0]
    seq = seq + s.mlp(s.norm2(seq))
    return s.norm(seq)[:, 0]


def test_output_shape_and_learned_token():
    s = make()
    assert s.token.shape == (1, 1, 32) and s.token.requires_grad
    assert s.attn.num_heads == 8
    out = s(torch.randn(3, 27, 32))
    assert out.shape == (3, 32)
    assert torch.isfinite(out).all()


def test_token_only_query_equals_the_full_block():
    s = make().eval()
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        torch.testing.assert_close(s(x), full_block_reference(s, x), rtol=1e-5, atol=1e-5)


def test_output_depends_on_every_patch_token():
    s = make()
    x = torch.randn(2, 8, 32, requires_grad=True)
    s(x)[0].pow(2).sum().backward()
    per_token = x.grad[0].abs().sum(dim=-1)  # (N,)
    assert (per_token > 0).all()
    assert x.grad[1].abs().sum() == 0  # samples in a batch stay independent


def test_every_parameter_gets_a_gradient():
    s = make()
    s(torch.randn(2, 8, 32)).pow(2).sum().backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"expected patch tokens \(B, N, 32\)"):
        make()(torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CLSSummariser(30, **summariser_kwargs(**to_kwargs(load_config().model.summariser)))  # 8 heads


def test_build_summariser_from_model_section():
    cfg = load_config(overrides=["model.hidden_size=48"])
    s = build_summariser(**to_kwargs(cfg.model))
    assert s.architecture == {"dim": 48, "num_heads": 8, "mlp_ratio": 4.0}
    assert s.mlp[0].out_features == 192
    with pytest.raises(TypeError, match="summariser_depth"):
        build_summariser(hidden_size=48, summariser_depth=2)
