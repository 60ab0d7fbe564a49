"""The ``native`` backend: every linear rule as one block-structured layer, the element-wise work in
the fused kernels of fastlrp._C (``fastlrp.ops``), cuDNN/oneDNN for the convolutions (docs/native.md).

The block form is derived from the rule's declaration (``Rule.form()``): arrange the modified weights
as a block matrix, group g's output channels by input modifier m's channels, block (g, m) = W_p for
the part p with that group and input. Then

    Z    = f(cat_m m(x); W_block) + b_block              one conv/GEMM: every z_g at once
    S    = stabilize_divide(R, z_g, c_g, masks)          one native kernel, reads R once
    G    = f^T(S; W_block)                               one transposed conv/GEMM
    R_in = combine(x, G, modifiers)                      one native kernel

Parts that vanish because the layer's input is non-negative (after a ReLU, from the graph) are dropped
before the blocks are formed. Sample-free inputs (ones, the ZBox bounds) enter the forward pass through
a batch-1 convolution broadcast over the batch.

Grouped and depthwise convolutions (``groups`` > 1) keep their groups: a conv group may only see its
own input channels. Each input modifier gets one convolution of the layer's own geometry (a depthwise
layer stays depthwise), stacking the rule groups inside each conv group; the modifiers' outputs are
summed, so z's channels are ordered (conv group, rule group, channel). The kernels read each
rule group's z as a strided view where one stride per channel fits (depthwise), and S with two rule
groups is permuted once for the transposed convolution (docs/native.md).
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..linear_form import LinearForm, broadcast_bound, modified_input
from ..reference.affine import AffineOp
from . import attnlrp
from .base import Backend, reusable

_CODES = {"x": ops.IDENTITY, "x+": ops.POSITIVE, "x-": ops.NEGATIVE, "ones": ops.ONE, "low": ops.TENSOR,
          "high": ops.TENSOR}
_MASKS = {"none": ops.MASK_NONE, "positive": ops.MASK_POSITIVE, "negative": ops.MASK_NEGATIVE}
_SAMPLE_FREE = ("ones", "low", "high")


class BlockRule:
    """One rule on one linear layer in block form, built from the (folded) weight and bias."""

    def __init__(self, op: AffineOp, form: LinearForm, weight: torch.Tensor, bias: torch.Tensor | None):
        self.op, self.form = op, form
        self.epsilon = float(form.stabilizer)
        self.coefficients = [float(g.coefficient) for g in form.groups]
        self.masks = [_MASKS[g.mask] for g in form.groups]
        self.uses_mask = form.uses_mask
        self.modifiers = list(dict.fromkeys(p.input for p in form.parts))
        self.conv_groups = op.groups if op.kind == "conv" else 1
        blocks = {(p.group, p.input): p for p in form.parts}
        if len(blocks) != len(form.parts):
            raise ValueError("a form has two parts for one (group, input); merge them (linear_form.merge_parts)")
        zero = torch.zeros_like(weight) if len(form.parts) < len(form.groups) * len(self.modifiers) else None
        parts = [[blocks[(g, m)].weight.apply(weight) if (g, m) in blocks else zero for m in self.modifiers]
                 for g in range(len(form.groups))]
        self.weight = _block_weight(parts, self.conv_groups)  # Epsilon: the layer's own weight, no copy
        self.sample_modifiers = [m for m in self.modifiers if m not in _SAMPLE_FREE]
        self.free_modifiers = [m for m in self.modifiers if m in _SAMPLE_FREE]
        # A depthwise layer with several rule groups (Gamma, AlphaBeta) runs one depthwise convolution per
        # (rule group, input) part. Stacked inside the conv groups, the rule groups made a convolution
        # with two outputs per input channel, which torch ran on the CPU 5-18x slower than two depthwise
        # ones (MobileNetV3 shapes, one thread; docs/native.md "Speed").
        self.split_parts = (self.conv_groups > 1 and weight.shape[0] == self.conv_groups and weight.shape[1] == 1
                            and len(form.groups) > 1 and not self.free_modifiers)
        self.part_weights = [[None if w is zero else w.contiguous() for w in row] for row in parts] \
            if self.split_parts else None
        self.weight_sample = self._columns(self.sample_modifiers, weight.shape[1])
        self.weight_free = self._columns(self.free_modifiers, weight.shape[1])
        biases = [form.group_bias(g, bias) for g in range(len(form.groups))]
        self.group_biases = biases
        self.bias = None if all(b is None for b in biases) else _interleave(
            [torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if b is None else b
             for b in biases], self.conv_groups)
        self.z_is_output = form.z_is_output(bias)
        # The layer's output is always its own convolution f(x; W, b), never rebuilt from the z parts
        # where they add up to a multiple of it (AlphaBeta: 1, Gamma: 2 + gamma). The sum
        # of the parts cancels where the output is small against them and lost up to 20x the float32
        # accuracy of the reference end to end (issue 16, F1; tests/test_fuzz.py): a rounded output
        # flips the ReLU after it, or Gamma's sign masks, where the true output is near zero.
        self._free_cache = {}

    def _columns(self, modifiers, c_in):
        """The block's weights for these input modifiers (c_in: the layer's weight's dim 1)."""
        if not modifiers:
            return None
        if modifiers == self.modifiers:
            return self.weight  # every column: the block itself, not a copy
        dim = 1 if self.conv_groups == 1 else 0  # modifiers along the inputs, or one conv group set each
        w = self.weight.unflatten(dim, (len(self.modifiers), -1))
        index = torch.tensor([self.modifiers.index(m) for m in modifiers], device=w.device)
        return w.index_select(dim, index).flatten(dim, dim + 1).contiguous()

    def _modified(self, name: str, x):
        # sample-free inputs (ones, bounds) are formed at batch size 1 and broadcast in z()
        return modified_input(name, x if name not in _SAMPLE_FREE else x[:1], self.form.bounds)

    def _stacked(self, names, x):
        """cat_m m(x) along channels, each modified input written into its slice of one buffer (x+ and
        x- as clamps straight into it: half the memory traffic of clamping, then concatenating)."""
        if len(names) == 1:
            return self._modified(names[0], x)
        width = x.shape[1]
        out = x.new_empty((x.shape[0], width * len(names)) + tuple(x.shape[2:]))
        for i, name in enumerate(names):
            part = out.narrow(1, i * width, width)
            if name == "x+":
                torch.clamp(x, min=0, out=part)
            elif name == "x-":
                torch.clamp(x, max=0, out=part)
            else:
                part.copy_(self._modified(name, x))
        return out

    def _block_z(self, names, x, weight, bias):
        """f(cat_m m(x); block) + bias for the modifiers ``names``. Grouped: one convolution of the
        layer's own geometry per modifier (its block of rows), summed."""
        if self.conv_groups == 1 or len(names) == 1:
            return self.op(self._stacked(names, x), weight, bias)
        z = None
        for name, rows in zip(names, weight.chunk(len(names), dim=0)):
            term = self.op(self._modified(name, x), rows)
            z = term if z is None else z.add_(term)
        return z if bias is None else z.add_(bias.reshape(self.op.bias_shape(z.ndim)))

    def z(self, x, output):
        """Every z_g, stacked along channels (N, G*C_out, ...); for a grouped layer ordered
        (conv group, rule group, channel)."""
        if self.z_is_output:
            return output
        if self.split_parts:
            return self._split_z(x)
        z = None
        if self.weight_sample is not None:
            z = self._block_z(self.sample_modifiers, x, self.weight_sample, self.bias)
        if self.weight_free is not None:
            free = self._free_z(x)
            z = free.expand((x.shape[0],) + tuple(free.shape[1:])) if z is None else z + free
        return z

    def _free_z(self, x):
        """The sample-independent part of z, at batch size 1, cached per input shape (a block is
        rebuilt whenever the parameters change, and the bounds are constants of the rule)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        free = self._free_cache.get(key)
        if free is None:
            bias = self.bias if self.weight_sample is None else None
            free = self._free_cache[key] = self._block_z(self.free_modifiers, x, self.weight_free, bias)
        return free

    def _split_z(self, x):
        """z of a split depthwise layer, ordered (rule group, channel): each z_g the sum of its parts'
        depthwise convolutions, written into its slice of one buffer."""
        inputs = [self._modified(m, x) for m in self.modifiers]
        z = None
        for g, row in enumerate(self.part_weights):
            terms = [self.op(inp, w) for inp, w in zip(inputs, row) if w is not None]
            if z is None:
                c = terms[0].shape[1]
                z = terms[0].new_empty((terms[0].shape[0], c * len(self.part_weights)) + tuple(terms[0].shape[2:]))
            part = z.narrow(1, g * c, c)
            if len(terms) == 1:
                part.copy_(terms[0])
            else:
                torch.add(terms[0], terms[1], out=part)
            for t in terms[2:]:
                part.add_(t)
            if self.group_biases[g] is not None:
                part.add_(self.group_biases[g].reshape(self.op.bias_shape(part.ndim)))
        return z

    def _split_relevance(self, x, z, output, relevance):  # relevance is read once per rule group
        c_out = relevance.shape[1]
        y = output if self.uses_mask else None
        g_parts = [None] * len(self.modifiers)
        for g, row in enumerate(self.part_weights):
            # one call per rule group: each s_g contiguous for its transposed convolutions
            s = ops.stabilize_divide(relevance, [z.narrow(1, g * c_out, c_out)], [self.coefficients[g]],
                                     [self.masks[g]], y=y, epsilon=self.epsilon)
            for m, w in enumerate(row):
                if w is not None:
                    t = transposed(self.op, s, w, x.shape)
                    g_parts[m] = t if g_parts[m] is None else g_parts[m].add_(t)
        return ops.combine(x, g_parts, [_CODES[m] for m in self.modifiers], [], overwrite=g_parts[0])

    def relevance(self, x, z, output, relevance, given_up: bool = False):
        """R_in from the relevance at the output; ``given_up``: the caller holds the only reference to
        ``relevance``, so S may be written into it."""
        if self.split_parts:
            return self._split_relevance(x, z, output, relevance)
        groups, c_out, rule_groups = self.conv_groups, relevance.shape[1], len(self.coefficients)
        # z_g: channel c of rule group g sits at (c // per_group, g, c % per_group); one stride per
        # channel where per_group == 1 (depthwise) or there is one group of either kind
        zs = [_deinterleaved(z, rule_groups, g, groups) for g in range(rule_groups)]
        s = ops.stabilize_divide(relevance, zs, self.coefficients, self.masks,
                                 y=output if self.uses_mask else None, epsilon=self.epsilon,
                                 overwrite=relevance if given_up and rule_groups == 1 else None)
        if groups > 1 and rule_groups > 1:  # (rule group, conv group, channel) -> (conv group, rule group, ...)
            s = _interleave(list(s.chunk(rule_groups, dim=1)), groups, dim=1)
        m = len(self.modifiers)
        shape = (x.shape[0], x.shape[1] * m) + tuple(x.shape[2:])
        if groups == 1 or m == 1:
            g = transposed(self.op, s, self.weight, shape)
        else:  # one transposed convolution per modifier, all of the same s
            g = [transposed(self.op, s, rows, x.shape) for rows in self.weight.chunk(m, dim=0)]  # no cat: a list
        bounds = [broadcast_bound(self.form.bounds[m], x, m) for m in self.modifiers if m in ("low", "high")]
        # g is this call's own product: the result may go into it
        return ops.combine(x, g, [_CODES[m] for m in self.modifiers], bounds,
                           overwrite=g if isinstance(g, torch.Tensor) else g[0])


def _cat(tensors: list, dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _interleave(tensors: list, groups: int, dim: int = 0) -> torch.Tensor:
    """Concatenate tensors of equal shape along ``dim`` group by group: with ``groups`` chunks each,
    the result is ordered (group, tensor, chunk element). A plain concatenation for groups == 1."""
    if len(tensors) == 1 or groups == 1:
        return _cat(tensors, dim)
    split = [t.unflatten(dim, (groups, -1)) for t in tensors]
    return torch.stack(split, dim=dim + 1).flatten(dim, dim + 2)


def _deinterleaved(t: torch.Tensor, count: int, index: int, groups: int) -> torch.Tensor:
    """Tensor ``index`` of ``count`` interleaved along channels by ``_interleave`` (a view where one
    channel stride fits, else a copy)."""
    if count == 1:
        return t
    if groups == 1:
        return t.narrow(1, index * (t.shape[1] // count), t.shape[1] // count)
    return t.unflatten(1, (groups, count, -1)).select(2, index).flatten(1, 2)


def _block_weight(parts: list, groups: int) -> torch.Tensor:
    """parts[g][m]: the weight (out, in/groups, ...) of rule group g and input m.

    groups == 1: rule groups along the outputs (dim 0), modifiers along the inputs (dim 1).
    A grouped layer: per modifier, the rule groups stacked inside each conv group (out channels
    ordered (conv group, rule group, channel)), the modifiers' blocks one after the other along dim 0;
    each block is one convolution of the layer's own geometry (a depthwise layer stays depthwise).
    Interleaving the modifiers inside each conv group instead (one convolution that sums them) made a
    depthwise convolution one with two inputs per group, which oneDNN ran 2-6x slower than one
    convolution per part (bench/grouped_layouts.py, docs/native.md)."""
    if groups == 1:
        return _cat([_cat(row, dim=1) for row in parts], dim=0).contiguous()
    per_modifier = [_interleave([row[m] for row in parts], groups, dim=0) for m in range(len(parts[0]))]
    return _cat(per_modifier, dim=0).contiguous()


class BlockFunction(torch.autograd.Function):
    """forward computes the output and every z part and keeps them; backward runs the block rule."""

    @staticmethod
    def forward(ctx, block, save_memory, x):
        output = block.op(x, *block.params)
        z = block.z(x, output)
        ctx.block = block
        # Gamma's sign masks need the output (Epsilon's is z itself, kept below)
        keep_output = block.uses_mask
        # save_memory: keep only x and recompute z in backward (one more forward convolution).
        # Epsilon's z is the output itself, so there is nothing to recompute or to save.
        keep_z = not save_memory or block.z_is_output
        ctx.save_for_backward(x, z if keep_z else None, output if keep_output else None)
        return output

    @staticmethod
    def backward(ctx, relevance):
        given_up = reusable(relevance)
        x, z, output = ctx.saved_tensors
        block = ctx.block
        if z is None:
            z = block.z(x, output)
        return None, None, block.relevance(x, z, output, relevance, given_up)


def pointwise(op: AffineOp, weight: torch.Tensor) -> bool:
    """A 1x1 (x1) convolution without groups, stride or padding."""
    ones = [1] * op.dims
    return (op.kind == "conv" and op.groups == 1 and list(weight.shape[2:]) == ones and list(op.stride) == ones
            and not any(op.padding))


def transposed(op: AffineOp, s: torch.Tensor, weight: torch.Tensor, input_shape: tuple) -> torch.Tensor:
    """f^T(s; W): the gradient of f(x; W) with respect to x, applied to s.

    A transposed convolution, with the output padding that restores the input's size. Not
    aten.convolution_backward: it makes its (unused) input argument contiguous, a full-size
    copy per call, and on the CPU it was 2-3.6x slower for strided layers (measured with oneDNN)."""
    if op.kind == "linear":
        return s.matmul(weight)
    kernel = weight.shape[2:]
    ones = [1] * op.dims
    if pointwise(op, weight):
        # a pointwise layer: its transpose is a GEMM with W^T. torch's transposed convolution took its
        # slow path here (1.5-5x slower on the CPU, 1 thread, MobileNet/EfficientNet shapes), and a
        # convolution with W^T copies the transposed weight in every call; a contiguous s goes to the
        # GEMM directly, which reads W^T in place
        if s.is_contiguous():
            w = weight.reshape(weight.shape[0], weight.shape[1])
            if math.prod(s.shape[2:]) == 1:  # one position (squeeze-excitation gates): (N, C_out) x W, one GEMM;
                # W^T broadcast over the batch was copied per sample: 10x slower at (2, 960, 1, 1)
                flat = s.reshape(s.shape[0], s.shape[1]).matmul(w)
            else:
                flat = torch.matmul(w.t(), s.reshape(s.shape[0], s.shape[1], -1))
            return flat.reshape((s.shape[0], weight.shape[1]) + tuple(s.shape[2:]))
        return torch.ops.aten.convolution(s, weight.transpose(0, 1), None, ones, [0] * op.dims, ones, False,
                                          [0] * op.dims, 1)
    output_padding = [input_shape[2 + i] - ((s.shape[2 + i] - 1) * op.stride[i] - 2 * op.padding[i]
                                            + op.dilation[i] * (kernel[i] - 1) + 1) for i in range(op.dims)]
    return torch.ops.aten.convolution(s, weight, None, list(op.stride), list(op.padding), list(op.dilation),
                                      True, output_padding, op.groups)


def block_form_fits(op: AffineOp, x: torch.Tensor) -> bool:
    """Whether a layer has the block form: Linear on (N, ..., C), ConvNd (also grouped and depthwise)
    without string padding (transposed convolutions run the reference rule)."""
    if op.kind == "linear":
        return x.ndim >= 2  # (N, ..., C) runs as (N * ..., C)
    return op.kind == "conv" and not isinstance(op.padding, str)


class NativeBackend(Backend):
    """fastlrp._C's fused kernels (CPU: float32/float64; CUDA: also float16/bfloat16)."""

    name = "native"

    def available(self, device) -> bool:
        return ops.native_supports(torch.device(device), torch.float32)

    # ---- linear layers
    def supports_affine(self, layer, inputs) -> bool:
        (x,) = inputs
        return ops.native_supports(x.device, x.dtype) and block_form_fits(layer.op, x)

    def block(self, layer) -> BlockRule:
        """The layer's rule in block form for its current parameters (cached on the layer)."""
        def build(weight, bias):
            block = BlockRule(layer.op, layer.form(merge_positive=True), weight, bias)
            block.params = (weight, bias)
            return block
        return layer.derived(self.name, build)

    def forward_affine(self, layer, inputs):
        (x,) = inputs
        if layer.op.kind == "linear" and x.ndim > 2:  # tokens: a Linear acts on the last dim only
            flat = BlockFunction.apply(self.block(layer), layer.save_memory, x.reshape(-1, x.shape[-1]))
            return flat.reshape(*x.shape[:-1], flat.shape[-1])
        return BlockFunction.apply(self.block(layer), layer.save_memory, x)

    # ---- sums, average pooling, means
    def supports_norm(self, layer, inputs) -> bool:
        if layer.pooling is None or not ops.native_supports(inputs[0].device, inputs[0].dtype):
            return False
        if layer.pooling[0] == "sum":  # the kernel needs summands of one shape, (N, C, ...)
            return inputs[0].ndim >= 2 and all(t.shape == inputs[0].shape and t.dtype == inputs[0].dtype
                                               for t in inputs)
        return inputs[0].ndim in (3, 4, 5)

    def relevance_norm(self, layer, saved, shapes, relevance):
        kind, spec = layer.pooling
        eps = layer.rule.stabilizer
        with torch.no_grad():
            y = layer.compute(*saved)
        if kind == "sum":
            return tuple(ops.sum_relevance(saved, relevance, y, spec, eps))
        if kind == "adaptive_avg":
            return (ops.pool_relevance(saved[0], relevance, "adaptive_avg", y=y, epsilon=eps),)
        return (ops.pool_relevance(saved[0], relevance, "avg", spec.kernel_size, spec.stride, spec.padding,
                                   spec.ceil_mode, spec.count_include_pad, getattr(spec, "divisor_override", None),
                                   y=y, epsilon=eps),)

    # ---- max pooling, Proportional rule
    def supports_maxpool(self, layer, inputs) -> bool:
        return ops.native_supports(inputs[0].device, inputs[0].dtype)

    def relevance_maxpool(self, layer, saved, shapes, relevance):
        p = layer.pool
        return (ops.pool_relevance(saved[0], relevance, "max_proportional", p.kernel_size, p.stride, p.padding,
                                   p.ceil_mode, epsilon=layer.rule.stabilizer),)

    # ---- transformer layers: the AttnLRP rules in gradient form, recorded in the forward pass
    # (backends/attnlrp.py; pure torch around torch's fused kernels, so any device and dtype)
    def supports_block(self, layer, inputs) -> bool:
        return True

    def forward_block(self, layer, inputs):
        return attnlrp.block(layer, inputs)

    def supports_bilinear(self, layer, inputs) -> bool:
        return True

    def forward_bilinear(self, layer, inputs):
        return attnlrp.bilinear(layer, inputs)

    def supports_softmax(self, layer, inputs) -> bool:
        return True

    def forward_softmax(self, layer, inputs):
        return attnlrp.softmax(layer, inputs[0])
