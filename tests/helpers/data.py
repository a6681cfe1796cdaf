"""Small generated assets for the data tests: arrays, CIFAR pickles in the real format, shards, ranks."""

from __future__ import annotations

import os
import pickle
import socket
import tarfile

import numpy as np

from pipeline.data.prepare import prepare


def indexed_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 images whose source index i is written into both top corners (flip-invariant)."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    for i in range(n):
        for col in (0, size - 1):
            images[i, 0, col] = i % 256
            images[i, 1, col] = i // 256
    return images


def index_of(image_u8: np.ndarray) -> int:
    """Inverse of indexed_images for an (H, W[, C]) uint8 image."""
    first = image_u8[..., 0] if image_u8.ndim == 3 else image_u8
    return int(first[0, 0]) + 256 * int(first[1, 0])


def to_u8(batch_images) -> np.ndarray:
    """float (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), exactly inverting the loader's scaling."""
    x = ((batch_images.numpy() + 1.0) * 127.5).round().astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def make_shards(
    root: str, n: int, *, per_shard: int, size: int = 8, channels: int = 3, labels: bool = True,
    encoding: str = "png", name: str = "shards", test_fraction: float = 0.0,
) -> tuple[str, np.ndarray]:
    """Prepare n indexed images into root/name via the real prepare; returns (folder, source images)."""
    images = indexed_images(n, size, channels)
    src = os.path.join(root, f"{name}.npz")
    if labels:
        np.savez(src, images=images, labels=np.arange(n) % 10)
    else:
        np.savez(src, images=images)
    out = os.path.join(root, name)
    prepare(src, out, samples_per_shard=per_shard, encoding=encoding, workers=1, progress=False,
            test_fraction=test_fraction)
    return out, images


def write_cifar10(folder: str, per_batch: int, seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """cifar-10-batches-py as the 'python version' download lays it out (protocol-2 pickles, bytes keys)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_x, train_y = [], []
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    out = {}
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        out[name] = (data, labels)
        if name != "test_batch":
            train_x.append(data)
            train_y += labels
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(train_x), train_y, out["test_batch"][0], out["test_batch"][1]


def write_cifar100(folder: str, n_train: int, n_test: int, seed: int = 1) -> tuple[np.ndarray, list[int]]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    result = None
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                 b"coarse_labels": [v // 5 for v in fine], b"data": data}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        if name == "train":
            result = (data, fine)
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return result


def cifar_rows_to_hwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def tar_keys(path: str) -> list[str]:
    with tarfile.open(path) as tf:
        return sorted({m.name.split(".", 1)[0] for m in tf})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank_main(rank: int, world_size: int, port: int, fn, args: tuple, out_dir: str) -> None:
    """Entry of one spawned rank: join a real gloo group on loopback, run fn, save its result."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)  # the result crosses the process group, as in training
        if rank == 0:
            with open(os.path.join(out_dir, "result.pkl"), "wb") as f:
                pickle.dump(gathered, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, args: tuple, tmp: str) -> list:
    """Run fn(rank, world_size, *args) in world_size spawned processes; return the per-rank results."""
    import torch.multiprocessing as mp

    mp.start_processes(gloo_rank_main, args=(world_size, free_port(), fn, args, tmp), nprocs=world_size,
                       join=True, start_method="spawn")
    with open(os.path.join(tmp, "result.pkl"), "rb") as f:
        return pickle.load(f)


def copy_folder(src: str, dst: str) -> str:
    """A byte copy of a prepared folder (shards + manifest), to damage without touching the original."""
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def member_spans(path: str) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each tar member, in order, as tarfile reads them."""
    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data) for m in tf.getmembers()]


def cut_file(path: str, nbytes: int) -> None:
    """Keep only the first nbytes of a file (a truncated download or copy)."""
    with open(path, "rb") as f:
        data = f.read(nbytes)
    with open(path, "wb") as f:
        f.write(data)
