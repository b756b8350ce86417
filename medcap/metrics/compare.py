"""Side-by-side comparison of several runs' ``metrics.json``: a text table and a grouped bar chart (PNG)."""

import json
from pathlib import Path


def load_runs(paths: list[str | Path]) -> dict[str, dict[str, float]]:
    """{run name: metrics} from run directories (holding ``metrics.json``) or ``metrics.json`` files; a run is
    named by its directory, made unique with its parent's name where two share one."""
    files = []
    for p in map(Path, paths):
        file = p / "metrics.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"{p}: no metrics.json (run `medcap run evaluate` first)")
        files.append(file)
    names = [f.parent.name or str(f) for f in files]
    names = [f"{f.parent.parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(files, names)]
    runs = {}
    for name, file in zip(names, files):
        try:
            runs[name] = {k: float(v) for k, v in json.loads(file.read_text(encoding="utf-8")).items()}
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{file}: not a metrics.json of {{metric: number}} ({e})") from None
    return runs


def plot_runs(runs: dict[str, dict[str, float]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(m for values in runs.values() for m in values))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(metrics) + 2), 4))
    for i, (name, values) in enumerate(runs.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, [values.get(m, 0.0) for m in metrics], width, label=name)
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
