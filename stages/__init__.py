"""tapeline stages: pure stage logic (no Prefect) for data, model, train, evaluate and export.

Importing the package turns TensorFlow's oneDNN kernels on unless the user chose (`stages.hardware.prefer_onednn`):
it must happen before TensorFlow is imported, and every tapeline entry point imports `stages` first.
"""

from stages import hardware as _hardware  # noqa: F401  (sets TF_ENABLE_ONEDNN_OPTS before TensorFlow loads)
