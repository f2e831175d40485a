"""`python -m regharm_ext.train` with faults injected, for the torchrun tests (test_distributed.py).

    torchrun ... tests/train_with_faults.py [train options]

Environment:
    FAULT_SLOW_MAIN=S      rank 0 takes S more seconds in every validation and every checkpoint
                           save, and the training steps' collectives (distributed.mean_across)
                           time out after S/2 seconds: a rank that waited for rank 0 in one of
                           them would fail.
    FAULT_KILL_RANK1_AT=N  on torchrun's first attempt, rank 1 dies (exit 137, as if killed) when
                           it computes its N-th loss.
"""
import datetime
import os
import sys
import time

import regharm_ext.train as T
from regharm_ext import distributed

rank = int(os.environ.get("RANK", "0"))
slow = float(os.environ.get("FAULT_SLOW_MAIN", "0"))
if slow:
    import torch
    import torch.distributed as dist

    quick_val, save = T._quick_val, T.save_checkpoint

    def impatient_mean(values, d, device):
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, async_op=True).wait(timeout=datetime.timedelta(seconds=slow / 2))
        return (t / d.world).tolist()

    def slow_val(*args, **kwargs):
        time.sleep(slow)
        return quick_val(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(slow)
        return save(*args, **kwargs)

    distributed.mean_across, T._quick_val, T.save_checkpoint = impatient_mean, slow_val, slow_save

kill_at = int(os.environ.get("FAULT_KILL_RANK1_AT", "0"))
if kill_at and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    loss, calls = T.fmse_loss, [0]

    def dying_loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(137)
        return loss(*args, **kwargs)

    T.fmse_loss = dying_loss

sys.exit(T.main(sys.argv[1:]))
