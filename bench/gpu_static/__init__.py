"""Static GPU checks and the static performance model: compile fastlrp's Triton kernels for sm_80/sm_90
on a machine without a GPU and read registers, spills, shared memory and SASS (docs/gpu.md)."""
