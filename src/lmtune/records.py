"""Names of the files lmtune writes, defined once: the training loop, inference and the report all read them."""

RECORD_FILE = "lmtune_run.json"
"""The run record in a model folder written by `lmtune train`: config, task, data summary, history, best, timing."""
STUDY_FILE = "study.json"
"""What `lmtune tune` writes in its --out folder: the study's storage, name, task, metric and space."""
