"""Train the demo CNN and write its weights.

    python -m fastlrp.apps.demo.train --out python/fastlrp/apps/demo/weights.pt

Deterministic: fixed seeds for the data and the initialisation, deterministic torch
algorithms and a fixed thread count, so a rerun on the same torch version gives the same
weights (the same with 1 or 2 threads here). Takes about half a minute on two idle CPU
cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from .data import WATERMARK_CLASS, add_watermark, make_dataset
from .model import WEIGHTS_PATH, DemoCNN

# Disjoint seeds: the demo and the tests draw their images with other seeds, so what they
# show is never the training set.
TRAIN_SEED = 1001
VAL_SEED = 1002


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class of each image, in batches to bound memory."""
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])


def evaluate(model: nn.Module, seed: int = VAL_SEED, n: int = 2000) -> dict[str, float]:
    """Accuracy on fresh images, and how much the model leans on the watermark.

    ``watermark_flip_rate`` is the fraction of class-0 images that the model calls class 1
    once the watermark is pasted into them: 0 means the artefact is ignored, 1 means it
    alone decides.
    """
    images, labels, marked = make_dataset(n, seed)
    pred = predict(model, images)
    correct = pred == labels
    cls1 = labels == WATERMARK_CLASS
    cls0 = ~cls1
    pred_marked0 = predict(model, add_watermark(images[cls0]))
    return {
        "accuracy": correct.float().mean().item(),
        "accuracy_class1_with_watermark": correct[cls1 & marked].float().mean().item(),
        "accuracy_class1_without_watermark": correct[cls1 & ~marked].float().mean().item(),
        "watermark_flip_rate": (pred_marked0 == WATERMARK_CLASS).float().mean().item(),
    }


def train(
    n_train: int = 6000,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int = 2,
) -> DemoCNN:
    """Train a fresh DemoCNN with Adam and a cosine learning-rate schedule."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)

    images, labels, _ = make_dataset(n_train, TRAIN_SEED)
    model = DemoCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((n_train + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)

    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_train, generator=shuffle)
        total = 0.0
        for idx in order.split(batch_size):
            loss = loss_fn(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}  loss {total / n_train:.4f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="where to write the state_dict")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train(epochs=args.epochs, threads=args.threads)
    elapsed = time.perf_counter() - start
    metrics = evaluate(model)
    # Plain contiguous float tensors: loadable with weights_only=True, small on disk.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, args.out)

    print(f"training time: {elapsed:.1f} s on {args.threads} thread(s)")
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
