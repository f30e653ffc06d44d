"""The front door: everything that knows about the workspace, DVC, git and the Hub (the ML library is `rlhf/`).

    workspace  the one stage list (read from dvc.yaml), the stage environment, the dvc runner
    lineage    the one dvc.lock reader (per-stage md5s for the model card, the release md5) and the git commit
    lock       one pipeline run per workspace (.rlhf/lifecycle.lock)
    hub        publishing models/release to the Hugging Face Hub
    cli        the `rlhf` command (imports the Prefect flows lazily, inside its commands)

`workspace` and `lineage` import only the standard library and PyYAML: stage programs (tasks/) use them on GPU
machines where neither Prefect nor DVC is installed.
"""
