"""torch.compile(fullgraph=True) traces through our ops (custom ops with fake kernels): no graph
breaks, and compiled forward and backward match eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import layernorm

from conftest import CPU_BACKENDS
from tolerances import assert_close


class Net(nn.Module):
    def __init__(self, d=32, backend=None):
        super().__init__()
        self.backend = backend
        self.ln = layernorm.LayerNorm(d, backend=backend)
        self.rms = layernorm.RMSNorm(d, backend=backend)
        self.fc = nn.Linear(d, d)
        self.w = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.b = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        h = self.fc(self.ln(x))
        y, z = layernorm.add_layer_norm(h, x, (x.shape[-1],), self.w, self.b, backend=self.backend)
        y2, z2 = layernorm.add_rms_norm(y, z, (x.shape[-1],), self.w, backend=self.backend)
        return self.rms(y2) + z2


def _compare(backend, compile_backend):
    torch.manual_seed(0)
    eager = Net(backend=backend)
    compiled_net = Net(backend=backend)
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net, fullgraph=True, backend=compile_backend)
    x = torch.randn(4, 7, 32)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = eager(xe), compiled(xc)
    assert_close(yc, ye, "bwd")
    dy = torch.randn_like(ye)
    ye.backward(dy)
    yc.backward(dy)
    assert_close(xc.grad, xe.grad, "bwd")
    for (n, pe), pc in zip(eager.named_parameters(), compiled_net.parameters()):
        assert_close(pc.grad, pe.grad, "bwd", msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_aot_eager_fullgraph(backend):
    _compare(backend, "aot_eager")


@pytest.mark.slow
def test_compile_inductor_fullgraph():
    # one inductor case (CPU inductor compiles C++: tens of seconds); the op's fake kernels and
    # registered autograd are what it exercises, identical for every backend
    backend = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    _compare(backend, "inductor")


def test_no_graph_breaks_explained():
    net = Net(backend="torch")
    explanation = torch._dynamo.explain(net)(torch.randn(2, 3, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
