"""Charts for runs, sweeps and schedules (altair), and saving them offline (vl-convert).

Every chart function takes whatever frame it is given and thins or aggregates it to stay under
altair's 5,000-row limit, so it never raises `MaxRowsError`; for big tables prefer the store's
SQL downsampling (`Store.metrics(max_points=...)`), which is faster and averages instead of dropping.
Importing this module registers and enables the one `labkit` theme.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from labkit.config import RunConfig

MAX_ROWS = 5000  # altair's default limit
RUN_COLUMNS = ("run_id", "run", "name")  # what identifies a run in frames from the store and widgets


@alt.theme.register("labkit", enable=True)
def theme() -> alt.theme.ThemeConfig:
    return {
        "width": 520,
        "height": 300,
        "config": {
            "font": "Helvetica, Arial, sans-serif",
            "view": {"stroke": None},
            "axis": {"labelFontSize": 11, "titleFontSize": 12, "gridColor": "#eeeeee", "domainColor": "#888888"},
            "legend": {"labelFontSize": 11, "titleFontSize": 12, "labelLimit": 220},
            "title": {"fontSize": 14, "anchor": "start"},
            "range": {"category": {"scheme": "tableau10"}, "ramp": {"scheme": "viridis"}},
            "line": {"strokeWidth": 1.6},
            "point": {"size": 60, "filled": True},
        },
    }


def field(name: str) -> str:
    """A column name as a Vega-Lite field: dots and brackets escaped (config columns have dots)."""
    return name.replace("\\", "\\\\").replace(".", "\\.").replace("[", "\\[").replace("]", "\\]")


def _type(s: pd.Series, max_ordinal: int = 12) -> str:
    """Nominal for labels, ordinal for a few numbers (a sweep's learning rates), quantitative otherwise."""
    if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
        return "nominal"
    return "ordinal" if s.nunique() <= max_ordinal else "quantitative"


def thin(df: pd.DataFrame, x: str, group: str | None, max_rows: int = MAX_ROWS) -> pd.DataFrame:
    """At most `max_rows` rows: each group's rows averaged into equal-width buckets of `x`."""
    if len(df) <= max_rows:
        return df
    keys = [group] if group else []
    if group and df[group].nunique() * 2 > max_rows:
        keep = sorted(df[group].dropna().unique(), key=str)[: max_rows // 2]
        warnings.warn(f"{df[group].nunique()} lines are more than a chart can hold; showing the first "
                      f"{len(keep)}", stacklevel=3)
        df = df[df[group].isin(keep)]
    budget = max(2, max_rows // (df[group].nunique() if group else 1))
    pos = pd.to_numeric(df[x], errors="coerce") if x in df.columns else pd.Series(np.nan, index=df.index)
    if pos.isna().all():  # no numeric x: bucket by row position instead
        pos = (df.groupby(keys).cumcount() if keys else pd.Series(np.arange(len(df)), index=df.index)).astype(float)
    else:
        df, pos = df[pos.notna()], pos[pos.notna()]
    by = pos.groupby([df[k] for k in keys]) if keys else None
    lo = by.transform("min") if by is not None else pos.min()
    hi = by.transform("max") if by is not None else pos.max()
    bucket = ((pos - lo) / (hi - lo).replace(0, np.nan) * budget).fillna(0).clip(upper=budget - 1).astype(int)
    numeric = [c for c in df.columns if c not in keys and pd.api.types.is_numeric_dtype(df[c])]
    agg = {c: "mean" if c in numeric else "first" for c in df.columns if c not in keys}
    out = df.assign(_bucket=bucket.to_numpy()).groupby([*keys, "_bucket"], sort=True).agg(agg).reset_index()
    return out[list(df.columns)]


def _run_column(df: pd.DataFrame) -> str | None:
    return next((c for c in RUN_COLUMNS if c in df.columns), None)


def curves(df: pd.DataFrame, y: str = "loss", x: str = "step", color: str = "run_id",
           title: str | None = None, log_y: bool = False) -> alt.Chart:
    """One line per run (or per `color` value) of `y` against `x`: takes `Store.metrics(...)` frames.

    `color` may be any column, e.g. a config field added with `Store.metrics(color_by="learning_rate")`;
    lines of runs sharing a colour stay separate.
    """
    df = df if len(df) else pd.DataFrame({x: pd.Series(dtype=float), y: pd.Series(dtype=float),
                                          color: pd.Series(dtype=str)})
    run = _run_column(df)
    detail = run if run and run != color else None
    df = thin(df, x, detail or (color if color in df.columns else None))
    enc: dict[str, Any] = {
        "x": alt.X(field(x), type="quantitative", title=x),
        "y": alt.Y(field(y), type="quantitative", title=y,
                   scale=alt.Scale(type="log") if log_y else alt.Scale(zero=False)),
    }
    tooltip = [alt.Tooltip(field(x), title=x), alt.Tooltip(field(y), title=y, format=".4g")]
    if color in df.columns:
        many = df[color].nunique() > 30
        numeric = pd.api.types.is_numeric_dtype(df[color]) and not pd.api.types.is_bool_dtype(df[color])
        legend = alt.Legend(format=".3~g", formatType="number") if numeric else alt.Legend()
        enc["color"] = alt.Color(field(color), type=_type(df[color]), title=color, legend=None if many else legend)
        tooltip.insert(0, alt.Tooltip(field(color), title=color))
    if detail:
        enc["detail"] = alt.Detail(field(detail), type="nominal")
        tooltip.insert(0, alt.Tooltip(field(detail), title=detail))
    chart = alt.Chart(df).mark_line().encode(**enc, tooltip=tooltip)
    return chart.properties(title=title) if title else chart


def early_scatter(df: pd.DataFrame, color: str = "early_score", x: str = "grad_norm_mean",
                  y: str = "loss_mean", title: str | None = None) -> alt.Chart:
    """Early grad norm against early loss per run (`Store.early_dynamics` rows), coloured by `color`.

    Merge `Store.final_scores(...)` in and pass `color="value"` to see whether the paper's rule holds:
    the best final runs should sit at low grad norm and high loss.
    """
    run = _run_column(df) or "run_id"
    if len(df) > MAX_ROWS:
        df = df.sample(MAX_ROWS, random_state=0)
    tooltip = [alt.Tooltip(field(c), title=c, format=".4g" if pd.api.types.is_float_dtype(df[c]) else "")
               for c in dict.fromkeys([run, x, y, color, "rank"]) if c in df.columns]
    enc: dict[str, Any] = {"x": alt.X(field(x), type="quantitative", title=x, scale=alt.Scale(zero=False)),
                           "y": alt.Y(field(y), type="quantitative", title=y, scale=alt.Scale(zero=False)),
                           "tooltip": tooltip}
    if color in df.columns:
        enc["color"] = alt.Color(field(color), type="quantitative" if pd.api.types.is_numeric_dtype(df[color])
                                 else "nominal", title=color, scale=alt.Scale(scheme="viridis")
                                 if pd.api.types.is_numeric_dtype(df[color]) else alt.Undefined)
    chart = alt.Chart(df).mark_point().encode(**enc)
    return chart.properties(title=title) if title else chart


def _cells(s: pd.Series, bins: int = 8) -> pd.Series:
    """A sweep axis as grid cells: its values when few, else bins (log-spaced for rates) named by midpoint."""
    if not pd.api.types.is_numeric_dtype(s) or s.nunique() <= 12:
        return s
    v = s.astype(float)
    log = bool((v > 0).all() and v.max() / v.min() > 10)
    t = np.log10(v) if log else v
    edges = np.linspace(t.min(), t.max(), bins + 1)
    mids = (edges[:-1] + edges[1:]) / 2
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    return pd.Series(10 ** mids[idx] if log else mids[idx], index=s.index)


def sweep_heatmap(df: pd.DataFrame, x: str = "effective_batch_size", y: str = "learning_rate",
                  value: str = "early_score", title: str | None = None, fmt: str = ".3g") -> alt.LayerChart:
    """Mean `value` per (`x`, `y`) cell of a sweep grid, with the number written in each cell.

    Axes with more than 12 distinct numbers (a random search) are binned, log-spaced for rates.
    """
    missing = [c for c in (x, y, value) if c not in df.columns]
    if missing:
        raise KeyError(f"sweep_heatmap: frame has no column(s) {missing}; it has {list(df.columns)}")
    grid = pd.DataFrame({x: _cells(df[x]), y: _cells(df[y]), value: pd.to_numeric(df[value], errors="coerce")})
    cells = grid.groupby([x, y])[value].agg(["mean", "size"]).reset_index()
    cells = cells.rename(columns={"mean": value, "size": "runs"})
    if len(cells) > MAX_ROWS:
        cells = cells.nlargest(MAX_ROWS, "runs")
    def axis(c: str) -> dict[str, Any]:
        numeric = pd.api.types.is_numeric_dtype(cells[c])
        order = sorted(cells[c].unique().tolist())
        return {"sort": order if c == x else order[::-1],
                "axis": alt.Axis(format=".3~g", formatType="number", labelAngle=0) if numeric else alt.Axis()}
    base = alt.Chart(cells).encode(
        x=alt.X(field(x), type="ordinal", title=x, **axis(x)),
        y=alt.Y(field(y), type="ordinal", title=y, **axis(y)),
    )
    rect = base.mark_rect().encode(
        color=alt.Color(field(value), type="quantitative", title=value, scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip(field(x), title=x), alt.Tooltip(field(y), title=y),
                 alt.Tooltip(field(value), title=value, format=fmt), alt.Tooltip("runs", title="runs")])
    # Dark text on the light (high) end of viridis, light text on the dark end.
    mid = float(cells[value].mean()) if cells[value].notna().any() else 0.0
    text = base.mark_text(fontSize=11).encode(
        text=alt.Text(field(value), type="quantitative", format=fmt),
        color=alt.condition(f"datum[{json.dumps(value)}] > {mid!r}", alt.value("black"), alt.value("white")))
    chart = alt.layer(rect, text)
    return chart.properties(title=title) if title else chart


def lr_schedule(cfg: RunConfig, total_steps: int | None = None, points: int = 1000) -> alt.Chart:
    """The learning rate the run will use at each optimizer step: `labkit.schedule.run_schedule`, the
    schedule the trainer runs (phases, epochs, a `max_steps` cut). `total_steps` previews one phase of
    that many steps instead (before the data is known)."""
    from labkit.schedule import RunSchedule, run_schedule, warmup_steps

    if total_steps is not None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        sched = RunSchedule(cfg.learning_rate, cfg.schedule, cfg.min_lr_ratio, (total_steps,),
                            (warmup_steps(cfg, total_steps),))
    else:
        sched = run_schedule(cfg)
    total = sched.total_steps
    if total < 1:
        raise ValueError("the run has no optimizer steps to preview")
    # Evenly spaced steps plus every phase's start, warmup corner and end, so a long run previews in a
    # few hundred points and still shows each corner.
    steps = set(np.linspace(0, total - 1, min(total, points)).round().astype(int).tolist())
    start = 0
    for n, warm in zip(sched.phase_steps, sched.warmup):
        steps |= {s for s in (start, start + warm - 1, start + warm, start + n - 1) if start <= s < start + n}
        start += n
    df = pd.DataFrame({"step": [s + 1 for s in sorted(steps)]})
    df["lr"] = [sched.lr(s - 1) for s in df["step"]]
    warm_txt = f", warmup {'/'.join(map(str, sched.warmup))}" if any(sched.warmup) else ""
    phases = f", {len(sched.phase_steps)} phases" if len(sched.phase_steps) > 1 else ""
    return alt.Chart(df).mark_line().encode(
        x=alt.X("step", type="quantitative", title="optimizer step"),
        y=alt.Y("lr", type="quantitative", title="learning rate", axis=alt.Axis(format=".1e")),
        tooltip=["step", alt.Tooltip("lr", format=".3e")],
    ).properties(title=f"{cfg.schedule} schedule, peak {cfg.learning_rate:g}, {total} steps{phases}{warm_txt}",
                 height=180)


def _vl_version() -> str:
    major, minor = alt.SCHEMA_VERSION.lstrip("v").split(".")[:2]
    return f"{major}.{minor}"


def save(chart: alt.TopLevelMixin, path: str | Path, scale: float = 2.0) -> Path:
    """Write `chart` as .png, .svg or a self-contained offline .html (scripts inlined), via vl-convert."""
    import vl_convert as vlc

    path = Path(path)
    spec = chart.to_dict()
    kind = path.suffix.lower()
    if kind == ".png":
        data: bytes | str = vlc.vegalite_to_png(spec, vl_version=_vl_version(), scale=scale)
    elif kind == ".svg":
        data = vlc.vegalite_to_svg(spec, vl_version=_vl_version())
    elif kind == ".html":
        data = vlc.vegalite_to_html(spec, vl_version=_vl_version(), bundle=True)
    else:
        raise ValueError(f"{path}: save as .png, .svg or .html, not {path.suffix or 'no extension'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)
    return path

