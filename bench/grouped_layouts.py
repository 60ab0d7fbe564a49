"""Grouped convolutions on the native backend: the block form with the rule's parts interleaved per
conv group (what backends/native.py does) against one grouped convolution per part, forward and
relevance pass of one layer, on the CPU (docs/native.md, "Grouped and depthwise convolutions").

    OMP_NUM_THREADS=1 PYTHONPATH=python python bench/grouped_layouts.py
"""
import json
import statistics
import time

import torch

import fastlrp
from fastlrp import ops
from fastlrp.apps.benchmark.harness import RESULTS_DIR, environment
from fastlrp.backends.native import _CODES, BlockFunction, BlockRule, transposed
from fastlrp.linear_form import modified_input
from fastlrp.reference import AffineOp

SHAPES = {  # name: (channels in, channels out, kernel, groups, stride, spatial, batch)
    "depthwise 3x3, 96 ch, 56x56": (96, 96, 3, 96, 1, 56, 4),
    "depthwise 3x3 s2, 144 ch, 56x56": (144, 144, 3, 144, 2, 56, 4),
    "grouped 1x1, 240 -> 240, 3 groups, 28x28": (240, 240, 1, 3, 1, 28, 4),
    "grouped 3x3, 128 ch, 32 groups, 28x28": (128, 128, 3, 32, 1, 28, 4),
}
RULES = {"ZPlus, signed input": (fastlrp.ZPlus(), False), "ZPlus after ReLU": (fastlrp.ZPlus(), True),
         "Gamma, signed input": (fastlrp.Gamma(0.25), False)}


class PerPart(torch.autograd.Function):
    """One grouped convolution per part: z_g = sum_p f(m_p(x); W_p); f^T per part; combine."""

    @staticmethod
    def forward(ctx, op, form, weights, x):
        output = op(x, weights["W"])
        zs = []
        for g in range(len(form.groups)):
            zs.append(sum(op(modified_input(p.input, x, {}), weights[p]) for p in form.parts_of(g)))
        ctx.op, ctx.form, ctx.weights = op, form, weights
        ctx.save_for_backward(x, output, *zs)
        return output

    @staticmethod
    def backward(ctx, relevance):
        x, output, *zs = ctx.saved_tensors
        form, op = ctx.form, ctx.op
        s = ops.stabilize_divide(relevance, zs, [g.coefficient for g in form.groups],
                                 [{"none": 0, "positive": 1, "negative": 2}[g.mask] for g in form.groups],
                                 y=output if form.uses_mask else None, epsilon=form.stabilizer)
        s = s.chunk(len(zs), dim=1)
        modifiers = list(dict.fromkeys(p.input for p in form.parts))
        grads = {m: None for m in modifiers}
        for p in form.parts:
            g = transposed(op, s[p.group], ctx.weights[p], x.shape)
            grads[p.input] = g if grads[p.input] is None else grads[p.input] + g
        return None, None, None, ops.combine(x, torch.cat([grads[m] for m in modifiers], 1),
                                             [_CODES[m] for m in modifiers])


def median_ms(fn, repeats=9):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def main():
    rows = []
    for shape_name, (c_in, c_out, k, groups, stride, size, batch) in SHAPES.items():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        op, weight = AffineOp.from_module(conv), conv.weight.detach()
        for rule_name, (rule, nonnegative) in RULES.items():
            form = rule.form()
            form = form.for_nonnegative_input(True) if nonnegative else form
            x = torch.randn(batch, c_in, size, size)
            x = x.clamp(min=0) if nonnegative else x
            block = BlockRule(op, form, weight, None)
            block.params = (weight, None)
            weights = {p: p.weight.apply(weight) for p in form.parts}
            weights["W"] = weight

            def run(f):
                leaf = x.detach().requires_grad_(True)
                out = f(leaf)
                torch.autograd.grad(out, leaf, out)

            grad_ms = median_ms(lambda: run(lambda t: op(t, weight)))
            block_ms = median_ms(lambda: run(lambda t: BlockFunction.apply(block, False, t)))
            parts_ms = median_ms(lambda: run(lambda t: PerPart.apply(op, form, weights, t)))
            row = {"shape": shape_name, "rule": rule_name, "gradient_ms": grad_ms, "block_ms": block_ms,
                   "per_part_ms": parts_ms}
            rows.append(row)
            print(f"{shape_name:42s} {rule_name:20s} grad {grad_ms[0]:7.2f}  block {block_ms[0]:7.2f} "
                  f"({block_ms[0] / grad_ms[0]:.2f}x)  per part {parts_ms[0]:7.2f} ({parts_ms[0] / grad_ms[0]:.2f}x)",
                  flush=True)
    path = RESULTS_DIR / f"grouped-layouts-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"environment": environment("cpu"), "rows": rows,
                                "meaning": "median and min ms of forward + relevance pass of one layer"}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
