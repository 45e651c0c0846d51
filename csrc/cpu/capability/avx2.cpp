// Built with the avx2 instruction set (see kernels_impl.h and setup.py).
#include "cpu/capability/kernels_impl.h"
