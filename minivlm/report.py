"""A self-contained HTML report: what a person would rather look at than read.

Pictures are written beside the report and linked by relative path, so the folder can be zipped and
opened anywhere. Nothing here knows about tasks; the demo decides what goes in.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Sequence

from minivlm.io import write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 280px; font-size: 0.9em; }
.card img { width: 100%; border-radius: 4px; }
.strip { display: flex; gap: 6px; align-items: flex-start; margin: 6px 0 14px; }
.strip img { height: 110px; border-radius: 4px; border: 3px solid transparent; }
.strip img.hit { border-color: #2a2; }
.ok { color: #2a2; font-weight: 600; } .bad { color: #c22; font-weight: 600; }
.muted { color: #777; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.3f}</td>' if abs(value) < 100 else f'<td class="num">{value:.1f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if value is None:
        return '<td class="muted">-</td>'
    return f"<td>{value}</td>"  # callers pass pre-escaped HTML for rich cells


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(nothing)</p>'
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def card(image: str, lines: Iterable[str]) -> str:
    """An image with a few lines of (already escaped) HTML under it."""
    return f'<div class="card"><img src="{esc(image)}" loading="lazy">' + "".join(f"<div>{l}</div>" for l in lines) + "</div>"


def grid(cards: Iterable[str]) -> str:
    return '<div class="grid">' + "".join(cards) + "</div>"


def strip(images: Iterable[tuple[str, bool]], label: str = "") -> str:
    imgs = "".join(f'<img src="{esc(p)}" class="{"hit" if hit else ""}">' for p, hit in images)
    return f"<div>{label}</div><div class=\"strip\">{imgs}</div>"


class Report:
    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.parts: list[str] = []

    def section(self, title: str, *blocks: str, note: str = "") -> "Report":
        self.parts.append(f"<h2>{esc(title)}</h2>" + (f'<p class="muted">{esc(note)}</p>' if note else "") + "".join(blocks))
        return self

    def html(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{esc(self.title)}</h1>"
                f"<p class='muted'>{esc(self.subtitle)}</p>{''.join(self.parts)}</body></html>")

    def write(self, path: str | Path) -> Path:
        write_text(path, self.html())
        return Path(path)


def plot_curves(losses: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "",
                metrics: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """Training curves as a PNG: losses on the left, accuracies (0..1 or %) on the right if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", losses)] + ([("accuracy", metrics)] if metrics else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), dpi=110, squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for name, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=name, linewidth=1.4, marker="." if len(xs) < 12 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
