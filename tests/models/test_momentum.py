import torch
from torch import nn

from sslkit.models import MomentumEncoder


def test_exact_ema_formula():
    online = nn.Linear(3, 2)
    ema = MomentumEncoder(online)
    before = [p.detach().clone() for p in ema.ema.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.5)
    ema.update(online, momentum=0.9)
    for old, new, q in zip(before, ema.ema.parameters(), online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * q, atol=1e-7)
    # m = 0 copies the online weights; m = 1 freezes them.
    ema.update(online, momentum=0.0)
    for new, q in zip(ema.ema.parameters(), online.parameters()):
        assert torch.equal(new, q)
    frozen = [p.clone() for p in ema.ema.parameters()]
    with torch.no_grad():
        online.weight.mul_(3)
    ema.update(online, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, ema.ema.parameters()))


def test_key_side_has_no_gradients():
    online = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ema = MomentumEncoder(online)
    assert not any(p.requires_grad for p in ema.ema.parameters())
    x = torch.randn(5, 4, requires_grad=True)
    out = ema(x)
    assert not out.requires_grad
    (online(x).sum() + out.sum()).backward()
    assert all(p.grad is None for p in ema.ema.parameters())
    assert all(p.grad is not None for p in online.parameters())
