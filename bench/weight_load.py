"""The torch engine's weight load against the disk: in one run, interleaved rounds of

- raw: the checkpoint's files read with the reader's own chunk size and threads into one buffer
  per file, (a) a buffer reused across rounds (its pages already the process's: the file's speed
  alone) and (b) a buffer allocated untouched each round (its pages fault in during the read, as
  any loader's new memory must);
- new: `torch_weights.load_model` whole (the model built on the meta device, the file read into
  each tensor's memory, assigned, tied): what `Engine.load_weights` spends past config and tokenizer;
- old: what the engine did before, `from_pretrained` then `_materialise` (a copy of every tensor
  off the file's mapping);

warm (the files read once first, so the page cache holds them), then one cold round each (the
page cache dropped before each, where `/proc/sys/vm/drop_caches` can be written).

    .venv/bin/python -m bench.weight_load        # --model /tmp/weights-bench/m3b --rounds 5

Without `--model`'s folder it writes one first (Qwen2.5-3B's shape cut to 4 layers, bf16, 1.24 GB;
not timed)."""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = Path("/tmp/weights-bench/m3b")
GB = 1e9


def ensure_model(folder: Path) -> Path:
    from lessor.engines import tiny_qwen

    if not (folder / "config.json").is_file():
        print(f"writing a qwen2.5-3b-shaped model with 4 layers to {folder} (not timed)", flush=True)
        tiny_qwen.write(folder, architecture=tiny_qwen.shape_overrides(4, None), dtype="bfloat16", shape="qwen2.5-3b")
    return folder


def raw_read(files: list[Path], buffers: dict[Path, torch.Tensor]) -> None:
    """Each file whole into its buffer, in the reader's chunks over its threads."""
    from lessor.engines.torch_weights import CHUNK_BYTES, READERS, read_exact

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        for path in files:
            view, size = memoryview(buffers[path].numpy()), path.stat().st_size
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                reads = [pool.submit(read_exact, fd, [view[at:at + CHUNK_BYTES]], at, path)
                         for at in range(0, size, CHUNK_BYTES)]
                for read in reads:
                    read.result()
            finally:
                os.close(fd)


def empty_buffers(files: list[Path]) -> dict[Path, torch.Tensor]:
    import torch

    return {path: torch.empty(path.stat().st_size, dtype=torch.uint8) for path in files}


class Runs:
    """The four ways, each timed on the same files; every result is let go before the next."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        from lessor.engines import torch_weights
        from lessor.engines.torch_engine import _causal_lm_class

        hf_logging.disable_progress_bar()
        self.folder, self.dtype = folder, torch.bfloat16
        self.files = torch_weights.checkpoint_files(folder)
        self.bytes = sum(p.stat().st_size for p in self.files)
        self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.model_class: Any = _causal_lm_class(self.config)  # a transformers class: from_pretrained
        self.reused: dict[Path, torch.Tensor] = {}

    def warm_up(self) -> None:
        self.reused = empty_buffers(self.files)
        raw_read(self.files, self.reused)  # its pages are ours from now on, and the page cache is warm

    def raw_reused(self) -> float:
        return timed(lambda: raw_read(self.files, self.reused))

    def raw_fresh(self) -> float:
        buffers = empty_buffers(self.files)
        return timed(lambda: raw_read(self.files, buffers))

    def new(self) -> float:
        from lessor.engines import torch_weights

        return timed(lambda: torch_weights.load_model(self.folder, self.model_class, self.config, self.dtype, "cpu"))

    def old(self) -> float:
        from lessor.engines.torch_engine import _materialise

        def load():
            model = self.model_class.from_pretrained(self.folder, config=self.config, dtype=self.dtype,
                                                     local_files_only=True)
            _materialise(model)
            return model
        return timed(load)

    def in_a_new_process(self, way: str) -> float:
        """One load timed in a process of its own (imports and config outside the clock), as the
        engine loads: whatever memory the process gets, it gets from the kernel for the first time."""
        run = subprocess.run([sys.executable, "-m", "bench.weight_load", "--model", str(self.folder), "--once", way],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        return float(run.stdout.split()[-1])

    def new_process(self) -> float:
        return self.in_a_new_process("new")

    def old_process(self) -> float:
        return self.in_a_new_process("old")


def timed(work) -> float:
    release()  # what the way before let go is back with the kernel before the clock starts
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    del result
    return seconds


def release() -> None:
    from lessor.engines.torch_engine import _trim

    gc.collect()
    _trim()


def drop_caches() -> str | None:
    """None once the page cache is dropped, else why it could not be."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


WAYS = ("raw_reused", "raw_fresh", "new", "old", "new_process", "old_process")
LABELS = {"raw_reused": "raw read, buffer reused", "raw_fresh": "raw read, buffer new",
          "new": "new: torch_weights.load_model", "old": "old: from_pretrained + _materialise",
          "new_process": "new, in a process of its own", "old_process": "old, in a process of its own"}


def warm_rounds(runs: Runs, rounds: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for i in range(rounds):
        for way in WAYS:
            seconds[way].append(getattr(runs, way)())
        print(f"round {i + 1}: " + "  ".join(f"{way} {runs.bytes / seconds[way][-1] / GB:.2f}" for way in WAYS)
              + " GB/s", flush=True)
    return seconds


def cold_round(runs: Runs) -> dict[str, float] | str:
    seconds = {}
    for way in WAYS:
        why = drop_caches()
        if why is not None:
            return why
        seconds[way] = getattr(runs, way)()
    runs.warm_up()  # warm again for whatever runs next
    return seconds


def report(runs: Runs, warm: dict[str, list[float]], cold: dict[str, float] | str) -> None:
    rate = {way: runs.bytes / statistics.median(s) / GB for way, s in warm.items()}
    cold_rate = {} if isinstance(cold, str) else {way: runs.bytes / s / GB for way, s in cold.items()}
    print(f"\n{runs.bytes / GB:.3f} GB in {len(runs.files)} file(s); reader: {_reader()}")
    print(f"{'':38} {'warm GB/s (median)':>19} {'cold GB/s':>10}")
    for way in WAYS:
        cold_text = f"{cold_rate[way]:10.2f}" if cold_rate else f"{'-':>10}"
        print(f"{LABELS[way]:38} {rate[way]:19.2f} {cold_text}")
    for name, (a, b) in {"new / raw (buffer reused)": ("new", "raw_reused"),
                         "new / raw (buffer new)": ("new", "raw_fresh"), "new / old": ("new", "old"),
                         "new / old, a process each": ("new_process", "old_process")}.items():
        cold_text = f"{cold_rate[a] / cold_rate[b]:10.2f}" if cold_rate else f"{'-':>10}"
        print(f"{name:38} {rate[a] / rate[b]:19.2f} {cold_text}")
    if isinstance(cold, str):
        print(f"no cold round: the page cache could not be dropped ({cold})")


def _reader() -> str:
    from lessor.engines.torch_weights import CHUNK_BYTES, READERS

    return f"{CHUNK_BYTES >> 20} MiB reads, {READERS} threads, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.weight_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a model folder (written when absent)")
    parser.add_argument("--rounds", type=int, default=5, help="warm rounds, each way once a round")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold round")
    parser.add_argument("--once", choices=("new", "old"), help=argparse.SUPPRESS)  # the child of *_process
    args = parser.parse_args(argv)
    runs = Runs(ensure_model(args.model))
    if args.once:
        print(getattr(runs, args.once)())
        return 0
    runs.warm_up()
    warm = warm_rounds(runs, args.rounds)
    cold = "skipped (--no-cold)" if args.no_cold else cold_round(runs)
    report(runs, warm, cold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
