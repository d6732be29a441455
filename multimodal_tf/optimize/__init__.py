"""Deployment optimization of a trained run: pruning, TFLite quantization, ONNX.

``mmtf optimize RUN`` (cli/optimize.py) calls :func:`optimize_run`
(``optimize/run.py``); each artifact is written under ``RUN/optimized/`` with
a JSON next to it saying what it is and how it was made (``artifacts.py``).
"""
