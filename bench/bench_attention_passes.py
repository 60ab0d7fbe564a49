"""The LRP-only passes over one attention matrix in MViT-v2's attention (q @ k^T -> relative-position
helper -> softmax -> @ v), before and after the gradient handles and the fused softmax rule
(docs/native.md, "Transformers"). Times the element-wise work alone, on the matrix shapes of
MViT-v2-S's blocks (batch 1, one 16x224x224 clip); min of --repeats.

    PYTHONPATH=python python bench/bench_attention_passes.py --threads 1

before: the attn @ v input's x * g, the softmax rule in torch (sum, addcmul, mul_, the -inf guard), the
helper's R / stab(y) and x * g, q @ k^T's R / stab(y) and its uniform split as a pass of its own.
after: the softmax rule in one kernel taking g from its handle, the helper's R / stab(y), and
q @ k^T's conversion through its handle with the split as its coefficient.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from fastlrp import ops  # noqa: E402

SHAPES = [(1, 4, 1569, 393), (1, 4, 1569, 1569), (1, 2, 6273, 1569), (1, 1, 25089, 393)]


def before(attn0, x, s, g):
    relevance = s * g
    out = torch.addcmul(relevance, s, relevance.sum(-1, keepdim=True), value=-1).mul_(x)
    out.masked_fill_(torch.isneginf(x), 0)
    g_helper = ops.stabilize_divide(out, [x], epsilon=1e-6)
    g_scores = ops.stabilize_divide(attn0 * g_helper, [attn0], epsilon=1e-6)
    return g_scores / 2


def after(attn0, x, s, g):
    out = ops.softmax_relevance(x, s, None, g, -1)
    g_helper = ops.stabilize_divide(out, [x], epsilon=1e-6)
    return ops.sum_relevance([attn0], g_helper, attn0, [0.5], epsilon=1e-6)[0]


def best_ms(fn, args, repeats):
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32")
    for shape in SHAPES:
        attn0 = torch.randn(shape)
        x = attn0 + torch.randn(shape[-1])
        s, g = x.softmax(-1), torch.randn(shape)
        tensors = (attn0, x, s, g)
        a, b = before(*tensors), after(*tensors)
        gap = ((a - b).abs().max() / a.abs().max()).item()
        t0, t1 = best_ms(before, tensors, args.repeats), best_ms(after, tensors, args.repeats)
        print(f"{str(shape):22s} before {t0:7.1f} ms  after {t1:7.1f} ms  ({t1 / t0:.2f}x)  max relative gap {gap:.1e}")


if __name__ == "__main__":
    main()
