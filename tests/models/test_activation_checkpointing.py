import torch

from volta3d.models.encoder import build_encoder

from ..config_kwargs import section_kwargs


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tiny = section_kwargs(
        "model", img_size=32, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2
    )
    plain = build_encoder(**tiny)
    recompute = build_encoder(**{**tiny, "activation_checkpointing": True})
    recompute.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 32, 32, 32)
    grads = []
    for model in (plain, recompute):
        out = model.forward_features(x)
        (
            out["patch_tokens"].square().mean() + model.decode(out["patch_tokens"], out["grid"]).mean()
        ).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
