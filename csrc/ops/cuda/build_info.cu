#include <cuda_runtime_api.h>

namespace pyodlog {
int cuda_runtime_version_compiled() {
  return CUDART_VERSION;
}
}  // namespace pyodlog
