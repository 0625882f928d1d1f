"""The Larq Compute Engine side of ``python -m tools.export_lce``: build, convert, run, time.

Runs with the Python of the LCE environment (TensorFlow, larq, LCE, numpy < 2; no torch), from
the repository root, as

    .lce_env/bin/python -m tools.lce.convert WORK_DIR

``tools/export_lce.py`` writes into WORK_DIR the weights of a ReActNet-A (``weights.npz``, PyTorch
names and layouts, binary conv weights already binarized to ``alpha * sign(W)``), what to build
(``spec.json``) and the inputs of each part (``part_inputs.npz``, channels last). This script
rebuilds the network in Keras/larq, converts it with LCE and runs the flatbuffers on those inputs.
It writes ``parts.tflite`` (every listed part: stem, blocks, head, side by side, each with its own
input and output) and ``outputs.npz`` (their outputs by the spec's kernel).

When the spec says ``full``, it also writes ``model.tflite`` (the parts in a chain: the whole
network) and ``probe.tflite`` (the same chain with every part's output as an output of its own),
then serves batches of images: for each line ``NAME`` read from standard input it runs both on
``WORK/NAME.npy`` (channels last), writes ``WORK/NAME.out.npz`` (``logits`` of model.tflite,
``part_I`` of the probe) and answers the line on the file descriptor given as its second argument.
At the end of the input it times each kernel on the first image it was given. ``report.json``
holds the op census, sizes, the sha256 of the model.tflite bytes that ran, the largest difference
between the kernels (null when either gave a value that is not finite) and the latencies.
"""
import hashlib
import json
import os
import sys
import tempfile

# larq 0.14 needs the Keras 2 API; TensorFlow 2.16 reads this when it is first imported.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import larq as lq  # noqa: E402
import larq_compute_engine as lce  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from larq_compute_engine.mlir.python import tflite_schema  # noqa: E402
from tensorflow.python.autograph.core import config as autograph_config  # noqa: E402

from tools.lce.timing import latency_ms  # noqa: E402

# Autograph leaves the "keras" package alone but not "tf_keras", where Keras 2 now lives, nor
# larq: building and saving ReActNet-A would transpile over a thousand of their functions (minutes)
# although none has data-dependent control flow.
autograph_config.CONVERSION_RULES += (autograph_config.DoNotConvert("tf_keras"),
                                      autograph_config.DoNotConvert("larq"))

layers = tf.keras.layers

# LCE's two optimized binary conv kernels, as the interpreter selects them. BGEMM is its default;
# indirect BGEMM was many times faster on x86-64 here.
KERNELS = {"bgemm": {}, "indirect_bgemm": {"use_indirect_bgemm": True}}

# Tensor type codes of the TFLite schema that the census reports.
TENSOR_TYPES = {0: "float32", 2: "int32", 3: "uint8", 9: "int8"}


def applied(layer, x, *weights):
    """``layer(x)`` with ``weights`` set once the call has built the layer. (Weights given as
    initializers would be written into the layer config, which saving encodes as JSON: minutes.)"""
    y = layer(x)
    layer.set_weights(list(weights))
    return y


class Network:
    """Keras layers holding the weights of one exported ReActNet-A (or some of its blocks).

    Each call builds new layers: the full model and the blocks model share no state.
    """

    def __init__(self, weights, bn_eps):
        self.w = weights
        self.bn_eps = bn_eps

    def folded_batchnorm(self, prefix, alpha=None):
        """(scale, offset) with ``bn(alpha * x) == scale * x + offset`` per channel (float64 fold).

        Folding here, with PyTorch's own epsilon, avoids Keras BatchNormalization (default
        epsilon 1e-3, not PyTorch's 1e-5). LCE fuses a multiply and add after a binary conv into
        its output transform, as it would fuse a BatchNorm.
        """
        gamma, beta, mean, var = (self.w[prefix + k].astype(np.float64) for k in
                                  ("weight", "bias", "running_mean", "running_var"))
        inv_std = gamma / np.sqrt(var + self.bn_eps)
        scale = inv_std if alpha is None else inv_std * alpha
        return scale.astype(np.float32), (beta - mean * inv_std).astype(np.float32)

    def affine(self, x, scale, offset):
        return tf.math.add(tf.math.multiply(x, scale), offset)

    def shift(self, x, prefix):
        """LearnableBias: ``x + b``, one b per channel."""
        return tf.math.add(x, self.w[prefix + "bias"].reshape(-1))

    def prelu(self, x, prefix):
        slopes = self.w[prefix + "weight"].reshape(1, 1, -1)
        return applied(layers.PReLU(shared_axes=[1, 2]), x, slopes)

    def binary_conv_bn(self, x, conv, bn, stride):
        """sign(x), a binary conv padded with zeros like PyTorch's, then its BatchNorm.

        The binarized weights ``alpha * sign(W)`` become a +-1 kernel and a per-channel ``alpha``
        folded into the BatchNorm. ``pad_values=0`` pads the binary input with 0, as PyTorch's
        ``padding=1`` does after the sign (LCE's faster +1 padding would change every border).
        """
        binarized = self.w[conv + "weight"]  # (out, in, k, k)
        alpha = np.abs(binarized).reshape(len(binarized), -1).max(axis=1)
        kernel = np.transpose(binarized, (2, 3, 1, 0))  # OIHW -> HWIO
        size = kernel.shape[0]
        extra = (0, 0)
        if size > 1 and stride == 2:
            # On an even size, PyTorch's stride-2 window starts at the top-left padding and never
            # reaches the bottom-right one (1 before, 0 after); TF's "same" pads 0 before, 1 after.
            # One float row/column appended at the end makes the size odd, where "same" pads 1
            # on each side as PyTorch; the extra output row/column it makes is cropped.
            extra = tuple(1 - n % 2 for n in x.shape[1:3])
            x = layers.ZeroPadding2D(((0, extra[0]), (0, extra[1])))(x)
        y = applied(lq.layers.QuantConv2D(
            kernel.shape[-1], size, strides=stride, padding="same", pad_values=0.0,
            input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint=None,
            use_bias=False), x, kernel)
        y = self.affine(y, *self.folded_batchnorm(bn, alpha))
        if any(extra):
            y = layers.Cropping2D(((0, extra[0]), (0, extra[1])))(y)
        return y

    def block(self, x, prefix, stride, widening):
        """One ReActNet-A block, as models/reactnet.py's BasicBlock.forward."""
        p = prefix
        out1 = self.binary_conv_bn(self.shift(x, p + "move11."), p + "binary_3x3.", p + "bn1.", stride)
        shortcut = layers.AveragePooling2D(2, 2)(x) if stride == 2 else x
        out1 = self.shift(self.prelu(self.shift(out1 + shortcut, p + "move12."), p + "prelu1."),
                          p + "move13.")
        binary = self.shift(out1, p + "move21.")
        if not widening:
            out2 = self.binary_conv_bn(binary, p + "binary_pw.", p + "bn2.", 1) + out1
        else:
            out2 = layers.Concatenate()([
                self.binary_conv_bn(binary, p + "binary_pw_down1.", p + "bn2_1.", 1) + out1,
                self.binary_conv_bn(binary, p + "binary_pw_down2.", p + "bn2_2.", 1) + out1])
        return self.shift(self.prelu(self.shift(out2, p + "move22."), p + "prelu2."), p + "move23.")

    def stem(self, x, prefix):
        """Real 3x3 stride-2 conv and BatchNorm, zero padded before the conv as PyTorch aligns it.

        On an even size PyTorch's stride-2 window never reaches its last padded row/column, so
        only the first is padded. (Padding both would be folded by the converter into "same",
        which pads after: every pixel would be wrong.)
        """
        kernel = np.transpose(self.w[prefix + "conv1.weight"], (2, 3, 1, 0))
        x = layers.ZeroPadding2D(tuple((1, n % 2) for n in x.shape[1:3]))(x)
        x = applied(layers.Conv2D(kernel.shape[-1], 3, strides=2, padding="valid", use_bias=False),
                    x, kernel)
        return self.affine(x, *self.folded_batchnorm(prefix + "bn1."))

    def head(self, x, prefix):
        x = layers.GlobalAveragePooling2D()(x)
        weight, bias = self.w[prefix + "fc.weight"], self.w[prefix + "fc.bias"]
        return applied(layers.Dense(len(bias)), x, weight.T, bias)

    def part(self, x, spec):
        """The stem, a block or the head, as described by a part of the spec."""
        if spec["kind"] == "block":
            return self.block(x, spec["prefix"], spec["stride"], spec["widening"])
        return (self.stem if spec["kind"] == "stem" else self.head)(x, spec["prefix"])


def full_model(net, spec, probe=False):
    """The parts of the spec in a chain: stem, blocks, head. With ``probe``, every part's output is
    an output of the model, named so that they sort in the spec's order."""
    image = x = tf.keras.Input(spec["parts"][0]["input_shape"], batch_size=1, name="image")
    outputs = []
    for part in spec["parts"]:
        x = net.part(x, part)
        outputs.append(x)
    if not probe:
        return tf.keras.Model(image, x), ["logits"]
    return tf.keras.Model(image, outputs), [f"part_out_{i:03d}" for i in range(len(outputs))]


def parts_model(net, spec):
    """Every part of the spec with its own input and output, named so that they sort in the
    spec's order (the flatbuffer's signature keeps the names, not the order)."""
    inputs = [tf.keras.Input(part["input_shape"], batch_size=1, name=f"part_in_{i:03d}")
              for i, part in enumerate(spec["parts"])]
    outputs = [net.part(x, part) for x, part in zip(inputs, spec["parts"])]
    return tf.keras.Model(inputs, outputs), [f"part_out_{i:03d}" for i in range(len(outputs))]


def parse(flatbuffer):
    return tflite_schema.ModelT.InitFromObj(tflite_schema.Model.GetRootAsModel(flatbuffer, 0))


def signature_positions(model, kind):
    """Positions in the graph's ``kind`` ("inputs" or "outputs") of the signature's tensors, in
    the order of their names: the converter does not keep the Keras order of several outputs."""
    (signature,) = model.signatureDefs
    graph = model.subgraphs[signature.subgraphIndex]
    ends = list(getattr(graph, kind))
    return [ends.index(t.tensorIndex) for t in sorted(getattr(signature, kind), key=lambda t: t.name)]


def op_census(model):
    """What the converted graph runs: every op by name, and each LceBconv2d's operand types.

    Returns:
        ``{"ops": {name: count}, "bconv": [{"input", "filter", "filter_shape", "filter_bytes"}]}``.
        A bit-packed LceBconv2d has int32 input and filter (32 binary values per element).
    """
    builtin_names = {v: k for k, v in vars(tflite_schema.BuiltinOperator).items() if not k.startswith("_")}
    ops, bconvs = {}, []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            name = code.customCode.decode() if code.customCode else builtin_names[builtin]
            ops[name] = ops.get(name, 0) + 1
            if name == "LceBconv2d":
                data, kernel = (subgraph.tensors[i] for i in op.inputs[:2])
                buffer = model.buffers[kernel.buffer].data
                bconvs.append({"input": TENSOR_TYPES.get(data.type, str(data.type)),
                               "filter": TENSOR_TYPES.get(kernel.type, str(kernel.type)),
                               "filter_shape": [int(n) for n in kernel.shape],
                               "filter_bytes": 0 if buffer is None else int(buffer.size)})
    return {"ops": dict(sorted(ops.items())), "bconv": bconvs}


def convert(model, output_names, path):
    """Converts a Keras model with LCE through a SavedModel of its inference function alone.

    (LCE's convert_keras_model saves the whole Keras model first, which traces every layer on its
    own: minutes for ReActNet-A. The op census checks what comes out either way.)
    """
    specs = [tf.TensorSpec(x.shape, x.dtype, name=x.name) for x in model.inputs]

    @tf.function(input_signature=specs, autograph=False)
    def infer(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return dict(zip(output_names, outputs if isinstance(outputs, list) else [outputs]))

    module = tf.Module()
    module.weights = model.weights  # tracked, so that the SavedModel holds them
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures=infer.get_concrete_function())
        flatbuffer = lce.convert_saved_model(saved)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return flatbuffer


def interpreter(flatbuffer, kernel, threads):
    return lce.testing.Interpreter(flatbuffer, num_threads=threads, **KERNELS[kernel])


def as_list(result):
    return result if isinstance(result, list) else [result]


def serve(net, work, spec, answers):
    """Converts the whole network and runs it on each batch of images named on standard input;
    returns the model's report (census, size, latencies)."""
    kernel, cores = spec["kernel"], os.cpu_count()
    path = os.path.join(work, "model.tflite")
    flatbuffer = convert(*full_model(net, spec), path)
    # The bytes that run here: the file on disk must be them when it is shipped.
    report = dict(op_census(parse(flatbuffer)), bytes=len(flatbuffer),
                  sha256=hashlib.sha256(flatbuffer).hexdigest())
    probe_flatbuffer = convert(*full_model(net, spec, probe=True), os.path.join(work, "probe.tflite"))
    order = signature_positions(parse(probe_flatbuffer), "outputs")
    model, probe = (interpreter(f, kernel, cores) for f in (flatbuffer, probe_flatbuffer))
    first = None
    for line in sys.stdin:
        name = os.path.join(work, line.strip())
        images = np.load(name + ".npy")
        first = images[:1] if first is None else first
        parts = as_list(probe.predict(images))
        np.savez(name + ".out.npz", logits=model.predict(images),
                 **{f"part_{i}": parts[position] for i, position in enumerate(order)})
        answers.write(line)
        answers.flush()
    report["latency_ms"] = {}
    for name in KERNELS:
        timed = interpreter(flatbuffer, name, spec["threads"])
        report["latency_ms"][f"lce_{name}"] = latency_ms(lambda: timed.predict(first), spec["bench_runs"])
    return report


def main(work, answers=None):
    with open(os.path.join(work, "spec.json")) as f:
        spec = json.load(f)
    net = Network(dict(np.load(os.path.join(work, "weights.npz"))), spec["bn_eps"])
    kernel, cores = spec["kernel"], os.cpu_count()
    report, outputs = {}, {}

    flatbuffer = convert(*parts_model(net, spec), os.path.join(work, "parts.tflite"))
    model = parse(flatbuffer)
    report["parts"] = op_census(model)
    part_inputs = np.load(os.path.join(work, "part_inputs.npz"))
    inputs = [None] * len(spec["parts"])
    for i, position in enumerate(signature_positions(model, "inputs")):
        inputs[position] = part_inputs[str(i)]
    results = {}
    for name in KERNELS:
        results[name] = as_list(interpreter(flatbuffer, name, cores).predict(inputs))
    for i, position in enumerate(signature_positions(model, "outputs")):
        outputs[f"part_{i}"] = results[kernel][position]
    diffs = [np.abs(a - b) for other in results.values() for a, b in zip(other, results[kernel])]
    finite = all(np.isfinite(d).all() for d in diffs)
    report["kernels_max_diff"] = max(float(d.max()) for d in diffs) if finite else None

    np.savez(os.path.join(work, "outputs.npz"), **outputs)
    if spec.get("full"):
        with os.fdopen(int(answers), "w") as f:
            report["model"] = serve(net, work, spec, f)
    with open(os.path.join(work, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
