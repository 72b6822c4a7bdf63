"""Token layouts and tile plans, shared by the kernels, the CPU path and the simulator."""
