"""Trainer checkpoint files serving never reads: blocked by default with a way forward, allowed
by a named policy key, and still scanned when allowed."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from services.contracts.events import CheckResult, Status
from services.contracts.policy import ValidationPolicy
from services.validator.checks.base import CheckContext
from services.validator.checks.inventory import build_inventory
from services.validator.checks.unsafe_code import FindingKind, check_unsafe_code
from tests.unit.validator import hostile
from tests.unit.validator.hostile import (
    marker,
    op_call,
    op_global,
    op_str,
    torch_zip,
    whole_pickle,
)

torch = pytest.importorskip("torch")

TRAINING_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")


def training_args_pickle(extra: bytes = b"") -> bytes:
    """How torch.save pickles a TrainingArguments (protocol 2): __new__ of the dataclass, then
    BUILD with its __dict__, whose enum fields are class(value)."""
    cls = op_global("transformers.training_args", "TrainingArguments")
    new = cls + hostile.op_tuple() + b"\x81"  # NEWOBJ: cls.__new__(cls)
    state = b"}(" + op_str("output_dir") + op_str("out")
    state += op_str("eval_strategy") + op_call(
        op_global("transformers.trainer_utils", "IntervalStrategy"), op_str("steps")
    )
    state += op_str("optim") + op_call(
        op_global("transformers.training_args", "OptimizerNames"), op_str("adamw_torch")
    )
    state += op_str("learning_rate") + b"G" + bytes(8) + b"u"
    return whole_pickle(extra + new + state + b"b")


def write_trainer_checkpoint(directory: Path, *, training_args: bytes | None = None) -> Path:
    """A Trainer checkpoint directory: the served weights and configs, plus its training state,
    written by torch.save as Trainer writes each file."""
    model = hostile.write_safetensors_dir(directory)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    torch.save(optimizer.state_dict(), model / "optimizer.pt")
    torch.save(scheduler.state_dict(), model / "scheduler.pt")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), model / "scaler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(rng | {"cpu": torch.random.get_rng_state()}, model / "rng_state.pth")
    torch_zip(model / "training_args.bin", training_args or training_args_pickle())
    return model


def scan(path: Path, **policy: bool) -> CheckResult:
    ctx = CheckContext(policy=ValidationPolicy(**policy))
    return check_unsafe_code(build_inventory(str(path)), ctx)


def test_training_state_blocks_by_default_naming_each_file_and_the_way_out(
    tmp_path: Path,
) -> None:
    res = scan(write_trainer_checkpoint(tmp_path / "ckpt"))
    assert res.status is Status.FAILED
    flagged = {
        f["file"] for f in res.details["findings"] if f["kind"] == FindingKind.TRAINING_STATE
    }
    assert flagged == set(TRAINING_FILES)
    what = next(f["what"] for f in res.details["findings"] if f["file"] == "optimizer.pt")
    assert "from_pretrained and serving never read" in what
    assert "Remove it from the upload, or set validation.allow_training_state: true" in what
    # what training_args.bin would import is listed too
    assert any(
        f["file"] == "training_args.bin"
        and f["what"] == "archive/data.pkl: imports transformers.training_args.TrainingArguments"
        for f in res.details["findings"]
    ), res.details["findings"]


def test_the_policy_key_lets_real_training_state_through(tmp_path: Path) -> None:
    res = scan(write_trainer_checkpoint(tmp_path / "ckpt"), allow_training_state=True)
    assert res.status is Status.PASSED, res.reason
    assert sorted(res.details["allowed_training_state"]) == sorted(TRAINING_FILES)


def test_allowed_training_state_is_still_scanned(tmp_path: Path) -> None:
    payload = op_call(op_global("os", "system"), op_str(hostile.payload_command(tmp_path)))
    model = write_trainer_checkpoint(
        tmp_path / "ckpt", training_args=training_args_pickle(payload + b"0")
    )
    res = scan(model, allow_training_state=True)
    assert res.status is Status.FAILED
    assert [f["what"] for f in res.details["findings"]] == ["archive/data.pkl: imports os.system"]
    assert not marker(tmp_path).exists()


def test_trainer_classes_are_not_allowed_in_files_serving_loads(tmp_path: Path) -> None:
    model = hostile.write_safetensors_dir(tmp_path / "m")
    torch_zip(model / "pytorch_model.bin", training_args_pickle())
    res = scan(model, allow_training_state=True)
    assert res.status is Status.FAILED
    assert "imports transformers.training_args.TrainingArguments" in res.reason


def test_an_allowed_checkpoint_passes_the_whole_validation(tmp_path: Path) -> None:
    # Training state is not weights: the manifest need not list it, and it weighs no VRAM.
    from services.validator.validate import validate

    model = write_trainer_checkpoint(tmp_path / "ckpt")
    report = validate(str(model), policy=ValidationPolicy(allow_training_state=True))
    assert report.status is Status.PASSED, report.reason
    blocked = validate(str(model))
    assert [c.name for c in blocked.checks if c.status is Status.FAILED] == ["unsafe_code"]
