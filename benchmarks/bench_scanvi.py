"""Label transfer with scArches + scANVI on real data: pyro-scvi vs scvi-tools, same pipeline.

Each split divides a labelled data set by donor / protocol (``obs["batch"]``) into a reference and
a held-out query. Both packages then run, through their public APIs and with the same settings::

    settings.seed = seed                                           # pyro_scvi.settings / scvi.settings
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
    vae = SCVI(ref, n_layers=2, encode_covariates=True, deeply_inject_covariates=False,
               use_layer_norm="both", use_batch_norm="none")
    vae.train(max_epochs=E_scvi, batch_size=128)                                   # stage "scVI"
    lvae = SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    lvae.train(max_epochs=E_scanvi, n_samples_per_label=100, batch_size=128)      # stage "scANVI"
    SCANVI.prepare_query_anndata(query, lvae)
    q = SCANVI.load_query_data(query, lvae)
    q.train(max_epochs=E_query, plan_kwargs={"weight_decay": 0.0},
            check_val_every_n_epoch=10, batch_size=128)                           # stage "query"
    predicted = q.predict()                                                       # stage "predict"

Every reference cell is labelled; every query cell has ``labels == "Unknown"`` (its true label is
kept by the parent only). The parent scores ``predicted`` against the true query labels: accuracy and
macro F1 (``sklearn.metrics.f1_score(average="macro")`` over the labels that occur in the truth or
the predictions). Genes: the top 2000 by variance of log1p(10^4 x counts / library size) computed on
the **reference cells only** in the parent (numpy), given to both children as a gene list (a data
set with fewer genes keeps them all); cells with no counts in those genes are dropped.

Each (split, tool, seed) runs in its own child process (pyro-scvi: the Python running this script;
scvi-tools: ``--scvi-python``), with ``torch.set_num_threads(--threads)`` and the same
``OMP_NUM_THREADS``; the child times each stage with ``time.perf_counter`` and returns its
predictions as JSON. The order of the two tools alternates from seed to seed. Per split the parent
prints mean and 95% t interval over seeds for each tool, the paired difference ours - theirs with its
t interval, and per stage the time ratio ours / theirs.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_scanvi.py                          # all splits, seeds 0,1,2
    .venv/bin/python benchmarks/bench_scanvi.py --splits cellbench_3cl --seeds 0 --epochs 5,2,5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # helpers shared with the other benchmarks (stdlib-only at import)
from bench_cellbench import DEFAULT_SCVI_PYTHON, REPO, SIDES, cpu_busy_s, scvi_available  # noqa: E402
from bench_real import cpu_details, machine_line  # noqa: E402

DATA_DIR = REPO.parent / "shared" / "data"
UNLABELED = "Unknown"
LABELS = "labels"  # the obs column the models see (reference: true labels; query: UNLABELED)
N_GENES = 2000
BATCH_SIZE = 128
#: scvi-tools' scArches tutorial architecture (the HLCA reference model uses the same)
ARCHES = dict(n_layers=2, encode_covariates=True, deeply_inject_covariates=False, use_layer_norm="both",
              use_batch_norm="none")
#: split name -> (file, labels column, query batches; the other batches are the reference)
SPLITS = {
    "cellbench_3cl": ("cellbench_3cl.h5ad", "cell_line", ["Drop-seq"]),
    "baron_pancreas_human": ("baron_pancreas_human.h5ad", "cell_type", ["human4"]),
    "kang_ctrl_pbmc": ("kang_ctrl_pbmc.h5ad", "cell_type", ["101", "107"]),
}
STAGES = ("scvi", "scanvi", "query", "predict")
STAGE_NAMES = {"scvi": "scVI train", "scanvi": "scANVI train", "query": "query train", "predict": "predict",
               "total": "whole pipeline"}
#: targets: accuracy and macro F1 at least theirs - 0.01; whole-pipeline time at most 0.6 x theirs
TARGET_QUALITY = -0.01
TARGET_TIME = 0.6


# ------------------------------------------------------------------------------------- the child
def worker(a: argparse.Namespace) -> None:
    """One tool, one seed: scVI -> scANVI -> query -> predict; writes timings and predictions."""
    t_import = time.perf_counter()
    import anndata as ad
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "pyro":
        sys.path.insert(0, str(REPO))  # this checkout's pyro_scvi, not an installed copy
        import pyro

        import pyro_scvi
        from pyro_scvi import SCANVI, SCVI, settings

        settings.seed = a.seed
        versions = {"pyro_scvi": pyro_scvi.__version__, "pyro": pyro.__version__,
                    "pyro_scvi_file": pyro_scvi.__file__}
    else:
        import scvi
        from scvi.model import SCANVI, SCVI

        scvi.settings.seed = a.seed
        versions = {"scvi_tools": scvi.__version__}
    versions.update(torch=torch.__version__, python=platform.python_version())
    res: dict = {"versions": versions, "threads": torch.get_num_threads(),
                 "import_s": time.perf_counter() - t_import}
    ref, query = ad.read_h5ad(a.ref), ad.read_h5ad(a.query)
    e_scvi, e_scanvi, e_query = a.epochs
    times = {}

    t0 = time.perf_counter()
    SCVI.setup_anndata(ref, batch_key="batch", labels_key=LABELS)
    vae = SCVI(ref, **ARCHES)
    vae.train(max_epochs=e_scvi, batch_size=BATCH_SIZE, enable_progress_bar=False)
    times["scvi"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lvae = SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    lvae.train(max_epochs=e_scanvi, n_samples_per_label=100, batch_size=BATCH_SIZE, enable_progress_bar=False)
    times["scanvi"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    SCANVI.prepare_query_anndata(query, lvae)
    qvae = SCANVI.load_query_data(query, lvae)
    qvae.train(max_epochs=e_query, plan_kwargs={"weight_decay": 0.0}, check_val_every_n_epoch=10,
               batch_size=BATCH_SIZE, enable_progress_bar=False)
    times["query"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    predicted = qvae.predict()
    times["predict"] = time.perf_counter() - t0

    res["times"] = times
    res["predictions"] = [str(p) for p in predicted]
    res["query_obs_names"] = list(map(str, qvae.adata.obs_names))
    hist = getattr(lvae, "history", None) or {}
    res["scanvi_history_last"] = {k: float(v.iloc[-1, 0]) for k, v in hist.items() if len(v)}
    Path(a.worker_out).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------ the parent
def build_split(name: str, tmp: Path) -> dict:
    """Reference / query AnnData of one split written to ``tmp``; the query's true labels returned."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    fname, labels_key, query_batches = SPLITS[name]
    adata = ad.read_h5ad(DATA_DIR / fname)
    batch = adata.obs["batch"].astype(str).to_numpy()
    unknown = sorted(set(query_batches) - set(batch))
    if unknown:
        raise SystemExit(f"{name}: query batches {unknown} not in {fname} (batches: {sorted(set(batch))})")
    is_query = np.isin(batch, query_batches)
    X = adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X
    # gene selection on the reference cells only: variance of log1p(1e4 * x / library size)
    ref_x = X[~is_query].astype(np.float64)
    lib = np.asarray(ref_x.sum(1)).ravel()
    lib[lib == 0] = 1.0
    norm = ref_x.multiply(1e4 / lib[:, None]).tocsr()
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    genes = np.sort(np.argsort(-var, kind="stable")[:N_GENES])
    X = X[:, genes]
    counts = np.asarray(X.sum(1)).ravel()
    keep = counts > 0
    out = {"name": name, "file": fname, "labels_key": labels_key, "n_genes": len(genes),
           "n_genes_file": adata.n_vars, "dropped_empty_cells": int((~keep).sum())}
    for part, mask in (("ref", ~is_query & keep), ("query", is_query & keep)):
        obs = pd.DataFrame({"batch": pd.Categorical(batch[mask])}, index=adata.obs_names[mask].astype(str))
        truth = adata.obs[labels_key].astype(str).to_numpy()[mask]
        obs[LABELS] = pd.Categorical(truth if part == "ref" else np.full(mask.sum(), UNLABELED))
        sub = ad.AnnData(X[mask].astype(np.float32), obs=obs,
                         var=pd.DataFrame(index=adata.var_names[genes].astype(str)))
        path = tmp / f"{name}_{part}.h5ad"
        sub.write_h5ad(path)
        out[part] = {"path": str(path), "n_cells": int(mask.sum()),
                     "batches": {str(k): int(v) for k, v in pd.Series(batch[mask]).value_counts().items()},
                     "labels": {str(k): int(v) for k, v in pd.Series(truth).value_counts().items()}}
        if part == "query":
            out["query_truth"] = dict(zip(obs.index, truth))
    return out


def run_child(tool: str, python: str, split: dict, seed: int, a: argparse.Namespace, tmp: Path) -> dict:
    res_path = tmp / f"{split['name']}_{tool}_{seed}.json"
    log = tmp / f"{split['name']}_{tool}_{seed}.log"
    cmd = [python, str(Path(__file__).resolve()), "--worker", tool, "--worker-out", str(res_path),
           "--ref", split["ref"]["path"], "--query", split["query"]["path"], "--seed", str(seed),
           "--threads", str(a.threads), "--epochs", ",".join(map(str, a.epochs))]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads))
    print(f"[{datetime.now():%H:%M:%S}] {split['name']} seed {seed} {SIDES[tool]} ...", flush=True)
    busy0, t0 = cpu_busy_s(), time.perf_counter()
    with open(log, "w") as logf:
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not res_path.exists():
        raise RuntimeError(f"{SIDES[tool]} child failed (exit {code}); log tail:\n{log.read_text()[-4000:]}")
    res = json.loads(res_path.read_text())
    res["child_wall_s"] = wall
    res["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    busy1 = cpu_busy_s()
    # CPU time other processes took while the child ran (> 10% of its wall time: timing unreliable)
    res["other_procs_cpu_s"] = None if busy0 is None else max(0.0, busy1 - busy0 - res["child_cpu_s"])
    res["times"]["total"] = sum(res["times"][s] for s in STAGES)
    truth = split["query_truth"]
    names = res["query_obs_names"]
    missing = set(truth) - set(names)
    if missing:
        raise RuntimeError(f"{SIDES[tool]} predicted {len(names)} query cells; {len(missing)} are missing")
    y_true = [truth[n] for n in names]
    res.update(score(y_true, res["predictions"]))
    busy = res["other_procs_cpu_s"] or 0.0
    flag = "  (other processes competed: timing unreliable)" if busy > 0.1 * wall else ""
    print("    " + ", ".join(f"{s} {res['times'][s]:.1f} s" for s in (*STAGES, "total"))
          + f"; accuracy {res['accuracy']:.4f}, macro F1 {res['macro_f1']:.4f}; "
          f"other processes {busy:.1f} CPU s{flag}", flush=True)
    return res


def score(y_true: list[str], y_pred: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval (nan half-width with one value)."""
    from scipy import stats

    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def fmt_ci(xs: list[float], digits: int) -> str:
    m, lo, hi = t_interval(xs)
    if math.isnan(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def split_report(split: dict, runs: dict[str, list[dict]], seeds: list[int], a: argparse.Namespace) -> dict:
    """Print the tables of one split; return its summary."""
    ours, theirs = runs["pyro"], runs.get("scvi", [])
    ref, query = split["ref"], split["query"]
    print(f"\n### {split['name']}: reference {ref['n_cells']} cells ({', '.join(ref['batches'])}) -> query "
          f"{query['n_cells']} cells ({', '.join(query['batches'])}); {split['n_genes']} genes; "
          f"{len(ref['labels'])} reference labels, {len(query['labels'])} query labels; seeds "
          f"{','.join(map(str, seeds))}; epochs scVI/scANVI/query {'/'.join(map(str, a.epochs))}\n")
    summary: dict = {"split": split["name"]}
    if not theirs:
        print("| metric | pyro-scvi |\n|---|---|")
        for key in ("accuracy", "macro_f1"):
            print(f"| {key} | {fmt_ci([r[key] for r in ours], 4)} |")
        for s in (*STAGES, "total"):
            print(f"| {STAGE_NAMES[s]} (s) | {fmt_ci([r['times'][s] for r in ours], 1)} |")
        return summary
    print("| metric | pyro-scvi | scvi-tools | ours - theirs (paired) |")
    print("|---|---|---|---|")
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        o, t = [r[key] for r in ours], [r[key] for r in theirs]
        d = [x - y for x, y in zip(o, t)]
        summary[key] = {"ours": t_interval(o), "theirs": t_interval(t), "diff": t_interval(d),
                        "ours_runs": o, "theirs_runs": t}
        print(f"| {label} | {fmt_ci(o, 4)} | {fmt_ci(t, 4)} | {fmt_ci(d, 4)} |")
    print("\n| wall time (s) | pyro-scvi | scvi-tools | ratio ours/theirs (of means) | per-seed ratio |")
    print("|---|---|---|---|---|")
    summary["times"] = {}
    for s in (*STAGES, "total"):
        o, t = [r["times"][s] for r in ours], [r["times"][s] for r in theirs]
        ratio = (sum(o) / len(o)) / (sum(t) / len(t))
        per_seed = [x / y for x, y in zip(o, t)]
        summary["times"][s] = {"ours": t_interval(o), "theirs": t_interval(t), "ratio_of_means": ratio,
                               "per_seed_ratio": t_interval(per_seed)}
        print(f"| {STAGE_NAMES[s]} | {fmt_ci(o, 1)} | {fmt_ci(t, 1)} | {ratio:.2f} | {fmt_ci(per_seed, 2)} |")
    busy = [(SIDES[r["tool"]], r["seed"]) for r in ours + theirs
            if (r["other_procs_cpu_s"] or 0) > 0.1 * r["child_wall_s"]]
    if busy:
        print(f"\nruns where other processes took > 10% of a core meanwhile (timing less reliable): {busy}")
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--splits", default=",".join(SPLITS), help=f"comma-separated, from {list(SPLITS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", default="100,20,100", help="scVI, scANVI and query epochs")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and OMP_NUM_THREADS), both sides")
    p.add_argument("--out", help="JSON results (default benchmarks/results/bench_scanvi.json)")
    p.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON, help="Python with scvi-tools installed")
    p.add_argument("--skip-peer", action="store_true", help="run pyro-scvi only")
    p.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.epochs = [int(e) for e in a.epochs.split(",")]
    if len(a.epochs) != 3:
        p.error("--epochs takes three numbers: scVI,scANVI,query")
    if a.worker:
        worker(a)
        return
    parent(a, argv)


def parent(a: argparse.Namespace, argv) -> None:
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    splits = [s.strip() for s in a.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise SystemExit(f"unknown split(s) {bad}; choose from {list(SPLITS)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    if not DATA_DIR.is_dir():
        print(f"{DATA_DIR} is missing: this benchmark needs the real data sets; nothing to do.")
        return
    ok, why = (False, "--skip-peer") if a.skip_peer else scvi_available(a.scvi_python)
    if not ok and not a.skip_peer:
        print(f"scvi-tools is not usable ({why}): there is nothing to compare with; nothing to do. "
              "(--skip-peer runs pyro-scvi alone.)")
        return
    tools = ["pyro", "scvi"] if ok else ["pyro"]
    import pyro
    import torch

    sys.path.insert(0, str(REPO))
    import pyro_scvi

    m = cpu_details()
    print(f"Command: {command}")
    print(machine_line(m))
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, pyro-scvi {pyro_scvi.__version__} "
          f"({Path(pyro_scvi.__file__).parent}), scvi-tools {why if ok else 'not run'}; "
          f"threads {a.threads} (torch.set_num_threads and OMP_NUM_THREADS, both sides); "
          f"python {platform.python_version()}")
    print(f"Settings: SCVI({', '.join(f'{k}={v!r}' for k, v in ARCHES.items())}); batch size {BATCH_SIZE}; "
          f"epochs scVI/scANVI/query {'/'.join(map(str, a.epochs))}; scANVI n_samples_per_label=100; "
          "query plan_kwargs weight_decay=0, check_val_every_n_epoch=10; all reference cells labelled, "
          f"query labels {UNLABELED!r}; top {N_GENES} genes by variance of log1p(CP10k) on the reference")
    out_path = Path(a.out) if a.out else HERE / "results" / "bench_scanvi.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "machine": m, "threads": a.threads, "epochs": a.epochs, "seeds": seeds,
              "settings": {"arches": ARCHES, "batch_size": BATCH_SIZE, "n_genes": N_GENES},
              "versions": {"torch": torch.__version__, "pyro": pyro.__version__,
                           "pyro_scvi": pyro_scvi.__version__, "scvi_tools": why if ok else None},
              "splits": {}}
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench_scanvi_") as tmpdir:
        tmp = Path(tmpdir)
        for name in splits:
            split = build_split(name, tmp)
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            for i, seed in enumerate(seeds):
                for tool in (tools if i % 2 == 0 else tools[::-1]):  # alternate the order per seed
                    python = sys.executable if tool == "pyro" else a.scvi_python
                    r = run_child(tool, python, split, seed, a, tmp)
                    r.update(tool=tool, seed=seed)
                    runs[tool].append(r)
            summary = split_report(split, runs, seeds, a)
            summaries.append(summary)
            info = {k: v for k, v in split.items() if k != "query_truth"}
            result["splits"][name] = {"split": info, "summary": summary, "runs": runs}
            out_path.write_text(json.dumps(result, indent=1))
    if len(tools) == 2:
        print_summary(summaries, result)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out_path}")


def print_summary(summaries: list[dict], result: dict) -> None:
    print("\n### Summary (ours - theirs: mean [95% t interval] over seeds; time: ratio of mean wall times)\n")
    print("| split | accuracy diff | macro F1 diff | time ratio (whole) | scVI | scANVI | query | predict "
          "| targets met |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_met = True
    for s in summaries:
        acc, f1, t = s["accuracy"]["diff"], s["macro_f1"]["diff"], s["times"]
        met = (acc[0] >= TARGET_QUALITY and f1[0] >= TARGET_QUALITY
               and t["total"]["ratio_of_means"] <= TARGET_TIME)
        all_met &= met
        s["targets_met"] = met

        def ci(x):
            return f"{x[0]:+.4f} [{x[1]:+.4f}, {x[2]:+.4f}]" if not math.isnan(x[1]) else f"{x[0]:+.4f}"
        print(f"| {s['split']} | {ci(acc)} | {ci(f1)} | {t['total']['ratio_of_means']:.2f} | "
              + " | ".join(f"{t[st]['ratio_of_means']:.2f}" for st in STAGES)
              + f" | {'yes' if met else 'no'} |")
    print(f"\nTargets (mean accuracy and macro F1 diff >= {TARGET_QUALITY}, whole-pipeline time ratio <= "
          f"{TARGET_TIME}): {'met on every split' if all_met else 'NOT met on every split'}")
    result["all_targets_met"] = all_met


if __name__ == "__main__":
    main()
