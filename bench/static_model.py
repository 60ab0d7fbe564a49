"""A static performance model of LRP on an H200 (or H100), per layer and backend: a model, never a
measurement (docs/gpu.md, "Static performance model").

    PYTHONPATH=python:. python bench/static_model.py --sass bench/results/gpu-static-model-sm90-bf16.json \
        --out bench/results/static-model-h200-bf16.json --report bench/results/static-model-h200-bf16.md

Layers: every Conv/Linear of ResNet-50 and VGG16 (batch 64, 224x224) and r3d_18 (16 clips of 16x112x112),
traced on the 'meta' device. Per layer and backend, time = the larger of
  * tensor-core time: multiply-adds / (peak rate x MMA_EFFICIENCY), for cuDNN/cuBLAS and Triton alike;
  * instruction issue (Triton only): K steps x tiles x the issue clocks of one K step, read from the SASS
    of that layer kind's compile (bench/gpu_static: instructions in the K loop x warps / 4 per clock);
  * memory: the bytes each kernel must move (inputs once, outputs once) / (bandwidth x BW_EFFICIENCY).
Backends: ``gradient`` (forward conv + the input-gradient conv), ``native`` (forward, z conv where the
rule needs one, the stabilized division, the transposed conv, the combination: docs/native.md),
``triton fused`` (before the redesign: the fused forward and relevance kernels on every layer they
take, best choosable config), ``triton backend`` (after: the fused forward kernel and the dense relevance
pass, or the native path where that is faster, as the measured choice would pick; few-channel and
IEEE-float32 layers native). Pooling, ReLU, batch norm and sums are
left out for every backend alike.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

# H200 (GH100, 132 SMs): dense tensor-core multiply-adds per clock per SM by operand precision, the clock
# at which 132 x 2048 x 2 x clock = 989 TFLOP/s bf16 (the datasheet's dense figure), HBM3e bandwidth.
GPUS = {
    "h200": dict(sms=132, clock_hz=1.83e9, bandwidth=4.8e12),
    "h100": dict(sms=132, clock_hz=1.83e9, bandwidth=3.35e12),
}
MAC_PER_CLK_SM = {"bf16": 2048, "fp16": 2048, "tf32": 1024, "fp32": 128}
MMA_EFFICIENCY = 0.7  # the share of tensor-core peak a good GEMM/convolution reaches (assumed, for all)
BW_EFFICIENCY = 0.8   # the share of bandwidth an element-wise kernel reaches (assumed, for all)


def model_layers(name: str):
    """[(module kind, x shape, weight shape, stride, padding, order)] of the model's Conv/Linear layers."""
    import torchvision
    with torch.device("meta"):
        if name == "r3d_18":
            model, x = torchvision.models.video.r3d_18(), torch.empty(16, 3, 16, 112, 112)
        else:
            model, x = getattr(torchvision.models, name)(), torch.empty(64, 3, 224, 224)
    layers = []

    def hook(module, inputs, output):
        stride = getattr(module, "stride", ())
        padding = getattr(module, "padding", ())
        layers.append((type(module).__name__, tuple(inputs[0].shape), tuple(module.weight.shape), tuple(stride),
                       tuple(padding), tuple(output.shape)))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(x)
    return layers, x.shape[0]


def _prod(t):
    return math.prod(t)


def representative(kind, x, w, stride):
    """The layer kind whose SASS stands for this layer (bench/gpu_static/cases.MODEL_LAYERS)."""
    if kind == "Linear":
        return "r50_fc_2048"
    if kind == "Conv3d":
        return "r3d_3x3x3_64"  # 3x3x3 and strided 1x1x1/3x3x3 alike: the K loop's code is the same shape
    k, s = w[2], stride[0]
    return {(1, 1): "r50_1x1_256to64", (1, 2): "r50_ds_1x1s2_256to512", (3, 1): "r50_3x3s1_64",
            (3, 2): "r50_3x3s2_128"}.get((k, s), "r50_3x3s1_64")


def rule_for(composite, index, kind):
    """The rule and input sign the composite gives the layer: first layer bounds/flat, Linear epsilon,
    the other convs ZPlus/Gamma after a ReLU."""
    if kind == "Linear":
        return "epsilon", False
    if index == 0:
        return ("zbox" if composite == "epsilon_gamma_box" else "zplus"), False
    return ("gamma" if composite == "epsilon_gamma_box" else "zplus"), True


def _gemm_s(macs, gpu, precision):
    return macs / (gpu["sms"] * MAC_PER_CLK_SM[precision] * gpu["clock_hz"] * MMA_EFFICIENCY)


def _bytes_s(n_bytes, gpu):
    return n_bytes / (gpu["bandwidth"] * BW_EFFICIENCY)


def _conv_s(macs, n_bytes, gpu, precision):
    return max(_gemm_s(macs, gpu, precision), _bytes_s(n_bytes, gpu))


# native's block form per rule (docs/native.md): z convs' output-channel multiple, tensors read/written by
# stabilize_divide (in units of the output size) and by combine (units of the input size)
NATIVE = {  # rule: (z conv groups (0: z is the output), divide tensors, transposed-conv groups, combine tensors)
    "epsilon": (0, 3, 1, 3), "zplus": (1, 3, 1, 3), "gamma": (2, 6, 2, 3), "zbox": (1, 3, 3, 5)}
# Triton's products per rule after a ReLU: (forward dot products, relevance dot products)
TRITON_PRODUCTS = {("zplus", True): (1, 1), ("gamma", True): (2, 2), ("epsilon", False): (1, 1),
                   ("zplus", False): (2, 2), ("zbox", False): (3, 3)}


def layer_times(layer, rule, nonneg, gpu, precision, elem, sass):
    kind, x, w, stride, padding, y = layer
    macs = _prod(y) * _prod(w[1:])  # forward multiply-adds
    x_b, y_b, w_b = _prod(x) * elem, _prod(y) * elem, _prod(w) * elem
    t = {}
    tensor_prec = "fp32" if precision == "ieee" else precision
    gemm_prec = tensor_prec if kind != "Linear" or precision != "tf32" else "fp32"  # cuBLAS: TF32 off by default
    t["gradient"] = _conv_s(macs, x_b + w_b + y_b, gpu, gemm_prec) * 2  # forward + input gradient
    z_groups, divide, t_groups, combine = NATIVE[rule]
    native_forward = _conv_s(macs, x_b + w_b + y_b, gpu, gemm_prec)  # the layer's own output
    if z_groups:
        native_forward += _conv_s(macs * z_groups, x_b + z_groups * (w_b + y_b), gpu, gemm_prec)
    dense_relevance = (_bytes_s(divide * y_b, gpu) + _conv_s(macs * t_groups, t_groups * (y_b + w_b) + x_b, gpu,
                                                             gemm_prec) + _bytes_s(combine * x_b, gpu))
    t["native"] = native_forward + dense_relevance
    rep = representative(kind, x, w, stride)
    worthwhile = w[1] >= 16 and precision != "ieee"
    options = sass.get((rep, rule, nonneg)) if sass else None
    fused = None
    if options and worthwhile:
        fused = {which: _triton_kernel_s(options[which], which, layer, gpu, elem) if options[which] else None
                 for which in ("forward", "relevance")}
    # both passes as fused implicit GEMMs (where the SASS has the relevance kernel); the Triton backend: the
    # fused forward kernel and the dense relevance pass
    t["triton_fused"] = None if fused is None or fused["relevance"] is None else fused["forward"] + fused["relevance"]
    t["triton_fused_forward"] = None if fused is None else fused["forward"]
    after = None if fused is None else fused["forward"] + dense_relevance
    t["triton_backend"] = t["native"] if after is None else min(t["native"], after)
    t["representative"] = rep
    t["worthwhile"] = worthwhile
    return t


def _triton_kernel_s(configs, which, layer, gpu, elem):
    """The best choosable config's time: tiles x K steps x max(issue, MMA / efficiency) clocks per step,
    or the bytes it moves, whichever is larger."""
    kind, x, w, stride, padding, y = layer
    n, c, o = x[0], x[1], w[0]
    kvol = _prod(w[2:])
    if which == "forward":
        rows, cols, k = _prod(y) // o, o, c * kvol
        n_bytes = (_prod(x) + _prod(w) + 2 * _prod(y)) * elem
    else:
        rows, cols, k = _prod(x) // c, c, o * kvol  # every tap, also those between strides
        n_bytes = (_prod(x) * 2 + _prod(w) + 3 * _prod(y)) * elem
    best = None
    for rec in configs:
        tile, est = rec["tile"], rec["estimate"]
        tiles = math.ceil(rows / tile["BM"]) * math.ceil(cols / tile["BN"])
        step = max(est["issue_clk"], est["mma_clk"] / MMA_EFFICIENCY)
        if "outer_issue_clk" in est:  # the tap loop around the K loop: its set-up and pipeline prologue per tap
            per_tile = kvol * (est["outer_issue_clk"] + math.ceil(c / tile["BK"]) * step)
        else:
            per_tile = math.ceil(k / tile["BK"]) * step
        clocks = tiles * per_tile / gpu["sms"]
        s = max(clocks / gpu["clock_hz"], _bytes_s(n_bytes, gpu))
        best = s if best is None else min(best, s)
    return best


def load_sass(path, layout="contiguous"):
    """{(layer kind, rule, nonneg): {"forward": [records], "relevance": [records]}} of choosable compiles of
    one layout (a file may hold no relevance records: the fused relevance kernel is then left out)."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    out = {}
    for r in data["records"]:
        if r["kernel"] == "pool" or r["status"] != "ok" or not r.get("estimate") or not r.get("choosable"):
            continue
        layer, rule, nn, *cl = r["variant"].split("/")
        if (layout == "channels_last") != (cl == ["cl"]):
            continue
        out.setdefault((layer, rule, nn == "nn1"), {"forward": [], "relevance": []})[r["kernel"]].append(r)
    return {k: v for k, v in out.items() if v["forward"]}


def run(models, composites, gpu_name, dtype, sass_path, layout="contiguous"):
    gpu = GPUS[gpu_name]
    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "tf32"}[dtype]
    elem = 4 if dtype == "float32" else 2
    sass = load_sass(sass_path, layout)
    result = {"gpu": gpu_name, "gpu_constants": gpu, "dtype": dtype, "mma_efficiency": MMA_EFFICIENCY,
              "bw_efficiency": BW_EFFICIENCY, "sass": sass_path, "layout": layout, "models": {}}
    for name in models:
        layers, batch = model_layers(name)
        for composite in composites:
            per_layer, totals = [], {"gradient": 0.0, "native": 0.0, "triton_fused": 0.0, "triton_backend": 0.0}
            missing = 0
            for i, layer in enumerate(layers):
                rule, nonneg = rule_for(composite, i, layer[0])
                t = layer_times(layer, rule, nonneg, gpu, precision, elem, sass)
                for key in ("gradient", "native", "triton_backend"):
                    totals[key] += t[key]
                # layers the kernels do not take run natively in the fused figure too
                totals["triton_fused"] += t["triton_fused"] if t["triton_fused"] is not None else t["native"]
                missing += t["worthwhile"] and t["triton_fused_forward"] is None
                per_layer.append(dict(kind=layer[0], x=layer[1], weight=layer[2], stride=layer[3], rule=rule,
                                      nonneg=nonneg, **{k: (round(v * 1e6, 2) if isinstance(v, float) else v)
                                                        for k, v in t.items()}))
            if not any(layer["triton_fused"] is not None for layer in per_layer):
                del totals["triton_fused"]  # no relevance-kernel SASS in this file
            result["models"][f"{name}/{composite}"] = {
                "batch": batch, "layers": per_layer, "missing_sass": missing,
                "total_us": {k: round(v * 1e6, 1) for k, v in totals.items()},
                "img_per_s": {k: round(batch / v) for k, v in totals.items()},
            }
    return result


def report_md(result) -> str:
    lines = [f"Static model, {result['gpu']} {result['dtype']}, {result.get('layout', 'contiguous')} layout (a model, "
             "not a measurement; docs/gpu.md): img/s of "
             "the Conv/Linear layers' LRP; gradient = forward + input gradient of the same layers.", "",
             "| model / composite | gradient | native | triton: forward kernel + fused relevance kernel | "
             "triton backend: forward kernel + dense relevance | layers without SASS |", "|---|---|---|---|---|---|"]
    for key, m in result["models"].items():
        ips = m["img_per_s"]
        lines.append(f"| {key} | {ips['gradient']} | {ips['native']} | {ips.get('triton_fused', 'n/a')} | "
                     f"{ips['triton_backend']} | {m['missing_sass']} |")
    lines += ["", "Per layer kind (the first layer of each kind), microseconds:", "",
              "| model / composite | layer | rule | gradient | native | triton fused fwd+rel | triton fused fwd | "
              "triton backend |", "|---|---|---|---|---|---|---|---|"]
    for key, m in result["models"].items():
        seen = set()
        for layer in m["layers"]:
            sig = (layer["kind"], layer["weight"][2:], layer["stride"], layer["rule"], layer["weight"][1] >= 16)
            if sig in seen:
                continue
            seen.add(sig)
            lines.append(f"| {key} | {layer['kind']} x{list(layer['x'])} w{list(layer['weight'])} "
                         f"s{list(layer['stride'])} | {layer['rule']} | {layer['gradient']} | {layer['native']} | "
                         f"{layer['triton_fused']} | {layer['triton_fused_forward']} | {layer['triton_backend']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "r3d_18"])
    ap.add_argument("--composites", nargs="+", default=["epsilon_plus", "epsilon_gamma_box"])
    ap.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sass", default=None, help="JSON of bench/gpu_static/check.py with the model's variants")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"],
                    help="which layout's compiles of the SASS file stand for the layers")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None)
    a = ap.parse_args(argv)
    result = run(a.models, a.composites, a.gpu, a.dtype, a.sass, a.layout)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    text = report_md(result)
    if a.report:
        Path(a.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
