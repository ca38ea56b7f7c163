"""Checkpoint lookup and the SIGTERM / SIGINT handler (the save/resume round trip is in test_run.py)."""
import os
import signal

import pytest

from train.checkpoint import GracefulStop
from train.rundir import RunDirError, checkpoint_path, find_resume_checkpoint, list_checkpoints


def test_latest_complete_checkpoint_wins_and_temporaries_are_ignored(tmp_path):
    for step in (20, 100, 3):
        checkpoint_path(tmp_path, step).mkdir(parents=True)
    (tmp_path / "checkpoints/.tmp-step-000200").mkdir()  # a save interrupted before its rename
    (tmp_path / "checkpoints/step-000300.txt").write_text("not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000020", "step-000100"]
    assert find_resume_checkpoint("auto", tmp_path).name == "step-000100"
    assert find_resume_checkpoint("auto", tmp_path / "fresh") is None
    assert find_resume_checkpoint("none", tmp_path) is None


def test_explicit_resume_path_must_be_a_checkpoint(tmp_path):
    with pytest.raises(RunDirError, match="not a densevid checkpoint folder"):
        find_resume_checkpoint(str(tmp_path), tmp_path)
    (tmp_path / "trainer-rank0.pt").write_bytes(b"")
    assert find_resume_checkpoint(str(tmp_path), tmp_path / "elsewhere") == tmp_path


def test_signals_become_a_stop_request_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_aborts():
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
