// The element-wise kernels of layer-streamer, compiled into one PTX module
// (kernels/ptx/kernels.ptx) and loaded by `Kernels::load`.
#include "cast.cuh"
#include "swiglu.cuh"
