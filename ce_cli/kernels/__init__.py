"""Row kernels: the numpy kernel (the reference) and the optional compiled kernel, behind one interface."""
