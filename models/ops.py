"""Counting the cost of a binary network (any built from models/layers.py) the way the BNN papers
report it.

BOPs are the multiply-accumulates (MACs) of the convolutions whose inputs and weights are both
binary: they run as XNOR and popcount, and the papers count 64 of them as one floating-point
operation. FLOPs are the MACs of the real layers (the stem conv and fc, plus, in the step-1 network,
the binary-input convs, whose weights are still real). OPs = BOPs / 64 + FLOPs.

BatchNorm, shortcuts, pooling, learnable biases and PReLU are not counted, as in the papers.
"""
import torch
import torch.nn as nn

from models.layers import BinaryConv2d

# The papers' exchange rate: a 64-bit XNOR and popcount does 64 binary MACs at once.
BOPS_PER_OP = 64
# Model size is given in MB of 10**6 bytes.
BYTES_PER_MB = 1e6


def count_ops(model, image_size):
    """Counts BOPs, FLOPs and parameters by running one 1x3xSxS forward pass with hooks.

    Args:
        model: a network whose binary convolutions are BinaryConv2d (step 1 or step 2); its
            training mode is restored afterwards.
        image_size: the side S of the square input image.

    Returns:
        A dict with
        ``bops``, ``flops``, ``ops`` (``bops / 64 + flops``);
        ``params``, split into ``params_binary`` (latent weights of the binary-weight convs, which
        deployment stores as signs) and ``params_real`` (everything else);
        ``size_mb``, the storage in MB (10**6 bytes) with binary weights at 1 bit and every other
        parameter in fp32; the per-output-channel weight scales are not counted because they fold
        into the BatchNorm that follows each binary conv, nor are BatchNorm's running statistics,
        which fold into its affine parameters;
        ``layers``, one row per conv and linear layer in forward order, each a dict with ``name``,
        ``kind`` (``"binary"``: counted as BOPs, ``"real"``: counted as FLOPs), ``input_shape``,
        ``output_shape``, ``macs`` and ``params``.
    """
    layers = trace_layers(model, image_size)
    bops = sum(row["macs"] for row in layers if row["kind"] == "binary")
    flops = sum(row["macs"] for row in layers if row["kind"] == "real")
    params_binary = sum(m.weight.numel() for m in model.modules() if is_fully_binary(m))
    params = sum(p.numel() for p in model.parameters())
    params_real = params - params_binary
    return {
        "bops": bops,
        "flops": flops,
        "ops": bops / BOPS_PER_OP + flops,
        "params": params,
        "params_binary": params_binary,
        "params_real": params_real,
        "size_mb": (params_binary / 8 + params_real * 4) / BYTES_PER_MB,
        "layers": layers,
    }


def is_fully_binary(module):
    """True for a conv whose activations and weights are both binary (the step-2 binary convs)."""
    return isinstance(module, BinaryConv2d) and module.binary_weights


def trace_layers(model, image_size):
    """One row per ``nn.Conv2d`` and ``nn.Linear`` of ``model``, recorded during a forward pass."""
    rows = []

    def record(name, module):
        def hook(_, inputs, output):
            rows.append({
                "name": name,
                "kind": "binary" if is_fully_binary(module) else "real",
                "input_shape": tuple(inputs[0].shape),
                "output_shape": tuple(output.shape),
                "macs": layer_macs(module, output),
                "params": sum(p.numel() for p in module.parameters()),
            })
        return hook

    handles = [module.register_forward_hook(record(name, module))
               for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    first = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, dtype=first.dtype, device=first.device)
    try:
        model.eval()
        with torch.no_grad():
            model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return rows


def layer_macs(module, output):
    """Multiply-accumulates of one conv or linear layer: each output value sums over its inputs."""
    if isinstance(module, nn.Conv2d):
        kernel_h, kernel_w = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w
    return output.numel() * module.in_features
