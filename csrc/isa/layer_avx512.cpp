// The fused layer's kernels for the avx512 path (flags set in CMakeLists.txt; see layer_kernels.inc).
#define PM_VBYTES 64
#define PM_KERNELS kernels_avx512
#define PM_NAME "avx512"
#include "../layer_kernels.inc"
