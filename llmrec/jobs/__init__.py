"""`ray job submit` entrypoints: `python -m llmrec.jobs.<name>` (installed package, e.g. in the llmrec image)
or `python -m jobs.<name>` (from the repository root, e.g. with `working_dir: .`; the top-level `jobs`
package there is a set of shims that are these very modules).

Each job runs one `llmrec` CLI subcommand with the same flags (plus `--config FILE.yaml`); `deploy` deploys
the Serve app from a Serve config. The top-level `jobs` package is not shipped in the wheel, so an installed
llmrec never puts a generic `jobs` module into site-packages.
"""
