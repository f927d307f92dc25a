"""Your own image folder (``train/<class>/*``, ``test/<class>/*``, any image size) with a model of your own.

    python examples/image_folder.py [FOLDER]

Without FOLDER it writes a small synthetic folder of 40x40 colour images first.  The model
factory gets ``input_shape = (channels, height, width)`` and sizes itself from it.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

import fedmr


def tiny_net(num_classes, input_shape):
    """Two convolutions and global average pooling: any image size, any channel count."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def write_folder(root: Path, per_class: int = 100, size: int = 40) -> Path:
    """Four classes of noisy 40x40 colour images: reddish, greenish, bluish and grey."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 4)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                if c < 3:
                    pixels[..., c] += 100
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(sys.argv[1]) if len(sys.argv) > 1 else write_folder(Path(scratch) / "images")
        config = {"dataset": "imagefolder", "data_dir": str(folder), "cache_dir": scratch,
                  "num_clients": 10, "clients_per_round": 5, "partition": "iid", "local_epochs": 2, "lr": 0.05,
                  "rounds": int(os.environ.get("FEDMR_EXAMPLE_ROUNDS", 10)), "eval_every": 5}
        result = fedmr.run(config, model=tiny_net)
        print(f"fedmr on {folder}: final accuracy {result.summary['final_accuracy']:.3f}")
