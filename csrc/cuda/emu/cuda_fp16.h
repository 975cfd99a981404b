// CPU emulation shim: __half as _Float16.
#pragma once
using __half = _Float16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return static_cast<__half>(v); }
