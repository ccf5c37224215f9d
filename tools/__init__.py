"""Tools for a short GPU slot and for developers. Run them from the kit's root:

    bash tools/gpu_check.sh                       # every GPU check, in at most 6 minutes
    python -m tools.warm_kernels --device cuda    # compile the fused kernels' variants
    python -m tools.kernel_sweep --device cuda    # time the kernels' launch choices
    python -m tools.kernel_report --compile 90    # compile for sm_90 without a GPU: registers, spills
    python -m tools.run_report RUN_DIR            # one line on a run: status, backend, ms/iter
"""
