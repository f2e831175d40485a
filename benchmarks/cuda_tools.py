"""Running a Python driver under one of the CUDA toolkit's command-line tools (compute-sanitizer,
Nsight Compute's ncu) within a time budget: what benchmarks/sanitize_cuda.py and
benchmarks/ncu_kernels.py share. Torch-free, so the wrappers start fast."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import List, Optional, Tuple


def find_tool(name: str, env_var: str) -> Optional[str]:
    """The tool's path: $env_var, then PATH, then $CUDA_HOME/bin and /usr/local/cuda/bin."""
    candidates = [os.environ.get(env_var), shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def run_tool(cmd: List[str], limit: float, env=None) -> Tuple[str, object]:
    """(stdout + stderr, exit code) of ``cmd``, or (what it printed, "timed out ...") past
    ``limit`` seconds. The tool runs in a session of its own and the whole session is killed
    at the limit: killing the tool alone left its Python driver running on the GPU beside the
    next steps' timings."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        return out + err, proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return (out or "") + (err or ""), f"timed out after {limit:.0f} s"


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()
