"""Round latency of a real deployment against simulation, for the same work.

Usage (needs ../shared/data; scenario overrides may follow)::

    FEDIMG_DATA=../shared/data python bench/deploy_latency.py [rounds=3]

The workload: EfficientNet-Lite0 fine-tuned (medical scenario settings, 64 px) on
bccd_cells blood-cell crops, 2 clients of 150 images each (135 train + 15 val).
It runs, side by side in one invocation:

1. **simulation**: ``python -m fedimg.simulate`` (Ray), an iid split of 300
   stratified training images into 2 clients;
2. **deployment** on localhost with the product's launchers: a SuperLink with TLS
   and node authentication, two ``fedimg-client`` daemons whose image folders hold
   the same 2 x 150 images (copied from the split the simulation used), three ways:
   - ``flower``: Flower's defaults, a new ClientApp process per message and one
     transfer object per array (``warm: false``, ``fl.pack_arrays=false``);
   - ``packed``: arrays packed into one buffer per message (``fedimg.transport.packing``);
   - ``warm``: packed, and one warm ClientApp process per site (``fedimg.deploy.warm``),
     the default.

It prints the mean round wall time of each (rounds 2..N: round 1 includes warm-up),
the client compute inside it (the slower client's ``train/seconds``), the ratios to
simulation, and what a fresh ClientApp process pays before it can train (imports;
data and model), measured in a separate process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedimg.resolve import compose_and_check  # noqa: E402
from fedimg.data import DATASETS, load_dataset, partition_dataset  # noqa: E402
from fedimg.deploy.certs import create_dev_pki  # noqa: E402
from fedimg.deploy.localhost import LocalFederation, free_port, site_yaml  # noqa: E402

WORK = ["data.dataset=bccd_cells", "clients=2", "data.partitioner=iid",
        "data.quantity_skew=0", "data.max_train_samples=300", "data.max_test_samples=100",
        "output.progress=false"]


def write_sites(root: Path, overrides: list[str]) -> list[Path]:
    """The simulation's two partitions, written out as two sites' image folders."""
    from PIL import Image

    cfg = compose_and_check("medical", [*WORK, *overrides, "data.image_size=64"])
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    parts = partition_dataset(dataset.train, cfg=cfg.data, num_clients=2, seed=cfg.seed)
    folders = []
    for part in parts:
        folder = root / f"site_{part.client_id}"
        for i in [*part.train_indices, *part.val_indices]:
            label = dataset.classes[int(dataset.train.labels[i])]
            (folder / label).mkdir(parents=True, exist_ok=True)
            pixels = dataset.train.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
        folders.append(folder)
    return folders


def round_stats(run_dir: Path) -> dict[str, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["round"] >= 2]
    compute = [max(c["train"]["train/seconds"] for c in r["clients"].values()) for r in later]
    return {"round_s": sum(r["wall_s"] for r in later) / len(later),
            "compute_s": sum(compute) / len(compute),
            "server_eval_s": sum(r.get("central_eval_s", 0.0) for r in later) / len(later),
            "mb_per_round": sum(r["bytes/down"] + r["bytes/up"] for r in later) / len(later) / 1e6}


def simulation(root: Path, overrides: list[str]) -> dict[str, float]:
    run_dir = root / "sim_run"
    subprocess.run([sys.executable, "-m", "fedimg.simulate", "scenario=medical", *WORK,
                    *overrides,
                    f"hydra.run.dir={run_dir}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return round_stats(run_dir)


def deployment(fed: LocalFederation, sites: list[Path], *, warm: bool, pack: bool,
               overrides: list[str]) -> dict[str, float]:
    names = [f"hospital_{'ab'[i]}" for i in range(len(sites))]
    for name, folder in zip(names, sites):
        site = site_yaml(fed.root / f"{name}.yaml", name=name, superlink=fed.address,
                         ca=fed.root / "pki" / "ca.crt",
                         key=fed.root / "pki" / "nodes" / f"{name}.key", data=folder,
                         classes=DATASETS.get("bccd_cells").classes, port=free_port(),
                         state_dir=fed.root / "state" / name, warm=warm)
        fed.daemon(name, site)
    try:
        proc, run_dir = fed.run(["scenario=medical", *WORK, *overrides, "fl.central_eval=true",
                                 f"data.root={os.environ.get('FEDIMG_DATA', '')}",
                                 f"fl.pack_arrays={str(pack).lower()}"])
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        stats = round_stats(run_dir)
        if warm:  # the warm executor logs each task's time: pull, ClientApp, push
            later = [float(t) for name in names  # per site: skip describe and round 1
                     for t in re.findall(r"task \d+ done in ([\d.]+)s",
                                         fed.output(name))[3:]]
            stats["task_s"] = sum(later) / max(1, len(later))
        return stats
    finally:
        for name in names:
            fed.stop(name)


def cold_start(site: Path) -> dict[str, float]:
    """What a fresh ClientApp process pays before training: imports, then data and model."""
    code = f"""
import time, json
t0 = time.perf_counter()
import torch, flwr.clientapp, fedimg.clientapp.app
from fedimg.resolve import compose_and_check
from fedimg.config import to_json
from fedimg.clientapp.environment import site_environment
from fedimg.clientapp.site import SiteOptions
t1 = time.perf_counter()
cfg = compose_and_check("medical", {json.dumps(WORK)})
env = site_environment(to_json(cfg), SiteOptions(data_path="{site}", num_threads=1))
env.client(0)
print(json.dumps({{"imports_s": t1 - t0, "data_and_model_s": time.perf_counter() - t1}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    overrides = argv or ["rounds=3"]
    root = Path(tempfile.mkdtemp(prefix="fedimg-deploy-bench-"))
    fed = LocalFederation(root)
    try:
        sites = write_sites(root / "data", overrides)
        create_dev_pki(root / "pki", nodes=["hospital_a", "hospital_b"])
        (root / "keys").mkdir()
        for name in ("hospital_a", "hospital_b"):
            shutil.copy(root / "pki" / "nodes" / f"{name}.pub", root / "keys")
        fed.superlink(pki=root / "pki", keys=root / "keys")
        results = {"simulation": simulation(root, overrides)}
        for label, warm, pack in (("flower", False, False), ("packed", False, True),
                                  ("warm", True, True)):
            results[label] = deployment(fed, sites, warm=warm, pack=pack, overrides=overrides)
        cold = cold_start(sites[0])
        report(results, cold)
    finally:
        fed.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict[str, dict[str, float]], cold: dict[str, float]) -> None:
    sim = results["simulation"]["round_s"]
    print(f"{'setup':<12}{'round s':>9}{'compute s':>11}{'server eval s':>15}"
          f"{'MB/round':>10}{'x sim':>8}")
    for label, r in results.items():
        print(f"{label:<12}{r['round_s']:>9.2f}{r['compute_s']:>11.2f}"
              f"{r['server_eval_s']:>15.2f}{r['mb_per_round']:>10.1f}{r['round_s'] / sim:>8.2f}")
    if "task_s" in results["warm"]:
        print(f"warm: one ClientApp task (pull from the SuperNode, run, push) takes "
              f"{results['warm']['task_s']:.2f} s on average (2 per site per round)")
    print(f"fresh ClientApp process before training: imports {cold['imports_s']:.2f} s, "
          f"site data + model {cold['data_and_model_s']:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
