"""The benchmark's child process (isolated.py starts it): `python -m services.benchmarker.child`.

It imports torch and transformers, then reads one job (a JSON line) on stdin and runs it. It
speaks JSON lines on the stdout it was started with: its log records, each step, and the
result. Anything else written to stdout (by a library) goes to stderr instead, so that nothing
but this process's own messages reach the parent as protocol.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from services.benchmarker.isolated import LOG_CHARS, Job
from services.benchmarker.run import OnStep, Step
from services.contracts.events import StageReport
from services.contracts.policy import Policy


class _Channel:
    """One writer of protocol lines, shared by threads (the log handler and the job)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str)
        with self.lock:
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except (OSError, ValueError):  # the parent is gone: the watchdog ends this process
                pass


class _Forward(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__(logging.INFO)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))[-LOG_CHARS:]
            self.channel.send({"log": [record.name, record.levelno, text[:LOG_CHARS]]})
        except Exception:  # a log record must never end a benchmark
            self.handleError(record)


WORKDIR_PREFIX = "preflight-benchmark-"  # isolated._Child makes it


def _remove_workdir() -> None:
    """The empty working directory the benchmarker made for this process, if that is where it
    runs: a benchmarker killed outright cannot remove it itself."""
    here = Path.cwd()
    temporary = Path(tempfile.gettempdir()).resolve()
    if here.name.startswith(WORKDIR_PREFIX) and here.parent.resolve() == temporary:
        shutil.rmtree(here, ignore_errors=True)


def _orphan_watch(parent: int) -> None:
    """End this process when the benchmarker that started it is gone (killed, crashed)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            _remove_workdir()
            os._exit(3)


def run_job(job: Job, on_step: OnStep) -> tuple[StageReport, str | None]:
    from services.benchmarker import loading
    from services.benchmarker.run import ResultStore, run_benchmarks
    from services.storage.cache import ModelCache
    from services.validator.checks.checksum import DigestCache, digest_cache_path

    store = None
    if job.data_dir is not None:
        data = Path(job.data_dir)
        store = ResultStore(
            data / "cache" / "perplexity.json", DigestCache(digest_cache_path(data))
        )
    models = ModelCache.configured(
        Path(job.model_cache_dir) if job.model_cache_dir else None, job.model_cache_max_bytes
    )
    if job.torch_threads is not None and loading.torch_available():
        import torch

        torch.set_num_threads(job.torch_threads)
    return run_benchmarks(
        job.location,
        job.baseline_location,
        Policy.model_validate(job.policy),
        model_class=job.model_class,
        store=store,
        device=job.device,
        service=job.service,
        model_cache=models,
        time_limit_s=job.time_limit_s,
        on_step=on_step,
    )


def _warm_up() -> None:
    """What every job needs before its model: torch, transformers' auto classes (lazy modules,
    resolved here), the measurement code and the evaluation text and prompts."""
    import torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    from services.benchmarker import consistency, latency, perplexity  # noqa: F401
    from services.benchmarker.corpus import DEFAULT_EVAL_DATASET, load_eval_text, load_prompts

    load_eval_text(DEFAULT_EVAL_DATASET)
    load_prompts()
    # A first from_pretrained and generate in a process costs about 1.4 s here whatever the
    # model (transformers' loading code, torch's kernels): paid on a tiny model of our own,
    # outside the working directory, before the job.
    from services.benchmarker.loading import load_model
    from services.stack.samples import write_sample_model

    with tempfile.TemporaryDirectory(prefix="preflight-warm-up-") as tmp:
        tiny = write_sample_model(Path(tmp) / "m", layers=1, hidden=16, heads=2, vocab=32)
        loaded = load_model(str(tiny), device="cpu")
        inputs = loaded.tokenizer("a b", return_tensors="pt")
        loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)


def main() -> None:
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # a library's print() lands on stderr, never in the protocol
    sys.stdout = sys.stderr
    root = logging.getLogger()
    root.handlers[:] = [_Forward(channel)]
    root.setLevel(logging.INFO)
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    with contextlib.suppress(OSError):  # the first to go when the host runs out of memory
        Path("/proc/self/oom_score_adj").write_text("1000")
    from services.benchmarker import loading

    if loading.torch_available():  # what a spare child has done before its job comes
        root.setLevel(logging.WARNING)  # the warm-up's own lines are not the job's
        try:
            _warm_up()
        except Exception:  # the job still runs, only colder; the parent's log says why
            logging.getLogger("preflight.benchmarker").warning(
                "benchmark process warm-up failed", exc_info=True
            )
        root.setLevel(logging.INFO)
    line = sys.stdin.readline()
    if not line.strip():
        return  # a spare the benchmarker no longer needs
    try:
        job = Job(**json.loads(line))

        def on_step(step: Step) -> None:
            check = step.check.model_dump(mode="json") if step.check else None
            channel.send({"step": {"phase": step.phase, "name": step.name, "check": check}})

        report, device = run_job(job, on_step)
        channel.send({"result": {"report": report.model_dump(mode="json"), "device": device}})
    except BaseException as exc:  # our own failure: said to the parent, which reports it
        channel.send({"crash": f"{type(exc).__name__}: {exc}"[:LOG_CHARS]})
        logging.getLogger("preflight.benchmarker").exception("benchmark process failed")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
