"""The user tower's CPU time per request for each backbone on a data dir (architecture cost: the weights do
not change it, so the towers are built, not trained). Needs a pre-trained table (`retrieval pretrain --data_dir D`).

    python bench/bench_user_tower.py D
"""
import dataclasses
import json
import sys

from training.config import Config
from training.evaluation.report import user_tower_cost
from training.evaluation.split import load_split
from training.model.checkpoint import build_model
from training.model.encoding import Encoder
from training.model.pretrained import latest_usable

cfg = Config.load(overrides={"data_dir": sys.argv[1]})
ts, split, manifest = load_split(cfg)
start = split.window_start(cfg.train.window_fraction)
table = latest_usable(cfg.data_path / "pretrained", start.to_pydatetime(), False)
rows = ts[ts["label"] == 1]
enc = Encoder.fit(ts, manifest["n_interests"], history_length=cfg.transform.history_length,
                  top_interests=cfg.transform.top_interests, extra_pin_ids=table.pin_ids, user_ids=table.user_ids,
                  pin_interest=ts.drop_duplicates("pin_id").set_index("pin_id")["interest_id"])
for bb in ("mlp", "masknet", "dhen"):
    tc = dataclasses.replace(cfg.train, backbone=bb)
    model = build_model(enc, tc, table.aligned(enc.pin_ids, enc.user_ids)).eval()
    print(bb, json.dumps({k: round(v, 3) for k, v in user_tower_cost(model, enc, rows, n=300).items()}), flush=True)
