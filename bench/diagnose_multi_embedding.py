"""How far apart a multi-embedding model's user embeddings are: each user of the training set is embedded at their
last positive training-set row, and every extra real embedding is compared with the first (cosine), over the
whole output vector and over its learned part alone (the first ``out_dim`` coordinates; the rest are the pin-bias
coordinate, the wide interest cross, which with ``train.cluster_features`` is each cluster's own, and the blended
pre-trained subspace, which every embedding of a user shares).

    retrieval train --data_dir D --train.multi_embedding 4
    python bench/diagnose_multi_embedding.py D/models/<version>/model.pt D/training/training_set.parquet
"""
import sys

import pandas as pd
import torch
import torch.nn.functional as F

from training.model.checkpoint import load_checkpoint

model, encoder, payload = load_checkpoint(sys.argv[1])
if not model.user_tower.multi:
    sys.exit(f"{sys.argv[1]}: not a multi-embedding model (train.multi_embedding = 0)")
ts = pd.read_parquet(sys.argv[2])
rows = ts[ts["label"] == 1].sort_values("event_timestamp").drop_duplicates("user_id", keep="last")
with torch.no_grad():
    users, mask = model.user_tower(encoder.users(rows), with_mask=True)   # (U, K, D), (U, K)
out_dim = payload["config"]["out_dim"]
print(f"{len(rows)} users, {mask.float().sum(1).mean():.2f} embeddings per user, vectors of {users.shape[-1]} "
      f"coordinates ({out_dim} learned)")
for name, part in (("whole vector", users), (f"first {out_dim}", users[..., :out_dim])):
    unit = F.normalize(part, dim=-1)
    for k in range(1, unit.shape[1]):
        real = mask[:, k]
        if not real.any():
            continue
        cos = (unit[real, 0] * unit[real, k]).sum(-1)
        print(f"{name}: embedding {k + 1} ({int(real.sum())} users) against the first: cosine mean {cos.mean():.4f}, "
              f"10th percentile {cos.quantile(0.1):.4f}, min {cos.min():.4f}")
