// An empty Python module, so that `import ckbn._C` loads this library and with it the
// TORCH_LIBRARY registrations. The operators themselves are reached through torch.ops.ckbn.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
