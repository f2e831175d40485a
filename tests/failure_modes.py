"""The failure-mode table of README.md, generated from the tests that back each row.

    python tests/failure_modes.py                          # print the table
    python tests/failure_modes.py --update README.md     # rewrite between the markers

Bad-input rows come from the case lists of tests/test_bad_input.py; the others are listed here
with the test that shows them (tests/test_reliability_docs.py checks that every named test
exists and that the docs hold the current table).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

from regharm_ext.markdown_blocks import block_cli, cell, replace_block

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

BEGIN, END = "<!-- failure-modes:begin -->", "<!-- failure-modes:end -->"

# (area, situation, what the program does, "test_file.py::test_name")
TRAINING: List[Tuple[str, str, str, str]] = [
    ("training", "process killed (SIGKILL) mid-run",
     "`--resume` continues from the last complete checkpoint and finishes; with `--deterministic` "
     "its losses equal an uninterrupted run's",
     "test_crash_safety.py::test_sigkill_then_resume_finishes_like_an_uninterrupted_run"),
    ("training", "killed while a checkpoint is being written",
     "the checkpoint is written to a hidden temporary folder, synced, renamed into place, then "
     "`latest.json` is replaced atomically: the previous checkpoint stays the one loaded; leftovers "
     "are removed on resume",
     "test_crash_safety.py::test_kill_at_any_point_of_a_save_keeps_the_previous_checkpoint"),
    ("training", "killed before the first checkpoint",
     "`--resume` starts the run from the beginning (its `config.json` is kept)",
     "test_crash_safety.py::test_resume_before_the_first_checkpoint_starts_over"),
    ("training", "`--resume` after an interruption at any step, `--deterministic`",
     "same data order, RNG states, gradient-scaler state and thread count: every later loss equals "
     "the uninterrupted run's exactly (CPU; fp32, bf16 and fp16 autocast)",
     "test_crash_safety.py::test_deterministic_resume_equals_the_uninterrupted_run"),
    ("training", "Ctrl-C (SIGINT) in the middle of a step",
     "the step finishes and the run stops there, exit status 1: the checkpoint equals an "
     "uninterrupted run's at that step (weights, BatchNorm statistics, Adam state); a second Ctrl-C "
     "stops at once and saves nothing of the unfinished step",
     "test_train_cli.py::test_ctrl_c_mid_forward_saves_the_step_boundary"),
    ("training", "SIGTERM (a scheduler, `timeout`, `docker stop`) in the middle of a step",
     "stops like Ctrl-C, at the step boundary with an exact checkpoint",
     "test_train_cli.py::test_sigterm_mid_forward_saves_the_step_boundary_too"),
    ("training", "two runs started in the same second without `--out`, or into one `--out`",
     "the second gets `runs/<preset>-<time>-2`; an `--out` that holds a run's `config.json` is "
     "refused (it is created exclusively, so a race is refused too)",
     "test_train_cli.py::test_runs_started_in_the_same_second_get_their_own_directories"),
    ("training", "bad setting (`--lr -1`, `--variant foo`, `--batch-size 0`, an unavailable "
     "`--backend` or `--device`, an `--out` that cannot be a folder)",
     "`error: ...` on one line, exit status 2, before anything is written",
     "test_train_cli.py::test_bad_settings_are_one_line_exit_2_and_write_nothing"),
    ("training", "loss becomes NaN or Inf",
     "stops before the optimizer step with `error: the loss became nan at step N ...`, exit status 3; "
     "nothing is saved, `latest.json` still names the last good checkpoint",
     "test_crash_safety.py::test_nan_loss_stops_and_keeps_the_last_good_checkpoint"),
    ("training", "learning rate so large that the weights blow up (`--lr 1e30`)",
     "stopped the same way at the first non-finite loss",
     "test_crash_safety.py::test_exploding_lr_stops_with_a_clear_message"),
    ("training", "bad image in the training data",
     "`error: cannot read ... (listed in LIST:LINE)`, exit status 2; the checkpoints so far stay "
     "usable for `--resume`",
     "test_crash_safety.py::test_train_cli_reports_bad_data_in_one_line"),
    ("training", "`--batch-size` not divisible by the number of processes",
     "refused before training starts (the batch size is the global one)",
     "test_distributed.py::test_shards_of_a_global_batch_are_that_batch"),
    ("loading", "weights in a pickle file (`.pt`, `.pth`, `.ckpt`, `.bin`)",
     "refused: only safetensors + JSON are read; no code path calls `torch.load` or `pickle`",
     "test_crash_safety.py::test_pickle_is_never_loaded"),
    ("loading", "unknown key in the model JSON",
     "refused, naming the keys and the known ones",
     "test_crash_safety.py::test_unsafe_or_mismatched_checkpoints_are_refused"),
    ("loading", "tensor shapes that do not fit the model the JSON describes",
     "refused, naming each tensor with both shapes",
     "test_crash_safety.py::test_unsafe_or_mismatched_checkpoints_are_refused"),
    ("loading", "missing or unexpected tensors, corrupt safetensors file, wrong `format`",
     "refused with a message naming them",
     "test_crash_safety.py::test_unsafe_or_mismatched_checkpoints_are_refused"),
    ("loading", "`latest.json` / `best.json` that is JSON of the wrong shape",
     "refused, naming the pointer file and how to repair it",
     "test_edge_cases.py::test_wrong_pointer_is_a_checkpoint_error"),
    ("loading", "unknown field in a run's `config.json` or training state (`--resume`)",
     "refused, naming the fields",
     "test_crash_safety.py::test_unsafe_or_mismatched_checkpoints_are_refused"),
    ("loading", "a checkpoint whose JSON parses but lacks a training counter or an RNG state, or "
     "whose `model.json` is not an object", "refused on one line naming the file (`--resume`: exit "
     "status 2)", "test_train_cli.py::test_damaged_training_state_is_named"),
    ("training", "disk full (or another write error) while a checkpoint is written",
     "`error: cannot write a checkpoint …` naming the checkpoint that stays the latest, exit status "
     "2; nothing half-written is left, `--resume` continues after space is freed",
     "test_train_cli.py::test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint"),
    ("training", "torchrun: rank 0 slow to validate or save (other ranks idle past the collective "
     "timeout), or a stop at `--max-steps` while it saves",
     "the other ranks wait at a barrier with a 24-hour timeout and leave only after rank 0's "
     "checkpoint is complete",
     "test_distributed.py::test_torchrun_ranks_wait_for_rank_0s_validation_and_last_save"),
    ("training", "`--val-every` on iHarmony4 without `--holdout` (a best checkpoint picked on the "
     "test split)", "refused before anything is written: selection needs `--holdout N` training "
     "images kept out of training; the test split never picks a checkpoint",
     "test_train_cli.py::test_bad_settings_are_one_line_exit_2_and_write_nothing"),
    ("loading", "a checkpoint trained with a backend this device cannot run (`triton` on a CPU)",
     "loads on the automatic choice with one `note:` line; `--backend NAME` picks one, and one "
     "that cannot run is refused with the reason",
     "test_evaluate.py::test_a_model_trained_on_a_backend_this_device_lacks_loads_on_the_automatic_one"),
    ("training", "`triton` attention wider than an H100/H200 block's shared memory (float32 LTL at "
     "`--width 3`)", "refused before any launch, naming the width limits and the ways out "
     "(`native`, `torch`, `--amp bf16`)",
     "test_triton.py::test_attention_wider_than_an_h100_block_is_refused_with_the_reason"),
    ("training", "torchrun `--max-restarts N`: one rank dies",
     "the restarted job resumes the run in `--out` from its last checkpoint and finishes it",
     "test_distributed.py::test_torchrun_restart_after_a_rank_dies_resumes_the_run"),
    ("training", "torchrun `--max-restarts N`: `--max-steps`, Ctrl-C or SIGTERM",
     "the job stops there with exit status 0 (1 would make torchrun restart it past the stop)",
     "test_distributed.py::test_torchrun_with_restarts_stops_where_asked"),
]


def rows() -> List[Tuple[str, str, str, str]]:
    """Every row: (area, situation, what happens, backing test id)."""
    import test_bad_input as b

    out = list(TRAINING)
    for c in b.REFUSALS:
        out.append(("harmonize", c.situation, f"refused: `error: …{c.expect}…`, exit status 2, no output file",
                    f"test_bad_input.py::test_harmonize_refuses_in_one_line[{c.id}]"))
    for c in b.CONVERSIONS:
        out.append(("harmonize, datasets", c.situation, f"accepted: {c.outcome}",
                    f"test_bad_input.py::test_harmonize_converts_as_documented[{c.id}]"))
    for c in b.DATASET_REFUSALS:
        out.append(("datasets, evaluate", c.situation,
                    f"`DataError` naming the file and the list line (`…{c.expect}…`); the CLIs print it "
                    f"on one line, exit status 2",
                    f"test_bad_input.py::test_dataset_refuses_naming_file_and_list[{c.id}]"))
    out += [
        ("harmonize", "image too large for memory", "refused from the headers before decoding "
         "(`error: … needs about N GiB of memory but only M GiB is available`)",
         "test_bad_input.py::test_not_enough_memory_is_refused_before_decoding"),
        ("harmonize", "very large image that fits", "processed in strips of rows (memory about 31 "
         "bytes per pixel, 15 above 16 megapixels, `--explain` adds 17); above 16 megapixels Pillow shrinks it for the network on 8-bit data",
         "test_bad_input.py::test_memory_estimate_covers_a_real_run"),
        ("datasets", "empty or full mask", "accepted: the loss floors the area at A_min, fMSE of an "
         "empty mask is 0; loss, gradients and metrics stay finite",
         "test_bad_input.py::test_empty_and_full_masks_keep_loss_and_metrics_finite"),
        ("evaluate", "unreadable file found by a DataLoader worker (`--workers N`)",
         "the worker's error is reported on one line, without its traceback",
         "test_bad_input.py::test_evaluate_cli_reports_a_bad_file_in_one_line"),
        ("Python API", "`harmonize_tensor` given a 0..255 or NaN mask or image, an 8-bit image or "
         "mask, or a mask of another shape", "`ValueError`/`TypeError` naming the argument, its shape, dtype "
         "or range and the fix (e.g. `mask / 255`); nothing is broadcast or cast silently",
         "test_api_checks.py::test_harmonize_tensor_refuses_bad_input_by_name"),
        ("Python API", "`harmonize_array` given a mask of another size, float or 0/1 data, a tensor "
         "or an extra channel axis", "`ValueError`/`TypeError` naming the array, its shape or dtype "
         "and the fix (e.g. `mask * 255`)",
         "test_harmonize.py::test_harmonize_array_refuses_what_it_cannot_read_rightly"),
        ("Python API", "`load_weights` into a model of another config with the same tensors "
         "(`base` vs `rbase`, another input size)", "`CheckpointError` naming the differing fields "
         "(the description beside the weights decides; `load_model` builds the right model)",
         "test_crash_safety.py::test_weights_load_only_into_the_model_they_describe"),
        ("Python API", "8-bit images or masks given to `image_metrics`, `fmse_loss` or `reinhard`",
         "`TypeError` naming the argument and the fix (`.float() / 255`)",
         "test_api_checks.py::test_metrics_and_loss_refuse_8_bit_data_and_bad_arguments"),
        ("Python API", "an unknown backend name (`backend=` or `REGHARM_BACKEND`)",
         "`ValueError` when the layer is built, listing the backends",
         "test_api_checks.py::test_layers_refuse_an_unknown_backend_when_built"),
        ("Python API", "`bg` or `key_bias` that requires a gradient",
         "treated as data on every backend (SPEC §2, §3): no gradient reaches them",
         "test_api_checks.py::test_data_arguments_get_no_gradient_on_any_backend"),
    ]
    return out


def markdown_table() -> str:
    lines = ["| Where | Situation | What the program does | Test |", "|---|---|---|---|"]
    for area, situation, outcome, test in rows():
        lines.append(f"| {cell(area)} | {cell(situation)} | {cell(outcome)} | `{cell(test)}` |")
    return "\n".join(lines)


def update(text: str) -> str:
    return replace_block(text, BEGIN, END, markdown_table())


def main(argv=None) -> int:
    return block_cli(argv, markdown_table, BEGIN, END, prog=None, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
