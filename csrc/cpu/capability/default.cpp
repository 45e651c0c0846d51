// Built with the default instruction set (see kernels_impl.h and setup.py).
#include "cpu/capability/kernels_impl.h"
