"""Pictures of volumes: three-plane views, grids of centre cuts, loss curves and an interactive slice viewer.

Used by every notebook. The four static views, by what they draw:
`planes` (one volume: sagittal, coronal, axial), `planes_rows` (a row of three planes per volume),
`planes_columns` (a column of three planes per volume, groups side by side) and `cuts_grid` (one cut per
volume, in a grid).

Volumes are arrays indexed (x, y, z) in RAS order, as everywhere in the course. Slices are drawn in the
neurological convention: the subject's left on the picture's left, superior (or anterior, in axial cuts) at
the top.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

from alphagan.folders import atomic
from alphagan.progress import saved_run

PLANES = ("sagittal", "coronal", "axial")
_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def _as_array(volume) -> np.ndarray:
    """Accept numpy arrays, torch tensors and (1, X, Y, Z) channel-first volumes."""
    if hasattr(volume, "detach"):
        volume = volume.detach().float().cpu().numpy()
    volume = np.asarray(volume)
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    return volume


def plane_slice(volume, plane: str, index: int | None = None) -> np.ndarray:
    """The 2-D image of slice `index` (default: the centre) in `plane`, oriented for `imshow`.

    Rows run from superior (or anterior, for axial) at the top; columns from the subject's left or
    posterior at the left (neurological convention).
    """
    volume = _as_array(volume)
    axis = _AXIS[plane]
    index = volume.shape[axis] // 2 if index is None else int(index)
    if not 0 <= index < volume.shape[axis]:
        raise IndexError(f"{plane} slice {index} is outside 0..{volume.shape[axis] - 1}")
    image = np.take(volume, index, axis=axis)  # 2-D, the remaining axes in RAS order
    return np.flipud(image.T)  # second remaining axis (up) to rows, top row = highest coordinate


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Save `fig` to `path` atomically (`alphagan.folders.atomic`), cropped to what it draws, and close it."""
    import matplotlib.pyplot as plt

    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def planes(
    volume,
    title: str | None = None,
    slices: Sequence[int | None] = (None, None, None),
    cmap: str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    axes=None,
):
    """Sagittal, coronal and axial cuts side by side, each labelled with its slice number (the paper's style)."""
    import matplotlib.pyplot as plt

    volume = _as_array(volume)
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    else:
        fig = axes[0].figure
    vmin = float(volume.min()) if vmin is None else vmin
    vmax = float(volume.max()) if vmax is None else vmax
    for ax, plane, index in zip(axes, PLANES, slices):
        index = volume.shape[_AXIS[plane]] // 2 if index is None else index
        ax.imshow(plane_slice(volume, plane, index), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xlabel(f"{plane[:3].upper()} {index}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def cuts_grid(
    volumes,
    plane: str = "axial",
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    cmap: str = "gray",
    vmin: float | None = -1.0,
    vmax: float | None = 1.0,
    title: str | None = None,
):
    """Centre cuts of many volumes in one grid (like the paper's Fig. 2)."""
    import matplotlib.pyplot as plt

    volumes = [_as_array(v) for v in volumes]
    n = len(volumes)
    if n == 0:
        raise ValueError("no volumes to show")
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.7 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(plane_slice(volumes[i], plane), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def planes_rows(
    volumes,
    titles: Sequence[str] | None = None,
    cmap: str = "gray",
    vmin: float | None = -1.0,
    vmax: float | None = 1.0,
    title: str | None = None,
):
    """One row of three centre cuts per volume (the slice viewer's static form)."""
    import matplotlib.pyplot as plt

    volumes = [_as_array(v) for v in volumes]
    fig, axes = plt.subplots(len(volumes), 3, figsize=(6, 2.0 * len(volumes)), squeeze=False)
    for row, volume in enumerate(volumes):
        planes(volume, cmap=cmap, vmin=vmin, vmax=vmax, axes=axes[row])
        if titles is not None:
            axes[row][0].set_ylabel(titles[row], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def loss_curves(records: Sequence[dict], keys: Sequence[str] | None = None, title: str | None = None):
    """Plot the logged terms against the iteration, one panel per term."""
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no logged records to plot")
    keys = list(keys) if keys is not None else [k for k in records[0] if k not in ("iter", "time")]
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.6 * nrows), squeeze=False)
    iters = [r["iter"] for r in records]
    for ax, key in zip(axes.flat, keys):
        ax.plot(iters, [r.get(key, np.nan) for r in records], lw=1)
        ax.set_title(key, fontsize=9)
        ax.axhline(0.0, color="0.7", lw=0.5)
        ax.set_xlabel("iteration", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def describe_curves(records: Sequence[dict]) -> list[str]:
    """What a run's logged curves show, in sentences derived from them (notebook 03 prints them under the plot):
    where the critic's distance estimate peaked and where it ended, how far the reconstruction error fell, and
    the range of the gradient penalties. Averages over the last tenth of the log smooth the step-to-step noise."""
    if not records:
        raise ValueError("no logged records to describe")
    tail = max(1, len(records) // 10)

    def end(key: str) -> float:
        return float(np.mean([r[key] for r in records[-tail:]]))

    lines = []
    if "w_dist" in records[0]:
        peak = max(records, key=lambda r: r["w_dist"])
        trend = "below" if end("w_dist") < 0.75 * peak["w_dist"] else "near"
        lines.append(
            f"w_dist peaked at {peak['w_dist']:.1f} (iteration {peak['iter']}) and ended {trend} its peak, at "
            f"{end('w_dist'):.1f} (here and below, an end is the mean over the last tenth of the log)."
        )
    if "l1" in records[0]:
        lines.append(f"l1 fell from {records[0]['l1']:.3f} to {end('l1'):.3f}.")
    for key in ("gp_d", "gp_c"):
        if key in records[0]:
            values = [r[key] for r in records]
            lines.append(f"{key} stayed between {min(values):.3f} and {max(values):.3f}; it ended at {end(key):.3f}.")
    return lines


SPREADS = {"sample_spread": "fixed-noise samples", "rec_spread": "reconstructions of fixed real volumes"}


def spread_curves(runs: dict[str, Sequence[dict]], title: str | None = None):
    """How much a run's samples and reconstructions differ from each other, relative to real volumes, against the
    iteration (the `sample_spread` and `rec_spread` of its log), one line per run. 1 is real volumes' spread."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPREADS), figsize=(5 * len(SPREADS), 2.8), squeeze=False)
    for ax, (key, what) in zip(axes.flat, SPREADS.items()):
        for name, records in runs.items():
            points = [(r["iter"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points), marker=".", lw=1, label=name)
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--", label="real volumes")
        ax.set_title(f"spread of {what}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylim(bottom=0)
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def compare_spreads(runs: dict[str, Sequence[dict]]) -> list[str]:
    """`spread_curves` in sentences: each spread of each run at the last iteration they all logged."""
    last = min(max(r["iter"] for r in records if "rec_spread" in r) for records in runs.values())
    lines = []
    for key, what in SPREADS.items():
        values = {name: next(r[key] for r in records if r["iter"] == last) for name, records in runs.items()}
        said = ", ".join(f"{v:.2f}× ({name})" for name, v in values.items())
        lines.append(f"iteration {last}, {what}: they differ from each other {said} as much as real volumes do.")
    return lines


def _png(image: np.ndarray, cmap: str, vmin: float, vmax: float, scale: int) -> bytes:
    """A slice as PNG bytes, each voxel drawn as a `scale` x `scale` square."""
    from matplotlib import colormaps
    from PIL import Image

    norm = np.clip((image - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgba = (colormaps[cmap](norm) * 255).astype(np.uint8)
    rgba = np.repeat(np.repeat(rgba, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    return buffer.getvalue()


def has_widget_frontend() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed (JupyterLab, Notebook, Colab), unless the run's
    output is saved to be read later (the course runner, `alphagan.progress.saved_run`)."""
    if saved_run():
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def slice_viewer(
    volumes,
    names: Sequence[str] | None = None,
    cmap: str = "gray",
    interactive: bool | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    display_size: int = 256,
):
    """Several volumes side by side with a plane selector, a colour-map choice and a slice slider.

    Returns an ipywidgets box in a Jupyter front end. With `interactive=False` (or no widget front end, or under
    the course runner), it returns a static three-plane figure per volume instead, so that saved notebooks and
    plain scripts still show something useful. The slider's picture is rendered to PNG in the kernel, so no
    front-end extension beyond ipywidgets' own is needed (JupyterLab 4 and Colab ship it).
    """
    vols = [_as_array(v) for v in (volumes if isinstance(volumes, (list, tuple)) else [volumes])]
    names = list(names) if names is not None else [f"volume {i}" for i in range(len(vols))]
    vmin = min(float(v.min()) for v in vols) if vmin is None else vmin
    vmax = max(float(v.max()) for v in vols) if vmax is None else vmax
    if interactive is None:
        interactive = has_widget_frontend()
    if not interactive:
        return planes_rows(vols, titles=names, cmap=cmap, vmin=vmin, vmax=vmax)

    import ipywidgets as widgets

    plane = widgets.ToggleButtons(options=list(PLANES), value="axial", description="plane")
    # gray, or viridis for the paper's Fig. 4 look (yellow bright, blue dark)
    colours = widgets.Dropdown(options=sorted({cmap, "gray", "viridis"}), value=cmap, description="colours")
    size = vols[0].shape[_AXIS["axial"]]
    slider = widgets.IntSlider(value=size // 2, min=0, max=size - 1, description="slice", continuous_update=True)
    scale = max(1, display_size // max(vols[0].shape))
    images = [widgets.Image(format="png") for _ in vols]
    captions = [widgets.Label(n) for n in names]

    def render(*_):
        for volume, image, caption, name in zip(vols, images, captions, names):
            index = min(slider.value, volume.shape[_AXIS[plane.value]] - 1)
            image.value = _png(plane_slice(volume, plane.value, index), colours.value, vmin, vmax, scale)
            caption.value = f"{name}: {plane.value} {index}"

    def on_plane(change):
        slider.max = vols[0].shape[_AXIS[change["new"]]] - 1
        slider.value = min(slider.value, slider.max)
        render()

    plane.observe(on_plane, names="value")
    slider.observe(render, names="value")
    colours.observe(render, names="value")
    render()
    columns = [widgets.VBox([img, cap]) for img, cap in zip(images, captions)]
    controls = widgets.HBox([plane, colours])
    return widgets.VBox([controls, slider, widgets.HBox(columns)], layout=widgets.Layout(align_items="flex-start"))


def use_headless_backend() -> None:
    """Select the Agg backend when no display is available (command line, CI)."""
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")


def pca_scatter(
    real_2d: np.ndarray,
    projected: dict[str, np.ndarray],
    variance: Sequence[float] | None = None,
    title: str = "PCA fitted on the real volumes",
):
    """The paper's Fig. 3: real and generated volumes on the first two principal components of the real set."""
    import matplotlib.pyplot as plt

    ncols = max(1, len(projected))
    fig, axes = plt.subplots(1, ncols, figsize=(3.6 * ncols, 3.4), squeeze=False, sharex=True, sharey=True)
    for ax, (name, points) in zip(axes[0], projected.items()):
        ax.scatter(real_2d[:, 0], real_2d[:, 1], s=6, c="0.6", label="real")
        ax.scatter(points[:, 0], points[:, 1], s=6, c="tab:red", label=name)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="best")
        if variance is not None:
            ax.set_xlabel(f"PC1 ({100 * variance[0]:.0f} %)", fontsize=8)
    if variance is not None:
        axes[0][0].set_ylabel(f"PC2 ({100 * variance[1]:.0f} %)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def volume_histograms(
    real: dict[str, Sequence[float]],
    generated: dict[str, dict[str, Sequence[float]]],
    title: str = "tissue volumes, real against generated (mL)",
):
    """One panel per measured quantity: the real distribution and each model's, overlaid."""
    import matplotlib.pyplot as plt

    keys = list(real)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [np.asarray(real[key])] + [np.asarray(g[key]) for g in generated.values()]
        bins = np.histogram_bin_edges(np.concatenate(values), bins=20)
        ax.hist(values[0], bins=bins, color="0.6", alpha=0.8, label="real")
        for name, v in zip(generated, values[1:]):
            ax.hist(v, bins=bins, histtype="step", lw=1.5, label=name)
        ax.set_title(key.replace("_ml", ""), fontsize=9)
        ax.set_xlabel("mL", fontsize=8)
    axes[0][0].set_ylabel("volumes")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def nearest_pairs(generated, training, index: Sequence[int], distance: Sequence[float], k: int = 4, title: str = ""):
    """The k generated volumes closest to a training volume, each beside that training volume (axial cuts)."""
    order = np.argsort(distance)[:k]
    volumes, titles = [], []
    for i in order:
        volumes += [generated[i], training[index[i]]]
        titles += [f"generated {i}\nRMS {distance[i]:.3f}", f"training {index[i]}"]
    return cuts_grid(
        volumes, ncols=2 * min(k, len(order)), titles=titles, title=f"{title}: closest generated-training pairs"
    )


def planes_columns(groups: dict[str, Sequence], title: str | None = None, vmin: float = -1.0, vmax: float = 1.0):
    """Sagittal, coronal and axial centre cuts (rows) of each volume (columns), one block of rows per group.

    The picture saved during training: fixed-noise samples, real volumes and their reconstructions.
    """
    import matplotlib.pyplot as plt

    groups = {name: [_as_array(v) for v in vols] for name, vols in groups.items()}
    ncols = max(len(v) for v in groups.values())
    nrows = 3 * len(groups)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.5 * ncols, 1.5 * nrows), squeeze=False)
    for g, (name, vols) in enumerate(groups.items()):
        for p, plane in enumerate(PLANES):
            row = axes[3 * g + p]
            for c, ax in enumerate(row):
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(vols):
                    ax.imshow(plane_slice(vols[c], plane), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                else:
                    ax.axis("off")
            row[0].set_ylabel(f"{name}\n{plane[:3].upper()}" if p == 1 else plane[:3].upper(), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ notebook 02
def layer_shapes(net, x) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, layer type, output shape, parameters) for every leaf layer of `net` on input `x` (notebook 02)."""
    import torch

    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    hooks = []
    for name, module in net.named_modules():
        if len(list(module.children())) == 0:

            def hook(mod, _inputs, output, name=name):
                rows.append((name, type(mod).__name__, tuple(output.shape), sum(p.numel() for p in mod.parameters())))

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        net.train()
    return rows


def compare_upsampling(channels: int = 4, size: int = 8, seed: int = 0):
    """Upsample one smooth random volume x2 with a transposed convolution and with resize-convolution.

    Both use random weights with the same initialisation; the transposed convolution's kernel overlaps
    unevenly (kernel 4, stride 2), which prints a checkerboard on any input, while nearest upsampling followed
    by a 3^3 convolution treats every output voxel alike (Odena et al., 2016). Notebook 02 shows both.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    x = torch.ones(1, channels, size, size, size) + 0.1 * torch.randn(1, channels, size, size, size, generator=g)
    transposed = nn.ConvTranspose3d(channels, 1, 4, 2, 1, bias=False)
    resize = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(channels, 1, 3, 1, 1, bias=False))
    with torch.no_grad():
        transposed.weight.copy_(torch.randn(transposed.weight.shape, generator=g) * 0.02)
        resize[1].weight.copy_(torch.randn(resize[1].weight.shape, generator=g) * 0.02)
        return transposed(x)[0, 0], resize(x)[0, 0]


def lesion_figure(lesions: dict) -> matplotlib.figure.Figure:
    """Notebook 05's figure: per cohort, the lesion volumes of real and generated volumes (histograms) and their
    centres in an axial view; `lesions` maps a cohort to its `anatomy.Lesions`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(lesions), figsize=(4 * len(lesions), 7), squeeze=False)
    for col, (cohort, found) in enumerate(lesions.items()):
        axes[0][col].hist([found.sizes("real"), found.sizes("generated")], bins=10, label=["real", "generated"])
        axes[0][col].set_title(f"{cohort}: lesion volume (mL)")
        axes[0][col].legend()
        for side, colour in (("real", "0.5"), ("generated", "tab:red")):
            xy = found.centres(side)
            if len(xy):
                axes[1][col].scatter(xy[:, 0], xy[:, 1], s=12, c=colour, label=side)
        axes[1][col].set_xlabel("x (mm, right +)")
        axes[1][col].set_ylabel("y (mm, anterior +)")
        axes[1][col].set_title("lesion centres, axial view")
        axes[1][col].legend()
    fig.tight_layout()
    return fig
