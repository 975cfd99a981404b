// The fused layer's kernels for the avx2 path (flags set in CMakeLists.txt; see layer_kernels.inc).
#define PM_VBYTES 32
#define PM_KERNELS kernels_avx2
#define PM_NAME "avx2"
#include "../layer_kernels.inc"
