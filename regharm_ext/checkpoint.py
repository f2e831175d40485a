"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, written atomically.

A run directory (what ``train`` writes and ``--checkpoint`` accepts)::

    RUN_DIR/latest.json                  {"checkpoint": "checkpoints/step-00000120", "step": .., "epoch": ..}
    RUN_DIR/best.json                    same form, when the run validates during training
    RUN_DIR/checkpoints/step-00000120/   one checkpoint, renamed into place when complete
        model.safetensors                the weights (``state_dict``)
        model.json                       {"format", "model": Harmonizer kwargs, "trained": {..}, "step", "epoch"}
        train_state.safetensors          optimizer / scheduler / RNG tensors
        train_state.json                 the rest of that state, tensors replaced by references

A bare weights file ``X.safetensors`` has its ``X.json`` beside it (the packaged default weights
are ``regharm_ext/weights/default.safetensors`` + ``default.json``).
"""
from __future__ import annotations

import collections
import inspect
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "regharm_ext/harmonizer-v1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "default.safetensors"
PathLike = Union[str, os.PathLike]


_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")
_META_KEYS = {"format", "model", "trained", "step", "epoch"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model it describes."""


# --------------------------------------------------------------------------- atomic files
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path) -> None:
    """Flush a file's (or a folder's entries') data to the disk, so that a rename that follows
    cannot reach the disk before the data it names (a power cut then leaves the old file, not an
    empty new one). Folders cannot be opened on some systems: skipped there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage(path: Path, write) -> str:
    """``write(tmp_path)`` into a new temporary file beside ``path``, with the usual permissions
    and flushed to disk (removed again if anything fails); returns its name for :func:`_commit`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; give the usual permissions
        _fsync(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _commit(tmp: str, path: Path) -> None:
    """A staged file renamed over ``path``, the rename flushed too."""
    os.replace(tmp, path)
    _fsync(path.parent)


def _discard(tmp: str) -> None:
    if os.path.exists(tmp):
        os.unlink(tmp)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, flush it to disk, then rename over ``path``: readers (and a process
    resuming after a crash at any moment) see the old file or the new one, never a part."""
    tmp = _stage(path, write)
    try:
        _commit(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Text written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(Path(path), write)


def _json_writer(obj: Any):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    return write


def write_json(path: PathLike, obj: Any) -> None:
    """JSON written atomically."""
    _atomic_write(Path(path), _json_writer(obj))


def create_json(path: PathLike, obj: Any) -> None:
    """JSON written atomically to a file that must not exist yet: FileExistsError when another
    process (or an earlier run) holds it. A hard link is the exclusive and atomic step."""
    path = Path(path)
    tmp = _stage(path, _json_writer(obj))
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:   # a file system without hard links: exclusive, though not atomic
        with open(path, "x") as f, open(tmp) as src:
            f.write(src.read())
    finally:
        _discard(tmp)
    _fsync(path.parent)


def _read_json(path: Path, what: str) -> Dict:
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc}") from None


# --------------------------------------------------------------------------- state codec
def _encode(obj: Any, tensors: Dict[str, torch.Tensor], prefix: str) -> Any:
    """Nested state -> JSON-able tree; tensors and arrays go to ``tensors`` under a key."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = prefix or "a"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64)
                                        if obj.dtype.kind in "iu" else np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, collections.Counter):
        return {"__counter__": [[_encode(k, tensors, f"{prefix}.k{i}"), v] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        return {"__items__": [[_encode(k, tensors, f"{prefix}.k{i}"), _encode(v, tensors, f"{prefix}.v{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix or 'top level'})")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__counter__" in obj:
        return collections.Counter({_decode(k, tensors): v for k, v in obj["__counter__"]})
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    raise CheckpointError(f"unrecognized entry in a training state file: {sorted(obj)}")


# what set_rng_state reads from a training state
_RNG_KEYS = ("torch", "numpy", "python")


def rng_state() -> Dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU/CUDA, numpy, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    # JSON turned the inner tuple into a list; random.setstate needs tuples back
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------- weights
def _model_meta(model: torch.nn.Module, extra: Optional[Dict]) -> Dict:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError("model must be a Harmonizer (it needs a .config dict to be rebuilt)")
    meta = {"format": FORMAT, "model": dict(config)}
    meta.update(extra or {})
    return meta


def save_weights(path: PathLike, model: torch.nn.Module, extra: Optional[Dict] = None) -> Path:
    """``path`` (``X.safetensors``) with the weights and ``X.json`` beside it with the model config
    plus ``extra`` (e.g. ``{"trained": {...}}``), each written atomically. Returns the weights path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights file must end in .safetensors, got {path}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # both staged before either is renamed into place: a description that cannot be written
    # (e.g. a value JSON refuses) must not leave new weights beside an old description
    staged = [(_stage(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT})), path)]
    try:
        json_path = path.with_suffix(".json")
        staged.append((_stage(json_path, _json_writer(_model_meta(model, extra))), json_path))
        for tmp, target in staged:
            _commit(tmp, target)
    finally:
        for tmp, _ in staged:
            _discard(tmp)
    return path


# --------------------------------------------------------------------------- run checkpoints
def save_checkpoint(run_dir: PathLike, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: Optional[Dict] = None, keep: int = 2, best: bool = False) -> Path:
    """Write one complete checkpoint of a run and point ``RUN_DIR/latest.json`` at it.

    Args:
        run_dir: the run directory.
        model: a :class:`~regharm_ext.model.Harmonizer`.
        optimizer, scheduler: saved with their ``state_dict()`` when given.
        state: JSON-able training state (counters, losses, ...); ``state["step"]`` names the
            checkpoint, ``state["trained"]`` (optional) goes to ``model.json``. The RNG states are
            added automatically.
        keep: how many checkpoints to keep (the latest ones, and always the best one).
        best: also point ``RUN_DIR/best.json`` at this checkpoint.

    The checkpoint is written into a temporary folder that is renamed into place only when
    complete, then the pointer file is replaced atomically: an interruption at any moment leaves
    the previous checkpoint usable. Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    state = dict(state or {})
    try:
        return _save_checkpoint(run_dir, model, optimizer, scheduler, state, keep, best)
    except (OSError, SafetensorError) as exc:   # e.g. a full disk (safetensors says so its own way)
        raise CheckpointError(_save_failed(run_dir, exc)) from exc


def _save_failed(run_dir: Path, exc: BaseException) -> str:
    try:
        last = f"the last complete checkpoint, {resolve_checkpoint(run_dir, prefer='latest').parent}, is kept"
    except CheckpointError:
        last = "no checkpoint had been written"
    return (f"cannot write a checkpoint in {run_dir / 'checkpoints'}: {type(exc).__name__}: {exc}; "
            f"{last}. Free space (or lower --keep-checkpoints) and continue with --resume")


def _save_checkpoint(run_dir: Path, model, optimizer, scheduler, state, keep, best) -> Path:
    step = int(state.get("step", 0))
    ckdir = run_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    n = 1
    while (ckdir / name).exists():
        n += 1
        name = f"step-{step:08d}.{n}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckdir))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        extra = {k: state[k] for k in ("trained", "step", "epoch") if k in state}
        save_weights(tmp / "model.safetensors", model, extra)
        full = {"state": state, "rng": rng_state()}
        if optimizer is not None:
            full["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            full["scheduler"] = scheduler.state_dict()
        tensors: Dict[str, torch.Tensor] = {}
        tree = _encode(full, tensors, "")
        _atomic_write(tmp / "train_state.safetensors", lambda t: save_file(tensors, t))
        write_json(tmp / "train_state.json", tree)
        os.replace(tmp, ckdir / name)
        _fsync(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = {"checkpoint": f"checkpoints/{name}", "step": step, "epoch": state.get("epoch")}
    write_json(run_dir / "latest.json", pointer)
    if best:
        write_json(run_dir / "best.json", pointer)
    _prune(run_dir, keep)
    return ckdir / name


_CHECKPOINT_FILES = ("model.safetensors", "model.json", "train_state.safetensors", "train_state.json")


def clean_partial(run_dir: PathLike) -> list:
    """Delete what a crash in the middle of a save left behind: hidden temporary checkpoint
    folders (``checkpoints/.step-*``) and temporary files (``.*.tmp``). Never touches a complete
    checkpoint. Returns the removed paths."""
    run_dir = Path(run_dir)
    removed = []
    for d in (run_dir, run_dir / "checkpoints"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink()
                removed.append(p)
    return removed


def _complete_checkpoints(run_dir: Path) -> list:
    """Checkpoint folders holding all their files, newest (highest step) first."""
    ckdir = run_dir / "checkpoints"
    if not ckdir.is_dir():
        return []
    done = [d for d in ckdir.iterdir() if d.is_dir() and d.name.startswith("step-")
            and all((d / f).is_file() for f in _CHECKPOINT_FILES)]
    return sorted(done, key=lambda d: (int(d.name[5:].split(".")[0]), d.stat().st_mtime), reverse=True)


def has_checkpoint(run_dir: PathLike) -> bool:
    """Whether ``--resume`` finds a checkpoint in ``run_dir``."""
    run_dir = Path(run_dir)
    return (run_dir / "latest.json").is_file() or bool(_complete_checkpoints(run_dir))


def _prune(run_dir: Path, keep: int) -> None:
    pinned = set()
    for ptr in ("latest.json", "best.json"):
        p = run_dir / ptr
        if p.is_file():
            try:
                pinned.add(Path(json.loads(p.read_text())["checkpoint"]).name)
            except (ValueError, KeyError, TypeError, OSError):  # a damaged pointer pins nothing
                pass
    done = sorted(d for d in (run_dir / "checkpoints").iterdir() if d.is_dir() and d.name.startswith("step-"))
    for d in done[:-max(1, keep)]:
        if d.name not in pinned:
            shutil.rmtree(d, ignore_errors=True)


def _pointer_target(ptr: Path) -> str:
    """The checkpoint folder (relative to the run directory) a ``latest.json``/``best.json`` names.

    Valid JSON of another shape (``{}``, ``[1]``, ``{"checkpoint": 5}``) is a damaged pointer, not a
    KeyError deep in a loader: it is named with the way to repair it."""
    pointer = _read_json(ptr, "checkpoint pointer")
    target = pointer.get("checkpoint") if isinstance(pointer, dict) else None
    if not isinstance(target, str) or not target:
        raise CheckpointError(
            f"{ptr} is not a checkpoint pointer: expected a JSON object like "
            f'{{"checkpoint": "checkpoints/step-00000120"}}, got {json.dumps(pointer)[:80]}; '
            f"point it at a folder of {ptr.parent / 'checkpoints'}, or delete it to fall back to "
            f"the newest complete checkpoint")
    return target


def resolve_checkpoint(checkpoint: Optional[PathLike], prefer: str = "best") -> Path:
    """The weights file a ``--checkpoint`` argument means.

    ``None`` -> the packaged default weights; a ``.safetensors`` file -> itself; a run directory
    -> the checkpoint its ``best.json`` (``prefer="best"``) or ``latest.json`` points to; a
    checkpoint folder -> its ``model.safetensors``.
    """
    if checkpoint is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"no packaged default weights: missing {DEFAULT_WEIGHTS}; "
                                  f"train a model (python -m regharm_ext.train) and pass --checkpoint RUN_DIR")
        return DEFAULT_WEIGHTS
    path = Path(checkpoint)
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle-based weights ({path.suffix}) are never loaded, since "
                                  f"unpickling can run code; give a .safetensors file with its .json")
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a .safetensors weights file or a run directory")
        return path
    if path.is_dir():
        order = ("best.json", "latest.json") if prefer == "best" else ("latest.json", "best.json")
        for ptr in order:
            if (path / ptr).is_file():
                target = path / _pointer_target(path / ptr)
                weights = target / "model.safetensors"
                if not weights.is_file():
                    raise CheckpointError(f"{path / ptr} points to {target}, but {weights} is missing")
                return weights
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        complete = _complete_checkpoints(path)
        if complete:   # a crash between the first checkpoint's rename and its latest.json
            return complete[0] / "model.safetensors"
        raise CheckpointError(f"{path} holds no checkpoint: expected latest.json (a run directory) "
                              f"or model.safetensors (a checkpoint folder)")
    raise CheckpointError(f"checkpoint not found: {path}")


def _build(meta: Dict, source: Path):
    from .model import Harmonizer

    if not isinstance(meta, dict):
        raise CheckpointError(f"{source} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: format {meta.get('format')!r} is not {FORMAT!r} "
                              f"(not a regharm_ext weights description)")
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown}; known: {sorted(_META_KEYS)}")
    config = meta.get("model")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} has no 'model' section (the Harmonizer config)")
    allowed = set(inspect.signature(Harmonizer.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise CheckpointError(f"{source}: unknown model config keys {unknown}; "
                              f"known: {sorted(allowed)}")
    try:
        return Harmonizer(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid model config {config}: {exc}") from None


def load_weights(model: torch.nn.Module, weights: Path) -> None:
    """Load a ``.safetensors`` file into ``model``; missing, unexpected or misshapen tensors are a
    :class:`CheckpointError` naming them, and so is a description beside the file (``X.json``)
    of another model config than ``model.config`` (``base`` and ``rbase``, or one variant at two
    input sizes, have the same tensors)."""
    weights = Path(weights)
    described = weights.with_suffix(".json")
    if getattr(model, "config", None) is not None and described.is_file():
        meta = _read_json(described, "model config (JSON beside the weights)")
        saved = meta.get("model") if isinstance(meta, dict) else None
        if isinstance(saved, dict):
            _refuse_other_config(saved, model.config, weights)
    _load_state(model, weights)


def _normal_config(config: Dict) -> Dict:
    """A model config in one spelling per model: the variant's parts in order, the input size
    as (H, W), the LTL levels sorted; the op backend left out (run control, not architecture)."""
    from .model import canonical_variant
    out = {k: v for k, v in config.items() if k != "backend"}
    try:
        out["variant"] = canonical_variant(out["variant"])
    except (KeyError, ValueError):
        pass
    size = out.get("input_size")
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        out["input_size"] = [size, size]
    elif isinstance(size, tuple):
        out["input_size"] = list(size)
    if isinstance(out.get("ltl_levels"), (list, tuple)):
        out["ltl_levels"] = sorted(out["ltl_levels"])
    return out


def _refuse_other_config(saved: Dict, config: Dict, source: Path) -> None:
    a, b = _normal_config(saved), _normal_config(config)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise CheckpointError(f"{source} was saved for another model config (differs in {diff}: "
                              f"{ {k: a.get(k) for k in diff} } there, { {k: b.get(k) for k in diff} } "
                              f"here); load it with load_model, which builds its own")


def _load_state(model: torch.nn.Module, weights: Path) -> None:
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read weights {weights}: {exc}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(f"weights {weights} do not fit the model its config describes: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)


def load_model(checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
               backend: Optional[str] = None, memory_format: str = "auto") -> Tuple[torch.nn.Module, Dict]:
    """A ready Harmonizer (eval mode, on ``device``) and its config.

    Args:
        checkpoint: a run directory (its best, else latest checkpoint), a checkpoint folder, a
            ``.safetensors`` file (with its ``.json`` beside it), or None for the packaged
            default weights.
        device: where to put the model.
        backend: op backend for PTL/LTL, overriding the stored one; "auto" picks per device;
            None keeps the stored one where it can run on ``device`` (else, with a warning, "auto").
        memory_format: the weights' layout (:func:`regharm_ext.model.memory_format_for`: "auto"
            is channels_last on the CPU, where it runs faster). The results do not depend on it
            beyond float rounding.

    Returns:
        (model, config): ``config`` is the model's constructor arguments (``variant``,
        ``input_size``, ...) plus ``"trained"`` (how it was trained, may be empty),
        ``"step"``/``"epoch"`` when known, and ``"checkpoint"`` (the weights path).
    """
    from .model import memory_format_for

    layout = memory_format_for(memory_format, device)   # a bad name fails before any file is read
    weights = resolve_checkpoint(checkpoint)
    meta = _read_json(weights.with_suffix(".json"), "model config (JSON beside the weights)")
    saved = meta.get("model")
    stored = saved.get("backend") if isinstance(saved, dict) else None
    if backend is None and isinstance(stored, str):
        from .backends import NAMES, unavailable_reason
        reason = unavailable_reason(stored, device) if stored in NAMES else None
        if reason is not None:
            # the backend a run trained with is run control, not architecture: the results differ
            # by float rounding only, so a model trained on a GPU still loads on a CPU
            warnings.warn(f"{weights} was trained with backend {stored!r}, which cannot run on {device} "
                          f"({reason}); using the automatic choice (backend= or --backend picks one)", stacklevel=2)
            backend = "auto"
    if backend is not None:
        meta = dict(meta, model=dict(saved or {}, backend=None if backend == "auto" else backend))
    model = _build(meta, weights.with_suffix(".json"))
    _load_state(model, weights)
    model.to(device, memory_format=layout).eval()
    config = dict(model.config)
    config.update({"trained": meta.get("trained", {}), "checkpoint": str(weights)})
    for k in ("step", "epoch"):
        if k in meta:
            config[k] = meta[k]
    return model, config


def _state_in_param_layout(optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's strides: the file
    holds them contiguous, and a channels_last parameter would otherwise be updated from mixed
    layouts at every step (the same values, more slowly)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_checkpoint(run_dir: PathLike, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> Dict:
    """Restore a run's latest checkpoint into ``model`` (and ``optimizer``/``scheduler``); set
    the RNG states as they were when it was saved. Returns the training ``state`` dict."""
    weights = resolve_checkpoint(run_dir, prefer="latest")
    ck = weights.parent
    meta = _read_json(ck / "model.json", "model config")
    saved = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ck / 'model.json'} holds no model config (a JSON object with a "
                              f"'model' object); the checkpoint is damaged: resume from another one")
    # the op backend is run control, not architecture: a run may resume on another backend
    _refuse_other_config(saved, model.config, ck)
    _load_state(model, weights)
    tree = _read_json(ck / "train_state.json", "training state")
    st = ck / "train_state.safetensors"
    if not st.is_file():
        raise CheckpointError(f"missing training state tensors: {st}")
    try:
        full = _decode(tree, load_file(str(st)))
    except CheckpointError:
        raise
    except Exception as exc:   # safetensors' own errors, or references to missing tensors
        raise CheckpointError(f"cannot read the training state in {ck}: {type(exc).__name__}: {exc}") from None
    unknown = sorted(set(full) - {"state", "rng", "optimizer", "scheduler"}) if isinstance(full, dict) else ["?"]
    if unknown or "state" not in full or "rng" not in full:
        raise CheckpointError(f"{ck / 'train_state.json'}: unknown or missing sections (unknown {unknown})")
    missing = ([] if isinstance(full["state"], dict) else ["state"]) + \
        [f"rng.{k}" for k in _RNG_KEYS if not isinstance(full["rng"], dict) or k not in full["rng"]]
    if missing:
        raise CheckpointError(f"{ck / 'train_state.json'} lacks {missing}; the checkpoint is damaged: "
                              f"resume from another one")
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if what not in full:
            raise CheckpointError(f"{ck} holds no {what} state")
        try:
            obj.load_state_dict(full[what])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{ck}: the {what} state does not fit this run: {exc}") from None
    if optimizer is not None:
        _state_in_param_layout(optimizer)
    if restore_rng:
        set_rng_state(full["rng"])
    return full["state"]


# --------------------------------------------------------------------------- packaging
def package_weights(run_dir: PathLike, out: PathLike = DEFAULT_WEIGHTS, notes: Optional[Dict] = None) -> Path:
    """Copy a run's best (else latest) weights to ``out`` (default: the packaged default weights),
    with a ``trained`` section: the run's training info and config, its final validation table
    (``val.json``) when there is one, and ``notes``."""
    run_dir = Path(run_dir)
    model, config = load_model(run_dir)
    trained = dict(config.get("trained") or {})
    if (run_dir / "config.json").is_file():
        trained["config"] = _read_json(run_dir / "config.json", "run config")
    chosen = Path(config["checkpoint"]).parent.name
    if (run_dir / "val.json").is_file():
        val = _read_json(run_dir / "val.json", "validation table")
        if val.get("checkpoint") in (None, "", chosen):
            trained["validation"] = {r["method"]: r["subsets"]["All"] for r in val.get("results", [])}
        else:   # the table was made for another checkpoint: do not attach figures that are not these
            print(f"note: {run_dir / 'val.json'} scores {val['checkpoint']}, not {chosen}; no validation "
                  f"figures attached (python -m regharm_ext.train --out {run_dir} --resume recomputes them)")
    trained["source"] = {"run": run_dir.name, "checkpoint": chosen,
                         "step": config.get("step"), "epoch": config.get("epoch")}
    trained.update(notes or {})
    return save_weights(out, model, {"trained": trained})


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m regharm_ext.checkpoint",
                                description="Package a run's best weights (default: as the shipped default weights).")
    p.add_argument("run_dir")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file to write (.safetensors)")
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                   help="extra entries for the 'trained' section (JSON values allowed)")
    a = p.parse_args(argv)
    notes = {}
    for item in a.note:
        key, _, value = item.partition("=")
        try:
            notes[key] = json.loads(value)
        except json.JSONDecodeError:
            notes[key] = value
    try:
        path = package_weights(a.run_dir, a.out, notes)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}")
    print(f"wrote {path} and {path.with_suffix('.json')} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
