// The fused layer's kernels for the generic path (flags set in CMakeLists.txt; see layer_kernels.inc).
#define PM_VBYTES 16
#define PM_KERNELS kernels_generic
#define PM_NAME "generic"
#include "../layer_kernels.inc"
