"""Crash safety: SIGKILL a training process at random points, resume, lose nothing.

tests/crash_train_script.py trains a tiny model through StageLoop with a checkpoint after
every step. The test kills it with SIGKILL at random moments, half of them aimed inside a
checkpoint write (stretched by ``CRASH_TEST_SLOW``) and half inside a step, restarts it until
it finishes, and checks that
- after every kill, each ``checkpoint-<step>`` folder (no suffix) is complete: it has the
  COMPLETE marker, its loop state parses and its weights load;
- the final weights and the logged loss sequence equal those of an uninterrupted run.
A second test kills a process that keeps *replacing* one checkpoint folder (the two-rename
path of ``atomic_directory_write``) and checks that a complete version always survives.

Bounded in CI (a few kills); ``COMPODISTILL_FUZZ=1`` kills many more times.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from compodistill.train.checkpoint import (is_complete, latest_checkpoint,  # noqa: E402
                                           recover_checkpoints)
from compodistill.train.metrics import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "crash_train_script.py"
FUZZ = os.environ.get("COMPODISTILL_FUZZ", "0") not in ("", "0")
STEPS = 12 if FUZZ else 6
KILLS = 40 if FUZZ else 2
SLOW = "0.15"
TIMEOUT = 120


def _env(slow: str) -> dict:
    env = dict(os.environ, CRASH_TEST_SLOW=slow, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("COMPODISTILL_BACKEND", None)
    return env


def _launch(out: Path, steps: int, slow: str, keep_last: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(steps), str(keep_last)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(slow))


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]


def _run_until_killed(out: Path, steps: int, rng: random.Random, keep_last: int) -> bool:
    """Start a run, SIGKILL it at a random event (+ a random delay); False if it finished."""
    proc = _launch(out, steps, SLOW, keep_last)
    target = rng.choice(("step", "ckpt-begin", "ckpt-write", "ckpt-end"))
    done = latest_checkpoint(out)
    remaining = steps - (int(done.name.split("-")[1]) if done is not None else 0)
    skip = rng.randrange(0, max(1, remaining // 2))  # matching events to let pass first
    seen, killed = 0, False
    deadline = time.monotonic() + TIMEOUT
    for line in proc.stdout:
        if time.monotonic() > deadline:
            break
        name = line.split()[0] if line.strip() else ""
        if name == target:
            seen += 1
            if seen > skip:
                time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    proc.wait(timeout=TIMEOUT)
    if not killed:
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
    proc.stdout.close(), proc.stderr.close()
    return killed and proc.returncode == -signal.SIGKILL


def check_no_partial_checkpoint(stage: Path) -> int:
    """Every unsuffixed checkpoint folder is complete and loads; returns how many."""
    from safetensors.torch import load_file

    count = 0
    for path in stage.glob("checkpoint-*"):
        if not path.name.split("-", 1)[1].isdigit():
            continue  # .tmp / .old / .del: never read as a checkpoint
        assert is_complete(path), f"{path.name} has no COMPLETE marker"
        state = json.loads((path / "loop_state.json").read_text())
        assert state["step"] == int(path.name.split("-")[1])
        weights = list(path.glob("model*.safetensors")) or list(path.glob("pytorch_model*.bin"))
        assert weights, f"{path.name}: no model weights"
        for w in weights:
            tensors = load_file(w) if w.suffix == ".safetensors" else torch.load(w)
            assert all(torch.isfinite(t).all() for t in tensors.values())
        assert (path / "optimizer.bin").exists()
        torch.load(path / "optimizer.bin", weights_only=False)
        count += 1
    return count


def _losses(stage: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(stage / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, in this process (saves a slow interpreter start)."""
    sys.path.insert(0, str(HERE))
    try:
        import crash_train_script
    finally:
        sys.path.remove(str(HERE))
    out = tmp_path_factory.mktemp("straight")
    crash_train_script.main(str(out), STEPS, 0)
    return torch.load(out / "final.pt"), _losses(out)


# keep_last=2 also prunes (and covers everything keep_last=0 does); both under FUZZ.
@pytest.mark.parametrize("keep_last", [0, 2] if FUZZ else [2])
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, uninterrupted,
                                                                     keep_last):
    """Campaigns of kill → check the disk → restart, until KILLS kills in all; each campaign
    ends with the run finished and compared with the uninterrupted one."""
    final, losses = uninterrupted
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    rng = random.Random(1234 + keep_last if not FUZZ else None)
    kills = restarts = campaigns = 0
    while kills < KILLS:
        out = tmp_path / f"campaign-{campaigns}"
        campaigns += 1
        while not (out / "final.pt").exists():
            restarts += 1
            if kills >= KILLS:  # enough: let this campaign finish
                _finish(_launch(out, STEPS, "0", keep_last))
            elif _run_until_killed(out, STEPS, rng, keep_last):
                kills += 1
            check_no_partial_checkpoint(out)
        resumed = torch.load(out / "final.pt")
        assert resumed["steps"] == STEPS
        torch.testing.assert_close(resumed["weight"], final["weight"], rtol=0, atol=0)
        torch.testing.assert_close(resumed["bias"], final["bias"], rtol=0, atol=0)
        assert _losses(out) == losses
        n = check_no_partial_checkpoint(out)
        assert n == (STEPS if keep_last == 0 else keep_last)
        leftovers = [p.name for p in out.glob("checkpoint-*") if "." in p.name]
        assert not leftovers, leftovers
    print(f"keep_last={keep_last}: {kills} kills over {restarts} starts in {campaigns} "
          f"campaigns, nothing lost")


REWRITE = r"""
import os, sys, time
from pathlib import Path
from compodistill.train import checkpoint as ck
replace = os.replace
def slow_replace(src, dst):
    replace(src, dst)
    time.sleep(0.05)  # widen the window between the two renames
ck.os.replace = slow_replace
stage = Path(sys.argv[1])
i = 0
while True:
    i += 1
    def write(tmp, i=i):
        (tmp / "payload.txt").write_text(str(i) * 1000)
        (tmp / "loop_state.json").write_text('{"step": 1}')
    ck.atomic_directory_write(stage / "checkpoint-1", write)
    print(i, flush=True)
"""


def test_sigkill_while_replacing_a_checkpoint_keeps_a_complete_one(tmp_path):
    """Kills land anywhere in atomic_directory_write, between its two renames included; the
    next start must find a complete checkpoint-1 (recovering ``.old`` when needed)."""
    rng = random.Random(7 if not FUZZ else None)
    recovered = 0
    for _ in range(60 if FUZZ else 4):
        proc = subprocess.Popen([sys.executable, "-c", REWRITE, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True, env=_env("0"))
        for _ in range(1 + rng.randrange(3)):
            proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        proc.stdout.close()
        if not (tmp_path / "checkpoint-1").exists():
            recovered += 1
        recover_checkpoints(tmp_path)
        ckpt = latest_checkpoint(tmp_path)
        assert ckpt is not None and ckpt.name == "checkpoint-1"
        text = (ckpt / "payload.txt").read_text()
        assert len(text) == 1000 * len(text[: len(text) // 1000]) and is_complete(ckpt)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    print(f"kills that left only checkpoint-1.old: {recovered}")


# --------------------------------------------------------------------------- deterministic cases

def test_resume_recovers_a_checkpoint_left_as_old_between_the_two_renames(tmp_path):
    """The state a kill between ``target -> target.old`` and ``tmp -> target`` leaves behind:
    only ``checkpoint-N.old`` (complete) and a finished ``checkpoint-N.tmp``. Before the fix,
    resume ignored both and restarted the stage from step 0."""
    from _helpers import losses, run_loop

    straight = tmp_path / "straight"
    _, w_straight = run_loop(straight, 8)
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_loop(crashed, 8, save_every=3, crash_call=5)  # checkpoint-3 written, then a crash
    (crashed / "checkpoint-3").rename(crashed / "checkpoint-3.old")
    (crashed / "checkpoint-3.tmp").mkdir()  # the unfinished new copy
    (crashed / "checkpoint-3.tmp" / "junk").write_text("partial")
    result, w_resumed = run_loop(crashed, 8, save_every=3)
    assert result.steps == 8
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-6)
    assert torch.allclose(w_straight, w_resumed)
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-3",
                                                                    "checkpoint-6"]


def test_kill_before_the_first_checkpoint_leaves_no_duplicate_metrics(tmp_path):
    """A run killed after logging step 1 but before any checkpoint restarts from step 0; its
    stale records must go (before the fix, metrics.jsonl held step 1 twice)."""
    from _helpers import losses, run_loop

    straight = tmp_path / "straight"
    run_loop(straight, 6)
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_loop(crashed, 6, save_every=4, crash_call=3)
    assert [r["step"] for r in read_metrics(crashed / "metrics.jsonl")] == [1, 2]
    run_loop(crashed, 6, save_every=4)
    assert [r["step"] for r in read_metrics(crashed / "metrics.jsonl")] == list(range(1, 7))
    assert losses(crashed) == pytest.approx(losses(straight), rel=1e-6)
    csv_rows = (crashed / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 6


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    from _helpers import run_loop

    from compodistill.train.checkpoint import prune_checkpoints

    run_loop(tmp_path, 5, save_every=1)
    assert len(list(tmp_path.glob("checkpoint-*"))) == 5
    (tmp_path / "checkpoint-9").mkdir()  # incomplete (no marker): never counted or deleted
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-4", "checkpoint-5", "checkpoint-9"]
    prune_checkpoints(tmp_path, 0)  # 0 keeps everything
    assert len(list(tmp_path.glob("checkpoint-*"))) == 3
