"""Tiny MNIST-style training loop used by the examples (runs inside the job's container)."""

import argparse
import os
from pathlib import Path

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--out", default=os.environ.get("DESKGPU_CHECKPOINT_DIR", "."))
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, 10))
model = model.to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for epoch in range(args.epochs):
    x = torch.randn(256, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"epoch {epoch}: loss {loss.item():.3f}")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.save(model.state_dict(), out / "model.pt")
print(f"saved {out / 'model.pt'}")
