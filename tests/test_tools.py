"""torch's tools on our modules and on patched models: jit.trace, jit.script, torch.compile with dynamic
shapes, torch.export (saved, then loaded in a fresh process) and ONNX export run by onnxruntime."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import layernorm

from tolerances import assert_close

pytestmark = [
    pytest.mark.skipif(layernorm.ops.NATIVE is None, reason="the operators need the C++ extension"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit is deprecated in favour of export
]


class Block(nn.Module):
    """Linear -> LayerNorm -> RMSNorm (default eps) -> fused add + RMSNorm, our modules and functional."""

    def __init__(self, d=32, affine=True):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.ln = layernorm.LayerNorm(d, elementwise_affine=affine)
        self.rms = layernorm.RMSNorm(d, elementwise_affine=affine)
        self.w = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        h = self.rms(self.ln(self.fc(x)))
        y, _ = layernorm.add_rms_norm(h, x, (x.shape[-1],), self.w)
        return y


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_jit_trace_replays_correct_values(grad, affine):
    torch.manual_seed(0)
    model = Block(affine=affine)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, torch.randn(4, 32), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "layernorm::layer_norm" in graph and "layernorm::rms_norm" in graph and "layernorm::add_rms_norm" in graph
    x = torch.randn(3, 7, 32)  # other shape, other values: the trace must not have baked outputs in
    with torch.set_grad_enabled(grad):
        assert_close(traced(x), model(x))


def test_jit_trace_gradients():
    torch.manual_seed(0)
    model = Block()
    traced = torch.jit.trace(model, torch.randn(4, 32))
    x = torch.randn(5, 32, requires_grad=True)
    g_traced = torch.autograd.grad(traced(x).sum(), [x, model.w])
    g_eager = torch.autograd.grad(model(x).sum(), [x, model.w])
    for a, b in zip(g_traced, g_eager):
        assert_close(a, b, "bwd")


def test_jit_script_modules():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    for module in (layernorm.LayerNorm(32), layernorm.RMSNorm(32), layernorm.RMSNorm(32, eps=1e-6),
                   layernorm.LayerNorm((5, 32), bias=False), layernorm.LayerNorm(32, elementwise_affine=False),
                   layernorm.LayerNorm(32, backend="reference"), layernorm.RMSNorm(32, backend="torch")):
        scripted = torch.jit.script(module)
        assert "layernorm::" in str(scripted.graph)
        assert_close(scripted(x), module(x))


def test_jit_script_patched_transformer_layer():
    torch.manual_seed(0)
    torch_layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True).eval()
    ours = layernorm.patch(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True))
    ours.load_state_dict(torch_layer.state_dict())
    ours.eval()
    scripted = torch.jit.script(ours)
    assert "layernorm.layer_norm" in scripted.norm1.code and "layernorm.layer_norm" in scripted.norm2.code
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        assert_close(scripted(x), torch_layer(x))


def test_jit_script_function_calling_the_functional():
    @torch.jit.script
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return layernorm.layer_norm(x, [8], w, None, 1e-5) + layernorm.rms_norm(x, [8], w)

    x, w = torch.randn(3, 8), torch.randn(8)
    assert_close(f(x, w), layernorm.layer_norm(x, (8,), w) + layernorm.rms_norm(x, (8,), w))


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for shape in ((4, 32), (3, 9, 32), (2, 32)):  # new sizes: symbolic or recompiled, never a break
        x = torch.randn(*shape, requires_grad=True)
        y = compiled(x)
        assert_close(y, model(x))
        (gc,) = torch.autograd.grad(y.sum(), [x])
        (ge,) = torch.autograd.grad(model(x).sum(), [x])
        assert_close(gc, ge, "bwd")
    torch._dynamo.reset()


def _exported(model, x):
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))


def test_export_graph_names_operators_not_backends():
    torch.manual_seed(0)
    ep = _exported(Block().eval(), torch.randn(4, 32))
    code = ep.graph_module.code
    assert "torch.ops.layernorm.layer_norm.default" in code and "torch.ops.layernorm.add_rms_norm.default" in code
    for name in ("'cpu'", "'triton'", "'reference'", "backend"):
        assert name not in code, name


def test_export_saved_and_loaded_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(5, 32)
    path = tmp_path / "block.pt2"
    torch.export.save(_exported(model, torch.randn(4, 32)), str(path))
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch, layernorm  # importing layernorm registers its operators
        ep = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        y = ep.module()(io["x"])
        torch.testing.assert_close(y, io["y"], rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("opset", [18, 23])
def test_onnx_export_uses_standard_nodes_and_onnxruntime_agrees(opset):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import layernorm.onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True),
        nn.Linear(32, 32), nn.RMSNorm(32, eps=1e-6),
    ).eval()
    layernorm.patch(model)
    x = torch.randn(2, 5, 32)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, verbose=False,
                                custom_translation_table=layernorm.onnx.translation_table(opset))
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert ops.count("LayerNormalization") == 2
    if opset >= 23:
        assert "RMSNormalization" in ops
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x))
