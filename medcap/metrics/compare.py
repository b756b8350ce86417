"""Side-by-side comparison of several runs' ``metrics.json``: a text table and a grouped bar chart (PNG)."""

import csv
import json
import math
import os
from pathlib import Path

from medcap.atomic import replaced_atomically


def run_names(files: list[str | Path]) -> list[str]:
    """A name for each file: its folder's name; where two share it, as many trailing folders as set each apart
    ("seed0/eval"), or, for two files in one folder, folder and file stem ("run/a"); a name still taken (the same
    file given twice) gets " (2)"."""
    labels = []
    for f in map(Path, files):
        f = Path(os.path.abspath(f))
        parts = f.parent.parts[1:] or (f.parent.anchor,)
        labels.append([parts[-d:] for d in range(1, len(parts) + 1)] + [(parts[-1], f.stem)])
    names, seen = [], {}
    for i, candidates in enumerate(labels):
        # the first depth at which no other file has the same label
        label = next((label for depth, label in enumerate(candidates)
                      if all(depth >= len(other) or other[depth] != label for j, other in enumerate(labels) if j != i)),
                     candidates[-1])
        name = "/".join(label)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def load_runs(paths: list[str | Path]) -> dict[str, dict[str, float]]:
    """{run name: metrics} from run directories (holding ``metrics.json``) or ``metrics.json`` files; runs are
    named by ``run_names``."""
    files = metrics_files(paths)
    runs = {}
    for name, file in zip(run_names(files), files):
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(values, dict):
                raise TypeError(f"found a JSON {type(values).__name__}")
            runs[name] = {k: float(v) for k, v in values.items()}
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{file}: not a metrics.json of {{metric: number}} ({e})") from None
    return runs


def metrics_files(paths: list[str | Path]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        file = p / "metrics.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"{p}: no metrics.json (run `medcap run evaluate` first)")
        files.append(file)
    return files


def sample_warning(paths: list[str | Path]) -> str | None:
    """A warning when the runs were scored on different samples (the IDs of the ``per_sample.csv`` beside each
    ``metrics.json``), or when a run has no ``per_sample.csv`` to tell; None when every run scored the same ones."""
    files = metrics_files(paths)
    ids, unknown = {}, []
    for name, file in zip(run_names(files), files):
        per_sample = file.with_name("per_sample.csv")
        if not per_sample.is_file():
            unknown.append(name)
            continue
        with per_sample.open(newline="", encoding="utf-8") as f:
            ids[name] = frozenset(row[0] for row in list(csv.reader(f))[1:] if row)
    if unknown:
        return f"warning: not checked that the runs scored the same samples: no per_sample.csv beside {unknown}"
    if len(set(ids.values())) > 1:
        first = next(iter(ids.values()))
        shown = ", ".join(f"{name} {len(v)} samples" + ("" if v == first else f" ({len(v - first)} not in the first)")
                          for name, v in ids.items())
        return f"warning: the runs were scored on different samples ({shown}): their scores do not compare"
    return None


def plot_runs(runs: dict[str, dict[str, float]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(m for values in runs.values() for m in values))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(metrics) + 2), 4))
    for i, (name, values) in enumerate(runs.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, [values.get(m, math.nan) for m in metrics], width, label=name)  # a missing metric: no bar
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path
