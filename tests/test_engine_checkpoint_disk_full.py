"""A full disk while saving: one line, the temporary removed, the previous checkpoint untouched.

The checkpoint manager is driven by a stand-in engine that writes files the way DeepSpeed lays out a
tag folder and then fails the way a full file system fails (``OSError`` ENOSPC/EDQUOT/EIO/EROFS, or
torch's zip writer's ``RuntimeError``). A real full file system (a small tmpfs) is in
``tests/test_engine_faults_disk.py``."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from transrec.engine.checkpoint import TMP_PREFIX, CheckpointManager, ClientState
from transrec.storage import EXIT_WRITE_FAILED, WriteFailed, check_space, guarded_write, is_write_failure


class FailingEngine:
    """Writes ``size`` bytes per save into ``dir/tag``; from save number ``fail_at`` on, writes half
    of it and raises ``error``."""

    def __init__(self, size: int, fail_at: int, error: BaseException):
        self.size, self.fail_at, self.error, self.saves = size, fail_at, error, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.saves += 1
        folder = Path(save_dir, tag)
        folder.mkdir(parents=True, exist_ok=True)
        if self.saves >= self.fail_at:
            (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * (self.size // 2))
            raise self.error
        torch.save({"w": torch.zeros(self.size // 4)}, folder / "mp_rank_00_model_states.pt")


def client(step):
    return ClientState(step=step, epoch=0, cursor=step * 8, seed=0)


ERRORS = {
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "EDQUOT": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "EIO": OSError(errno.EIO, "Input/output error"),
    "EROFS": OSError(errno.EROFS, "Read-only file system"),
    "torch-zip": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 461184 vs 461072"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_failed_save_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, name):
    ck = CheckpointManager(tmp_path, keep_last=2)
    eng = FailingEngine(4096, fail_at=2, error=ERRORS[name])
    ck.save(eng, client(10), world_size=1, zero_stage=0, precision="fp32")
    before = sorted(p.name for p in ck.dir.iterdir())
    latest_before = (ck.dir / "latest").read_text()
    with pytest.raises(WriteFailed) as info:
        ck.save(eng, client(20), world_size=1, zero_stage=0, precision="fp32")
    msg = str(info.value)
    assert "\n" not in msg and str(ck.dir) in msg and "saving checkpoint step-00000020" in msg
    assert "the last one's size" in msg and "free" in msg and "nothing complete was changed" in msg
    assert info.value.exit_code == EXIT_WRITE_FAILED
    assert sorted(p.name for p in ck.dir.iterdir()) == before  # no .tmp-step-00000020 left behind
    assert not any(p.name.startswith(TMP_PREFIX) for p in ck.dir.iterdir())
    assert (ck.dir / "latest").read_text() == latest_before and ck.latest() == "step-00000010"
    ck.check_compatible("step-00000010", world_size=1, zero_stage=0, run_dir=tmp_path)  # still verifies


def test_the_first_save_failing_reports_what_it_had_written(tmp_path):
    ck = CheckpointManager(tmp_path)
    with pytest.raises(WriteFailed, match=r"2\.0 KiB were written before it failed"):
        ck.save(FailingEngine(4000, fail_at=1, error=ERRORS["ENOSPC"]), client(5), world_size=1,
                zero_stage=0, precision="fp32")
    assert [p.name for p in ck.dir.iterdir()] == []
    assert ck.latest() is None


def test_too_little_free_space_stops_before_writing(tmp_path, monkeypatch):
    ck = CheckpointManager(tmp_path)
    eng = FailingEngine(4096, fail_at=99, error=ERRORS["ENOSPC"])
    ck.save(eng, client(1), world_size=1, zero_stage=0, precision="fp32")
    size = ck.size("step-00000001")
    assert size and size > 4096
    monkeypatch.setattr("transrec.storage.free_bytes", lambda path: size - 1)
    with pytest.raises(WriteFailed, match=r"stopped before writing: it needs about .* and .* are free"):
        ck.save(eng, client(2), world_size=1, zero_stage=0, precision="fp32")
    assert eng.saves == 1  # nothing was written
    assert ck.latest() == "step-00000001" and not (ck.dir / f"{TMP_PREFIX}step-00000002").exists()


def test_other_errors_propagate_unchanged_and_still_clean_up(tmp_path):
    ck = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="not a disk problem"):
        ck.save(FailingEngine(100, fail_at=1, error=ValueError("not a disk problem")), client(3),
                world_size=1, zero_stage=0, precision="fp32")
    assert not any(p.name.startswith(TMP_PREFIX) for p in ck.dir.iterdir())


def test_write_failure_classification():
    for e in ERRORS.values():
        assert is_write_failure(e)
    assert not is_write_failure(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_write_failure(RuntimeError("shape mismatch"))
    assert not is_write_failure(ValueError("x"))


def test_guarded_write_removes_a_temporary_file_too(tmp_path):
    tmp = tmp_path / ".tmp-export.json"
    with pytest.raises(WriteFailed, match="writing the export"):
        with guarded_write("writing the export", tmp_path, tmp):
            tmp.write_text(json.dumps({"a": 1}))
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not tmp.exists()
    check_space("writing", tmp_path, None)  # unknown size: no opinion
    check_space("writing", tmp_path, 1)
