// grl_emu_window.cpp -- csrc/cuda/grl_window.cu compiled as C++ for the host (-DGRL_CUDA_EMU).
#include "grl_window.cu"
