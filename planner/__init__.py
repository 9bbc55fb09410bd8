"""The memory planner (`python -m planner`): what slice a Llama job needs, and whether it fits, in
numbers the XLA compiler confirms.

    job.py       the job to plan (Job), its model config, and the jobs' programs it is given (Programs)
    estimate.py  the analytic per-device bytes, by category
    search.py    candidate meshes, and the simplest that fits
    compile.py   lowering (through Programs) and compiling a job's real step; the compiler's numbers
    plan.py      a plan on a topology, the smallest slice that fits, a plan on this machine's devices
    report.py    the plan as text (and the compile-only check's output)
    __main__.py  the CLI; fills Programs with train's and serve's lowering functions

A job, not a library: it imports neither train/ nor serve/; their steps reach it through `Programs`
at an entry point (planner/__main__.py, train/__main__.py).
"""
