// The Python module of the extension: the norm entry points (norm_ops.cpp) and the recurrences
// (rnn.cpp). The operators themselves are registered with the dispatcher when the library loads.
#include <torch/extension.h>

namespace layernorm {
void bind_norm(pybind11::module& m);
void bind_rnn(pybind11::module& m);
}  // namespace layernorm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  layernorm::bind_norm(m);
  layernorm::bind_rnn(m);
}
