"""What every result carries (machine, versions, settings), the Markdown tables, the JSON file and the plots."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

JSON_KEYS = ("mode", "date", "command", "machine", "versions", "settings", "results", "notes")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_gb() -> float | None:
    """Physical memory in GiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU (name, memory) if one is used, RAM, load average now."""
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_gb": props.total_memory / 2**30}
    return dict(
        cpu=cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), gpu=gpu, ram_gb=ram_gb(),
        platform=platform.platform(), load_average=list(os.getloadavg()),
    )  # fmt: skip


def versions() -> dict[str, str]:
    """Versions of python, torch (and CUDA), diffusers, lightning, transformers."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("diffusers", "lightning", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def payload(
    mode: str, argv: list[str], device: torch.device, settings: dict[str, Any], results: Any, notes: list[str]
) -> dict:
    """The JSON document of one run (keys: `JSON_KEYS`); the load average is taken at the start and the end."""
    return dict(
        mode=mode, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(["python -m experiments.benchmark", *argv]), machine=machine(device),
        versions=versions(), settings=settings, results=results, notes=notes,
    )  # fmt: skip


def _ms(stats: dict[str, float] | None) -> str:
    return "–" if not stats else f"{stats['median']:.1f} ±{100 * stats['spread'] / 2:.0f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def train_table(rows: list[dict[str, Any]]) -> str:
    impls = list(rows[0]["impls"]) if rows else []
    head = ["objective", "checkpointing", "precision", "channels_last", "contiguous GN"]
    head += [f"{i} ms/step" for i in impls] + [f"{i} samples/s" for i in impls] + [f"{i} peak MB" for i in impls]
    head += ["ours / bare (time)", "ours vs reference (speed-up)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * (len(head) - 5)]
    for r in rows:
        cells = [r["objective"], "on" if r["checkpointing"] else "off", r["precision"]]
        cells.append("on" if r.get("channels_last") else "off")
        cells.append("on" if r.get("contiguous_group_norm", False) else "off")
        cells += [_ms(r["impls"][i]["ms_per_step"]) for i in impls]
        cells += [_num(r["impls"][i]["samples_per_s"]) for i in impls]
        cells += [_num(r["impls"][i].get("peak_mb"), 0) for i in impls]
        cells += [_num(r["time_vs_bare"], 3), _num(r["speedup_vs_reference"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predict_table(results: dict[str, Any]) -> str:
    lines = [
        "| precision | size | steps x members | UNet calls | ours ms/image | floor ms/image (interleaved) "
        "| floor alone | ours / floor | of ours: ensembling ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['precision']} | {r['height']}x{r['width']} | {r['steps']} x {r['members']} | {r['unet_calls']} "
            f"| {_ms(r['ours_ms'])} | {_ms(r['floor_ms'])} | {_ms(r['floor_alone_ms'])} | {r['ours_vs_floor']:.3f} "
            f"| {_ms(r.get('ensemble_ms'))} |"
        )
    if results["infer"]:
        lines += [
            "",
            "| precision | infer folder | images/s | without model load | floor images/s | infer / floor "
            "| without load |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["infer"]:
            lines.append(
                f"| {r['precision']} | {r['images']} PNGs {r['height']}x{r['width']} | {r['images_per_s']:.2f} "
                f"| {_num(r['images_per_s_without_load'])} | {r['floor_images_per_s']:.2f} | {r['vs_floor']:.3f} "
                f"| {_num(r['vs_floor_without_load'], 3)} |"
            )
    for key, label in (("sweep_size", "size"), ("sweep_members", "members")):
        if results[key]:
            lines += ["", f"| {label} | ours ms/image | floor ms/image | ours / floor |", "|---|---:|---:|---:|"]
            for r in results[key]:
                name = f"{r['height']}x{r['width']}" if key == "sweep_size" else str(r["members"])
                lines.append(f"| {name} | {_ms(r['ours_ms'])} | {_ms(r['floor_ms'])} | {r['ours_vs_floor']:.3f} |")
    return "\n".join(lines)


def data_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | normals decoded | workers | samples/s | samples/s per worker | >= 30 per worker (480x640) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        meets = {None: "–", True: "yes", False: "**no**"}[r["meets_target"]]
        lines.append(
            f"| {r['height']}x{r['width']} | {'yes' if r.get('decode_normals', True) else 'no'} | {r['workers']} "
            f"| {_ms(r['samples_per_s'])} "
            f"| {r['samples_per_s_per_worker']['median']:.1f} | {meets} |"
        )
    return "\n".join(lines)


TABLES = {"train": train_table, "predict": predict_table, "data": data_table}


def markdown(doc: dict[str, Any]) -> str:
    """The run as Markdown: table, then command, date, machine, versions and notes."""
    m, v = doc["machine"], doc["versions"]
    gpu = f"{m['gpu']['name']} ({m['gpu']['memory_gb']:.0f} GiB)" if m["gpu"] else "none"
    load = doc.get("load_average_end", m["load_average"])
    lines = [
        TABLES[doc["mode"]](doc["results"]),
        "",
        f"`{doc['command']}`, {doc['date']}; {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"GPU {gpu}, RAM {_num(m['ram_gb'], 0)} GiB; load average {m['load_average'][0]:.2f} at the start, "
        f"{load[0]:.2f} at the end; python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
        f"lightning {v['lightning']}. Times: median over rounds ±half the spread (max - min).",
    ]
    lines += [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """`<out>.json` and `<out>.md`; returns both paths."""
    doc["load_average_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown(doc))
    return json_path, md_path


def plot_predict(results: dict[str, Any], folder: Path, title: str) -> list[Path]:
    """benchmark_predict_size.png (ms/image against the long edge) and benchmark_predict_ensemble.png (against
    the ensemble size), ours against the floor; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, name, x_key, xlabel in (
        ("sweep_size", "benchmark_predict_size.png", "long_edge", "image long edge (px, aspect 4:3, 1 step)"),
        ("sweep_members", "benchmark_predict_ensemble.png", "members", "ensemble size K (1 step each)"),
    ):
        rows = results[key]
        if not rows:
            continue
        x = [r[x_key] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for label, column, style in (("ours: predictor.predict", "ours_ms", "o-"), ("floor", "floor_ms", "s--")):
            ax.plot(x, [r[column]["median"] for r in rows], style, label=label)
        for xi, r in zip(x, rows):
            ax.annotate(f"{r['ours_vs_floor']:.2f}x", (xi, r["ours_ms"]["median"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per image (median)")
        ax.set_xticks(x)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(folder / name)
    return written


def headlines(doc: dict[str, Any]) -> list[str]:
    """The numbers issue 11 asks for, one line each, from a run's JSON document."""
    s, where = doc["settings"], (doc["machine"]["gpu"] or {}).get("name") or doc["machine"]["cpu"]
    lines = []
    if doc["mode"] == "train":
        for r in doc["results"]:
            ours = r["impls"].get("lightning") or next(iter(r["impls"].values()))
            fits = {True: ", fits 24 GB", False: ", does NOT fit 24 GB"}.get(ours.get("fits_24gb"), "")
            lines.append(
                f"train {s['arch']} {r['objective']} ckpt {'on' if r['checkpointing'] else 'off'} {r['precision']} "
                f"{s['height']}x{s['width']} batch {s['batch']} on {where}: ours {ours['ms_per_step']['median']:.1f} "
                f"ms/step ({ours['samples_per_s']:.2f} samples/s), peak {_num(ours.get('peak_mb'), 0)} MB{fits}; "
                f"ours / bare {_num(r['time_vs_bare'], 3)} (target <= 1.05), speed-up vs reference "
                f"{_num(r['speedup_vs_reference'])} (target >= 1.5)"
            )
    elif doc["mode"] == "predict":
        for r in doc["results"]["rows"]:
            ms = r["ours_ms"]["median"]
            lines.append(
                f"predict {s['arch']} {r['height']}x{r['width']} {r['precision']} {r['steps']} step(s) x "
                f"{r['members']} on {where}: ours {ms:.1f} ms/image ({1000 / ms:.2f} images/s), floor "
                f"{r['floor_ms']['median']:.1f} ms, ours / floor {r['ours_vs_floor']:.3f}"
                + (" (target <= 1.05)" if r["steps"] == r["members"] == 1 else "")
            )
        for r in doc["results"]["infer"]:
            lines.append(
                f"infer {s['arch']} {r['images']} PNGs {r['height']}x{r['width']} {r['precision']}: "
                f"{r['images_per_s']:.2f} images/s ({_num(r['images_per_s_without_load'])} without the model load), "
                f"floor {r['floor_images_per_s']:.2f}: {r['vs_floor']:.3f} of the floor (target >= 0.9)"
            )
    else:
        for r in doc["results"]:
            lines.append(
                f"data {r['height']}x{r['width']} normals {'on' if r.get('decode_normals', True) else 'off'} "
                f"workers {r['workers']}: {r['samples_per_s']['median']:.1f} "
                f"samples/s, {r['samples_per_s_per_worker']['median']:.1f} per worker (target >= 30 at 480x640)"
            )
    return lines


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        for line in headlines(json.loads(Path(name).read_text())):
            print(line)
