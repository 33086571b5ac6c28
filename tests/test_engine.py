import errno
import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.data.chat import tokenize_prompt_response
from alignkit.data.collate import epoch_batches_fn, pad_batch
from alignkit.data.records import Message
from alignkit.engine.config import SamplingTrainConfig, SFTTrainConfig, TrainConfig
from alignkit.engine.logging import read_metrics
from alignkit.engine.trainer import EarlyStopping, Engine, NonFiniteError, fit, lr_factor, steps_for
from alignkit.models.forward import target_logprobs
from alignkit.models.tiny import tiny_model


def nll_step(model):
    def step(batch):
        logps, _ = target_logprobs(model, batch)
        return -logps.sum(), float(logps.numel()), {}
    return step


def _data(tok, n=8):
    return [tokenize_prompt_response(tok, (Message("user", f"add {i} and {i + 1}"),), str(2 * i + 1) * (1 + i % 3))
            for i in range(n)]


def test_schedule_warmup_cosine_floor():
    cfg = TrainConfig(warmup_steps=2, min_lr_ratio=0.1)
    # warmup: (step+1)/2 -> 0.5, 1.0; then cosine from 1.0 down to 0.1 over the remaining 8 steps
    assert lr_factor(0, 10, cfg) == 0.5 and lr_factor(1, 10, cfg) == 1.0
    assert lr_factor(2, 10, cfg) == pytest.approx(1.0)
    # halfway through the decay (step 6 = 2 + 4 of 8): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_factor(6, 10, cfg) == pytest.approx(0.55)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 10, TrainConfig(warmup_steps=2, schedule="constant")) == 1.0


def test_accumulation_equals_full_batch(tok, tmp_path):
    data = _data(tok)
    grads = []
    for split in (1, 2, 4):  # one batch of 8, two of 4, four of 2
        model = tiny_model(seed=0)
        engine = Engine(model, TrainConfig(output_dir=str(tmp_path / str(split)), progress=False), total_steps=1)
        size = len(data) // split
        micro = [pad_batch(data[i: i + size], tok.pad_token_id) for i in range(0, len(data), size)]
        stats = engine.accumulate(micro, nll_step(engine.model))
        grads.append([p.grad.clone() for p in model.parameters()])
        assert stats["units"] == sum(e.n_targets for e in data)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _train(tok, out, crash_after=None, resume=False):
    data = _data(tok, 12)
    cfg = SFTTrainConfig(output_dir=str(out), lr=1e-3, max_steps=6, grad_accum=2, batch_size=2, save_every=2,
                         progress=False, resume=resume, warmup_steps=1, seed=3)
    model = tiny_model(seed=1)
    engine = Engine(model, cfg, total_steps=cfg.max_steps, resume=cfg.resume)
    fit(engine, _crashing(nll_step(engine.model), crash_after), epoch_batches_fn(data, tok.pad_token_id, cfg.seed, False, cfg.batch_size, 0))
    return model


def _crashing(step, crash_after: int | None):
    """`step`, raising KeyboardInterrupt (a kill) on the call after the first `crash_after` ones."""
    calls = [0]

    def crashing(batch):
        calls[0] += 1
        if crash_after is not None and calls[0] > crash_after:
            raise KeyboardInterrupt("killed")
        return step(batch)

    return crashing


def test_resume_after_kill_matches_uninterrupted(tok, tmp_path):
    whole = _train(tok, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train(tok, tmp_path / "cut", crash_after=9)  # dies inside step 5, after the step-4 checkpoint
    resumed = _train(tok, tmp_path / "cut", resume=True)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    steps = [row["step"] for row in read_metrics(tmp_path / "cut") if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows of the killed attempt past the checkpoint are gone
    whole_loss = [r["loss"] for r in read_metrics(tmp_path / "whole")]
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == whole_loss


def test_nonfinite_loss_stops_with_clear_error(tok, tmp_path):
    engine = Engine(tiny_model(), TrainConfig(output_dir=str(tmp_path), progress=False), total_steps=1)
    batch = pad_batch(_data(tok, 2), tok.pad_token_id)
    with pytest.raises(NonFiniteError) as err:
        engine.train_step([batch], lambda b: (torch.tensor(math.nan, requires_grad=True), 1.0, {}))
    assert str(err.value) == ("step 1: loss is nan; stopping (last good checkpoint: no checkpoint yet). Lower train.lr, "
                              "or set train.on_nonfinite=skip to skip such steps")


def _nan_on_step_2(tok, out, on_nonfinite):
    """fit over 3 steps, a checkpoint after every step; the step function returns NaN on step 2."""
    cfg = SFTTrainConfig(output_dir=str(out), lr=1e-3, batch_size=2, save_every=1, keep_checkpoints=0, progress=False,
                         on_nonfinite=on_nonfinite)
    engine = Engine(tiny_model(seed=3), cfg, total_steps=3)
    step, calls, weights = nll_step(engine.model), [0], []

    def nan_on_2(batch):
        calls[0] += 1
        weights.append(engine.model.lm_head.weight.detach().clone())  # before the step
        loss, units, sums = step(batch)
        return (loss * math.nan if calls[0] == 2 else loss), units, sums

    batches = epoch_batches_fn(_data(tok, 6), tok.pad_token_id, cfg.seed, False, cfg.batch_size, 0)
    return engine, lambda: fit(engine, nan_on_2, batches), weights


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tok, tmp_path):
    engine, run, _ = _nan_on_step_2(tok, tmp_path, "stop")
    with pytest.raises(NonFiniteError) as err:
        run()
    assert str(err.value) == (f"step 2: loss is nan; stopping (last good checkpoint: {tmp_path / 'checkpoints' / 'step-0000001'}). "
                              "Lower train.lr, or set train.on_nonfinite=skip to skip such steps")
    assert engine.step == 1 and sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000001"]


def test_nonfinite_loss_skip_skips_the_step_and_counts_it(tok, tmp_path, caplog):
    engine, run, weights = _nan_on_step_2(tok, tmp_path, "skip")
    with caplog.at_level("WARNING", logger="alignkit"):
        run()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == ["step 2: loss is nan; step skipped"]
    rows = [r for r in read_metrics(tmp_path) if "epoch" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("skipped") for r in rows] == [None, 1.0, None] and "loss" not in rows[1]
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[0], weights[1])  # step 2 left the weights alone
    assert engine.step == 3


def _stage(tok, out, **kw):
    cfg = SamplingTrainConfig(output_dir=str(out), lr=1e-3, batch_size=4, progress=False, seed=1, **kw)
    engine = Engine(tiny_model(seed=2), cfg, total_steps=steps_for(2, cfg))  # 8 examples: 2 micro-batches an epoch
    return engine, epoch_batches_fn(_data(tok, 8), tok.pad_token_id, cfg.seed, False, cfg.batch_size, 0)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(tok, tmp_path):
    """Patience 2: a tie resets the count and moves the best epoch later; two worse epochs in a
    row stop training with steps left; the best epoch's weights come back, nothing is saved."""
    engine, batches = _stage(tok, tmp_path, epochs=10)
    scores, snapshots = iter([0.2, 0.5, 0.4, 0.5, 0.3, 0.1, 0.9]), []

    def val_fn(model):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"reward": next(scores)}

    metrics = fit(engine, nll_step(engine.model), batches, early_stopping=EarlyStopping(val_fn, patience=2),
                  checkpoints=False)
    assert len(snapshots) == 6 and engine.step == 12 < engine.total_steps == 20  # stopped after epoch 6 of 10
    assert metrics["val/best_epoch"] == 4 and metrics["val/reward"] == 0.5 and engine.loop_state["epoch"] == 5
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, snapshots[3][k]), k
    assert not torch.equal(snapshots[3]["lm_head.weight"], snapshots[5]["lm_head.weight"])  # training moved on
    assert [r["eval/reward"] for r in read_metrics(tmp_path) if "eval/reward" in r] == [0.2, 0.5, 0.4, 0.5, 0.3, 0.1]
    assert not (tmp_path / "checkpoints").exists()


def _stopping_run(tok, out, crash_after=None, resume=False):
    """Early stopping (patience 2) with a checkpoint every step; the validation score is a fixed
    function of the weights that goes up and down, so the best epoch is not the last."""
    cfg = SamplingTrainConfig(output_dir=str(out), lr=1e-3, batch_size=4, progress=False, seed=1, epochs=8, save_every=1)
    engine = Engine(tiny_model(seed=2), cfg, total_steps=steps_for(2, cfg), resume=resume)
    score = lambda m: {"reward": float(int(abs(m.lm_head.weight.double().sum().item()) * 1e5) % 5)}
    batches = epoch_batches_fn(_data(tok, 8), tok.pad_token_id, cfg.seed, False, cfg.batch_size, 0)
    metrics = fit(engine, _crashing(nll_step(engine.model), crash_after), batches, early_stopping=EarlyStopping(score, patience=2))
    return engine, metrics


def test_early_stopping_resumes_from_a_checkpoint_as_if_never_stopped(tok, tmp_path):
    whole, expected = _stopping_run(tok, tmp_path / "whole")
    assert expected["val/best_epoch"] < whole.loop_state["epoch"] + 1  # the best epoch's weights were restored
    assert whole.step == 8  # 4 epochs of 2 steps: epochs 3 and 4 were worse than epoch 2
    for i, crash_after in enumerate((3, 2)):  # dies in step 4 (epoch 2), resumes at 3, then dies in step 6 (epoch 3)
        with pytest.raises(KeyboardInterrupt):
            _stopping_run(tok, tmp_path / "cut", crash_after=crash_after, resume=i > 0)
    resumed, got = _stopping_run(tok, tmp_path / "cut", resume=True)
    assert {k: got[k] for k in ("val/reward", "val/best_epoch")} == {k: expected[k] for k in ("val/reward", "val/best_epoch")}
    assert resumed.step == whole.step
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    rows = lambda d: [{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")} for r in read_metrics(d)]
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_last_epoch_is_validated_and_max_epochs_caps_steps(tok, tmp_path):
    """The last epoch, cut short by the step count, is still validated (epochs=1.5: 3 steps, 2
    epochs); with max_steps beyond max_epochs' worth, training ends after max_epochs epochs."""
    engine, batches = _stage(tok, tmp_path / "a", epochs=1.5)
    seen = []
    metrics = fit(engine, nll_step(engine.model), batches,
                  early_stopping=EarlyStopping(lambda m: seen.append(1) or {"reward": float(len(seen))}), checkpoints=False)
    assert engine.step == 3 and len(seen) == 2 and metrics["val/best_epoch"] == 2 and engine.loop_state == {"epoch": 1, "index": 1}
    engine, batches = _stage(tok, tmp_path / "b", max_steps=50)
    fit(engine, nll_step(engine.model), batches, max_epochs=3, checkpoints=False)
    assert engine.step == 6 and engine.total_steps == 50 and engine.loop_state == {"epoch": 2, "index": 2}


def test_cli_reports_a_nonfinite_stop_as_an_error_line(tmp_path, monkeypatch, capsys):
    """The engine's stop on a non-finite loss reaches the user as one `alignkit <cmd>: error:` line, exit 1."""
    import alignkit.algorithms.sft as sft
    from alignkit.cli import main

    def run(cfg):
        raise NonFiniteError("step 3: loss is nan; stopping (last good checkpoint: no checkpoint yet)")

    monkeypatch.setattr(sft, "run", run)
    assert main(["sft", f"train.output_dir={tmp_path}"]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "alignkit sft: error: step 3: loss is nan; stopping (last good checkpoint: no checkpoint yet)")


def _full_disk_at(monkeypatch, where: str, call: int):
    """Make the `call`-th checkpoint write fail with ENOSPC in `where`: the weights file or the
    optimizer file (each after writing part of it), or the `latest` pointer."""
    import alignkit.engine.checkpoint as ckpt

    name = {"weights": "save_file", "optimizer": "save", "latest": "write_text_atomic"}[where]
    owner = ckpt.torch if where == "optimizer" else ckpt
    real, calls = getattr(owner, name), [0]

    def write(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return real(obj, path, *args, **kwargs)
        if where != "latest":
            Path(path).write_bytes(b"\0" * 100)  # what a write cut short by a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owner, name, write)


@pytest.mark.parametrize("where", ["weights", "optimizer", "latest"])
def test_full_disk_during_a_checkpoint_stops_and_keeps_the_last_good_one(tok, tmp_path, monkeypatch, where):
    """ENOSPC while writing the step-4 checkpoint (the 2nd, save_every=2): the run stops with an
    error naming that checkpoint and the last good one (step 2), which stays as it was, with
    `latest` naming it; once there is room, --resume ends where an uninterrupted run ends."""
    from alignkit.engine.checkpoint import CheckpointWriteError, latest_checkpoint

    whole = _train(tok, tmp_path / "whole")
    _full_disk_at(monkeypatch, where, 2)
    root = tmp_path / "cut" / "checkpoints"
    with pytest.raises(CheckpointWriteError) as err:
        _train(tok, tmp_path / "cut")
    good = root / "step-0000002"
    assert str(err.value) == (f"could not write checkpoint {root / 'step-0000004'}: the disk is full; the run stops here. "
                              f"The last good checkpoint is {good} (free space, then run the same command with --resume "
                              "to continue from it)")
    assert err.value.errno == errno.ENOSPC
    assert (root / "latest").read_text() == "step-0000002" and latest_checkpoint(root) == good
    assert not list(root.glob(".tmp-*"))  # nothing half-written is left behind
    monkeypatch.undo()
    resumed = _train(tok, tmp_path / "cut", resume=True)  # from step 2: intact, since this ends bit for bit where `whole` did
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_cli_reports_a_full_disk_as_an_error_line(tmp_path, monkeypatch, capsys):
    from alignkit.cli import main
    from alignkit.models.tiny import save_tiny

    _full_disk_at(monkeypatch, "weights", 1)
    out = tmp_path / "run"
    code = main(["sft", f"model.path={save_tiny(str(tmp_path / 'tiny'))}", f"train.output_dir={out}", "train.max_steps=2",
                 "train.save_every=1", "train.progress=false", "train.threads=1", "eval.problems=0", "data.builtin=arithmetic",
                 "data.arithmetic_examples=8"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"alignkit sft: error: could not write checkpoint {out / 'checkpoints' / 'step-0000001'}: the disk is full; the run "
        "stops here. The last good checkpoint is none (the run has to start again)")


def test_resume_finds_the_newest_complete_checkpoint_whatever_a_kill_left(tok, tmp_path):
    """`latest` naming a directory that is gone (killed while the same step was rewritten), a
    temporary directory of a killed write, a step directory renamed in before `latest` moved:
    the newest complete checkpoint is used, and the next save cleans up."""
    from alignkit.engine.checkpoint import latest_checkpoint, save_checkpoint

    model = tiny_model(seed=1)
    engine = Engine(model, TrainConfig(output_dir=str(tmp_path), progress=False), total_steps=1)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(root, step, model, engine.optimizer, {"epoch": 0}, keep=0)
    assert latest_checkpoint(root) == root / "step-0000002"
    (root / "step-0000002").rename(root / ".old-step-0000002")  # killed between moving step 2 aside and renaming its rewrite in
    (root / ".tmp-killed").mkdir()
    (root / ".tmp-killed" / "trainable.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(root) == root / ".old-step-0000002"
    (root / ".old-step-0000002").rename(root / "step-0000002")
    (root / "latest").write_text("step-0000001")  # killed after step 2 was renamed in, before `latest` moved
    assert latest_checkpoint(root) == root / "step-0000001"  # what `latest` names, when it is complete
    (root / "step-0000001" / "state.pt").unlink()
    assert latest_checkpoint(root) == root / "step-0000002"
    save_checkpoint(root, 2, model, engine.optimizer, {"epoch": 1}, keep=0)  # the same step again (a resumed run's end)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    assert json.loads((root / "step-0000002" / "loop.json").read_text()) == {"step": 2, "epoch": 1}


def test_resume_drops_rows_logged_after_the_checkpoint(tok, tmp_path):
    """Rows logged after the last checkpoint (at its step, like a final evaluation) and half a line
    cut by a kill are gone when the run resumes."""
    _train(tok, tmp_path)
    rows = (tmp_path / "metrics.jsonl").read_text()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "eval/loss": 1.0}\n{"step": 6, "eval/acc')
    engine = Engine(tiny_model(seed=1), SFTTrainConfig(output_dir=str(tmp_path), progress=False, seed=3), total_steps=6,
                    resume=True)
    assert engine.step == 6 and (tmp_path / "metrics.jsonl").read_text() == rows


def test_a_fresh_engine_seeds_python_and_numpy(tmp_path):
    """Their generators start from OS entropy in each process; a checkpoint's RNG states are only
    the uninterrupted run's when every process starts them from the seed."""
    import random

    import numpy as np

    values = []
    for _ in range(2):
        random.seed()
        np.random.seed()
        Engine(tiny_model(), TrainConfig(output_dir=str(tmp_path), progress=False, seed=7), total_steps=1)
        values.append((random.random(), np.random.rand()))
    assert values[0] == values[1] == (random.Random(7).random(), np.random.RandomState(7).rand())
