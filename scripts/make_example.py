"""Make fixtures/example: float32 logits, int64 labels and PyTorch's float32 gradient and loss.

Run with torch installed (`pip install torch==2.13.0`): python scripts/make_example.py
"""

from pathlib import Path

import numpy as np
import torch

out = Path(__file__).resolve().parent.parent / "fixtures" / "example"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(2026)
logits = (rng.standard_normal((32, 10)) * 2).astype(np.float32)
labels = rng.integers(0, 10, size=32)
z = torch.tensor(logits, requires_grad=True)
loss = torch.nn.functional.cross_entropy(z, torch.tensor(labels))
loss.backward()
np.save(out / "logits.npy", logits)
np.save(out / "labels.npy", labels)
np.save(out / "grad.npy", z.grad.numpy())
np.save(out / "loss.npy", loss.detach().numpy())
bad = z.grad.numpy().copy()
bad[7, 3] *= 1.01  # one entry off by 1%
np.save(out / "grad_bad.npy", bad)
