"""The stage programs: one module per DVC stage (dvc.yaml runs each as `python -m tasks.STAGE`), and what they share."""
