"""Train the digits feature network (evaluation/digits_net.py) and write its committed weights.

    python -m evaluation.train_digits_net                    # prepares digits itself (10% test split, seed 0)
    python -m evaluation.train_digits_net --data data/digits # or uses a prepared folder with train/test splits

The data are exactly what ``python -m pipeline.data.prepare digits --test-fraction 0.1`` writes
(scikit-learn's 1797 digits, 8×8, grey levels scaled to 0..255), read back from the shards. Training
uses the train split only; the held-out accuracy on the test split is printed and stored in the
weights file's metadata (and quoted in docs/fid.md). Augmentation: ±1 px shifts, and round trips
through 16 or 32 px (prepare's Lanczos resize, uint8) and back, so the demo's upsampled data are seen
the way the network will see them at evaluation time. CPU, about half a minute, deterministic.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from evaluation import digits_net
from pipeline import cli
from pipeline.data.prepare import prepare, resize_center_crop
from pipeline.data.report import DataError
from pipeline.data.sequential import iter_split


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    samples = list(iter_split(data_dir, split))
    images = np.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if (labels < 0).any():
        raise DataError(f"{data_dir} split {split!r} has unlabelled samples; the digits net needs labels")
    return images, labels


def _round_trip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Some images go 8 → 16|32 px (prepare's Lanczos, uint8) so the net learns the upsampled look."""
    out = []
    for img in images:
        if rng.random() < 0.5:
            size = int(rng.choice([16, 32]))
            out.append(resize_center_crop(img[0], size)[None])
        else:
            out.append(img)
    return out


def _shift(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    dy, dx = (int(v) for v in rng.integers(-1, 2, size=2))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(images: np.ndarray, labels: np.ndarray, *, epochs: int, seed: int, batch_size: int = 64) -> digits_net.DigitsNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = digits_net.DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    y_all = torch.from_numpy(labels)
    for epoch in range(epochs):
        net.train()
        perm = rng.permutation(len(images))
        total, correct = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            batch = _round_trip(images[idx], rng)
            # the net resizes every size to 8×8 itself; group by size to make tensors
            logits, ys = [], []
            for size in sorted({b.shape[-1] for b in batch}):
                sel = [j for j, b in enumerate(batch) if b.shape[-1] == size]
                x = _shift(torch.from_numpy(np.stack([batch[j] for j in sel])).float(), rng)
                logits.append(net(x))
                ys.append(y_all[idx[sel]])
            logits, y = torch.cat(logits), torch.cat(ys)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        sched.step()
        print(f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(images):.4f}  train acc {correct / len(images):.4f}")
    return net.eval()


@torch.no_grad()
def accuracy(net: digits_net.DigitsNet, images: np.ndarray, labels: np.ndarray) -> float:
    probs = digits_net.predict_proba(images, net=net)
    return float((probs.argmax(1) == labels).mean())


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m evaluation.train_digits_net", __doc__)
    p.add_argument("--data", default="", help="prepared digits folder with train and test splits (default: prepare one)")
    p.add_argument("--out", default=str(digits_net.WEIGHTS_PATH), help="weights file (safetensors)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return cli.run("train_digits_net", lambda: _main(a))


def _main(a: argparse.Namespace) -> int:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not data:
            data = str(Path(tmp) / "digits")
            prepare("digits", data, test_fraction=0.1, seed=0, workers=1, progress=False)
        train_x, train_y = load_split(data, "train")
        test_x, test_y = load_split(data, "test")
    net = train(train_x, train_y, epochs=a.epochs, seed=a.seed)
    acc = accuracy(net, test_x, test_y)
    # the same held-out images upsampled as the demo configs do, seen through the net's own resize
    acc16 = accuracy(net, np.stack([resize_center_crop(x[0], 16)[None] for x in test_x]), test_y)
    acc32 = accuracy(net, np.stack([resize_center_crop(x[0], 32)[None] for x in test_x]), test_y)
    meta = {
        "name": digits_net.NAME,
        "input_px": str(digits_net.INPUT_PX),
        "train_images": str(len(train_x)),
        "test_images": str(len(test_x)),
        "heldout_accuracy": f"{acc:.4f}",
        "heldout_accuracy_16px": f"{acc16:.4f}",
        "heldout_accuracy_32px": f"{acc32:.4f}",
        "data": "pipeline.data.prepare digits --test-fraction 0.1 --seed 0",
        "command": f"python -m evaluation.train_digits_net --epochs {a.epochs} --seed {a.seed}",
    }
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, a.out, metadata=meta)
    params = sum(v.numel() for v in state.values())
    print(json.dumps(meta, indent=1))
    print(f"wrote {a.out} ({params} parameters, weights sha256 {digits_net.weights_sha256(a.out)[:12]}) "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
