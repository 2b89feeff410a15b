"""layernorm: fast, correct and explained layer normalization for PyTorch.

- :func:`layer_norm`, :func:`rms_norm`, :func:`add_layer_norm`, :func:`add_rms_norm`: the functional API
  of ``torch.nn.functional`` plus ``backend=``;
- :class:`LayerNorm`, :class:`RMSNorm`: drop-in subclasses of the ``torch.nn`` modules;
- :func:`patch` / :func:`unpatch`: swap our kernels into the norms of any model (torch's and the
  Hugging Face families'), each swap verified, and back;
- :class:`LayerNormLSTM`, :class:`LayerNormGRU` and their cells: layer-normalized recurrent layers with
  ``nn.LSTM``'s API; :class:`BatchNormLSTM`: the recurrent BatchNorm baseline.
"""
from . import backends
from .backends import available_backends
from .functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all
from .patching import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "available_backends",
    "backends",
    "patch",
    "unpatch",
] + list(_nn_all)
