"""``fastlrp dataset``: explain a folder of images into one HDF5 file, resumably, on one or
many processes.

Output layout (``LAYOUT_VERSION`` 1), N images in sorted order of their relative paths:

    relevance    float32 [N, H, W]  input relevance summed over colour channels
    paths        utf-8 strings [N]  relative to the source folder
    labels       int64 [N]          class index from an ImageFolder's subfolder, -1 without one
    predictions  int64 [N]          the model's argmax
    targets      int64 [N]          the class that was explained
    attrs        layout_version, classes (JSON list, [] without ImageFolder), source, model,
                 composite, settings (JSON of everything that decides the numbers)

Work is split across processes like ``DistributedSampler(shuffle=False)`` without its
padding: rank r of w takes images r, r + w, r + 2w, ... Each rank writes its own shard
``OUT.part<r>-of-<w>`` (HDF5 files must not be written by two processes), flushing after
every batch and marking the batch done only after its rows are on disk; a rerun with the
same settings skips done items. When every rank is finished, rank 0 merges the shards into
OUT (written under a temporary name, then renamed, so OUT is only ever complete) and
deletes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import torch

from .. import models
from ...extras import require
from .common import (IMAGE_SUFFIXES, _open, atomic_output, check_method, chunks, convert_fix, image_channels, load_image,
                     make_explainer, pixel_limit, preprocessing, progress, target_indices)

LAYOUT_VERSION = 1
# For tests only: the process kills itself after this many batches, as a crash would.
CRASH_AFTER_ENV = "FASTLRP_TEST_CRASH_AFTER_BATCHES"


def scan(root: Path) -> tuple[list, list, list]:
    """(relative paths, labels, classes) of the images under ``root``, sorted by path.

    An ImageFolder (every image one level down, in a folder named after its class) gets
    labels 0..K-1 in sorted class order; anything else gets labels -1 and no classes.
    """
    if not root.exists():
        raise FileNotFoundError(f"folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder; give the folder that holds the images")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    if all(path.count("/") == 1 for path in paths):
        classes = sorted({path.split("/")[0] for path in paths})
        index = {name: k for k, name in enumerate(classes)}
        return paths, [index[path.split("/")[0]] for path in paths], classes
    return paths, [-1] * len(paths), []


def common_size(root: Path, paths: list, size: int | None) -> tuple[int, int]:
    """(H, W) every image will have: --size, or the one size all images share."""
    if size is not None:
        return size, size
    first = None
    for path in paths:
        with _open(root / path) as image:  # reads the header only
            w, h = image.size
        if first is None:
            first = (h, w, path)
        elif (h, w) != first[:2]:
            raise ValueError(f"images differ in size ({first[2]} is {first[1]}x{first[0]}, {path} is {w}x{h}); "
                             "pass --size N to resize them all to N x N")
    return first[0], first[1]


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank), joining torchrun's process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo only coordinates (barriers); the explaining runs on each rank's own device.
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}-of-{world}")


def file_digest(path) -> str:
    """SHA-256 of a file's bytes: what identifies a weights file, whatever its path, size or date."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(root, paths, labels, model_spec, weights, num_classes, composite, target, hw, normalize, convert,
              explanation=None):
    digest = hashlib.sha1("\n".join(f"{p}\t{lab}" for p, lab in zip(paths, labels)).encode()).hexdigest()
    weights_id = None
    if weights is not None:
        # by content: a file replaced at the same path (even with the same size) is another model
        weights_id = "sha256:" + file_digest(Path(weights).expanduser())
    return json.dumps({"layout_version": LAYOUT_VERSION, "source": str(root), "n": len(paths), "items_sha1": digest,
                       "model": model_spec, "weights": weights_id, "num_classes": num_classes,
                       "composite": composite, "target": target, "size": list(hw), "normalize": normalize,
                       "convert": convert,
                       # method, layer, pass-through and options only when given, so runs of earlier
                       # versions (always LRP) still resume
                       **(explanation or {})}, sort_keys=True)


def _describe_difference(old: str, new: str) -> str:
    old, new = json.loads(old), json.loads(new)
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys[:3])


def _open_shard(h5py, path: Path, settings: str, positions: list, hw: tuple):
    if path.exists():
        try:
            shard = h5py.File(path, "r+")
        except OSError as err:
            raise ValueError(f"cannot reopen {path} to resume ({err}); it was probably cut off mid-write: "
                             "delete it to redo its items") from None
        if shard.attrs.get("settings") != settings:
            before = shard.attrs.get("settings", "{}")
            shard.close()
            if json.loads(before).get("weights") != json.loads(settings).get("weights"):
                raise ValueError(f"{path} was started with other weights (the --weights file's content differs "
                                 "from the run being resumed); restore those weights to resume, or delete "
                                 f"{path.name} to start over with these")
            diff = _describe_difference(before, settings)
            raise ValueError(f"{path} holds a run with other settings ({diff}); rerun with the same "
                             "options to resume, or delete it to start over")
        return shard
    shard = h5py.File(path, "w")
    n = len(positions)
    shard.attrs["settings"] = settings
    shard.create_dataset("indices", data=np.asarray(positions, dtype=np.int64))
    shard.create_dataset("relevance", shape=(n, *hw), dtype=np.float32, chunks=(1, *hw))
    shard.create_dataset("predictions", shape=(n,), dtype=np.int64)
    shard.create_dataset("targets", shape=(n,), dtype=np.int64)
    shard.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
    shard.flush()
    return shard


def _merge(h5py, out: Path, world: int, n: int, hw: tuple, paths, labels, classes, settings, attrs) -> None:
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as merged:  # OUT is either absent or complete
        relevance = merged.create_dataset("relevance", shape=(n, *hw), dtype=np.float32, chunks=(1, *hw))
        predictions = merged.create_dataset("predictions", shape=(n,), dtype=np.int64)
        targets = merged.create_dataset("targets", shape=(n,), dtype=np.int64)
        merged.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
        merged.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        for rank in range(world):
            with h5py.File(shard_path(out, rank, world), "r") as shard:
                if not shard["done"][()].all():
                    raise ValueError(f"shard {shard_path(out, rank, world)} is incomplete; rerun the command to finish it")
                index = shard["indices"][()]
                for row, k in enumerate(index):  # row by row: a shard can be larger than memory
                    relevance[k] = shard["relevance"][row]
                predictions[index] = shard["predictions"][()]
                targets[index] = shard["targets"][()]
        merged.attrs.update({"layout_version": LAYOUT_VERSION, "classes": json.dumps(classes),
                             "settings": settings, **attrs})
    for rank in range(world):
        shard_path(out, rank, world).unlink()


def explain_dataset(root, out, model_spec: str, weights=None, num_classes=None, composite=None,
                    target="pred", size=None, normalize="auto", convert=None, batch_size=16,
                    device="auto", method="lrp", layer=None, passthrough=(), method_options=None,
                    nonfinite="warn", max_pixels=None) -> dict:
    """Explain every image under ``root`` into the HDF5 file ``out`` (layout above); returns a summary.
    ``method``, ``layer``, ``passthrough``, ``method_options``, ``nonfinite``, ``max_pixels``: as
    ``explain_images``.

    Run under torchrun, every rank calls this; each explains its share, rank 0 merges.
    """
    with pixel_limit(max_pixels):
        return _explain_dataset(root, out, model_spec, weights, num_classes, composite, target, size, normalize,
                                convert, batch_size, device, method, layer, passthrough, method_options, nonfinite)


def _load_batch(root: Path, paths: list, items: list, channels: int, prep, hw: tuple) -> torch.Tensor:
    # Each image is scaled (and resized under --size) on its own: images of different sizes can
    # only be stacked once they share one.
    x = torch.cat([prep(load_image(root / paths[k], channels)[None]) for k in items])
    if tuple(x.shape[-2:]) != hw:
        raise ValueError(f"an image in {[paths[k] for k in items]} is not {hw[1]}x{hw[0]}; pass --size")
    return x


def _explain_dataset(root, out, model_spec, weights, num_classes, composite, target, size, normalize, convert,
                     batch_size, device, method, layer, passthrough, method_options, nonfinite) -> dict:
    h5py = require("h5py", "dataset")
    root, out = Path(root).expanduser().absolute(), Path(out).expanduser().absolute()
    # Everything that can be checked without the model comes first.
    check_method(method, composite, layer, passthrough, method_options, nonfinite)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} for --out does not exist")
    paths, labels, classes = scan(root)
    first_channels = image_channels(root / paths[0], convert)
    hw = common_size(root, paths, size)
    model = models.load_model(model_spec, weights, num_classes)
    spec = models.input_spec(model)
    models.check_spatial_dims(spec, (2,), "dataset", "give an image classifier")
    channels = spec.channels if spec else 3
    models.check_channels(spec, first_channels, str(root / paths[0]), convert_fix(channels))
    explanation = {}
    if method != "lrp":
        explanation["method"] = method
    for key, value in (("layer", layer), ("passthrough", list(passthrough or ())), ("method_options", method_options)):
        if value:
            explanation[key] = json.loads(json.dumps(value, default=str))
    settings = _settings(root, paths, labels, model_spec, weights, num_classes,
                         (composite or "epsilon_plus") if method == "lrp" else None, target, hw, normalize,
                         convert, explanation)
    summary = {"out": str(out), "n": len(paths), "classes": classes, "size": list(hw)}

    if out.exists():
        try:
            with h5py.File(out, "r") as done:
                previous = done.attrs.get("settings")
        except OSError as err:
            raise ValueError(f"{out} exists but is not a readable HDF5 file ({err}); delete it or choose "
                             "another --out") from None
        if previous != settings:
            raise ValueError(f"{out} already exists with other settings ({_describe_difference(previous or '{}', settings)}); "
                             "delete it or choose another --out")
        return {**summary, "explained": 0, "skipped": len(paths), "rank": 0, "world": 1}

    if target == "label" and not classes:
        raise ValueError(f"--target label needs an ImageFolder ({root}/<class>/<image>); use --target pred")
    rank, world, local_rank = distributed_context()
    stale = [p for p in out.parent.glob(out.name + ".part*-of-*") if not p.name.endswith(f"-of-{world}")]
    if stale:
        raise ValueError(f"{stale[0]} is left from a run on another number of processes; resume with that many "
                         "or delete the .part files to start over")
    dev = models.resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)  # one GPU per rank
    prep = preprocessing(size, normalize, model_spec, channels)
    model = model.to(dev)
    explainer = make_explainer(model, composite, prep, channels, method, layer, passthrough, method_options,
                               nonfinite, "pass a smaller --size, or --method-option save_memory=True for LRP")

    positions = list(range(rank, len(paths), world))
    # The model's output is checked on one image before anything is written, so a setting that
    # cannot work (--target 99 of 3 classes) leaves no shard behind to block the corrected rerun.
    with torch.no_grad():
        probe = model(_load_batch(root, paths, positions[:1] or [0], channels, prep, hw).to(dev))
    if probe.ndim != 2:
        raise ValueError(f"model output has shape {tuple(probe.shape)}; dataset needs [N, classes] logits")
    if isinstance(target, int) and target >= probe.shape[1]:
        raise ValueError(f"--target {target} is out of range: the model has {probe.shape[1]} classes")
    if target == "label" and len(classes) > probe.shape[1]:
        raise ValueError(f"--target label: the ImageFolder has {len(classes)} classes but the model only "
                         f"{probe.shape[1]}; pass --num-classes {len(classes)} or use --target pred")

    shard_file = shard_path(out, rank, world)
    shard = _open_shard(h5py, shard_file, settings, positions, hw)
    crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0"))
    explained = batches = 0
    failed = True
    try:
        done = shard["done"][()]
        todo = [row for row in range(len(positions)) if not done[row]]
        label = "dataset" if world == 1 else f"dataset rank {rank} of {world}"  # only rank 0 shows it
        bar = progress(total=len(positions), initial=len(positions) - len(todo), desc=label, unit="img",
                       disable=None if rank == 0 else True)
        for rows in chunks(todo, batch_size):
            items = [positions[row] for row in rows]
            x = _load_batch(root, paths, items, channels, prep, hw).to(dev)
            item_labels = torch.tensor([labels[k] for k in items])
            wanted = None if target == "pred" else item_labels.to(dev) if target == "label" else target
            result = explainer.explain(x, wanted, names=[paths[k] for k in items])
            logits = result.output
            explained_classes = target_indices(target, logits, item_labels)
            shard["relevance"][rows] = result.relevance.sum(1).float().cpu().numpy()  # rows increase: h5py allows
            shard["predictions"][rows] = logits.argmax(1).cpu().numpy()
            shard["targets"][rows] = explained_classes.cpu().numpy()
            shard.flush()  # rows on disk before they are marked done
            shard["done"][rows] = True
            shard.flush()
            explained += len(rows)
            batches += 1
            bar.update(len(rows))
            if crash_after and batches >= crash_after:
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        bar.close()
        failed = False
    finally:
        nothing_done = failed and not shard["done"][()].any()
        shard.close()
        if nothing_done:
            # A run that failed before finishing one batch leaves nothing worth resuming; its
            # empty shard would only stand in the way of a rerun with corrected options.
            shard_file.unlink(missing_ok=True)

    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every shard complete before rank 0 reads them
    if rank == 0:
        _merge(h5py, out, world, len(paths), hw, paths, labels, classes, settings,
               {"source": str(root), "model": model_spec, "method": method,
                "composite": (composite or "epsilon_plus") if method == "lrp" else ""})
    return {**summary, "explained": explained, "skipped": len(positions) - explained, "rank": rank, "world": world}
