"""The ``fastlrp`` command line.

    fastlrp demo     [--out DIR] [--n 8] [--composite epsilon_plus] [--seed 0] [--analysis-n 128] [--no-report]
    fastlrp explain  IMAGE... --model ARCH [--weights FILE] [--out DIR] ...
    fastlrp video    IN --model ARCH --out OUT.mp4 [--clip-length T --clip-stride S] ...
    fastlrp volume   IN.nii[.gz] --model ARCH --out OUT.nii.gz ...
    fastlrp dataset  DIR --model ARCH --out heatmaps.h5 ...      (also under torchrun)
    fastlrp concepts IMAGE|DIR --model ARCH --layer NAME [--out DIR] ...   (also under torchrun)
    fastlrp bench    [options of bench/bench_lrp.py]

Each subcommand is a function taking the parsed arguments and returning an exit code. The
commands that explain take --method (any of fastlrp.methods.names(); default lrp), --passthrough
(layers without an LRP rule) and --method-option KEY=VALUE.
Expected failures (a bad path, an unreadable file, an unknown model, a wrong channel
count, a missing optional dependency) end as one line on stderr and exit code 2, without a
traceback (``--traceback`` shows it); anything else is a bug and surfaces as one.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so main() reports it in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse hook
        raise _UsageError(message)


def _int_at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _analysis_n(text: str) -> int:
    value = _positive_int(text)
    if value < 16:  # as run_demo checks; here so that the error names the option
        raise argparse.ArgumentTypeError(f"must be at least 16 (SpRAy needs a few dozen heatmaps), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _percentile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 100.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 100], got {value}")
    return value


# --- commands -------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import format_summary, run_demo

    summary = run_demo(args.out, n=args.n, composite=args.composite, seed=args.seed, report=args.report,
                       analysis_n=args.analysis_n)
    print(format_summary(summary))
    return 0


def _model_args(args) -> dict:
    from .pipelines.common import parse_method_options, parse_target

    return {"model_spec": args.model, "weights": args.weights, "num_classes": args.num_classes,
            "composite": args.composite, "target": parse_target(args.target, allow_label=args.command == "dataset"),
            "device": args.device, "method": args.method, "layer": args.layer,
            "passthrough": tuple(args.passthrough or ()), "method_options": parse_method_options(args.method_option),
            "nonfinite": args.nonfinite}


def _cmd_explain(args) -> int:
    from .pipelines.images import explain_images

    summary = explain_images(args.images, size=args.size, normalize=args.normalize, convert=args.convert,
                             out_dir=args.out, cmap=args.cmap, alpha=args.alpha, percentile=args.percentile,
                             batch_size=args.batch_size, max_pixels=args.max_pixels, labels=args.labels,
                             plain=args.plain, **_model_args(args))
    for record in summary["images"]:
        print(f"{record['path']}: predicted {record['prediction_name']} (p={record['prediction_probability']:.1%}), "
              f"explained {record['target_name']} (logit {record['target_logit']:.3f}) -> {record['overlay']}")
    print(f"wrote {2 * len(summary['images'])} PNGs and {summary['json']}")
    return 0


def _cmd_video(args) -> int:
    from .pipelines.video import explain_video

    summary = explain_video(args.input, args.out, size=args.size, normalize=args.normalize, convert=args.convert,
                            batch_size=args.batch_size, clip_length=args.clip_length, clip_stride=args.clip_stride,
                            cmap=args.cmap, alpha=args.alpha, percentile=args.percentile, codec=args.codec,
                            **_model_args(args))
    print(f"wrote {summary['out']}: {summary['frames']} frames {summary['width']}x{summary['height']} "
          f"({summary['mode']}, codec {summary['codec']})")
    print(f"{summary['fps']:.1f} frames/s end to end (decode, explain, encode); "
          f"{summary['explain_fps']:.1f} frames/s explaining alone")
    return 0


def _cmd_volume(args) -> int:
    from .pipelines.volume import explain_volume

    summary = explain_volume(args.input, args.out, intensity=args.intensity, png=args.png, cmap=args.cmap,
                             alpha=args.alpha, percentile=args.percentile, labels=args.labels, **_model_args(args))
    print(f"wrote {summary['out']} (relevance {'x'.join(map(str, summary['shape']))}, the input's affine and "
          f"header) and {summary['png']}")
    print(f"predicted {summary['prediction_name']}, explained {summary['target_name']} "
          f"(logit {summary['target_logit']:.3f}, "
          f"sum of relevance {summary['relevance_sum']:.3f}); peak |relevance| at voxel {summary['peak_voxel']}")
    return 0


def _cmd_dataset(args) -> int:
    from .pipelines.dataset import explain_dataset

    summary = explain_dataset(args.dir, args.out, size=args.size, normalize=args.normalize, convert=args.convert,
                              batch_size=args.batch_size, max_pixels=args.max_pixels, **_model_args(args))
    if summary["rank"] == 0:
        kind = f"ImageFolder with {len(summary['classes'])} classes" if summary["classes"] else "folder of images"
        print(f"{summary['n']} images ({kind}), {summary['explained']} explained here, {summary['skipped']} "
              f"already done; {summary['world']} process(es)")
        print(f"wrote {summary['out']} (relevance {summary['n']}x{summary['size'][0]}x{summary['size'][1]} float32, "
              "paths, labels, predictions, targets)")
    return 0


def _cmd_concepts(args) -> int:
    from .pipelines.common import parse_target
    from .pipelines.concepts import explain_concepts

    if args.method != "lrp":
        raise ValueError(f"concepts are conditional LRP heatmaps; --method {args.method} does not apply")
    summary = explain_concepts(args.input, args.model, args.layer, weights=args.weights, num_classes=args.num_classes,
                               composite=args.composite, target=parse_target(args.target), size=args.size,
                               normalize=args.normalize, convert=args.convert, out_dir=args.out, top=args.top,
                               refs=args.refs, atlases=args.atlases, batch_size=args.batch_size, device=args.device,
                               passthrough=tuple(args.passthrough or ()))
    if "images" not in summary:
        return 0  # a torchrun rank other than 0
    for record in summary["images"]:
        shares = ", ".join(f"{c['channel']} ({c['share']:.0%})" for c in record["concepts"])
        print(f"{record['path']}: class {record['target']}, top channels of {summary['layer']}: {shares} "
              f"-> {record['atlas']}")
    print("wrote concepts.json" + (f" and {summary['scores']}" if summary["scores"] else ""))
    return 0


def _cmd_bench(args) -> int:
    from . import benchmark

    benchmark.run(benchmark.finish_args(args))
    return 0


# --- parser ---------------------------------------------------------------------------

def _add_model_options(p, image_input: bool = True) -> None:
    from .. import composites
    from ..methods import names as method_names

    p.add_argument("--model", required=True, metavar="ARCH",
                   help="a torchvision classifier name (resnet18, vgg16, r3d_18, ...; random weights unless "
                        "--weights) or your factory as module:function returning an nn.Module")
    p.add_argument("--weights", metavar="FILE",
                   help="a state dict (torch.save(model.state_dict(), FILE)), read with weights_only=True")
    p.add_argument("--num-classes", type=_positive_int, metavar="K", help="build the model with K output classes")
    p.add_argument("--method", default="lrp", metavar="NAME",
                   help=f"attribution method: {', '.join(method_names())} (default: lrp; see docs/methods.md)")
    p.add_argument("--composite", default=None, metavar="NAME",
                   help=f"LRP composite of --method lrp: {', '.join(composites.names())} (default: epsilon_plus)")
    p.add_argument("--layer", metavar="NAME",
                   help="the layer (module name) of --method cam, gradcam or gradcam++ (default: the last "
                        "convolution)")
    p.add_argument("--passthrough", action="append", metavar="LAYER",
                   help="a layer type (GroupNorm, module:Class) or module name (layer1.0.gn) without an LRP rule "
                        "that relevance crosses by the plain gradient; repeat it or join several with commas")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="an option of --method, e.g. steps=32 for integrated_gradients or epsilon=0.1 for lrp "
                        "(docs/methods.md lists them); repeat it for several")
    p.add_argument("--target", default="pred", metavar="CLASS",
                   help="class to explain: pred (the predicted class, default) or a class index")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, default), cpu, cuda or cuda:N")
    p.add_argument("--nonfinite", choices=("warn", "raise"), default="warn",
                   help="input holding NaN or Inf (its relevance cannot be finite): warn naming it and go on "
                        "(default), or raise: stop with an error before writing its output")
    if image_input:
        p.add_argument("--size", type=_positive_int, metavar="N", help="resize inputs to N x N before the model")
        p.add_argument("--normalize", choices=("auto", "imagenet", "kinetics", "none"), default="auto",
                       help="input scaling after [0, 1]: ImageNet or Kinetics-400 mean/std, none, or auto (default: "
                            "Kinetics for torchvision's 3-channel video models, ImageNet for its other 3-channel "
                            "models, none for factories)")
        p.add_argument("--convert", choices=("RGB", "L"),
                       help="convert inputs to colour (RGB) or grey (L) instead of taking their own channels")


def _add_pixel_limit(p) -> None:
    p.add_argument("--max-pixels", type=_non_negative_int, metavar="N",
                   help="open images of up to N pixels (width x height; 0: no limit) where Pillow's guard against "
                        "decompression bombs (about 179 million pixels) refuses a trusted large file")


def _add_render_options(p, alpha: float = 0.6) -> None:
    from ..viz import COLORMAPS

    p.add_argument("--cmap", default="bwr", metavar="NAME",
                   help=f"colour map: {', '.join(COLORMAPS)} or a matplotlib name (default: bwr)")
    p.add_argument("--alpha", type=_fraction, default=alpha, help=f"heatmap opacity over the input (default: {alpha})")
    from ..viz import DEFAULT_PERCENTILE

    p.add_argument("--clip-percentile", "--percentile", dest="percentile", type=_percentile, metavar="P",
                   default=DEFAULT_PERCENTILE,
                   help=f"colours saturate at the P-th percentile of |relevance| (default: {DEFAULT_PERCENTILE:g}, so "
                        "a few extreme pixels do not wash out the rest; 100: the maximum)")


def _add_labels_option(p) -> None:
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line in class-index order or JSON (a list, or {index: name}), for "
                        "titles and JSON (default: the categories of torchvision's weights for torchvision models, "
                        "class indices otherwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlrp", description="Layer-wise Relevance Propagation for PyTorch.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="leave the C library's allocator as it is. By default the command keeps freed CPU "
                             "memory for its next tensors (fastlrp.reuse_freed_memory, glibc only): no page "
                             "faults on every call, at the cost of keeping its peak memory until it exits")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="explain generated images with a shipped CNN; heatmap PNGs and an HTML report",
        description="Explain a batch of generated images with the demo CNN shipped in the package: one PNG "
        "per image (input next to its heatmap), grid.png, and report.html comparing LRP composites with "
        "gradient baselines, showing the Clever-Hans watermark the network learned, pixel-flipping curves "
        "with AOPC per method, and SpRAy clusters of many class-1 heatmaps.",
    )
    demo.add_argument("--out", default="fastlrp-demo", help="output folder (default: ./fastlrp-demo)")
    demo.add_argument("--n", type=_positive_int, default=8, help="number of images (default: 8)")
    demo.add_argument("--composite", default="epsilon_plus", help="LRP composite of the PNGs (default: epsilon_plus)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the image generator (default: 0)")
    demo.add_argument("--analysis-n", type=_analysis_n, default=128, metavar="N",
                      help="class-1 images explained and clustered with SpRAy for the report (at least 16; "
                      "default: 128)")
    demo.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    demo.set_defaults(func=_cmd_demo)

    explain = commands.add_parser(
        "explain", help="heatmaps and overlays for image files, with a JSON of predictions",
        description="Explain image files with a classifier; writes <name>_heatmap.png, <name>_overlay.png "
        "(each titled with the explained class, its probability and logit, above a colour bar: red is evidence "
        "for the class, blue against) and predictions.json (top classes with names, probabilities and logits, "
        "explained class, relevance sum) to --out.")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    _add_model_options(explain)
    _add_render_options(explain)
    _add_labels_option(explain)
    explain.add_argument("--plain", action="store_true",
                         help="PNGs without title and colour bar: the bare heatmap and overlay at the image's size")
    explain.add_argument("--out", default="fastlrp-explain", help="output folder (default: ./fastlrp-explain)")
    explain.add_argument("--batch-size", type=_positive_int, default=8, help="images per batch (default: 8)")
    _add_pixel_limit(explain)
    explain.set_defaults(func=_cmd_explain)

    video = commands.add_parser(
        "video", help="a video of relevance overlays (PyAV; per-frame 2D or clip-based 3D models)",
        description="Decode IN with PyAV, explain it frame by frame (2D model) or in sliding clips (3D model "
        "such as r3d_18, input [N, C, T, H, W]; each frame's relevance is the mean over the clips that hold "
        "it), and encode the relevance overlays to OUT. Streams: memory does not grow with the video's "
        'length. A progress bar shows frames/s. Needs pip install "fastlrp[video]".')
    video.add_argument("input", metavar="IN", help="input video file")
    _add_model_options(video)
    _add_render_options(video)
    video.add_argument("--out", required=True, metavar="OUT", help="output video (.mp4, .mkv, .mov, .avi, .webm)")
    video.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                       help="frames per pass for 2D models (default: 8), clips per pass for 3D models (default: 1)")
    video.add_argument("--clip-length", type=_positive_int, default=16, metavar="T",
                       help="frames per clip for 3D models (default: 16, as r3d_18 was trained)")
    video.add_argument("--clip-stride", type=_positive_int, default=None, metavar="S",
                       help="frames from one clip's start to the next's, 1 to --clip-length; below it clips "
                            "overlap and a frame's relevance is averaged over its clips (default: --clip-length)")
    video.add_argument("--codec", help="encoder (default: by the suffix of OUT, e.g. libx264 for .mp4)")
    video.set_defaults(func=_cmd_video)

    volume = commands.add_parser(
        "volume", help="relevance of a NIfTI volume under a 3D network, as NIfTI and a slices PNG",
        description="Explain IN (.nii or .nii.gz, [X, Y, Z] or [X, Y, Z, C]) with a 3D network; write the "
        "relevance to OUT with the input's affine and header, and a PNG of three orthogonal slices. "
        'Needs pip install "fastlrp[volume]".')
    volume.add_argument("input", metavar="IN", help="input NIfTI file")
    _add_model_options(volume, image_input=False)
    _add_render_options(volume)
    _add_labels_option(volume)
    volume.add_argument("--out", required=True, metavar="OUT.nii.gz", help="output NIfTI file")
    volume.add_argument("--intensity", choices=("zscore", "minmax", "none"), default="zscore",
                        help="intensity scaling per channel before the model (default: zscore)")
    volume.add_argument("--png", help="slices picture (default: OUT's name with _slices.png)")
    volume.set_defaults(func=_cmd_volume)

    dataset = commands.add_parser(
        "dataset", help="explain a folder of images into one HDF5 file (resumable; torchrun for many processes)",
        description="Explain every image under DIR (or a torchvision ImageFolder: one subfolder per class) "
        "into OUT.h5: datasets relevance [N, H, W] float32, paths, labels, predictions, targets (see "
        "docs/cli.md). Rerunning after a crash skips the done items. Under torchrun each process explains "
        'its share and rank 0 merges. Needs pip install "fastlrp[dataset]".')
    dataset.add_argument("dir", metavar="DIR", help="folder of images, or an ImageFolder")
    _add_model_options(dataset)
    dataset.add_argument("--out", required=True, metavar="OUT.h5", help="output HDF5 file")
    dataset.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")
    _add_pixel_limit(dataset)
    dataset.set_defaults(func=_cmd_dataset)
    for action in dataset._actions:  # dataset also knows the labels of an ImageFolder
        if action.dest == "target":
            action.help = "class to explain: pred (default), label (an ImageFolder's class) or a class index"

    concepts = commands.add_parser(
        "concepts", help="the most relevant channels of a layer, their conditional heatmaps and reference images",
        description="Concept Relevance Propagation (docs/concepts.md): for an image, the --top most relevant "
        "channels of --layer with their conditional heatmaps (an atlas PNG); for a folder, also every "
        "channel's reference images over the folder (scores.h5, relevance and activation maximization) "
        "shown in the atlases of its first --atlases images. Under torchrun each process scores its share.")
    concepts.add_argument("input", metavar="IMAGE_OR_DIR", help="an image, or a folder of images")
    _add_model_options(concepts)
    concepts.add_argument("--out", default="fastlrp-concepts", help="output folder (default: fastlrp-concepts)")
    concepts.add_argument("--top", type=_positive_int, default=4, help="channels per atlas (default: 4)")
    concepts.add_argument("--refs", type=_positive_int, default=4, help="reference images per channel (default: 4)")
    concepts.add_argument("--atlases", type=_positive_int, default=4,
                          help="for a folder: atlases of its first N images (default: 4)")
    concepts.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")
    concepts.set_defaults(func=_cmd_concepts)
    for action in concepts._actions:
        if action.dest == "layer":
            action.required = True
            action.help = "the layer whose channels are the concepts (a name of fastlrp.LRP(model).layer_names)"

    from .benchmark import add_arguments

    bench = commands.add_parser(
        "bench", help="time LRP against the plain gradient, Zennit and Captum (defaults for this machine)",
        description="Run the LRP benchmark (bench/bench_lrp.py's options). Defaults: on a CUDA machine the GPU "
        "preset (batch 64 at 224x224), otherwise a small CPU run (batch 1 at 64x64, several minutes). "
        'Zennit and Captum come with pip install "fastlrp[bench]"; rows without them say so.')
    add_arguments(bench, machine_defaults=True)
    bench.set_defaults(func=_cmd_bench)
    return parser


@contextlib.contextmanager
def _one_line_warnings():
    # Warnings for the user (random weights, ...) as one line each, like the errors.
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kw: f"fastlrp: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


_PASSTHROUGH_ADVICE = re.compile(r"passthrough=\[\s*'?([^\]']+?)'?\s*\]")


def _cli_advice(message: str) -> str:
    """The engine's advice (``passthrough=[GroupNorm]``) in the command line's terms."""
    message = _PASSTHROUGH_ADVICE.sub(lambda m: f"--passthrough {m.group(1)}", message)
    message = message.replace("passthrough=...", "--passthrough (its type or module name)")
    message = re.sub(r",? or give it a rule in your composite[^.]*\.", ".", message)
    if "--method" not in message:
        message = (message.rstrip(". ") + "; or explain the model with a method that needs no rule per layer, "
                   "e.g. --method gradcam or --method integrated_gradients")
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastlrp`` console script; returns the exit code."""
    from .. import allocator
    from ..extras import MissingExtraError
    from ..engine import UnsupportedLayerError

    argv = sys.argv[1:] if argv is None else list(argv)
    show_traceback = "--traceback" in argv
    try:
        try:
            with _one_line_warnings():
                args = build_parser().parse_args(argv)
                if not args.return_freed_memory and allocator.available():
                    allocator.reuse_freed_memory()
                return args.func(args)
        except TypeError as err:
            # a model torch.fx cannot trace is the user's to fix, as an unsupported layer is; other
            # TypeErrors are bugs
            if show_traceback or not str(err).startswith("fastlrp could not trace"):
                raise
            raise UnsupportedLayerError(str(err)) from err
    except (_UsageError, OSError, ValueError, MissingExtraError, UnsupportedLayerError) as err:
        if show_traceback:
            raise
        # One line, no traceback: these are the user's to fix, not bugs.
        message = " ".join(str(err).split())
        if isinstance(err, UnsupportedLayerError):
            message = _cli_advice(message)
        print(f"fastlrp: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .pipelines.common import is_out_of_memory

        if show_traceback or not is_out_of_memory(err):
            raise
        # outside the explainer, which splits its batches itself: moving the model, a probe forward
        detail = " ".join(str(err).split())[:160]
        print(f"fastlrp: error: out of memory ({detail}); lower --batch-size or --size, or use --device cpu",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastlrp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
