"""Integrations with the tools users train and read their runs in: loggers (TensorBoard,
Weights & Biases, MLflow) and trainer callbacks (Lightning, the Hugging Face Trainer).

Each lives in its own module and imports its package only when used; the optional imports
all go through :mod:`gradwatch.integrations.optional`, which names the extra to install
when one is missing.
"""
