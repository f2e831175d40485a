"""Files the output of a GPU run of ``benchmarks/gpu_check.sh`` into the repository and
regenerates the README's benchmark tables.

    python benchmarks/collect_gpu.py RUN_DIR      # the folder the script wrote ($OUT on the device)

- ``gpu_bench.json`` -> ``benchmarks/results/gpu_bench-<kind>.json``
- ``cuda.json`` (the pytest-benchmark suite) -> ``benchmarks/results/<kind>.json``
- the step logs (steps, build, bench, tests, diagnose, suite) -> ``benchmarks/results/logs-<kind>/``,
  the evidence of what ran there (the CUDA tests' pass/fail lines among them)
- a later call of the same session (the same commit in its JSON, e.g. gpu_check.sh's second
  call, which starts with an empty $OUT) is merged in: its rows join the filed report (the
  acceptance block recomputed) and its logs are appended, rather than replacing the first call's

``<kind>`` is ``cuda-<GPU name>`` as the JSON record it (``cuda-nvidia-h100-80gb-hbm3``). Then
``report.py --readme`` runs over everything in ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402
from benchlib import gpu_kind  # noqa: E402

LOGS = ("steps.log", "build.log", "tests.log", "bench.log", "diagnose.log", "suite.log")


def _json(path: str):
    """The JSON at ``path``; None (with a warning) when it is missing, empty or cut off: the
    other file and the logs of a cut run are still worth filing."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"warning: {path}: not readable JSON ({exc}); was the run cut off? skipped",
              file=sys.stderr)
        return None


def _device_from_steps(run_dir: str):
    """The GPU name nvidia-smi wrote into steps.log (the env step), for a run without JSON."""
    try:
        with open(os.path.join(run_dir, "steps.log")) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        if line.startswith("name, memory.total") and i + 1 < len(lines):
            return lines[i + 1].split(",")[0].strip() or None
    return None


def collect(run_dir: str, results: str) -> list:
    """Copies what ``run_dir`` holds into ``results``; returns the paths written."""
    written = []
    gb = _json(os.path.join(run_dir, "gpu_bench.json"))
    suite = _json(os.path.join(run_dir, "cuda.json"))
    name = (gb or {}).get("environment", {}).get("device_name") or \
        (suite or {}).get("regharm", {}).get("device_name") or _device_from_steps(run_dir)
    if not name:
        raise SystemExit(f"error: {run_dir}: no JSON and no steps.log names the device; nothing to file")
    if gb is None and suite is None:
        print(f"warning: {run_dir} holds no readable gpu_bench.json or cuda.json: filing the logs only",
              file=sys.stderr)
    on_gpu = str((gb or {}).get("environment", {}).get("device", "cuda")).startswith("cuda")
    kind = gpu_kind(name) if on_gpu else "cpu-gpu-bench"
    os.makedirs(results, exist_ok=True)
    follow_up = False
    if gb is not None:
        written.append(os.path.join(results, f"gpu_bench-{kind}.json"))
        filed = _json(written[-1]) if os.path.exists(written[-1]) else None
        follow_up = _same_commit(filed, gb)
        if follow_up:   # a later call of one session: its rows join the first call's
            with open(written[-1], "w") as fh:
                json.dump(_merged(filed, gb), fh, indent=1, default=str)
        else:
            shutil.copyfile(os.path.join(run_dir, "gpu_bench.json"), written[-1])
    if suite is not None and suite.get("benchmarks"):
        written.append(os.path.join(results, f"{suite['regharm'].get('device_kind', kind)}.json"))
        shutil.copyfile(os.path.join(run_dir, "cuda.json"), written[-1])
    logs = [f for f in LOGS if os.path.exists(os.path.join(run_dir, f))]
    if logs:
        log_dir = os.path.join(results, f"logs-{kind}")
        os.makedirs(log_dir, exist_ok=True)
        for f in logs:
            written.append(os.path.join(log_dir, f))
            if follow_up and os.path.exists(written[-1]):   # after the first call's, not over it
                with open(os.path.join(run_dir, f)) as src, open(written[-1], "a") as dst:
                    dst.write(f"\n== a later call of the same commit ({run_dir}) ==\n" + src.read())
            else:
                shutil.copyfile(os.path.join(run_dir, f), written[-1])
    return written


def _same_commit(filed, new) -> bool:
    """Whether ``new`` (a gpu_bench.json) comes from the commit of the one already filed: a
    second call of one GPU session (gpu_check.sh's header), whose device starts with an empty
    $OUT, so its report holds only what that call ran."""
    commit = lambda r: (r or {}).get("environment", {}).get("git_commit")   # noqa: E731
    return filed is not None and commit(filed) is not None and commit(filed) == commit(new)


def _merged(filed: dict, new: dict) -> dict:
    """``filed`` with ``new``'s rows (a row of the same bench and backend replaced), pairs and
    skips; the acceptance block recomputed over the whole (gpu_bench.acceptance)."""
    from gpu_bench import acceptance
    out = dict(filed)
    fresh = {(r.get("bench"), r.get("backend")) for r in new.get("results", [])}
    out["results"] = [r for r in filed.get("results", []) if (r.get("bench"), r.get("backend")) not in fresh] \
        + list(new.get("results", []))
    out["paired"] = {**filed.get("paired", {}), **new.get("paired", {})}
    out["skipped"] = list(filed.get("skipped", [])) + [x for x in new.get("skipped", [])
                                                       if x not in filed.get("skipped", [])]
    out["settings"] = {**filed.get("settings", {}), **new.get("settings", {})}
    out["acceptance"] = acceptance(out["results"], out["paired"] or None)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="the folder gpu_check.sh wrote")
    ap.add_argument("--results", default=report.RESULTS, help="default: benchmarks/results")
    ap.add_argument("--readme", default=report.README, help="README to regenerate ('' for none)")
    args = ap.parse_args(argv)
    for path in collect(args.run_dir, args.results):
        print(f"wrote {path}")
    inputs = report.default_inputs(args.results)
    return report.main(inputs + ["--out", args.results] + (["--readme", args.readme] if args.readme else []))


if __name__ == "__main__":
    sys.exit(main())
