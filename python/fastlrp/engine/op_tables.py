"""What the graph rewrite knows about torch functions and methods, by target: which module type a
functional op stands for (so one type-based composite covers both spellings), which ops only move
relevance (their gradient is right), which are gates, which keep a non-negative input non-negative."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

# Functional ops, by target, mapped to the module type composites know them by.
ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
MEAN = {torch.mean, "mean"}
SUM = {torch.sum, "sum"}
ACTIVATIONS = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, "relu_": nn.ReLU, F.relu_: nn.ReLU,
    F.relu6: nn.ReLU6, F.leaky_relu: nn.LeakyReLU, F.elu: nn.ELU, F.gelu: nn.GELU, F.silu: nn.SiLU,
    torch.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid, F.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh,
    "tanh": nn.Tanh, F.tanh: nn.Tanh, F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid,
    F.softplus: nn.Softplus, F.hardtanh: nn.Hardtanh, F.mish: nn.Mish,
}
POOLS = {
    F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d, F.avg_pool3d: nn.AvgPool3d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d,
    F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d, F.max_pool3d: nn.MaxPool3d,
    F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d, F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
    F.adaptive_max_pool3d: nn.AdaptiveMaxPool3d,
}
# Ops whose gradient is already the right relevance flow: reshapes, copies, splits, joins,
# eval-mode dropout, nearest/bilinear resampling, and reads of shapes.
STRUCTURAL = {
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.cat, torch.concat, torch.stack, torch.chunk, torch.split, torch.narrow,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate, F.pad, torch._assert, operator.floordiv,
    "size", "dim", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "chunk", "split", "expand", "expand_as", "clone", "to", "type_as", "float", "double", "half", "bfloat16",
    "view_as", "reshape_as", "narrow", "unbind", "movedim", "swapaxes", "__getitem__",
    # splits, selections, reorders and copies (issue 14): relevance goes back to where each value came from
    torch.roll, "roll", torch.swapaxes, torch.swapdims, "swapdims", torch.tensor_split, "tensor_split",
    torch.unbind, torch.repeat_interleave, "repeat_interleave", "repeat", torch.movedim, torch.flip, "flip",
    torch.where, torch.masked_fill, "masked_fill", "split_with_sizes", torch.index_select, "index_select",
    torch.gather, "gather", torch.unflatten, "unflatten", "select", "t", torch.t, torch.zeros_like, torch.ones_like,
    "new_zeros", "new_ones", "new_full", "new_empty", "detach", "requires_grad_", "float", "cpu",
}

# torch.fx-wrapped helpers (torchvision) that only pad, select or reshape.
STRUCTURAL_HELPERS = {"_patch_merging_pad", "_unsqueeze", "_squeeze"}

# Reads of a tensor's metadata: their results (and arithmetic on them) are Python values, not tensors.
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
SHAPE_METHODS = {"size", "dim", "numel", "nelement", "get_device", "stride"}

# Transformer ops (AttnLRP).
DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide", "__truediv__"}
NEG = {operator.neg, torch.neg, "neg"}
MATMUL = {operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", torch.einsum, "__matmul__", F.linear}
SOFTMAX = {F.softmax, torch.softmax, "softmax"}
NORMALIZATIONS = {F.layer_norm, F.rms_norm, F.normalize}
ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention}


# Functions (wrapped for fx by torchvision) that are the identity in eval mode.
EVAL_IDENTITIES = {"stochastic_depth"}

GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid"}

# Plain graph nodes (not replaced by a layer) that keep a non-negative input non-negative.
# (Padding may fill with a negative value and bicubic resampling overshoots: left out.)
SIGN_KEEPING = STRUCTURAL - {getattr, "size", "dim", operator.floordiv, torch._assert, F.pad, F.interpolate, torch.where,
                             torch.masked_fill, "masked_fill", "new_full", "new_empty"}
