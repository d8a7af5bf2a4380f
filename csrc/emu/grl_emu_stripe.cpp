// grl_emu_stripe.cpp -- csrc/cuda/grl_stripe.cu compiled as C++ for the host (-DGRL_CUDA_EMU).
#include "grl_stripe.cu"
