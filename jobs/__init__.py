"""Repository-root shims for `python -m jobs.<name>`: each `jobs.<name>` IS `llmrec.jobs.<name>`.

The packaged entrypoints live in `llmrec.jobs` (shipped in the wheel; `python -m llmrec.jobs.<name>`). This
folder only exists in a checkout so that `ray job submit --runtime-env cluster/runtime_env.yaml -- python -m
jobs.<name> ...` (working_dir = the repository root) keeps working; it is not part of the wheel.
"""
