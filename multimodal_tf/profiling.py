"""FLOPs of a model and the matmul peak they are measured against (MFU).

* :func:`forward_flops`: floating-point operations of one forward pass per
  example, counted by the TF profiler (``tf.compat.v1.profiler``, option
  ``float_operation``) on the frozen graph of the model's inference call
  at a fixed batch size. The profiler counts each op from its shapes
  (``MatMul`` 2·m·n·k, ``Conv2D`` 2·outputs·kh·kw·c_in, one per output
  element for ``BiasAdd`` and element-wise ops). It cannot count ops
  inside a ``while`` loop (their shapes are unknown there), so recurrent
  layers (LSTM, GRU) are added analytically: 2·timesteps·(kernel +
  recurrent kernel weights) per direction, matmuls only.
* Training FLOPs follow the usual convention of 3× forward (the backward
  pass costs about twice the forward one: gradients for activations and
  for weights), :data:`TRAIN_FLOPS_PER_FORWARD`.
* :func:`matmul_peak`: the FLOP/s of large chained matmuls through TF on
  this device, the practical peak that MFU (model FLOPs utilisation) is
  quoted against when no datasheet number applies (CPUs).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from multimodal_tf.compat import keras, tf

# Backward ≈ 2× forward (activation and weight gradients): training ≈ 3× forward.
TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per example, and where they came from.

    Attributes:
        profiler: counted by the TF profiler on the frozen graph.
        recurrent: added analytically for recurrent layers (loop bodies the
            profiler cannot count).
        uncounted_ops: ops the profiler skipped for incomplete shapes (the
            loop bodies, whose matmuls ``recurrent`` covers).
    """

    profiler: float
    recurrent: float
    uncounted_ops: int

    @property
    def forward(self) -> float:
        return self.profiler + self.recurrent

    @property
    def train(self) -> float:
        return TRAIN_FLOPS_PER_FORWARD * self.forward

    def as_dict(self) -> dict:
        return {**asdict(self), "forward": self.forward, "train": self.train}


def graph_flops(graph) -> tuple[int, int]:
    """``(float ops, ops without a count)`` of a graph, by the TF profiler's ``float_operation``."""
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=graph, options=options)
    # Ops the profiler skips for incomplete shapes are those without a known
    # output shape that have a registered flops function (matmuls, element-wise).
    uncounted = sum(
        1
        for op in graph.get_operations()
        if op.type in _COUNTED_TYPES and any(not out.shape.is_fully_defined() for out in op.outputs)
    )
    return int(profile.total_float_ops), uncounted


_COUNTED_TYPES = {"MatMul", "BatchMatMulV2", "Conv2D", "DepthwiseConv2dNative", "BiasAdd", "AddV2", "Mul"}


def recurrent_flops(model) -> float:
    """Matmul FLOPs per example of the recurrent layers of ``model`` (the profiler's blind spot).

    Per step, a cell multiplies its input by ``kernel`` and its state by
    ``recurrent_kernel``: 2·(both weight counts). The step count is the
    time dimension the layer was built with; a layer built for sequences of
    unknown length is an error, as its cost cannot be known.
    """
    total = 0.0
    for layer in model.submodules:
        # Unbuilt RNNs do no work: e.g. the template layer Bidirectional copies.
        if not isinstance(layer, keras.layers.RNN) or not layer.built:
            continue
        shape = getattr(layer, "_build_input_shape", None)
        if isinstance(shape, (list, tuple)) and shape and not isinstance(shape[0], (int, type(None))):
            shape = shape[0]  # [inputs, initial states]
        steps = tf.TensorShape(shape)[1] if shape is not None else None
        if steps is None:
            raise ValueError(f"recurrent layer {layer.name!r} has no fixed sequence length: FLOPs unknown")
        cell = layer.cell
        weights = sum(int(tf.size(w)) for w in (cell.kernel, cell.recurrent_kernel))
        total += 2.0 * steps * weights
    return total


def forward_flops(model, input_specs: dict | tf.TensorSpec, batch_size: int = 8) -> FlopCount:
    """Forward FLOPs per example of ``model(inputs, training=False)``.

    Args:
        model: a built Keras model.
        input_specs: the model's inputs (``features.model_feature_specs``
            for ours); the batch dimension is replaced by ``batch_size``.
        batch_size: the batch the graph is traced at. The count is divided
            by it, so per-batch work (none in these models) would be shared.
    """
    from tensorflow.python.framework.convert_to_constants import (  # noqa: PLC0415
        convert_variables_to_constants_v2,
    )

    def fixed(spec):
        return tf.TensorSpec([batch_size, *spec.shape[1:]], spec.dtype, spec.name)

    specs = tf.nest.map_structure(fixed, input_specs)
    function = tf.function(lambda inputs: model(inputs, training=False)).get_concrete_function(specs)
    frozen = convert_variables_to_constants_v2(function)
    counted, uncounted = graph_flops(frozen.graph)
    return FlopCount(counted / batch_size, recurrent_flops(model), uncounted)


def matmul_peak(
    size: int = 2048, chain: int = 8, repeats: int = 3, dtype=tf.float32, device: str | None = None
) -> float:
    """FLOP/s of ``chain`` chained ``size``² matmuls through TF (best of ``repeats``).

    Chained so each product depends on the last (no op can be skipped or
    overlapped away) and scaled to stay finite; the first call (tracing,
    autotuning) is not timed. On the 2-core development machine: 90-117
    GFLOP/s float32 at 2048-4096 under light load (NumPy: 110), far less
    under heavy load (docs/benchmarks.md, "FLOPs and MFU").
    """
    with tf.device(device or ("/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0")):
        a = tf.random.normal([size, size], dtype=tf.float32) / (size**0.5)
        a = tf.cast(a, dtype)

        @tf.function
        def run(x):
            for _ in range(chain):
                x = tf.matmul(x, a)
            return tf.reduce_sum(tf.cast(x[:1, :1], tf.float32))  # a scalar: forces the work, copies little

        float(run(a))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            float(run(a))
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * chain / best
