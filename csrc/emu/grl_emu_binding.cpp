// grl_emu_binding.cpp -- the torch binding of the CUDA kernels, host build (-DGRL_CUDA_EMU):
// the same source as the GPU binding, compiled by the host compiler for CPU tensors.
#include "grl_cuda_binding.cpp"
