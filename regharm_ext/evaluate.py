"""Scoring a harmonizer or a baseline under the iDIH protocol, per subset (the paper's Table 1).

    python -m regharm_ext.evaluate [--checkpoint RUN_DIR_OR_FILE] [--data-root DIR]
        [--subsets HCOCO ...] [--split test] [--method model|composite|reinhard|reinhard-cielab ...] [--json OUT]
        [--samples SHEET.png [--samples-count N]]

Without ``--data-root`` the embedded validation split is scored (synthetic composites of the 15
validation photos, 120 images); with it, the iHarmony4 tree at DIR (the subsets present, or those
named). Without ``--checkpoint`` the packaged default weights are used. Every method sees the same
images: composite, mask and real image at 256² (iHarmony4: bilinear, soft mask, as the protocol;
the synthetic split's are drawn at 256², :mod:`regharm_ext.data.synth`), metrics of
:mod:`regharm_ext.metrics`. A model whose training resolution differs runs at that resolution and
its residual is upsampled to 256² (:mod:`regharm_ext.inference`), as ``harmonize`` does.

``--samples`` also writes a picture of N images spread over the dataset: composite (mask
outlined), each method's result with its fMSE, real (:mod:`regharm_ext.samples`).

JSON (``--json``): ``{"method": ..., "subsets": {"<Subset>": {"n", "mse", "fmse", "psnr"}, ...,
"All": {...}}, "settings": {"data", "split", "subsets", "size", "peak", "protocol", "model":
{"checkpoint", "step", "epoch", "variant", "backend"}}}`` (step and epoch where the weights record
them); a list of such objects when several methods are given. ``protocol`` is true for the iDIH
protocol's size and peak.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .backends import NAMES as BACKEND_NAMES, chosen
from .baselines import composite, reinhard, reinhard_cielab
from .errors import one_line, warnings_as_notes
from .inference import harmonize_tensor, pick_device
from .metrics import MetricTable, image_metrics
from .paths import nearest_existing, same_file

BASELINES = {"composite": composite, "reinhard": reinhard, "reinhard-cielab": reinhard_cielab}
METHODS = ("model", "composite", "reinhard", "reinhard-cielab")
EVAL_SIZE = 256


def method_fn(method: Union[str, torch.nn.Module]):
    """``fn(image, mask) -> O`` for a model (run as :mod:`regharm_ext.inference` does) or the
    name of a baseline."""
    if isinstance(method, str):
        if method not in BASELINES:
            raise ValueError(f"unknown method {method!r}: choose a model or one of {sorted(BASELINES)}")
        return BASELINES[method]
    return lambda image, mask: harmonize_tensor(method, image, mask)


def evaluate(method: Union[str, torch.nn.Module], dataset: Dataset, device="cpu", batch_size: int = 8,
             peak="target", progress: bool = True, name: str = None, num_workers: int = 0) -> Dict:
    """Mean MSE, fMSE, PSNR per subset and over all images.

    Args:
        method: a model (``forward(image, mask) -> O``; a Harmonizer runs at its ``input_size``
            with the residual upsampled, see :mod:`regharm_ext.inference`), or a baseline of
            :mod:`regharm_ext.baselines`: "composite", "reinhard" (lαβ, as published) or
            "reinhard-cielab".
        dataset: items ``{"comp", "mask", "real", "subset", ...}`` of one size (SyntheticComposites,
            IHarmony4).
        peak: PSNR peak, "target" (iDIH) or a number such as 255.
        name: the result's "method" (default: the string, or "model").

    Returns: ``{"method": str, "subsets": {subset: {"n", "mse", "fmse", "psnr"}, ..., "All": {...}}}``.
    """
    fn = method_fn(method)
    label, model = (method, None) if isinstance(method, str) else ("model", method)
    if len(dataset) == 0:
        raise ValueError("the dataset holds no images to evaluate (empty list file?)")
    device = torch.device(device)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    table = MetricTable()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        with torch.no_grad(), tqdm(total=len(dataset), unit="img", disable=not progress, file=sys.stderr,
                                   desc=f"evaluate {name or label}") as bar:
            for batch in loader:
                comp = batch["comp"].to(device)
                mask = batch["mask"].to(device)
                real = batch["real"].to(device)
                pred = fn(comp, mask)
                table.add(batch["subset"], {k: v.cpu() for k, v in image_metrics(pred.float(), real, mask, peak).items()})
                bar.update(comp.shape[0])
    finally:
        if model is not None and was_training:
            model.train()
    return {"method": name or label, "subsets": table.summary()}


def format_table(results: Union[Dict, Sequence[Dict]]) -> str:
    """Markdown table laid out like the paper's Table 1: a block of rows (PSNR ↑, MSE ↓, fMSE ↓)
    per subset, "All" last, one column per method; N is the number of images."""
    if isinstance(results, dict):
        results = [results]
    subsets: List[str] = []
    for r in results:
        subsets += [s for s in r["subsets"] if s != "All" and s not in subsets]
    subsets.append("All")
    head = "| Dataset | N | Metric | " + " | ".join(r["method"] for r in results) + " |"
    rule = "|---|---:|---|" + "---:|" * len(results)
    lines = [head, rule]
    for s in subsets:
        ns = sorted({r["subsets"][s]["n"] for r in results if s in r["subsets"]})
        for i, (key, label) in enumerate((("psnr", "PSNR ↑"), ("mse", "MSE ↓"), ("fmse", "fMSE ↓"))):
            cells = [f"{r['subsets'][s][key]:.2f}" if s in r["subsets"] else "–" for r in results]
            first = (s, "/".join(map(str, ns))) if i == 0 else ("", "")
            lines.append(f"| {first[0]} | {first[1]} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_dataset(data_root=None, split="test", subsets=None, size=EVAL_SIZE, val_length=None):
    """The evaluation set: iHarmony4 at ``data_root`` (missing subsets, and subsets whose list
    names no image, skipped with a note on stderr) or, without a root, the embedded validation
    split (``split="train"``: the embedded training split)."""
    if data_root is None:
        from .data.synth import SyntheticComposites
        return SyntheticComposites("val" if split == "test" else "train", size=size, length=val_length)
    from .data.iharmony4 import IHarmony4
    ds = IHarmony4(data_root, split=split, subsets=subsets, size=size, augment=False, skip_missing=True)
    if ds.skipped:
        print(f"note: subsets not under {data_root}, skipped: {', '.join(ds.skipped)}", file=sys.stderr)
    unlisted = f"no {split} images listed for " + ", ".join(f"{s} in {src}" for s, src in ds.unlisted)
    if len(ds) == 0:
        raise ValueError(f"the dataset holds no images to evaluate: {unlisted}")
    if ds.unlisted:
        # a subset scored on nothing would vanish from the table without a word
        print(f"note: {unlisted}; skipped", file=sys.stderr)
    return ds


def _blocking_file(path: Path):
    """The first existing ancestor of ``path`` when it is a file rather than a folder."""
    existing = nearest_existing(path.parent)
    return None if existing.is_dir() else existing


def check_writable(path: Path, flag: str) -> None:
    """Refuse an output path now, before minutes of scoring, rather than lose the results when
    writing them: the folder is created and a file is made (and removed) in it, as
    :func:`regharm_ext.checkpoint._atomic_write` will."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the path of a file (in it or elsewhere)")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise ValueError(f"{flag} {path} cannot be written: {blocking} is a file, not a folder")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written: cannot create folder {folder} "
                         f"({e.strerror or e}); choose a path in a writable folder") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written: cannot create a file in {folder} "
                         f"({e.strerror or e}); choose a path in a writable folder") from None


def write_json(path: Path, results: List[Dict]) -> None:
    """One object for one method, a list for several; replaced whole (never a partial file)."""
    from .checkpoint import write_text
    try:
        write_text(path, json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    except OSError as e:
        raise OSError(f"--json {path} cannot be written: {e.strerror or e}") from None


def _load_model(checkpoint, device, backend=None):
    """(model, what to record of it): the weights file it came from and its training counters."""
    try:
        from .checkpoint import load_model
    except ImportError as e:
        raise RuntimeError(f"cannot load a model: {e}") from None
    with warnings_as_notes():
        model, config = load_model(checkpoint, device, backend=backend)
    source = {k: config[k] for k in ("checkpoint", "step", "epoch") if k in config}
    source["variant"] = config.get("variant")
    stored = config.get("backend")   # --backend applied; None: picked per device
    used = chosen(stored, torch.device(device))
    source["backend"] = used if stored else f"auto ({used})"
    return model, source


def _settings(a: argparse.Namespace, peak) -> Dict:
    """What a result was computed on, written beside the figures: a JSON of --size 512 or
    --peak 255 must not read like one of the protocol's."""
    data = str(a.data_root) if a.data_root is not None else "embedded synthetic " + (
        "validation" if a.split == "test" else "training") + " split"
    return {"data": data, "split": a.split, "subsets": a.subsets, "size": a.size, "peak": peak,
            "protocol": a.size == EVAL_SIZE and peak == "target"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m regharm_ext.evaluate",
                                description="Score a harmonizer and baselines (iDIH protocol, Table 1 layout).")
    p.add_argument("--checkpoint", default=None,
                   help="run folder or weights file (default: the packaged default weights)")
    p.add_argument("--data-root", default=None, type=Path,
                   help="iHarmony4 root (default: the embedded synthetic validation split)")
    p.add_argument("--subsets", nargs="+", default=None,
                   help="subsets to score, e.g. HCOCO HFlickr (or HCOCO,HFlickr; default: all present)")
    p.add_argument("--split", default="test", choices=["test", "train"],
                   help="list to score (without --data-root: 'train' scores the embedded training split)")
    p.add_argument("--method", nargs="+", default=["model"], choices=METHODS,
                   help="what to score; several give one column each (default: model)")
    p.add_argument("--json", default=None, type=Path, help="write the result(s) as JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--backend", default=None, choices=("auto",) + BACKEND_NAMES,
                   help="op backend of the model's PTL/LTL (default: the one it trained with where it "
                        "can run on --device, else auto)")
    p.add_argument("--peak", default="target", help="PSNR peak: 'target' (iDIH) or a number, e.g. 255")
    p.add_argument("--size", type=int, default=EVAL_SIZE, help="evaluation resolution (protocol: 256)")
    p.add_argument("--val-length", type=int, default=None,
                   help="images of the embedded split scored (default: 120 of the validation split, "
                        "2000 with --split train)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--samples", default=None, type=Path, metavar="PNG",
                   help="also write a sheet of composite | each method | real for a few images here")
    p.add_argument("--samples-count", type=int, default=8, metavar="N", help="rows of --samples (default 8)")
    a = p.parse_args(argv)
    _check_args(p, a)
    peak = _parse_peak(p, a.peak)
    try:
        device = pick_device(a.device)
        dataset = build_dataset(a.data_root, a.split, a.subsets, a.size, a.val_length)
        targets, source = {}, None
        for m in a.method:
            if m == "model":
                targets[m], source = _load_model(a.checkpoint, device, a.backend)
                step = f", step {source['step']}" if "step" in source else ""
                print(f"model: {source['checkpoint']} ({source['variant']}{step})", file=sys.stderr)
            else:
                targets[m] = m
        _check_outputs(a)
        results = [evaluate(t, dataset, device, a.batch_size, peak, progress=not a.no_progress, name=m,
                            num_workers=a.workers) for m, t in targets.items()]
        settings = _settings(a, peak)
        for r in results:
            r["settings"] = dict(settings, **({"model": source} if r["method"] == "model" else {}))
        # the figures first: a failure drawing the sheet must not take them with it
        print(format_table(results), flush=True)
        if a.json is not None:
            write_json(a.json, results)
        if a.samples is not None:
            _write_samples(a.samples, a.samples_count, dataset, targets, device, peak)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for the user, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse values that make no sense, and flags that would be ignored: the figures would be
    for another dataset than the one asked for."""
    if a.samples_count < 1:
        p.error(f"--samples-count must be at least 1, got {a.samples_count}")
    for flag, value, least in (("--size", a.size, 1), ("--batch-size", a.batch_size, 1),
                               ("--workers", a.workers, 0)):
        if value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    if a.json is not None and a.samples is not None and same_file(a.json, a.samples):
        p.error(f"--json and --samples name the same file ({a.samples}): the sheet would replace "
                f"the results; give them two paths")
    if a.subsets is not None:   # "HCOCO HFlickr", as train takes them: "HCOCO,HFlickr"
        a.subsets = [n for t in a.subsets for n in t.replace(",", " ").split()] or None
    if a.data_root is None and a.subsets is not None:
        p.error("--subsets needs --data-root (without it the embedded synthetic validation split is scored)")
    if a.data_root is not None and a.val_length is not None:
        p.error("--val-length sizes the embedded validation split: drop it or --data-root")
    if a.val_length is not None and a.val_length < 1:
        p.error(f"--val-length must be at least 1 (images to score), got {a.val_length}")


def _parse_peak(p: argparse.ArgumentParser, text: str):
    """'target' or a finite positive number: 0, a negative or NaN peak makes every PSNR -inf or NaN."""
    if text == "target":
        return text
    try:
        peak = float(text)
    except ValueError:
        peak = math.nan
    if not (math.isfinite(peak) and peak > 0):
        p.error(f"--peak must be 'target' or a positive number such as 255, got {text!r}")
    return peak


def _check_outputs(a: argparse.Namespace) -> None:
    if a.json is not None:
        check_writable(a.json, "--json")
    if a.samples is not None:
        if a.samples.suffix.lower() != ".png":
            raise ValueError(f"--samples writes a PNG: give a path ending in .png, got {a.samples}")
        check_writable(a.samples, "--samples")


def _write_samples(path: Path, count: int, dataset, targets, device, peak) -> None:
    from .samples import sample_sheet, save_sheet
    # the sheet's first column is the composite already
    methods = [(m, method_fn(t)) for m, t in targets.items() if m != "composite"]
    sheet = sample_sheet(dataset, methods, count, device, peak)
    try:
        save_sheet(sheet, path)
    except OSError as e:
        raise OSError(f"--samples {path} cannot be written: {e.strerror or e}") from None
    print(f"samples: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
